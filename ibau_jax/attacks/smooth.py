"""The "smooth" trigger of the I-BAU paper: a low-frequency universal perturbation.

``apply(x) = clip(x + p, 0, 1)`` with ``p`` an ``(H, W, C)`` perturbation that has
no high-frequency content.  Zeng et al. ("Rethinking the backdoor attacks'
triggers: a frequency perspective", ICCV 2021) show that common triggers carry
high-frequency artefacts and build smooth triggers by low-pass filtering; the I-BAU
paper (Zeng et al., ICLR 2022) evaluates such a smooth universal trigger.  Theirs
is optimised against a model; the default here is a fixed stand-in:

``p = eps * s / ||s||`` with ``s = G_sigma * g``: ``g`` standard normal noise of
shape ``(H, W, C)`` from ``seed``, ``G_sigma`` a 2-D Gaussian kernel of standard
deviation ``sigma = 2`` pixels (separable, truncated at ``3 sigma``, reflected at
the image borders, each channel filtered on its own), and ``||.||`` the L2 norm
(``norm="l2"``, ``eps = 3.2``, the L2 budget of the I-BAU ``l2_inv`` trigger) or the
L-infinity norm (``norm="linf"``: ``max |p| = eps``).  A given ``pattern`` (e.g.
the paper's optimised trigger) is added as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from ibau_jax.attacks.base import (AdditiveAttack, as_hwc, check_float,
                                   check_int, fit_pattern, frozen, seeded_rng)

NORMS = ("l2", "linf")


def gaussian_kernel(sigma: float) -> np.ndarray:
  """Normalised 1-D Gaussian of standard deviation ``sigma``, radius ceil(3 sigma)."""
  radius = max(1, math.ceil(3 * sigma))
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (t / sigma) ** 2)
  return k / k.sum()


def gaussian_blur(array: np.ndarray, sigma: float) -> np.ndarray:
  """``array`` ``(H, W, C)`` filtered by the separable Gaussian, reflect padding."""
  k = gaussian_kernel(sigma)
  r = (k.size - 1) // 2
  out = np.asarray(array, np.float64)
  for axis in (0, 1):
    pad = [(0, 0)] * out.ndim
    pad[axis] = (r, r)
    padded = np.pad(out, pad, mode="symmetric")
    n = out.shape[axis]
    out = sum(k[i] * np.take(padded, np.arange(i, i + n), axis=axis)
              for i in range(k.size))
  return out


@functools.lru_cache(maxsize=16)
def smooth_pattern(seed: int, sigma: float, norm: str, eps: float, height: int,
                   width: int, channels: int) -> np.ndarray:
  """Default ``p``: seeded normal noise, Gaussian-smoothed, scaled to ``eps``."""
  rng = seeded_rng("smooth", seed, height, width, channels)
  s = gaussian_blur(rng.standard_normal((height, width, channels)), sigma)
  size = np.sqrt(np.sum(s ** 2)) if norm == "l2" else np.max(np.abs(s))
  return frozen(s * (eps / size))


@dataclasses.dataclass(frozen=True, eq=False)
class Smooth(AdditiveAttack):
  """Additive low-frequency trigger ``clip(x + eps * s / ||s||, 0, 1)``.

  Attributes:
    target: target class (label policy fields: see :class:`Attack`).
    sigma: standard deviation of the Gaussian kernel, in pixels (2).
    norm: ``"l2"`` or ``"linf"``: the norm scaled to ``eps``.
    eps: size of the perturbation in that norm (3.2, L2).
    seed: seed of the noise.
    pattern: optional ``(H, W, C)`` perturbation (any sign) added as it is.
  """

  name = "smooth"

  sigma: float = 2.0
  norm: str = "l2"
  eps: float = 3.2
  seed: int = 0
  pattern: Any = dataclasses.field(default=None, repr=False)

  def __post_init__(self) -> None:
    super().__post_init__()
    object.__setattr__(self, "sigma", check_float(self.sigma, "smooth", "sigma",
                                                  low=0.0))
    if self.sigma == 0:
      raise ValueError("smooth: sigma must be > 0")
    if self.norm not in NORMS:
      raise ValueError(f"smooth: norm must be one of {NORMS}, got {self.norm!r}")
    object.__setattr__(self, "eps", check_float(self.eps, "smooth", "eps", low=0.0))
    object.__setattr__(self, "seed", check_int(self.seed, "smooth", "seed",
                                               minimum=0))
    if self.pattern is not None:
      object.__setattr__(self, "pattern", as_hwc(self.pattern, "smooth", "pattern"))

  def trigger(self, height: int, width: int, channels: int) -> np.ndarray:
    """The additive perturbation ``p`` used on images of that shape."""
    if self.pattern is None:
      return smooth_pattern(self.seed, self.sigma, self.norm, self.eps, height,
                            width, channels)
    return fit_pattern(self.pattern, (height, width, channels), "smooth", "pattern",
                       resize=False)

