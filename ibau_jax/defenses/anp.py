"""Adversarial Neuron Pruning (ANP; Wu & Wang, NeurIPS 2021, "Adversarial Neuron
Perturbations Expose Backdoors" / "Adversarial Neuron Pruning Purifies Backdoored Deep
Models").

Backdoored networks are unusually sensitive to small multiplicative perturbations of a few
neurons: perturbing them makes the clean loss jump (the perturbation "fires" the backdoor).
ANP gives every neuron (channel) ``k`` of the chosen layers a mask ``m_k ∈ [0, 1]`` and
perturbations ``δ_k, ξ_k ∈ [−ε, ε]`` of its weight and bias.  For a BatchNorm output
``y = γ·x̂ + β`` the masked and perturbed neuron is

    y'_k = (m_k + δ_k)·γ_k·x̂ + (1 + ξ_k)·β_k = (m_k + δ_k)·(y_k − β_k) + (1 + ξ_k)·β_k,

the right-hand form being how it is computed here: :func:`neuron_modifier` rewrites the
layer's output through :func:`~ibau_jax.defenses.layers.apply_with_layers`, needing only
``y`` and ``β = variables["params"][layer]["bias"]`` (``γ·x̂ = y − β``).  The same identity
holds for a Conv or Dense layer (``y = W x + b``: the mask scales output channel ``k`` of
``W``), so such layers may be named too.

For each batch of the defender's clean set (``L`` the cross-entropy, ``n`` the batch):

1. Perturbation: ``δ, ξ ~ U[−ε, ε]``, then ``anp_steps`` steps of projected sign-gradient
   ascent ``δ ← clip(δ + (ε/anp_steps)·sign(∇_δ L(m, δ, ξ)), −ε, ε)`` (same for ξ).
2. Masks: one SGD step (with momentum) on ``α·L_nat(m) + (1 − α)·L_rob(m, δ, ξ)`` where
   ``L_nat`` uses the masks alone (δ = ξ = 0), then ``m ← clip(m, 0, 1)``.

Afterwards the neurons with small masks are pruned: those with ``m_k < threshold``
(``prune_by="threshold"``), or the ``prune_number`` (``"number"``) or ``prune_fraction``
(``"fraction"``) lowest masks over all chosen layers.  Pruning is baked into
``variables["params"]``: the pruned channels' weight (γ, or the kernel's output channel) and
bias are set to 0; every other parameter stays bit-identical (ANP does not fine-tune).

The paper's hyper-parameters (CIFAR-10, 1% of the training set as clean set): ε = 0.4,
one perturbation step, α = 0.2, mask SGD lr 0.2 and momentum 0.9, batch 128, 2000
iterations, pruning threshold 0.2.  These are the defaults here except ``iterations`` (500,
for practicality; pass 2000 for the paper's budget).

Differences from the official code (csdongxian/ANP_backdoor): the model runs through the
caller's inference ``apply_fn`` (BatchNorm running statistics frozen; the official code
optimises the masks in train mode, i.e. with batch statistics); the last partial batch of
each pass is dropped (fixed shapes); δ and ξ are clipped to [−ε, ε] after the ascent step;
pruning zeroes β as well as γ (``zero_bias=False`` zeroes γ only, as the official code,
which equals setting the mask to 0).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ibau_jax import _loops
from ibau_jax import _prng
from ibau_jax import _resume
from ibau_jax.defenses import _checks
from ibau_jax.defenses import layers as layer_lib

PyTree = Any

_PRUNE_BY = ("threshold", "number", "fraction")
CHECKPOINT_FILE = "anp.npz"


@dataclasses.dataclass(frozen=True)
class ANPConfig:
  """Attributes:
    iterations: mask-optimisation steps (one batch each; the paper: 2000; default 500).
    batch_size: clean images per step (the last partial batch of each pass is dropped).
    eps: ε, the bound of the multiplicative perturbations δ, ξ ∈ [−ε, ε] (paper: 0.4);
      0 turns the perturbation off (then the loss is ``α·L_nat``, as the official code).
    anp_steps: sign-ascent steps on (δ, ξ) per batch, of size ``ε / anp_steps`` (paper: 1).
    alpha: α, the weight of the natural loss in ``α·L_nat + (1 − α)·L_rob`` (paper: 0.2).
    learning_rate, momentum: of the masks' SGD (paper: 0.2 and 0.9).
    layers: names of the layers to mask (see :mod:`ibau_jax.defenses.layers`); None: every
      BatchNorm layer.  A layer needs a per-channel weight (``scale`` or ``kernel``, output
      channels on the last axis) in ``variables["params"]``; a ``bias`` is optional.
    prune_by: ``"threshold"`` (masks below ``threshold``), ``"number"`` (the
      ``prune_number`` lowest masks) or ``"fraction"`` (the lowest ``prune_fraction`` of all
      masked neurons, rounded down); rankings are over all chosen layers together.
    threshold: pruning threshold on the masks (paper: 0.2).
    prune_number: how many neurons ``prune_by="number"`` prunes.
    prune_fraction: which fraction of the neurons ``prune_by="fraction"`` prunes, in [0, 1].
    zero_bias: a bool: zero the bias β of pruned neurons as well as their weight (True: the
      neuron outputs 0; False: only the weight, as the official code, i.e. ``m_k = 0``).
    log_every: iterations per history entry (and per compiled ``lax.scan`` chunk when the
      loop is a scan).
    callback: ``callback(iteration, stats, variables)`` after every ``log_every`` iterations,
      ``variables`` pruned by the current masks.
    checkpoint_dir: a folder (a non-empty path) in which the mask optimisation saves its
      state and history after every chunk (``anp.npz``, written atomically); a run given the
      same folder, inputs, key and settings resumes from it, first replaying the saved
      history entries to ``callback`` (each marked ``seconds_before``: the seconds it took
      in the earlier run), and returns what an uninterrupted run returns.  A state made with
      anything else is ignored and overwritten; the file is deleted when the defense
      returns.  None: nothing is saved.
    loop: how the iterations run: ``"scan"``, one compiled ``lax.scan`` per ``log_every``
      chunk; ``"python"``, one compiled iteration per Python step (no host round-trip in
      between); ``"auto"``: Python on CPU, where XLA:CPU runs these convolutions inside a
      loop several times slower (small-VGG16, batch 128, next to another job: 12.0 s
      against 1.8 s an iteration), scan elsewhere.  Both give the same masks up to float
      rounding.
  """

  iterations: int = 500
  batch_size: int = 128
  eps: float = 0.4
  anp_steps: int = 1
  alpha: float = 0.2
  learning_rate: float = 0.2
  momentum: float = 0.9
  layers: Optional[Sequence[str]] = None
  prune_by: str = "threshold"
  threshold: float = 0.2
  prune_number: int = 0
  prune_fraction: float = 0.0
  zero_bias: bool = True
  log_every: int = 100
  callback: Optional[Callable[[int, dict, PyTree], Any]] = dataclasses.field(
      default=None, compare=False)
  checkpoint_dir: Optional[str] = dataclasses.field(default=None, compare=False)
  loop: str = dataclasses.field(default="auto", compare=False)

  def __post_init__(self):
    _loops.check("ANPConfig", self.loop)
    _checks.integers("ANPConfig", self, ("iterations", "batch_size", "anp_steps", "log_every"))
    _checks.checkpoint_folder("ANPConfig", self.checkpoint_dir)
    _checks.integers("ANPConfig", self, ("prune_number",), minimum=0)
    _checks.reals("ANPConfig", self, ("eps",), minimum=0)
    _checks.reals("ANPConfig", self, ("alpha",), 0, 1)
    _checks.sgd("ANPConfig", self, weight_decay=None)
    if self.prune_by not in _PRUNE_BY:
      raise ValueError(f"ANPConfig.prune_by must be one of {_PRUNE_BY}, got {self.prune_by!r}")
    _checks.reals("ANPConfig", self, ("threshold", "prune_fraction"), 0, 1)
    _checks.bools("ANPConfig", self, ("zero_bias",))
    if self.layers is not None:
      if isinstance(self.layers, str):
        raise ValueError(f"ANPConfig.layers must be a sequence of layer names, not a string "
                         f"({self.layers!r}); write layers=({self.layers!r},)")
      names = tuple(self.layers)
      if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"ANPConfig.layers must be None or a non-empty sequence of layer "
                         f"names, got {self.layers!r}")
      if len(set(names)) != len(names):
        raise ValueError(f"ANPConfig.layers has repeated names: {names}")
      object.__setattr__(self, "layers", names)  # hashable, for jax.jit
    _checks.optional_callable("ANPConfig", self)

  def replace(self, **changes) -> "ANPConfig":
    return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------
# Neurons: the perturbed output, finding the layers, pruning
# ----------------------------------------------------------------------------------------


def neuron_modifier(bias: jax.Array, mask: jax.Array, delta: Optional[jax.Array] = None,
                    xi: Optional[jax.Array] = None) -> Callable[[jax.Array], jax.Array]:
  """The ``modify`` function of a masked, perturbed layer (channels on the last axis):

      y ↦ (m + δ)·(y − β) + (1 + ξ)·β,

  which for ``y = γ·x̂ + β`` (BatchNorm) is ``(m + δ)·γ·x̂ + (1 + ξ)·β``.  ``delta`` and
  ``xi`` default to 0 (the masked, unperturbed layer).  All arguments have shape ``(C,)``.
  """
  weight_coeff = mask if delta is None else mask + delta
  bias_coeff = 1.0 if xi is None else 1.0 + xi

  def apply(y: jax.Array) -> jax.Array:
    if y.shape[-1] != mask.shape[-1]:
      raise ValueError(f"the mask has {mask.shape[-1]} channels, the layer output has shape "
                       f"{y.shape}")
    b = jnp.asarray(bias, y.dtype)
    return (jnp.asarray(weight_coeff, y.dtype) * (y - b)
            + jnp.asarray(bias_coeff, y.dtype) * b)

  return apply


def _layer_params(params: Mapping, name: str) -> Mapping:
  node = params
  for part in name.split("/"):
    if not isinstance(node, Mapping) or part not in node:
      raise ValueError(f"layer {name!r} has no parameters in variables['params'] (ANP masks "
                       "layers with a per-channel weight: BatchNorm, Conv, Dense)")
    node = node[part]
  return node


def _weight_name(layer: Mapping, name: str) -> str:
  for w in ("scale", "kernel"):
    if w in layer:
      return w
  raise ValueError(f"layer {name!r} has no 'scale' or 'kernel' parameter (its parameters: "
                   f"{sorted(layer)}); ANP needs a per-channel weight to prune")


def resolve_layers(apply_fn: Callable, variables: PyTree, images: jax.Array,
                   names: Optional[Sequence[str]] = None) -> dict[str, int]:
  """``{layer name: number of channels}`` of the layers ANP masks: ``names`` (checked to
  be called by ``apply_fn`` and to have a per-channel weight), or every BatchNorm layer.

  Raises:
    ValueError: no BatchNorm layer (and no ``names``), an unknown name, or a layer whose
      parameters do not fit its output channels.
  """
  found = layer_lib.list_layers(apply_fn, variables, jnp.asarray(images[:1]))
  shapes = {n: s for n, _, s in found}
  if names is None:
    names = list(dict.fromkeys(n for n, kind, _ in found if kind == "BatchNorm"))
    if not names:
      raise ValueError("ANP found no BatchNorm layer in the model (layers: "
                       f"{[n for n, _, _ in found]}); name the layers to mask with "
                       "ANPConfig(layers=...)")
  out = {}
  for name in names:
    if name not in shapes:
      raise ValueError(f"layer {name!r} is not called by apply_fn; its layers are "
                       f"{list(shapes)} (layers are found only in Flax linen models)")
    layer = _layer_params(variables["params"], name)
    weight = jnp.shape(layer[_weight_name(layer, name)])
    channels = shapes[name][-1] if shapes[name] else None
    if not weight or weight[-1] != channels or (
        "bias" in layer and jnp.shape(layer["bias"]) != (channels,)):
      raise ValueError(f"layer {name!r}: output shape {shapes[name]} does not match its "
                       f"parameters {jax.tree_util.tree_map(jnp.shape, dict(layer))} (ANP "
                       "masks the last axis)")
    out[name] = int(channels)
  return out


def select_pruned(masks: Mapping[str, Any], config: ANPConfig) -> dict[str, np.ndarray]:
  """``{layer: sorted indices of the pruned channels}`` chosen from the masks by
  ``config.prune_by`` (ties in a ranking go to the layer that comes first in ``masks``, then
  to the lower index)."""
  names = list(masks)
  values = [np.asarray(masks[n], np.float64).reshape(-1) for n in names]
  if config.prune_by == "threshold":
    chosen = [np.flatnonzero(v < config.threshold) for v in values]
    return {n: c for n, c in zip(names, chosen)}
  flat = np.concatenate(values) if values else np.zeros(0)
  count = (config.prune_number if config.prune_by == "number"
           else int(math.floor(config.prune_fraction * flat.size + 1e-9)))
  order = np.argsort(flat, kind="stable")[:min(count, flat.size)]
  offsets = np.cumsum([0] + [v.size for v in values])
  return {n: np.sort(order[(order >= lo) & (order < hi)] - lo)
          for n, lo, hi in zip(names, offsets[:-1], offsets[1:])}


def prune_neurons(variables: PyTree, pruned: Mapping[str, Any], zero_bias: bool = True
                  ) -> PyTree:
  """``variables`` with the weight (``scale`` or the kernel's output channel) and, if
  ``zero_bias``, the ``bias`` of every channel in ``pruned`` (``{layer: indices}``) set to
  0.  Everything else is returned unchanged (the same arrays), in the same containers (a
  ``FrozenDict`` stays one)."""

  def set_path(tree, parts, layer):
    if not parts:
      return layer
    return _checks.same_container(tree, {**tree, parts[0]: set_path(tree[parts[0]], parts[1:],
                                                                    layer)})

  params = variables["params"]
  for name, idx in pruned.items():
    idx = np.asarray(idx, np.int64).reshape(-1)
    if idx.size == 0:
      continue
    original = _layer_params(params, name)
    layer = dict(original)
    w = _weight_name(layer, name)
    layer[w] = jnp.asarray(layer[w]).at[..., idx].set(0)
    if zero_bias and "bias" in layer:
      layer["bias"] = jnp.asarray(layer["bias"]).at[idx].set(0)
    params = set_path(params, name.split("/"), _checks.same_container(original, layer))
  return _checks.with_params(variables, params)


# ----------------------------------------------------------------------------------------
# The mask optimisation (one jitted lax.scan per chunk, or one jitted step per iteration)
# ----------------------------------------------------------------------------------------


def _tx(config: ANPConfig) -> optax.GradientTransformation:
  return optax.sgd(config.learning_rate, momentum=config.momentum or None)


def _step(config: ANPConfig, apply_fn, names: tuple, variables, biases, images, labels,
          carry, inputs):
  """One ANP iteration (perturbation ascent, then the masks' SGD step) on batch ``inputs``."""
  eps = config.eps

  def loss(m, noise, x, y):
    modify = {n: neuron_modifier(biases[n], m[n], *(noise[n] if noise else (None, None)))
              for n in names}
    logits, _ = layer_lib.apply_with_layers(apply_fn, variables, x, modify=modify)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  m, opt_state = carry
  i, key = inputs
  x, y = images[i], labels[i]
  if eps > 0:
    ks = jax.random.split(key, 2 * len(names))
    noise = {n: (_prng.uniform(ks[2 * j], m[n].shape, m[n].dtype, -eps, eps),
                 _prng.uniform(ks[2 * j + 1], m[n].shape, m[n].dtype, -eps, eps))
             for j, n in enumerate(names)}
    for _ in range(config.anp_steps):
      g = jax.grad(loss, argnums=1)(m, noise, x, y)
      noise = jax.tree_util.tree_map(
          lambda d, gd: jnp.clip(d + (eps / config.anp_steps) * jnp.sign(gd), -eps, eps),
          noise, g)

    def objective(mm):
      nat, rob = loss(mm, None, x, y), loss(mm, noise, x, y)
      return config.alpha * nat + (1 - config.alpha) * rob, (nat, rob)

    noise_max = jnp.max(jnp.stack([jnp.max(jnp.abs(a))
                                   for a in jax.tree_util.tree_leaves(noise)]))
  else:
    def objective(mm):
      nat = loss(mm, None, x, y)
      return config.alpha * nat, (nat, jnp.zeros_like(nat))

    noise_max = jnp.zeros(())
  (total, (nat, rob)), g = jax.value_and_grad(objective, has_aux=True)(m)
  updates, opt_state = _tx(config).update(g, opt_state, m)
  m = jax.tree_util.tree_map(lambda a: jnp.clip(a, 0.0, 1.0), optax.apply_updates(m, updates))
  return (m, opt_state), dict(loss=total, loss_nat=nat, loss_rob=rob, noise_abs_max=noise_max)


_step_jit = jax.jit(_step, static_argnums=(0, 1, 2))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _chunk(config: ANPConfig, apply_fn, names: tuple, variables, biases, masks, opt_state,
           images, labels, idx, keys):
  step = functools.partial(_step, config, apply_fn, names, variables, biases, images, labels)
  (masks, opt_state), stats = jax.lax.scan(step, (masks, opt_state), (idx, keys))
  return masks, opt_state, stats


def _chunk_python(config: ANPConfig, apply_fn, names: tuple, variables, biases, masks,
                  opt_state, images, labels, idx, keys):
  """:func:`_chunk` as one compiled step per Python iteration (faster on CPU)."""
  carry, stats = (masks, opt_state), []
  for t in range(idx.shape[0]):
    carry, s = _step_jit(config, apply_fn, names, variables, biases, images, labels, carry,
                         (idx[t], keys[t]))
    stats.append(s)
  stats = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *stats)
  return carry[0], carry[1], stats


def anp(apply_fn, variables: PyTree, images, labels, config: ANPConfig = ANPConfig(), *,
        key: jax.Array):
  """Adversarial Neuron Pruning of ``variables`` with the defender's clean set.

  Args:
    apply_fn: ``apply_fn(variables, images) -> logits`` in inference mode (a Flax linen
      model's ``apply``, so its layers can be masked; see :mod:`ibau_jax.defenses.layers`).
    variables: the model's variables; only ``variables["params"]`` changes (pruned
      channels set to 0), every other collection passes through.
    images, labels: the clean set (float NHWC in [0, 1], integer labels).
    config: :class:`ANPConfig` (None: the defaults).
    key: PRNG key (batch order and the perturbations' random starts).

  Returns:
    :class:`~ibau_jax.defenses.DefenseResult` (``variables`` in the container type of the
    input); ``history`` has one entry per ``log_every`` iterations (plain Python values, so
    ``json.dumps`` takes it): ``iteration`` (iterations done), mean ``loss``, ``loss_nat``,
    ``loss_rob``, ``noise_abs_max`` (largest |δ|, |ξ| used), ``masks`` (``{layer: list}``),
    ``mask_min``, ``mask_max``, ``pruned`` (``{layer: indices}`` the current masks would
    prune), ``num_pruned`` and ``seconds``.  The last entry's ``pruned`` is what was pruned.
    Entries restored from a checkpoint also have ``seconds_before`` (equal to ``seconds``).

  Raises:
    ValueError: a ``config`` that is not an :class:`ANPConfig`, bad inputs or non-finite
      ``variables`` (before any work), or the loss of a ``log_every`` chunk, or a mask, is
      NaN or infinite (e.g. an ε so large that the perturbed logits overflow); the last
      saved state is kept.
  """
  from ibau_jax.defenses import DefenseResult, check_inputs
  config = _checks.config_of("anp", config, ANPConfig)
  check_inputs(apply_fn, variables, images, labels, config.batch_size, key=key,
               task="ANP")
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  channels = resolve_layers(apply_fn, variables, images, config.layers)
  names = tuple(channels)
  params = variables["params"]
  biases = {}
  for n, c in channels.items():
    layer = _layer_params(params, n)
    biases[n] = (jnp.asarray(layer["bias"], jnp.float32) if "bias" in layer
                 else jnp.zeros((c,), jnp.float32))
  masks = {n: jnp.ones((c,), jnp.float32) for n, c in channels.items()}
  static = config.replace(callback=None)
  opt_state = _tx(config).init(masks)

  n, bsz = images.shape[0], config.batch_size
  per_pass = n // bsz
  order_key, noise_key = jax.random.split(key)
  passes = -(-config.iterations // per_pass)
  orders = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(order_key, e), n))(
      jnp.arange(passes))
  batches = orders[:, :per_pass * bsz].reshape(passes * per_pass, bsz)[:config.iterations]
  step_keys = jax.vmap(lambda t: jax.random.fold_in(noise_key, t))(
      jnp.arange(config.iterations))

  history = []
  done = 0
  path = _resume.path(config.checkpoint_dir, CHECKPOINT_FILE)
  digest = ""
  if path is not None:
    digest = _resume.fingerprint(static, names, arrays=(variables, images, labels, key))
    loaded = _resume.load(path, digest, (masks, opt_state))
    if loaded is not None:
      done, _, (masks, opt_state), text = loaded
      for entry in json.loads(text):
        entry["seconds_before"] = entry["seconds"]
        history.append(entry)
        if config.callback is not None:
          config.callback(entry["iteration"], dict(entry),
                          prune_neurons(variables, entry["pruned"], config.zero_bias))
  while done < config.iterations:
    start = time.perf_counter()
    end = min(done + config.log_every, config.iterations)
    chunk = _chunk if _loops.use_scan(config.loop) else _chunk_python
    masks, opt_state, stats = chunk(static, apply_fn, names, variables, biases, masks,
                                    opt_state, images, labels, batches[done:end],
                                    step_keys[done:end])
    done = end
    host_masks = {k: np.asarray(masks[k]) for k in names}  # in layer order
    pruned = select_pruned(host_masks, config)
    all_masks = np.concatenate(list(host_masks.values()))
    entry = dict(iteration=done,
                 loss=float(jnp.mean(stats["loss"])),
                 loss_nat=float(jnp.mean(stats["loss_nat"])),
                 loss_rob=float(jnp.mean(stats["loss_rob"])),
                 noise_abs_max=float(jnp.max(stats["noise_abs_max"])),
                 masks={k: v.tolist() for k, v in host_masks.items()},
                 mask_min=float(all_masks.min()), mask_max=float(all_masks.max()),
                 pruned={k: v.tolist() for k, v in pruned.items()},
                 num_pruned=int(sum(v.size for v in pruned.values())),
                 seconds=time.perf_counter() - start)
    # (NaN masks after a finite loss would make the next chunk's loss NaN: stop now.)
    _checks.finite_loss(entry["loss"] if np.isfinite(all_masks).all() else float("nan"),
                        "ANP's mask optimisation", done, "lower ANPConfig.eps or learning_rate",
                        unit="iteration")
    history.append(entry)
    _resume.save(path, digest, done, sum(h["seconds"] for h in history), (masks, opt_state),
                 _resume.to_json([{k: v for k, v in h.items() if k != "seconds_before"}
                                  for h in history]))
    if config.callback is not None:
      config.callback(done, dict(entry), prune_neurons(variables, pruned, config.zero_bias))
  pruned = select_pruned({k: np.asarray(masks[k]) for k in names}, config)
  _resume.remove(path)
  return DefenseResult(variables=prune_neurons(variables, pruned, config.zero_bias),
                       history=history)
