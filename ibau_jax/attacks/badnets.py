"""BadNets (Gu, Dolan-Gavitt & Garg, 2017): a small patch stamped on the image.

``apply(x) = clip(x')`` where ``x'`` equals ``x`` except on the patch
``x'[:, row:row+size, col:col+size, :] = P`` (all channels), with

* ``pattern="square"`` (default): ``P = value`` everywhere.  The defaults
  (``row = col = 27``, ``size = 4``, ``value = 1``) are the I-BAU trigger (Zeng et
  al., ICLR 2022, ``poi_util.py``): a white 4x4 square one pixel in from the
  bottom-right corner of a 32x32 image (``x[:, 27:31, 27:31, :] = 1``), so images
  must be at least ``row + size = 31`` pixels high and ``col + size`` wide;
* ``pattern="checkerboard"``: ``P[i, j] = 1`` if ``i + j`` is even else ``0`` (white
  top-left cell), a ``size = 3`` black-and-white 3x3 checkerboard whose default
  position is the bottom-right corner of the image (``row = H - size``,
  ``col = W - size``): Gu et al.'s "pattern" backdoor is a small black-and-white
  pattern near the bottom-right corner, and this 3x3 checkerboard form is the one
  later CIFAR-10 work uses (e.g. Turner et al.'s label-consistent attacks).

Gu et al. poison with dirty labels (all-to-one: every poisoned image is labelled
``target``; all-to-all: ``y -> (y + 1) mod C``); the I-BAU models use target 8 and
poison ratio 0.2.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
import numpy as np

from ibau_jax.attacks.base import Attack, check_batch, check_float, check_int

PATTERNS = ("square", "checkerboard")


@dataclasses.dataclass(frozen=True, eq=False)
class BadNets(Attack):
  """Patch trigger: a solid square or a black/white checkerboard.

  Attributes:
    target: target class (label policy fields: see :class:`Attack`).
    size: side of the patch in pixels; ``None``: 4 (square) or 3 (checkerboard).
    row: top row of the patch; ``None``: 27 (square) or ``H - size``
      (checkerboard, bottom edge).
    col: left column of the patch; ``None``: 27 (square) or ``W - size``
      (checkerboard, right edge).
    value: pixel value of the square (all channels), in [0, 1]; the checkerboard
      is always 1/0 and requires the default ``value = 1``.
    pattern: ``"square"`` or ``"checkerboard"``.
  """

  name = "badnets"

  size: Optional[int] = None
  row: Optional[int] = None
  col: Optional[int] = None
  value: float = 1.0
  pattern: str = "square"

  def __post_init__(self) -> None:
    super().__post_init__()
    if self.pattern not in PATTERNS:
      raise ValueError(f"badnets: pattern must be one of {PATTERNS}, got "
                       f"{self.pattern!r}")
    square = self.pattern == "square"
    if self.size is None:
      object.__setattr__(self, "size", 4 if square else 3)
    object.__setattr__(self, "size", check_int(self.size, "badnets", "size",
                                               minimum=1))
    for field in ("row", "col"):
      v = getattr(self, field)
      if v is None and square:
        v = 27
      if v is not None:
        v = check_int(v, "badnets", field, minimum=0)
      object.__setattr__(self, field, v)
    value = check_float(self.value, "badnets", "value", low=0.0, high=1.0)
    if not square and value != 1.0:
      raise ValueError("badnets: value applies to the square pattern only (the "
                       f"checkerboard is 1/0), got value={value}")
    object.__setattr__(self, "value", value)

  def position(self, height: int, width: int) -> tuple[int, int]:
    """Top-left ``(row, col)`` of the patch on ``height x width`` images."""
    row = height - self.size if self.row is None else self.row
    col = width - self.size if self.col is None else self.col
    return row, col

  def patch(self) -> np.ndarray:
    """The ``(size, size)`` patch values ``P``."""
    if self.pattern == "square":
      return np.full((self.size, self.size), self.value, np.float32)
    i, j = np.indices((self.size, self.size))
    return ((i + j) % 2 == 0).astype(np.float32)

  def apply(self, images: jnp.ndarray) -> jnp.ndarray:
    images = check_batch(images, "badnets")
    h, w = images.shape[1], images.shape[2]
    r, c = self.position(h, w)
    s = self.size
    if r < 0 or c < 0 or h < r + s or w < c + s:
      raise ValueError(f"badnets: a {s}x{s} patch at ({r}, {c}) needs images of at "
                       f"least {max(r, 0) + s}x{max(c, 0) + s} pixels, got {h}x{w}")
    patch = jnp.asarray(self.patch(), images.dtype)[None, :, :, None]
    out = images.at[:, r:r + s, c:c + s, :].set(
        jnp.broadcast_to(patch, (images.shape[0], s, s, images.shape[3])))
    return jnp.clip(out, 0.0, 1.0)
