"""Multi-target backdoors: several triggers in one model, each with its own target.

``MultiTarget(attacks=(a_0, ..., a_{K-1}))`` holds ``K`` all-to-one attacks with
pairwise distinct targets ``t_k = a_k.target``.  An image is tagged with an index
``w`` ("which trigger"): ``w`` in ``[0, K)`` means trigger ``k = w``, any other value
(by convention ``-1``) means clean.  Then, image by image,

* ``apply_with(x, w)_i = a_{w_i}.apply(x)_i`` if ``0 <= w_i < K``, else ``x_i``;
* ``relabel_with(y, w)_i = t_{w_i}`` if ``0 <= w_i < K``, else ``y_i``.

Poisoning (:func:`ibau_jax.attacks.poison`) gives trigger ``k`` exactly
``round(ratio * |E_k|)`` images, ``E_k`` the images it may poison (label ``!= t_k``;
label ``== t_k`` for a clean-label ``a_k``), no image getting two triggers.  To
measure trigger ``k``, evaluate ``a_k`` alone (``a_k.apply``, target ``t_k``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from ibau_jax.attacks.base import Attack, check_batch


@dataclasses.dataclass(frozen=True, eq=False)
class MultiTarget:
  """``K`` all-to-one triggers with distinct targets, applied per image.

  Attributes:
    attacks: the ``K >= 1`` attacks, each ``mode="all_to_one"``.
  """

  name = "multi_target"

  attacks: tuple[Attack, ...] = ()

  def __post_init__(self) -> None:
    attacks = tuple(self.attacks)
    if not attacks:
      raise ValueError("multi_target: attacks must hold at least one attack")
    for k, a in enumerate(attacks):
      if not isinstance(a, Attack):
        raise ValueError(f"multi_target: attacks[{k}] is not an Attack, got "
                         f"{type(a).__name__}")
      if a.mode != "all_to_one":
        raise ValueError(f"multi_target: attacks[{k}] ({a.name}) must be all_to_one, "
                         f"got mode {a.mode!r}")
    targets = [a.target for a in attacks]
    if len(set(targets)) != len(targets):
      raise ValueError(f"multi_target: targets must be distinct, got {targets}")
    object.__setattr__(self, "attacks", attacks)

  @property
  def targets(self) -> tuple[int, ...]:
    """``(t_0, ..., t_{K-1})``."""
    return tuple(a.target for a in self.attacks)

  def __len__(self) -> int:
    return len(self.attacks)

  def apply_with(self, images: jnp.ndarray, which: Any) -> jnp.ndarray:
    """Image ``i`` with trigger ``which[i]`` (or unchanged if not in ``[0, K)``).

    ``which``: an int or an ``(N,)`` int array (may be traced; jittable).  Every
    trigger is computed on the whole batch and the results are selected.
    """
    images = check_batch(images, self.name)
    which = jnp.broadcast_to(jnp.asarray(which), images.shape[:1])
    if not jnp.issubdtype(which.dtype, jnp.integer):
      raise ValueError(f"multi_target: which must be integer, got {which.dtype}")
    out = images
    for k, attack in enumerate(self.attacks):
      out = jnp.where((which == k)[:, None, None, None], attack.apply(images), out)
    return out

  def relabel_with(self, labels: Any, which: Any) -> jnp.ndarray:
    """Label ``t_{which[i]}`` (or ``labels[i]`` if ``which[i]`` not in ``[0, K)``)."""
    labels = jnp.asarray(labels)
    which = jnp.broadcast_to(jnp.asarray(which), labels.shape)
    out = labels
    for k, t in enumerate(self.targets):
      out = jnp.where(which == k, jnp.asarray(t, labels.dtype), out)
    return out
