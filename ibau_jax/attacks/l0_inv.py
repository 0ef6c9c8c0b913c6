"""The "l0_inv" trigger of the I-BAU paper: a sparse mask-and-pattern blend.

``apply(x) = clip(x * (1 - mask) + pattern, 0, 1)``, with ``mask`` and ``pattern``
``(H, W, C)`` arrays (or shapes broadcastable to the image's ``(H, W, C)``).  The
released trigger (``mask.npy``, ``l0_inv.png``) has mask 1 on row 31, columns
23..31 and a coloured pattern on row 31, columns 24..31; :func:`from_files` reads
those files (``mask.npy`` is stored channels first, ``3 x 32 x 32``, and is
transposed; the PNG is divided by 255).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Union

import jax.numpy as jnp
import numpy as np

from ibau_jax.attacks.base import Attack, check_batch

PathLike = Union[str, os.PathLike]


def _as_hwc(array: np.ndarray, name: str) -> np.ndarray:
  """``(H, W, C)`` float32 from an ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` array."""
  array = np.asarray(array, dtype=np.float32)
  if array.ndim == 2:
    return array[:, :, None]
  if array.ndim != 3:
    raise ValueError(f"l0_inv: {name} must be 2-D or 3-D, got shape {array.shape}")
  if array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
    return np.transpose(array, (1, 2, 0))  # channels first -> last
  return array


@dataclasses.dataclass(frozen=True, eq=False)
class L0Inv(Attack):
  """Mask-and-pattern trigger ``clip(x * (1 - mask) + pattern, 0, 1)``.

  Attributes:
    target: target class.
    mask: ``(H, W, C)`` blend mask in [0, 1] (1 = replaced by the pattern).
    pattern: ``(H, W, C)`` additive pattern in [0, 1].
  """

  name = "l0_inv"

  mask: Any = dataclasses.field(default=None, repr=False)
  pattern: Any = dataclasses.field(default=None, repr=False)

  def __post_init__(self) -> None:
    super().__post_init__()
    if self.mask is None or self.pattern is None:
      raise ValueError("l0_inv: mask and pattern are required (see "
                       "ibau_jax.attacks.l0_inv.from_files)")
    mask = _as_hwc(self.mask, "mask")
    pattern = _as_hwc(self.pattern, "pattern")
    try:
      np.broadcast_shapes(mask.shape, pattern.shape)
    except ValueError:
      raise ValueError(f"l0_inv: mask shape {mask.shape} and pattern shape "
                       f"{pattern.shape} do not broadcast") from None
    for name, a in (("mask", mask), ("pattern", pattern)):
      if not np.all(np.isfinite(a)) or a.min() < 0 or a.max() > 1:
        raise ValueError(f"l0_inv: {name} values must be in [0, 1], got range "
                         f"[{a.min()}, {a.max()}]")
    mask.setflags(write=False)
    pattern.setflags(write=False)
    object.__setattr__(self, "mask", mask)
    object.__setattr__(self, "pattern", pattern)

  def apply(self, images: jnp.ndarray) -> jnp.ndarray:
    images = check_batch(images, "l0_inv")
    hwc = tuple(images.shape[1:])
    for name, a in (("mask", self.mask), ("pattern", self.pattern)):
      try:
        ok = np.broadcast_shapes(a.shape, hwc) == hwc
      except ValueError:
        ok = False
      if not ok:
        raise ValueError(f"l0_inv: {name} shape {a.shape} does not fit images of "
                         f"shape (H, W, C) = {hwc}")
    mask = jnp.asarray(self.mask, images.dtype)
    pattern = jnp.asarray(self.pattern, images.dtype)
    return jnp.clip(images * (1 - mask) + pattern, 0.0, 1.0)


def _read_array(path: PathLike, name: str) -> np.ndarray:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"l0_inv: {name} file not found: {path!r}")
  if path.lower().endswith(".npy"):
    return np.load(path, allow_pickle=False).astype(np.float32)
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def from_files(mask_path: PathLike, pattern_path: PathLike, *,
               target: int = 0) -> L0Inv:
  """:class:`L0Inv` from the released ``mask.npy`` and ``l0_inv.png``.

  ``mask_path``: ``.npy`` array, channels first ``(C, H, W)`` (transposed) or
  channels last.  ``pattern_path``: an image (read as RGB and divided by 255) or a
  ``.npy`` array with values already in [0, 1].
  """
  return L0Inv(target=target, mask=_read_array(mask_path, "mask"),
               pattern=_read_array(pattern_path, "pattern"))
