"""DeepInspect on a tiny planted backdoor: detection, DMAD, model inversion and patching.

The problem: 8×8 RGB images of six colour classes (a class-specific mean colour plus uniform
noise) and a small CNN trained on data where 15 % of the images carry a white 2×2 patch in the
bottom-right corner relabelled to class 2.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict

from ibau_jax.defenses import deepinspect as di

from _interrupt import interrupt, recording, saved_step
from _layers import Conv, Dense

H = W = 8
CLASSES = 6
TARGET = 2
# The corners of the RGB cube at 0.25 / 0.75, without the two grey ones.
COLOURS = np.array([[.75, .25, .25], [.25, .75, .25], [.25, .25, .75], [.75, .75, .25],
                    [.75, .25, .75], [.25, .75, .75]], np.float32)


def _stamp(x):
  x = np.array(x)
  x[:, -2:, -2:, :] = 1.0
  return x


def _make(n, seed):
  rng = np.random.RandomState(seed)
  y = rng.randint(0, CLASSES, n).astype(np.int32)
  x = COLOURS[y][:, None, None, :] + rng.uniform(-0.2, 0.2, (n, H, W, 3))
  return np.clip(x, 0.0, 1.0).astype(np.float32), y


class Net(nn.Module):
  """Conv-Conv-Dense, with the input centring held in a non-params collection ("consts") so
  that pass-through of other collections is observable."""

  @nn.compact
  def __call__(self, x):
    centre = self.variable("consts", "centre", lambda: jnp.full((3,), 0.5, jnp.float32))
    x = x - centre.value
    x = nn.relu(Conv(16, (3, 3))(x))
    x = nn.relu(Conv(16, (3, 3), strides=2)(x))
    return Dense(CLASSES)(x.reshape((x.shape[0], -1)))


MODEL = Net()


def apply_fn(variables, x):
  return MODEL.apply(variables, x)


def _metrics(variables):
  """(clean accuracy, ASR of the real trigger on non-target images) on a held-out set."""
  x, y = _make(600, 5)
  acc = float(np.mean(np.argmax(apply_fn(variables, x), -1) == y))
  keep = y != TARGET
  asr = float(np.mean(np.argmax(apply_fn(variables, _stamp(x[keep])), -1) == TARGET))
  return acc, asr


@functools.lru_cache(maxsize=None)
def _model():
  x, y = _make(2000, 0)
  poison = np.random.RandomState(1).rand(2000) < 0.15
  x[poison] = _stamp(x[poison])
  y = np.where(poison, TARGET, y).astype(np.int32)
  variables = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, H, W, 3)))
  consts = {"centre": variables["consts"]["centre"] + 0.01}
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, state, xb, yb):
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        apply_fn({"params": p, "consts": consts}, xb), yb).mean()
    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = variables["params"]
  state = tx.init(params)
  for i in range(400):
    idx = np.random.RandomState(i).randint(0, 2000, 64)
    params, state = step(params, state, x[idx], y[idx])
  trained = {"params": params, "consts": consts}
  acc, asr = _metrics(trained)
  assert acc > 0.95 and asr > 0.95, (acc, asr)
  return trained


def _clean_set():
  return _make(300, 7)


CONFIG = di.DeepInspectConfig(batch_size=32, inversion_per_class=4, inversion_steps=150,
                              generator_hidden=64, generator_steps=300, statistic_samples=32,
                              patch_epochs=5)


@functools.lru_cache(maxsize=None)
def _run():
  seen = []
  config = CONFIG.replace(callback=lambda stage, stats, v: seen.append((stage, stats["name"],
                                                                       v)))
  x, y = _clean_set()
  result = di.deepinspect(apply_fn, _model(), x, y, config,
                          key=jax.random.PRNGKey(0))
  return result, seen


# ----------------------------------------------------------------------------------------
# Detection and patching on the planted backdoor
# ----------------------------------------------------------------------------------------


def test_flags_the_planted_target_class():
  result, seen = _run()
  names = [h["name"] for h in result.history]
  assert names == ["inversion", "trigger_generation", "detection", "patching"]
  assert [h["stage"] for h in result.history] == [0, 1, 2, 3]
  assert all(h["seconds"] >= 0 for h in result.history)
  assert [(s, n) for s, n, _ in seen] == list(enumerate(names))
  stat = np.asarray(result.history[1]["statistic"])
  assert stat.shape == (CLASSES,) and int(np.argmin(stat)) == TARGET
  # The target needs far less perturbation than any other class, and the generated triggers
  # really do send the substitute images to their class.
  assert stat[TARGET] < 0.5 * np.min(np.delete(stat, TARGET))
  assert np.all(np.asarray(result.history[1]["success"]) > 0.7)
  detection = result.history[2]
  assert detection["flagged"] == [TARGET]
  assert detection["scores"][TARGET] > CONFIG.threshold
  assert np.all(np.delete(detection["scores"], TARGET) < CONFIG.threshold)
  assert result.history[3]["patched"] and result.history[3]["flagged"] == [TARGET]


def test_patching_removes_the_real_trigger_and_keeps_clean_accuracy():
  model = _model()
  result, seen = _run()
  acc_before, asr_before = _metrics(model)
  acc_after, asr_after = _metrics(result.variables)
  assert asr_before > 0.95
  assert asr_after < 0.2, asr_after
  assert acc_after > 0.9, (acc_before, acc_after)
  # Only params changed; the other collection passes through untouched.
  assert set(result.variables) == {"params", "consts"}
  jax.tree_util.tree_map(np.testing.assert_array_equal, result.variables["consts"],
                         model["consts"])
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                 result.variables["params"], model["params"])
  assert max(jax.tree_util.tree_leaves(moved)) > 0
  # The callback of the last stage sees the patched variables, earlier ones the original.
  jax.tree_util.tree_map(np.testing.assert_array_equal, seen[-1][2]["params"],
                         result.variables["params"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, seen[0][2]["params"], model["params"])


def test_nothing_flagged_returns_the_variables_unchanged():
  model = _model()
  x, y = _clean_set()
  result = di.deepinspect(apply_fn, model, x, y, CONFIG.replace(threshold=1e9),
                          key=jax.random.PRNGKey(0))
  assert result.history[2]["flagged"] == []
  assert result.history[3]["patched"] is False and result.history[3]["losses"] == []
  assert result.variables is model
  # Same key, same statistics as the flagged run: only the decision changed.
  np.testing.assert_allclose(result.history[1]["statistic"], _run()[0].history[1]["statistic"],
                             rtol=1e-5)


# ----------------------------------------------------------------------------------------
# The pieces
# ----------------------------------------------------------------------------------------


def test_double_mad_against_hand_computation():
  v = [1.0, 1.2, 0.2, 0.9, 1.1, 1.3, 1.05]
  # median 1.05; left deviations (v ≤ 1.05): 0.05, 0.85, 0.15, 0 -> MAD_L = 0.1;
  # right deviations (v ≥ 1.05): 0.15, 0.05, 0.25, 0 -> MAD_R = 0.1.
  out = di.double_mad_anomaly(v, threshold=2.0)
  assert out["median"] == pytest.approx(1.05)
  assert out["mad_left"] == pytest.approx(0.1) and out["mad_right"] == pytest.approx(0.1)
  s = 1.4826 * 0.1
  expected = [0.05 / s, -0.15 / s, 0.85 / s, 0.15 / s, -0.05 / s, -0.25 / s, 0.0]
  np.testing.assert_allclose(out["scores"], expected, rtol=1e-9, atol=1e-12)
  assert out["flagged"] == [2]  # 0.2 < 1.05 − 2·1.4826·0.1 ≈ 0.753
  assert di.double_mad_anomaly(v, threshold=6.0)["flagged"] == []  # 0.85/s ≈ 5.73
  # A large value is an outlier on the wrong side: never flagged.
  assert di.double_mad_anomaly([1.0, 1.1, 0.95, 1.05, 50.0])["flagged"] == []
  # The left MAD alone decides: a wide right tail does not hide a low outlier.
  assert di.double_mad_anomaly([1.0, 1.01, 0.99, 1.0, 0.5, 3.0, 9.0, 20.0])["flagged"] == [4]
  # Zero MAD: any value below the median is infinitely anomalous, ties are not.
  out = di.double_mad_anomaly([1.0, 1.0, 1.0, 0.5])
  assert out["flagged"] == [3] and np.isinf(out["scores"][3])
  np.testing.assert_array_equal(out["scores"][:3], 0.0)
  with pytest.raises(ValueError, match="finite"):
    di.double_mad_anomaly([1.0, np.nan])


def test_model_inversion_raises_the_class_probability_and_stays_in_the_box():
  model = _model()
  key = jax.random.PRNGKey(4)
  images, stats = di.model_inversion(apply_fn, model, (H, W, 3), CLASSES, CONFIG, key=key)
  start, _ = di.model_inversion(apply_fn, model, (H, W, 3), CLASSES,
                                CONFIG.replace(inversion_lr=0.0, inversion_steps=1), key=key)
  k = CONFIG.inversion_per_class
  assert images.shape == start.shape == (CLASSES, k, H, W, 3)
  assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
  own = lambda imgs: np.array([np.asarray(jax.nn.softmax(apply_fn(model, imgs[c])))[:, c].mean()
                               for c in range(CLASSES)])
  before, after = own(start), own(images)
  np.testing.assert_allclose(after, stats["prob"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(before, stats["initial_prob"], rtol=1e-4, atol=1e-5)
  assert np.all(after >= before)
  assert np.all(after > 0.9), after
  # Near-grey starting images are not already the five non-target classes.
  assert np.all(np.delete(before, TARGET) < 0.5), before


class _Linear(nn.Module):
  @nn.compact
  def __call__(self, x):
    return Dense(CLASSES)(x.reshape((x.shape[0], -1)))


def _linear_apply(variables, x):
  return _Linear().apply(variables, x)


def test_scan_and_python_loops_agree():
  model = _Linear().init(jax.random.PRNGKey(1), jnp.zeros((1, H, W, 3)))
  config = CONFIG.replace(inversion_steps=4, generator_steps=4)
  key = jax.random.PRNGKey(9)
  run = lambda fn, *args, loop: fn(_linear_apply, model, *args, config.replace(loop=loop),
                                   key=key)
  a, _ = run(di.model_inversion, (H, W, 3), CLASSES, loop="scan")
  b, _ = run(di.model_inversion, (H, W, 3), CLASSES, loop="python")
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(a - run(di.model_inversion, (H, W, 3), CLASSES,
                                       loop="python")[0]))) == 0.0
  sub = a.reshape((-1, H, W, 3))
  ga, sa = run(di.train_trigger_generator, sub, CLASSES, loop="scan")
  gb, sb = run(di.train_trigger_generator, sub, CLASSES, loop="python")
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
                         ga, gb)
  np.testing.assert_allclose(sa["statistic"], sb["statistic"], rtol=1e-4, atol=1e-7)
  assert sa["initial_loss"] == pytest.approx(sb["initial_loss"], rel=1e-5)
  assert sa["final_loss"] == pytest.approx(sb["final_loss"], rel=1e-4)


def test_an_interrupted_run_resumes_after_its_saved_stages(tmp_path):
  x, y = _clean_set()
  # A tiny threshold flags about half of the classes, so that patching runs too.
  config = CONFIG.replace(inversion_steps=5, generator_steps=5, patch_epochs=1,
                          threshold=1e-6)
  key = jax.random.PRNGKey(3)
  whole = di.deepinspect(apply_fn, _model(), x, y, config, key=key)
  assert whole.history[3]["patched"]

  run = lambda c: di.deepinspect(apply_fn, _model(), x, y, c, key=key)
  path = tmp_path / di.CHECKPOINT_FILE
  saved = config.replace(checkpoint_dir=str(tmp_path))
  for stop_at, step in ((0, 1), (2, 2)):
    interrupt(run, saved, stop_at)
    assert saved_step(path) == step
    resumed_config, seen = recording(saved)
    resumed = run(resumed_config)
    assert not path.exists()
    assert [i for i, _, _ in seen] == [0, 1, 2, 3]
    assert [("seconds_before" in s) for _, s, _ in seen] == [i < step for i in range(4)]
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.variables, whole.variables)
    np.testing.assert_array_equal(resumed.history[1]["statistic"], whole.history[1]["statistic"])
    assert resumed.history[2]["flagged"] == whole.history[2]["flagged"]
    assert resumed.history[3]["losses"] == whole.history[3]["losses"]


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("change,match", [
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=True), "batch_size"),
    (dict(inversion_per_class=0), "inversion_per_class"),
    (dict(inversion_steps=2.5), "inversion_steps"),
    (dict(generator_steps=-1), "generator_steps"),
    (dict(noise_dim=0), "noise_dim"),
    (dict(inversion_lr=-0.1), "inversion_lr"),
    (dict(tv_weight=float("nan")), "tv_weight"),
    (dict(magnitude_weight=-1.0), "magnitude_weight"),
    (dict(perturbation_scale=0.0), "perturbation_scale"),
    (dict(threshold=0.0), "threshold"),
    (dict(threshold=float("inf")), "threshold"),
    (dict(patch_fraction=0.0), "patch_fraction"),
    (dict(patch_fraction=1.5), "patch_fraction"),
    (dict(patch_momentum=1.0), "patch_momentum"),
    (dict(patch_lr=-1.0), "patch_lr"),
    (dict(patch_momentum="0.9"), "patch_momentum"),
    (dict(use_clean_set_for_patching="yes"), "use_clean_set_for_patching"),
    (dict(use_clean_set_for_generation=1), "use_clean_set_for_generation"),
    (dict(loop="gpu"), "loop"),
    (dict(callback=3), "callback"),
    (dict(checkpoint_dir=[]), "checkpoint_dir"),
    (dict(checkpoint_dir=""), r"^DeepInspectConfig.checkpoint_dir must be None or a non-empty "
                              r"path to a folder, got '' \(an empty path"),
])
def test_config_validation(change, match):
  with pytest.raises(ValueError, match=match):
    di.DeepInspectConfig(**change)


def test_config_takes_numpy_bools():
  config = di.DeepInspectConfig(use_clean_set_for_patching=np.bool_(False))
  assert not config.use_clean_set_for_patching


def test_a_frozen_dict_comes_back_a_frozen_dict_and_the_history_is_json():
  model = FrozenDict(_Linear().init(jax.random.PRNGKey(1), jnp.zeros((1, H, W, 3))))
  x, y = _make(64, 3)
  # A tiny threshold flags classes, so that patching runs and returns new variables.
  config = CONFIG.replace(inversion_steps=4, generator_steps=4, patch_epochs=1, threshold=1e-6)
  seen = []
  result = di.deepinspect(_linear_apply, model, x, y,
                          config.replace(callback=lambda s, stats, v: seen.append(v)),
                          key=jax.random.PRNGKey(0))
  assert result.history[3]["patched"]
  assert type(result.variables) is FrozenDict and {type(v) for v in seen} == {FrozenDict}
  assert jax.tree_util.tree_structure(result.variables) == jax.tree_util.tree_structure(model)
  # Plain Python values (no arrays): the history goes through JSON unchanged.
  assert json.loads(json.dumps(result.history)) == result.history


def test_config_is_frozen_and_callback_does_not_count_for_equality():
  config = di.DeepInspectConfig()
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.threshold = 3.0  # type: ignore[misc]
  assert config.replace(callback=print) == config
  assert hash(config.replace(callback=print)) == hash(config)


@pytest.mark.parametrize("change,match", [
    (dict(images=np.full((40, H, W, 3), 2.0, np.float32)), r"\[0, 1\]"),
    (dict(labels=np.zeros(40, np.int32)), "single class"),
    (dict(images=np.zeros((8, H, W, 3), np.float32), labels=np.arange(8) % 3), "batch"),
])
def test_rejects_bad_input(change, match):
  x, y = _make(40, 3)
  kwargs = {"images": x, "labels": y, **change}
  variables = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, H, W, 3)))
  with pytest.raises(ValueError, match=match):
    di.deepinspect(apply_fn, variables, kwargs["images"], kwargs["labels"], CONFIG,
                   key=jax.random.PRNGKey(0))


def test_a_diverging_patching_is_a_clear_error():
  x, y = _clean_set()
  config = CONFIG.replace(inversion_steps=3, generator_steps=3, patch_epochs=2, threshold=1e-6,
                          patch_lr=1e30)
  with pytest.raises(ValueError, match=r"^DeepInspect's patching diverged: .* epoch 0; lower "
                                       r"DeepInspectConfig.patch_lr"):
    di.deepinspect(apply_fn, _model(), x, y, config, key=jax.random.PRNGKey(3))


@pytest.mark.parametrize("stage", ["model inversion", "trigger generation"])
def test_a_non_finite_stage_is_a_clear_error(stage):
  x, y = _clean_set()
  config = CONFIG.replace(inversion_steps=3, generator_steps=3)
  run_fn = apply_fn
  if stage == "model inversion":  # a broken model: every output NaN (its variables finite)
    run_fn = lambda v, im: apply_fn(v, im) * jnp.nan
  else:  # perturbations so large that the triggered images overflow
    config = config.replace(perturbation_scale=1e38)
  seen = []
  config = config.replace(callback=lambda s, stats, v: seen.append(stats["name"]))
  with pytest.raises(ValueError, match=rf"^DeepInspect's {stage} diverged: .*non-finite"):
    di.deepinspect(run_fn, _model(), x, y, config, key=jax.random.PRNGKey(3))
  # The stages before the failing one finished; the failing one reported nothing.
  assert seen == ([] if stage == "model inversion" else ["inversion"])
