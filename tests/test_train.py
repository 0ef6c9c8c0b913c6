"""Tests of ibau_jax.train on a tiny 2-layer model (8×8×3 images, ≤ 64 examples)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax import train
from _layers import Conv, Dense, Dropout


class TinyNet(nn.Module):
  """Conv → BatchNorm → ReLU → Dropout → Dense."""

  num_classes: int = 2

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x)
    x = Dropout(0.25, deterministic=not train)(x)
    x = x.mean(axis=(1, 2))
    return Dense(self.num_classes)(x)


def make_data(n: int = 64, seed: int = 0):
  """Separable problem: class 1 images are brighter in channel 0."""
  rng = np.random.default_rng(seed)
  labels = (np.arange(n) % 2).astype(np.int32)
  images = rng.uniform(0.0, 0.5, size=(n, 8, 8, 3)).astype(np.float32)
  images[labels == 1, :, :, 0] += 0.5
  return images, labels


def base_config(**kw) -> train.TrainConfig:
  d = dict(epochs=2, batch_size=16, optimizer="sgd", learning_rate=0.1, momentum=0.9,
           weight_decay=0.0, augment=True, crop_padding=1)
  d.update(kw)
  return train.TrainConfig(**d)


def tree_allclose(a, b, **kw) -> bool:
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  return ta == tb and all(np.allclose(x, y, **kw) for x, y in zip(la, lb))


# ----------------------------------------------------------------------------- augment

def test_augment_keeps_shape_dtype_range_and_is_deterministic():
  x, _ = make_data(16)
  key = jax.random.PRNGKey(1)
  a = train.augment(jnp.asarray(x), key, crop_padding=2)
  assert a.shape == x.shape and a.dtype == x.dtype
  assert float(a.min()) >= 0.0 and float(a.max()) <= float(x.max())
  np.testing.assert_array_equal(a, train.augment(jnp.asarray(x), key, crop_padding=2))
  b = jax.jit(lambda im, k: train.augment(im, k, crop_padding=2, pad_mode="reflect"))(x, key)
  assert b.shape == x.shape and float(b.min()) >= float(x.min())
  assert float(b.max()) <= float(x.max())
  assert not np.array_equal(a, train.augment(jnp.asarray(x), jax.random.PRNGKey(2),
                                             crop_padding=2))


def test_augment_identity_and_flip_mirrors():
  x, _ = make_data(64)
  key = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(train.augment(x, key, crop_padding=0, flip=False), x)
  f = np.asarray(train.augment(x, key, crop_padding=0, flip=True))
  mirrored = np.all(f == x[:, :, ::-1, :], axis=(1, 2, 3))
  same = np.all(f == x, axis=(1, 2, 3))
  assert np.all(mirrored | same)
  assert mirrored.any() and same.any()


def test_augment_crop_is_a_shift():
  x = np.arange(2 * 8 * 8 * 1, dtype=np.float32).reshape(2, 8, 8, 1) + 1.0
  out = np.asarray(train.augment(x, jax.random.PRNGKey(0), crop_padding=2, flip=False))
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i in range(2):
    assert any(np.array_equal(out[i], padded[i, u:u + 8, v:v + 8])
               for u in range(5) for v in range(5))


def test_augment_bad_arguments():
  x = jnp.zeros((2, 4, 4, 3))
  with pytest.raises(ValueError, match="shape"):
    train.augment(jnp.zeros((4, 4, 3)), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="crop_padding"):
    train.augment(x, jax.random.PRNGKey(0), crop_padding=-1)
  with pytest.raises(ValueError, match="reflect"):
    train.augment(x, jax.random.PRNGKey(0), crop_padding=4, pad_mode="reflect")


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("kw", [
    dict(epochs=0), dict(batch_size=0), dict(optimizer="rmsprop"), dict(learning_rate=0.0),
    dict(learning_rate=float("nan")), dict(momentum=1.0), dict(schedule="exponential"),
    dict(epochs=2, warmup_epochs=2), dict(warmup_epochs=-0.5), dict(label_smoothing=1.0),
    dict(epochs=4, schedule="piecewise", boundaries=(1, 3), warmup_epochs=1.0),
    dict(schedule="piecewise"), dict(schedule="piecewise", boundaries=(3, 2)),
    dict(boundaries=(1,)), dict(decay_factor=0.0), dict(weight_decay=-1.0),
    dict(crop_padding=-1), dict(eval_every=0), dict(log_every=0), dict(epochs=1.5),
    dict(optimizer="adam", nesterov=True), dict(augment="yes"),
])
def test_bad_config_raises(kw):
  with pytest.raises(ValueError, match="TrainConfig"):
    train.TrainConfig(**kw)


def test_config_dict_round_trip_and_schedules():
  c = train.TrainConfig(schedule="piecewise", boundaries=(1, 3))
  assert train.TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
  tx = train.make_optimizer(c, 4)
  assert tx is train.make_optimizer(c, 4)
  train.make_optimizer(train.TrainConfig(schedule="cosine", optimizer="adam"), 4)
  with pytest.raises(ValueError, match="unknown"):
    train.TrainConfig.from_dict({"nope": 1})


def _lr_at(config, steps_per_epoch, steps):
  """The learning rate the optimizer applies at each step (SGD without momentum on a
  parameter with gradient 1 and no weight decay: the update is -η(t))."""
  config = config.replace(momentum=0.0, weight_decay=0.0)
  tx = train.make_optimizer(config, steps_per_epoch)
  params = jnp.zeros(())
  state = tx.init(params)
  out = []
  for _ in range(steps):
    updates, state = tx.update(jnp.ones(()), state, params)
    out.append(-float(updates))
  return np.array(out)


def test_warmup_then_linear_cosine_and_piecewise_schedules():
  # 3 epochs of 4 steps, 1 warm-up epoch (W = 4 steps): η(t) = η₀ t / W, then the schedule
  # over the remaining T - W = 8 steps.
  base = train.TrainConfig(epochs=3, learning_rate=0.4, warmup_epochs=1.0)
  t = np.arange(12.0)
  warm = 0.4 * t[:4] / 4
  np.testing.assert_allclose(_lr_at(base.replace(schedule="linear"), 4, 12),
                             np.r_[warm, 0.4 * (1 - (t[4:] - 4) / 8)], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(_lr_at(base.replace(schedule="cosine"), 4, 12),
                             np.r_[warm, 0.2 * (1 + np.cos(np.pi * (t[4:] - 4) / 8))],
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(
      _lr_at(base.replace(schedule="piecewise", boundaries=(2,), decay_factor=0.5), 4, 12),
      np.r_[warm, [0.4] * 4, [0.2] * 4], rtol=1e-6)
  # No warm-up: the linear schedule starts at η₀ and reaches 0 at the end.
  np.testing.assert_allclose(
      _lr_at(train.TrainConfig(epochs=2, learning_rate=0.4, schedule="linear"), 4, 8),
      0.4 * (1 - np.arange(8) / 8), rtol=1e-6, atol=1e-7)


def test_label_smoothing_loss_by_hand():
  logits = jnp.array([[2.0, -1.0, 0.5], [0.0, 1.0, 3.0]])
  labels = jnp.array([0, 1])
  log_p = np.asarray(jax.nn.log_softmax(logits))
  eps = 0.3
  target = (1 - eps) * np.eye(3)[[0, 1]] + eps / 3
  np.testing.assert_allclose(train._cross_entropy(logits, labels, eps),
                             -(target * log_p).sum(-1).mean(), rtol=1e-6)
  np.testing.assert_allclose(train._cross_entropy(logits, labels),
                             -log_p[[0, 1], [0, 1]].mean(), rtol=1e-6)


# ----------------------------------------------------------------------------- steps

def test_loss_decreases_batchnorm_updates_and_eval_is_deterministic():
  x, y = make_data(32)
  config = base_config(augment=False, momentum=0.0, learning_rate=0.5)
  state = train.create_train_state(TinyNet(), config, (8, 8, 3), key=jax.random.PRNGKey(0))
  initial_stats = state.batch_stats
  key = jax.random.PRNGKey(1)
  before = float(train.eval_step(state, x, y)["loss"])
  losses = []
  for _ in range(30):
    state, m = train.train_step(state, x, y, key)
    losses.append(float(m["loss"]))
  assert int(state.step) == 30
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
  assert float(train.eval_step(state, x, y)["loss"]) < before
  assert not tree_allclose(initial_stats, state.batch_stats)
  # Inference mode: deterministic (dropout off) and BatchNorm statistics untouched.
  e1 = state.apply_fn(state.variables, x, train=False)
  e2 = state.apply_fn(state.variables, x, train=False)
  np.testing.assert_array_equal(e1, e2)
  # Training mode: dropout is on (different rngs → different outputs).
  t1, _ = state.apply_fn(state.variables, x, train=True, mutable=["batch_stats"],
                         rngs={"dropout": jax.random.PRNGKey(0)})
  t2, _ = state.apply_fn(state.variables, x, train=True, mutable=["batch_stats"],
                         rngs={"dropout": jax.random.PRNGKey(1)})
  assert not np.allclose(t1, t2)


def test_no_recompilation_across_steps_and_fit_calls():
  x, y = make_data(32)
  config = base_config(epochs=2, batch_size=8)
  size0 = train.train_step._cache_size()
  train.fit(TinyNet(), x, y, config, key=jax.random.PRNGKey(0))  # 8 steps
  size1 = train.train_step._cache_size()
  assert size1 - size0 <= 1
  train.fit(TinyNet(), x, y, config, key=jax.random.PRNGKey(1))  # same model/config/shapes
  assert train.train_step._cache_size() == size1


# ----------------------------------------------------------------------------- fit

def test_fit_history_callback_and_eval_fn():
  x, y = make_data(40)
  calls = []
  evals = []
  config = base_config(epochs=3, batch_size=16, eval_every=2, log_every=2)

  def eval_fn(variables):
    evals.append(1)
    return {"val_accuracy": 0.5}

  variables, history = train.fit(TinyNet(), x, y, config, key=jax.random.PRNGKey(0),
                                 eval_fn=eval_fn, callback=lambda e, m: calls.append((e, m)))
  assert set(variables) == {"params", "batch_stats"}
  assert [h["epoch"] for h in history] == [1, 2, 3]
  assert [e for e, _ in calls] == [2, 3]  # every 2 epochs and the last
  assert len(evals) == 2 and "val_accuracy" in history[1] and "val_accuracy" not in history[0]
  assert all(np.isfinite(h["loss"]) for h in history)


def test_augment_mask_selects_the_augmented_images():
  # All True = no mask; all False = augment off; a mixed mask is neither (crop + flip on).
  x, y = make_data(32)
  config = base_config(epochs=1, batch_size=16, flip=True, crop_padding=2)
  key = jax.random.PRNGKey(3)
  plain, _ = train.fit(TinyNet(), x, y, config, key=key)
  all_on, _ = train.fit(TinyNet(), x, y, config, key=key, augment_mask=np.ones(32, bool))
  all_off, _ = train.fit(TinyNet(), x, y, config, key=key, augment_mask=np.zeros(32, bool))
  off, _ = train.fit(TinyNet(), x, y, config.replace(augment=False), key=key)
  mixed, _ = train.fit(TinyNet(), x, y, config, key=key,
                       augment_mask=np.arange(32) % 2 == 0)
  assert tree_allclose(plain, all_on, rtol=0, atol=0)
  assert tree_allclose(all_off, off, rtol=1e-6, atol=1e-7)
  assert not tree_allclose(plain, off, atol=1e-4)
  assert not tree_allclose(mixed, plain, atol=1e-4)
  assert not tree_allclose(mixed, off, atol=1e-4)
  for bad in (np.ones(31, bool), np.ones(32, np.int32)):
    with pytest.raises(ValueError, match="augment_mask"):
      train.fit(TinyNet(), x, y, config, key=key, augment_mask=bad)


def test_fit_bad_arguments():
  x, y = make_data(16)
  with pytest.raises(ValueError, match="exceeds"):
    train.fit(TinyNet(), x, y, base_config(batch_size=32))
  with pytest.raises(ValueError, match="labels"):
    train.fit(TinyNet(), x, y[:-1], base_config())
  with pytest.raises(ValueError, match="config"):
    train.fit(TinyNet(), x, y, {"epochs": 1})
  with pytest.raises(ValueError, match="key must be a PRNG key"):
    train.fit(TinyNet(), x, y, base_config(), key=0)


def _nan_at_0(x):
  x = x.copy()
  x[0, 0, 0, 0] = np.nan
  return x


@pytest.mark.parametrize("images_fn, labels_fn, match", [
    (lambda x: (x * 255).astype(np.uint8), None, "floating point.*uint8"),
    (lambda x: x * 255.0, None, r"images must lie in \[0, 1\].*divide by 255"),
    (lambda x: x - 0.25, None, r"images must lie in \[0, 1\]"),
    (_nan_at_0, None, "NaN or infinite"),
    (lambda x: x.transpose(0, 3, 1, 2), None, r"NCHW.*\(16, 3, 8, 8\).*transpose"),
    (lambda x: x[0], None, "rank 4"),
    (None, lambda y: y + 1, r"labels must lie in \[0, 2\) for a model with 2 outputs; "
                            r"got values in \[1, 2\]"),
    (None, lambda y: y - 1, r"labels must lie in \[0, 2\).*\[-1, 0\]"),
])
def test_fit_rejects_bad_images_and_labels_before_training(images_fn, labels_fn, match,
                                                           monkeypatch):
  def no_training(*args, **kw):
    raise AssertionError("fit reached a training step")

  monkeypatch.setattr(train, "train_step", no_training)
  x, y = make_data(16)
  x = images_fn(x) if images_fn else x
  y = labels_fn(y) if labels_fn else y
  with pytest.raises(ValueError, match=match):
    train.fit(TinyNet(), x, y, base_config(epochs=1, batch_size=8))


class _NeedsEightByEight(nn.Module):
  """A model whose init fails (a reshape) on images that are not 8x8x3."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    return Dense(2)(x.reshape((x.shape[0], 8 * 8 * 3)))


def test_fit_reports_a_model_whose_init_fails_on_the_image_shape():
  x, y = make_data(16)
  x = x[:, :4, :4, :]
  with pytest.raises(ValueError, match=r"model.init failed on images of shape \(1, 4, 4, 3\)"
                                       r".*TypeError"):
    train.fit(_NeedsEightByEight(), x, y, base_config(epochs=1, batch_size=8))


def test_checkpoint_round_trip(tmp_path):
  config = base_config()
  state = train.create_train_state(TinyNet(), config, (8, 8, 3), key=jax.random.PRNGKey(0))
  path = tmp_path / "sub" / "model.msgpack"
  train.save_checkpoint(path, state.variables, config)
  assert (path.parent / "config.json").is_file()
  assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
  loaded, loaded_config = train.load_checkpoint(path)
  assert loaded_config == config
  assert tree_allclose(loaded, jax.device_get(state.variables), rtol=0, atol=0)
  with pytest.raises(ValueError, match="no checkpoint"):
    train.load_checkpoint(tmp_path / "missing.msgpack")


def test_resume_equals_uninterrupted_run_and_config_mismatch(tmp_path):
  x, y = make_data(32)
  key = jax.random.PRNGKey(7)
  config3 = base_config(epochs=3, batch_size=16)
  full, _ = train.fit(TinyNet(), x, y, config3, key=key)

  ckpt = tmp_path / "run"
  train.fit(TinyNet(), x, y, config3.replace(epochs=2), key=key, checkpoint_dir=ckpt)
  assert train.latest_checkpoint(ckpt)[0] == 2
  resumed, history = train.fit(TinyNet(), x, y, config3, key=key, checkpoint_dir=ckpt)
  assert [h["epoch"] for h in history] == [3]
  assert train.latest_checkpoint(ckpt)[0] == 3
  assert len(list(ckpt.glob("epoch_*.msgpack"))) == 1
  assert tree_allclose(resumed, full, rtol=1e-6, atol=1e-7)

  with pytest.raises(ValueError, match=str(ckpt)):
    train.fit(TinyNet(), x, y, config3.replace(learning_rate=0.2), key=key,
              checkpoint_dir=ckpt)


# ----------------------------------------------------------------------------- devices

_CHILD = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    sys.path.insert(0, {tests_dir!r})
    import test_train as t
    from ibau_jax import train
    assert jax.device_count() == 4, jax.devices()
    n0 = train.train_step._cache_size()
    with np.testing.assert_raises(ValueError):
      train.fit(t.TinyNet(), *t.make_data(16), t.base_config(batch_size=6))
    variables, _ = train.fit(t.TinyNet(), *t.make_data(32), t.base_config(),
                             key=jax.random.PRNGKey(3))
    assert train.train_step._cache_size() - n0 == 1, train.train_step._cache_size()
    flat = {{jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(variables)}}
    np.savez({out!r}, **flat)
""")


def test_four_devices_match_one_device(tmp_path):
  out = tmp_path / "four.npz"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  code = _CHILD.format(tests_dir=str(pathlib.Path(__file__).parent), out=str(out))
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  variables, _ = train.fit(TinyNet(), *make_data(32), base_config(),
                           key=jax.random.PRNGKey(3))
  four = np.load(out)
  leaves = jax.tree_util.tree_leaves_with_path(variables)
  assert len(leaves) == len(four.files)
  for p, v in leaves:
    np.testing.assert_allclose(four[jax.tree_util.keystr(p)], v, rtol=1e-5, atol=1e-6)


def test_a_resumed_training_removes_the_temporaries_of_a_killed_write(tmp_path):
  from ibau_jax import files
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  stale = [ckpt / ".config.json.ab12cd.tmp", ckpt / ".epoch_1.msgpack.x9.tmp"]
  kept = [ckpt / "notes.tmp", ckpt / ".hidden"]
  for path in stale + kept:
    path.write_text("partial")
  x, y = make_data(32)
  train.fit(TinyNet(), x, y, base_config(epochs=1, batch_size=16), key=jax.random.PRNGKey(0),
            checkpoint_dir=ckpt)
  assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
  assert not list(ckpt.glob(".*.tmp"))
  # Recursive removal reaches sub-folders; a missing folder is nothing to do.
  (tmp_path / "a" / "b").mkdir(parents=True)
  (tmp_path / "a" / "b" / ".r.json.q.tmp").write_text("x")
  assert files.remove_temporaries(tmp_path / "a") == 0
  assert files.remove_temporaries(tmp_path / "a", recursive=True) == 1
  assert files.remove_temporaries(tmp_path / "missing") == 0
