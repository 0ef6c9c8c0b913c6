"""Checks and small helpers shared by the defenses: field checks of their config dataclasses
(called from ``__post_init__``), the config a defense runs with (:func:`config_of`),
divergence errors (:func:`finite_loss`, :func:`finite_values`), returned variables in the
caller's container type (:func:`with_params`) and JSON-friendly history values
(:func:`plain`).

Each field check raises ``ValueError("<Class>.<field> must be ..., got <value>")``.  Integers are
Python or numpy integers, never bools; real numbers are finite ints, floats or numpy
integers/floatings, never bools or strings.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from ibau_jax import _resume


def is_real(v) -> bool:
  """Whether ``v`` is a finite Python or numpy real number (int, float, numpy integer or
  floating), bools excluded (:func:`ibau_jax.ibau.is_number`)."""
  from ibau_jax import ibau  # pylint: disable=import-outside-toplevel
  return ibau.is_number(v)


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
          min_open: bool = False, max_open: bool = False) -> None:
  """Checks that every field ``names`` of ``obj`` lies between ``minimum`` and ``maximum``
  (either may be None: unbounded; included unless ``min_open`` / ``max_open``).

  The value must pass :func:`is_real`; the message reads "must be a finite number >= 0"
  (or "in [0, 1)", ...)."""
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
    ok = is_real(v) and ((minimum is None or (v > minimum if min_open else v >= minimum))
                         and (maximum is None or (v < maximum if max_open else v <= maximum)))
    if not ok:
      what = f"a finite number {need}".rstrip()
      raise ValueError(f"{cls_name}.{name} must be {what}, got {v!r}")


def sgd(cls_name: str, obj, learning_rate: str = "learning_rate", momentum: str = "momentum",
        weight_decay: Optional[str] = "weight_decay") -> None:
  """Checks the SGD fields of ``obj`` (given by name): learning rate ``>= 0``, momentum in
  ``[0, 1)`` and, unless ``weight_decay`` is None, weight decay ``>= 0``, in that order
  (:func:`reals`)."""
  reals(cls_name, obj, (learning_rate,), minimum=0)
  reals(cls_name, obj, (momentum,), 0, 1, max_open=True)
  if weight_decay is not None:
    reals(cls_name, obj, (weight_decay,), minimum=0)


def optional_callable(cls_name: str, obj, name: str = "callback") -> None:
  """Checks that the field ``name`` of ``obj`` is None or callable."""
  v = getattr(obj, name)
  if v is not None and not callable(v):
    raise ValueError(f"{cls_name}.{name} must be callable or None, got {v!r}")


def bools(cls_name: str, obj, names: Iterable[str]) -> None:
  """Checks that every field ``names`` of ``obj`` is a bool (Python or numpy)."""
  for name in names:
    v = getattr(obj, name)
    if not isinstance(v, (bool, np.bool_)):
      raise ValueError(f"{cls_name}.{name} must be a bool, got {v!r}")


def checkpoint_folder(cls_name: str, value) -> None:
  """Checks a config's ``checkpoint_dir`` (:func:`ibau_jax._resume.check_folder`: None, or a
  non-empty path where a folder is or can be made)."""
  _resume.check_folder(cls_name, value)


def config_of(defense: str, config, cls: type, *, exact: bool = False):
  """The config a defense runs with: ``cls()`` (the defaults) when ``config`` is None, else
  ``config`` itself, which must be an instance of ``cls`` (of ``cls`` exactly, not of a
  subclass, when ``exact``); ``defense`` names the defense function in the message."""
  if config is None:
    return cls()
  if (type(config) is not cls) if exact else not isinstance(config, cls):
    raise ValueError(f"{defense}: config must be an instance of {cls.__name__}"
                     f"{' (not of a subclass)' if exact else ''} or None (the defaults), "
                     f"got {type(config).__name__}")
  return config


def same_container(original: Mapping, mapping: dict) -> Mapping:
  """``mapping`` (a dict) in the container type of ``original``: a plain dict for a dict,
  ``type(original)(mapping)`` otherwise (e.g. a Flax ``FrozenDict`` stays one), as
  :func:`ibau_jax.unlearn` returns its variables."""
  return mapping if isinstance(original, dict) else type(original)(mapping)


def with_params(variables: Mapping, params) -> Mapping:
  """``{**variables, "params": params}`` in the container type of ``variables``."""
  return same_container(variables, {**variables, "params": params})


def plain(value: Any) -> Any:
  """``value`` with NumPy and JAX arrays as (nested) lists and NumPy scalars as Python
  numbers, through dicts, lists and tuples (tuples become lists): what history entries hold,
  so that ``json.dumps(history)`` works."""
  if isinstance(value, dict):
    return {k: plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "__array__"):
    return np.asarray(value).tolist()
  return value


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
