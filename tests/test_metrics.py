"""ACC / ASR / RA / DER on a fake model whose predictions the test controls.

The fake "images" are ``(N, 1, 1, 1)`` pixels ``c / K`` in [0, 1] showing the class
``c`` the model must predict; ``variables["table"]`` is the identity matrix, so
``logits = table[c]`` is a one-hot lookup and ``argmax = c``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax import metrics

K = 4
VARIABLES = {"table": jnp.eye(K)}


def fake_apply(variables, images):
  return variables["table"][jnp.round(images[:, 0, 0, 0] * K).astype(jnp.int32)]


def to_two(images):
  """Trigger: images showing class 0 or 1 turn into class 2; others unchanged."""
  return jnp.where(images < 2 / K, 2 / K, images)


def _images(classes):
  return (np.asarray(classes, np.float32) / K)[:, None, None, None]


def test_accuracy_and_predict_non_divisible_batches():
  labels = np.array([0, 1, 2, 3, 0, 1, 2])
  images = _images([0, 1, 0, 3, 2, 1, 2])  # wrong at indices 2 and 4
  for batch_size in (1, 2, 3, 7, 500):
    np.testing.assert_array_equal(
        metrics.predict(fake_apply, VARIABLES, images, batch_size=batch_size),
        [0, 1, 0, 3, 2, 1, 2])
    assert metrics.accuracy(fake_apply, VARIABLES, images, labels,
                            batch_size=batch_size) == pytest.approx(5 / 7)
  assert metrics.accuracy(fake_apply, VARIABLES, jnp.asarray(images), labels,
                          batch_size=3) == pytest.approx(5 / 7)


def test_padding_keeps_one_compiled_shape():
  # A function of its own: the compiled-function cache is per process, and
  # another test in this worker may already have traced ``fake_apply``.
  traces = []

  def counting_apply(variables, images):
    traces.append(images.shape)  # runs once per trace, not per call
    return fake_apply(variables, images)

  images = _images(np.arange(10) % K)
  metrics.predict(counting_apply, VARIABLES, images, batch_size=4)  # 4 + 4 + (2 -> 4)
  metrics.predict(counting_apply, VARIABLES, images[:9], batch_size=4)
  assert traces == [(4, 1, 1, 1)]


def test_asr_and_ra_exclude_target_class_images():
  true = np.array([0, 1, 2, 3, 0, 2, 1])
  triggered = _images([2, 2, 2, 0, 1, 2, 1])
  # Non-target images (true != 2): indices 0, 1, 3, 4, 6 -> predictions 2, 2, 0, 1, 1.
  # Predicted as target: 0, 1 -> ASR 2/5 (counting the two target-class images would
  # give 4/7).  Predicted as true label: 6 -> RA 1/5.
  for batch_size in (2, 500):
    assert metrics.attack_success_rate(fake_apply, VARIABLES, triggered, true, 2,
                                       batch_size=batch_size) == pytest.approx(2 / 5)
    assert metrics.robust_accuracy(fake_apply, VARIABLES, triggered, true, 2,
                                   batch_size=batch_size) == pytest.approx(1 / 5)


def test_asr_and_ra_all_to_all_targets():
  true = np.array([0, 1, 2, 3, 3])
  targets = (true + 1) % K  # [1, 2, 3, 0, 0]: no image is excluded
  triggered = _images([1, 2, 0, 3, 0])
  assert metrics.attack_success_rate(fake_apply, VARIABLES, triggered, true,
                                     targets) == pytest.approx(3 / 5)
  assert metrics.robust_accuracy(fake_apply, VARIABLES, triggered, true,
                                 targets) == pytest.approx(1 / 5)
  # Per-image targets equal to the true label are excluded: indices 1 and 4 go;
  # of 0, 2, 3 (predictions 1, 0, 3; targets 1, 3, 0) only index 0 hits.
  targets2 = np.array([1, 1, 3, 0, 3])
  assert metrics.attack_success_rate(fake_apply, VARIABLES, triggered, true,
                                     targets2) == pytest.approx(1 / 3)


def test_evaluate_applies_trigger():
  images = _images([0, 1, 2, 3, 0, 1, 2, 3])
  labels = np.array([0, 1, 2, 3, 0, 1, 2, 0])  # last image misclassified
  # Triggered predictions: [2, 2, 2, 3, 2, 2, 2, 3].  Non-target (label != 2):
  # indices 0, 1, 3, 4, 5, 7 -> predictions 2, 2, 3, 2, 2, 3.
  result = metrics.evaluate(fake_apply, VARIABLES, images, labels, to_two, 2,
                            batch_size=4)
  assert set(result) == {"acc", "asr", "ra"}
  assert result["acc"] == pytest.approx(7 / 8)
  assert result["asr"] == pytest.approx(4 / 6)
  assert result["ra"] == pytest.approx(1 / 6)
  same = metrics.evaluate(fake_apply, VARIABLES, images, labels, to_two, 2,
                          batch_size=3)
  assert same == result


def test_defense_effectiveness_rating():
  der = metrics.defense_effectiveness_rating
  # dASR = 0.9, dACC = 0.05 -> (0.9 - 0.05 + 1) / 2.
  assert der(0.90, 0.95, 0.85, 0.05) == pytest.approx(0.925)
  # ASR went up and ACC went up: both deltas clipped at 0 -> 0.5.
  assert der(0.80, 0.50, 0.90, 0.60) == pytest.approx(0.5)
  assert der(0.9, 1.0, 0.9, 0.0) == pytest.approx(1.0)
  assert der(1.0, 0.3, 0.0, 0.3) == pytest.approx(0.0)
  with pytest.raises(ValueError, match="acc_before must be a fraction"):
    der(84.3, 0.98, 0.83, 0.01)
  with pytest.raises(ValueError, match="asr_after must be a number"):
    der(0.8, 0.9, 0.8, "low")


def test_input_validation():
  images = _images([0, 1, 2])
  with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
    metrics.accuracy(fake_apply, VARIABLES, images, np.array([0, 1]))
  with pytest.raises(ValueError, match="labels must be >= 0"):
    metrics.accuracy(fake_apply, VARIABLES, images, np.array([0, -1, 2]))
  with pytest.raises(ValueError, match="num_classes=4"):
    metrics.accuracy(fake_apply, VARIABLES, images, np.array([0, 1, 4]))
  with pytest.raises(ValueError, match="integer class ids"):
    metrics.accuracy(fake_apply, VARIABLES, images, np.array([0.0, 1.0, 2.0]))
  with pytest.raises(ValueError, match="floating point"):
    metrics.accuracy(fake_apply, VARIABLES, images.astype(np.uint8), np.array([0, 1, 2]))
  with pytest.raises(ValueError, match="batch_size"):
    metrics.predict(fake_apply, VARIABLES, images, batch_size=0)
  with pytest.raises(ValueError, match="0 images"):
    metrics.accuracy(fake_apply, VARIABLES, images[:0], np.zeros((0,), int))
  with pytest.raises(ValueError, match="no non-target images"):
    metrics.attack_success_rate(fake_apply, VARIABLES, images, np.array([1, 1, 1]), 1)
  with pytest.raises(ValueError, match="target_labels must be < num_classes"):
    metrics.attack_success_rate(fake_apply, VARIABLES, images, np.array([0, 1, 2]), 7)
  with pytest.raises(ValueError, match="target label must be a non-negative integer"):
    metrics.robust_accuracy(fake_apply, VARIABLES, images, np.array([0, 1, 2]), -1)
  with pytest.raises(ValueError, match="trigger_fn must be callable"):
    metrics.evaluate(fake_apply, VARIABLES, images, np.array([0, 1, 2]), None, 0)
  assert metrics.predict(fake_apply, VARIABLES, images[:0]).shape == (0,)


@pytest.mark.parametrize("bad, match", [
    (lambda x: x * 255.0, r"images must lie in \[0, 1\]; got values in \[0, 191\.2\] "
                          r"\(0\.\.255 pixels\? divide by 255\)"),
    (lambda x: x - 0.5, r"images must lie in \[0, 1\]"),
    (lambda x: np.where(np.arange(3)[:, None, None, None] == 1, np.nan, x), "NaN or infinite"),
    (lambda x: np.where(np.arange(3)[:, None, None, None] == 2, np.inf, x), "NaN or infinite"),
    (lambda x: jnp.asarray(x).at[0].set(jnp.nan), "NaN or infinite"),  # on the device
    (lambda x: (x * 255).astype(np.uint8), "floating point.*uint8"),
    (lambda x: x[:, 0], r"rank 4 \(N, H, W, C\); got shape \(3, 1, 1\)"),
    (lambda x: x[0], r"rank 4 \(N, H, W, C\); got shape \(1, 1, 1\)"),
])
def test_images_must_be_finite_pixels_in_unit_range(bad, match):
  images, labels = bad(_images([0, 1, 3])), np.array([0, 1, 3])
  with pytest.raises(ValueError, match=match):
    metrics.accuracy(fake_apply, VARIABLES, images, labels)
  with pytest.raises(ValueError, match=match):
    metrics.predict(fake_apply, VARIABLES, images)
  with pytest.raises(ValueError, match=match.replace("images", "triggered_images", 1)):
    metrics.attack_success_rate(fake_apply, VARIABLES, images, labels, 2)
  with pytest.raises(ValueError, match=match):
    metrics.evaluate(fake_apply, VARIABLES, images, labels, to_two, 2)


class _TinyBN(nn.Module):
  """Conv -> BatchNorm (running statistics) -> mean -> Dense: reads 'batch_stats'."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(2, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=True)(x)
    return nn.Dense(K)(x.mean(axis=(1, 2)))


def test_model_that_does_not_fit_the_images_or_variables_raises_value_error():
  model = _TinyBN()
  x = np.random.default_rng(0).random((4, 8, 8, 3), dtype=np.float32)
  y = np.array([0, 1, 2, 3])
  variables = model.init(jax.random.PRNGKey(0), x[:1])
  assert 0.0 <= metrics.accuracy(model.apply, variables, x, y) <= 1.0  # NHWC: fine
  with pytest.raises(ValueError, match=r"shape \(4, 3, 8, 8\).*NCHW.*transpose\(0, 2, 3, 1\)"
                                       r".*ScopeParamShapeError"):
    metrics.accuracy(model.apply, variables, x.transpose(0, 3, 1, 2), y)
  with pytest.raises(ValueError, match="batch_stats.*ScopeCollectionNotFound"):
    metrics.evaluate(model.apply, {"params": variables["params"]}, x, y, to_two, 2)
