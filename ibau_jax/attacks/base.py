"""Common interface of the backdoor attacks (triggers and label maps).

An attack is an immutable object with

* ``apply(images) -> images``: a pure, jittable function on float NHWC batches with
  pixels in [0, 1]; it keeps shape and dtype and clips the result to [0, 1];
* ``target``: the target class of an all-to-one attack;
* ``relabel(labels) -> labels``: the poisoned label of each image (all-to-one:
  every label becomes ``target``).

Attack objects compare and hash by identity (``eq=False``), so their bound ``apply``
can be a static argument of ``jax.jit`` (see :mod:`ibau_jax.metrics`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp


def check_batch(images: Any, name: str) -> jnp.ndarray:
  """``images`` as a float ``(N, H, W, C)`` array; ``ValueError`` otherwise."""
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"{name}: images must be an NHWC batch (N, H, W, C), got shape "
                     f"{images.shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"{name}: images must be floating point in [0, 1], got dtype "
                     f"{images.dtype}")
  return images


@dataclasses.dataclass(frozen=True, eq=False)
class Attack:
  """Base class: an all-to-one attack towards ``target``.

  Subclasses are frozen dataclasses that set ``name`` and implement :meth:`apply`.
  """

  name: ClassVar[str] = ""

  target: int = 0

  def __post_init__(self) -> None:
    if isinstance(self.target, bool) or int(self.target) != self.target \
        or self.target < 0:
      raise ValueError(f"{self.name or type(self).__name__}: target must be a "
                       f"non-negative integer class, got {self.target!r}")
    object.__setattr__(self, "target", int(self.target))

  def apply(self, images: jnp.ndarray) -> jnp.ndarray:
    """Triggered copy of the float NHWC batch ``images`` (same shape and dtype)."""
    raise NotImplementedError

  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    return self.apply(images)

  def relabel(self, labels: Any) -> jnp.ndarray:
    """All-to-one poisoned labels: ``target`` for every entry (same shape and dtype)."""
    labels = jnp.asarray(labels)
    return jnp.full_like(labels, self.target)
