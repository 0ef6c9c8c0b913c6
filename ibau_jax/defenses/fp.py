"""Fine-Pruning (Liu, Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against Backdooring
Attacks on Deep Neural Networks", RAID 2018).

A backdoor tends to live in channels that clean inputs leave dormant.  With ``a_c(x)`` the
activation of channel ``c`` of a layer on image ``x`` (averaged over the spatial positions),
Fine-Pruning

1. ranks the channels by their mean activation on the clean set,
   ``μ_c = (1/(n·H·W)) Σ_i Σ_hw a_c(x_i)[h, w]``, measured once on the unpruned model;
2. prunes (forces to zero) channels in increasing order of ``μ_c``, ``prune_step`` at a time,
   and after each step measures the clean accuracy ``acc_k`` with the ``k`` lowest channels
   pruned.  Stopping rule: ``k`` grows until ``k_max = ⌊prune_ratio · C⌋``; if on the way
   ``acc_0 − acc_k > max_acc_drop`` the step that caused it is undone and pruning stops.
   The result prunes the last tried ``k`` whose drop is at most ``max_acc_drop``.  (The
   paper prunes until the clean validation accuracy falls by more than a chosen threshold;
   the default here is 4 percentage points);
3. fine-tunes the pruned network on the clean set (cross-entropy, SGD with momentum and
   coupled weight decay; the defaults are :class:`~ibau_jax.defenses.FTConfig`'s) with the
   pruned channels kept at zero.

**Which activation.**  The paper uses the output of the last convolutional layer's ReLU.
Layers here are Flax module calls (see :mod:`ibau_jax.defenses.layers`), and an activation
function is not a module, so the pruned layer is a module (``FPConfig.layer``; default: the
last ``BatchNorm`` of the model if it has one, else its last ``Conv``) and its channels are
ranked by the mean of ``activation(output)``, ``activation`` being ``FPConfig.activation``
(``"elu"``: the nonlinearity :class:`~ibau_jax.models.vgg.SmallVGG16` applies after every
BatchNorm, so by default the ranking is that of the post-activation channels; ``"relu"`` for
ReLU networks; ``"identity"`` for the raw module output).  Pruning zeroes the *module*
output channel; since ``elu(0) = relu(0) = 0``, in a conv → BN → activation block a zero BN
output channel is a zero activation channel, as in the paper.  (Pruning a ``Conv`` that is
followed by a BatchNorm zeroes the conv's output, not the BN's: the BN then outputs the
constant ``bias − scale·mean/√(var+ε)`` on that channel.)

**Pruning baked into the variables.**  The defended model must run with the caller's own
``apply_fn``, so the channel mask is written into ``params``: for a ``BatchNorm`` layer the
pruned channels' ``scale`` and ``bias`` are set to 0 (its output there is then
``0 · x̂ + 0 = 0`` exactly); for a ``Conv`` or ``Dense`` layer ``kernel[..., c]`` and
``bias[c]``.  This is the same function as masking the layer's output (which is how the
accuracy of each pruning step is measured), and fine-tuning sets the optimizer's
updates of exactly these entries to zero, so they stay 0 and the channels stay pruned.

Like :func:`~ibau_jax.defenses.fine_tune` it calls the caller's inference ``apply_fn``
(BatchNorm statistics frozen, dropout off) and changes ``variables["params"]`` only; every
other collection passes through unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ibau_jax.defenses import _checks
from ibau_jax.defenses import layers as layers_lib
from ibau_jax.defenses.ft import FTConfig, _tx

PyTree = Any

#: Nonlinearities applied to a captured module output before it is measured
#: (``FPConfig.activation``, ``NADConfig.activation``).  All map 0 to 0.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda a: a,
    "relu": jax.nn.relu,
    "elu": jax.nn.elu,
}

#: Module classes whose output channels Fine-Pruning can zero through their parameters.
PRUNABLE_KINDS = ("BatchNorm", "Conv", "Dense")


def _check_activation(cls: str, v) -> None:
  if v not in ACTIVATIONS:
    raise ValueError(f"{cls}.activation must be one of {sorted(ACTIVATIONS)}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class FPConfig:
  """Every knob of :func:`fine_pruning`.

  Attributes:
    layer: name of the module whose output channels are ranked and pruned (a path as in
      :mod:`ibau_jax.defenses.layers`, e.g. ``"bn2_1"`` for SmallVGG16); its class must be
      one of :data:`PRUNABLE_KINDS`.  None: the last ``BatchNorm`` of the model, else its
      last ``Conv``.
    activation: the nonlinearity applied to the layer's output before channel means are
      taken (a key of :data:`ACTIVATIONS`; ``"elu"`` matches SmallVGG16).
    prune_ratio: at most ``⌊prune_ratio · C⌋`` of the layer's ``C`` channels are pruned
      (in [0, 1]; 0: no pruning, plain fine-tuning).
    max_acc_drop: pruning stops before the step after which the clean accuracy has fallen by
      MORE than this (absolute, a fraction in [0, 1]: 0.04 is 4 percentage points; 1: only
      ``prune_ratio`` stops it).
    prune_step: channels pruned per step (1: the paper's one at a time); the last step is cut
      to reach ``⌊prune_ratio · C⌋`` exactly.
    epochs: fine-tuning passes over the clean set after pruning (0: the pruning defense
      without fine-tuning).
    batch_size: images per fine-tuning step (the last partial batch of each epoch is
      dropped), and per evaluation batch (all images are evaluated).
    learning_rate, momentum, weight_decay: of the fine-tuning SGD (``λθ`` added to the
      gradient), as :class:`~ibau_jax.defenses.FTConfig`.
    callback: ``callback("prune", stats, variables)`` once after pruning (``stats``: the
      pruning entry of the history; ``variables``: pruned, not yet fine-tuned), then
      ``callback(epoch, stats, variables)`` after every fine-tuning epoch.
  """

  layer: Optional[str] = None
  activation: str = "elu"
  prune_ratio: float = 0.8
  max_acc_drop: float = 0.04
  prune_step: int = 1
  epochs: int = 10
  batch_size: int = 128
  learning_rate: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  callback: Optional[Callable[[Any, dict, PyTree], Any]] = dataclasses.field(
      default=None, compare=False)

  def __post_init__(self):
    if self.layer is not None and (not isinstance(self.layer, str) or not self.layer):
      raise ValueError(f"FPConfig.layer must be None or a layer name, got {self.layer!r}")
    _check_activation("FPConfig", self.activation)
    _checks.reals("FPConfig", self, ("prune_ratio", "max_acc_drop"), 0, 1)
    _checks.integers("FPConfig", self, ("prune_step",))
    _checks.integers("FPConfig", self, ("epochs",), minimum=0)
    _checks.integers("FPConfig", self, ("batch_size",))
    _checks.sgd("FPConfig", self)
    _checks.optional_callable("FPConfig", self)

  def replace(self, **changes) -> "FPConfig":
    return dataclasses.replace(self, **changes)

  def ft_config(self) -> FTConfig:
    """The fine-tuning settings as an :class:`~ibau_jax.defenses.FTConfig` (needs
    ``epochs >= 1``)."""
    return FTConfig(epochs=self.epochs, batch_size=self.batch_size,
                    learning_rate=self.learning_rate, momentum=self.momentum,
                    weight_decay=self.weight_decay)


# ----------------------------------------------------------------------------------------
# Layers: lookup, channel statistics, masked accuracy
# ----------------------------------------------------------------------------------------


def layer_kinds(apply_fn, variables: PyTree, images) -> dict[str, tuple[str, tuple]]:
  """``{name: (module class name, output shape)}`` of every layer (first call wins)."""
  out: dict[str, tuple[str, tuple]] = {}
  for name, kind, shape in layers_lib.list_layers(apply_fn, variables, images):
    out.setdefault(name, (kind, shape))
  return out


def check_layer_names(cls_field: str, names, known: dict) -> None:
  """``ValueError`` naming the model's layers if one of ``names`` is not among them."""
  for name in names:
    if name not in known:
      raise ValueError(f"{cls_field}: {name!r} is not a layer of the model; its layers are "
                       f"{list(known)} (layers are found only in Flax linen models)")


def default_prune_layer(apply_fn, variables: PyTree, images) -> str:
  """The last ``BatchNorm`` layer if the model has one, else the last ``Conv``."""
  try:
    return layers_lib.last_layer_of_type(apply_fn, variables, images, "BatchNorm")
  except ValueError:
    return layers_lib.last_layer_of_type(apply_fn, variables, images, "Conv")


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _channel_sums(apply_fn, layer: str, activation: str, variables, x):
  _, acts = layers_lib.apply_with_layers(apply_fn, variables, x, capture=(layer,))
  a = ACTIVATIONS[activation](acts[layer].astype(jnp.float32))
  return a.reshape(-1, a.shape[-1]).sum(axis=0), a.size // a.shape[-1]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _masked_correct(apply_fn, layer: str, variables, x, y, keep):
  logits, _ = layers_lib.apply_with_layers(apply_fn, variables, x,
                                           modify={layer: layers_lib.channel_mask(keep)})
  return jnp.sum(jnp.argmax(logits, axis=-1) == y)


def _chunks(n: int, size: int):
  return [(i, min(i + size, n)) for i in range(0, n, size)]


def mean_channel_activation(apply_fn, variables: PyTree, images, layer: str,
                            activation: str = "identity", batch_size: int = 128) -> np.ndarray:
  """``μ_c``: the mean of ``ACTIVATIONS[activation](output of layer)`` over images and
  positions, per channel (last axis), as float64 numpy of shape ``(C,)``."""
  total, count = None, 0
  for lo, hi in _chunks(images.shape[0], batch_size):
    s, c = _channel_sums(apply_fn, layer, activation, variables, images[lo:hi])
    s = np.asarray(s, np.float64)
    total = s if total is None else total + s
    count += int(c)
  return total / count


def masked_accuracy(apply_fn, variables: PyTree, images, labels, layer: str, keep,
                    batch_size: int = 128) -> float:
  """Clean accuracy with the layer's output multiplied by ``keep`` (shape ``(C,)``) on
  its channel axis."""
  keep = jnp.asarray(keep, jnp.float32)
  correct = 0
  for lo, hi in _chunks(images.shape[0], batch_size):
    correct += int(_masked_correct(apply_fn, layer, variables, images[lo:hi], labels[lo:hi],
                                   keep))
  return correct / images.shape[0]


# ----------------------------------------------------------------------------------------
# Baking the channel mask into the parameters
# ----------------------------------------------------------------------------------------


def prune_params(params: PyTree, layer: str, kind: str, pruned) -> tuple[PyTree, PyTree]:
  """Zeroes the parameters producing output channels ``pruned`` of ``layer``.

  ``BatchNorm``: ``scale[c]`` and ``bias[c]``; ``Conv``/``Dense``: ``kernel[..., c]`` and
  ``bias[c]``.  Returns ``(params, keep)`` where ``keep`` has params' structure: boolean
  arrays, False exactly at the zeroed entries (the entries fine-tuning must not move).
  """
  if kind not in PRUNABLE_KINDS:
    raise ValueError(f"cannot prune layer {layer!r} of class {kind}: Fine-Pruning zeroes the "
                     f"output channels of {PRUNABLE_KINDS} layers only")
  path = layer.split("/")
  sub = params
  for p in path:
    if not hasattr(sub, "keys") or p not in sub:
      raise ValueError(f"layer {layer!r} has no parameters in variables['params'] (pruning "
                       "bakes the channel mask into the layer's parameters)")
    sub = sub[p]
  needed = ("scale",) if kind == "BatchNorm" else ("kernel",)
  for name in needed:
    if name not in sub:
      raise ValueError(f"layer {layer!r} ({kind}) has no {name!r} parameter, so its output "
                       f"channels cannot be zeroed through its parameters; its parameters are "
                       f"{sorted(sub)}")
  pruned = np.asarray(pruned, np.int64)
  channels = np.asarray(sub[needed[0]]).shape[-1]
  channel_keep = np.ones(channels, bool)
  channel_keep[pruned] = False

  def key_name(k):
    return str(getattr(k, "key", getattr(k, "name", k)))

  def keep_of(key_path, leaf):
    names = [key_name(k) for k in key_path]
    if (names[:-1] == path and names[-1] in ("kernel", "bias", "scale")
        and jnp.ndim(leaf) >= 1 and jnp.shape(leaf)[-1] == channels):
      return jnp.asarray(np.broadcast_to(channel_keep, jnp.shape(leaf)))
    return jnp.ones(jnp.shape(leaf), bool)

  keep = jax.tree_util.tree_map_with_path(keep_of, params)
  new_params = jax.tree_util.tree_map(
      lambda leaf, k: jnp.where(k, leaf, jnp.zeros((), jnp.result_type(leaf))), params, keep)
  return new_params, keep


# ----------------------------------------------------------------------------------------
# Fine-tuning with frozen zeros
# ----------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1))
def _masked_step(config: FTConfig, apply_fn, params, opt_state, rest, keep, x, y):
  def loss_fn(p):
    logits = apply_fn({"params": p, **rest}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = _tx(config).update(grads, opt_state, params)
  updates = jax.tree_util.tree_map(lambda u, k: jnp.where(k, u, jnp.zeros((), u.dtype)),
                                   updates, keep)
  return optax.apply_updates(params, updates), opt_state, loss


def fine_tune_masked(apply_fn, variables: PyTree, images, labels, keep: PyTree,
                     config: FTConfig, *, key: jax.Array, callback=None):
  """:func:`~ibau_jax.defenses.fine_tune` with the optimizer's updates multiplied by
  ``keep`` (a tree of booleans like params): entries where ``keep`` is False never move.
  Same batches as ``fine_tune`` (``permutation(fold_in(key, epoch), n)``).  Returns
  ``(variables, history)``."""
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  static = config.replace(callback=None, epochs=1)  # one compilation for any epochs
  opt_state = _tx(static).init(params)
  n, bsz = images.shape[0], config.batch_size
  history = []
  for epoch in range(config.epochs):
    start = time.perf_counter()
    order = jax.random.permutation(jax.random.fold_in(key, epoch), n)
    losses = []
    for i in range(n // bsz):
      idx = order[i * bsz:(i + 1) * bsz]
      params, opt_state, loss = _masked_step(static, apply_fn, params, opt_state, rest, keep,
                                             images[idx], labels[idx])
      losses.append(loss)
    entry = dict(stage="finetune", epoch=epoch, loss=float(jnp.mean(jnp.stack(losses))),
                 seconds=time.perf_counter() - start)
    _checks.finite_loss(entry["loss"], "Fine-Pruning's fine-tuning", epoch,
                        "lower FPConfig.learning_rate or raise batch_size")
    history.append(entry)
    if callback is not None:
      callback(epoch, dict(entry), _checks.with_params(variables, params))
  return _checks.with_params(variables, params), history


# ----------------------------------------------------------------------------------------
# The defense
# ----------------------------------------------------------------------------------------


def fine_pruning(apply_fn, variables: PyTree, images, labels, config: FPConfig = FPConfig(),
                 *, key: jax.Array):
  """Fine-Pruning: prunes the clean-dormant channels of one layer, then fine-tunes.

  Args:
    apply_fn: ``apply_fn(variables, images) -> logits`` in inference mode (a Flax linen
      model: its layers are reached through :mod:`ibau_jax.defenses.layers`).
    variables: the model's variables; only ``params`` change.
    images, labels: the defender's clean set (float NHWC in [0, 1], integer labels).
    config: :class:`FPConfig` (None: the defaults).
    key: PRNG key of the fine-tuning shuffles (pruning is deterministic).

  Returns:
    :class:`~ibau_jax.defenses.DefenseResult`: ``variables`` (in the container type of the
    input) with the pruning baked into ``params`` (see the module docstring), ``history``: first the pruning entry
    (``stage="prune"``, ``layer``, ``activation``, ``mean_activation`` per channel,
    ``order`` (channels by increasing mean activation), ``steps`` (one dict per tried step:
    ``num_pruned``, ``accuracy``, ``accepted``), ``base_accuracy``, ``num_pruned``,
    ``pruned`` (channel indices in pruning order), ``accuracy`` (after pruning),
    ``seconds``), then one entry per fine-tuning epoch (``stage="finetune"``, ``epoch``,
    mean ``loss``, ``seconds``).

  Raises:
    ValueError: a ``config`` that is not an :class:`FPConfig`, bad inputs, non-finite
      ``variables``, a layer name that is not in the model, a layer whose output channels
      cannot be zeroed through its parameters, or a fine-tuning that diverged.
  """
  from ibau_jax.defenses import DefenseResult, check_inputs
  config = _checks.config_of("fine_pruning", config, FPConfig)
  check_inputs(apply_fn, variables, images, labels, config.batch_size, key=key,
               task="Fine-Pruning")
  start = time.perf_counter()
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  known = layer_kinds(apply_fn, variables, images[:1])
  if config.layer is None:
    layer = default_prune_layer(apply_fn, variables, images[:1])
  else:
    layer = config.layer
    check_layer_names("FPConfig.layer", [layer], known)
  kind, shape = known[layer]
  if kind not in PRUNABLE_KINDS:
    raise ValueError(f"FPConfig.layer {layer!r} is a {kind}; Fine-Pruning zeroes the output "
                     f"channels of {PRUNABLE_KINDS} layers only")
  if len(shape) < 2:
    raise ValueError(f"FPConfig.layer {layer!r} has output shape {shape}; need (N, ..., C)")
  channels = int(shape[-1])
  bsz = config.batch_size

  mean_act = mean_channel_activation(apply_fn, variables, images, layer, config.activation,
                                     bsz)
  order = np.argsort(mean_act, kind="stable")
  keep = np.ones(channels, np.float32)
  base_acc = masked_accuracy(apply_fn, variables, images, labels, layer, keep, bsz)
  k_max = int(math.floor(config.prune_ratio * channels + 1e-9))
  steps, num_pruned, acc = [], 0, base_acc
  tol = 1e-9
  while num_pruned < k_max:
    k = min(num_pruned + config.prune_step, k_max)
    trial = np.ones(channels, np.float32)
    trial[order[:k]] = 0.0
    acc_k = masked_accuracy(apply_fn, variables, images, labels, layer, trial, bsz)
    accepted = base_acc - acc_k <= config.max_acc_drop + tol
    steps.append(dict(num_pruned=k, accuracy=acc_k, accepted=bool(accepted)))
    if not accepted:
      break
    num_pruned, acc = k, acc_k
  pruned = order[:num_pruned]

  params, keep_tree = prune_params(variables["params"], layer, kind, pruned)
  pruned_vars = _checks.with_params(variables, params)
  prune_entry = dict(stage="prune", layer=layer, activation=config.activation,
                     mean_activation=[float(m) for m in mean_act],
                     order=[int(c) for c in order], steps=steps, base_accuracy=base_acc,
                     num_pruned=int(num_pruned), pruned=[int(c) for c in pruned],
                     accuracy=acc, seconds=time.perf_counter() - start)
  history = [prune_entry]
  if config.callback is not None:
    config.callback("prune", dict(prune_entry), pruned_vars)
  if config.epochs > 0:
    result, ft_history = fine_tune_masked(apply_fn, pruned_vars, images, labels, keep_tree,
                                          config.ft_config(),
                                          key=key, callback=config.callback)
    history.extend(ft_history)
  else:
    result = pruned_vars
  return DefenseResult(variables=result, history=history)
