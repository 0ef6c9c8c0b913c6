"""The "l2_inv" trigger of the I-BAU paper: an additive full-image pattern of small
L2 norm.

``apply(x) = clip(x + p, 0, 1)`` with ``p`` an ``(H, W, C)`` pattern over the whole
image.  The trigger comes from Li et al.'s invisible backdoors ("Invisible backdoor
attacks on deep neural networks via steganography and regularization", TDSC
2021), whose L2-regularised trigger is spread thinly over every pixel.  In the I-BAU
paper (Zeng et al., ICLR 2022) this trigger has ``||p||_2 = 3.2`` (on [0, 1] pixels
of a 32x32x3 image), target 0 and poison ratio 0.2, and its code applies the
released ``l2_inv.png`` as ``clip(x + png / 255, 0, 1)``.

* Default (the optimised trigger needs a model): ``p = norm * g / ||g||_2`` with
  ``g`` standard normal noise of shape ``(H, W, C)`` from ``seed``, so
  ``||p||_2 = norm = 3.2`` exactly (up to float32 rounding) before clipping.
* A given ``pattern`` (or :func:`from_file`) is rescaled to ``||p||_2 = norm``, or
  used as it is when ``norm=None`` (the default of :func:`from_file`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import numpy as np

from ibau_jax.attacks.base import (AdditiveAttack, PathLike, as_hwc,
                                   check_float, check_int, fit_pattern, frozen,
                                   read_array, seeded_rng)


def scale_to_l2(pattern: np.ndarray, norm: float) -> np.ndarray:
  """``pattern * norm / ||pattern||_2`` (computed in float64)."""
  pattern = np.asarray(pattern, np.float64)
  length = np.sqrt(np.sum(pattern ** 2))
  if length == 0:
    raise ValueError("l2_inv: cannot scale an all-zero pattern to an L2 norm")
  return pattern * (norm / length)


@functools.lru_cache(maxsize=16)
def gaussian_pattern(seed: int, norm: float, height: int, width: int,
                     channels: int) -> np.ndarray:
  """Default pattern: seeded standard normal noise scaled to ``||p||_2 = norm``."""
  rng = seeded_rng("l2_inv", seed, height, width, channels)
  g = rng.standard_normal((height, width, channels))
  return frozen(scale_to_l2(g, norm))


@dataclasses.dataclass(frozen=True, eq=False)
class L2Inv(AdditiveAttack):
  """Additive full-image trigger ``clip(x + p, 0, 1)`` with ``||p||_2 = norm``.

  Attributes:
    target: target class (label policy fields: see :class:`Attack`).
    pattern: optional ``(H, W, C)`` pattern (any sign) of the images' size.
    norm: L2 norm of ``p`` (3.2); ``None``: a given pattern is used unscaled
      (the default pattern needs a norm).
    seed: seed of the default pattern.
  """

  name = "l2_inv"

  pattern: Any = dataclasses.field(default=None, repr=False)
  norm: Optional[float] = 3.2
  seed: int = 0

  def __post_init__(self) -> None:
    super().__post_init__()
    object.__setattr__(self, "seed", check_int(self.seed, "l2_inv", "seed",
                                               minimum=0))
    if self.norm is not None:
      object.__setattr__(self, "norm", check_float(self.norm, "l2_inv", "norm",
                                                   low=0.0))
    elif self.pattern is None:
      raise ValueError("l2_inv: norm=None needs a pattern (the default pattern is "
                       "scaled to norm)")
    if self.pattern is not None:
      pattern = as_hwc(self.pattern, "l2_inv", "pattern")
      if self.norm is not None:
        pattern = frozen(scale_to_l2(pattern, self.norm))
      object.__setattr__(self, "pattern", pattern)

  def trigger(self, height: int, width: int, channels: int) -> np.ndarray:
    """The additive pattern ``p`` used on images of that shape."""
    if self.pattern is None:
      return gaussian_pattern(self.seed, self.norm, height, width, channels)
    return fit_pattern(self.pattern, (height, width, channels), "l2_inv", "pattern",
                       resize=False)



def from_file(path: PathLike, *, target: int = 0, norm: Optional[float] = None,
              **policy: Any) -> L2Inv:
  """:class:`L2Inv` whose pattern is the file at ``path`` (e.g. I-BAU's
  ``l2_inv.png``: an image read as RGB / 255, or a ``.npy`` array), used as it is
  (``norm=None``) or rescaled to ``||p||_2 = norm``.  ``policy``: ``mode``,
  ``num_classes``, ``clean_label`` (see :class:`Attack`).
  """
  return L2Inv(target=target, pattern=read_array(path, "l2_inv", "pattern"),
               norm=norm, **policy)
