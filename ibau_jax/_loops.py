"""How a loop of training-like steps runs (private): ``loop`` fields of the configs."""

from __future__ import annotations

import jax

LOOPS = ("auto", "scan", "python")


def check(owner: str, loop: str) -> None:
  """Raises ``ValueError`` unless ``loop`` is one of :data:`LOOPS` (``owner``: the config's
  name, for the message)."""
  if loop not in LOOPS:
    raise ValueError(f"{owner}.loop must be 'auto', 'scan' or 'python', got {loop!r}")


def use_scan(loop: str) -> bool:
  """True for one compiled ``lax.scan`` over the steps, False for one compiled step per
  Python iteration.  ``"auto"``: Python on CPU (XLA:CPU runs weight gradients inside loops
  10-40x slower, see ``benchmarks/loops.py``), scan on GPU/TPU."""
  if loop == "auto":
    return jax.default_backend() != "cpu"
  return loop == "scan"
