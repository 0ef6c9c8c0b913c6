"""Clean accuracy, attack success rate, robust accuracy and DER of a classifier.

Notation: a model is ``apply_fn(variables, images) -> logits`` with ``images`` a
float ``(N, H, W, C)`` batch and ``logits`` of shape ``(N, K)``; its prediction for
image ``i`` is ``pred_i = argmax_k logits[i, k]`` (ties go to the lowest class, as
``jnp.argmax`` does).  ``y_i`` is image ``i``'s true label, ``t_i`` the attack's
target label (one class for all-to-one attacks, per image for all-to-all ones),
``T(x)`` the triggered version of ``x``.  All rates are fractions in [0, 1].

Inputs are checked on the host, outside the compiled evaluation (``ValueError`` naming the
problem): images as :func:`ibau_jax.unlearn` takes them (:func:`check_images`: rank 4,
floating point, finite, in [0, 1]) and labels as integer class ids ``>= 0`` before any
evaluation; a model that fails on the first batch (a Flax scope error: NCHW images, a
missing ``batch_stats`` collection) is reported as such; labels ``>= K`` once the logits
show ``K``.

* ACC (clean accuracy) ``= |{i : pred(x_i) = y_i}| / N`` over clean images.
* ASR (attack success rate) ``= |{i in S : pred(T(x_i)) = t_i}| / |S|`` with
  ``S = {i : y_i != t_i}``: images whose true label already is the target are
  excluded, so that a model that classifies them correctly does not count as
  attacked.
* RA (robust accuracy) ``= |{i in S : pred(T(x_i)) = y_i}| / |S|``, over the same
  ``S``: how often the triggered image is still classified correctly.
* DER (defense effectiveness rating, BackdoorBench, Wu et al. 2022)
  ``= [max(0, dASR) - max(0, dACC) + 1] / 2`` with
  ``dASR = ASR_before - ASR_after`` and ``dACC = ACC_before - ACC_after``; it lies in
  [0, 1], 0.5 means no change, 1 means the ASR went from 1 to 0 at no accuracy cost.

Evaluation runs in fixed-size batches through one jit-compiled function per
``(apply_fn, trigger_fn)`` pair and batch shape; the last batch is padded (by
repeating its final image) to keep that shape and the padding is dropped.
``apply_fn`` and ``trigger_fn`` are static arguments of that function, so pass the
same callables across calls (``model.apply`` -- equal Flax modules count as the same
-- a module-level function, an attack's ``apply``) rather than a fresh lambda each
time, which recompiles (and stays referenced by jit's cache).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np

ApplyFn = Callable[[Any, jnp.ndarray], jnp.ndarray]
TriggerFn = Callable[[jnp.ndarray], jnp.ndarray]


def _identity_of(fn: Any) -> Any:
  """Comparison key of a callable: bound methods compare by ``(self == self', func)``.

  Python compares bound methods by the identity of ``__self__``, so
  ``get_model(...).apply`` on two equal Flax modules would otherwise never share a
  compiled function.
  """
  if inspect.ismethod(fn):
    return ("method", fn.__self__, fn.__func__)
  return fn


class _Key:
  """Hashable static wrapper of ``(apply_fn, trigger_fn)`` for ``jax.jit``.

  Callables compare with ``==`` (bound methods by their object's ``==``); unhashable
  ones fall back to identity.
  """

  __slots__ = ("apply_fn", "trigger_fn", "_ident", "_hash")

  def __init__(self, apply_fn: ApplyFn, trigger_fn: Optional[TriggerFn]):
    self.apply_fn = apply_fn
    self.trigger_fn = trigger_fn
    ident = (_identity_of(apply_fn), _identity_of(trigger_fn))
    try:
      self._hash = hash(ident)
    except TypeError:
      ident = (id(apply_fn), id(trigger_fn))
      self._hash = hash(ident)
    self._ident = ident

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, _Key):
      return NotImplemented
    return self._ident == other._ident


@functools.partial(jax.jit, static_argnums=0)
def _predict_batch(key: _Key, variables: Any, images: jnp.ndarray
                   ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """``(argmax predictions (B,), logits (B, K))`` of ``apply_fn(v, trigger(x))``."""
  if key.trigger_fn is not None:
    images = key.trigger_fn(images)
  logits = key.apply_fn(variables, images)
  return jnp.argmax(logits, axis=-1), logits


def looks_nchw(shape: tuple[int, ...]) -> bool:
  """Whether a rank-4 image shape looks channels-first: ``shape[1]`` in (1, 3) and
  ``shape[-1]`` not in (1, 3) (e.g. ``(N, 3, 32, 32)``)."""
  return len(shape) == 4 and shape[1] in (1, 3) and shape[-1] not in (1, 3)


def check_images(images: Any, name: str = "images") -> np.ndarray | jax.Array:
  """Checks that ``images`` is a batch of pixels: rank 4 ``(N, H, W, C)``, floating point,
  finite and in [0, 1] (the rules of :func:`ibau_jax.unlearn`).

  Runs on the host for numpy input and as two reductions (min, max) on the device for a
  ``jax.Array``; NaN and infinities show up in those extremes.

  Args:
    images: array-like of shape (N, H, W, C).
    name: the argument's name in the error messages.

  Returns:
    ``images`` unchanged (a ``jax.Array`` stays one; anything else becomes a numpy array).

  Raises:
    ValueError: naming ``name``, for any other rank, a non-floating dtype (e.g. uint8
      pixels 0..255), NaN or infinite values, or values outside [0, 1].
  """
  if not isinstance(images, (np.ndarray, jax.Array)):
    images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"{name} must have rank 4 (N, H, W, C); got shape {images.shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point in [0, 1]; got dtype {images.dtype} "
                     "(for uint8 pixels, convert with x.astype(np.float32) / 255)")
  if images.size:
    xp = jnp if isinstance(images, jax.Array) else np
    lo, hi = float(xp.min(images)), float(xp.max(images))
    if not (np.isfinite(lo) and np.isfinite(hi)):
      raise ValueError(f"{name} contain NaN or infinite values")
    if lo < 0.0 or hi > 1.0:
      hint = (" (0..255 pixels? divide by 255)" if hi > 1.0 and lo >= 0.0 else
              " (the models and attacks take raw pixels: normalise inside the model)")
      raise ValueError(f"{name} must lie in [0, 1]; got values in [{lo:.4g}, {hi:.4g}]"
                       + hint)
  return images


def _check_batch_size(batch_size: int) -> int:
  if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  return int(batch_size)


def _check_labels(labels: Any, n: int, name: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.shape != (n,):
    raise ValueError(f"{name} must have shape ({n},) to match the images, got "
                     f"{labels.shape}")
  if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
    raise ValueError(f"{name} must be integer class ids, got dtype {labels.dtype}")
  labels = labels.astype(np.int64)
  if n and labels.min() < 0:
    raise ValueError(f"{name} must be >= 0, got minimum {labels.min()}")
  return labels


def _check_label_range(labels: np.ndarray, num_classes: int, name: str) -> None:
  if labels.size and labels.max() >= num_classes:
    raise ValueError(f"{name} must be < num_classes={num_classes} (the model's "
                     f"number of logits), got maximum {labels.max()}")


def _first_batch(key: _Key, variables: Any, batch: Any) -> tuple[jnp.ndarray, jnp.ndarray]:
  """:func:`_predict_batch` on the first batch, where a model that does not fit the images
  or the variables fails while tracing: its Flax scope error (a parameter of another shape,
  a missing collection such as ``batch_stats``) or ``TypeError`` becomes a ``ValueError``
  that says so, with the original message appended."""
  try:
    return _predict_batch(key, variables, batch)
  except (flax.errors.FlaxError, TypeError) as e:
    hint = ""
    if looks_nchw(tuple(batch.shape)):
      hint = (" (the images look channels-first, NCHW; models take NHWC (N, H, W, C): "
              "use images.transpose(0, 2, 3, 1))")
    elif isinstance(e, flax.errors.ScopeCollectionNotFound):
      hint = (" (variables lack a collection the model reads, e.g. the 'batch_stats' of "
              "its BatchNorm layers: pass all of the model's variables, not only 'params')")
    raise ValueError(f"apply_fn(variables, images) failed on a batch of shape "
                     f"{tuple(batch.shape)}{hint}: {type(e).__name__}: {e}") from e


def _run(apply_fn: ApplyFn, variables: Any, images: Any, batch_size: int,
         trigger_fn: Optional[TriggerFn] = None) -> tuple[np.ndarray, int]:
  """Predictions ``(N,)`` and the number of classes ``K`` (``-1`` when ``N = 0``)."""
  if not callable(apply_fn):
    raise ValueError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
  if trigger_fn is not None and not callable(trigger_fn):
    raise ValueError(f"trigger_fn must be callable, got {type(trigger_fn).__name__}")
  batch_size = _check_batch_size(batch_size)
  n = int(images.shape[0])
  if n == 0:
    return np.zeros((0,), np.int64), -1
  key = _Key(apply_fn, trigger_fn)
  size = min(batch_size, n)
  preds = []
  num_classes = -1
  for start in range(0, n, size):
    batch = images[start:start + size]
    valid = int(batch.shape[0])
    if valid < size:
      pad = [(0, size - valid)] + [(0, 0)] * (batch.ndim - 1)
      if isinstance(batch, jax.Array):
        batch = jnp.pad(batch, pad, mode="edge")
      else:
        batch = np.pad(batch, pad, mode="edge")
    if start == 0:
      pred, logits = _first_batch(key, variables, batch)
    else:
      pred, logits = _predict_batch(key, variables, batch)
    if logits.ndim != 2 or logits.shape[0] != size:
      raise ValueError(f"apply_fn must return logits of shape ({size}, K) for a "
                       f"batch of {size}, got {logits.shape}")
    num_classes = int(logits.shape[1])
    preds.append(np.asarray(pred)[:valid])
  return np.concatenate(preds).astype(np.int64), num_classes


def predict(apply_fn: ApplyFn, variables: Any, images: Any, *,
            batch_size: int = 500) -> np.ndarray:
  """Argmax class predictions ``(N,)`` (int64) of ``apply_fn(variables, images)``.

  Runs in batches of ``min(batch_size, N)``; the last batch is padded and the
  padding dropped, so one compiled shape serves the whole set.
  """
  images = check_images(images)
  return _run(apply_fn, variables, images, batch_size)[0]


def accuracy(apply_fn: ApplyFn, variables: Any, images: Any, labels: Any, *,
             batch_size: int = 500) -> float:
  """ACC: fraction of ``images`` whose argmax logit equals ``labels``."""
  images = check_images(images)
  n = int(images.shape[0])
  labels = _check_labels(labels, n, "labels")
  if n == 0:
    raise ValueError("accuracy of an empty set is undefined: got 0 images")
  preds, num_classes = _run(apply_fn, variables, images, batch_size)
  _check_label_range(labels, num_classes, "labels")
  return float(np.mean(preds == labels))


def _non_target(true_labels: Any, target_labels: Any, n: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(keep mask, true labels, per-image targets)``; keep = true != target."""
  true_labels = _check_labels(true_labels, n, "true_labels")
  if np.ndim(target_labels) == 0:
    target = np.asarray(target_labels)
    if not (np.issubdtype(target.dtype, np.integer)) or int(target) < 0:
      raise ValueError(f"target label must be a non-negative integer, got "
                       f"{target_labels!r}")
    target_labels = np.full((n,), int(target), np.int64)
  else:
    target_labels = _check_labels(target_labels, n, "target_labels")
  keep = true_labels != target_labels
  if not keep.any():
    raise ValueError("ASR/RA are undefined: every image's true label equals its "
                     "target label (no non-target images)")
  return keep, true_labels, target_labels


def _triggered_predictions(apply_fn: ApplyFn, variables: Any, triggered_images: Any,
                           true_labels: Any, target_labels: Any, batch_size: int,
                           trigger_fn: Optional[TriggerFn] = None
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Predictions on the non-target images, with their true and target labels."""
  images = check_images(triggered_images, "triggered_images")
  keep, true_labels, target_labels = _non_target(true_labels, target_labels,
                                                 int(images.shape[0]))
  index = np.flatnonzero(keep)
  subset = images if index.size == images.shape[0] else images[index]
  preds, num_classes = _run(apply_fn, variables, subset, batch_size, trigger_fn)
  _check_label_range(true_labels, num_classes, "true_labels")
  _check_label_range(target_labels, num_classes, "target_labels")
  return preds, true_labels[index], target_labels[index]


def attack_success_rate(apply_fn: ApplyFn, variables: Any, triggered_images: Any,
                        true_labels: Any, target_labels: Any, *,
                        batch_size: int = 500) -> float:
  """ASR: among images with true label != target, fraction predicted as the target.

  Args:
    apply_fn: ``apply_fn(variables, images) -> logits``.
    variables: model variables.
    triggered_images: ``(N, H, W, C)`` float images with the trigger applied.
    true_labels: ``(N,)`` true labels of the underlying clean images.
    target_labels: an int (all-to-one) or an ``(N,)`` array (e.g. all-to-all).
    batch_size: evaluation batch size.
  """
  preds, _, targets = _triggered_predictions(apply_fn, variables, triggered_images,
                                             true_labels, target_labels, batch_size)
  return float(np.mean(preds == targets))


def robust_accuracy(apply_fn: ApplyFn, variables: Any, triggered_images: Any,
                    true_labels: Any, target_labels: Any, *,
                    batch_size: int = 500) -> float:
  """RA: among images with true label != target, fraction predicted as the true label.

  Arguments as in :func:`attack_success_rate`.
  """
  preds, true, _ = _triggered_predictions(apply_fn, variables, triggered_images,
                                          true_labels, target_labels, batch_size)
  return float(np.mean(preds == true))


def defense_effectiveness_rating(acc_before: float, asr_before: float,
                                 acc_after: float, asr_after: float) -> float:
  """DER = [max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1] / 2.

  All four inputs are fractions in [0, 1]; the result is in [0, 1].
  """
  values = {"acc_before": acc_before, "asr_before": asr_before,
            "acc_after": acc_after, "asr_after": asr_after}
  for name, value in values.items():
    try:
      value = float(value)
    except (TypeError, ValueError):
      raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"{name} must be a fraction in [0, 1], got {value} "
                       "(percentages must be divided by 100)")
    values[name] = value
  d_asr = values["asr_before"] - values["asr_after"]
  d_acc = values["acc_before"] - values["acc_after"]
  return (max(0.0, d_asr) - max(0.0, d_acc) + 1.0) / 2.0


def evaluate(apply_fn: ApplyFn, variables: Any, images: Any, labels: Any,
             trigger_fn: TriggerFn, target: Any, *,
             batch_size: int = 500) -> dict[str, float]:
  """``{"acc", "asr", "ra"}`` of a model on clean ``images`` and their triggered copies.

  ``acc`` is ACC on ``images``; ``asr`` and ``ra`` are ASR and RA on
  ``trigger_fn(images)`` over the images whose label differs from ``target`` (an int
  or an ``(N,)`` array).  ``trigger_fn`` maps a float batch ``(B, H, W, C)`` to the
  triggered batch of the same shape; it runs inside the jit-compiled evaluation
  (so it must be jittable, e.g. an attack's ``apply``) batch by batch.
  """
  if not callable(trigger_fn):
    raise ValueError(f"trigger_fn must be callable, got {type(trigger_fn).__name__}")
  acc = accuracy(apply_fn, variables, images, labels, batch_size=batch_size)
  preds, true, targets = _triggered_predictions(apply_fn, variables, images, labels,
                                                target, batch_size, trigger_fn)
  return {"acc": acc,
          "asr": float(np.mean(preds == targets)),
          "ra": float(np.mean(preds == true))}
