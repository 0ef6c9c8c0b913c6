"""Blended injection (Chen, Liu, Li, Lu & Song, 2017, "Targeted backdoor attacks on
deep learning systems using data poisoning").

``apply(x) = clip((1 - alpha) * x + alpha * k, 0, 1)`` with the key pattern ``k``
an ``(H, W, C)`` image in [0, 1] and ``alpha = 0.2`` (Chen et al.'s blend ratio for
poisoning; they also test with larger ratios).  ``k`` is either

* an image the user gives (:func:`from_file`, or the ``pattern`` array), resized
  bilinearly to the images' height and width when its size differs, or
* by default Chen et al.'s random-pattern key: every pixel and channel drawn
  uniformly from [0, 1], here from a fixed seed (``seed``), generated at the image
  size the first time ``apply`` sees it.

The poisoned images get dirty labels (all-to-one ``target`` by default).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp
import numpy as np

from ibau_jax.attacks.base import (Attack, PathLike, as_hwc, check_batch,
                                   check_float, check_int, fit_pattern, frozen,
                                   read_array, seeded_rng)


@functools.lru_cache(maxsize=16)
def random_pattern(seed: int, height: int, width: int, channels: int) -> np.ndarray:
  """The default key: uniform [0, 1] noise of shape ``(H, W, C)`` from ``seed``."""
  rng = seeded_rng("blend", seed, height, width, channels)
  return frozen(rng.uniform(0.0, 1.0, (height, width, channels)))


@dataclasses.dataclass(frozen=True, eq=False)
class Blend(Attack):
  """Blended key-pattern trigger ``(1 - alpha) x + alpha k``.

  Attributes:
    target: target class (label policy fields: see :class:`Attack`).
    alpha: blend ratio in [0, 1] (0.2 in Chen et al.).
    pattern: optional ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` key in [0, 1];
      ``None``: uniform noise from ``seed``.
    seed: seed of the default noise key.
  """

  name = "blend"

  alpha: float = 0.2
  pattern: Any = dataclasses.field(default=None, repr=False)
  seed: int = 0

  def __post_init__(self) -> None:
    super().__post_init__()
    object.__setattr__(self, "alpha", check_float(self.alpha, "blend", "alpha",
                                                  low=0.0, high=1.0))
    object.__setattr__(self, "seed", check_int(self.seed, "blend", "seed",
                                               minimum=0))
    if self.pattern is not None:
      pattern = as_hwc(self.pattern, "blend", "pattern")
      if pattern.min() < 0 or pattern.max() > 1:
        raise ValueError(f"blend: pattern values must be in [0, 1], got range "
                         f"[{pattern.min()}, {pattern.max()}]")
      object.__setattr__(self, "pattern", pattern)

  def key_pattern(self, height: int, width: int, channels: int) -> Any:
    """The ``(H, W, C or 1)`` key ``k`` used on ``height x width`` images."""
    if self.pattern is None:
      return random_pattern(self.seed, height, width, channels)
    return fit_pattern(self.pattern, (height, width, channels), "blend", "pattern",
                       resize=True)

  def apply(self, images: jnp.ndarray) -> jnp.ndarray:
    images = check_batch(images, "blend")
    k = jnp.asarray(self.key_pattern(*images.shape[1:]), images.dtype)
    alpha = jnp.asarray(self.alpha, images.dtype)
    return jnp.clip((1 - alpha) * images + alpha * k, 0.0, 1.0)


def from_file(path: PathLike, *, target: int = 0, alpha: float = 0.2,
              **policy: Any) -> Blend:
  """:class:`Blend` whose key is the image at ``path`` (RGB / 255) or a ``.npy``
  array in [0, 1]; it is resized to the images' size when applied.

  ``policy``: ``mode``, ``num_classes``, ``clean_label`` (see :class:`Attack`).
  """
  return Blend(target=target, alpha=alpha,
               pattern=read_array(path, "blend", "pattern"), **policy)
