"""Backdoor attacks, picked by name: ``get_attack("badnets", target=8)``.

Each attack lives in its own module and is an :class:`~ibau_jax.attacks.base.Attack`
(a frozen dataclass with ``target``, a pure jittable ``apply(images) -> images`` on
float NHWC batches in [0, 1], and ``relabel(labels)``); adding one means adding the
module and one line to ``_REGISTRY``.
"""

from __future__ import annotations

from typing import Any

from ibau_jax.attacks.badnets import BadNets
from ibau_jax.attacks.base import Attack
from ibau_jax.attacks.l0_inv import L0Inv

_REGISTRY: dict[str, type[Attack]] = {
    "badnets": BadNets,
    "l0_inv": L0Inv,
}


def attack_names() -> list[str]:
  """Names accepted by :func:`get_attack`."""
  return sorted(_REGISTRY)


def get_attack(name: str, **params: Any) -> Attack:
  """The attack registered as ``name``, built with ``params`` (e.g. ``target=8``)."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown attack {name!r}; known attacks: {attack_names()}")
  try:
    return _REGISTRY[name](**params)
  except TypeError as e:  # unknown keyword
    raise ValueError(f"bad parameters for attack {name!r}: {e}") from None


__all__ = ["Attack", "BadNets", "L0Inv", "attack_names", "get_attack"]
