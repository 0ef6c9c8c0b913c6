"""WaNet (Nguyen & Tran, "WaNet -- imperceptible warping-based backdoor attack",
ICLR 2021): the trigger is a fixed, smooth geometric warp of the image.

With ``k = 4`` (control grid size) and ``s = 0.5`` (warping strength), as in the
paper's CIFAR-10 setting:

1. ``P``: a ``k x k x 2`` flow drawn uniformly from [-1, 1] (here from ``seed``),
   normalised by its mean absolute value, ``P <- P / mean(|P|)``;
2. ``F = upsample(P)`` to ``H x W x 2``, bicubic (PyTorch's kernel, ``A = -0.75``)
   or bilinear, with ``align_corners=True``;
3. the sampling grid ``M = clip(I + s * F / H, -1, 1)`` where ``I`` is the
   identity grid (``I[i, j] = (x_j, y_i)``, ``x_j = -1 + 2 j / (W - 1)``, likewise
   ``y_i``; channel 0 is the column, channel 1 the row, as in PyTorch);
4. ``apply(x) = grid_sample(x, M)``: bilinear sampling with ``align_corners=True``
   (normalised coordinate ``u`` maps to pixel ``(u + 1) / 2 * (W - 1)``) and
   border clamping, which is what PyTorch's ``F.grid_sample`` computes on a grid
   clipped to [-1, 1].

Noise mode (the paper's "cross" samples, ``cross_ratio = 2`` times as many as the
backdoor samples, which are poisoned at ``rho_a = 0.1``): :meth:`WaNet.apply_noise`
warps with ``clip(M + U(-1, 1)^{H x W x 2} / H, -1, 1)``, a fresh random grid per
image from ``key``; those images keep their TRUE labels, which teaches the model
to answer to the exact warp only.

``s = 0`` gives exactly the identity (the sampling positions are computed in
float64 and fall on pixel centres).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ibau_jax import _prng
from ibau_jax.attacks.base import (Attack, check_batch, check_float, check_int,
                                   frozen, seeded_rng)

UPSAMPLING = ("bicubic", "bilinear")


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """PyTorch's cubic-convolution weights of the 4 taps at offsets -1, 0, 1, 2."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _resize_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
  """``(n_out, n_in)`` interpolation matrix, ``align_corners=True``, clamped taps."""
  if n_out == 1 or n_in == 1:
    m = np.zeros((n_out, n_in))
    m[:, 0] = 1.0
    return m
  pos = np.arange(n_out) * (n_in - 1) / (n_out - 1)
  base = np.floor(pos).astype(int)
  t = pos - base
  m = np.zeros((n_out, n_in))
  rows = np.arange(n_out)
  if method == "bilinear":
    taps, weights = (0, 1), np.stack([1 - t, t], axis=-1)
  else:
    taps, weights = (-1, 0, 1, 2), _cubic_weights(t)
  for k, offset in enumerate(taps):
    np.add.at(m, (rows, np.clip(base + offset, 0, n_in - 1)), weights[:, k])
  return m


def upsample(field: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
  """``(k, k, 2)`` field resized to ``(height, width, 2)`` (align_corners=True)."""
  rows = _resize_matrix(field.shape[0], height, method)
  cols = _resize_matrix(field.shape[1], width, method)
  return np.einsum("hk,kld,wl->hwd", rows, field, cols)


def identity_grid(height: int, width: int) -> np.ndarray:
  """``(H, W, 2)`` identity grid in normalised coordinates (x = column first)."""
  y = np.linspace(-1.0, 1.0, height)
  x = np.linspace(-1.0, 1.0, width)
  return np.stack(np.meshgrid(x, y, indexing="xy"), axis=-1)


@functools.lru_cache(maxsize=16)
def warp_grid(seed: int, k: int, strength: float, method: str, height: int,
              width: int) -> np.ndarray:
  """``M = clip(I + s * upsample(P) / H, -1, 1)``, float64 ``(H, W, 2)``."""
  rng = seeded_rng("wanet", seed, k)
  flow = rng.uniform(-1.0, 1.0, (k, k, 2))
  flow = flow / np.mean(np.abs(flow))
  grid = identity_grid(height, width) + strength * upsample(flow, height, width,
                                                            method) / height
  grid = np.clip(grid, -1.0, 1.0)
  grid.setflags(write=False)
  return grid


def _to_pixels(grid: Any, height: int, width: int) -> tuple[Any, Any]:
  """Pixel coordinates ``(row, col)`` of a normalised grid (align_corners=True)."""
  col = (grid[..., 0] + 1) * 0.5 * (width - 1)
  row = (grid[..., 1] + 1) * 0.5 * (height - 1)
  return row, col


def _bilinear(images: jnp.ndarray, row: jnp.ndarray, col: jnp.ndarray
              ) -> jnp.ndarray:
  """Bilinear samples of ``images`` ``(N, H, W, C)`` at pixel coordinates.

  ``row``/``col``: ``(Ho, Wo)`` (shared by all images) or ``(N, Ho, Wo)``;
  coordinates are clamped to the image (border padding).  Computed in float32 and
  cast back to the images' dtype.
  """
  n, h, w, _ = images.shape
  row = jnp.clip(jnp.asarray(row, jnp.float32), 0.0, h - 1)
  col = jnp.clip(jnp.asarray(col, jnp.float32), 0.0, w - 1)
  r0 = jnp.floor(row)
  c0 = jnp.floor(col)
  wr = (row - r0)[..., None]
  wc = (col - c0)[..., None]
  r0 = r0.astype(jnp.int32)
  c0 = c0.astype(jnp.int32)
  r1 = jnp.minimum(r0 + 1, h - 1)
  c1 = jnp.minimum(c0 + 1, w - 1)
  x = images.astype(jnp.float32)
  if row.ndim == 2:
    def get(r, c):
      return x[:, r, c, :]
  else:
    b = jnp.arange(n)[:, None, None]

    def get(r, c):
      return x[b, r, c, :]
  out = ((1 - wr) * ((1 - wc) * get(r0, c0) + wc * get(r0, c1))
         + wr * ((1 - wc) * get(r1, c0) + wc * get(r1, c1)))
  return out.astype(images.dtype)


def grid_sample(images: Any, grid: Any) -> jnp.ndarray:
  """PyTorch's ``F.grid_sample(x, grid, mode="bilinear", padding_mode="border",
  align_corners=True)`` on NHWC images.

  Args:
    images: float ``(N, H, W, C)``, any values (not range-checked); a batch that
      looks channels first is rejected (:func:`~ibau_jax.attacks.base.check_batch`).
    grid: ``(Ho, Wo, 2)`` (one grid for all images) or ``(N, Ho, Wo, 2)``, in
      normalised coordinates: channel 0 is the column ``u`` (pixel
      ``(u + 1) / 2 * (W - 1)``), channel 1 the row.

  Returns:
    ``(N, Ho, Wo, C)`` samples, the images' dtype.
  """
  images = check_batch(images, "grid_sample", unit_range=False)
  grid = jnp.asarray(grid)
  if grid.ndim not in (3, 4) or grid.shape[-1] != 2 or (
      grid.ndim == 4 and grid.shape[0] != images.shape[0]):
    raise ValueError(f"grid_sample: grid must be (Ho, Wo, 2) or (N, Ho, Wo, 2) with "
                     f"N = {images.shape[0]}, got shape {grid.shape}")
  row, col = _to_pixels(grid.astype(jnp.float32), images.shape[1], images.shape[2])
  return _bilinear(images, row, col)


@dataclasses.dataclass(frozen=True, eq=False)
class WaNet(Attack):
  """Warping trigger ``grid_sample(x, clip(I + s * upsample(P) / H, -1, 1))``.

  Attributes:
    target: target class (label policy fields: see :class:`Attack`).
    k: control-grid size (4).
    strength: warping strength ``s`` (0.5); 0 is the identity.
    upsampling: ``"bicubic"`` (the paper's code) or ``"bilinear"``.
    seed: seed of the flow ``P``.
    cross_ratio: noise-mode images per backdoor image when a data set is poisoned
      (the paper's 2; the experiments pass ``cross_ratio * ratio`` as ``poison``'s
      ``noise_ratio``).
  """

  name = "wanet"

  k: int = 4
  strength: float = 0.5
  upsampling: str = "bicubic"
  seed: int = 0
  cross_ratio: float = 2.0

  def __post_init__(self) -> None:
    super().__post_init__()
    object.__setattr__(self, "k", check_int(self.k, "wanet", "k", minimum=1))
    object.__setattr__(self, "strength", check_float(self.strength, "wanet",
                                                     "strength", low=0.0))
    if self.upsampling not in UPSAMPLING:
      raise ValueError(f"wanet: upsampling must be one of {UPSAMPLING}, got "
                       f"{self.upsampling!r}")
    object.__setattr__(self, "seed", check_int(self.seed, "wanet", "seed",
                                               minimum=0))
    object.__setattr__(self, "cross_ratio", check_float(self.cross_ratio, "wanet",
                                                        "cross_ratio", low=0.0))

  def grid(self, height: int, width: int) -> np.ndarray:
    """The warping grid ``M``, ``(H, W, 2)`` float64 normalised coordinates."""
    if height < 2 or width < 2:
      raise ValueError(f"wanet: images must be at least 2x2, got {height}x{width}")
    return warp_grid(self.seed, self.k, self.strength, self.upsampling, height,
                     width)

  def apply(self, images: jnp.ndarray) -> jnp.ndarray:
    images = check_batch(images, "wanet")
    h, w = images.shape[1], images.shape[2]
    row, col = _to_pixels(self.grid(h, w), h, w)
    # float64 positions: on the identity grid they are whole numbers, so s = 0
    # samples each pixel with weight exactly 1.
    row = frozen(np.where(np.abs(row - np.round(row)) < 1e-9, np.round(row), row))
    col = frozen(np.where(np.abs(col - np.round(col)) < 1e-9, np.round(col), col))
    return jnp.clip(_bilinear(images, row, col), 0.0, 1.0)

  def apply_noise(self, images: jnp.ndarray, key: jax.Array) -> jnp.ndarray:
    """Noise-mode warp: ``grid_sample(x, clip(M + U(-1, 1) / H, -1, 1))`` with an
    independent uniform perturbation of the grid per image, drawn from ``key``.

    Poisoning with these images keeps their true labels.  Same ``key``, same output.
    """
    images = check_batch(images, "wanet")
    n, h, w = images.shape[:3]
    grid = jnp.asarray(self.grid(h, w), jnp.float32)
    noise = _prng.uniform(key, (n, h, w, 2), jnp.float32, -1.0, 1.0)
    grid = jnp.clip(grid[None] + noise / h, -1.0, 1.0)
    return jnp.clip(grid_sample(images, grid), 0.0, 1.0)
