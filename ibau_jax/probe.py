"""Trigger probes: what a defender can measure about a backdoor with clean images alone.

A backdoored classifier has a *small universal* perturbation that sends nearly every image
to one class: its trigger.  These functions look for such perturbations with L2 projected
gradient descent over a set of clean images ``x_1..x_n``:

* :func:`universal_perturbation` solves, for a radius ``C``,

      untargeted:  max_{‖δ‖₂ ≤ C} (1/n) Σ_i CE(f(x_i + δ), ŷ_i)      (ŷ_i = argmax f(x_i))
      targeted:    min_{‖δ‖₂ ≤ C} (1/n) Σ_i CE(f(x_i + δ), t)

  with ``epochs`` passes of normalised steps ``δ ← Π_C(δ ∓ (C/5) g/‖g‖₂)`` (``g`` the
  gradient on one batch; ``Π_C`` the projection on the ball).
* :func:`find_suspect` tries the radii of ``bounds`` from the smallest; at the first one
  whose untargeted δ sends at least ``min_share`` of the images not already predicted as
  its most frequent new class ``k`` to ``k``, it returns ``k`` (the suspected target class)
  and that radius.
* :func:`targeted_success` is the share of images (not already predicted ``t``) that the
  targeted δ of radius ``C`` sends to ``t``: an ASR the defender can compute without
  knowing the trigger, since the trigger is itself such a δ.

:func:`ibau_jax.unlearn` with ``IBAUConfig(select="probe")`` uses them to return the round
whose model resists the suspect class's probe best (the backdoor can come back in a later
round; docs/results.md).

A *stamp* is a trigger cut out of a universal perturbation δ (shape ``(H, W, C)``):
:func:`cut_stamp` keeps the ``k = ⌈share · H · W⌉`` pixel locations ``p`` with the largest
energy ``Σ_c δ_{p,c}²`` (the mask ``m``, 1 there and 0 elsewhere) and saturates δ's sign
there (the pattern ``1[δ > 0]``), so that ``stamp(x) = (1 − m) ⊙ x + m ⊙ 1[δ > 0]``: a
patch like the BadNets trigger, which a δ found on a patch-backdoored model concentrates
on.  :func:`stamp_share` is the share of images (not already predicted ``t``) that the
stamp sends to ``t``.  ``IBAUConfig(retries=...)`` uses them to see a round after which
the backdoor is still fully there (docs/results.md, session 20).

A *window* is a square of pixel locations, again chosen from δ (:func:`best_window`: the
``w × w`` square of largest energy).  :func:`fit_window` fits a pattern
``p = sigmoid(u)`` pasted into it, ``x' = (1 − m) ⊙ x + m ⊙ p``, that sends clean images to
a class ``t`` (``min_u mean CE(f(x'), t)``, Adam), and :func:`window_share` is the share of
images (not already predicted ``t``) it sends there.  Started from the pattern fitted on the
model before unlearning, the fit follows what is left of a patch trigger after a round that
removed most of it, where the stamp and universal perturbations no longer see it
(docs/results.md, session 21); ``IBAUConfig(repair_epochs=...)`` unlearns that pattern.

A *universal warp* moves every image's pixels by one displacement field instead of adding
one δ: a ``k × k`` grid of control displacements ``φ`` (in pixels, each coordinate in
``[−b, b]``) is upsampled bicubically to an ``(H, W, 2)`` field ``D`` (rows, columns), and
``warp(x, φ)(p) = x(p + D(p))`` with bilinear sampling (border pixels repeated), clipped
to [0, 1].  A warping trigger (WaNet) is such a field, which an additive universal δ cannot
imitate (the change it makes, about ``D · ∇x``, depends on each image's gradients).
:func:`fit_warp` fits ``φ`` with Adam (lr ``b/10``, projected on the box) for

    untargeted:  max_φ (1/n) Σ_i CE(f(warp(x_i, φ)), ŷ_i)      (ŷ_i = argmax f(x_i))
    targeted:    min_φ (1/n) Σ_i CE(f(warp(x_i, φ)), t),

and :func:`warp_share` says which class the warped images go to most and the share of the
images (not already predicted that class) that go there.  On the 8-epoch CIFAR-10 WaNet
models of docs/results.md a half-pixel untargeted warp (k = 4) sent 95-96 % of 1,000 clean
images to the target; on the clean model at most 18 % to any class (session 25).
``IBAUConfig(warp_epochs=...)`` unlearns that warp.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]


@functools.partial(jax.jit, static_argnums=(0,))
def _step(apply_fn: ApplyFn, variables: PyTree, delta: jax.Array, x: jax.Array,
          labels: jax.Array, sign: jax.Array, bound: jax.Array) -> jax.Array:
  """One normalised L2 PGD step on the mean CE against ``labels`` (``sign`` +1: ascent,
  −1: descent), projected on the ball of radius ``bound``."""

  def loss(d):
    logits = apply_fn(variables, x + d)
    picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)

  g = jax.grad(loss)(delta)
  delta = delta + sign * (bound / 5.0) * g / (jnp.linalg.norm(g) + 1e-12)
  return delta * jnp.minimum(1.0, bound / (jnp.linalg.norm(delta) + 1e-12))


@functools.partial(jax.jit, static_argnums=(0,))
def _predict_batch(apply_fn: ApplyFn, variables: PyTree, x: jax.Array) -> jax.Array:
  return jnp.argmax(apply_fn(variables, x), axis=-1)


def predict(apply_fn: ApplyFn, variables: PyTree, images, batch_size: int = 100) -> np.ndarray:
  """``argmax f(x)`` for every image (batches of ``batch_size``; the last may be shorter)."""
  images = jnp.asarray(images)
  return np.concatenate([np.asarray(_predict_batch(apply_fn, variables,
                                                   images[i:i + batch_size]))
                         for i in range(0, images.shape[0], batch_size)])


def universal_perturbation(apply_fn: ApplyFn, variables: PyTree, images, *, bound: float,
                           target: Optional[int] = None, epochs: int = 2,
                           batch_size: int = 100) -> jax.Array:
  """The universal δ (shape ``images.shape[1:]``, ``‖δ‖₂ ≤ bound``) of the module
  docstring: targeted towards ``target``, or untargeted against the model's own
  predictions when ``target`` is None.  Full batches only; ``images`` must hold at least
  one."""
  images = jnp.asarray(images, jnp.float32)
  n = images.shape[0]
  if n < batch_size:
    raise ValueError(f"the probe needs at least one batch of {batch_size} images, got {n}")
  if target is None:
    labels, sign = jnp.asarray(predict(apply_fn, variables, images, batch_size)), 1.0
  else:
    labels, sign = jnp.full((n,), target, jnp.int32), -1.0
  delta = jnp.zeros(images.shape[1:], jnp.float32)
  sign, bound_arr = jnp.asarray(sign, jnp.float32), jnp.asarray(bound, jnp.float32)
  for _ in range(epochs):
    for i in range(0, n - batch_size + 1, batch_size):
      delta = _step(apply_fn, variables, delta, images[i:i + batch_size],
                    labels[i:i + batch_size], sign, bound_arr)
  return delta


def _share_to(before: np.ndarray, after: np.ndarray, k: int) -> float:
  """Share of the images not predicted ``k`` before that are predicted ``k`` after."""
  eligible = before != k
  return float(np.mean(after[eligible] == k)) if eligible.any() else 0.0


def find_suspect(apply_fn: ApplyFn, variables: PyTree, images, *,
                 bounds: Sequence[float] = (1.0, 2.0, 4.0, 8.0), min_share: float = 0.5,
                 epochs: int = 2, batch_size: int = 100) -> Optional[dict]:
  """The suspected target class: ``{"target": k, "bound": C, "share": s}`` for the smallest
  radius ``C`` of ``bounds`` whose untargeted universal δ sends a share ``s ≥ min_share``
  of the images to one class ``k`` (see the module docstring); None if no radius does."""
  before = predict(apply_fn, variables, images, batch_size)
  for bound in sorted(bounds):
    delta = universal_perturbation(apply_fn, variables, images, bound=bound, epochs=epochs,
                                   batch_size=batch_size)
    after = predict(apply_fn, variables, jnp.asarray(images) + delta, batch_size)
    moved = after[after != before]
    if moved.size == 0:
      continue
    k = int(np.bincount(moved).argmax())
    share = _share_to(before, after, k)
    if share >= min_share:
      return dict(target=k, bound=float(bound), share=share)
  return None


def cut_stamp(delta, share: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
  """``(mask (H, W, 1), pattern (H, W, C))`` of the stamp cut out of ``delta`` (see the
  module docstring): the ``⌈share · H · W⌉`` locations of largest ``Σ_c δ²`` (ties: the
  first in row-major order), pattern ``1[δ > 0]``; both float32 in {0, 1}."""
  delta = np.asarray(delta, np.float32)
  if delta.ndim != 3:
    raise ValueError(f"delta must have shape (H, W, C), got {delta.shape}")
  if not 0.0 < share <= 1.0:
    raise ValueError(f"share must be in (0, 1], got {share!r}")
  energy = np.sum(np.square(delta), axis=-1).ravel()
  k = max(1, int(np.ceil(share * energy.size)))
  mask = np.zeros(energy.size, np.float32)
  mask[np.argsort(-energy, kind="stable")[:k]] = 1.0
  return mask.reshape(delta.shape[:2] + (1,)), (delta > 0).astype(np.float32)


def stamp_share(apply_fn: ApplyFn, variables: PyTree, images, mask, pattern,
                target: Optional[int] = None, batch_size: int = 100) -> tuple[int, float]:
  """``(t, s)``: the share ``s`` of ``images`` not predicted ``t`` before that the stamp
  ``(1 − mask) ⊙ x + mask ⊙ pattern`` sends to ``t``; ``t`` is ``target``, or when None
  the class the stamped images are predicted as most often."""
  return _paste_share(apply_fn, variables, images, mask, pattern, target, batch_size)


def _paste_share(apply_fn, variables, images, mask, pattern, target, batch_size):
  images = jnp.asarray(images, jnp.float32)
  before = predict(apply_fn, variables, images, batch_size)
  stamped = (1.0 - jnp.asarray(mask)) * images + jnp.asarray(mask) * jnp.asarray(pattern)
  after = predict(apply_fn, variables, stamped, batch_size)
  if target is None:
    target = int(np.bincount(after).argmax())
  return int(target), _share_to(before, after, target)


def targeted_success(apply_fn: ApplyFn, variables: PyTree, images, target: int, *,
                     bound: float, epochs: int = 2, batch_size: int = 100) -> float:
  """Share of ``images`` not predicted ``target`` that the targeted universal δ of radius
  ``bound`` sends to ``target``."""
  delta = universal_perturbation(apply_fn, variables, images, bound=bound, target=target,
                                 epochs=epochs, batch_size=batch_size)
  before = predict(apply_fn, variables, images, batch_size)
  after = predict(apply_fn, variables, jnp.asarray(images) + delta, batch_size)
  return _share_to(before, after, target)


def best_window(delta, size: int) -> tuple[int, int]:
  """Top-left corner ``(i, j)`` of the ``size × size`` window of pixel locations with the
  largest energy ``Σ_{window} Σ_c δ²`` (ties: the first in row-major order)."""
  delta = np.asarray(delta, np.float64)
  if delta.ndim != 3:
    raise ValueError(f"delta must have shape (H, W, C), got {delta.shape}")
  h, w = delta.shape[:2]
  if not 1 <= size <= min(h, w):
    raise ValueError(f"window size must be in [1, {min(h, w)}], got {size!r}")
  c = np.pad(np.cumsum(np.cumsum(np.sum(np.square(delta), axis=-1), 0), 1), ((1, 0), (1, 0)))
  sums = c[size:, size:] - c[:-size, size:] - c[size:, :-size] + c[:-size, :-size]
  i, j = np.unravel_index(int(np.argmax(sums)), sums.shape)
  return int(i), int(j)


def window_mask(shape, corner: tuple[int, int], size: int) -> np.ndarray:
  """``(H, W, 1)`` float32 mask, 1 on the ``size × size`` window at ``corner``."""
  mask = np.zeros(tuple(shape[:2]) + (1,), np.float32)
  mask[corner[0]:corner[0] + size, corner[1]:corner[1] + size] = 1.0
  return mask


def _adam_direction(g: jax.Array, moments: PyTree, count: jax.Array):
  """Adam's step direction (β = 0.9, 0.999, ε = 1e-8; multiply by the learning rate) for the
  gradient ``g``, with the updated ``moments`` and ``count``."""
  m, v = moments
  count = count + 1
  m = 0.9 * m + 0.1 * g
  v = 0.999 * v + 0.001 * g * g
  return (m / (1 - 0.9 ** count)) / (jnp.sqrt(v / (1 - 0.999 ** count)) + 1e-8), (m, v), count


@functools.partial(jax.jit, static_argnums=(0,))
def _window_step(apply_fn: ApplyFn, variables: PyTree, u: jax.Array, moments: PyTree,
                 count: jax.Array, x: jax.Array, mask: jax.Array, target: jax.Array):
  """One Adam (lr 0.1) step on ``u`` for ``mean CE(f((1 − m) ⊙ x + m ⊙ sigmoid(u)), t)``."""

  def loss(u):
    logits = apply_fn(variables, (1.0 - mask) * x + mask * jax.nn.sigmoid(u))
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, target])

  step, moments, count = _adam_direction(jax.grad(loss)(u), moments, count)
  return u - 0.1 * step, moments, count


def fit_window(apply_fn: ApplyFn, variables: PyTree, images, mask, target: int, *,
               init=None, steps: int = 150, batch_size: int = 100) -> np.ndarray:
  """Logits ``u`` of the pattern that, pasted into ``mask``, sends ``images`` to ``target``:
  ``steps`` Adam steps (lr 0.1) on ``mean CE(f((1 − m) ⊙ x + m ⊙ sigmoid(u)), target)``
  over consecutive batches of ``images`` (cycling), from ``init`` (default 0: mid-grey).
  Where the window holds a patch trigger this is the trigger as the model sees it; started
  from the pattern fitted on an earlier model (``init``), it follows what is left of it."""
  images = jnp.asarray(images, jnp.float32)
  n = images.shape[0]
  bsz = min(batch_size, n)
  u = (jnp.zeros(images.shape[1:], jnp.float32) if init is None
       else jnp.asarray(init, jnp.float32))
  moments = (jnp.zeros_like(u), jnp.zeros_like(u))
  count = jnp.zeros((), jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  target = jnp.asarray(target, jnp.int32)
  starts = list(range(0, n - bsz + 1, bsz))
  for s in range(steps):
    i = starts[s % len(starts)]
    u, moments, count = _window_step(apply_fn, variables, u, moments, count,
                                     images[i:i + bsz], mask, target)
  return np.asarray(u)


def window_share(apply_fn: ApplyFn, variables: PyTree, images, mask, logits, target: int,
                 batch_size: int = 100) -> float:
  """Share of ``images`` not predicted ``target`` that the pattern ``sigmoid(logits)``
  pasted into ``mask`` (:func:`fit_window`) sends to ``target``."""
  pattern = jax.nn.sigmoid(jnp.asarray(logits, jnp.float32))
  return _paste_share(apply_fn, variables, images, mask, pattern, target, batch_size)[1]


# --------------------------------------------------------------------------------------
# Universal warps
# --------------------------------------------------------------------------------------


def warp(images, phi) -> jax.Array:
  """``images`` ``(N, H, W, C)`` warped by the control displacements ``phi`` ``(k, k, 2)``
  (pixels; channel 0 moves rows, channel 1 columns), upsampled bicubically
  (``align_corners``) to the image size; bilinear samples, border pixels repeated, clipped to
  [0, 1].  ``phi = 0`` is the identity."""
  from ibau_jax.attacks.wanet import _bilinear, _resize_matrix
  images = jnp.asarray(images)
  phi = jnp.asarray(phi, jnp.float32)
  if images.ndim != 4 or phi.ndim != 3 or phi.shape[-1] != 2:
    raise ValueError(f"warp: images must be (N, H, W, C) and phi (k, k, 2), got "
                     f"{images.shape} and {phi.shape}")
  h, w = images.shape[1:3]
  rows = jnp.asarray(_resize_matrix(phi.shape[0], h, "bicubic"), jnp.float32)
  cols = jnp.asarray(_resize_matrix(phi.shape[1], w, "bicubic"), jnp.float32)
  field = jnp.einsum("hk,kld,wl->hwd", rows, phi, cols)
  r, c = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                      indexing="ij")
  return jnp.clip(_bilinear(images, r + field[..., 0], c + field[..., 1]), 0.0, 1.0)


@functools.partial(jax.jit, static_argnums=(0,))
def _warp_step(apply_fn: ApplyFn, variables: PyTree, phi: jax.Array, moments: PyTree,
               count: jax.Array, x: jax.Array, y: jax.Array, sign: jax.Array,
               bound: jax.Array):
  """One projected Adam step (lr ``bound / 10``) on ``sign · mean CE(f(warp(x, φ)), y)``."""

  def loss(phi):
    logits = apply_fn(variables, warp(x, phi))
    ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0]
    return sign * jnp.mean(ce)

  step, moments, count = _adam_direction(jax.grad(loss)(phi), moments, count)
  return jnp.clip(phi - 0.1 * bound * step, -bound, bound), moments, count


def fit_warp(apply_fn: ApplyFn, variables: PyTree, images, *, bound: float, grid: int = 4,
             target: Optional[int] = None, init=None, steps: int = 60,
             batch_size: int = 100) -> np.ndarray:
  """Control displacements ``φ`` ``(grid, grid, 2)``, each in ``[−bound, bound]`` pixels, of a
  universal warp of ``images`` (see the module docstring): untargeted (``target=None``: away
  from the model's own predictions) or towards ``target``.  ``steps`` projected Adam steps
  over consecutive batches (cycling), from ``init`` (default 0: the identity)."""
  images = jnp.asarray(images, jnp.float32)
  n = images.shape[0]
  bsz = min(batch_size, n)
  if not (np.isfinite(bound) and bound > 0) or grid < 2 or steps < 1:
    raise ValueError(f"fit_warp: needs bound > 0, grid >= 2 and steps >= 1, got {bound}, "
                     f"{grid} and {steps}")
  phi = (jnp.zeros((grid, grid, 2), jnp.float32) if init is None
         else jnp.asarray(init, jnp.float32))
  if target is None:
    labels, sign = jnp.asarray(predict(apply_fn, variables, images, bsz)), -1.0
  else:
    labels, sign = jnp.full((n,), target, jnp.int32), 1.0
  moments = (jnp.zeros_like(phi), jnp.zeros_like(phi))
  count = jnp.zeros((), jnp.float32)
  sign, bound_ = jnp.asarray(sign, jnp.float32), jnp.asarray(bound, jnp.float32)
  starts = list(range(0, n - bsz + 1, bsz))
  for s in range(steps):
    i = starts[s % len(starts)]
    phi, moments, count = _warp_step(apply_fn, variables, phi, moments, count,
                                     images[i:i + bsz], labels[i:i + bsz], sign, bound_)
  return np.asarray(phi)


@functools.partial(jax.jit, static_argnums=(0,))
def _warped_predictions(apply_fn: ApplyFn, variables: PyTree, x: jax.Array, phi: jax.Array):
  return jnp.argmax(apply_fn(variables, warp(x, phi)), axis=-1)


def warp_share(apply_fn: ApplyFn, variables: PyTree, images, phi, target: Optional[int] = None,
               batch_size: int = 100) -> tuple[int, float]:
  """``(k, share)``: the class ``k`` the warp ``phi`` sends most of ``images`` to among those
  not already predicted ``k`` (``target``: that class), and the share of them it sends
  there."""
  images = np.asarray(images, np.float32)
  before = predict(apply_fn, variables, images, batch_size)
  phi = jnp.asarray(phi, jnp.float32)
  after = np.concatenate([
      np.asarray(_warped_predictions(apply_fn, variables, jnp.asarray(images[i:i + batch_size]),
                                     phi))
      for i in range(0, images.shape[0], batch_size)])
  if target is None:
    shares = [_share_to(before, after, k) for k in np.unique(after)]
    k = int(np.unique(after)[int(np.argmax(shares))])
  else:
    k = int(target)
  return k, _share_to(before, after, k)
