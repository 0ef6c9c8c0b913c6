"""Backdoor attacks, picked by name: ``get_attack("badnets", target=8)``.

Each attack lives in its own module and is an :class:`~ibau_jax.attacks.base.Attack`:
a frozen dataclass with a label policy (``target``, ``mode="all_to_one"`` or
``"all_to_all"``, ``num_classes``, ``clean_label``), a pure jittable
``apply(images) -> images`` on float NHWC batches in [0, 1] (same shape and dtype,
clipped to [0, 1]) and ``relabel(labels) -> labels``.  Patterns are generated
lazily from fixed seeds or given by the user.  Adding an attack means adding its
module and one line to ``_REGISTRY``.

* :func:`poison` / :func:`assign`: poison a data set at a ratio, a pure function
  of a PRNG key (NumPy in and out);
* :class:`MultiTarget`: several triggers with their own targets in one model.

=========  =====================================================  ===============
name       trigger ``T(x)`` (then clipped to [0, 1])              class
=========  =====================================================  ===============
badnets    4x4 white square at 27..30 (or 3x3 checkerboard)       BadNets
blend      ``0.8 x + 0.2 k``, ``k`` seeded noise or an image      Blend
trojan_sq  ``x + p``, ``p`` a square patch                        TrojanSquare
trojan_wm  ``x + p``, ``p`` a sparse watermark                    TrojanWatermark
l0_inv     ``x (1 - m) + p``, sparse mask ``m``                   L0Inv
l2_inv     ``x + p``, ``||p||_2 = 3.2``                           L2Inv
smooth     ``x + p``, ``p`` Gaussian-smoothed noise               Smooth
wanet      ``grid_sample(x, I + 0.5 F / H)``, ``k = 4``           WaNet
sig        ``x + 20/255 sin(2 pi 6 j / W)``, clean label          Sig
=========  =====================================================  ===============
"""

from __future__ import annotations

from typing import Any

from ibau_jax.attacks.badnets import BadNets
from ibau_jax.attacks.base import Attack
from ibau_jax.attacks.blend import Blend
from ibau_jax.attacks.l0_inv import L0Inv
from ibau_jax.attacks.l2_inv import L2Inv
from ibau_jax.attacks.multi_target import MultiTarget
from ibau_jax.attacks.poisoning import assign, poison
from ibau_jax.attacks.sig import Sig
from ibau_jax.attacks.smooth import Smooth
from ibau_jax.attacks.trojan import TrojanSquare, TrojanWatermark
from ibau_jax.attacks.wanet import WaNet, grid_sample

_REGISTRY: dict[str, type[Attack]] = {
    "badnets": BadNets,
    "blend": Blend,
    "l0_inv": L0Inv,
    "l2_inv": L2Inv,
    "sig": Sig,
    "smooth": Smooth,
    "trojan_sq": TrojanSquare,
    "trojan_wm": TrojanWatermark,
    "wanet": WaNet,
}


def attack_names() -> list[str]:
  """Names accepted by :func:`get_attack`."""
  return sorted(_REGISTRY)


def get_attack(name: str, **params: Any) -> Attack:
  """The attack registered as ``name``, built with ``params`` (e.g. ``target=8``).

  ``ValueError`` for an unknown name, an unknown parameter or a bad value.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown attack {name!r}; known attacks: {attack_names()}")
  try:
    return _REGISTRY[name](**params)
  except TypeError as e:  # unknown keyword
    raise ValueError(f"bad parameters for attack {name!r}: {e}") from None


__all__ = ["Attack", "BadNets", "Blend", "L0Inv", "L2Inv", "MultiTarget", "Sig",
           "Smooth", "TrojanSquare", "TrojanWatermark", "WaNet", "assign",
           "attack_names", "get_attack", "grid_sample", "poison"]
