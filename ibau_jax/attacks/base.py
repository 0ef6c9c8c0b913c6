"""Common interface of the backdoor attacks: triggers and label policies.

An attack is an immutable object with

* ``apply(images) -> images``: the trigger ``T``, a pure, jittable (and vmappable,
  over extra leading axes) function on float NHWC batches with pixels in [0, 1];
  it keeps shape and dtype and clips the result to [0, 1].  ``apply`` raises
  ``ValueError`` (:func:`check_batch`) for a batch that is not 4-D floating point or
  that looks channels first (``(N, C, H, W)``, C = 1 or 3) -- shape checks, also
  under ``jax.jit`` -- and, only for a concrete (non-traced) batch, for values
  outside [0, 1] or NaN; a traced batch's values are not checked (``poison`` checks
  its images before it jits the trigger);
* a label policy, the label ``t(y)`` the backdoor should produce for an image of
  true class ``y`` (:meth:`Attack.relabel`):

  - ``mode="all_to_one"`` (default): ``t(y) = target`` for every ``y``;
  - ``mode="all_to_all"``: ``t(y) = (y + 1) mod C`` with ``C = num_classes``
    (``target`` is then unused);

* ``clean_label``: when true, poisoning (:func:`ibau_jax.attacks.poison`) applies
  the trigger to images of class ``target`` only and keeps their labels (SIG);
  ``relabel`` still gives ``target``, the label the trigger should produce at test
  time.

Several triggers with their own targets in one model are a
:class:`~ibau_jax.attacks.multi_target.MultiTarget`.

Triggers that need a pattern (noise, a warping field, ...) build it lazily, when
``apply`` first sees an image size, from a fixed seed with NumPy (PCG64, stable
across platforms and JAX versions), so two attacks with the same parameters give
bit-identical outputs and nothing is computed at import time.

Attack objects compare and hash by identity (``eq=False``), so their bound ``apply``
can be a static argument of ``jax.jit`` (see :mod:`ibau_jax.metrics`).
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Any, ClassVar, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

PathLike = Union[str, os.PathLike]

MODES = ("all_to_one", "all_to_all")


def looks_channels_first(shape: tuple[int, ...]) -> bool:
  """Whether a 3-D image shape ``(A, B, D)`` reads as channels first ``(C, H, W)``.

  A last axis of 1 or 3 entries is taken as channels last (grayscale / RGB
  ``(H, W, C)``); otherwise a first axis of 1 or 3 entries means channels first.
  The rule of :func:`as_hwc` (patterns) and :func:`check_batch` (batches).
  """
  return shape[0] in (1, 3) and shape[-1] not in (1, 3)


def check_layout(shape: tuple[int, ...], name: str) -> None:
  """``ValueError`` if the batch shape ``(N, A, B, D)`` looks channels first."""
  if len(shape) == 4 and looks_channels_first(tuple(shape[1:])):
    raise ValueError(f"{name}: images look channels-first (N, C, H, W), got shape "
                     f"{tuple(shape)}; attacks take NHWC batches (N, H, W, C) with "
                     "C = 1 or 3 last: transpose with images.transpose(0, 2, 3, 1)")


def check_unit_range(images: Any, name: str) -> None:
  """``ValueError`` unless the concrete array ``images`` is finite and in [0, 1].

  Exact bounds, no tolerance (as :func:`ibau_jax.data.to_float`).  Does nothing
  for an empty array or a tracer (values are unknown under ``jax.jit`` /
  ``jax.vmap``).  NumPy arrays are checked with NumPy, JAX arrays on their device.
  """
  if isinstance(images, jax.core.Tracer) or not np.size(images):
    return
  if isinstance(images, np.ndarray):
    lo, hi = float(np.min(images)), float(np.max(images))
  else:
    lo, hi = (float(v) for v in jax.device_get((jnp.min(images), jnp.max(images))))
  if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
    got = "NaN values" if np.isnan(lo) or np.isnan(hi) else f"range [{lo}, {hi}]"
    raise ValueError(f"{name}: images must be finite and in [0, 1], got {got}; "
                     "scale 0..255 pixels first (ibau_jax.data.to_float on the uint8 "
                     "images, or divide by 255)")


def check_batch(images: Any, name: str, *, unit_range: bool = True) -> jnp.ndarray:
  """``images`` as a float ``(N, H, W, C)`` JAX array; ``ValueError`` otherwise.

  Static checks, on the shape and dtype (also under ``jax.jit`` and ``jax.vmap``):
  4-D, floating point, and not channels first (:func:`looks_channels_first`: a
  batch whose last axis is 1 or 3 is NHWC; one whose axis 1 is 1 or 3 and whose
  last axis is not is NCHW and rejected).

  Value check, with ``unit_range``, only on concrete arrays: finite and in [0, 1]
  (:func:`check_unit_range`).  A traced batch (inside ``jax.jit``, ``jax.vmap``)
  is NOT value-checked; :func:`~ibau_jax.attacks.poison` checks its images itself.
  """
  raw = images
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"{name}: images must be an NHWC batch (N, H, W, C), got shape "
                     f"{images.shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"{name}: images must be floating point in [0, 1], got dtype "
                     f"{images.dtype}")
  check_layout(images.shape, name)
  if unit_range:
    check_unit_range(raw if isinstance(raw, np.ndarray) else images, name)
  return images


def check_int(value: Any, name: str, field: str, *, minimum: Optional[int] = None
              ) -> int:
  """``value`` as a Python int (no bools, no fractions), at least ``minimum``."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)) \
      or int(value) != value:
    raise ValueError(f"{name}: {field} must be an integer, got {value!r}")
  value = int(value)
  if minimum is not None and value < minimum:
    raise ValueError(f"{name}: {field} must be >= {minimum}, got {value}")
  return value


def check_float(value: Any, name: str, field: str, *, low: Optional[float] = None,
                high: Optional[float] = None) -> float:
  """``value`` as a finite Python float in ``[low, high]``."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer,
                                                       np.floating)):
    raise ValueError(f"{name}: {field} must be a number, got {value!r}")
  value = float(value)
  if not np.isfinite(value) or (low is not None and value < low) or \
      (high is not None and value > high):
    bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
    raise ValueError(f"{name}: {field} must be a finite number in {bounds}, got "
                     f"{value}")
  return value


def as_hwc(array: Any, name: str, field: str) -> np.ndarray:
  """Read-only float32 ``(H, W, C)`` from an ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``.

  A 3-D array whose first axis has 1 or 3 entries and whose last axis does not is
  taken as channels first and transposed.
  """
  array = np.array(array, dtype=np.float32)  # a copy: callers cannot mutate it
  if array.ndim == 2:
    array = array[:, :, None]
  elif array.ndim != 3:
    raise ValueError(f"{name}: {field} must be 2-D or 3-D, got shape {array.shape}")
  elif looks_channels_first(array.shape):
    array = np.ascontiguousarray(np.transpose(array, (1, 2, 0)))
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{name}: {field} has NaN or inf values")
  array.setflags(write=False)
  return array


def read_array(path: PathLike, name: str, field: str) -> np.ndarray:
  """A ``.npy`` array as float32 as stored, or an image file as RGB divided by 255."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"{name}: {field} file not found: {path!r}")
  if path.lower().endswith(".npy"):
    return np.load(path, allow_pickle=False).astype(np.float32)
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0)


def fit_pattern(pattern: np.ndarray, hwc: tuple[int, int, int], name: str,
                field: str, *, resize: bool) -> Union[np.ndarray, jnp.ndarray]:
  """``pattern`` made to fit images of shape ``hwc`` (a NumPy or, resized, JAX array).

  Its channels must be 1 or ``C``.  With ``resize``, a pattern of another height or
  width is resized bilinearly (``jax.image.resize``, "linear") to ``H x W``;
  otherwise the sizes must match.
  """
  h, w, c = hwc
  if pattern.shape[2] not in (1, c):
    raise ValueError(f"{name}: {field} has {pattern.shape[2]} channels, images have "
                     f"{c}")
  if pattern.shape[:2] != (h, w):
    if not resize:
      raise ValueError(f"{name}: {field} shape {pattern.shape} does not fit images "
                       f"of shape (H, W, C) = {hwc}")
    return jax.image.resize(jnp.asarray(pattern), (h, w, pattern.shape[2]), "linear")
  return pattern


def seeded_rng(name: str, seed: int, *extra: int) -> np.random.Generator:
  """NumPy generator for attack ``name``'s pattern, fixed by ``seed`` and ``extra``."""
  return np.random.default_rng([zlib.crc32(name.encode()), seed, *extra])


def frozen(array: np.ndarray) -> np.ndarray:
  """``array`` as read-only float32 (for cached patterns)."""
  array = np.ascontiguousarray(array, dtype=np.float32)
  array.setflags(write=False)
  return array


@dataclasses.dataclass(frozen=True, eq=False)
class Attack:
  """Base class: a trigger plus a label policy.

  Subclasses are frozen dataclasses that set ``name`` and implement :meth:`apply`.

  Attributes:
    target: target class of an all-to-one attack (``t(y) = target``).
    mode: ``"all_to_one"`` or ``"all_to_all"`` (``t(y) = (y + 1) mod num_classes``).
    num_classes: number of classes ``C``; needed for all-to-all labels, either here
      or as the ``num_classes`` argument of :meth:`relabel` / ``poison``.
    clean_label: poison only images of class ``target`` and keep their labels.
  """

  name: ClassVar[str] = ""
  # Fields that change only the test-time trigger (:meth:`for_evaluation`), not poisoning.
  evaluation_fields: ClassVar[tuple[str, ...]] = ()

  target: int = 0
  mode: str = "all_to_one"
  num_classes: Optional[int] = None
  clean_label: bool = False

  def __post_init__(self) -> None:
    label = self.name or type(self).__name__
    if isinstance(self.target, bool) or not isinstance(
        self.target, (int, np.integer, float)) or int(self.target) != self.target \
        or self.target < 0:
      raise ValueError(f"{label}: target must be a non-negative integer class, got "
                       f"{self.target!r}")
    object.__setattr__(self, "target", int(self.target))
    if self.mode not in MODES:
      raise ValueError(f"{label}: mode must be one of {MODES}, got {self.mode!r}")
    if self.num_classes is not None:
      object.__setattr__(self, "num_classes",
                         check_int(self.num_classes, label, "num_classes", minimum=2))
      if self.mode == "all_to_one" and self.target >= self.num_classes:
        raise ValueError(f"{label}: target {self.target} must be < num_classes "
                         f"{self.num_classes}")
    if not isinstance(self.clean_label, (bool, np.bool_)):
      raise ValueError(f"{label}: clean_label must be a bool, got "
                       f"{self.clean_label!r}")
    object.__setattr__(self, "clean_label", bool(self.clean_label))
    if self.clean_label and self.mode != "all_to_one":
      raise ValueError(f"{label}: a clean-label attack must be all_to_one (it "
                       f"poisons images of class target), got mode {self.mode!r}")

  def apply(self, images: jnp.ndarray) -> jnp.ndarray:
    """Triggered copy of the float NHWC batch ``images`` (same shape and dtype).

    Raises:
      ValueError: (static) ``images`` is not a 4-D floating batch, looks channels
        first, or does not fit the trigger; (concrete ``images`` only, not under
        ``jax.jit`` / ``jax.vmap``) values outside [0, 1] or NaN.
    """
    raise NotImplementedError

  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    return self.apply(images)

  def for_evaluation(self) -> "Attack":
    """The attack as the attacker applies it at test time: itself, unless the attack's
    paper triggers test images differently from poisoned ones (SIG's ``test_delta``)."""
    return self

  def resolve_num_classes(self, num_classes: Optional[int] = None) -> Optional[int]:
    """``num_classes`` from the argument or the field; ``ValueError`` if they differ."""
    label = self.name or type(self).__name__
    if num_classes is None:
      return self.num_classes
    num_classes = check_int(num_classes, label, "num_classes", minimum=2)
    if self.num_classes is not None and num_classes != self.num_classes:
      raise ValueError(f"{label}: num_classes={num_classes} differs from the "
                       f"attack's num_classes={self.num_classes}")
    if self.mode == "all_to_one" and self.target >= num_classes:
      raise ValueError(f"{label}: target {self.target} must be < num_classes "
                       f"{num_classes}")
    return num_classes

  def relabel(self, labels: Any, num_classes: Optional[int] = None) -> jnp.ndarray:
    """Backdoor labels ``t(y)`` of ``labels`` (same shape and dtype; jittable).

    All-to-one: ``target`` everywhere.  All-to-all: ``(y + 1) mod C``, with ``C``
    from ``num_classes`` or the attack's ``num_classes`` field.
    """
    labels = jnp.asarray(labels)
    if self.mode == "all_to_one":
      return jnp.full_like(labels, self.target)
    c = self.resolve_num_classes(num_classes)
    if c is None:
      raise ValueError(f"{self.name or type(self).__name__}: all_to_all labels need "
                       "num_classes (pass it to the attack or to relabel/poison)")
    return ((labels + 1) % c).astype(labels.dtype)


class AdditiveAttack(Attack):
  """An attack that adds a fixed pattern: ``T(x) = clip(x + p, 0, 1)``.

  Subclasses (frozen dataclasses) implement ``trigger(height, width, channels)``, the
  additive pattern ``p`` for images of that shape.
  """

  def trigger(self, height: int, width: int, channels: int) -> Any:
    raise NotImplementedError

  def apply(self, images: jnp.ndarray) -> jnp.ndarray:
    images = check_batch(images, self.name)
    p = jnp.asarray(self.trigger(*images.shape[1:]), images.dtype)
    return jnp.clip(images + p, 0.0, 1.0)
