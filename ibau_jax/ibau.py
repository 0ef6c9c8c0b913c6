"""I-BAU: Implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022).

Given a classifier ``f_θ`` that may carry a backdoor and a small clean set ``{(x_i, y_i)}``,
I-BAU solves the minimax problem

    min_θ  max_{‖δ‖₂ ≤ C}  H(δ, θ) = (1/n) Σ_i L(f_θ(x_i + δ), y_i)

with ONE universal perturbation δ (an image-shaped array) shared by all images.  Each
round:

1. **Inner problem** (a stand-in for the unknown trigger): δ starts at zero and takes
   ``inner_epochs`` passes of an optimizer over the clean set on
   ``L_in(δ) = −CE(f_θ(x + δ), ŷ) + λ‖δ‖²`` (``ŷ = argmax f_θ(x)``, the model's own
   predictions, when ``pseudo_labels``; else the true labels), then δ is projected on the
   L2 ball of radius C.
2. **Outer problem**: for each batch, the outer loss is ``CE(f_θ(x + m ⊙ δ), y)`` where the
   mask ``m`` adds δ to a random ``perturbed_fraction`` of the batch.  θ takes one optax
   step along the implicit hypergradient

       ∇_θ L_out − ∇²_θδ L_in (∇²_δδ L_in)⁻¹ ∇_δ L_out,

   obtained from the fixed-point map ``Φ(δ, θ) = δ − η ∇_δ L_in(δ, θ)`` (see
   :mod:`ibau_jax.hypergrad`).  ``L_in`` here uses true labels on the FIRST batch of the
   round (``hypergrad_batch="first"``, as in the paper's code) or on the current batch.

The model runs in inference mode throughout (``apply_fn`` is the caller's inference
function: BatchNorm statistics frozen, dropout off); only ``variables["params"]`` is
trained and every other collection passes through unchanged.

Each round is one ``jax.jit``-compiled function (``lax.scan`` over batches); rounds and calls
with the same shapes and the same configuration structure reuse the compiled code, provided
the same ``apply_fn`` object is passed.  The structure is every field of :class:`IBAUConfig`
except its learning rates, λ, C and η, which are arguments of the compiled code (an
``IBAUConfig`` is a pytree with those numbers as leaves), and except the fields only the
Python loop reads (``rounds``, ``select``, the probes, ``retries``, ``callback``,
``checkpoint_dir``): a
sweep over those compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
import warnings
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ibau_jax import _loops
from ibau_jax import _prng
from ibau_jax import _resume
from ibau_jax import hypergrad
from ibau_jax import metrics
from ibau_jax import probe

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]
RoundCallback = Callable[[int, dict, PyTree], Any]


class NonFiniteHypergradientError(FloatingPointError):
  """The hypergradient became NaN or infinite; the caller's variables are untouched."""


def is_number(value, integer: bool = False) -> bool:
  """``value`` is a real number: a Python or NumPy int or float (not a bool, a string or an
  array), finite; an integer if ``integer``."""
  if isinstance(value, (bool, np.bool_)):
    return False
  if integer:
    return isinstance(value, (int, np.integer))
  return isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value)


def _valid_solver(c) -> bool:
  """``c`` is an ``(inner_optimizer, inner_lr, inner_projection)`` tuple."""
  return (isinstance(c, tuple) and len(c) == 3 and c[0] in ("sgd", "adam", "normalized")
          and is_number(c[1]) and c[1] > 0 and c[2] in ("end", "step"))


@dataclasses.dataclass(frozen=True)
class IBAUConfig:
  """Every knob of :func:`unlearn`.  ``IBAUConfig()`` is the project's default;
  :meth:`official` reproduces the paper's code.

  Attributes:
    rounds: number of rounds; each round solves the inner problem afresh, then makes one
      pass of outer steps over the clean set.
    batch_size: images per batch (inner and outer).  Images beyond the last full batch are
      left out of that round (a new shuffle each round picks different ones).
    shuffle: reshuffle the clean set each round (from ``key``).
    inner_epochs: passes over the clean set to fit δ.
    inner_lr: learning rate of the inner optimizer.
    inner_optimizer: the optimizer of δ on ``L_in``: ``"sgd"``, ``"adam"`` or ``"normalized"``
      (steps of length ``inner_lr`` along ``−∇L_in/‖∇L_in‖₂``: with
      ``inner_projection="step"``, the usual L2 PGD).
    inner_reg: λ in ``L_in = −CE + λ‖δ‖²``.
    pseudo_labels: fit δ against the model's own predictions (True) or the true labels.
    norm_bound: C, the L2 radius of the inner problem's ball; None: no constraint.
    inner_projection: when δ is projected on the ball: ``"end"``, once after the inner pass
      (the paper's notebooks: the steps themselves are unconstrained, so δ can grow far
      beyond C and only its direction survives the projection); ``"step"``, after every inner
      step (projected gradient descent on the constrained problem).
    inner_candidates: further inner solvers, each ``(inner_optimizer, inner_lr,
      inner_projection)``, run from δ = 0 like the main one.  The round keeps the candidate
      δ (after projection) with the best inner objective over the whole clean set,
      ``max_δ (1/n) Σ_i CE(f_θ(x_i + δ), ŷ_i) − λ‖δ‖²`` (ŷ as in the inner pass): restarts
      of the inner maximisation, keeping the strongest.  The index of the chosen solver
      (0: the main one) is ``inner_choice`` in the history; every candidate's score and
      locality (:func:`locality`) are ``candidate_scores`` and ``candidate_locality``.
    inner_use: ``"best"``: the outer steps unlearn the kept δ only (above); ``"all"``: they
      unlearn every candidate's δ, each outer step taking the mean of the hypergradients
      of ``L_out(θ, δ_k*(θ))`` over the candidates k (each with its own perturbed images
      and implicit term; the minimax over several local maxima of the inner problem).  The
      history's ``inner_choice``, ``delta_norm`` and the returned ``perturbation`` still
      describe the strongest one.  An outer step costs one hypergradient per
      candidate.
    inner_refine: None, or a solver ``(inner_optimizer, inner_lr, inner_projection)`` that
      continues from the main solver's projected δ for ``inner_epochs`` more passes (a fresh
      optimizer state); its projected result replaces the main solver's δ (candidate 0).
      E.g. ``("normalized", 2.0, "step")``: L2 PGD warm-started at the paper's pass, which
      keeps the direction the paper's pass finds and makes it a constrained maximiser
      (``benchmarks/trigger_probe.py``: from zero, L2 PGD with C = 10 found a perturbation
      unrelated to the trigger on the paper's CIFAR-10 BadNets model; from the paper's pass
      it stays on the trigger on all three official models).
    clamp: clip ``x + δ`` to [0, 1] wherever the model sees a perturbed image.
    perturbed_fraction: fraction of each outer batch that gets ``+δ`` (at least one image).
    hypergrad_batch: ``"first"``: ``L_in`` of the hypergradient uses the round's first batch
      (the paper's code); ``"current"``: the current outer batch.
    fixed_point: the map whose fixed point δ* is differentiated.  ``"gradient"``:
      ``Φ(δ, θ) = δ − η ∇_δ L_in(δ, θ)`` (the paper's code; its fixed points are the
      stationary points of the unconstrained ``L_in``); ``"projected"``:
      ``Φ(δ, θ) = Π_C(δ − η ∇_δ L_in(δ, θ))`` with ``Π_C`` the projection on the L2 ball of
      radius ``norm_bound`` (projected gradient descent, whose fixed points are the
      stationary points of the constrained inner problem ``min_{‖δ‖≤C} L_in``; when the
      bound is active its Jacobian drops the radial direction and scales the rest by
      ``C/‖δ − η∇L_in‖``).  Same as ``"gradient"`` when ``norm_bound`` is None.
    fixed_point_lr: η in the fixed-point map.
    solver: ``"neumann"``, ``"cg"`` or ``"normal_cg"`` (see :mod:`ibau_jax.hypergrad`).
    solver_iterations: K for Neumann, the maximum iterations for CG.
    solver_tol: relative tolerance for the CG solvers.
    outer_optimizer: ``"adam"``, ``"sgd"`` or any ``optax.GradientTransformation``
      (then ``outer_lr`` is ignored).
    outer_lr: learning rate of the named outer optimizer.
    outer_lr_decay: γ in (0, 1]: the outer updates of round ``r`` are scaled by ``γ^r`` (for
      Adam and SGD the same as a learning rate ``outer_lr · γ^r``), so later rounds move the
      model less.  1: no decay (the paper).
    loop: ``"scan"``: each round is one compiled program (``lax.scan`` over batches);
      ``"python"``: one compiled program per step, looped over in Python (faster on CPU, where
      XLA runs convolution gradients inside loops slowly); ``"auto"``: python on CPU, scan on
      GPU/TPU.  Both give the same result.
    select: which variables :func:`unlearn` returns.  ``"last"``: the last round's (the
      paper).  ``"average"``: the uniform average of the parameters after rounds
      ``average_from`` .. ``rounds - 1`` (the rounds themselves run as with ``"last"``;
      only the returned parameters differ, as in stochastic weight averaging).  The ASR
      of single rounds jumps up and down from round to round; the average smooths that
      out where most rounds are low, but keeps a backdoor that came back in some of them
      (docs/results.md).  ``"probe"``: before the first round,
      :func:`ibau_jax.probe.find_suspect` looks on the first ``probe_images`` clean images
      for a class that a small universal perturbation sends most images to (radii
      ``probe_bounds``, smallest first); after every round,
      :func:`ibau_jax.probe.targeted_success` measures the share of those images that a
      universal perturbation of the suspect's radius sends to that class (in the history
      as ``probe``), and the round with the lowest share is returned (the later one on
      ties).  On the paper's GTSRB BadNets model this share ranked the rounds as the real
      trigger's ASR did; on its CIFAR-10 model it did not (docs/results.md).  With no
      suspect, the last round is returned.
    average_from: the first round in the average of ``select="average"``.
    probe_bounds: L2 radii tried, smallest first, for the suspect class.
    probe_images: clean images used by the probes (the first ones; at most all of them,
      at least ``batch_size``).
    probe_epochs: passes of the probes' PGD over those images.
    probe_min_share: the share of images one class must receive to be the suspect.
    retries: how many rounds, in all, may be run again because the backdoor was still
      fully there after them (default 2; 0, as in :meth:`official`: never, the paper's
      code).  With ``retries > 0``, before the first round the main inner solver makes
      ``inner_epochs`` passes (batches in order) over the clean set on the input model,
      and :func:`ibau_jax.probe.cut_stamp` cuts a stamp out of its δ₀: the ⌈2 %⌉ pixel
      locations where ``Σ_c δ₀²`` is largest, set to ``1[δ₀ > 0]``.  The class the stamp
      sends most of the first ``probe_images`` clean images to is its target
      (``result.stamp``: target and share on the input model).  If that share is at least
      ``retry_share`` (the input model has a patch-like backdoor), the stamp's share is
      measured again after every round (``stamp_share`` in the history), and a round whose
      share is ≥ ``retry_share`` is discarded while retries are left and run again from the
      state before it with the key ``fold_in(fold_in(key, r), attempt)`` (the discarded
      attempts are listed in the round's ``retried``).  On the paper's CIFAR-10 BadNets
      model the share after round 0 was 0.72 where the round had left the real trigger at
      95 % ASR, and at most 0.003 where it had left 0.2-20 %: the check sees a round that
      failed outright, not a partial one (docs/results.md, session 20).  If the last round
      still has a share ≥ ``retry_share``, :func:`unlearn` warns (``UserWarning``).
    retry_share: the stamp share at and above which a round counts as having left the
      backdoor in place, in (0, 1].
    repair_epochs: passes of a *repair* fine-tuning after the rounds (default 2; 0, as in
      :meth:`official`: none).  A round can leave part of a patch backdoor that answers the
      exact trigger only (on the paper's CIFAR-10 BadNets model, 7-32 % ASR after some
      rounds, invisible to the stamp of ``retries`` and to universal perturbations;
      docs/results.md, session 21).  The repair looks for it where the input model's inner
      solution δ₀ (the stamp's) points: in the ``repair_window × repair_window`` window
      ``w`` of pixel locations with the largest ``Σ_w Σ_c δ₀²``
      (:func:`ibau_jax.probe.best_window`) it fits, on the input model, a pattern
      ``p₀ = sigmoid(u₀)`` that sends the clean probe images to the stamp's target ``t``
      (:func:`ibau_jax.probe.fit_window`: ``repair_fit_steps`` Adam steps on
      ``CE(f((1 − m_w) ⊙ x + m_w ⊙ p), t)`` from mid-grey).  If ``p₀`` sends at least
      ``repair_share`` of them there (the input model has a backdoor in that window), then
      before each of the ``repair_epochs`` passes the pattern is fitted again on the current
      model, starting from the last one (so it follows what is left of the trigger), and
      the pass fine-tunes the parameters on the clean set with their true labels, the first
      ``⌈repair_fraction · batch_size⌉`` images of every (shuffled) batch pasted with the
      pattern: ``min_θ (1/B) Σ_i CE(f_θ(x̃_i), y_i)`` with Adam at ``repair_lr`` (Neural
      Cleanse's unlearning, with the trigger re-fitted to the model being repaired).  At
      this small rate the passes also recover the accuracy the rounds cost.  Where the check
      is inactive the returned variables are those of the rounds.  ``result.repair``
      records the window, the shares before every pass and after the last, and the time.
    repair_window: side of the repair's square window, in pixels (at most the images' side:
      larger values use the whole image).
    repair_fraction: share of every batch pasted with the fitted pattern, in (0, 1].
    repair_lr: Adam learning rate of the repair passes.
    repair_fit_steps: Adam steps (batches) of every pattern fit.
    repair_share: the share of clean probe images the pattern fitted on the input model must
      send to the target for the repair to run, in (0, 1].
    warp_epochs: passes of a *warp repair* after the rounds and the repair (default 2; 0, as
      in :meth:`official`: none), for warping triggers (WaNet), which additive perturbations
      do not imitate (docs/results.md, sessions 24-25).  A check first fits, on the input
      model, the untargeted universal warp of :func:`ibau_jax.probe.fit_warp`
      (``warp_grid × warp_grid`` control displacements in ``[−warp_bound, warp_bound]``
      pixels, ``warp_fit_steps`` Adam steps on the clean probe images): if it sends at least
      ``warp_share`` of them to one class ``t`` (:func:`ibau_jax.probe.warp_share`; the input
      model has a warping backdoor to ``t``), then before each pass the warp is fitted again
      towards ``t`` on the current model, starting from the last one, and the pass
      fine-tunes the parameters on the clean set with their true labels, the first
      ``⌈repair_fraction · batch_size⌉`` images of every (shuffled) batch warped:
      ``min_θ (1/B) Σ_i CE(f_θ(x̃_i), y_i)`` with Adam at ``repair_lr``, as the repair does
      with its pattern.  Where the check is inactive the variables are left as they are.
      ``result.warp`` records the target, the shares and the time.
    warp_grid: side k of the warp's control grid (WaNet's is 4), at least 2.
    warp_bound: largest control displacement, in pixels (WaNet's warps with strength 0.5
      move pixels by about a quarter to half a pixel).
    warp_fit_steps: Adam steps (batches) of every warp fit.
    warp_share: the share of clean probe images the untargeted warp must send to one class
      for the warp repair to run, in (0, 1].
    callback: ``callback(round_index, stats, variables)`` after every round, for progress
      display or ACC/ASR tracking; its return value is ignored.  Rounds restored from a
      checkpoint are replayed first with ``variables=None`` (their variables are not kept)
      and ``stats["seconds_before"]`` (their seconds in the interrupted run).
    progress: ``progress(done, total)`` during the repair and the warp repair, which take a
      few rounds' time after the last round: ``2 · repair_epochs + 2`` steps for the repair
      (``repair_epochs > 0``; the check's fit, then a fit and a pass per pass, then the last
      fit), then ``2 · warp_epochs + 2`` for the warp repair (``warp_epochs > 0``);
      ``total`` is their sum, and ``done`` jumps to the end of a stage whose check finds
      nothing.  Its return value is ignored.
    checkpoint_dir: a folder in which the state after every round (parameters, optimizer
      state, δ, the history, and what ``select`` keeps) is saved (``ibau.npz``, written
      atomically); a call given the same folder, inputs, key and settings resumes after the
      last saved round and returns what an uninterrupted call returns.  A state made with
      anything else (or with an optax object as ``outer_optimizer``, which has no stable
      description) is ignored and overwritten; the file is deleted when ``unlearn``
      returns.  None: nothing is saved.

  An ``IBAUConfig`` is a JAX pytree: its leaves are ``inner_lr``, ``inner_reg``,
  ``norm_bound``, ``fixed_point_lr``, ``outer_lr`` and the learning rates in
  ``inner_candidates`` and ``inner_refine``; every other field is part of its structure.  The
  compiled steps take it as an ordinary argument, so a sweep over those numbers compiles once.
  """

  rounds: int = 5
  batch_size: int = 100
  shuffle: bool = True
  inner_epochs: int = 1
  inner_lr: float = 10.0
  inner_optimizer: str = "sgd"
  inner_reg: float = 1e-3
  pseudo_labels: bool = True
  norm_bound: Optional[float] = 10.0
  inner_projection: str = "end"
  inner_candidates: tuple[tuple[str, float, str], ...] = (("normalized", 2.0, "step"),)
  inner_refine: Optional[tuple[str, float, str]] = None
  inner_use: str = "best"
  clamp: bool = False
  perturbed_fraction: float = 0.01
  hypergrad_batch: str = "first"
  fixed_point: str = "gradient"
  fixed_point_lr: float = 0.1
  solver: str = "neumann"
  solver_iterations: int = 5
  solver_tol: float = 1e-10
  outer_optimizer: Union[str, optax.GradientTransformation] = "adam"
  outer_lr: float = 1e-3
  outer_lr_decay: float = 1.0
  loop: str = "auto"
  select: str = "last"
  average_from: int = 0
  probe_bounds: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
  probe_images: int = 1000
  probe_epochs: int = 2
  probe_min_share: float = 0.5
  retries: int = 2
  retry_share: float = 0.5
  repair_epochs: int = 2
  repair_window: int = 5
  repair_fraction: float = 0.2
  repair_lr: float = 1e-4
  repair_fit_steps: int = 150
  repair_share: float = 0.5
  warp_epochs: int = 2
  warp_grid: int = 4
  warp_bound: float = 0.5
  warp_fit_steps: int = 60
  warp_share: float = 0.5
  callback: Optional[RoundCallback] = dataclasses.field(default=None, compare=False)
  progress: Optional[Callable[[int, int], Any]] = dataclasses.field(default=None, compare=False)
  checkpoint_dir: Optional[str] = dataclasses.field(default=None, compare=False)

  def __post_init__(self):
    def number(name: str, *, integer: bool = False, minimum: float = 0,
               strict: bool = True, maximum: Optional[float] = None) -> None:
      """Raises unless field ``name`` is a real number (:func:`is_number`) above
      ``minimum`` (or equal to it unless ``strict``) and at most ``maximum``."""
      value = getattr(self, name)
      ok = is_number(value, integer) and (value > minimum if strict else value >= minimum) \
          and (maximum is None or value <= maximum)
      if not ok:
        kind = "an integer" if integer else "a finite number"
        if maximum is not None:
          where = f"in {'(' if strict else '['}{minimum}, {maximum}]"
        else:
          where = f"{'>' if strict else '>='} {minimum}"
        raise ValueError(f"IBAUConfig.{name} must be {kind} {where}, got {value!r}")

    for name in ("shuffle", "pseudo_labels", "clamp"):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        raise ValueError(f"IBAUConfig.{name} must be a bool, got {getattr(self, name)!r}")
    for name in ("rounds", "batch_size", "inner_epochs", "probe_images", "probe_epochs",
                 "repair_window", "repair_fit_steps", "warp_fit_steps"):
      number(name, integer=True)
    for name in ("repair_epochs", "retries", "solver_iterations", "warp_epochs"):
      number(name, integer=True, strict=False)
    number("warp_grid", integer=True, minimum=1)
    for name in ("inner_lr", "fixed_point_lr", "outer_lr", "repair_lr", "warp_bound"):
      number(name)
    for name in ("inner_reg", "solver_tol"):
      number(name, strict=False)
    for name in ("perturbed_fraction", "outer_lr_decay", "probe_min_share", "retry_share",
                 "repair_fraction", "repair_share", "warp_share"):
      number(name, maximum=1)
    if self.norm_bound is not None and not (is_number(self.norm_bound) and self.norm_bound > 0):
      raise ValueError(f"IBAUConfig.norm_bound must be a finite number > 0 or None, "
                       f"got {self.norm_bound!r}")
    if self.select not in ("last", "average", "probe"):
      raise ValueError(f"IBAUConfig.select must be 'last', 'average' or 'probe', "
                       f"got {self.select!r}")
    if not is_number(self.average_from, integer=True) or not 0 <= self.average_from < self.rounds:
      raise ValueError(f"IBAUConfig.average_from must be an integer in [0, rounds), "
                       f"got {self.average_from!r}")
    if not isinstance(self.probe_bounds, tuple) or not self.probe_bounds or any(
        not is_number(b) or not b > 0 for b in self.probe_bounds):
      raise ValueError("IBAUConfig.probe_bounds must be a non-empty tuple of positive radii, "
                       f"got {self.probe_bounds!r}")
    if self.solver not in hypergrad.SOLVERS:
      raise ValueError(f"IBAUConfig.solver must be one of {hypergrad.SOLVERS}, got {self.solver!r}")
    if self.solver != "neumann" and self.solver_iterations < 1:
      raise ValueError(f"IBAUConfig.solver={self.solver!r} needs solver_iterations >= 1")
    if self.inner_optimizer not in ("sgd", "adam", "normalized"):
      raise ValueError(f"IBAUConfig.inner_optimizer must be 'sgd', 'adam' or 'normalized', "
                       f"got {self.inner_optimizer!r}")
    if not (isinstance(self.outer_optimizer, optax.GradientTransformation)
            or self.outer_optimizer in ("sgd", "adam")):
      raise ValueError("IBAUConfig.outer_optimizer must be 'sgd', 'adam' or an "
                       f"optax.GradientTransformation, got {self.outer_optimizer!r}")
    if self.hypergrad_batch not in ("first", "current"):
      raise ValueError(f"IBAUConfig.hypergrad_batch must be 'first' or 'current', "
                       f"got {self.hypergrad_batch!r}")
    if not isinstance(self.inner_candidates, tuple) or any(
        not _valid_solver(c) for c in self.inner_candidates):
      raise ValueError("IBAUConfig.inner_candidates must be a tuple of (optimizer, lr, "
                       "projection) tuples with optimizer in ('sgd', 'adam', 'normalized'), "
                       "lr a finite number > 0 and projection in ('end', 'step'); "
                       f"got {self.inner_candidates!r}")
    if self.inner_refine is not None and not _valid_solver(self.inner_refine):
      raise ValueError("IBAUConfig.inner_refine must be None or an (optimizer, lr, projection) "
                       "tuple with optimizer in ('sgd', 'adam', 'normalized'), lr a finite "
                       f"number > 0 and projection in ('end', 'step'); got {self.inner_refine!r}")
    if self.inner_use not in ("best", "all"):
      raise ValueError(f"IBAUConfig.inner_use must be 'best' or 'all', got {self.inner_use!r}")
    if self.inner_projection not in ("end", "step"):
      raise ValueError(f"IBAUConfig.inner_projection must be 'end' or 'step', "
                       f"got {self.inner_projection!r}")
    if self.fixed_point not in ("gradient", "projected"):
      raise ValueError(f"IBAUConfig.fixed_point must be 'gradient' or 'projected', "
                       f"got {self.fixed_point!r}")
    _loops.check("IBAUConfig", self.loop)
    if self.callback is not None and not callable(self.callback):
      raise ValueError("IBAUConfig.callback must be callable or None")
    if self.progress is not None and not callable(self.progress):
      raise ValueError("IBAUConfig.progress must be callable or None")
    _resume.check_folder("IBAUConfig", self.checkpoint_dir)

  @classmethod
  def official(cls, **overrides) -> "IBAUConfig":
    """The paper's code: one round, batches of 100, δ from one SGD pass (lr 10) on the
    model's own predictions, L2 radius 10, no clamping, 1 % of each outer batch perturbed,
    ``L_in`` on the first batch, η = 0.1, Neumann K = 5, Adam lr 1e-3, no stamp check and no
    repair."""
    base = dict(rounds=1, batch_size=100, shuffle=True, inner_epochs=1, inner_lr=10.0,
                inner_optimizer="sgd", inner_reg=1e-3, pseudo_labels=True, norm_bound=10.0,
                inner_projection="end", inner_candidates=(), inner_refine=None, clamp=False,
                perturbed_fraction=0.01,
                hypergrad_batch="first", fixed_point="gradient", fixed_point_lr=0.1,
                solver="neumann", solver_iterations=5, outer_optimizer="adam", outer_lr=1e-3,
                retries=0, repair_epochs=0, warp_epochs=0)
    base.update(overrides)
    return cls(**base)

  def replace(self, **changes) -> "IBAUConfig":
    return dataclasses.replace(self, **changes)


# The numbers the compiled steps compute with.  An IBAUConfig is a pytree whose leaves are
# these numbers (and the learning rates of ``inner_candidates`` and ``inner_refine``), every
# other field being part of its structure: passed to a compiled step as an ordinary argument,
# configurations that differ only in these numbers share one compiled program.
_TRACED_FIELDS = ("inner_lr", "inner_reg", "norm_bound", "fixed_point_lr", "outer_lr")


def _config_flatten(config: IBAUConfig):
  as_leaf = lambda v: float(v) if isinstance(v, (int, float, np.number)) else v
  leaves = tuple(as_leaf(getattr(config, f)) for f in _TRACED_FIELDS)
  candidate_lrs = tuple(as_leaf(c[1]) for c in config.inner_candidates)
  refine_lr = None if config.inner_refine is None else as_leaf(config.inner_refine[1])
  aux = tuple((f.name, getattr(config, f.name)) for f in dataclasses.fields(config)
              if f.name not in _TRACED_FIELDS + ("inner_candidates", "inner_refine"))
  aux += (("inner_candidates", tuple((c[0], c[2]) for c in config.inner_candidates)),
          ("inner_refine", None if config.inner_refine is None
           else (config.inner_refine[0], config.inner_refine[2])))
  return (leaves, candidate_lrs, refine_lr), aux


def _config_unflatten(aux, children) -> IBAUConfig:
  (leaves, candidate_lrs, refine_lr), fields = children, dict(aux)
  fields.update(zip(_TRACED_FIELDS, leaves))
  fields["inner_candidates"] = tuple((o, lr, p) for (o, p), lr in
                                     zip(fields["inner_candidates"], candidate_lrs))
  if fields["inner_refine"] is not None:
    fields["inner_refine"] = (fields["inner_refine"][0], refine_lr, fields["inner_refine"][1])
  return _unchecked(IBAUConfig, fields)


def _unchecked(cls, fields: Mapping[str, Any]):
  """An instance of the frozen dataclass ``cls`` without ``__post_init__``'s checks (its
  numbers may be tracers inside a compiled step)."""
  out = object.__new__(cls)
  for name, value in fields.items():
    object.__setattr__(out, name, value)
  return out


def _with(config: IBAUConfig, **changes) -> IBAUConfig:
  """``config.replace(**changes)`` without the checks (usable on traced numbers)."""
  return _unchecked(IBAUConfig, {**{f.name: getattr(config, f.name)
                                    for f in dataclasses.fields(config)}, **changes})


jax.tree_util.register_pytree_node(IBAUConfig, _config_flatten, _config_unflatten)


CHECKPOINT_FILE = "ibau.npz"


@dataclasses.dataclass(frozen=True)
class UnlearnResult:
  """What :func:`unlearn` returns.

  Attributes:
    variables: the unlearned variables, same tree structure as the input.
    history: one dict per round with ``round``, ``inner_loss`` (mean over inner steps),
      ``outer_loss`` (mean over outer steps), ``delta_norm`` (‖δ‖₂ after projection),
      ``residual_mean`` / ``residual_max`` (hypergradient solver's relative residual),
      ``inner_choice`` (which inner solver's δ was kept, see ``inner_candidates``),
      ``candidate_scores`` (each inner solver's objective; empty without
      ``inner_candidates``), ``candidate_locality`` (each inner solver's δ
      :func:`locality`), ``seconds`` (wall time, the first round including compilation)
      and, with ``select="probe"``, ``probe`` (the suspect's targeted success share) and
      ``probe_seconds``.  Rounds restored from a checkpoint (``checkpoint_dir``) also have
      ``seconds_before``, equal to their ``seconds`` in the interrupted call.
    perturbation: the last round's δ, shape ``(H, W, C)``.
    selected_round: the round whose variables were returned (None for
      ``select="average"``).
    suspect: with ``select="probe"``, :func:`ibau_jax.probe.find_suspect`'s result on the
      input model (None: no suspect class, or ``select="last"``).
    stamp: with ``retries > 0`` or ``repair_epochs > 0``, the stamp check on the input
      model (see ``IBAUConfig.retries``): ``target`` (the class the stamp sends most clean probe
      images to), ``share`` (the share it sends there), ``active`` (``share ≥
      retry_share`` and ``retries > 0``: the rounds are checked) and ``seconds``; None with
      ``retries=0`` and ``repair_epochs=0``.
    repair: with ``repair_epochs > 0``, the repair (see ``IBAUConfig.repair_epochs``):
      ``target`` (the stamp's), ``corner`` and ``size`` of the window, ``input_share`` (the
      share of clean probe images the pattern fitted on the input model sends to the
      target), ``active`` (``input_share ≥ repair_share``: the passes ran), ``shares`` (the
      re-fitted pattern's share before every pass and after the last), ``losses`` (each
      pass's mean loss) and ``seconds``; None with ``repair_epochs=0``.
    warp: with ``warp_epochs > 0``, the warp repair (see ``IBAUConfig.warp_epochs``):
      ``target`` (the class the input model's untargeted warp sends most probe images to),
      ``input_share`` (the share it sends there), ``active`` (``input_share ≥ warp_share``),
      ``shares`` (the re-fitted warp's share before every pass and after the last),
      ``losses``, ``phi`` (the last fitted control displacements, ``(k, k, 2)`` nested
      lists, pixels: for :func:`ibau_jax.probe.warp`) and ``seconds``; None with
      ``warp_epochs=0``.
  """

  variables: PyTree
  history: list[dict]
  perturbation: jax.Array
  selected_round: Optional[int] = -1
  suspect: Optional[dict] = None
  stamp: Optional[dict] = None
  repair: Optional[dict] = None
  warp: Optional[dict] = None


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _make_optimizer(name_or_tx, lr: float) -> optax.GradientTransformation:
  if isinstance(name_or_tx, optax.GradientTransformation):
    return name_or_tx
  return optax.adam(lr) if name_or_tx == "adam" else optax.sgd(lr)


def _project(delta: jax.Array, bound: Optional[float]) -> jax.Array:
  if bound is None:
    return delta
  norm = jnp.sqrt(jnp.sum(delta * delta))
  return delta * jnp.minimum(1.0, bound / jnp.maximum(norm, 1e-12))


def _perturb(x: jax.Array, delta: jax.Array, clamp: bool) -> jax.Array:
  out = x + delta
  return jnp.clip(out, 0.0, 1.0) if clamp else out


def _inner_loss(config, logits_fn, delta, params, x, y):
  """``L_in(δ, θ) = −CE(f_θ(x + δ), y) + λ‖δ‖²`` (x + δ clipped to [0, 1] if ``clamp``)."""
  return (-_cross_entropy(logits_fn(params, _perturb(x, delta, config.clamp)), y)
          + config.inner_reg * jnp.sum(delta * delta))


def _outer_loss(config, logits_fn, delta, params, x, y, mask):
  """``L_out(δ, θ) = CE(f_θ(x + m ⊙ δ), y)`` with ``m`` a 0/1 vector over the batch."""
  mask = mask.reshape((-1,) + (1,) * (x.ndim - 1))
  return _cross_entropy(logits_fn(params, x + mask * (_perturb(x, delta, config.clamp) - x)), y)


def hypergradient(config: IBAUConfig, logits_fn: Callable[[PyTree, jax.Array], jax.Array],
                  params: PyTree, delta: jax.Array, x: jax.Array, y: jax.Array,
                  mask: jax.Array, x_inner: jax.Array, y_inner: jax.Array, *,
                  solver: Optional[hypergrad.LinearSolver] = None):
  """The implicit hypergradient of one outer step.

  Returns ``(L_out, g, residual)`` with

      g = ∇_θ L_out(δ, θ) + (∂_θ Φ)ᵀ v,   (I − ∂_δ Φ)ᵀ v = ∇_δ L_out(δ, θ),

  ``Φ(δ, θ) = δ − η ∇_δ L_in(δ, θ)`` (projected on the ball of radius C when
  ``config.fixed_point == "projected"``) with ``L_in`` on ``(x_inner, y_inner)`` and ``L_out`` on
  ``(x, y)`` with δ added where ``mask`` is 1.  δ is treated as the inner solution.

  Args:
    config: supplies η, λ, clamping and (unless ``solver`` is given) the linear solver.
    logits_fn: ``logits_fn(params, images) -> logits``.
    params, delta, x, y, mask, x_inner, y_inner: as above; ``mask`` has shape ``(B,)``.
  """
  if solver is None:
    solver = hypergrad.make_solver(config.solver, iterations=config.solver_iterations,
                                   tol=config.solver_tol)
  loss, (g_delta, g_params) = jax.value_and_grad(
      functools.partial(_outer_loss, config, logits_fn), argnums=(0, 1))(
          delta, params, x, y, mask)

  def fixed_point(d, p):
    step = d - config.fixed_point_lr * jax.grad(
        functools.partial(_inner_loss, config, logits_fn))(d, p, x_inner, y_inner)
    return _project(step, config.norm_bound) if config.fixed_point == "projected" else step

  (implicit,), residual = hypergrad.fixed_point_vjp(fixed_point, delta, (params,), g_delta,
                                                    solver)
  return loss, jax.tree_util.tree_map(jnp.add, g_params, implicit), residual


def _logits_fn(apply_fn: ApplyFn, rest: PyTree):
  return lambda p, x: apply_fn({"params": p, **rest}, x)


def _inner_tx(config: IBAUConfig) -> optax.GradientTransformation:
  if config.inner_optimizer == "adam":
    return optax.adam(config.inner_lr)
  if config.inner_optimizer == "normalized":
    # δ ← δ − lr ∇L_in / ‖∇L_in‖₂: steps of length lr (L2 PGD when projected every step).
    return optax.chain(optax.normalize_by_update_norm(scale_factor=1.0),
                       optax.scale(-config.inner_lr))
  return optax.sgd(config.inner_lr)


def _batches(config: IBAUConfig, images: jax.Array, labels: jax.Array, key: jax.Array,
             sharding: Optional[jax.sharding.Sharding] = None):
  """Shuffles (if configured) and splits into ``(num_batches, B, ...)`` full batches; with a
  ``sharding`` (over the ``B`` axis) the batches are laid out split across devices."""
  n, bsz = images.shape[0], config.batch_size
  num_batches = n // bsz
  if config.shuffle:
    order = jax.random.permutation(key, n)
    images, labels = images[order], labels[order]
  xb = images[:num_batches * bsz].reshape((num_batches, bsz) + images.shape[1:])
  yb = labels[:num_batches * bsz].reshape((num_batches, bsz))
  if sharding is not None:
    xb = jax.lax.with_sharding_constraint(xb, _batch_axis(sharding, xb.ndim))
    yb = jax.lax.with_sharding_constraint(yb, _batch_axis(sharding, yb.ndim))
  return xb, yb


def _batch_axis(sharding: Optional[jax.sharding.NamedSharding], ndim: int, lead: int = 1):
  """``sharding``'s mesh split along axis ``lead`` of an ``ndim``-array (None: unsharded)."""
  if sharding is None:
    return None
  spec = [None] * ndim
  spec[lead] = sharding.mesh.axis_names[0]
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def _take(xb: jax.Array, yb: jax.Array, index: jax.Array,
          sharding: Optional[jax.sharding.NamedSharding] = None):
  """Batch ``index`` of ``(xb, yb)``, kept split across devices when ``sharding`` is given."""
  x = jax.lax.dynamic_index_in_dim(xb, index, keepdims=False)
  y = jax.lax.dynamic_index_in_dim(yb, index, keepdims=False)
  if sharding is not None:
    x = jax.lax.with_sharding_constraint(x, _batch_axis(sharding, x.ndim, 0))
    y = jax.lax.with_sharding_constraint(y, _batch_axis(sharding, y.ndim, 0))
  return x, y


def _inner_step(config: IBAUConfig, apply_fn: ApplyFn, params: PyTree, rest: PyTree,
                delta: jax.Array, state: PyTree, x: jax.Array, y: jax.Array):
  """One optimizer step of the inner problem on a batch; returns ``(δ, state, L_in)``."""
  logits_fn = _logits_fn(apply_fn, rest)
  if config.pseudo_labels:
    y = jnp.argmax(jax.lax.stop_gradient(logits_fn(params, x)), axis=-1)
  loss, g = jax.value_and_grad(functools.partial(_inner_loss, config, logits_fn))(
      delta, params, x, y)
  updates, state = _inner_tx(config).update(g, state, delta)
  delta = optax.apply_updates(delta, updates)
  if config.inner_projection == "step":
    delta = _project(delta, config.norm_bound)
  return delta, state, loss


def _outer_step(config: IBAUConfig, apply_fn: ApplyFn, params: PyTree, opt_state: PyTree,
                rest: PyTree, delta: jax.Array, x: jax.Array, y: jax.Array,
                x_inner: jax.Array, y_inner: jax.Array, mask_key: jax.Array, ok: jax.Array,
                round_index: jax.Array = 0):
  """One outer step.  ``ok`` is False once a hypergradient was non-finite: from then on the
  parameters stay as they were.  Returns ``(params, opt_state, finite, L_out, residual)``."""
  bsz = x.shape[0]
  num_perturbed = max(1, int(round(config.perturbed_fraction * bsz)))
  if config.hypergrad_batch == "current":
    x_inner, y_inner = x, y

  def one(d, key):
    choice = jax.random.choice(key, bsz, (num_perturbed,), replace=False)
    mask = jnp.zeros((bsz,), x.dtype).at[choice].set(1.0)
    return hypergradient(config, _logits_fn(apply_fn, rest), params, d, x, y, mask, x_inner,
                         y_inner)

  if delta.ndim == x.ndim:
    # inner_use="all": one δ per candidate (stacked); the mean of their hypergradients.
    outs = [one(delta[k], jax.random.fold_in(mask_key, k)) for k in range(delta.shape[0])]
    loss = sum(o[0] for o in outs) / len(outs)
    grads = jax.tree_util.tree_map(lambda *g: sum(g) / len(g), *[o[1] for o in outs])
    residual = jnp.max(jnp.stack([o[2] for o in outs]))
  else:
    loss, grads, residual = one(delta, mask_key)
  finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g))
                                for g in jax.tree_util.tree_leaves(grads)]))
  updates, new_state = _make_optimizer(config.outer_optimizer, config.outer_lr).update(
      grads, opt_state, params)
  if config.outer_lr_decay != 1.0:
    scale = jnp.asarray(config.outer_lr_decay, jnp.float32) ** round_index
    updates = jax.tree_util.tree_map(lambda u: u * scale.astype(u.dtype), updates)
  keep = ok & finite
  select = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), new, old)
  return (select(optax.apply_updates(params, updates), params), select(new_state, opt_state),
          finite, loss, residual)


def _candidate_configs(config: IBAUConfig) -> list[IBAUConfig]:
  """The main inner solver's config, then one per ``inner_candidates`` entry."""
  main = _with(config, inner_candidates=(), inner_refine=None)
  return [main] + [_with(main, inner_optimizer=o, inner_lr=lr, inner_projection=p)
                   for o, lr, p in config.inner_candidates]


def _refine_config(config: IBAUConfig) -> Optional[IBAUConfig]:
  """The config of the ``inner_refine`` solver, or None."""
  if config.inner_refine is None:
    return None
  o, lr, p = config.inner_refine
  return _with(config, inner_candidates=(), inner_refine=None, inner_optimizer=o,
               inner_lr=lr, inner_projection=p)


def _inner_objective(config: IBAUConfig, apply_fn: ApplyFn, params: PyTree, rest: PyTree,
                     delta: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
  """``−L_in(δ)`` on a batch, with the inner pass's labels (pseudo-labels or ``y``)."""
  logits_fn = _logits_fn(apply_fn, rest)
  if config.pseudo_labels:
    y = jnp.argmax(logits_fn(params, x), axis=-1)
  return -_inner_loss(config, logits_fn, delta, params, x, y)


LOCALITY_SHARE = 0.02


def locality(delta: jax.Array) -> jax.Array:
  """Share of ``‖δ‖²`` on the ⌈2 %⌉ of pixel locations where δ is largest.

  δ has shape ``(H, W, C)``; a location's energy is ``Σ_c δ_{p,c}²``.  1 for a δ on at most
  that many pixels, ``0.02`` for one spread evenly over the image (0 for δ = 0).
  """
  energy = jnp.sum(jnp.square(delta).reshape(-1, delta.shape[-1]), axis=-1)
  k = max(1, int(np.ceil(LOCALITY_SHARE * energy.shape[0])))
  top = jax.lax.top_k(energy, k)[0]
  total = jnp.sum(energy)
  return jnp.where(total > 0, jnp.sum(top) / jnp.where(total > 0, total, 1.0), 0.0)


def _select(deltas: jax.Array, scores: jax.Array):
  """The strongest δ, its index and every δ's locality (for the history)."""
  choice = jnp.argmax(scores)
  return deltas[choice], choice, jax.vmap(locality)(deltas)


def _round_stats(delta, inner_losses, outer_losses, residuals, finite, choice=0,
                 scores=None, local=None):
  finite = jnp.asarray(finite)
  if scores is None:
    scores, local = jnp.zeros((0,)), locality(delta)[None]
  first_bad = jnp.where(jnp.all(finite), -1, jnp.argmin(finite))
  return dict(inner_loss=jnp.mean(inner_losses), outer_loss=jnp.mean(outer_losses),
              inner_choice=jnp.asarray(choice, jnp.int32),
              delta_norm=jnp.sqrt(jnp.sum(delta * delta)),
              residual_mean=jnp.mean(residuals), residual_max=jnp.max(residuals),
              finite=jnp.all(finite), bad_step=first_bad,
              candidate_scores=jnp.asarray(scores, jnp.float32),
              candidate_locality=jnp.asarray(local, jnp.float32))


def _round_scan(config: IBAUConfig, apply_fn: ApplyFn, params: PyTree, opt_state: PyTree,
                rest: PyTree, images: jax.Array, labels: jax.Array, key: jax.Array,
                sharding: Optional[jax.sharding.NamedSharding] = None,
                round_index: jax.Array = 0):
  """One whole round as one compiled program (``lax.scan`` over batches)."""
  k_perm, k_mask = jax.random.split(key)
  xb, yb = _batches(config, images, labels, k_perm, sharding)
  delta0 = jnp.zeros(images.shape[1:], images.dtype)
  reps = (config.inner_epochs,) + (1,) * (xb.ndim - 1)
  deltas, scores, all_losses = [], [], []
  refine = _refine_config(config)
  for i, c in enumerate(_candidate_configs(config)):

    def inner(carry, batch, c=c):
      delta, state, loss = _inner_step(c, apply_fn, params, rest, *carry, *batch)
      return (delta, state), loss

    (delta, _), inner_losses = jax.lax.scan(
        inner, (delta0, _inner_tx(c).init(delta0)),
        (jnp.tile(xb, reps), jnp.tile(yb, (config.inner_epochs, 1))))
    delta = _project(delta, config.norm_bound)
    if i == 0 and refine is not None:
      (delta, _), _ = jax.lax.scan(
          functools.partial(inner, c=refine), (delta, _inner_tx(refine).init(delta)),
          (jnp.tile(xb, reps), jnp.tile(yb, (config.inner_epochs, 1))))
      delta = _project(delta, config.norm_bound)
    deltas.append(delta)
    all_losses.append(inner_losses)
    if config.inner_candidates:
      scores.append(jax.lax.map(
          lambda batch, d=delta: _inner_objective(config, apply_fn, params, rest, d, *batch),
          (xb, yb)).sum())
  inner_losses = all_losses[0]
  choice, scores, local = 0, jnp.stack(scores) if scores else None, None
  if config.inner_candidates:
    delta, choice, local = _select(jnp.stack(deltas), scores)

  outer_delta = jnp.stack(deltas) if config.inner_use == "all" and len(deltas) > 1 else delta

  def outer(carry, inputs):
    p, state, ok = carry
    index, x, y = inputs
    p, state, finite, loss, residual = _outer_step(
        config, apply_fn, p, state, rest, outer_delta, x, y, xb[0], yb[0],
        jax.random.fold_in(k_mask, index), ok, round_index)
    return (p, state, ok & finite), (loss, residual, finite)

  (params, opt_state, _), (outer_losses, residuals, finite) = jax.lax.scan(
      outer, (params, opt_state, jnp.asarray(True)),
      (jnp.arange(xb.shape[0], dtype=jnp.int32), xb, yb))
  return params, opt_state, delta, _round_stats(delta, inner_losses, outer_losses, residuals,
                                                finite, choice, scores, local)


_round_scan_jit = jax.jit(_round_scan, static_argnums=(1, 8))
_batches_jit = jax.jit(_batches, static_argnums=(4,))
_take_jit = jax.jit(_take, static_argnums=(3,))
_inner_objective_jit = jax.jit(_inner_objective, static_argnums=(1,))
_select_jit = jax.jit(_select)
_inner_step_jit = jax.jit(_inner_step, static_argnums=(1,))
_outer_step_jit = jax.jit(_outer_step, static_argnums=(1,))
_project_jit = jax.jit(_project)
_round_stats_jit = jax.jit(_round_stats)


def _round_steps(config: IBAUConfig, apply_fn: ApplyFn, params: PyTree, opt_state: PyTree,
                 rest: PyTree, images: jax.Array, labels: jax.Array, key: jax.Array,
                 sharding: Optional[jax.sharding.NamedSharding] = None,
                 round_index: jax.Array = 0):
  """The same round as :func:`_round_scan`, one compiled program per step.

  XLA:CPU runs convolution gradients inside while-loop bodies many times slower than the
  same program outside a loop (measured here: ~40x for a small-VGG16 gradient), so on CPU the
  batches are looped over in Python.  Dispatch is asynchronous (nothing returns to the host
  until the round's statistics are read), except on CPU with a mesh, where each step waits
  for the previous one (see ``sync`` below).
  """
  k_perm, k_mask = jax.random.split(key)
  # XLA:CPU runs the per-device parts of a multi-device program on a small host thread pool;
  # with several such programs in flight the two halves of one all-reduce can wait behind
  # each other for ever (seen with 2 forced host devices on 2 cores).  There, every step
  # waits for the previous one to finish.
  sync = (jax.block_until_ready if sharding is not None and jax.default_backend() == "cpu"
          else (lambda tree: tree))
  xb, yb = sync(_batches_jit(config, images, labels, k_perm, sharding))
  batches = sync([_take_jit(xb, yb, b, sharding) for b in range(xb.shape[0])])
  deltas, scores, all_losses = [], [], []
  refine = _refine_config(config)
  for i, c in enumerate(_candidate_configs(config)):
    delta = jnp.zeros(images.shape[1:], images.dtype)
    state = _inner_tx(c).init(delta)
    inner_losses = []
    for _ in range(config.inner_epochs):
      for x, y in batches:
        delta, state, loss = sync(_inner_step_jit(c, apply_fn, params, rest, delta, state,
                                                  x, y))
        inner_losses.append(loss)
    delta = _project_jit(delta, config.norm_bound)
    if i == 0 and refine is not None:
      state = _inner_tx(refine).init(delta)
      for _ in range(config.inner_epochs):
        for x, y in batches:
          delta, state, _ = sync(_inner_step_jit(refine, apply_fn, params, rest, delta, state,
                                                 x, y))
      delta = _project_jit(delta, config.norm_bound)
    deltas.append(delta)
    all_losses.append(inner_losses)
    if config.inner_candidates:
      scores.append(sum(sync(_inner_objective_jit(config, apply_fn, params, rest, delta, x, y))
                        for x, y in batches))
  inner_losses = all_losses[0]
  choice, scores, local = 0, jnp.stack(scores) if scores else None, None
  if config.inner_candidates:
    delta, choice, local = _select_jit(jnp.stack(deltas), scores)
  ok = jnp.asarray(True)
  outer_delta = jnp.stack(deltas) if config.inner_use == "all" and len(deltas) > 1 else delta
  outer_losses, residuals, finites = [], [], []
  for b, (x, y) in enumerate(batches):
    params, opt_state, finite, loss, residual = sync(_outer_step_jit(
        config, apply_fn, params, opt_state, rest, outer_delta, x, y, *batches[0],
        jax.random.fold_in(k_mask, b), ok, round_index))
    ok = ok & finite
    outer_losses.append(loss)
    residuals.append(residual)
    finites.append(finite)
  stats = _round_stats_jit(delta, jnp.stack(inner_losses), jnp.stack(outer_losses),
                           jnp.stack(residuals), jnp.stack(finites), choice, scores, local)
  return params, opt_state, delta, stats


def _inner_pass(config: IBAUConfig, apply_fn: ApplyFn, params: PyTree, rest: PyTree,
                images: jax.Array, labels: jax.Array, epochs: int,
                start: Optional[jax.Array] = None) -> jax.Array:
  """δ of ``config``'s main inner solver after ``epochs`` passes over the full batches of
  ``images`` in order, from ``start`` (default 0), projected on the ball (the stamp of
  ``IBAUConfig.retries``; the benchmarks' one-off inner solutions)."""
  c = _candidate_configs(config)[0]
  delta = (jnp.zeros(images.shape[1:], jnp.float32) if start is None
           else jnp.asarray(start, jnp.float32))
  state = _inner_tx(c).init(delta)
  bsz = config.batch_size
  for _ in range(epochs):
    for i in range(0, images.shape[0] - bsz + 1, bsz):
      delta, state, _ = _inner_step_jit(c, apply_fn, params, rest, delta, state,
                                        images[i:i + bsz], labels[i:i + bsz])
  return _project_jit(delta, config.norm_bound)


def _compiled_programs() -> int:
  """How many programs the round functions have compiled so far (for tests)."""
  return sum(f._cache_size() for f in (_round_scan_jit, _batches_jit, _inner_step_jit,  # pylint: disable=protected-access
                                       _outer_step_jit, _project_jit, _round_stats_jit,
                                       _take_jit, _inner_objective_jit, _select_jit))


# --------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------


# Fields that only :func:`unlearn`'s Python code reads: the compiled steps get them at their
# defaults, so that calls which differ only there share compiled programs.
_HOST_ONLY_FIELDS = ("rounds", "select", "average_from", "probe_bounds", "probe_images",
                     "probe_epochs", "probe_min_share", "retries", "retry_share", "repair_epochs",
                     "repair_window", "repair_fraction", "repair_lr", "repair_fit_steps",
                     "repair_share", "warp_epochs", "warp_grid", "warp_bound",
                     "warp_fit_steps", "warp_share", "loop",
                     "callback", "progress", "checkpoint_dir")


def _compiled_static(config: IBAUConfig) -> IBAUConfig:
  """``config`` as the compiled steps get it (its numbers are traced, its structure is part
  of their cache key)."""
  return dataclasses.replace(config, **{f: IBAUConfig.__dataclass_fields__[f].default
                                        for f in _HOST_ONLY_FIELDS})


def _validate(apply_fn, variables, images, labels, config, key) -> int:
  """Checks the inputs of :func:`unlearn`; returns the number of classes."""
  if not isinstance(config, IBAUConfig):
    raise ValueError(f"config must be an IBAUConfig, got {type(config).__name__}")
  _prng.check_key(key)
  num_classes = validate_clean_set(apply_fn, variables, images, labels, config.batch_size)
  _check_finite_variables(variables)
  return num_classes


def _check_finite_variables(variables: PyTree) -> None:
  """Raises a ``ValueError`` naming the first floating leaf of ``variables`` (in tree
  order) that holds a NaN or an infinity; one pass over the leaves on the host."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    if isinstance(leaf, (float, complex)):
      leaf = np.asarray(leaf)
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
      continue
    bad = int(np.size(leaf) - np.count_nonzero(np.isfinite(np.asarray(leaf))))
    if bad:
      raise ValueError(f"variables{jax.tree_util.keystr(path)} contains NaN or infinite values "
                       f"({bad} of {np.size(leaf)}); unlearning needs a model with finite "
                       "parameters and statistics")


def validate_clean_set(apply_fn, variables, images, labels, batch_size: int) -> int:
  """The checks every defense makes on its inputs (clear ``ValueError``s); returns the
  number of classes the model outputs."""
  if not callable(apply_fn):
    raise ValueError("apply_fn must be callable: apply_fn(variables, images) -> logits")
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError("variables must be a mapping with a 'params' collection (Flax "
                     f"variables); got {type(variables).__name__}"
                     + (f" with keys {sorted(variables)}" if isinstance(variables, Mapping) else ""))
  images_np = metrics.check_images(np.asarray(images))
  labels_np = np.asarray(labels)
  if labels_np.ndim != 1 or labels_np.shape[0] != images_np.shape[0]:
    raise ValueError(f"labels must have shape ({images_np.shape[0]},) to match images; "
                     f"got {labels_np.shape}")
  if not np.issubdtype(labels_np.dtype, np.integer):
    raise ValueError(f"labels must be integers; got dtype {labels_np.dtype}")
  n = images_np.shape[0]
  if n < batch_size:
    raise ValueError(f"the clean set has {n} images, fewer than one batch "
                     f"(batch_size={batch_size})")
  try:
    out = jax.eval_shape(apply_fn, variables, jax.ShapeDtypeStruct((1,) + images_np.shape[1:],
                                                                   jnp.float32))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"apply_fn(variables, images) failed on images of shape "
                     f"{(1,) + images_np.shape[1:]}: {type(e).__name__}: {e}") from e
  if not hasattr(out, "shape") or len(out.shape) != 2 or out.shape[0] != 1:
    raise ValueError(f"apply_fn must return logits of shape (N, num_classes); got {out}")
  num_classes = int(out.shape[1])
  if labels_np.min() < 0 or labels_np.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}) for a model with {num_classes} "
                     f"outputs; got values in [{labels_np.min()}, {labels_np.max()}]")
  if np.unique(labels_np).size < 2:
    raise ValueError(f"the clean set has a single class ({int(labels_np[0])}); unlearning "
                     "needs images of at least two classes")
  return num_classes


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


_REPAIR_KEY = 0x7FFFFFFF  # fold_in data of the repair passes' shuffles (rounds use 0..rounds-1)


@functools.partial(jax.jit, static_argnums=(0,))
def _repair_step(apply_fn: ApplyFn, params: PyTree, state: PyTree, rest: PyTree, x: jax.Array,
                 y: jax.Array, mask: jax.Array, pattern: jax.Array, stamped: jax.Array,
                 lr: jax.Array):
  """One Adam step of the repair: ``CE(f(x̃), y)`` with ``x̃ = (1 − m) ⊙ x + m ⊙ pattern``
  where ``stamped`` and ``x`` elsewhere."""

  def loss(p):
    xs = jnp.where(stamped[:, None, None, None], (1.0 - mask) * x + mask * pattern, x)
    return _cross_entropy(apply_fn({"params": p, **rest}, xs), y)

  value, grads = jax.value_and_grad(loss)(params)
  updates, state = optax.scale_by_adam().update(grads, state)
  params = jax.tree_util.tree_map(lambda p, u: p - lr * u.astype(p.dtype), params, updates)
  return params, state, value


def _unlearning_passes(config: IBAUConfig, epochs: int, params: PyTree, images: jax.Array,
                       labels: jax.Array, key: jax.Array, stage: str, refit, step, report,
                       info: dict) -> PyTree:
  """The passes of a repair: before pass ``e``, ``refit(params)`` fits the trigger again on
  the current model and returns its arguments for ``step``; then one pass of
  ``step(params, state, x, y, *trigger, marked, lr)`` (Adam at ``repair_lr``) over the clean
  set shuffled with ``fold_in(key, e)``, the first ``⌈repair_fraction · batch_size⌉`` images
  of every batch ``marked`` to carry the trigger.  Appends each pass's mean loss to
  ``info["losses"]``; raises if the parameters turn non-finite."""
  bsz, n = config.batch_size, images.shape[0]
  state = optax.scale_by_adam().init(params)
  marked = jnp.arange(bsz) < max(1, math.ceil(config.repair_fraction * bsz))
  lr = jnp.asarray(config.repair_lr, jnp.float32)
  for epoch in range(epochs):
    trigger = refit(params)
    report(2 + 2 * epoch)
    order = jax.random.permutation(jax.random.fold_in(key, epoch), n)
    losses = []
    for i in range(0, n - bsz + 1, bsz):
      idx = order[i:i + bsz]
      params, state, loss = step(params, state, images[idx], labels[idx], *trigger, marked, lr)
      losses.append(loss)
    info["losses"].append(float(jnp.mean(jnp.stack(losses))))
    if not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(params)):
      raise NonFiniteHypergradientError(
          f"the parameters became non-finite in {stage} {epoch}; the input variables are "
          "unchanged. Try a smaller IBAUConfig.repair_lr.")
    report(3 + 2 * epoch)
  return params


def _repair(config: IBAUConfig, apply_fn: ApplyFn, params: PyTree, input_params: PyTree,
            rest: PyTree, images: jax.Array, labels: jax.Array, probe_x: np.ndarray,
            delta0: np.ndarray, target: int, key: jax.Array, report) -> tuple[PyTree, dict]:
  """``IBAUConfig.repair_epochs``: the window check and, where it fires, the repair passes
  (``report(done)`` after each step, ``2 · repair_epochs + 2`` in all)."""
  start = time.perf_counter()
  bsz, size = config.batch_size, min(config.repair_window, *delta0.shape[:2])
  corner = probe.best_window(delta0, size)
  mask = probe.window_mask(delta0.shape, corner, size)
  fit = functools.partial(probe.fit_window, apply_fn, images=probe_x, mask=mask, target=target,
                          steps=config.repair_fit_steps, batch_size=bsz)

  def share(p, u):
    return probe.window_share(apply_fn, {"params": p, **rest}, probe_x, mask, u, target, bsz)

  u = fit({"params": input_params, **rest})
  report(1)
  info = dict(target=int(target), corner=list(corner), size=size,
              input_share=share(input_params, u), shares=[], losses=[])
  info["active"] = info["input_share"] >= config.repair_share
  if info["active"]:
    def refit(p):
      nonlocal u
      u = fit({"params": p, **rest}, init=u)
      info["shares"].append(share(p, u))
      return mask, jax.nn.sigmoid(jnp.asarray(u))

    params = _unlearning_passes(
        config, config.repair_epochs, params, images, labels,
        jax.random.fold_in(key, _REPAIR_KEY), "repair pass", refit,
        lambda p, state, x, y, *a: _repair_step(apply_fn, p, state, rest, x, y, *a),
        report, info)
    u = fit({"params": params, **rest}, init=u)
    info["shares"].append(share(params, u))
  info["seconds"] = time.perf_counter() - start
  return params, info


_WARP_KEY = 0x7FFFFFFE  # fold_in data of the warp repair's shuffles


@functools.partial(jax.jit, static_argnums=(0,))
def _warp_step(apply_fn: ApplyFn, params: PyTree, state: PyTree, rest: PyTree, x: jax.Array,
               y: jax.Array, phi: jax.Array, warped: jax.Array, lr: jax.Array):
  """One Adam step of the warp repair: ``CE(f(x̃), y)`` with ``x̃ = warp(x, φ)`` where
  ``warped`` and ``x`` elsewhere."""

  def loss(p):
    xs = jnp.where(warped[:, None, None, None], probe.warp(x, phi), x)
    return _cross_entropy(apply_fn({"params": p, **rest}, xs), y)

  value, grads = jax.value_and_grad(loss)(params)
  updates, state = optax.scale_by_adam().update(grads, state)
  params = jax.tree_util.tree_map(lambda p, u: p - lr * u.astype(p.dtype), params, updates)
  return params, state, value


def _warp_repair(config: IBAUConfig, apply_fn: ApplyFn, params: PyTree,
                 input_params: PyTree, rest: PyTree, images: jax.Array, labels: jax.Array,
                 probe_x: np.ndarray, key: jax.Array, report) -> tuple[PyTree, dict]:
  """``IBAUConfig.warp_epochs``: the warp check and, where it fires, the warp repair passes
  (``report(done)`` after each step, ``2 · warp_epochs + 2`` in all)."""
  start = time.perf_counter()
  bsz = config.batch_size
  fit = functools.partial(probe.fit_warp, apply_fn, images=probe_x, bound=config.warp_bound,
                          grid=config.warp_grid, steps=config.warp_fit_steps, batch_size=bsz)
  phi = fit({"params": input_params, **rest})
  target, input_share = probe.warp_share(apply_fn, {"params": input_params, **rest}, probe_x,
                                         phi, batch_size=bsz)
  report(1)
  info = dict(target=target, input_share=input_share, shares=[], losses=[],
              active=input_share >= config.warp_share)
  if info["active"]:
    def refit(p):
      nonlocal phi
      v = {"params": p, **rest}
      phi = fit(v, target=target, init=phi)
      info["shares"].append(probe.warp_share(apply_fn, v, probe_x, phi, target, bsz)[1])
      return (jnp.asarray(phi),)

    params = _unlearning_passes(
        config, config.warp_epochs, params, images, labels,
        jax.random.fold_in(key, _WARP_KEY), "warp repair pass", refit,
        lambda p, state, x, y, *a: _warp_step(apply_fn, p, state, rest, x, y, *a),
        report, info)
    v = {"params": params, **rest}
    phi = fit(v, target=target, init=phi)
    info["shares"].append(probe.warp_share(apply_fn, v, probe_x, phi, target, bsz)[1])
  info["phi"] = np.asarray(phi).tolist()
  info["seconds"] = time.perf_counter() - start
  return params, info


def unlearn(apply_fn: ApplyFn, variables: PyTree, images, labels,
            config: IBAUConfig = IBAUConfig(), *, key: jax.Array,
            mesh: Optional[jax.sharding.Mesh] = None) -> UnlearnResult:
  """Removes a backdoor from a classifier with I-BAU (see the module docstring for the math).

  Args:
    apply_fn: ``apply_fn(variables, images) -> logits`` in inference mode, e.g.
      ``lambda v, x: model.apply(v, x, train=False)``.  Pass the same object across calls
      to reuse compiled code.
    variables: the model's variables; ``variables["params"]`` is trained, every other
      collection (e.g. ``batch_stats``) is passed through unchanged.
    images: clean images, float ``(N, H, W, C)`` in [0, 1].
    labels: their integer labels ``(N,)`` in [0, num_classes).
    config: an :class:`IBAUConfig`; :meth:`IBAUConfig.official` for the paper's code.
    key: a PRNG key (shuffling and the choice of perturbed images).
    mesh: the devices to run on, a :class:`jax.sharding.Mesh` whose first axis splits every
      batch.  None (default): all visible devices (``jax.devices()``), which on one device
      is plain single-device execution.  With several devices the clean set is replicated,
      each batch of ``batch_size`` images is split evenly over the devices (so
      ``batch_size`` must be divisible by their number), parameters, optimizer state and δ
      are replicated, and XLA sums the per-device parts of every loss, gradient and
      Hessian-vector product: the result is the single-device result up to floating-point
      summation order.  On several hosts (``jax.distributed.initialize()``), every host
      calls ``unlearn`` with the same arguments; ``jax.devices()`` then spans all hosts.

  Returns:
    An :class:`UnlearnResult` with the new variables, the per-round history and the last δ.

  Raises:
    ValueError: for malformed inputs (the message names the problem).
    NonFiniteHypergradientError: if the hypergradient turns NaN/inf; the round is stopped
      and the input ``variables`` are left as they were (JAX arrays are never mutated).
  """
  _validate(apply_fn, variables, images, labels, config, key)
  path = _resume.path(config.checkpoint_dir, CHECKPOINT_FILE)
  digest = ""
  if path is not None:
    digest = _resume.fingerprint(dataclasses.replace(config, callback=None, progress=None,
                                                     checkpoint_dir=None),
                                 arrays=(variables, images, labels, key))
  if mesh is None and jax.device_count() > 1:
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("batch",))
  if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
  sharding = None
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  if mesh is not None:
    n_dev = mesh.devices.shape[0]
    if config.batch_size % n_dev:
      raise ValueError(f"batch_size={config.batch_size} is not divisible by the {n_dev} "
                       f"devices of the mesh's first axis; use a multiple of {n_dev}")
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names[0]))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    images, labels, params, rest = jax.device_put((images, labels, params, rest), replicated)
  else:
    images, labels = jnp.asarray(images), jnp.asarray(labels)
  static = _compiled_static(config)
  loop = config.loop
  loop = "scan" if _loops.use_scan(loop) else "python"
  round_fn = _round_scan_jit if loop == "scan" else _round_steps
  opt_state = _make_optimizer(config.outer_optimizer, config.outer_lr).init(params)
  input_params = params  # a resumed call replaces params; the stamp is the input model's
  history = []
  delta = jnp.zeros(images.shape[1:], images.dtype)
  suspect, best, total = None, None, None
  first = 0
  if path is not None:
    template = dict(params=params, opt_state=opt_state, delta=delta, total=params, best=params)
    loaded = _resume.load(path, digest, template)
    if loaded is not None:
      first, _, state, text = loaded
      if mesh is not None:
        state = jax.device_put(state, replicated)
      saved = json.loads(text)
      params, opt_state, delta = state["params"], state["opt_state"], state["delta"]
      total = state["total"] if saved["has_total"] else None
      best = None if saved["best"] is None else (*saved["best"], state["best"])
      suspect = saved["suspect"]
      for entry in saved["history"]:
        entry["seconds_before"] = entry["seconds"]
        history.append(entry)
        if config.callback is not None:
          config.callback(entry["round"], dict(entry), None)
  probe_x = None  # the clean images the probes and the stamp check look at
  if (config.select == "probe" or config.retries > 0 or config.repair_epochs > 0
      or config.warp_epochs > 0):
    probe_x = np.asarray(images[:max(config.batch_size, config.probe_images)])
  probe_kw = dict(epochs=config.probe_epochs, batch_size=config.batch_size)
  if config.select == "probe" and first == 0:
    suspect = probe.find_suspect(apply_fn, variables, probe_x, bounds=config.probe_bounds,
                                 min_share=config.probe_min_share, **probe_kw)
  stamp, delta0 = None, None
  if config.retries > 0 or config.repair_epochs > 0:
    start = time.perf_counter()
    delta0 = np.asarray(_inner_pass(static, apply_fn, input_params, rest, images, labels,
                                    config.inner_epochs))
    mask, pattern = probe.cut_stamp(delta0, LOCALITY_SHARE)
    target, share = probe.stamp_share(apply_fn, {"params": input_params, **rest}, probe_x, mask,
                                      pattern, batch_size=config.batch_size)
    stamp = dict(target=target, share=share,
                 active=config.retries > 0 and share >= config.retry_share,
                 seconds=time.perf_counter() - start)
  retries_left = config.retries - sum(len(h.get("retried", ())) for h in history)
  r, discarded = first, []
  while r < config.rounds:
    start = time.perf_counter()
    round_key = jax.random.fold_in(key, r)
    if discarded:
      round_key = jax.random.fold_in(round_key, len(discarded))
    new_params, new_opt_state, new_delta, stats = round_fn(
        static, apply_fn, params, opt_state, rest, images, labels, round_key, sharding,
        jnp.asarray(r, jnp.int32))
    stats = jax.device_get(stats)
    seconds = time.perf_counter() - start
    if not bool(stats["finite"]):
      raise NonFiniteHypergradientError(
          f"the hypergradient became non-finite in round {r} at outer step "
          f"{int(stats['bad_step'])}; the input variables are unchanged. Try a smaller "
          "outer_lr or fixed_point_lr, or solver='cg'.")
    entry = dict(round=r, inner_loss=float(stats["inner_loss"]),
                 outer_loss=float(stats["outer_loss"]), delta_norm=float(stats["delta_norm"]),
                 residual_mean=float(stats["residual_mean"]),
                 residual_max=float(stats["residual_max"]),
                 inner_choice=int(stats["inner_choice"]),
                 candidate_scores=[float(v) for v in stats["candidate_scores"]],
                 candidate_locality=[float(v) for v in stats["candidate_locality"]],
                 seconds=seconds)
    if stamp is not None and stamp["active"]:
      start = time.perf_counter()
      entry["stamp_share"] = probe.stamp_share(
          apply_fn, {"params": new_params, **rest}, probe_x, mask, pattern, stamp["target"],
          config.batch_size)[1]
      entry["stamp_seconds"] = time.perf_counter() - start
      if entry["stamp_share"] >= config.retry_share and retries_left > 0:
        retries_left -= 1
        discarded.append(entry)
        continue
      entry["retried"] = discarded
    discarded = []
    params, opt_state, delta = new_params, new_opt_state, new_delta
    if suspect is not None:
      start = time.perf_counter()
      entry["probe"] = probe.targeted_success(apply_fn, {"params": params, **rest}, probe_x,
                                              suspect["target"], bound=suspect["bound"],
                                              **probe_kw)
      entry["probe_seconds"] = time.perf_counter() - start
      if best is None or entry["probe"] <= best[1]:
        best = (r, entry["probe"], params)
    if config.select == "average" and r >= config.average_from:
      total = params if total is None else jax.tree_util.tree_map(jnp.add, total, params)
    history.append(entry)
    if path is not None:
      _resume.save(path, digest, r + 1, sum(h["seconds"] for h in history),
                   dict(params=params, opt_state=opt_state, delta=delta,
                        total=params if total is None else total,
                        best=params if best is None else best[2]),
                   _resume.to_json(dict(
                       history=[{k: v for k, v in h.items() if k != "seconds_before"}
                                for h in history],
                       has_total=total is not None,
                       best=None if best is None else [best[0], best[1]], suspect=suspect)))
    if config.callback is not None:
      config.callback(r, dict(entry), {"params": params, **rest})
    r += 1
  if stamp is not None and history[-1].get("stamp_share", 0.0) >= config.retry_share:
    warnings.warn(f"after the last round the stamp cut from the input model's inner solution "
                  f"still sends {history[-1]['stamp_share']:.0%} of the clean probe images to "
                  f"class {stamp['target']}: the backdoor is likely still there (no retries "
                  "left; raise IBAUConfig.retries or run more rounds)", stacklevel=2)
  selected = config.rounds - 1
  if best is not None:
    selected, _, params = best
  if total is not None:
    count = config.rounds - config.average_from
    selected, params = None, jax.tree_util.tree_map(lambda t: t / count, total)
  repair = warp = None
  stages = [2 * e + 2 for e in (config.repair_epochs, config.warp_epochs) if e > 0]
  steps = sum(stages)  # the progress steps of the repairs

  def reporter(offset):
    def report(done):
      if config.progress is not None:
        config.progress(offset + done, steps)
    return report

  if config.repair_epochs > 0:
    report = reporter(0)
    params, repair = _repair(config, apply_fn, params, input_params, rest, images, labels,
                             probe_x, delta0, stamp["target"], key, report)
    report(stages[0])
  if config.warp_epochs > 0:
    report = reporter(steps - stages[-1])
    params, warp = _warp_repair(config, apply_fn, params, input_params, rest, images, labels,
                                probe_x, key, report)
    report(stages[-1])
  _resume.remove(path)
  return UnlearnResult(variables={**variables, "params": params} if isinstance(variables, dict)
                       else type(variables)({**variables, "params": params}),
                       history=history, perturbation=delta, selected_round=selected,
                       suspect=suspect, stamp=stamp, repair=repair, warp=warp)
