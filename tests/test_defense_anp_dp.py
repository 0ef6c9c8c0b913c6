"""ANP (adversarial neuron pruning) and DP-SGD as defenses: hand computations, ranges,
pruning, noise statistics, determinism, bad configs and a tiny backdoored model."""

from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict

from ibau_jax.defenses import anp as anp_lib
from ibau_jax.defenses import dp as dp_lib
from ibau_jax.defenses.layers import apply_with_layers

from _interrupt import interrupt, recording, saved_step
from _layers import Conv, Dense

CLASSES = 4
SEED_BACKDOOR = 1
ANP_ITERATIONS = 100
TRAIN_STEPS = 200


class SmallNet(nn.Module):
  """conv → BN → ReLU → conv → BN → ReLU → 2x2 max-pool → dense (layers bn0, bn1)."""

  widths: tuple = (3, 4)

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, w in enumerate(self.widths):
      x = Conv(w, (3, 3), padding=1, name=f"conv{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i}")(x)
      x = nn.relu(x)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return Dense(CLASSES, name="head")(x.reshape((x.shape[0], -1)))


SMALL = SmallNet()


def apply_small(variables, x):
  return SMALL.apply(variables, x)


def _small_variables(seed=0):
  v = SMALL.init(jax.random.PRNGKey(seed), jnp.zeros((1, 6, 6, 3)))
  rng = np.random.RandomState(seed)
  # Non-trivial BatchNorm parameters and statistics (pass-through is observable).
  params = jax.tree_util.tree_map(lambda p: p + 0.3 * rng.randn(*p.shape).astype(np.float32),
                                  v["params"])
  stats = jax.tree_util.tree_map(lambda s: s + 0.2 + 0.1 * rng.rand(*s.shape).astype(np.float32),
                                 v["batch_stats"])
  return {"params": params, "batch_stats": stats}


def _small_data(n=24, seed=0):
  rng = np.random.RandomState(seed)
  return rng.rand(n, 6, 6, 3).astype(np.float32), (np.arange(n) % CLASSES).astype(np.int32)


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


# ----------------------------------------------------------------------------------------
# ANP
# ----------------------------------------------------------------------------------------


def test_neuron_modifier_equals_hand_computation():
  variables = _small_variables()
  x, _ = _small_data(5)
  rng = np.random.RandomState(1)
  m, d, xi = (rng.rand(3).astype(np.float32), rng.uniform(-0.4, 0.4, 3).astype(np.float32),
              rng.uniform(-0.4, 0.4, 3).astype(np.float32))
  bn = variables["params"]["bn0"]
  run = jax.jit(lambda v, im, mod: apply_with_layers(
      apply_small, v, im, capture=("conv0", "bn0"),
      modify={"bn0": anp_lib.neuron_modifier(bn["bias"], *mod)}))
  _, acts = run(variables, x, (jnp.asarray(m), jnp.asarray(d), jnp.asarray(xi)))
  # By hand: x̂ = (conv − μ)/√(σ² + 1e-5), y' = (m + δ)·γ·x̂ + (1 + ξ)·β.
  conv = np.asarray(acts["conv0"], np.float64)
  stats = variables["batch_stats"]["bn0"]
  xhat = (conv - np.asarray(stats["mean"])) / np.sqrt(np.asarray(stats["var"]) + 1e-5)
  gamma, beta = np.asarray(bn["scale"], np.float64), np.asarray(bn["bias"], np.float64)
  expected = (m + d) * gamma * xhat + (1 + xi) * beta
  np.testing.assert_allclose(np.asarray(acts["bn0"]), expected, rtol=1e-5, atol=1e-5)
  # Mask only (δ = ξ = 0) and the identity (m = 1).
  y_plain = rng.randn(2, 3).astype(np.float32)
  np.testing.assert_allclose(anp_lib.neuron_modifier(beta.astype(np.float32), m)(y_plain),
                             m * (y_plain - beta) + beta, rtol=1e-5, atol=1e-6)
  zero = jnp.zeros(3)
  _, acts = run(variables, x, (jnp.asarray(m), zero, zero))
  np.testing.assert_allclose(np.asarray(acts["bn0"]), m * gamma * xhat + beta, rtol=1e-5,
                             atol=1e-5)
  logits, _ = run(variables, x, (jnp.ones(3), zero, zero))
  np.testing.assert_allclose(logits, apply_small(variables, x), rtol=1e-5, atol=1e-6)


def test_pruning_zeroes_exactly_the_selected_channels():
  variables = _small_variables()
  masks = {"bn0": np.array([0.5, 0.1, 0.9], np.float32),
           "bn1": np.array([0.0, 0.2, 0.19, 1.0], np.float32)}
  pruned = anp_lib.select_pruned(masks, anp_lib.ANPConfig(threshold=0.2))
  assert {k: v.tolist() for k, v in pruned.items()} == {"bn0": [1], "bn1": [0, 2]}
  out = anp_lib.prune_neurons(variables, pruned)
  for layer, idx in (("bn0", [1]), ("bn1", [0, 2])):
    for name in ("scale", "bias"):
      old = np.asarray(variables["params"][layer][name])
      new = np.asarray(out["params"][layer][name])
      keep = np.setdiff1d(np.arange(old.size), idx)
      assert np.all(new[idx] == 0)
      np.testing.assert_array_equal(new[keep], old[keep])  # bit-identical
  for layer in ("conv0", "conv1", "head"):
    _assert_trees_equal(out["params"][layer], variables["params"][layer])
  _assert_trees_equal(out["batch_stats"], variables["batch_stats"])
  # γ only (the official code's pruning).
  gamma_only = anp_lib.prune_neurons(variables, pruned, zero_bias=False)
  _assert_trees_equal(gamma_only["params"]["bn1"]["bias"], variables["params"]["bn1"]["bias"])
  # Rankings over all layers: the 3 lowest masks; a fraction of 7 rounds down.
  by_number = anp_lib.select_pruned(masks, anp_lib.ANPConfig(prune_by="number", prune_number=3))
  assert {k: v.tolist() for k, v in by_number.items()} == {"bn0": [1], "bn1": [0, 2]}
  by_fraction = anp_lib.select_pruned(masks, anp_lib.ANPConfig(prune_by="fraction",
                                                               prune_fraction=0.3))
  assert {k: v.tolist() for k, v in by_fraction.items()} == {"bn0": [1], "bn1": [0]}


def test_anp_ranges_history_callback_and_pass_through():
  variables = _small_variables()
  x, y = _small_data(24)
  seen = []
  # A huge mask learning rate drives masks into the clip; perturbations start uniform in
  # [−ε, ε] and take one sign step of ε, so without the projection they would reach 2ε.
  config = anp_lib.ANPConfig(iterations=6, batch_size=8, log_every=3, eps=0.3,
                             learning_rate=20.0, threshold=0.5,
                             callback=lambda i, s, v: seen.append((i, v)))
  result = anp_lib.anp(apply_small, variables, x, y, config, key=jax.random.PRNGKey(0))
  assert [h["iteration"] for h in result.history] == [3, 6] == [i for i, _ in seen]
  values = np.concatenate([m for h in result.history for m in h["masks"].values()])
  assert values.min() >= 0.0 and values.max() <= 1.0
  assert np.any(values == 0.0) and np.any(values == 1.0)  # the clip was active both ways
  assert result.history[0]["loss_rob"] > result.history[0]["loss_nat"]
  for h in result.history:
    assert 0.29 < h["noise_abs_max"] <= 0.3 + 1e-6
    assert np.isfinite(h["loss_nat"]) and np.isfinite(h["loss_rob"]) and h["seconds"] >= 0
    assert sorted(h["masks"]) == ["bn0", "bn1"]
  # The result is the pruning the last masks select; the last callback got the same.
  last = result.history[-1]
  assert last["pruned"] == {k: np.flatnonzero(np.asarray(v) < 0.5).tolist()
                            for k, v in last["masks"].items()}
  expected = anp_lib.prune_neurons(variables, last["pruned"])
  _assert_trees_equal(result.variables, expected)
  _assert_trees_equal(seen[-1][1], expected)
  _assert_trees_equal(result.variables["batch_stats"], variables["batch_stats"])


def test_an_interrupted_anp_resumes_to_the_uninterrupted_result(tmp_path):
  variables = _small_variables()
  x, y = _small_data(24)
  config = anp_lib.ANPConfig(iterations=9, batch_size=8, log_every=3, eps=0.3,
                             learning_rate=2.0, threshold=0.5)
  run = lambda c, k=0: anp_lib.anp(apply_small, variables, x, y, c, key=jax.random.PRNGKey(k))
  whole = run(config)
  saved = config.replace(checkpoint_dir=str(tmp_path))
  interrupt(run, saved, 6)
  path = tmp_path / anp_lib.CHECKPOINT_FILE
  assert saved_step(path) == 6
  resumed_config, seen = recording(saved)
  resumed = run(resumed_config)
  assert not path.exists()
  _assert_trees_equal(resumed.variables, whole.variables)
  # The two saved entries are replayed (with their earlier seconds), then the third is new.
  assert [i for i, _, _ in seen] == [3, 6, 9]
  assert [("seconds_before" in s) for _, s, _ in seen] == [True, True, False]
  for h, w in zip(resumed.history, whole.history):
    assert h["iteration"] == w["iteration"] and h["pruned"] == w["pruned"]
    assert h["loss"] == w["loss"] and h["num_pruned"] == w["num_pruned"]
    for k in w["masks"]:
      np.testing.assert_array_equal(h["masks"][k], w["masks"][k])
  _assert_trees_equal(seen[1][2], anp_lib.prune_neurons(variables, whole.history[1]["pruned"]))
  # A checkpoint of another problem (another key) is not used.
  interrupt(run, saved, 6)
  other_config, seen = recording(saved)
  run(other_config, 1)
  assert [("seconds_before" in s) for _, s, _ in seen] == [False, False, False]


def test_one_anp_iteration_equals_hand_computation():
  variables = _small_variables(1)
  x, y = _small_data(8, seed=1)
  eps, alpha, lr = 0.4, 0.2, 0.2
  # threshold 0: nothing is pruned, so every parameter must come back bit-identical.
  config = anp_lib.ANPConfig(iterations=1, batch_size=8, log_every=1, eps=eps, alpha=alpha,
                             learning_rate=lr, momentum=0.9, threshold=0.0)
  key = jax.random.PRNGKey(3)
  result = anp_lib.anp(apply_small, variables, x, y, config, key=key)
  _assert_trees_equal(result.variables, variables)
  assert result.history[-1]["num_pruned"] == 0

  # By hand (the batch is the whole set, so its order does not matter): δ, ξ ~ U[−ε, ε]
  # from the step's key, one projected sign-ascent step of size ε, then one SGD step on the
  # masks (the first momentum step is plain SGD) and the clip to [0, 1].
  channels = {"bn0": 3, "bn1": 4}
  ks = jax.random.split(jax.random.fold_in(jax.random.split(key)[1], 0), 4)
  noise = {n: (jax.random.uniform(ks[2 * j], (c,), jnp.float32, -eps, eps),
               jax.random.uniform(ks[2 * j + 1], (c,), jnp.float32, -eps, eps))
           for j, (n, c) in enumerate(channels.items())}
  beta = {n: variables["params"][n]["bias"] for n in channels}

  def loss(masks, noise):
    modify = {n: (lambda a, n=n: (masks[n] + noise[n][0]) * (a - beta[n])
                  + (1 + noise[n][1]) * beta[n]) for n in channels}
    logits, _ = apply_with_layers(apply_small, variables, x, modify=modify)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def hand(noise):
    ones = {n: jnp.ones((c,)) for n, c in channels.items()}
    zeros = {n: (jnp.zeros((c,)), jnp.zeros((c,))) for n, c in channels.items()}
    g = jax.grad(loss, argnums=1)(ones, noise)
    noise = jax.tree_util.tree_map(lambda d, gd: jnp.clip(d + eps * jnp.sign(gd), -eps, eps),
                                   noise, g)
    gm = jax.grad(lambda m: alpha * loss(m, zeros) + (1 - alpha) * loss(m, noise))(ones)
    return {n: jnp.clip(1 - lr * gm[n], 0, 1) for n in channels}, noise

  masks, noise = hand(noise)
  for n in channels:
    np.testing.assert_allclose(result.history[0]["masks"][n], masks[n], rtol=1e-5, atol=1e-6)
  assert np.any(np.asarray(masks["bn0"]) < 1) or np.any(np.asarray(masks["bn1"]) < 1)
  np.testing.assert_allclose(result.history[0]["noise_abs_max"],
                             max(float(jnp.abs(a).max()) for a in jax.tree_util.tree_leaves(noise)),
                             rtol=1e-6)


def test_anp_scan_and_python_loops_agree():
  variables = _small_variables()
  x, y = _small_data(24)
  config = anp_lib.ANPConfig(iterations=6, batch_size=8, log_every=3, eps=0.3,
                             learning_rate=2.0, threshold=0.9)
  run = lambda loop: anp_lib.anp(apply_small, variables, x, y, config.replace(loop=loop),
                                 key=jax.random.PRNGKey(3))
  scan, python = run("scan"), run("python")
  for a, b in zip(scan.history, python.history):
    for k in ("loss", "loss_nat", "loss_rob", "noise_abs_max"):
      assert a[k] == pytest.approx(b[k], rel=1e-5), k
    for name in a["masks"]:
      np.testing.assert_allclose(a["masks"][name], b["masks"][name], rtol=1e-5, atol=1e-6)
    assert a["pruned"] == b["pruned"]
  # The masks moved, and the six iterations pruned something.
  assert min(min(m) for m in python.history[-1]["masks"].values()) < 0.99
  assert python.history[-1]["num_pruned"] > 0
  _assert_trees_equal(scan.variables, python.variables)


def test_anp_layers_and_errors():
  x, y = _small_data(24)
  variables = _small_variables()
  assert anp_lib.resolve_layers(apply_small, variables, x) == {"bn0": 3, "bn1": 4}
  assert anp_lib.resolve_layers(apply_small, variables, x, ["conv1"]) == {"conv1": 4}
  with pytest.raises(ValueError, match="not called"):
    anp_lib.resolve_layers(apply_small, variables, x, ["bn7"])

  dense = Dense(CLASSES)
  dense_vars = dense.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 3)).reshape(1, -1))
  dense_fn = lambda v, im: dense.apply(v, im.reshape(im.shape[0], -1))
  with pytest.raises(ValueError, match="no BatchNorm"):
    anp_lib.anp(dense_fn, dense_vars, x, y, anp_lib.ANPConfig(batch_size=8),
                key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    anp_lib.anp(apply_small, variables, x * 3, y, anp_lib.ANPConfig(batch_size=8),
                key=jax.random.PRNGKey(0))


@pytest.mark.parametrize("kwargs,match", [
    (dict(iterations=0), "iterations"), (dict(eps=-0.1), "eps"), (dict(alpha=1.5), "alpha"),
    (dict(momentum=1.0), "momentum"), (dict(learning_rate=-1.0), "learning_rate"),
    (dict(prune_by="magnitude"), "prune_by"), (dict(threshold=2.0), "threshold"),
    (dict(prune_number=-1), "prune_number"), (dict(prune_fraction=1.5), "prune_fraction"),
    (dict(layers="bn0"), "string"), (dict(layers=()), "layers"),
    (dict(layers=("bn0", "bn0")), "repeated"), (dict(anp_steps=0), "anp_steps"),
    (dict(log_every=0), "log_every"), (dict(callback=3), "callback"),
    (dict(checkpoint_dir=1), "checkpoint_dir"), (dict(loop="gpu"), "loop"),
    # Wrong types and infinities are refused, naming the field.
    (dict(alpha=None), r"^ANPConfig.alpha must be a finite number in \[0, 1\], got None$"),
    (dict(learning_rate="0.2"), r"^ANPConfig.learning_rate must be a finite number >= 0, "
                                r"got '0.2'$"),
    (dict(learning_rate=float("inf")), r"^ANPConfig.learning_rate .* got inf$"),
    (dict(momentum=True), r"^ANPConfig.momentum .* got True$"),
    (dict(threshold="0.2"), r"^ANPConfig.threshold .* got '0.2'$"),
    (dict(prune_fraction=None), r"^ANPConfig.prune_fraction .* got None$"),
    # "False" is truthy: a string used to prune like True.
    (dict(zero_bias="False"), r"^ANPConfig.zero_bias must be a bool, got 'False'$"),
    (dict(zero_bias=0), r"^ANPConfig.zero_bias must be a bool, got 0$"),
    (dict(checkpoint_dir=""), r"^ANPConfig.checkpoint_dir must be None or a non-empty path to a "
                              r"folder, got '' \(an empty path"),
])
def test_anp_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    anp_lib.ANPConfig(**kwargs)


def test_anp_config_layers_become_a_tuple():
  assert anp_lib.ANPConfig(layers=["bn0"]).layers == ("bn0",)
  assert anp_lib.ANPConfig(callback=print) == anp_lib.ANPConfig()
  # Numpy bools and numbers are accepted.
  anp_lib.ANPConfig(zero_bias=np.bool_(False), alpha=np.float32(0.5), threshold=np.int64(0))


def test_anp_keeps_a_frozen_dict_and_its_history_is_json():
  variables = _small_variables()
  x, y = _small_data(16)
  config = anp_lib.ANPConfig(iterations=1, batch_size=8, log_every=1, learning_rate=20.0,
                             threshold=0.5, loop="python")
  frozen = FrozenDict(variables)
  seen = []
  result = anp_lib.anp(apply_small, frozen, x, y,
                       config.replace(callback=lambda i, s, v: seen.append(v)),
                       key=jax.random.PRNGKey(0))
  assert result.history[-1]["num_pruned"] > 0
  assert type(result.variables) is FrozenDict and type(seen[-1]) is FrozenDict
  _assert_trees_equal(result.variables, anp_lib.prune_neurons(frozen,
                                                              result.history[-1]["pruned"]))
  assert jax.tree_util.tree_structure(result.variables) == jax.tree_util.tree_structure(frozen)
  assert type(anp_lib.prune_neurons(variables, result.history[-1]["pruned"])) is dict
  # Plain Python values: the history goes through JSON unchanged.
  assert json.loads(json.dumps(result.history)) == result.history
  assert all(isinstance(m, list) for h in result.history for m in h["masks"].values())


# A tiny backdoored model.  Honest caveat: at this scale ANP is weak and seed-dependent.
# The backdoor is spread over several of the 32 neurons (no single pruned neuron removes
# it), the paper's fixed threshold (0.2) prunes only a few neurons, and with this exact
# setup (200 training steps, 100 ANP iterations, lowest 25% of masks pruned) the ASR went
# 0.99 -> 0.25 / 0.38 / 0.99 for seeds 0 / 1 / 2 (random pruning of as many neurons: 0.83 /
# 0.87 / 0.99 on average).  The test uses seed 1 (deterministic on a given platform) and
# checks that ANP's mask ranking finds backdoor-carrying neurons: its pruning lowers the ASR
# far more than random pruning of the same size, at little cost in clean accuracy.

TARGET = 0


def _trigger(x):
  x = np.array(x, copy=True)
  x[:, -2:, -2:, :] = np.array([[[1, 0, 0], [0, 0, 1]], [[0, 0, 1], [1, 0, 0]]], np.float32)
  return x


def _task(n, seed, templates):
  rng = np.random.RandomState(seed)
  y = rng.randint(0, CLASSES, n)
  x = np.clip(0.25 * templates[y] + 0.75 * rng.rand(n, 8, 8, 3), 0, 1).astype(np.float32)
  return x, y.astype(np.int32)


BACKDOOR_NET = SmallNet(widths=(16, 16))


def apply_backdoor(variables, x):
  return BACKDOOR_NET.apply(variables, x)


@functools.lru_cache(maxsize=None)
def _backdoored(seed=SEED_BACKDOOR):
  """(variables, clean set, test set): 8x8 RGB images of 4 noisy templates, 10% of 2000
  training images poisoned with a 2x2 patch to class 0, 300 Adam steps (BatchNorm in train
  mode)."""
  templates = np.random.RandomState(seed).rand(CLASSES, 8, 8, 3).astype(np.float32)
  x, y = _task(2000, seed + 1, templates)
  x[:200], y[:200] = _trigger(x[:200]), TARGET
  v = BACKDOOR_NET.init(jax.random.PRNGKey(seed), x[:1])
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, stats, opt, xb, yb):
    def loss(p):
      logits, upd = BACKDOOR_NET.apply({"params": p, "batch_stats": stats}, xb, train=True,
                                       mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd

    (_, upd), g = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), upd["batch_stats"], opt

  params, stats, opt = v["params"], v["batch_stats"], tx.init(v["params"])
  rng = np.random.RandomState(2)
  for _ in range(TRAIN_STEPS):
    idx = rng.randint(0, 2000, 64)
    params, stats, opt = step(params, stats, opt, x[idx], y[idx])
  return ({"params": params, "batch_stats": stats}, _task(256, seed + 4, templates),
          _task(500, seed + 3, templates))


def _acc_asr(variables, test):
  x, y = test
  fn = jax.jit(apply_backdoor)
  acc = float(np.mean(np.argmax(fn(variables, x), 1) == y))
  asr = float(np.mean(np.argmax(fn(variables, _trigger(x[y != TARGET])), 1) == TARGET))
  return acc, asr


def test_anp_mask_ranking_prunes_the_backdoor_on_a_tiny_model():
  variables, (xc, yc), test = _backdoored()
  acc0, asr0 = _acc_asr(variables, test)
  assert acc0 > 0.9 and asr0 > 0.95  # the backdoor was learnt
  config = anp_lib.ANPConfig(iterations=ANP_ITERATIONS, batch_size=64, log_every=ANP_ITERATIONS,
                             prune_by="fraction", prune_fraction=0.25,
                             loop="scan")  # faster than Python steps for this tiny model
  result = anp_lib.anp(apply_backdoor, variables, xc, yc, config, key=jax.random.PRNGKey(5))
  acc, asr = _acc_asr(result.variables, test)
  assert result.history[-1]["num_pruned"] == 8
  rng = np.random.RandomState(0)
  neurons = [("bn0", c) for c in range(16)] + [("bn1", c) for c in range(16)]
  random_asr = []
  for _ in range(5):
    pick = rng.choice(32, 8, replace=False)
    pruned = {"bn0": [c for j, (l, c) in enumerate(neurons) if l == "bn0" and j in pick],
              "bn1": [c for j, (l, c) in enumerate(neurons) if l == "bn1" and j in pick]}
    random_asr.append(_acc_asr(anp_lib.prune_neurons(variables, pruned), test)[1])
  assert asr < asr0 - 0.3, (asr0, asr)
  assert asr < np.mean(random_asr) - 0.2, (asr, random_asr)
  assert acc > acc0 - 0.1, (acc0, acc)


# ----------------------------------------------------------------------------------------
# DP-SGD
# ----------------------------------------------------------------------------------------


def _per_example_grads(seed=0, b=6):
  rng = np.random.RandomState(seed)
  scales = np.array([0.01, 0.1, 0.5, 2.0, 5.0, 30.0])[:b].astype(np.float32)
  return {"a": rng.randn(b, 3, 2).astype(np.float32) * scales[:, None, None],
          "b": {"c": rng.randn(b, 4).astype(np.float32) * scales[:, None]}}


def _np_clip(grads, c):
  flat = np.concatenate([grads["a"].reshape(len(grads["a"]), -1), grads["b"]["c"]], axis=1)
  norms = np.linalg.norm(flat.astype(np.float64), axis=1)
  factor = np.minimum(1.0, c / norms)
  return ({"a": grads["a"] * factor[:, None, None], "b": {"c": grads["b"]["c"] * factor[:, None]}},
          norms)


def test_clipping_and_noise_free_privatization_equal_numpy():
  grads = _per_example_grads()
  c = 1.0
  clipped, norms = dp_lib.clip_per_example(grads, c)
  expected, np_norms = _np_clip(grads, c)
  np.testing.assert_allclose(norms, np_norms, rtol=1e-6)
  assert np.sum(np_norms > c) >= 3 and np.sum(np_norms < c) >= 2
  _, clipped_norms = dp_lib.clip_per_example(clipped, c)
  assert np.all(np.asarray(clipped_norms) <= c * (1 + 1e-6))
  np.testing.assert_allclose(clipped_norms[np_norms > c], c, rtol=1e-6)
  under = np_norms <= c
  np.testing.assert_array_equal(np.asarray(clipped["a"])[under], grads["a"][under])
  np.testing.assert_array_equal(np.asarray(clipped["b"]["c"])[under], grads["b"]["c"][under])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         clipped, expected)
  mean, norms2 = dp_lib.privatize_gradients(grads, c, 0.0, jax.random.PRNGKey(0))
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b.mean(axis=0), rtol=1e-5, atol=1e-7),
      mean, expected)
  np.testing.assert_array_equal(norms2, norms)
  # A single example: its privatized gradient is the clipped gradient itself (norm ≤ C).
  one = jax.tree_util.tree_map(lambda g: g[-1:], grads)
  g1, _ = dp_lib.privatize_gradients(one, c, 0.0, jax.random.PRNGKey(0))
  assert abs(float(jnp.sqrt(sum(jnp.sum(l ** 2) for l in jax.tree_util.tree_leaves(g1))))
             - c) < 1e-5


def test_privatization_noise_has_std_sigma_c_over_b():
  b, c, sigma = 4, 2.0, 3.0
  zeros = {"w": np.zeros((b, 100, 100), np.float32), "v": np.zeros((b, 5000), np.float32)}
  noisy, _ = dp_lib.privatize_gradients(zeros, c, sigma, jax.random.PRNGKey(7))
  for leaf in jax.tree_util.tree_leaves(noisy):
    leaf = np.asarray(leaf, np.float64).reshape(-1)
    assert abs(leaf.std() / (sigma * c / b) - 1) < 0.05  # 5000+ samples: ±~2% at 2σ
    assert abs(leaf.mean()) < 4 * sigma * c / b / np.sqrt(leaf.size)
  # On top of real gradients the noise is additive: same key → same noise.
  grads = _per_example_grads(b=b)
  g_noisy, _ = dp_lib.privatize_gradients(grads, c, sigma, jax.random.PRNGKey(7))
  g_clean, _ = dp_lib.privatize_gradients(grads, c, 0.0, jax.random.PRNGKey(7))
  diff = np.concatenate([np.asarray(a - b_).reshape(-1) for a, b_ in zip(
      jax.tree_util.tree_leaves(g_noisy), jax.tree_util.tree_leaves(g_clean))])
  assert diff.std() > 0.5 * sigma * c / b


def test_dp_sgd_equals_hand_computation_without_noise():
  variables = _small_variables()
  x, y = _small_data(8)
  c, lr, mu = 0.5, 0.1, 0.9
  config = dp_lib.DPConfig(epochs=2, batch_size=8, learning_rate=lr, momentum=mu,
                           clip_norm=c, noise_multiplier=0.0)
  result = dp_lib.dp_sgd(apply_small, variables, x, y, config, key=jax.random.PRNGKey(1))
  # By hand: per-example gradients one at a time, clipped with numpy, averaged; two steps of
  # SGD with momentum (one batch = the whole set, so the order does not matter).
  rest = {"batch_stats": variables["batch_stats"]}
  params = jax.tree_util.tree_map(np.asarray, variables["params"])
  velocity = jax.tree_util.tree_map(np.zeros_like, params)
  clipped_any = False
  grad_fn = jax.jit(jax.grad(lambda p, xi, yi: optax.softmax_cross_entropy_with_integer_labels(
      apply_small({"params": p, **rest}, xi), yi)[0]))
  for _ in range(2):
    grads = [grad_fn(params, x[i:i + 1], y[i:i + 1]) for i in range(8)]
    flat = [np.concatenate([np.asarray(l, np.float64).reshape(-1)
                            for l in jax.tree_util.tree_leaves(g)]) for g in grads]
    factors = [min(1.0, c / np.linalg.norm(f)) for f in flat]
    clipped_any |= min(factors) < 1
    mean = jax.tree_util.tree_map(
        lambda *gs: sum(f * np.asarray(g, np.float64) for f, g in zip(factors, gs)) / 8, *grads)
    velocity = jax.tree_util.tree_map(lambda v, g: mu * v + g, velocity, mean)
    params = jax.tree_util.tree_map(lambda p, v: (p - lr * v).astype(np.float32), params,
                                    velocity)
  assert clipped_any
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         result.variables["params"], params)
  _assert_trees_equal(result.variables["batch_stats"], variables["batch_stats"])
  assert [h["epoch"] for h in result.history] == [0, 1]
  assert 0 < result.history[0]["clipped_fraction"] <= 1


def test_dp_sgd_is_deterministic_for_a_key():
  variables = _small_variables()
  x, y = _small_data(16)
  seen = []
  config = dp_lib.DPConfig(epochs=2, batch_size=8, noise_multiplier=1.0,
                           callback=lambda e, s, v: seen.append(e))
  run = lambda k: dp_lib.dp_sgd(apply_small, variables, x, y, config, key=jax.random.PRNGKey(k))
  a, b, other = run(0), run(0), run(1)
  _assert_trees_equal(a.variables, b.variables)
  assert seen == [0, 1] * 3
  diff = jax.tree_util.tree_map(lambda p, q: float(np.abs(np.asarray(p) - np.asarray(q)).max()),
                                a.variables["params"], other.variables["params"])
  assert max(jax.tree_util.tree_leaves(diff)) > 1e-4
  _assert_trees_equal(a.variables["batch_stats"], variables["batch_stats"])


def test_a_dp_sgd_sweep_over_its_numbers_reuses_one_compiled_step():
  # σ, C, the learning rate and the momentum are arguments of the compiled step, not
  # constants in it; the data set's size is not part of it either.
  variables = _small_variables()
  x, y = _small_data(24)
  config = dp_lib.DPConfig(epochs=1, batch_size=8, loop="python")
  dp_lib.dp_sgd(apply_small, variables, x, y, config, key=jax.random.PRNGKey(0))
  before = dp_lib._step_jit._cache_size()
  results = [dp_lib.dp_sgd(apply_small, variables, x[:n], y[:n],
                           config.replace(noise_multiplier=s, clip_norm=c, learning_rate=lr,
                                          momentum=mu), key=jax.random.PRNGKey(0))
             for n, s, c, lr, mu in ((24, 0.5, 2.0, 0.01, 0.5), (16, 2.0, 0.1, 0.2, 0.99))]
  assert dp_lib._step_jit._cache_size() == before
  a, b = (r.variables["params"] for r in results)
  assert max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda p, q: float(np.abs(np.asarray(p) - np.asarray(q)).max()), a, b))) > 1e-4


def test_dp_sgd_scan_and_python_loops_agree():
  variables = _small_variables()
  x, y = _small_data(32)
  config = dp_lib.DPConfig(epochs=2, batch_size=8, noise_multiplier=1.0, clip_norm=0.5)
  run = lambda loop: dp_lib.dp_sgd(apply_small, variables, x, y, config.replace(loop=loop),
                                   key=jax.random.PRNGKey(2))
  scan, python = run("scan"), run("python")
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         scan.variables, python.variables)
  for a, b in zip(scan.history, python.history):
    for k in ("loss", "grad_norm", "clipped_fraction"):
      assert a[k] == pytest.approx(b[k], rel=1e-5), k
  # Four steps per epoch, each moving the parameters.
  assert max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda p, q: float(np.abs(np.asarray(p) - np.asarray(q)).max()),
      python.variables["params"], variables["params"]))) > 1e-3


@pytest.mark.parametrize("kwargs,match", [
    (dict(epochs=0), "epochs"), (dict(batch_size=2.5), "batch_size"), (dict(loop="gpu"), "loop"),
    (dict(clip_norm=0.0), "clip_norm"), (dict(clip_norm=float("inf")), "clip_norm"),
    (dict(noise_multiplier=-1.0), "noise_multiplier"), (dict(learning_rate=-0.1), "learning_rate"),
    (dict(momentum=1.0), "momentum"), (dict(callback="no"), "callback"),
])
def test_dp_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    dp_lib.DPConfig(**kwargs)


def test_dp_sgd_rejects_bad_input():
  x, y = _small_data(24)
  with pytest.raises(ValueError, match="batch"):
    dp_lib.dp_sgd(apply_small, _small_variables(), x[:4], y[:4], dp_lib.DPConfig(batch_size=8),
                  key=jax.random.PRNGKey(0))
  # DP-SGD trains on a training set; it does not unlearn.
  with pytest.raises(ValueError, match=r"^the training set has a single class \(1\); DP-SGD "
                                       r"training needs images of at least two classes$"):
    dp_lib.dp_sgd(apply_small, _small_variables(), x, np.ones_like(y),
                  dp_lib.DPConfig(batch_size=8), key=jax.random.PRNGKey(0))


def test_dp_sgd_keeps_a_frozen_dict():
  variables = _small_variables()
  x, y = _small_data(16)
  config = dp_lib.DPConfig(epochs=1, batch_size=8, loop="python")
  frozen = FrozenDict(variables)
  result = dp_lib.dp_sgd(apply_small, frozen, x, y, config, key=jax.random.PRNGKey(0))
  assert type(result.variables) is FrozenDict
  assert jax.tree_util.tree_structure(result.variables) == jax.tree_util.tree_structure(frozen)
  plain = dp_lib.dp_sgd(apply_small, variables, x, y, config, key=jax.random.PRNGKey(0))
  for a, b in zip(jax.tree_util.tree_leaves(result.variables),
                  jax.tree_util.tree_leaves(plain.variables), strict=True):
    np.testing.assert_array_equal(a, b)


def test_diverging_dp_sgd_and_anp_are_clear_errors():
  variables = _small_variables()
  x, y = _small_data(24)
  with pytest.raises(ValueError, match=r"^DP-SGD diverged: .* non-finite .* epoch 0; lower "
                                       r"DPConfig.learning_rate"):
    dp_lib.dp_sgd(apply_small, variables, x, y,
                  dp_lib.DPConfig(epochs=2, batch_size=8, learning_rate=1e12),
                  key=jax.random.PRNGKey(0))
  # Multiplicative perturbations of size 1e20 overflow the logits.
  with pytest.raises(ValueError, match=r"^ANP's mask optimisation diverged: .* iteration 1; "
                                       r"lower ANPConfig.eps"):
    anp_lib.anp(apply_small, variables, x, y,
                anp_lib.ANPConfig(iterations=2, batch_size=8, log_every=1, eps=1e20),
                key=jax.random.PRNGKey(0))
