"""The "l0_inv" trigger of the I-BAU paper: a sparse mask-and-pattern blend.

``apply(x) = clip(x * (1 - mask) + pattern, 0, 1)``, with ``mask`` and ``pattern``
``(H, W, C)`` arrays (or shapes broadcastable to the image's ``(H, W, C)``).  The
trigger comes from Li et al.'s invisible backdoors ("Invisible backdoor attacks on
deep neural networks via steganography and regularization", TDSC 2021), whose
L0-regularised trigger changes few pixels; the I-BAU paper (Zeng et al., ICLR
2022) uses it with target 0 and poison ratio 0.2.  The released trigger
(``mask.npy``, ``l0_inv.png``) has mask 1 on row 31, columns 23..31 and a coloured
pattern on row 31, columns 24..31; :func:`from_files` reads those files
(``mask.npy`` is stored channels first, ``3 x 32 x 32``, and is transposed; the PNG
is divided by 255).

Without ``mask`` and ``pattern`` the attack uses a fixed sparse stand-in (the
optimised trigger needs a model): ``num_pixels = 9`` pixel positions drawn from
``seed`` get mask 1 (all channels) and a pattern uniform in [0, 1] (per channel),
generated at the image size the first time ``apply`` sees it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp
import numpy as np

from ibau_jax.attacks.base import (Attack, PathLike, as_hwc, check_batch, check_int,
                                   frozen, read_array, seeded_rng)


@functools.lru_cache(maxsize=16)
def sparse_trigger(seed: int, num_pixels: int, height: int, width: int,
                   channels: int) -> tuple[np.ndarray, np.ndarray]:
  """Default ``(mask, pattern)``: ``num_pixels`` seeded pixels, uniform pattern."""
  if num_pixels > height * width:
    raise ValueError(f"l0_inv: num_pixels={num_pixels} exceeds the {height}x{width} "
                     "pixels of the images")
  rng = seeded_rng("l0_inv", seed, height, width, channels)
  where = rng.choice(height * width, size=num_pixels, replace=False)
  mask = np.zeros((height * width, channels), np.float32)
  mask[where] = 1.0
  pattern = mask * rng.uniform(0.0, 1.0, (height * width, channels))
  shape = (height, width, channels)
  return frozen(mask.reshape(shape)), frozen(pattern.reshape(shape))


@dataclasses.dataclass(frozen=True, eq=False)
class L0Inv(Attack):
  """Mask-and-pattern trigger ``clip(x * (1 - mask) + pattern, 0, 1)``.

  Attributes:
    target: target class (label policy fields: see :class:`Attack`).
    mask: ``(H, W, C)`` blend mask in [0, 1] (1 = replaced by the pattern);
      ``None`` together with ``pattern``: the seeded sparse default.
    pattern: ``(H, W, C)`` additive pattern in [0, 1].
    seed: seed of the default trigger.
    num_pixels: number of pixels of the default trigger (9).
  """

  name = "l0_inv"

  mask: Any = dataclasses.field(default=None, repr=False)
  pattern: Any = dataclasses.field(default=None, repr=False)
  seed: int = 0
  num_pixels: int = 9

  def __post_init__(self) -> None:
    super().__post_init__()
    object.__setattr__(self, "seed", check_int(self.seed, "l0_inv", "seed",
                                               minimum=0))
    object.__setattr__(self, "num_pixels", check_int(self.num_pixels, "l0_inv",
                                                     "num_pixels", minimum=1))
    if (self.mask is None) != (self.pattern is None):
      raise ValueError("l0_inv: give both mask and pattern, or neither (for the "
                       "seeded default; see ibau_jax.attacks.l0_inv.from_files)")
    if self.mask is None:
      return
    mask = as_hwc(self.mask, "l0_inv", "mask")
    pattern = as_hwc(self.pattern, "l0_inv", "pattern")
    try:
      np.broadcast_shapes(mask.shape, pattern.shape)
    except ValueError:
      raise ValueError(f"l0_inv: mask shape {mask.shape} and pattern shape "
                       f"{pattern.shape} do not broadcast") from None
    for name, a in (("mask", mask), ("pattern", pattern)):
      if a.min() < 0 or a.max() > 1:
        raise ValueError(f"l0_inv: {name} values must be in [0, 1], got range "
                         f"[{a.min()}, {a.max()}]")
    object.__setattr__(self, "mask", mask)
    object.__setattr__(self, "pattern", pattern)

  def trigger(self, height: int, width: int, channels: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, pattern)`` used on images of shape ``(height, width, channels)``."""
    if self.mask is None:
      return sparse_trigger(self.seed, self.num_pixels, height, width, channels)
    hwc = (height, width, channels)
    for name, a in (("mask", self.mask), ("pattern", self.pattern)):
      try:
        ok = np.broadcast_shapes(a.shape, hwc) == hwc
      except ValueError:
        ok = False
      if not ok:
        raise ValueError(f"l0_inv: {name} shape {a.shape} does not fit images of "
                         f"shape (H, W, C) = {hwc}")
    return self.mask, self.pattern

  def apply(self, images: jnp.ndarray) -> jnp.ndarray:
    images = check_batch(images, "l0_inv")
    mask, pattern = self.trigger(*images.shape[1:])
    mask = jnp.asarray(mask, images.dtype)
    pattern = jnp.asarray(pattern, images.dtype)
    return jnp.clip(images * (1 - mask) + pattern, 0.0, 1.0)


def from_files(mask_path: PathLike, pattern_path: PathLike, *, target: int = 0,
               **policy: Any) -> L0Inv:
  """:class:`L0Inv` from the released ``mask.npy`` and ``l0_inv.png``.

  ``mask_path``: ``.npy`` array, channels first ``(C, H, W)`` (transposed) or
  channels last.  ``pattern_path``: an image (read as RGB and divided by 255) or a
  ``.npy`` array with values already in [0, 1].  ``policy``: ``mode``,
  ``num_classes``, ``clean_label`` (see :class:`Attack`).
  """
  return L0Inv(target=target, mask=read_array(mask_path, "l0_inv", "mask"),
               pattern=read_array(pattern_path, "l0_inv", "pattern"), **policy)
