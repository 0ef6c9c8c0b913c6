"""Neural Cleanse (Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in
Neural Networks", IEEE S&P 2019): reverse-engineer a trigger per class, flag the classes whose
trigger is abnormally small, and unlearn the flagged triggers.

1. **Reverse engineering.**  For every class ``t`` a mask ``m_t = sigmoid(w_m)`` of shape
   ``(H, W, 1)`` and a pattern ``p_t = sigmoid(w_p)`` of shape ``(H, W, C)`` stamp an image as

       x' = (1 − m_t) ⊙ x + m_t ⊙ p_t,

   and minimise over ``(w_m, w_p)``, on batches of the clean set,

       CE(f(x'), t) + λ_t ‖m_t‖₁          (+ R(m_t, p_t), extra terms, see below)

   with Adam (lr 0.1, betas (0.5, 0.9): the paper's code).  ``λ_t`` starts at
   ``init_cost = 1e-3`` and follows the paper's cost schedule: after ``patience`` consecutive
   steps whose attack success (fraction of the batch classified as ``t``) is at least
   ``attack_threshold = 0.99``, ``λ_t ← 1.5 λ_t``; after ``patience`` consecutive steps below
   it, ``λ_t ← λ_t / 1.5^1.5``.  The kept trigger is the one with the smallest ``‖m_t‖₁``
   among the steps that reached the threshold (the final one if none did).  All classes are
   optimised together: ``jax.jit``-compiled ``lax.scan`` chunks of ``log_every`` steps of a
   program ``vmap``-ed over ``t`` (every class sees the same batches); after each chunk
   ``progress(steps_done, steps)`` runs and, with ``checkpoint_dir``, the state is saved, so
   that an interrupted run resumes where it stopped and ends exactly as an uninterrupted one.
2. **Detection.**  With ``n_t = ‖m_t‖₁``, median ``μ̃`` and ``MAD = median_t |n_t − μ̃|``,
   the anomaly index is ``a_t = |n_t − μ̃| / (1.4826 · MAD)``; class ``t`` is flagged when
   ``n_t < μ̃`` and ``a_t > anomaly_threshold = 2``.
3. **Mitigation by unlearning.**  If any class is flagged, ``variables["params"]`` are
   fine-tuned for ``unlearn_epochs`` passes over the clean set on ``CE(f(x̃), y)`` where in
   every batch the first ``round(unlearn_fraction · batch_size)`` images (20 % by default,
   as in the paper) carry the reversed trigger of a flagged class (drawn uniformly per
   image) but keep their TRUE label.  If none is flagged the caller's ``variables`` are
   returned as they are (the same object).

Hyper-parameters of the paper and its code (``bolunwang/backdoor``): Adam lr 0.1, betas
(0.5, 0.9); init cost 1e-3; attack-success threshold 0.99; cost multiplier 1.5 up and
``1.5 ** 1.5`` down; patience 5 epochs; anomaly threshold 2; unlearning with 20 % of the
images stamped.  Where this implementation simplifies:

* ``steps`` and ``patience`` count mini-batch steps, and the schedule reads the attack
  success of each single batch (the code counts epochs of ~31 batches and averages);
* ``λ`` starts at ``init_cost`` (the code starts at 0 and switches to ``init_cost`` once
  the threshold is first reached) and there is no early stopping (a fixed number of steps
  keeps the loop one compiled ``scan``);
* masks and patterns live in sigmoid space on [0, 1] pixels (the code uses
  ``tanh / 2 + 0.5`` on [0, 255] pixels), initialised uniformly at random in
  [0.05, 0.95];
* the unlearning optimiser and its epochs are ours (SGD with momentum, lr 0.01, 5 epochs by
  default; the paper fine-tunes 1 epoch on 10 % of the training set).

The model runs in inference mode throughout (the caller's ``apply_fn``); only
``variables["params"]`` change during unlearning and every other collection passes
through.  Step 1 is a compiled chunk program (a second one for a shorter last chunk) and
each unlearning epoch another (a ``lax.scan`` over batches; one compiled step per batch on
CPU, see ``loop``); calls with the same shapes, the same ``apply_fn`` object and the same
step-1 (unlearning) settings reuse them.  :mod:`ibau_jax.defenses.tabor` reuses all of this
with extra regularisers ``R``.

History (a list of dicts, one per stage, each with ``stage`` and ``seconds``):

* ``history[0]``, ``stage="reverse_engineering"``: ``norms`` (``‖m_t‖₁`` per class),
  ``anomaly_index`` (per class), ``flagged`` (sorted class indices), ``reached`` (whether
  the trigger of each class reached ``attack_threshold`` on some batch), ``cost`` (final
  ``λ_t``), ``masks`` (``np.ndarray`` ``(K, H, W, 1)``) and ``patterns`` (``(K, H, W, C)``),
  the kept triggers of every class; ``resumed_from`` (the step a checkpoint resumed from, 0
  without one) and ``seconds_before`` (the seconds of the interrupted runs before it, which
  ``seconds`` includes);
* ``history[1]`` (only when a class was flagged), ``stage="unlearning"``: ``epoch_losses``
  (mean loss per epoch) and ``trigger_classes`` (the flagged classes whose triggers were
  stamped).

The callback runs after every stage as ``callback(stage_index, stats, variables)``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ibau_jax import _loops
from ibau_jax import _prng
from ibau_jax import _resume
from ibau_jax.defenses import _checks

PyTree = Any
# regulariser(config, logits_fn, mask, pattern, x, y, t) -> scalar, added to the per-class
# objective; must be hashable (a module-level function), as it is a static jit argument.
Regulariser = Callable[..., jax.Array]

_MAD_CONSISTENCY = 1.4826


@dataclasses.dataclass(frozen=True)
class NCConfig:
  """Attributes:
    steps: Adam steps of the trigger reverse engineering (one batch each; all classes at
      once).
    batch_size: images per batch, for reverse engineering and unlearning (the last partial
      batch of an unlearning epoch is dropped).
    learning_rate: Adam learning rate of the reverse engineering.
    beta1, beta2: Adam's betas.
    init_cost: initial weight ``λ`` of ``‖m‖₁``.
    cost_multiplier: ``λ`` grows by this factor, and shrinks by its power 1.5.
    attack_threshold: the attack success a trigger must reach on a batch, in (0, 1].
    patience: consecutive steps above (below) the threshold before ``λ`` grows (shrinks).
    anomaly_threshold: a class is flagged when its anomaly index exceeds this and its norm
      is below the median.
    unlearn_epochs: passes over the clean set of the unlearning (0: detection only).
    unlearn_fraction: fraction of each unlearning batch stamped with a flagged trigger, in
      [0, 1].
    unlearn_optimizer: ``"sgd"`` (with ``unlearn_momentum``) or ``"adam"``.
    unlearn_learning_rate: learning rate of the unlearning.
    unlearn_momentum: SGD momentum of the unlearning (ignored by Adam).
    callback: ``callback(stage_index, stats, variables)`` after every stage.
    log_every: reverse-engineering steps per compiled chunk, per ``progress`` call and per
      checkpoint (the result does not depend on it).
    progress: ``progress(steps_done, steps)`` after every chunk of the reverse engineering.
    checkpoint_dir: a folder (a non-empty path) in which the reverse engineering saves its
      state after every chunk (``nc_reverse.npz``, written atomically); a run given the same
      folder, inputs, key and settings resumes from it and returns what an uninterrupted run
      returns (a state made with anything else is ignored and overwritten).  The file is
      deleted when the defense returns.  None: nothing is saved.
    loop: how an unlearning epoch runs: ``"scan"``, one compiled ``lax.scan`` over its
      batches; ``"python"``, one compiled step per batch (on CPU about 10x faster: XLA:CPU
      runs weight gradients inside loops slowly); ``"auto"``, python on CPU, scan elsewhere.
      The same result either way (up to floating-point rounding).
  """

  steps: int = 1000
  batch_size: int = 128
  learning_rate: float = 0.1
  beta1: float = 0.5
  beta2: float = 0.9
  init_cost: float = 1e-3
  cost_multiplier: float = 1.5
  attack_threshold: float = 0.99
  patience: int = 10
  anomaly_threshold: float = 2.0
  unlearn_epochs: int = 5
  unlearn_fraction: float = 0.2
  unlearn_optimizer: str = "sgd"
  unlearn_learning_rate: float = 0.01
  unlearn_momentum: float = 0.9
  callback: Optional[Callable[[int, dict, PyTree], Any]] = dataclasses.field(
      default=None, compare=False)
  # How the work is run and saved, not what it computes: compare=False keeps them out of
  # the compiled programs' cache keys and out of the settings an experiment records.
  log_every: int = dataclasses.field(default=25, compare=False)
  progress: Optional[Callable[[int, int], Any]] = dataclasses.field(default=None,
                                                                    compare=False)
  checkpoint_dir: Optional[str] = dataclasses.field(default=None, compare=False)
  loop: str = dataclasses.field(default="auto", compare=False)

  def __post_init__(self):
    name = type(self).__name__
    _loops.check(name, self.loop)
    _checks.integers(name, self, ("steps", "batch_size", "patience", "log_every"))
    _checks.integers(name, self, ("unlearn_epochs",), minimum=0)
    _checks.reals(name, self, ("learning_rate",), minimum=0, min_open=True)
    _checks.reals(name, self, ("beta1", "beta2"), 0, 1, max_open=True)
    _checks.reals(name, self, ("init_cost",), minimum=0, min_open=True)
    _checks.reals(name, self, ("cost_multiplier",), minimum=1, min_open=True)
    _checks.reals(name, self, ("attack_threshold",), 0, 1, min_open=True)
    _checks.reals(name, self, ("anomaly_threshold",), minimum=0, min_open=True)
    _checks.reals(name, self, ("unlearn_fraction",), 0, 1)
    _checks.sgd(name, self, "unlearn_learning_rate", "unlearn_momentum", None)
    if self.unlearn_optimizer not in ("sgd", "adam"):
      raise ValueError(f"{name}.unlearn_optimizer must be 'sgd' or 'adam', got "
                       f"{self.unlearn_optimizer!r}")
    _checks.optional_callable(name, self, "callback")
    _checks.optional_callable(name, self, "progress")
    _checks.checkpoint_folder(name, self.checkpoint_dir)

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------


def anomaly_index(norms) -> np.ndarray:
  """``|n_t − median(n)| / (1.4826 · median_t |n_t − median(n)|)`` for a 1-D array of norms.

  With a zero MAD the index is 0 for norms equal to the median and ``inf`` for the others.
  ValueError for norms that are not a non-empty 1-D array of finite numbers (one NaN would
  make every index NaN, and nothing would be flagged).
  """
  norms = np.asarray(norms, np.float64)
  if norms.ndim != 1 or norms.size == 0:
    raise ValueError(f"norms must be a non-empty 1-D array, got shape {norms.shape}")
  if not np.all(np.isfinite(norms)):
    raise ValueError(f"norms must be finite, got {norms.tolist()}")
  deviation = np.abs(norms - np.median(norms))
  mad = _MAD_CONSISTENCY * np.median(deviation)
  if mad == 0:
    return np.where(deviation == 0, 0.0, np.inf)
  return deviation / mad


def flagged_classes(norms, threshold: float = 2.0) -> list[int]:
  """Classes whose norm is below the median and whose anomaly index exceeds ``threshold``
  (ValueError for non-finite norms, as :func:`anomaly_index`)."""
  norms = np.asarray(norms, np.float64)
  index = anomaly_index(norms)
  median = np.median(norms)
  return [int(t) for t in np.flatnonzero((norms < median) & (index > threshold))]


# ----------------------------------------------------------------------------------------
# Reverse engineering
# ----------------------------------------------------------------------------------------


def stamp(images: jax.Array, mask: jax.Array, pattern: jax.Array) -> jax.Array:
  """``(1 − m) ⊙ x + m ⊙ p`` (broadcasting; ``m`` is ``(..., H, W, 1)``)."""
  return (1.0 - mask) * images + mask * pattern


def _logits_fn(apply_fn, variables):
  return lambda x: apply_fn(variables, x)


def _reverse_init(num_classes: int, shape, key):
  """The state before step 0: random masks and patterns (in logit space), Adam's state,
  the costs, the schedule's counters and the best trigger so far, per class."""
  h, w, c = shape
  k_mask, k_pattern, _ = jax.random.split(key, 3)
  shape_m, shape_p = (num_classes, h, w, 1), (num_classes, h, w, c)
  logit = lambda u: jnp.log(u) - jnp.log1p(-u)
  weights = (logit(_prng.uniform(k_mask, shape_m, minval=0.05, maxval=0.95)),
             logit(_prng.uniform(k_pattern, shape_p, minval=0.05, maxval=0.95)))
  zeros = jnp.zeros((num_classes,), jnp.int32)
  best = dict(norm=jnp.full((num_classes,), jnp.inf), reached=jnp.zeros((num_classes,), bool),
              mask=jnp.zeros(shape_m), pattern=jnp.zeros(shape_p))
  return weights, zeros, best


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _reverse_start(config: NCConfig, apply_fn, regulariser, num_classes: int, shape, key):
  del apply_fn, regulariser  # (static arguments shared with _reverse_chunk's cache key)
  weights, zeros, best = _reverse_init(num_classes, shape, key)
  tx = optax.adam(config.learning_rate, b1=config.beta1, b2=config.beta2)
  cost = jnp.full((num_classes,), config.init_cost, jnp.float32)
  return (weights, jax.vmap(tx.init)(weights), cost, zeros, zeros, best)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _reverse_chunk(config: NCConfig, apply_fn, regulariser: Optional[Regulariser],
                   num_classes: int, length, variables, images, labels, key, carry, first):
  """Steps ``first, ..., first + length − 1`` of the reverse engineering, from ``carry``.

  ``length`` and ``first`` are traced: chunks of any length share one compiled program.
  """
  n = images.shape[0]
  bsz = config.batch_size
  per_epoch = n // bsz
  k_data = jax.random.split(key, 3)[2]
  tx = optax.adam(config.learning_rate, b1=config.beta1, b2=config.beta2)
  targets = jnp.arange(num_classes)
  logits_fn = _logits_fn(apply_fn, variables)

  def class_loss(wts, t, cost, x, y):
    mask, pattern = jax.nn.sigmoid(wts[0]), jax.nn.sigmoid(wts[1])
    logits = logits_fn(stamp(x, mask, pattern))
    target = jnp.full((x.shape[0],), t)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
    norm = jnp.sum(mask)
    loss = ce + cost * norm
    if regulariser is not None:
      loss = loss + regulariser(config, logits_fn, mask, pattern, x, y, t)
    success = jnp.mean(jnp.argmax(logits, -1) == t)
    return loss, (norm, success)

  grad_fn = jax.vmap(jax.value_and_grad(class_loss, has_aux=True), in_axes=(0, 0, 0, None, None))
  up_factor = config.cost_multiplier
  down_factor = config.cost_multiplier ** 1.5

  def step(carry, s):
    wts, opt_state, cost, up, down, best = carry
    perm = jax.random.permutation(jax.random.fold_in(k_data, s // per_epoch), n)
    idx = jax.lax.dynamic_slice(perm, ((s % per_epoch) * bsz,), (bsz,))
    (_, (norm, success)), grads = grad_fn(wts, targets, cost, images[idx], labels[idx])
    # Keep the smallest successful trigger (the one just evaluated, before the update).
    ok = success >= config.attack_threshold
    better = ok & (norm < best["norm"])
    pick = lambda new, old: jnp.where(better.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
    best = dict(norm=jnp.where(better, norm, best["norm"]), reached=best["reached"] | ok,
                mask=pick(jax.nn.sigmoid(wts[0]), best["mask"]),
                pattern=pick(jax.nn.sigmoid(wts[1]), best["pattern"]))
    updates, opt_state = jax.vmap(tx.update)(grads, opt_state)
    wts = optax.apply_updates(wts, updates)
    # The paper's cost schedule.
    up = jnp.where(ok, up + 1, 0)
    down = jnp.where(ok, 0, down + 1)
    raise_ = up >= config.patience
    lower = ~raise_ & (down >= config.patience)
    cost = jnp.where(raise_, cost * up_factor, jnp.where(lower, cost / down_factor, cost))
    up = jnp.where(raise_, 0, up)
    down = jnp.where(lower, 0, down)
    return (wts, opt_state, cost, up, down, best)

  return jax.lax.fori_loop(0, length, lambda i, c: step(c, first + i), carry)


def _reverse_result(carry) -> dict:
  wts, _, cost, _, _, best = carry
  reached = best["reached"]
  as_nd = lambda r: r.reshape((-1, 1, 1, 1))
  mask = jnp.where(as_nd(reached), best["mask"], jax.nn.sigmoid(wts[0]))
  pattern = jnp.where(as_nd(reached), best["pattern"], jax.nn.sigmoid(wts[1]))
  return dict(masks=mask, patterns=pattern, norms=jnp.sum(mask, axis=(1, 2, 3)),
              reached=reached, cost=cost)


CHECKPOINT_FILE = "nc_reverse.npz"


_DETECTION_AND_UNLEARNING = ("anomaly_threshold", "unlearn_epochs", "unlearn_fraction",
                             "unlearn_optimizer", "unlearn_learning_rate", "unlearn_momentum",
                             "callback")


def _reverse_static(config: NCConfig) -> NCConfig:
  """``config`` with the fields step 1 does not read at their defaults, so that calls which
  differ only there share one compiled program."""
  return config.replace(**{f: NCConfig.__dataclass_fields__[f].default
                           for f in _DETECTION_AND_UNLEARNING})


def _chunk_static(config: NCConfig) -> NCConfig:
  """:func:`_reverse_static`, also without the fields only the start reads (``init_cost``)
  or nothing compiled reads (``steps``): runs that differ there share the chunk's program."""
  return config.replace(steps=NCConfig.__dataclass_fields__["steps"].default,
                        init_cost=NCConfig.__dataclass_fields__["init_cost"].default)


def _unlearn_static(config: NCConfig) -> NCConfig:
  """The fields the unlearning reads, as a plain :class:`NCConfig` (shared by NC and TABOR)."""
  return NCConfig(batch_size=config.batch_size, unlearn_fraction=config.unlearn_fraction,
                  unlearn_optimizer=config.unlearn_optimizer,
                  unlearn_learning_rate=config.unlearn_learning_rate,
                  unlearn_momentum=config.unlearn_momentum)


def _num_classes(apply_fn, variables, images) -> int:
  out = jax.eval_shape(apply_fn, variables,
                       jax.ShapeDtypeStruct((1,) + tuple(images.shape[1:]), jnp.float32))
  return int(out.shape[1])


def reverse_engineer(apply_fn, variables: PyTree, images, labels, config: NCConfig = NCConfig(),
                     *, key: jax.Array, regulariser: Optional[Regulariser] = None) -> dict:
  """Step 1 alone: the kept trigger of every class (inputs are not checked here).

  Runs ``config.steps`` steps in compiled chunks of ``config.log_every``, calling
  ``config.progress`` and saving to ``config.checkpoint_dir`` (when given) after each;
  resumes from a matching checkpoint there (the file is kept: :func:`run_defense` deletes
  it when the whole defense is done).

  Returns:
    ``{"masks": (K, H, W, 1), "patterns": (K, H, W, C), "norms": (K,), "reached": (K,),
    "cost": (K,), "resumed_from": int, "seconds_before": float}`` (NumPy arrays; the last two:
    the step this call started from and the seconds spent on the earlier steps by
    interrupted calls, both 0 without a checkpoint).
  """
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  num_classes = _num_classes(apply_fn, variables, images)
  static = _reverse_static(config)
  chunk_static = _chunk_static(static)
  shape = tuple(images.shape[1:])
  carry = _reverse_start(static, apply_fn, regulariser, num_classes, shape, key)
  step, seconds_before = 0, 0.0
  path = _resume.path(config.checkpoint_dir, CHECKPOINT_FILE)
  digest = ""
  if path is not None:
    digest = _resume.fingerprint(static, num_classes, getattr(regulariser, "__module__", None),
                                 getattr(regulariser, "__qualname__", None),
                                 arrays=(variables, images, labels, key))
    loaded = _resume.load(path, digest, carry)
    if loaded is not None:
      step, seconds_before, carry, _ = loaded
  resumed_from = step
  start = time.perf_counter()
  while step < config.steps:
    length = min(config.log_every, config.steps - step)
    carry = _reverse_chunk(chunk_static, apply_fn, regulariser, num_classes, jnp.int32(length),
                           variables, images, labels, key, carry, jnp.int32(step))
    step += length
    _resume.save(path, digest, step, seconds_before + time.perf_counter() - start, carry)
    if config.progress is not None:
      config.progress(step, config.steps)
  out = {k: np.asarray(v) for k, v in _reverse_result(carry).items()}
  out.update(resumed_from=resumed_from, seconds_before=seconds_before)
  return out


# ----------------------------------------------------------------------------------------
# Unlearning
# ----------------------------------------------------------------------------------------


def _unlearn_tx(config: NCConfig) -> optax.GradientTransformation:
  if config.unlearn_optimizer == "adam":
    return optax.adam(config.unlearn_learning_rate)
  return optax.sgd(config.unlearn_learning_rate, momentum=config.unlearn_momentum or None)


def _unlearn_plan(config: NCConfig, n: int, key):
  """The epoch's batches ``(per_epoch, batch_size)`` of indices and a key per batch."""
  bsz = config.batch_size
  per_epoch = n // bsz
  k_perm, k_pick = jax.random.split(key)
  order = jax.random.permutation(k_perm, n)[:per_epoch * bsz].reshape(per_epoch, bsz)
  return order, jax.random.split(k_pick, per_epoch)


def _unlearn_batch(config: NCConfig, apply_fn, params, opt_state, rest, images, labels, idx,
                   masks, patterns, key):
  """One unlearning step on the batch ``idx``: the first ``unlearn_fraction`` of it stamped
  with a randomly chosen flagged trigger, true labels kept."""
  bsz = config.batch_size
  stamped = (jnp.arange(bsz) < round(config.unlearn_fraction * bsz)).reshape(-1, 1, 1, 1)
  x, y = images[idx], labels[idx]
  which = jax.random.randint(key, (bsz,), 0, masks.shape[0])
  x = jnp.where(stamped, stamp(x, masks[which], patterns[which]), x)

  def loss_fn(p):
    logits = apply_fn({"params": p, **rest}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = _unlearn_tx(config).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


_unlearn_plan_jit = jax.jit(_unlearn_plan, static_argnums=(0, 1))
_unlearn_batch_jit = jax.jit(_unlearn_batch, static_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _unlearn_epoch_scan(config: NCConfig, apply_fn, params, opt_state, rest, images, labels,
                        masks, patterns, key):
  order, keys = _unlearn_plan(config, images.shape[0], key)

  def body(carry, inputs):
    idx, k = inputs
    params, opt_state, loss = _unlearn_batch(config, apply_fn, *carry, rest, images, labels,
                                             idx, masks, patterns, k)
    return (params, opt_state), loss

  (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), (order, keys))
  return params, opt_state, jnp.mean(losses)


def _unlearn_epoch(config: NCConfig, apply_fn, params, opt_state, rest, images, labels, masks,
                   patterns, key, loop: str = "auto"):
  """One pass of unlearning: a compiled ``lax.scan`` over the batches, or (``loop``
  ``"python"``, and ``"auto"`` on CPU, where XLA runs weight gradients inside a loop about
  10x slower) one compiled step per batch.  Returns ``(params, opt_state, mean loss)``."""
  if _loops.use_scan(loop):
    return _unlearn_epoch_scan(config, apply_fn, params, opt_state, rest, images, labels,
                               masks, patterns, key)
  order, keys = _unlearn_plan_jit(config, images.shape[0], key)
  losses = []
  for b in range(order.shape[0]):
    params, opt_state, loss = _unlearn_batch_jit(config, apply_fn, params, opt_state, rest,
                                                 images, labels, order[b], masks, patterns,
                                                 keys[b])
    losses.append(loss)
  return params, opt_state, jnp.mean(jnp.stack(losses))


# ----------------------------------------------------------------------------------------
# The defense
# ----------------------------------------------------------------------------------------


def run_defense(apply_fn, variables: PyTree, images, labels, config: NCConfig, *,
                key: jax.Array, regulariser: Optional[Regulariser] = None):
  """Neural Cleanse's three stages with an optional extra regulariser in step 1 (shared by
  :func:`neural_cleanse` and :func:`ibau_jax.defenses.tabor.tabor`; ``config`` None: the
  defaults).  Raises ValueError for a ``config`` that is not an :class:`NCConfig`, for bad
  inputs or non-finite ``variables`` (before any work), when a trigger norm of step 1 is NaN
  or infinite (the reverse engineering diverged; detection would flag nothing), and when
  an unlearning epoch's mean loss is NaN or infinite (lower ``unlearn_learning_rate``),
  rather than returning NaN parameters."""
  from ibau_jax.defenses import DefenseResult, check_inputs
  config = _checks.config_of("run_defense", config, NCConfig)
  cls = type(config).__name__
  what = _NAMES.get(cls, cls)
  check_inputs(apply_fn, variables, images, labels, config.batch_size, key=key,
               task=what)
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  k_reverse, k_unlearn = jax.random.split(key)
  history = []

  start = time.perf_counter()
  rev = reverse_engineer(apply_fn, variables, images, labels, config, key=k_reverse,
                         regulariser=regulariser)
  _checks.finite_values(rev["norms"], f"{what}'s trigger reverse engineering",
                        "check that the model's outputs are finite, or lower "
                        f"{cls}.learning_rate")
  flagged = flagged_classes(rev["norms"], config.anomaly_threshold)
  entry = dict(stage="reverse_engineering", norms=rev["norms"].tolist(),
               anomaly_index=anomaly_index(rev["norms"]).tolist(), flagged=flagged,
               reached=rev["reached"].tolist(), cost=rev["cost"].tolist(),
               masks=rev["masks"], patterns=rev["patterns"],
               resumed_from=rev["resumed_from"], seconds_before=rev["seconds_before"],
               seconds=time.perf_counter() - start + rev["seconds_before"])
  history.append(entry)
  if config.callback is not None:
    config.callback(0, dict(entry), variables)
  if not flagged:
    _remove_checkpoint(config)
    return DefenseResult(variables=variables, history=history)

  start = time.perf_counter()
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  static = _unlearn_static(config)
  opt_state = _unlearn_tx(static).init(params)
  masks = jnp.asarray(rev["masks"][flagged])
  patterns = jnp.asarray(rev["patterns"][flagged])
  losses = []
  for epoch in range(config.unlearn_epochs):
    params, opt_state, loss = _unlearn_epoch(static, apply_fn, params, opt_state, rest, images,
                                             labels, masks, patterns,
                                             jax.random.fold_in(k_unlearn, epoch), config.loop)
    losses.append(float(loss))
    _checks.finite_loss(losses[-1], f"{what}'s unlearning", epoch,
                        f"lower {cls}.unlearn_learning_rate")
  defended = _checks.with_params(variables, params)
  entry = dict(stage="unlearning", epoch_losses=losses, trigger_classes=flagged,
               seconds=time.perf_counter() - start)
  history.append(entry)
  if config.callback is not None:
    config.callback(1, dict(entry), defended)
  _remove_checkpoint(config)
  return DefenseResult(variables=defended, history=history)


_NAMES = {"NCConfig": "Neural Cleanse", "TABORConfig": "TABOR"}


def _remove_checkpoint(config: NCConfig) -> None:
  _resume.remove(_resume.path(config.checkpoint_dir, CHECKPOINT_FILE))


def neural_cleanse(apply_fn, variables: PyTree, images, labels, config: NCConfig = NCConfig(),
                   *, key: jax.Array):
  """Neural Cleanse: reverse-engineers a trigger per class, flags abnormally small ones and
  unlearns them (see the module docstring); returns
  :class:`~ibau_jax.defenses.DefenseResult` (``variables`` unchanged, the same object, when
  no class is flagged; else in the container type of the input).  ``config``: an
  :class:`NCConfig` exactly (a :class:`~ibau_jax.defenses.tabor.TABORConfig` is refused:
  its regularisers would be ignored; use :func:`~ibau_jax.defenses.tabor.tabor`), or None
  for the defaults."""
  config = _checks.config_of("neural_cleanse", config, NCConfig, exact=True)
  return run_defense(apply_fn, variables, images, labels, config, key=key)


__all__ = ["NCConfig", "anomaly_index", "flagged_classes", "neural_cleanse", "reverse_engineer",
           "run_defense", "stamp"]
