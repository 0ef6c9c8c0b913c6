"""Trojaning-attack triggers (Liu, Ma, Aafer, Lee, Zhai, Wang & Zhang, NDSS 2018):
``trojan_sq`` (a square patch) and ``trojan_wm`` (a watermark).

Both are additive: ``apply(x) = clip(x + p, 0, 1)`` with ``p`` an ``(H, W, C)``
pattern in [0, 1] that is zero outside the trigger's mask -- how the I-BAU code
(Zeng et al., ICLR 2022, ``poi_util.py``) applies its ``trojan_sq.png`` and
``trojan_wm.png`` (``x + png / 255``, clipped), with target 2 and poison ratio 0.2
for its released models.

Liu et al. choose a mask shape (a square, a logo, a watermark) covering a few per
cent of the input and optimise the pixel values inside it so that they excite
chosen internal neurons of a given model.  That optimisation needs the model and is
not reproduced here: the default patterns are fixed stand-ins with the same
shapes, generated from a seed, and a given trigger (e.g. one produced by that
optimisation) can be loaded with :func:`from_file` or passed as ``pattern``
(resized bilinearly to the images' size when its size differs).

* ``trojan_sq``: ``p`` is uniform [0, 1] colour noise (from ``seed``) on a
  ``size x size`` square (default 5x5, about 2.4 % of a 32x32 image) one pixel in
  from the bottom-right corner (``row = H - size - margin``, likewise ``col``), 0
  elsewhere, so pixels outside the square are untouched.
* ``trojan_wm``: ``p = amplitude * u * m`` with ``m`` thin diagonal lines over the
  whole image (``m[i, j] = 1`` iff ``(i + j) mod period == 0``; ``period = 8``: one
  pixel in 8) and ``u`` uniform [0, 1] colour noise from ``seed``;
  ``amplitude = 0.5``: a faint, sparse watermark.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from ibau_jax.attacks.base import (AdditiveAttack, PathLike, as_hwc,
                                   check_float, check_int, fit_pattern, frozen,
                                   read_array, seeded_rng)


@functools.lru_cache(maxsize=16)
def square_pattern(seed: int, size: int, row: int, col: int, height: int, width: int,
                   channels: int) -> np.ndarray:
  """Default ``trojan_sq`` pattern: seeded uniform noise on the square, 0 elsewhere."""
  rng = seeded_rng("trojan_sq", seed, size, channels)
  p = np.zeros((height, width, channels), np.float32)
  p[row:row + size, col:col + size, :] = rng.uniform(0.0, 1.0,
                                                     (size, size, channels))
  return frozen(p)


@functools.lru_cache(maxsize=16)
def watermark_pattern(seed: int, period: int, amplitude: float, height: int,
                      width: int, channels: int) -> np.ndarray:
  """Default ``trojan_wm`` pattern: ``amplitude * u`` on the diagonal lines."""
  rng = seeded_rng("trojan_wm", seed, height, width, channels)
  i, j = np.indices((height, width))
  lines = ((i + j) % period == 0).astype(np.float32)[:, :, None]
  u = rng.uniform(0.0, 1.0, (height, width, channels))
  return frozen(amplitude * u * lines)


def _user_pattern(pattern: Any, name: str) -> np.ndarray:
  pattern = as_hwc(pattern, name, "pattern")
  if pattern.min() < 0 or pattern.max() > 1:
    raise ValueError(f"{name}: pattern values must be in [0, 1], got range "
                     f"[{pattern.min()}, {pattern.max()}]")
  return pattern


@dataclasses.dataclass(frozen=True, eq=False)
class _Additive(AdditiveAttack):
  """``clip(x + p, 0, 1)`` with a given ``pattern`` or a generated one."""

  pattern: Any = dataclasses.field(default=None, repr=False)
  seed: int = 0

  def __post_init__(self) -> None:
    super().__post_init__()
    object.__setattr__(self, "seed", check_int(self.seed, self.name, "seed",
                                               minimum=0))
    if self.pattern is not None:
      object.__setattr__(self, "pattern", _user_pattern(self.pattern, self.name))

  def _generate(self, height: int, width: int, channels: int) -> np.ndarray:
    raise NotImplementedError

  def trigger(self, height: int, width: int, channels: int) -> Any:
    """The additive ``(H, W, C or 1)`` pattern ``p`` used on images of that shape."""
    if self.pattern is None:
      return self._generate(height, width, channels)
    return fit_pattern(self.pattern, (height, width, channels), self.name,
                       "pattern", resize=True)



@dataclasses.dataclass(frozen=True, eq=False)
class TrojanSquare(_Additive):
  """Additive square patch ``clip(x + p, 0, 1)`` (``trojan_sq``).

  Attributes:
    target: target class (label policy fields: see :class:`Attack`).
    pattern: optional full-image ``(H, W, C)`` additive pattern in [0, 1] (e.g. the
      I-BAU ``trojan_sq.png``); ``None``: seeded noise on the square below.
    seed: seed of the default pattern.
    size: side of the default square, in pixels (5).
    margin: distance of the default square from the bottom and right edges (1).
  """

  name = "trojan_sq"

  size: int = 5
  margin: int = 1

  def __post_init__(self) -> None:
    super().__post_init__()
    object.__setattr__(self, "size", check_int(self.size, self.name, "size",
                                               minimum=1))
    object.__setattr__(self, "margin", check_int(self.margin, self.name, "margin",
                                                 minimum=0))

  def position(self, height: int, width: int) -> tuple[int, int]:
    """Top-left ``(row, col)`` of the default square on ``height x width`` images."""
    return height - self.size - self.margin, width - self.size - self.margin

  def _generate(self, height: int, width: int, channels: int) -> np.ndarray:
    row, col = self.position(height, width)
    if row < 0 or col < 0:
      raise ValueError(f"trojan_sq: a {self.size}x{self.size} square {self.margin} "
                       f"pixel(s) from the corner does not fit {height}x{width} "
                       "images")
    return square_pattern(self.seed, self.size, row, col, height, width, channels)


@dataclasses.dataclass(frozen=True, eq=False)
class TrojanWatermark(_Additive):
  """Additive sparse watermark ``clip(x + p, 0, 1)`` (``trojan_wm``).

  Attributes:
    target: target class (label policy fields: see :class:`Attack`).
    pattern: optional full-image ``(H, W, C)`` additive pattern in [0, 1] (e.g. the
      I-BAU ``trojan_wm.png``); ``None``: the seeded diagonal-line watermark.
    seed: seed of the default pattern.
    period: spacing of the default diagonal lines, in pixels (8).
    amplitude: largest value of the default watermark, in [0, 1] (0.5).
  """

  name = "trojan_wm"

  period: int = 8
  amplitude: float = 0.5

  def __post_init__(self) -> None:
    super().__post_init__()
    object.__setattr__(self, "period", check_int(self.period, self.name, "period",
                                                 minimum=1))
    object.__setattr__(self, "amplitude", check_float(
        self.amplitude, self.name, "amplitude", low=0.0, high=1.0))

  def _generate(self, height: int, width: int, channels: int) -> np.ndarray:
    return watermark_pattern(self.seed, self.period, self.amplitude, height, width,
                             channels)


def from_file(path: PathLike, *, kind: str = "trojan_sq", target: int = 0,
              **policy: Any) -> _Additive:
  """A trojan attack whose additive pattern is the file at ``path``.

  ``path``: an image (read as RGB, divided by 255, as the I-BAU code reads its
  ``trojan_*.png``) or a ``.npy`` array in [0, 1].  ``kind``: ``"trojan_sq"`` or
  ``"trojan_wm"`` (only the name differs).  ``policy``: ``mode``, ``num_classes``,
  ``clean_label`` (see :class:`Attack`).
  """
  classes = {"trojan_sq": TrojanSquare, "trojan_wm": TrojanWatermark}
  if kind not in classes:
    raise ValueError(f"trojan: kind must be one of {sorted(classes)}, got {kind!r}")
  return classes[kind](target=target, pattern=read_array(path, kind, "pattern"),
                       **policy)

