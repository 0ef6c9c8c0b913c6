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
with the same shapes and static configuration reuse the compiled code, provided the same
``apply_fn`` object is passed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ibau_jax import hypergrad

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]
RoundCallback = Callable[[int, dict, PyTree], Any]


class NonFiniteHypergradientError(FloatingPointError):
  """The hypergradient became NaN or infinite; the caller's variables are untouched."""


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
    inner_optimizer: ``"sgd"`` or ``"adam"``, the inner optimizer (on −L_in's ascent).
    inner_reg: λ in ``L_in = −CE + λ‖δ‖²``.
    pseudo_labels: fit δ against the model's own predictions (True) or the true labels.
    norm_bound: C, the L2 radius δ is projected on after the inner pass; None: no projection.
    clamp: clip ``x + δ`` to [0, 1] wherever the model sees a perturbed image.
    perturbed_fraction: fraction of each outer batch that gets ``+δ`` (at least one image).
    hypergrad_batch: ``"first"``: ``L_in`` of the hypergradient uses the round's first batch
      (the paper's code); ``"current"``: the current outer batch.
    fixed_point_lr: η in the fixed-point map ``Φ(δ, θ) = δ − η ∇_δ L_in``.
    solver: ``"neumann"``, ``"cg"`` or ``"normal_cg"`` (see :mod:`ibau_jax.hypergrad`).
    solver_iterations: K for Neumann, the maximum iterations for CG.
    solver_tol: relative tolerance for the CG solvers.
    outer_optimizer: ``"adam"``, ``"sgd"`` or any ``optax.GradientTransformation``
      (then ``outer_lr`` is ignored).
    outer_lr: learning rate of the named outer optimizer.
    callback: ``callback(round_index, stats, variables)`` after every round, for progress
      display or ACC/ASR tracking; its return value is ignored.
  """

  rounds: int = 3
  batch_size: int = 100
  shuffle: bool = True
  inner_epochs: int = 1
  inner_lr: float = 10.0
  inner_optimizer: str = "sgd"
  inner_reg: float = 1e-3
  pseudo_labels: bool = True
  norm_bound: Optional[float] = 10.0
  clamp: bool = True
  perturbed_fraction: float = 0.2
  hypergrad_batch: str = "current"
  fixed_point_lr: float = 0.1
  solver: str = "neumann"
  solver_iterations: int = 5
  solver_tol: float = 1e-10
  outer_optimizer: Union[str, optax.GradientTransformation] = "adam"
  outer_lr: float = 1e-3
  callback: Optional[RoundCallback] = dataclasses.field(default=None, compare=False)

  def __post_init__(self):
    def positive(name, integer):
      value = getattr(self, name)
      ok = isinstance(value, (int, np.integer)) if integer else isinstance(
          value, (int, float, np.integer, np.floating))
      if isinstance(value, bool) or not ok or not value > 0 or not math.isfinite(value):
        kind = "a positive integer" if integer else "a positive finite number"
        raise ValueError(f"IBAUConfig.{name} must be {kind}, got {value!r}")

    for name in ("rounds", "batch_size", "inner_epochs"):
      positive(name, True)
    for name in ("inner_lr", "fixed_point_lr", "outer_lr"):
      positive(name, False)
    if not isinstance(self.solver_iterations, (int, np.integer)) or self.solver_iterations < 0:
      raise ValueError(f"IBAUConfig.solver_iterations must be an integer >= 0, "
                       f"got {self.solver_iterations!r}")
    if self.solver not in hypergrad.SOLVERS:
      raise ValueError(f"IBAUConfig.solver must be one of {hypergrad.SOLVERS}, got {self.solver!r}")
    if self.solver != "neumann" and self.solver_iterations < 1:
      raise ValueError(f"IBAUConfig.solver={self.solver!r} needs solver_iterations >= 1")
    if self.inner_optimizer not in ("sgd", "adam"):
      raise ValueError(f"IBAUConfig.inner_optimizer must be 'sgd' or 'adam', "
                       f"got {self.inner_optimizer!r}")
    if not (isinstance(self.outer_optimizer, optax.GradientTransformation)
            or self.outer_optimizer in ("sgd", "adam")):
      raise ValueError("IBAUConfig.outer_optimizer must be 'sgd', 'adam' or an "
                       f"optax.GradientTransformation, got {self.outer_optimizer!r}")
    if self.hypergrad_batch not in ("first", "current"):
      raise ValueError(f"IBAUConfig.hypergrad_batch must be 'first' or 'current', "
                       f"got {self.hypergrad_batch!r}")
    if not 0.0 < float(self.perturbed_fraction) <= 1.0:
      raise ValueError(f"IBAUConfig.perturbed_fraction must be in (0, 1], "
                       f"got {self.perturbed_fraction!r}")
    if not float(self.inner_reg) >= 0.0:
      raise ValueError(f"IBAUConfig.inner_reg must be >= 0, got {self.inner_reg!r}")
    if self.norm_bound is not None and not float(self.norm_bound) > 0.0:
      raise ValueError(f"IBAUConfig.norm_bound must be positive or None, got {self.norm_bound!r}")
    if self.callback is not None and not callable(self.callback):
      raise ValueError("IBAUConfig.callback must be callable or None")

  @classmethod
  def official(cls, **overrides) -> "IBAUConfig":
    """The paper's code: one round, batches of 100, δ from one SGD pass (lr 10) on the
    model's own predictions, L2 radius 10, no clamping, 1 % of each outer batch perturbed,
    ``L_in`` on the first batch, η = 0.1, Neumann K = 5, Adam lr 1e-3."""
    base = dict(rounds=1, batch_size=100, shuffle=True, inner_epochs=1, inner_lr=10.0,
                inner_optimizer="sgd", inner_reg=1e-3, pseudo_labels=True, norm_bound=10.0,
                clamp=False, perturbed_fraction=0.01, hypergrad_batch="first",
                fixed_point_lr=0.1, solver="neumann", solver_iterations=5,
                outer_optimizer="adam", outer_lr=1e-3)
    base.update(overrides)
    return cls(**base)

  def replace(self, **changes) -> "IBAUConfig":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class UnlearnResult:
  """What :func:`unlearn` returns.

  Attributes:
    variables: the unlearned variables, same tree structure as the input.
    history: one dict per round with ``round``, ``inner_loss`` (mean over inner steps),
      ``outer_loss`` (mean over outer steps), ``delta_norm`` (‖δ‖₂ after projection),
      ``residual_mean`` / ``residual_max`` (hypergradient solver's relative residual) and
      ``seconds`` (wall time, the first round including compilation).
    perturbation: the last round's δ, shape ``(H, W, C)``.
  """

  variables: PyTree
  history: list[dict]
  perturbation: jax.Array


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

  ``Φ(δ, θ) = δ − η ∇_δ L_in(δ, θ)`` with ``L_in`` on ``(x_inner, y_inner)`` and ``L_out`` on
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
    return d - config.fixed_point_lr * jax.grad(
        functools.partial(_inner_loss, config, logits_fn))(d, p, x_inner, y_inner)

  (implicit,), residual = hypergrad.fixed_point_vjp(fixed_point, delta, (params,), g_delta,
                                                    solver)
  return loss, jax.tree_util.tree_map(jnp.add, g_params, implicit), residual


def _round(config: IBAUConfig, apply_fn: ApplyFn, params: PyTree, opt_state: PyTree,
           rest: PyTree, images: jax.Array, labels: jax.Array, key: jax.Array):
  """One I-BAU round (traced under jit by :data:`_round_jit`)."""
  n = images.shape[0]
  bsz = config.batch_size
  num_batches = n // bsz
  k_perm, k_mask = jax.random.split(key)
  if config.shuffle:
    order = jax.random.permutation(k_perm, n)
    images, labels = images[order], labels[order]
  xb = images[:num_batches * bsz].reshape((num_batches, bsz) + images.shape[1:])
  yb = labels[:num_batches * bsz].reshape((num_batches, bsz))

  def logits_fn(p, x):
    return apply_fn({"params": p, **rest}, x)

  # ---- inner problem: fit the universal perturbation δ ------------------------------
  def inner_loss(delta, p, x, y):
    return _inner_loss(config, logits_fn, delta, p, x, y)

  inner_tx = (optax.adam(config.inner_lr) if config.inner_optimizer == "adam"
              else optax.sgd(config.inner_lr))
  delta0 = jnp.zeros(images.shape[1:], images.dtype)

  def inner_step(carry, batch):
    delta, state = carry
    x, y = batch
    if config.pseudo_labels:
      y = jnp.argmax(jax.lax.stop_gradient(logits_fn(params, x)), axis=-1)
    loss, g = jax.value_and_grad(inner_loss)(delta, params, x, y)
    updates, state = inner_tx.update(g, state, delta)
    return (optax.apply_updates(delta, updates), state), loss

  inner_batches = (jnp.tile(xb, (config.inner_epochs,) + (1,) * (xb.ndim - 1)),
                   jnp.tile(yb, (config.inner_epochs, 1)))
  (delta, _), inner_losses = jax.lax.scan(inner_step, (delta0, inner_tx.init(delta0)),
                                          inner_batches)
  delta = _project(delta, config.norm_bound)

  # ---- outer problem: implicit-hypergradient steps on θ ----------------------------
  num_perturbed = max(1, int(round(config.perturbed_fraction * bsz)))
  solver = hypergrad.make_solver(config.solver, iterations=config.solver_iterations,
                                 tol=config.solver_tol)
  outer_tx = _make_optimizer(config.outer_optimizer, config.outer_lr)

  def outer_step(carry, inputs):
    p, state, ok, bad_step = carry
    index, x, y = inputs
    choice = jax.random.choice(jax.random.fold_in(k_mask, index), bsz, (num_perturbed,),
                               replace=False)
    mask = jnp.zeros((bsz,), x.dtype).at[choice].set(1.0)
    xin, yin = (xb[0], yb[0]) if config.hypergrad_batch == "first" else (x, y)
    loss, grads, residual = hypergradient(config, logits_fn, p, delta, x, y, mask, xin, yin,
                                          solver=solver)
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g))
                                  for g in jax.tree_util.tree_leaves(grads)]))
    updates, new_state = outer_tx.update(grads, state, p)
    new_p = optax.apply_updates(p, updates)
    keep = ok & finite
    p = jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), new_p, p)
    state = jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), new_state, state)
    bad_step = jnp.where(ok & ~finite, index, bad_step)
    return (p, state, keep, bad_step), (loss, residual)

  carry0 = (params, opt_state, jnp.asarray(True), jnp.asarray(-1, jnp.int32))
  (params, opt_state, ok, bad_step), (outer_losses, residuals) = jax.lax.scan(
      outer_step, carry0, (jnp.arange(num_batches, dtype=jnp.int32), xb, yb))
  stats = dict(inner_loss=jnp.mean(inner_losses), outer_loss=jnp.mean(outer_losses),
               delta_norm=jnp.sqrt(jnp.sum(delta * delta)),
               residual_mean=jnp.mean(residuals), residual_max=jnp.max(residuals),
               finite=ok, bad_step=bad_step)
  return params, opt_state, delta, stats


_round_jit = jax.jit(_round, static_argnums=(0, 1))


# --------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------


def _validate(apply_fn, variables, images, labels, config) -> int:
  """Checks the inputs of :func:`unlearn`; returns the number of classes."""
  if not callable(apply_fn):
    raise ValueError("apply_fn must be callable: apply_fn(variables, images) -> logits")
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError("variables must be a mapping with a 'params' collection (Flax "
                     f"variables); got {type(variables).__name__}"
                     + (f" with keys {sorted(variables)}" if isinstance(variables, Mapping) else ""))
  if not isinstance(config, IBAUConfig):
    raise ValueError(f"config must be an IBAUConfig, got {type(config).__name__}")
  images_np = np.asarray(images)
  labels_np = np.asarray(labels)
  if images_np.ndim != 4:
    raise ValueError(f"images must have rank 4 (N, H, W, C); got shape {images_np.shape}")
  if not np.issubdtype(images_np.dtype, np.floating):
    raise ValueError(f"images must be floating point in [0, 1]; got dtype {images_np.dtype} "
                     "(for uint8 pixels, divide by 255)")
  if not np.all(np.isfinite(images_np)):
    raise ValueError("images contain NaN or infinite values")
  lo, hi = float(images_np.min(initial=0.0)), float(images_np.max(initial=0.0))
  if lo < 0.0 or hi > 1.0:
    raise ValueError(f"images must lie in [0, 1]; got values in [{lo:.4g}, {hi:.4g}]")
  if labels_np.ndim != 1 or labels_np.shape[0] != images_np.shape[0]:
    raise ValueError(f"labels must have shape ({images_np.shape[0]},) to match images; "
                     f"got {labels_np.shape}")
  if not np.issubdtype(labels_np.dtype, np.integer):
    raise ValueError(f"labels must be integers; got dtype {labels_np.dtype}")
  n = images_np.shape[0]
  if n < config.batch_size:
    raise ValueError(f"the clean set has {n} images, fewer than one batch "
                     f"(batch_size={config.batch_size})")
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
    raise ValueError(f"the clean set has a single class ({int(labels_np[0])}); I-BAU needs "
                     "images of at least two classes")
  return num_classes


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


def unlearn(apply_fn: ApplyFn, variables: PyTree, images, labels,
            config: IBAUConfig = IBAUConfig(), *, key: jax.Array) -> UnlearnResult:
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

  Returns:
    An :class:`UnlearnResult` with the new variables, the per-round history and the last δ.

  Raises:
    ValueError: for malformed inputs (the message names the problem).
    NonFiniteHypergradientError: if the hypergradient turns NaN/inf; the round is stopped
      and the input ``variables`` are left as they were (JAX arrays are never mutated).
  """
  _validate(apply_fn, variables, images, labels, config)
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  static = dataclasses.replace(config, callback=None)
  opt_state = _make_optimizer(config.outer_optimizer, config.outer_lr).init(params)
  history = []
  delta = jnp.zeros(images.shape[1:], images.dtype)
  for r in range(config.rounds):
    start = time.perf_counter()
    params, opt_state, delta, stats = _round_jit(static, apply_fn, params, opt_state, rest,
                                                 images, labels, jax.random.fold_in(key, r))
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
                 residual_max=float(stats["residual_max"]), seconds=seconds)
    history.append(entry)
    if config.callback is not None:
      config.callback(r, dict(entry), {"params": params, **rest})
  return UnlearnResult(variables={**variables, "params": params} if isinstance(variables, dict)
                       else type(variables)({**variables, "params": params}),
                       history=history, perturbation=delta)
