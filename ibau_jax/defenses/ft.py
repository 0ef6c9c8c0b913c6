"""Plain fine-tuning on the defender's clean set (the simplest baseline).

Minimises ``(1/n) Σ_i CE(f_θ(x_i), y_i)`` over the clean set with SGD (momentum 0.9,
lr 0.01, coupled weight decay 5e-4: BackdoorBench's fine-tuning settings) for ``epochs``
passes in shuffled batches.  Like :func:`ibau_jax.unlearn` it calls the caller's inference
``apply_fn`` (BatchNorm statistics frozen, dropout off) and trains ``variables["params"]``
only; every other collection passes through unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from ibau_jax.defenses import _checks

PyTree = Any


@dataclasses.dataclass(frozen=True)
class FTConfig:
  """Attributes:
    epochs: passes over the clean set.
    batch_size: images per step (the last partial batch of each epoch is dropped).
    learning_rate, momentum, weight_decay: of SGD (``λθ`` added to the gradient).
    callback: ``callback(epoch, stats, variables)`` after every epoch.
  """

  epochs: int = 10
  batch_size: int = 128
  learning_rate: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  callback: Optional[Callable[[int, dict, PyTree], Any]] = dataclasses.field(
      default=None, compare=False)

  def __post_init__(self):
    _checks.integers("FTConfig", self, ("epochs", "batch_size"))
    _checks.sgd("FTConfig", self)
    _checks.optional_callable("FTConfig", self)

  def replace(self, **changes) -> "FTConfig":
    return dataclasses.replace(self, **changes)


def _tx(config: FTConfig) -> optax.GradientTransformation:
  return optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(config.learning_rate, momentum=config.momentum or None))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _step(config: FTConfig, apply_fn, params, opt_state, rest, x, y):
  def loss_fn(p):
    logits = apply_fn({"params": p, **rest}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = _tx(config).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def fine_tune(apply_fn, variables: PyTree, images, labels, config: FTConfig = FTConfig(), *,
              key: jax.Array, what: str = "fine-tuning",
              hint: str = "lower FTConfig.learning_rate or raise batch_size"):
  """Fine-tunes ``variables["params"]`` on ``(images, labels)``; returns
  :class:`~ibau_jax.defenses.DefenseResult` (``variables`` in the container type of the
  input, ``history``: ``epoch``, mean ``loss``, ``seconds`` per epoch).  ``config`` None:
  the defaults.

  Raises ValueError for a ``config`` that is not an :class:`FTConfig`, for bad inputs or
  non-finite ``variables`` (before any work), and (``"<what> diverged ... <hint>"``) when
  an epoch's mean loss is not finite.

  Divergence is an error rather than NaN parameters: SGD on a model whose BatchNorm
  statistics are frozen (inference mode) can diverge (a CPU-preset CIFAR-10 blend model did
  at lr 0.01 with batches of 64, and did not with batches of 128)."""
  from ibau_jax.defenses import DefenseResult, check_inputs
  config = _checks.config_of("fine_tune", config, FTConfig)
  check_inputs(apply_fn, variables, images, labels, config.batch_size, key=key,
               task="fine-tuning")
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  static = config.replace(callback=None)
  opt_state = _tx(config).init(params)
  n, bsz = images.shape[0], config.batch_size
  history = []
  for epoch in range(config.epochs):
    start = time.perf_counter()
    order = jax.random.permutation(jax.random.fold_in(key, epoch), n)
    losses = []
    for i in range(n // bsz):
      idx = order[i * bsz:(i + 1) * bsz]
      params, opt_state, loss = _step(static, apply_fn, params, opt_state, rest, images[idx],
                                      labels[idx])
      losses.append(loss)
    entry = dict(epoch=epoch, loss=float(jnp.mean(jnp.stack(losses))),
                 seconds=time.perf_counter() - start)
    _checks.finite_loss(entry["loss"], what, epoch, hint)
    history.append(entry)
    if config.callback is not None:
      config.callback(epoch, dict(entry), _checks.with_params(variables, params))
  return DefenseResult(variables=_checks.with_params(variables, params), history=history)
