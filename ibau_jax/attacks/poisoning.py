"""Poisoning a data set at a given ratio: a pure function of a PRNG key.

For an attack ``a`` with label policy ``t`` and labels ``y``, the images it may
poison (eligible) are

* all-to-one, dirty label: ``E = {i : y_i != target}`` (target-class images are
  never poisoned: their label would not change);
* all-to-all: every image (``(y + 1) mod C != y``);
* clean label (e.g. ``sig``): ``E = {i : y_i == target}``.

Exactly ``m = round(ratio * |E|)`` of them (Python's ``round``: halves to even) are
drawn uniformly without replacement with ``jax.random.permutation(key, |E|)``; each
gets the trigger, ``x_i <- a.apply(x_i)``, and the label ``t(y_i)`` (clean label:
``y_i`` kept).  A :class:`~ibau_jax.attacks.multi_target.MultiTarget` draws for
trigger ``k = 0, 1, ...`` in turn (key ``jax.random.split(key, K)[k]``)
``round(ratio * |E_k|)`` images from ``E_k`` minus the images already taken.

Targets must be classes: ``target < C`` for every all-to-one trigger, ``C`` the
``num_classes`` of ``poison`` / ``assign`` or of the attack; when neither gives it,
``C`` is taken as ``max(labels) + 1``, so a target above every label is an error
(pass ``num_classes`` when the clean labels do not contain every class).

The I-BAU code draws ``int(ratio * N)`` images out of the ``N`` of the whole set
instead (among the non-target ones); use ``ratio * N / |E|`` to match it.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from ibau_jax import _prng
from ibau_jax.attacks.base import (Attack, check_float, check_layout,
                                   check_unit_range)
from ibau_jax.attacks.multi_target import MultiTarget

AnyAttack = Union[Attack, MultiTarget]


def _check_labels(labels: Any, n: Optional[int], num_classes: Optional[int]
                  ) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or (n is not None and labels.shape[0] != n):
    want = "(N,)" if n is None else f"({n},)"
    raise ValueError(f"poison: labels must have shape {want}, got {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"poison: labels must be integers, got dtype {labels.dtype}")
  if labels.size and labels.min() < 0:
    raise ValueError(f"poison: labels must be >= 0, got {labels.min()}")
  if num_classes is not None and labels.size and labels.max() >= num_classes:
    raise ValueError(f"poison: labels must be < num_classes={num_classes}, got "
                     f"{labels.max()}")
  return labels


def _sub_attacks(attack: Any) -> tuple[Attack, ...]:
  if isinstance(attack, MultiTarget):
    return attack.attacks
  if isinstance(attack, Attack):
    return (attack,)
  raise ValueError(f"poison: attack must be an Attack or a MultiTarget, got "
                   f"{type(attack).__name__}")


def eligible(labels: Any, attack: Attack) -> np.ndarray:
  """Boolean ``(N,)``: the images ``attack`` may poison (see the module docstring)."""
  labels = np.asarray(labels)
  if attack.clean_label:
    return labels == attack.target
  if attack.mode == "all_to_all":
    return np.ones(labels.shape, bool)
  return labels != attack.target


def assign(labels: Any, attack: AnyAttack, ratio: float, *, key: jax.Array,
           num_classes: Optional[int] = None) -> np.ndarray:
  """Which trigger poisons each image: int32 ``(N,)``, ``-1`` = clean, else ``k``.

  For a single attack ``k`` is 0.  Same ``key``, same assignment; the images
  :func:`poison` changes are exactly those with ``assign(...) >= 0``.

  ``ValueError`` for an all-to-one target ``>= num_classes``, or, without
  ``num_classes`` (here or on the attacks), ``> max(labels)`` (see the module
  docstring).
  """
  _prng.check_key(key, "poison: key")
  ratio = check_float(ratio, "poison", "ratio", low=0.0, high=1.0)
  attacks = _sub_attacks(attack)
  known = {a.resolve_num_classes(num_classes) for a in attacks} - {None}
  if len(known) > 1:
    raise ValueError(f"poison: the attacks disagree on num_classes: {sorted(known)}")
  c = known.pop() if known else None
  labels = _check_labels(labels, None, c)
  if c is None and labels.size:
    # No num_classes anywhere: the classes are 0 .. max(labels); a target above them
    # would write a label outside the data set's classes.
    inferred = int(labels.max()) + 1
    for k, a in enumerate(attacks):
      if a.mode == "all_to_one" and a.target >= inferred:
        who = a.name if len(attacks) == 1 else f"trigger {k} ({a.name})"
        raise ValueError(
            f"poison: {who} target {a.target} is not a class of the labels: without "
            f"num_classes the classes are 0..max(labels) = 0..{inferred - 1}; pass "
            "num_classes (to poison or the attack) if the labels do not contain "
            "every class")
  which = np.full(labels.shape, -1, np.int32)
  keys = jax.random.split(key, len(attacks)) if isinstance(attack, MultiTarget) \
      else [key]
  for k, a in enumerate(attacks):
    if a.mode == "all_to_all" and a.resolve_num_classes(num_classes) is None:
      raise ValueError(f"poison: all_to_all attack {a.name!r} needs num_classes "
                       "(pass it to the attack or to poison)")
    allowed = eligible(labels, a)
    count = round(ratio * int(allowed.sum()))
    free = np.flatnonzero(allowed & (which < 0))
    if count > free.size:
      raise ValueError(f"poison: trigger {k} ({a.name}) needs {count} images but "
                       f"only {free.size} eligible images are left (ratio too large "
                       "for this many triggers)")
    if count:
      order = np.asarray(jax.random.permutation(keys[k], free.size))
      which[free[order[:count]]] = k
  return which


_NOISE_CHUNK = 1024


def _apply_in_chunks(attack: Attack, images: np.ndarray, chunk: int) -> np.ndarray:
  """``attack.apply`` on ``images`` in fixed-size jitted chunks (last one padded)."""
  n = images.shape[0]
  size = min(chunk, n)
  fn = jax.jit(attack.apply)
  out = np.empty_like(images)
  for start in range(0, n, size):
    part = images[start:start + size]
    m = part.shape[0]
    if m < size:
      part = np.concatenate([part, np.repeat(part[-1:], size - m, axis=0)])
    out[start:start + m] = np.asarray(fn(jnp.asarray(part)))[:m]
  return out


def poison(images: Any, labels: Any, attack: AnyAttack, ratio: float, *,
           key: jax.Array, num_classes: Optional[int] = None,
           chunk_size: int = 1024,
           noise_ratio: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Poisoned copy of a data set.

  Args:
    images: float ``(N, H, W, C)`` in [0, 1], NumPy or JAX (checked: finite, in
      [0, 1], not channels first; the trigger then runs jitted, unchecked).
    labels: int ``(N,)``.
    attack: an :class:`Attack` or a :class:`MultiTarget`.
    ratio: fraction in [0, 1] of the ELIGIBLE images to poison (per trigger).
    key: PRNG key; the result is a deterministic function of it.
    num_classes: number of classes, for all-to-all labels (if the attack has
      none) and to check the labels and targets (``< num_classes``).  Without it
      (here and on the attack) targets must be ``<= max(labels)``: pass it when
      the clean labels do not contain every class.
    chunk_size: the trigger runs jitted on chunks of this many images.
    noise_ratio: for attacks with a noise mode (``apply_noise(images, key)``, e.g. WaNet):
      ``round(noise_ratio * N)`` of the images that are NOT poisoned, drawn uniformly from
      ``fold_in(key, 1)``, get the noise-mode trigger and keep their true labels (WaNet's
      "cross" samples; its paper uses twice the backdoor ratio).  They are not marked in
      the returned mask.  0 (default): no noise samples.

  Returns:
    NumPy arrays ``(images, labels, poisoned)``: copies of the inputs with the
    same dtypes, and the boolean ``(N,)`` mask of the poisoned images
    (``assign(labels, attack, ratio, key=key) >= 0``).
  """
  chunk_size = int(chunk_size)
  if chunk_size < 1:
    raise ValueError(f"poison: chunk_size must be >= 1, got {chunk_size}")
  images = np.array(images)  # a copy, whatever the input
  if images.ndim != 4 or not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"poison: images must be a float NHWC batch, got shape "
                     f"{images.shape} and dtype {images.dtype}")
  check_layout(images.shape, "poison")
  check_unit_range(images, "poison")
  labels = _check_labels(labels, images.shape[0], None).copy()
  noise_ratio = float(noise_ratio)
  if not 0.0 <= noise_ratio <= 1.0:
    raise ValueError(f"poison: noise_ratio must be in [0, 1], got {noise_ratio}")
  if noise_ratio > 0 and not hasattr(attack, "apply_noise"):
    raise ValueError(f"poison: noise_ratio > 0 needs an attack with a noise mode "
                     f"(apply_noise), got {type(attack).__name__}")
  which = assign(labels, attack, ratio, key=key, num_classes=num_classes)
  if noise_ratio > 0:
    free = np.flatnonzero(which < 0)
    count = int(round(noise_ratio * images.shape[0]))
    if count > free.size:
      raise ValueError(f"poison: noise_ratio {noise_ratio} asks for {count} noise images "
                       f"but only {free.size} are not poisoned")
    k_pick, k_noise = jax.random.split(jax.random.fold_in(key, 1))
    order = np.asarray(jax.random.permutation(k_pick, free.size))
    noisy = np.sort(free[order[:count]])
    # Fixed chunks, so the noise depends on the key alone (not on chunk_size).
    for start in range(0, noisy.size, _NOISE_CHUNK):
      part = noisy[start:start + _NOISE_CHUNK]
      images[part] = np.asarray(attack.apply_noise(
          jnp.asarray(images[part]), jax.random.fold_in(k_noise, start)))
  for k, a in enumerate(_sub_attacks(attack)):
    index = np.flatnonzero(which == k)
    if not index.size:
      continue
    images[index] = _apply_in_chunks(a, images[index], chunk_size)
    if not a.clean_label:
      labels[index] = np.asarray(a.relabel(labels[index], num_classes=num_classes))
  return images, labels, which >= 0
