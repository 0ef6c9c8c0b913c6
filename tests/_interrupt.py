"""Interrupting a long run inside a test: a hook that raises at a chosen point, as a kill
would stop the run there (what the run saved before the hook ran is what a resumed run
finds)."""

from __future__ import annotations

import time

import numpy as np
import pytest


class Interrupted(Exception):
  """Raised by the hooks of :func:`stop_at`."""


def stop_at(value, sleep: float = 0.0):
  """A hook ``hook(first, *rest)`` that raises :class:`Interrupted` (after ``sleep``
  seconds) when ``first == value``."""
  def hook(first, *rest):
    if first == value:
      time.sleep(sleep)
      raise Interrupted
  return hook


def interrupt(run, config, at, hook: str = "callback", sleep: float = 0.0) -> None:
  """``run(config)`` with its ``hook`` field set to :func:`stop_at` ``(at)``; checks that it
  was interrupted."""
  with pytest.raises(Interrupted):
    run(config.replace(**{hook: stop_at(at, sleep)}))


def saved_step(path) -> int:
  """The step a checkpoint file (``ibau_jax._resume``) was saved after."""
  with np.load(path) as f:
    return int(f["step"])


def recording(config):
  """``(config with a callback that records its arguments, the list they go to)``."""
  seen = []
  return config.replace(callback=lambda *args: seen.append(args)), seen
