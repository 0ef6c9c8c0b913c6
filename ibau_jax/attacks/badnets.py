"""BadNets (Gu et al., 2017): a solid square patch.

``apply(x) = clip(x')`` where ``x'`` equals ``x`` except
``x'[:, row:row+size, col:col+size, :] = value``.  The defaults (``row = col = 27``,
``size = 4``, ``value = 1``) are the I-BAU trigger: a white 4x4 square one pixel in
from the bottom-right corner of a 32x32 image (``x[:, 27:31, 27:31, :] = 1``), so
images must be at least ``row + size = 31`` pixels high and ``col + size`` wide.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ibau_jax.attacks.base import Attack, check_batch


@dataclasses.dataclass(frozen=True, eq=False)
class BadNets(Attack):
  """White-square patch trigger.

  Attributes:
    target: target class.
    size: side of the square patch, in pixels.
    row: top row of the patch.
    col: left column of the patch.
    value: pixel value written into the patch (all channels), in [0, 1].
  """

  name = "badnets"

  size: int = 4
  row: int = 27
  col: int = 27
  value: float = 1.0

  def __post_init__(self) -> None:
    super().__post_init__()
    for field in ("size", "row", "col"):
      v = getattr(self, field)
      if isinstance(v, bool) or int(v) != v:
        raise ValueError(f"badnets: {field} must be an integer, got {v!r}")
      object.__setattr__(self, field, int(v))
    if self.size < 1:
      raise ValueError(f"badnets: size must be >= 1, got {self.size}")
    if self.row < 0 or self.col < 0:
      raise ValueError(f"badnets: row and col must be >= 0, got ({self.row}, "
                       f"{self.col})")
    if not 0.0 <= float(self.value) <= 1.0:
      raise ValueError(f"badnets: value must be in [0, 1], got {self.value}")
    object.__setattr__(self, "value", float(self.value))

  def apply(self, images: jnp.ndarray) -> jnp.ndarray:
    images = check_batch(images, "badnets")
    h, w = images.shape[1], images.shape[2]
    if h < self.row + self.size or w < self.col + self.size:
      raise ValueError(f"badnets: a {self.size}x{self.size} patch at ({self.row}, "
                       f"{self.col}) needs images of at least "
                       f"{self.row + self.size}x{self.col + self.size} pixels, got "
                       f"{h}x{w}")
    r, c, s = self.row, self.col, self.size
    out = images.at[:, r:r + s, c:c + s, :].set(jnp.asarray(self.value, images.dtype))
    return jnp.clip(out, 0.0, 1.0)
