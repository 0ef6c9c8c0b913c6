"""Fine-Pruning and Neural Attention Distillation against hand computations on a tiny model."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict

from ibau_jax import defenses
from ibau_jax.defenses import fp, nad
from ibau_jax.defenses.layers import apply_with_layers, channel_mask
from ibau_jax.models.vgg import SmallVGG16
from _layers import Conv, Dense

H = W = 8
CLASSES = 3
CHANNELS = 8
# bn1's bias sets the order of the channels' mean activations (scale is small next to the gaps).
BN1_BIAS = 2 * np.array([0.5, -1.5, 1.0, -0.5, 2.0, -1.0, 0.0, 1.5], np.float32)
ORDER = np.argsort(BN1_BIAS)  # [1, 5, 3, 6, 0, 2, 7, 4]


class Net(nn.Module):
  """conv0 -> bn0 -> elu -> pool -> conv1 -> bn1 -> elu -> global mean -> classifier."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Conv(4, (3, 3), padding=1, name="conv0")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn0")(x)
    x = nn.elu(x)
    n, h, w, c = x.shape
    x = x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    x = Conv(CHANNELS, (3, 3), padding=1, name="conv1")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn1")(x)
    x = nn.elu(x)
    return Dense(CLASSES, name="classifier")(x.mean(axis=(1, 2)))


MODEL = Net()


def apply_fn(variables, x):
  return MODEL.apply(variables, x)


# Jitted helpers for the hand computations (eager Flax is slow on a busy CPU).
_logits = jax.jit(apply_fn)


@functools.partial(jax.jit, static_argnames="layer")
def _capture(variables, x, layer):
  return apply_with_layers(apply_fn, variables, x, capture=(layer,))[1][layer]


@functools.partial(jax.jit, static_argnames="layer")
def _masked_logits(variables, x, keep, layer):
  return apply_with_layers(apply_fn, variables, x, modify={layer: channel_mask(keep)})[0]


def _images(n=24, seed=0):
  return np.random.RandomState(seed).rand(n, H, W, 3).astype(np.float32)


def _setup():
  """Variables with a known channel order at bn1, classifier weights growing with a channel's
  rank (so pruning dormant channels costs little accuracy at first), logits centred on the
  data, non-trivial batch statistics; labels: the model's own predictions (accuracy 1)."""
  v = jax.jit(MODEL.init)(jax.random.PRNGKey(2), jnp.zeros((1, H, W, 3)))
  params = jax.tree_util.tree_map(np.asarray, v["params"])
  params["bn1"]["bias"] = BN1_BIAS
  params["bn1"]["scale"] = np.full(CHANNELS, 0.5, np.float32)
  rank = np.argsort(ORDER)
  params["classifier"]["kernel"] = params["classifier"]["kernel"] * (0.05 * 2.0 ** rank)[:, None]
  stats = jax.tree_util.tree_map(lambda s: np.asarray(s) + 0.1, v["batch_stats"])
  variables = {"params": params, "batch_stats": stats}
  x = _images()
  params["classifier"]["bias"] = params["classifier"]["bias"] - np.asarray(
      _logits(variables, x)).mean(axis=0)
  variables = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), variables)
  labels = np.asarray(jnp.argmax(_logits(variables, x), axis=-1)).astype(np.int32)
  return variables, x, labels


VARIABLES, X, Y = _setup()
SGD = dict(batch_size=8, learning_rate=0.05, momentum=0.9, weight_decay=0.01)
# Every fine-tuning below runs 2 epochs: ft's jitted step is compiled once for all tests.
FT = defenses.FTConfig(epochs=2, **SGD)


def _tree_close(a, b, **kw):
  jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, **kw), a, b)


def _tree_equal(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def _hand_mean(layer, act=lambda a: a):
  return np.asarray(act(_capture(VARIABLES, X, layer)), np.float64).mean(axis=(0, 1, 2))


def _hand_accuracy(layer, pruned):
  keep = np.ones(CHANNELS, np.float32)
  keep[np.asarray(pruned, int)] = 0.0
  logits = _masked_logits(VARIABLES, X, keep, layer)
  return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == Y))


def test_setup_is_what_the_tests_assume():
  assert len(np.unique(Y)) == CLASSES
  np.testing.assert_array_equal(np.argsort(_hand_mean("bn1", jax.nn.elu)), ORDER)
  np.testing.assert_array_equal(np.argsort(_hand_mean("bn1")), ORDER)


# ----------------------------------------------------------------------------------------
# Fine-Pruning
# ----------------------------------------------------------------------------------------


def test_fine_pruning_prunes_lowest_channels_bakes_zeros_and_fine_tunes_the_rest():
  seen = []
  config = fp.FPConfig(prune_ratio=0.5, max_acc_drop=1.0, epochs=1, activation="elu",
                       callback=lambda s, stats, v: seen.append((s, v)), **SGD)
  key = jax.random.PRNGKey(5)
  result = fp.fine_pruning(apply_fn, VARIABLES, X, Y, config, key=key)
  prune = result.history[0]
  # Ranking: mean of elu(bn1 output) over images and positions, increasing.
  np.testing.assert_allclose(prune["mean_activation"], _hand_mean("bn1", jax.nn.elu),
                             rtol=1e-5)
  assert prune["order"] == list(ORDER) and prune["layer"] == "bn1"
  # Ratio cap: ⌊0.5 · 8⌋ = 4 channels, one per step, exactly the 4 lowest.
  assert prune["pruned"] == list(ORDER[:4]) and prune["num_pruned"] == 4
  assert [s["num_pruned"] for s in prune["steps"]] == [1, 2, 3, 4]
  assert all(s["accepted"] for s in prune["steps"])
  for s in prune["steps"]:
    assert s["accuracy"] == pytest.approx(_hand_accuracy("bn1", ORDER[:s["num_pruned"]]))
  assert prune["base_accuracy"] == 1.0
  assert [s for s, _ in seen] == ["prune", 0]
  assert [h["stage"] for h in result.history] == ["prune", "finetune"]

  # The returned model: bn1's pruned scale and bias are 0, so its pruned channels are 0
  # (and elu(0) = 0) on any input, here also on unseen images.
  pruned = ORDER[:4]
  kept = ORDER[4:]
  out_params = result.variables["params"]
  assert np.all(np.asarray(out_params["bn1"]["scale"])[pruned] == 0)
  assert np.all(np.asarray(out_params["bn1"]["bias"])[pruned] == 0)
  for images in (X, _images(24, seed=9)):
    a = np.asarray(_capture(result.variables, images, "bn1"))
    assert np.all(a[..., pruned] == 0) and np.all(np.abs(a[..., kept]).max(axis=(0, 1, 2)) > 0)
  # The variables passed to the callback after pruning are the masked model exactly.
  keep = np.ones(CHANNELS, np.float32)
  keep[pruned] = 0.0
  masked = _masked_logits(VARIABLES, X, keep, "bn1")
  np.testing.assert_allclose(_logits(seen[0][1], X), masked, rtol=1e-6, atol=1e-6)

  # Fine-tuning by hand: SGD with momentum and coupled weight decay on the baked params,
  # updates of the pruned entries multiplied by 0, batches permutation(fold_in(key, 0)).
  params = jax.tree_util.tree_map(np.asarray, VARIABLES["params"])
  params["bn1"] = dict(params["bn1"])
  for name in ("scale", "bias"):
    params["bn1"][name] = np.where(keep > 0, params["bn1"][name], 0.0).astype(np.float32)
  mask = jax.tree_util.tree_map(np.ones_like, params)
  mask["bn1"] = {"scale": keep, "bias": keep}
  rest = {"batch_stats": VARIABLES["batch_stats"]}
  momentum = jax.tree_util.tree_map(np.zeros_like, params)
  ce_grad = jax.jit(jax.grad(lambda p, xb, yb: optax.softmax_cross_entropy_with_integer_labels(
      apply_fn({"params": p, **rest}, xb), yb).mean()))
  order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), len(X)))
  for i in range(3):
    idx = order[i * 8:(i + 1) * 8]
    grads = ce_grad(params, X[idx], Y[idx])
    momentum = jax.tree_util.tree_map(lambda m, g, p: 0.9 * m + np.asarray(g) + 0.01 * p,
                                      momentum, grads, params)
    params = jax.tree_util.tree_map(lambda p, m, k: p - 0.05 * m * k, params, momentum, mask)
  _tree_close(out_params, params, rtol=1e-4, atol=1e-6)
  # The kept channels did move.
  assert np.all(np.asarray(out_params["bn1"]["scale"])[kept] != 0.5)
  # Other collections pass through untouched.
  _tree_equal(result.variables["batch_stats"], VARIABLES["batch_stats"])


def test_fine_pruning_of_a_conv_layer_in_steps_equals_masking_its_output():
  config = fp.FPConfig(layer="conv1", activation="identity", prune_ratio=0.5, prune_step=3,
                       max_acc_drop=1.0, epochs=0, batch_size=8)
  result = fp.fine_pruning(apply_fn, VARIABLES, X, Y, config, key=jax.random.PRNGKey(0))
  (prune,) = result.history
  hand = _hand_mean("conv1")
  pruned = np.argsort(hand)[:4]
  assert prune["pruned"] == list(pruned)
  assert [s["num_pruned"] for s in prune["steps"]] == [3, 4]  # last step cut to ⌊0.5 · 8⌋
  conv = result.variables["params"]["conv1"]
  assert np.all(np.asarray(conv["kernel"])[..., pruned] == 0)
  assert np.all(np.asarray(conv["bias"])[pruned] == 0)
  assert np.all(np.asarray(_capture(result.variables, X, "conv1"))[..., pruned] == 0)
  keep = np.ones(CHANNELS, np.float32)
  keep[pruned] = 0.0
  masked = _masked_logits(VARIABLES, X, keep, "conv1")
  np.testing.assert_allclose(_logits(result.variables, X), masked, rtol=1e-6, atol=1e-6)
  # No fine-tuning: everything but conv1's pruned entries is unchanged.
  for name in ("conv0", "bn0", "bn1", "classifier"):
    _tree_equal(result.variables["params"][name], VARIABLES["params"][name])


def test_fine_pruning_stops_at_the_first_step_over_the_accuracy_drop():
  accs = [_hand_accuracy("bn1", ORDER[:k]) for k in range(CHANNELS + 1)]

  def expected(max_drop):
    k = 0
    while k < CHANNELS and accs[0] - accs[k + 1] <= max_drop:
      k += 1
    return k

  # The curve of this model: a first step that costs 1/12, a second that costs nothing, then
  # a collapse, so the rule is exercised: 0.1 stops inside, 0.05 stops at 0 although the
  # second step alone would pass (pruning stops at the first violation).
  assert 0 < expected(0.1) < CHANNELS
  assert expected(0.05) == 0 and accs[0] - accs[2] <= 0.05
  for max_drop in (0.1, 0.05):
    config = fp.FPConfig(prune_ratio=1.0, max_acc_drop=max_drop, epochs=0, batch_size=8)
    result = fp.fine_pruning(apply_fn, VARIABLES, X, Y, config, key=jax.random.PRNGKey(0))
    prune = result.history[0]
    k = expected(max_drop)
    assert prune["num_pruned"] == k and prune["pruned"] == list(ORDER[:k])
    assert [s["num_pruned"] for s in prune["steps"]] == list(range(1, k + 2))
    assert [s["accepted"] for s in prune["steps"]] == [True] * k + [False]
    assert prune["accuracy"] == pytest.approx(accs[k])
    np.testing.assert_allclose([s["accuracy"] for s in prune["steps"]], accs[1:k + 2])


def test_fine_pruning_without_pruning_is_fine_tuning():
  key = jax.random.PRNGKey(7)
  result = fp.fine_pruning(apply_fn, VARIABLES, X, Y,
                           fp.FPConfig(prune_ratio=0.0, epochs=2, **SGD), key=key)
  assert result.history[0]["pruned"] == [] and result.history[0]["steps"] == []
  reference = defenses.fine_tune(apply_fn, VARIABLES, X, Y, FT, key=key)
  _tree_close(result.variables["params"], reference.variables["params"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------
# NAD
# ----------------------------------------------------------------------------------------


def test_attention_loss_by_hand():
  a_s = np.arange(2 * 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 2, 3) / 10 - 1.0
  a_t = np.cos(np.arange(24, dtype=np.float32)).reshape(2, 2, 2, 3)
  # Example 0 of a_s, position (0, 0): channels (-1.0, -0.9, -0.8) -> 1 + 0.81 + 0.64 = 2.45.
  raw, maps = {}, {}
  for name, a in (("s", a_s), ("t", a_t)):
    am = np.zeros((2, 4))
    for i in range(2):
      for h in range(2):
        for w in range(2):
          am[i, h * 2 + w] = sum(abs(float(a[i, h, w, c])) ** 2 for c in range(3))
    raw[name] = am
    maps[name] = am / (np.sqrt(np.sum(am ** 2, axis=1, keepdims=True)) + 1e-6)
  assert raw["s"][0, 0] == pytest.approx(2.45)
  want = np.mean((maps["s"] - maps["t"]) ** 2)
  np.testing.assert_allclose(nad.attention_map(jnp.asarray(a_s)), maps["s"], rtol=1e-5)
  assert float(nad.attention_loss(jnp.asarray(a_s), jnp.asarray(a_t))) == pytest.approx(
      want, rel=1e-5)
  # p = 1: sums of absolute values.
  am1 = np.abs(a_s).sum(-1).reshape(2, 4)
  am1 /= np.linalg.norm(am1, axis=1, keepdims=True) + 1e-6
  np.testing.assert_allclose(nad.attention_map(jnp.asarray(a_s), p=1.0), am1, rtol=1e-5)
  assert float(nad.attention_loss(jnp.asarray(a_s), jnp.asarray(a_s))) == 0.0


def test_nad_with_zero_betas_is_fine_tuning_after_a_fine_tuned_teacher():
  key = jax.random.PRNGKey(11)
  seen = []
  config = nad.NADConfig(betas=0.0, teacher_epochs=2, teacher_learning_rate=0.05, epochs=2,
                         callback=lambda s, stats, v: seen.append((s, stats, v)), **SGD)
  result = nad.nad(apply_fn, VARIABLES, X, Y, config, key=key)
  teacher_key, student_key = jax.random.split(key)
  teacher = defenses.fine_tune(apply_fn, VARIABLES, X, Y, FT, key=teacher_key)
  student = defenses.fine_tune(apply_fn, VARIABLES, X, Y, FT, key=student_key)
  # The teacher is trained for the configured epochs; the callback sees it after each.
  assert [(s, stats["epoch"]) for s, stats, _ in seen] == [("teacher", 0), ("teacher", 1),
                                                          (0, 0), (1, 1)]
  _tree_close(seen[1][2]["params"], teacher.variables["params"], rtol=1e-5, atol=1e-6)
  assert [(h["stage"], h["epoch"]) for h in result.history] == [
      ("teacher", 0), ("teacher", 1), ("student", 0), ("student", 1)]
  assert result.history[2]["layers"] == ["bn0", "bn1"]
  assert result.history[2]["betas"] == [0.0, 0.0]
  assert all(a > 0 for a in result.history[2]["attention"])
  # β = 0: the student is plain fine-tuning of the original model.
  _tree_close(result.variables["params"], student.variables["params"], rtol=1e-5, atol=1e-6)
  _tree_equal(result.variables["batch_stats"], VARIABLES["batch_stats"])


def test_nad_student_step_matches_hand_gradient_of_ce_plus_attention():
  x, y = X[:8], Y[:8]
  key = jax.random.PRNGKey(3)
  betas = (2e4, 5e4)
  config = nad.NADConfig(layers=["bn0", "bn1"], betas=betas, teacher_epochs=2,
                         teacher_learning_rate=0.05, epochs=1, activation="elu", **SGD)
  result = nad.nad(apply_fn, VARIABLES, x, y, config, key=key)
  teacher = defenses.fine_tune(apply_fn, VARIABLES, x, y, FT,
                               key=jax.random.split(key)[0]).variables
  rest = {"batch_stats": VARIABLES["batch_stats"]}

  def att(a):  # written out again: Σ_c |elu(a)|², flattened, divided by (L2 norm + 1e-6)
    m = (jax.nn.elu(a) ** 2).sum(axis=3).reshape(a.shape[0], -1)
    return m / (jnp.sqrt((m ** 2).sum(axis=1, keepdims=True)) + 1e-6)

  t_acts = {name: _capture(teacher, x, name) for name in ("bn0", "bn1")}

  def loss(p, b):
    logits, s_acts = apply_with_layers(apply_fn, {"params": p, **rest}, x,
                                       capture=("bn0", "bn1"))
    total = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    for i, name in enumerate(("bn0", "bn1")):
      total = total + b[i] * jnp.mean((att(s_acts[name]) - att(t_acts[name])) ** 2)
    return total

  params = VARIABLES["params"]
  # One batch, first step: momentum buffer = g + λθ, θ ← θ − lr·(g + λθ).
  step = lambda g: jax.tree_util.tree_map(lambda p, d: p - 0.05 * (d + 0.01 * p), params, g)
  value_and_grad = jax.jit(jax.value_and_grad(loss))
  value, grads = value_and_grad(params, jnp.asarray(betas))
  want = step(grads)
  ce_only = step(value_and_grad(params, jnp.zeros(2))[1])
  _tree_close(result.variables["params"], want, rtol=2e-4, atol=1e-6)
  # The attention term matters here: without it the step is measurably different.
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(ce_only)))
  assert diff > 1e-3
  student = result.history[-1]
  assert student["stage"] == "student" and student["betas"] == list(betas)
  assert student["loss"] == pytest.approx(float(value), rel=1e-4)


# ----------------------------------------------------------------------------------------
# Defaults, configs and bad input
# ----------------------------------------------------------------------------------------


def test_default_layers():
  assert fp.default_prune_layer(apply_fn, VARIABLES, X[:1]) == "bn1"
  assert nad.default_attention_layers(apply_fn, VARIABLES, X[:1]) == ("bn0", "bn1")
  vgg = SmallVGG16()
  v = jax.eval_shape(vgg.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  assert fp.default_prune_layer(vgg.apply, v, x) == "bn2_1"
  assert nad.default_attention_layers(vgg.apply, v, x) == ("bn0_1", "bn1_1", "bn2_1")


@pytest.mark.parametrize("cls,kwargs,match", [
    (fp.FPConfig, dict(prune_ratio=1.5), "prune_ratio"),
    (fp.FPConfig, dict(max_acc_drop=-0.1), "max_acc_drop"),
    (fp.FPConfig, dict(prune_step=0), "prune_step"),
    (fp.FPConfig, dict(epochs=-1), "epochs"),
    (fp.FPConfig, dict(batch_size=0), "batch_size"),
    (fp.FPConfig, dict(activation="gelu"), "activation"),
    (fp.FPConfig, dict(layer=""), "layer"),
    (fp.FPConfig, dict(momentum=1.0), "momentum"),
    (fp.FPConfig, dict(learning_rate=float("nan")), "learning_rate"),
    (nad.NADConfig, dict(betas=-1.0), "betas"),
    (nad.NADConfig, dict(betas=(1.0, "a")), "betas"),
    (nad.NADConfig, dict(layers=("bn0", "bn1"), betas=(1.0,)), "betas"),
    (nad.NADConfig, dict(layers=()), "layers"),
    (nad.NADConfig, dict(layers="bn0"), "layers"),
    (nad.NADConfig, dict(layers=("bn0", "bn0")), "duplicates"),
    (nad.NADConfig, dict(p=0.5), "p"),
    (nad.NADConfig, dict(teacher_epochs=0), "teacher_epochs"),
    (nad.NADConfig, dict(epochs=0), "epochs"),
    (nad.NADConfig, dict(teacher_learning_rate=-1.0), "teacher_learning_rate"),
    (nad.NADConfig, dict(weight_decay=-1.0), "weight_decay"),
    (nad.NADConfig, dict(activation="tanh"), "activation"),
    # A callback that is not callable used to fail only after an epoch of work.
    (fp.FPConfig, dict(callback="log"), r"^FPConfig.callback must be callable or None, "
                                        r"got 'log'$"),
    (nad.NADConfig, dict(callback=1), r"^NADConfig.callback must be callable or None, got 1$"),
])
def test_config_validation(cls, kwargs, match):
  with pytest.raises(ValueError, match=match):
    cls(**kwargs)


def test_bad_layers_and_inputs_raise():
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match=r"'bn9' is not a layer of the model; its layers are "
                                       r"\['conv0', 'bn0', 'conv1', 'bn1', 'classifier'\]"):
    fp.fine_pruning(apply_fn, VARIABLES, X, Y, fp.FPConfig(layer="bn9", batch_size=8), key=key)
  with pytest.raises(ValueError, match="'bn9' is not a layer"):
    nad.nad(apply_fn, VARIABLES, X, Y, nad.NADConfig(layers=("bn0", "bn9"), batch_size=8),
            key=key)
  with pytest.raises(ValueError, match="rank >= 3"):
    nad.nad(apply_fn, VARIABLES, X, Y, nad.NADConfig(layers=("classifier",), batch_size=8),
            key=key)
  with pytest.raises(ValueError, match="3 values for 2 layers"):
    nad.nad(apply_fn, VARIABLES, X, Y, nad.NADConfig(betas=(1.0, 2.0, 3.0), batch_size=8),
            key=key)
  with pytest.raises(ValueError, match="single class"):
    fp.fine_pruning(apply_fn, VARIABLES, X, np.zeros(len(X), np.int32),
                    fp.FPConfig(batch_size=8), key=key)
  with pytest.raises(ValueError, match="batch"):
    nad.nad(apply_fn, VARIABLES, X[:4], Y[:4], nad.NADConfig(batch_size=8), key=key)


def _assert_same_leaves(a, b):
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("defense", ["fp", "nad"])
def test_a_frozen_dict_comes_back_a_frozen_dict(defense):
  frozen = FrozenDict(VARIABLES)
  seen = []
  callback = lambda s, stats, v: seen.append(v)
  if defense == "fp":
    config = fp.FPConfig(prune_ratio=0.5, max_acc_drop=1.0, epochs=1, callback=callback, **SGD)
    run = lambda v, c: fp.fine_pruning(apply_fn, v, X, Y, c, key=jax.random.PRNGKey(0))
  else:
    config = nad.NADConfig(teacher_epochs=1, epochs=1, callback=callback, **SGD)
    run = lambda v, c: nad.nad(apply_fn, v, X, Y, c, key=jax.random.PRNGKey(0))
  result = run(frozen, config)
  assert type(result.variables) is FrozenDict and {type(v) for v in seen} == {FrozenDict}
  assert jax.tree_util.tree_structure(result.variables) == jax.tree_util.tree_structure(frozen)
  if defense == "fp":  # (the pruned channels are zero in the returned FrozenDict too)
    pruned = result.history[0]["pruned"]
    assert pruned and np.all(np.asarray(result.variables["params"]["bn1"]["scale"])[pruned] == 0)
    _assert_same_leaves(result.variables,
                        run(VARIABLES, config.replace(callback=None)).variables)


def test_a_diverging_teacher_student_or_fine_tuning_is_a_clear_error():
  # Frozen BatchNorm statistics make SGD diverge at a large enough learning rate; the
  # defenses stop with the setting to lower instead of returning NaN parameters.
  huge = 1e12
  with pytest.raises(ValueError, match=r"NAD's teacher \(fine-tuning\) diverged: .* epoch 0; "
                                       r"lower NADConfig.teacher_learning_rate"):
    nad.nad(apply_fn, VARIABLES, X, Y,
            nad.NADConfig(teacher_epochs=1, teacher_learning_rate=huge, epochs=1, **SGD),
            key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"NAD's student diverged: .* lower "
                                       r"NADConfig.learning_rate"):
    nad.nad(apply_fn, VARIABLES, X, Y,
            nad.NADConfig(teacher_epochs=1, teacher_learning_rate=0.01, epochs=1,
                          **{**SGD, "learning_rate": huge}),
            key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"^fine-tuning diverged: .* lower "
                                       r"FTConfig.learning_rate"):
    defenses.fine_tune(apply_fn, VARIABLES, X, Y, FT.replace(learning_rate=huge),
                       key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"Fine-Pruning's fine-tuning diverged"):
    fp.fine_pruning(apply_fn, VARIABLES, X, Y,
                    fp.FPConfig(prune_ratio=0.5, max_acc_drop=1.0, epochs=1, batch_size=8,
                                learning_rate=huge),
                    key=jax.random.PRNGKey(0))
