"""Backdoor defenses by name, all with the call shape of :func:`ibau_jax.unlearn`:

    result = defense(apply_fn, variables, images, labels, config, key=key)
    result.variables, result.history

``apply_fn(variables, images) -> logits`` is the caller's inference function, ``images`` and
``labels`` the defender's clean set (float NHWC in [0, 1], integer labels), ``config`` the
defense's frozen config dataclass (its ``callback(step, stats, variables)`` runs after every
round or epoch; None: the defaults; any other object: ``ValueError``).  A defense never sees
the trigger.  Every defense first makes the checks of :func:`check_inputs` (finite
``variables`` included), and returns ``variables`` in the caller's container type (a Flax
``FrozenDict`` stays one).

=======  ==============================================  ======================
name     what                                            config
=======  ==============================================  ======================
ibau     I-BAU (:func:`ibau_jax.unlearn`)                :class:`IBAUConfig`
ft       fine-tuning on the clean set                    :class:`FTConfig`
nc       Neural Cleanse (:mod:`.nc`)                     :class:`NCConfig`
tabor    TABOR (:mod:`.tabor`)                           :class:`TABORConfig`
fp       Fine-Pruning (:mod:`.fp`)                       :class:`FPConfig`
nad      Neural Attention Distillation (:mod:`.nad`)     :class:`NADConfig`
deepinspect  DeepInspect (:mod:`.deepinspect`)           :class:`DeepInspectConfig`
anp      Adversarial Neuron Pruning (:mod:`.anp`)        :class:`ANPConfig`
dp       DP-SGD training (:mod:`.dp`)                    :class:`DPConfig`
=======  ==============================================  ======================

``dp`` is the exception to "clean set in": it trains ``variables`` (normally a fresh
initialisation) on the images it is given, which for this defense are the (poisoned) training
set; :mod:`experiments.pipeline` passes it those.

Fine-Pruning and NAD read inner layers, which :mod:`.layers` finds in any Flax linen model
behind ``apply_fn``; for other models they raise ``ValueError``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


from ibau_jax.defenses.ft import FTConfig, fine_tune


@dataclasses.dataclass(frozen=True)
class DefenseResult:
  """``variables``: the defended variables (same tree structure and container types as the
  input); ``history``: one dict per round or epoch."""

  variables: Any
  history: list


def check_inputs(apply_fn, variables, images, labels, batch_size: int, *,
                 task: str = "unlearning", data: str = "clean set", key=None) -> None:
  """The input checks every defense shares, made before any work: those of
  :func:`ibau_jax.unlearn` on the inputs, then that every floating leaf of ``variables``
  is finite (the message names the first leaf holding a NaN or an infinity).

  Args:
    apply_fn, variables, images, labels, batch_size: as the defense got them.
    task: what the defense does, for the messages ("<task> needs images of at least two
      classes", "<task> needs a model with finite parameters and statistics").
    data: what ``images`` are, for the messages ("the <data> has a single class").
    key: the defense's PRNG key, checked when given (:func:`ibau_jax._prng.check_key`).

  Raises:
    ValueError: with :func:`ibau_jax.unlearn`'s messages, worded with ``task`` and ``data``.
  """
  from ibau_jax import _prng, ibau
  if key is not None:
    _prng.check_key(key)
  try:
    ibau.validate_clean_set(apply_fn, variables, images, labels, batch_size)
    ibau._check_finite_variables(variables)  # pylint: disable=protected-access
  except ValueError as e:
    message = str(e)
    worded = message.replace("unlearning needs", f"{task} needs").replace(
        "the clean set has", f"the {data} has")
    if worded == message:
      raise
    raise ValueError(worded) from None


def _ibau(apply_fn, variables, images, labels, config=None, *, key):
  from ibau_jax import ibau
  return ibau.unlearn(apply_fn, variables, images, labels,
                      ibau.IBAUConfig() if config is None else config, key=key)


def _registry() -> dict[str, tuple[Callable, type]]:
  from ibau_jax import ibau
  from ibau_jax.defenses import anp, deepinspect, dp, fp, nad, nc, tabor
  return {"ibau": (_ibau, ibau.IBAUConfig), "ft": (fine_tune, FTConfig),
          "nc": (nc.neural_cleanse, nc.NCConfig), "tabor": (tabor.tabor, tabor.TABORConfig),
          "fp": (fp.fine_pruning, fp.FPConfig), "nad": (nad.nad, nad.NADConfig),
          "deepinspect": (deepinspect.deepinspect, deepinspect.DeepInspectConfig),
          "anp": (anp.anp, anp.ANPConfig), "dp": (dp.dp_sgd, dp.DPConfig)}


def defense_names() -> list[str]:
  return sorted(_registry())


def get_defense(name: str) -> tuple[Callable, type]:
  """``(defense_function, ConfigClass)`` for ``name``."""
  registry = _registry()
  if name not in registry:
    raise ValueError(f"unknown defense {name!r}; choose from {sorted(registry)}")
  return registry[name]


__all__ = ["DefenseResult", "FTConfig", "check_inputs", "defense_names", "fine_tune",
           "get_defense"]
