"""Differentially private training (DP-SGD) as a backdoor defense (Du, Jia & Song, ICLR 2020,
"Robust anomaly detection and backdoor attack detection via differential privacy").

Poisoned examples are rare outliers of the training distribution; DP-SGD bounds the
influence of every single example on the model (Abadi et al., CCS 2016), so a model trained
with it learns the majority's task but hardly the few examples that carry the trigger.
Unlike the other defenses, this one TRAINS A MODEL: ``images, labels`` are the (possibly
poisoned) TRAINING SET, not a small clean set, and ``variables`` are the initial variables
(e.g. a fresh ``model.init``) that training starts from.

Each step, on a batch ``B`` of ``b`` examples with per-example gradients
``g_i = ∇_θ CE(f_θ(x_i), y_i)`` (``jax.vmap(jax.grad(...))``):

    ḡ_i = g_i / max(1, ‖g_i‖₂ / C)                      (clip; ‖·‖₂ over all parameters)
    g̃   = (Σ_{i∈B} ḡ_i + N(0, σ² C² I)) / b             (noise_multiplier σ, clip_norm C)
    θ   ← SGD-with-momentum(θ, g̃)

for ``epochs`` passes over shuffled fixed-size batches.  :func:`privatize_gradients` is the
middle line as a pure function.

The model runs through the caller's inference ``apply_fn``: BatchNorm uses (and keeps) the
running statistics in ``variables`` and dropout is off.  This is necessary, not only
convenient: with batch statistics an example's output depends on the other examples of the
batch, so per-example gradients (and the per-example sensitivity DP needs) are not defined.
Only ``variables["params"]`` is trained; every other collection passes through unchanged.

Simplifications: no privacy accounting (the (ε, δ) guarantee of a run is not computed) and
shuffled fixed-size batches instead of Poisson sampling.  Du et al. sweep the noise scale
rather than fix one setting; the defaults here (C = 1, σ = 1, SGD lr 0.05 with momentum 0.9,
batch 128, 10 epochs) are conventional DP-SGD values, not the paper's.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from ibau_jax import _loops
from ibau_jax import _prng
from ibau_jax.defenses import _checks

PyTree = Any


@dataclasses.dataclass(frozen=True)
class DPConfig:
  """Attributes:
    epochs: passes over the training set.
    batch_size: examples per step (the last partial batch of each epoch is dropped).
    learning_rate, momentum: of SGD on the privatized gradient.
    clip_norm: C, the bound on every per-example gradient's L2 norm (over all parameters).
    noise_multiplier: σ; the Gaussian noise added to the sum of clipped gradients has
      standard deviation ``σ·C`` (0: clipping only, no privacy).
    callback: ``callback(epoch, stats, variables)`` after every epoch.
    loop: how an epoch runs: ``"scan"``, one compiled ``lax.scan`` over its batches;
      ``"python"``, one compiled step per batch (on CPU about 10x faster: XLA:CPU runs the
      per-example weight gradients inside loops slowly, measured 30 s against 3 s per batch
      of 128 on small-VGG16); ``"auto"``, python on CPU, scan elsewhere.  The same result
      either way (up to floating-point rounding).
  """

  epochs: int = 10
  batch_size: int = 128
  learning_rate: float = 0.05
  momentum: float = 0.9
  clip_norm: float = 1.0
  noise_multiplier: float = 1.0
  callback: Optional[Callable[[int, dict, PyTree], Any]] = dataclasses.field(
      default=None, compare=False)
  loop: str = dataclasses.field(default="auto", compare=False)

  def __post_init__(self):
    _checks.integers("DPConfig", self, ("epochs", "batch_size"))
    _loops.check("DPConfig", self.loop)
    _checks.sgd("DPConfig", self, weight_decay=None)
    _checks.reals("DPConfig", self, ("clip_norm",), minimum=0, min_open=True)
    _checks.reals("DPConfig", self, ("noise_multiplier",), minimum=0)
    _checks.optional_callable("DPConfig", self)

  def replace(self, **changes) -> "DPConfig":
    return dataclasses.replace(self, **changes)


def clip_per_example(per_example_grads: PyTree, clip_norm: float
                     ) -> tuple[PyTree, jax.Array]:
  """``(ḡ, norms)``: every per-example gradient (leading axis of every leaf) scaled to
  ``ḡ_i = g_i / max(1, ‖g_i‖₂ / C)`` (those with ``‖g_i‖₂ ≤ C`` unchanged), and the norms
  ``‖g_i‖₂`` over all leaves before clipping, shape ``(b,)``."""
  leaves = jax.tree_util.tree_leaves(per_example_grads)
  sq = sum(jnp.sum(jnp.square(l.reshape(l.shape[0], -1)), axis=1) for l in leaves)
  norms = jnp.sqrt(sq)
  divisor = jnp.maximum(1.0, norms / clip_norm)

  def scale(g):
    return g / divisor.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype)

  return jax.tree_util.tree_map(scale, per_example_grads), norms


def privatize_gradients(per_example_grads: PyTree, clip_norm: float, noise_multiplier: float,
                        key: jax.Array) -> tuple[PyTree, jax.Array]:
  """The DP-SGD gradient ``g̃ = (Σ_i ḡ_i + N(0, σ²C²I)) / b`` (see the module docstring).

  Args:
    per_example_grads: a pytree whose leaves have a leading batch axis of size ``b``.
    clip_norm: C.
    noise_multiplier: σ.
    key: PRNG key of the noise (one independent draw per leaf).

  Returns:
    ``(g̃, norms)``: the noisy mean gradient (the tree without the batch axis) and the
    per-example norms ``‖g_i‖₂`` before clipping, shape ``(b,)``.
  """
  clipped, norms = clip_per_example(per_example_grads, clip_norm)
  leaves, treedef = jax.tree_util.tree_flatten(clipped)
  b = leaves[0].shape[0]
  keys = jax.random.split(key, len(leaves))
  noisy = [(jnp.sum(l, axis=0)
            + noise_multiplier * clip_norm * _prng.normal(k, l.shape[1:], l.dtype)) / b
           for l, k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(treedef, noisy), norms


def _tx(learning_rate, momentum) -> optax.GradientTransformation:
  """SGD (with momentum unless ``momentum`` is None); the numbers may be traced values."""
  return optax.sgd(learning_rate, momentum=momentum)


def _hyper(config: DPConfig) -> dict:
  """The numeric settings a sweep changes, as arrays: the compiled step takes them as
  arguments, so runs that differ only in them (a sweep over σ, C or the learning rate,
  as Du et al. do) reuse one program."""
  return {k: jnp.float32(getattr(config, k))
          for k in ("learning_rate", "momentum", "clip_norm", "noise_multiplier")}


def _step(apply_fn, momentum: bool, params, opt_state, rest, images, labels, key, hyper):
  """One DP-SGD step on the batch ``(images, labels)``: ``(params, opt_state, stats)``.
  ``momentum`` (static) says whether SGD keeps a velocity; ``hyper`` is :func:`_hyper`."""

  def example_loss(p, x, y):
    logits = apply_fn({"params": p, **rest}, x[None])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y[None])[0]

  losses, grads = jax.vmap(jax.value_and_grad(example_loss), in_axes=(None, 0, 0))(
      params, images, labels)
  clip_norm = hyper["clip_norm"]
  grad, norms = privatize_gradients(grads, clip_norm, hyper["noise_multiplier"], key)
  tx = _tx(hyper["learning_rate"], hyper["momentum"] if momentum else None)
  updates, opt_state = tx.update(grad, opt_state, params)
  stats = dict(loss=jnp.mean(losses), grad_norm=jnp.mean(norms),
               clipped_fraction=jnp.mean(norms > clip_norm))
  return optax.apply_updates(params, updates), opt_state, stats


_step_jit = jax.jit(_step, static_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _epoch_scan(apply_fn, momentum: bool, params, opt_state, rest, images, labels, idx, keys,
                hyper):

  def step(carry, inputs):
    i, key = inputs
    params, opt_state, stats = _step(apply_fn, momentum, *carry, rest, images[i], labels[i],
                                     key, hyper)
    return (params, opt_state), stats

  (params, opt_state), stats = jax.lax.scan(step, (params, opt_state), (idx, keys))
  return params, opt_state, stats


def _epoch(config: DPConfig, apply_fn, params, opt_state, rest, images, labels, idx, keys):
  """An epoch over the batches ``idx`` (``(steps, batch)``): ``(params, opt_state, stats)``
  with every statistic stacked over the steps (see :attr:`DPConfig.loop`)."""
  momentum, hyper = config.momentum > 0, _hyper(config)
  if _loops.use_scan(config.loop):
    return _epoch_scan(apply_fn, momentum, params, opt_state, rest, images, labels, idx, keys,
                       hyper)
  stats = []
  for t in range(idx.shape[0]):
    params, opt_state, s = _step_jit(apply_fn, momentum, params, opt_state, rest,
                                     images[idx[t]], labels[idx[t]], keys[t], hyper)
    stats.append(s)
  return params, opt_state, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *stats)


def dp_sgd(apply_fn, variables: PyTree, images, labels, config: DPConfig = DPConfig(), *,
           key: jax.Array):
  """Trains ``variables["params"]`` with DP-SGD on the TRAINING set ``(images, labels)``.

  Args:
    apply_fn: ``apply_fn(variables, images) -> logits`` in inference mode.
    variables: the initial variables training starts from (not a trained backdoored model:
      this defense replaces training on the possibly poisoned data).
    images, labels: the (possibly poisoned) training set, float NHWC in [0, 1] and integer
      labels.
    config: :class:`DPConfig` (None: the defaults).
    key: PRNG key (batch order and the noise).

  Returns:
    :class:`~ibau_jax.defenses.DefenseResult` (``variables`` in the container type of the
    input); ``history`` has one entry per epoch: ``epoch``, mean (non-private) training
    ``loss``, mean per-example ``grad_norm`` before clipping, ``clipped_fraction`` (of
    per-example gradients with norm above C) and ``seconds``.

  Raises:
    ValueError: a ``config`` that is not a :class:`DPConfig`, bad inputs (e.g. a training
      set of a single class) or non-finite ``variables`` (before any work), or an epoch's
      mean loss is NaN or infinite (the run diverged; the message names the settings to
      lower) instead of returning NaN parameters.
  """
  from ibau_jax.defenses import DefenseResult, check_inputs
  config = _checks.config_of("dp_sgd", config, DPConfig)
  check_inputs(apply_fn, variables, images, labels, config.batch_size, key=key,
               task="DP-SGD training", data="training set")
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  opt_state = _tx(config.learning_rate, config.momentum or None).init(params)
  n, bsz = images.shape[0], config.batch_size
  steps = n // bsz
  order_key, noise_key = jax.random.split(key)
  history = []
  for epoch in range(config.epochs):
    start = time.perf_counter()
    order = jax.random.permutation(jax.random.fold_in(order_key, epoch), n)
    idx = order[:steps * bsz].reshape(steps, bsz)
    keys = jax.vmap(lambda t: jax.random.fold_in(noise_key, t))(
        jnp.arange(epoch * steps, (epoch + 1) * steps))
    params, opt_state, stats = _epoch(config, apply_fn, params, opt_state, rest, images,
                                      labels, idx, keys)
    entry = dict(epoch=epoch, loss=float(jnp.mean(stats["loss"])),
                 grad_norm=float(jnp.mean(stats["grad_norm"])),
                 clipped_fraction=float(jnp.mean(stats["clipped_fraction"])),
                 seconds=time.perf_counter() - start)
    _checks.finite_loss(entry["loss"], "DP-SGD", epoch,
                        "lower DPConfig.learning_rate or noise_multiplier, or raise batch_size")
    history.append(entry)
    if config.callback is not None:
      config.callback(epoch, dict(entry), _checks.with_params(variables, params))
  return DefenseResult(variables=_checks.with_params(variables, params), history=history)
