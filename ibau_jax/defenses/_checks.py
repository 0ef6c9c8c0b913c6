"""Field checks shared by the defenses' config dataclasses (called from ``__post_init__``).

Each check raises ``ValueError("<Class>.<field> must be ..., got <value>")``.  Integers are
Python or numpy integers, never bools.  Real numbers come in two strengths: ``strict``
(a finite int, float or numpy integer/floating that is not a bool) and loose (only the
bounds are compared; NaN fails, and infinities pass where the bounds allow them).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import numpy as np


def is_real(v) -> bool:
  """Whether ``v`` is a finite Python or numpy real number (int, float, numpy integer or
  floating), bools excluded."""
  return (not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))
          and math.isfinite(v))


def integers(cls_name: str, obj, names: Iterable[str], minimum: int = 1) -> None:
  """Checks that every field ``names`` of ``obj`` is an integer (Python or numpy, not a
  bool) ``>= minimum``; the message says "a positive integer" (``minimum=1``), "a
  non-negative integer" (``minimum=0``) or "an integer >= minimum"."""
  for name in names:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
      what = {1: "a positive integer", 0: "a non-negative integer"}.get(
          minimum, f"an integer >= {minimum}")
      raise ValueError(f"{cls_name}.{name} must be {what}, got {v!r}")


def reals(cls_name: str, obj, names: Iterable[str], minimum=None, maximum=None, *,
          min_open: bool = False, max_open: bool = False, strict: bool = True) -> None:
  """Checks that every field ``names`` of ``obj`` lies between ``minimum`` and ``maximum``
  (either may be None: unbounded; included unless ``min_open`` / ``max_open``).

  ``strict``: the value must also pass :func:`is_real`, and the message reads "must be a
  finite number >= 0" (or "in [0, 1)", ...).  Not strict: only the comparisons are made
  (NaN fails them; a value that cannot be compared raises ``TypeError``), and the message
  reads "must be >= 0"."""
  low = "(" if min_open else "["
  high = ")" if max_open else "]"
  if minimum is not None and maximum is not None:
    need = f"in {low}{minimum}, {maximum}{high}"
  elif minimum is not None:
    need = f"{'>' if min_open else '>='} {minimum}"
  else:
    need = f"{'<' if max_open else '<='} {maximum}" if maximum is not None else ""
  for name in names:
    v = getattr(obj, name)
    if strict and not is_real(v):
      ok = False
    else:
      ok = ((minimum is None or (v > minimum if min_open else v >= minimum))
            and (maximum is None or (v < maximum if max_open else v <= maximum)))
    if not ok:
      what = f"a finite number {need}".rstrip() if strict else need
      raise ValueError(f"{cls_name}.{name} must be {what}, got {v!r}")


def sgd(cls_name: str, obj, learning_rate: str = "learning_rate", momentum: str = "momentum",
        weight_decay: Optional[str] = "weight_decay", *, strict: bool = True) -> None:
  """Checks the SGD fields of ``obj`` (given by name): learning rate ``>= 0``, momentum in
  ``[0, 1)`` and, unless ``weight_decay`` is None, weight decay ``>= 0``, in that order;
  ``strict`` as in :func:`reals`."""
  reals(cls_name, obj, (learning_rate,), minimum=0, strict=strict)
  reals(cls_name, obj, (momentum,), 0, 1, max_open=True, strict=strict)
  if weight_decay is not None:
    reals(cls_name, obj, (weight_decay,), minimum=0, strict=strict)


def optional_callable(cls_name: str, obj, name: str = "callback") -> None:
  """Checks that the field ``name`` of ``obj`` is None or callable."""
  v = getattr(obj, name)
  if v is not None and not callable(v):
    raise ValueError(f"{cls_name}.{name} must be callable or None, got {v!r}")


def finite_loss(loss: float, what: str, epoch: int, hint: str, unit: str = "epoch") -> None:
  """Raises ValueError if an epoch's mean ``loss`` is NaN or infinite: the SGD run named
  ``what`` diverged (the caller's variables are untouched; ``hint`` says what to lower).
  ``unit`` names what ``epoch`` counts (``"epoch"``, ``"iteration"``, ...)."""
  if not math.isfinite(loss):
    raise ValueError(f"{what} diverged: its loss became non-finite ({loss}) in {unit} {epoch}; "
                     f"{hint}")


def finite_values(values, what: str, hint: str) -> None:
  """Raises ValueError if any of a finished stage's final losses or statistics ``values`` is
  NaN or infinite: the stage named ``what`` diverged (``hint`` says what to change)."""
  values = np.asarray(values, np.float64)
  if not np.all(np.isfinite(values)):
    raise ValueError(f"{what} diverged: its final losses or statistics are non-finite "
                     f"({values.tolist()}); {hint}")
