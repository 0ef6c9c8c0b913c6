"""DeepInspect (Chen, Fu, Zhao and Koushanfar, IJCAI 2019): detect a Trojan by how little
perturbation a generator needs to push inputs into each class, then patch the model.

DeepInspect is a black-box, data-limited pipeline of three stages:

1. **Model inversion** (no clean data needed).  For every class ``c`` it recovers ``k``
   substitute images ``x_c = σ(w_c)`` (the sigmoid keeps them in [0, 1]) by Adam on

       L_inv(w_c) = (1/k) Σ_j −log softmax(f(x_cj))_c  +  α · TV(x_c)  +  β · mean (x_c − ½)²

   with ``TV`` the mean squared difference of neighbouring pixels (a smoothness prior) and the
   L2 term pulling pixels towards grey; all classes are optimised at once (``vmap`` over
   classes; ``lax.scan`` over steps, see ``loop``).  The paper follows Fredrikson et al. (2015) and minimises
   ``1 − f_c(x) + AuxTerm(x)``; the log-probability here does not saturate once ``f_c`` is
   small.
2. **Trigger generation.**  A conditional generator ``G(z, c)`` (noise ``z ~ N(0, I)``,
   one-hot ``c``; an MLP whose output is ``scale · tanh(·)`` of image shape) is trained with
   Adam on the substitute images ``x`` so that the perturbed input flips to ``c``:

       L_G = Σ_c E_{x,z} [ CE(f(clip(x + G(z, c), 0, 1)), c)  +  λ · mean |G(z, c)| ]

   (``mean |·|`` is the L1 norm divided by the number of pixel values, so λ does not depend on
   the resolution).  For a Trojan target class a small trigger suffices, so after training
   its statistic ``s_c = E_z mean |G(z, c)|`` (the perturbation magnitude needed) is
   abnormally SMALL.  The paper trains a conditional GAN: besides the target loss and a
   perturbation-magnitude loss it has a discriminator term ``L_GAN`` that keeps ``x + G``
   looking like the data.  **This implementation drops the discriminator** (as trojanzoo's
   re-implementation does by default: its GAN weight γ₁ = 0, perturbation weight γ₂ = 0.02 on
   the summed L1 norm, noise dimension 100, Adam at lr 0.01) **and uses the plain λ·L1
   penalty above.**  The statistic means "magnitude needed" only where the generator
   succeeds; its per-class ``success`` rate is reported next to it.
3. **Anomaly detection and patching.**  With the double median absolute deviation (DMAD) of
   the statistics, ``m = median(s)`` and the left-side ``MAD_L = median(m − s_c : s_c ≤ m)``,
   class ``c`` is flagged as a Trojan target when

       s_c < m − τ · 1.4826 · MAD_L        (anomaly index (m − s_c) / (1.4826 MAD_L) > τ),

   τ = 2 by default (the usual MAD outlier bound, also Neural Cleanse's; the paper frames
   the decision as a hypothesis test on this deviation at a chosen significance level).
   ``MAD_L`` rests on the ⌈C/2⌉ statistics at or below the median: with few classes it can
   be tiny, and a class that is merely somewhat easier to reach is then flagged too (seen on
   a clean six-class toy model).  If any class is flagged, the model is patched: it is
   fine-tuned (SGD with momentum) on patch images where a ``patch_fraction`` of every batch
   carries a generated trigger ``G(z, t)`` of a flagged class ``t`` while keeping its TRUE
   label (the paper's model patching: fine-tuning on the recovered data with generated
   triggers and correct labels).  Nothing flagged: the variables are returned unchanged.

The project's defender HAS a clean set, which the paper does not assume.  It is used only
where the config says so: ``use_clean_set_for_generation`` (default False: the generator is
trained on the inverted images, as in the paper) and ``use_clean_set_for_patching``
(default True: the patch set is the clean set together with the inverted images; False:
the inverted images alone, as in the paper).

The model runs in inference mode throughout (``apply_fn`` is the caller's inference
function); only ``variables["params"]`` is trained, and every other collection passes
through unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ibau_jax import _loops
from ibau_jax import _prng
from ibau_jax import _resume
from ibau_jax.defenses import _checks

PyTree = Any

#: Consistency constant of the MAD for normally distributed data.
MAD_SCALE = 1.4826
CHECKPOINT_FILE = "deepinspect.npz"


@dataclasses.dataclass(frozen=True)
class DeepInspectConfig:
  """Every knob of :func:`deepinspect`.

  Attributes:
    batch_size: images per step of the generator and of patching (the clean set must hold
      at least one batch).
    inversion_per_class: k, the substitute images recovered per class.
    inversion_steps: Adam steps of model inversion.
    inversion_lr: Adam learning rate on the pre-sigmoid pixels ``w`` (0 leaves the random
      starting images ``σ(w₀)``, ``w₀ ~ N(0, 0.1²)``).
    tv_weight: α, weight of the total-variation prior of model inversion.
    l2_weight: β, weight of the L2 prior ``mean (x − ½)²`` of model inversion.
    use_clean_set_for_generation: train the generator on the clean set together with the
      inverted images (True) or on the inverted images only (False, the paper).
    noise_dim: dimension of the generator's noise ``z``.
    generator_hidden: width of the generator's two hidden layers.
    perturbation_scale: bound of the generated perturbation, ``G = scale · tanh(·)``.
    generator_steps: Adam steps of the generator (each on ``batch_size`` substitute images
      per class).
    generator_lr: Adam learning rate of the generator.
    magnitude_weight: λ, weight of the perturbation magnitude ``mean |G(z, c)|``.
    statistic_samples: noise samples per class when measuring ``s_c`` and the generated
      triggers' success rate after training.
    threshold: τ of the DMAD rule (flag ``s_c < median − τ · 1.4826 · MAD_L``).
    use_clean_set_for_patching: patch on the clean set together with the inverted images
      (True) or on the inverted images only (False, the paper's data-free setting).
    patch_epochs: passes over the patch set when a class is flagged.
    patch_lr, patch_momentum, patch_weight_decay: of the patching SGD (``λθ`` added to
      the gradient).
    patch_fraction: fraction of every patching batch (at least one image) that carries a
      generated trigger of a flagged class, with its true label.
    loop: ``"scan"``: model inversion and generator training are each one compiled program
      (``lax.scan`` over steps); ``"python"``: one compiled step looped over in Python
      (faster on CPU, where XLA runs convolution gradients inside loops slowly); ``"auto"``:
      python on CPU, scan elsewhere.  Both give the same result.
    callback: ``callback(stage_index, stats, variables)`` after every stage (0: inversion,
      1: trigger generation, 2: detection, 3: patching); its return value is ignored.
    checkpoint_dir: a folder (a non-empty path) in which the inverted images and the trained
      generator are saved after stages 1 and 2 (``deepinspect.npz``, written atomically); a
      run given the same folder, inputs, key and settings skips the saved stages (replaying
      their history entries to ``callback``, each marked ``seconds_before``: its seconds in
      the earlier run) and returns what an uninterrupted run returns.  A state made with
      anything else is ignored and overwritten; the file is deleted when the defense
      returns.  None: nothing is saved.
  """

  batch_size: int = 64
  inversion_per_class: int = 8
  inversion_steps: int = 300
  inversion_lr: float = 0.1
  tv_weight: float = 1.0
  l2_weight: float = 0.01
  use_clean_set_for_generation: bool = False
  noise_dim: int = 32
  generator_hidden: int = 256
  perturbation_scale: float = 1.0
  generator_steps: int = 500
  generator_lr: float = 5e-3
  magnitude_weight: float = 10.0
  statistic_samples: int = 64
  threshold: float = 2.0
  use_clean_set_for_patching: bool = True
  patch_epochs: int = 5
  patch_lr: float = 0.01
  patch_momentum: float = 0.9
  patch_weight_decay: float = 5e-4
  patch_fraction: float = 0.2
  loop: str = "auto"
  callback: Optional[Callable[[int, dict, PyTree], Any]] = dataclasses.field(
      default=None, compare=False)
  checkpoint_dir: Optional[str] = dataclasses.field(default=None, compare=False)

  def __post_init__(self):
    name = "DeepInspectConfig"
    _checks.checkpoint_folder(name, self.checkpoint_dir)
    _checks.integers(name, self, ("batch_size", "inversion_per_class", "inversion_steps",
                                  "noise_dim", "generator_hidden", "generator_steps",
                                  "statistic_samples", "patch_epochs"))
    _checks.reals(name, self, ("inversion_lr", "tv_weight", "l2_weight", "generator_lr",
                               "magnitude_weight"), minimum=0)
    _checks.sgd(name, self, "patch_lr", "patch_momentum", "patch_weight_decay")
    _checks.reals(name, self, ("perturbation_scale", "threshold"), minimum=0, min_open=True)
    _checks.reals(name, self, ("patch_fraction",), 0, 1, min_open=True)
    _checks.bools(name, self, ("use_clean_set_for_generation", "use_clean_set_for_patching"))
    _loops.check("DeepInspectConfig", self.loop)
    _checks.optional_callable("DeepInspectConfig", self)

  def replace(self, **changes) -> "DeepInspectConfig":
    return dataclasses.replace(self, **changes)


# The fields each compiled stage reads: the static configuration of a stage keeps only these
# (the rest at their defaults), so e.g. a new threshold or patching rate reuses the compiled
# inversion and generator code.
_INVERSION_FIELDS = ("inversion_steps", "inversion_lr", "tv_weight", "l2_weight", "loop")
_GENERATOR_FIELDS = ("batch_size", "noise_dim", "generator_hidden", "perturbation_scale",
                     "generator_steps", "generator_lr", "magnitude_weight", "loop")
_PATCH_FIELDS = ("noise_dim", "generator_hidden", "perturbation_scale", "patch_lr",
                 "patch_momentum", "patch_weight_decay", "patch_fraction")


def _stage_config(config: DeepInspectConfig, fields: tuple[str, ...]) -> DeepInspectConfig:
  return DeepInspectConfig(**{name: getattr(config, name) for name in fields})


def _use_scan(config: DeepInspectConfig) -> bool:
  return _loops.use_scan(config.loop)


# ----------------------------------------------------------------------------------------
# Stage 1: model inversion
# ----------------------------------------------------------------------------------------


def _total_variation(x: jax.Array) -> jax.Array:
  """Mean squared difference of vertically and horizontally neighbouring pixels (NHWC)."""
  dh = x[..., 1:, :, :] - x[..., :-1, :, :]
  dw = x[..., :, 1:, :] - x[..., :, :-1, :]
  return jnp.mean(dh ** 2) + jnp.mean(dw ** 2)


def _inversion_losses(config, apply_fn, variables, w):
  """Per-class ``L_inv`` of pre-sigmoid images ``w`` (C, k, H, W, ch) and their CE part."""
  classes = jnp.arange(w.shape[0])

  def one_class(wc, c):
    x = jax.nn.sigmoid(wc)
    logp = jax.nn.log_softmax(apply_fn(variables, x))
    ce = -jnp.mean(logp[:, c])
    reg = config.tv_weight * _total_variation(x) + config.l2_weight * jnp.mean((x - 0.5) ** 2)
    return ce + reg, ce

  return jax.vmap(one_class)(w, classes)


def _inversion_step(config, apply_fn, variables, w, opt_state):
  def loss_fn(w_):
    losses, ce = _inversion_losses(config, apply_fn, variables, w_)
    return jnp.sum(losses), (losses, ce)

  (_, (losses, ce)), grads = jax.value_and_grad(loss_fn, has_aux=True)(w)
  updates, opt_state = optax.adam(config.inversion_lr).update(grads, opt_state, w)
  return optax.apply_updates(w, updates), opt_state, losses, ce


_inversion_losses_jit = jax.jit(_inversion_losses, static_argnums=(0, 1))
_inversion_step_jit = jax.jit(_inversion_step, static_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _inversion_scan(config, apply_fn, variables, w, opt_state):
  def body(carry, _):
    w_, state, _, _ = _inversion_step(config, apply_fn, variables, *carry)
    return (w_, state), None

  (w, opt_state), _ = jax.lax.scan(body, (w, opt_state), None, length=config.inversion_steps)
  return w, opt_state


def model_inversion(apply_fn, variables: PyTree, image_shape: tuple[int, int, int],
                    num_classes: int, config: DeepInspectConfig = DeepInspectConfig(), *,
                    key: jax.Array) -> tuple[jax.Array, dict]:
  """Stage 1: ``config.inversion_per_class`` images per class recovered from the model alone.

  Minimises ``L_inv`` (module docstring) over ``x_c = σ(w_c)`` with Adam, from
  ``w₀ ~ N(0, 0.1²)`` drawn from ``key``, for every class at once.

  Returns:
    ``(images, stats)``: images of shape ``(num_classes, k) + image_shape`` in [0, 1] (row
    ``c`` was optimised for class ``c``) and a dict with the final per-class ``loss`` and
    ``cross_entropy`` and the mean probability of the own class before (``initial_prob``)
    and after (``prob``) the optimisation.
  """
  static = _stage_config(config, _INVERSION_FIELDS)
  shape = (num_classes, config.inversion_per_class) + tuple(image_shape)
  w = 0.1 * _prng.normal(key, shape, jnp.float32)

  def own_prob(w_):
    probs = jax.vmap(lambda wc: jax.nn.softmax(apply_fn(variables, jax.nn.sigmoid(wc))))(w_)
    return np.asarray(jnp.mean(probs[jnp.arange(num_classes), :, jnp.arange(num_classes)],
                               axis=-1))

  initial_prob = own_prob(w)
  opt_state = optax.adam(config.inversion_lr).init(w)
  if _use_scan(config):
    w, opt_state = _inversion_scan(static, apply_fn, variables, w, opt_state)
  else:
    for _ in range(config.inversion_steps):
      w, opt_state, _, _ = _inversion_step_jit(static, apply_fn, variables, w, opt_state)
  losses, ce = _inversion_losses_jit(static, apply_fn, variables, w)
  stats = dict(loss=np.asarray(losses), cross_entropy=np.asarray(ce),
               initial_prob=initial_prob, prob=own_prob(w))
  return jax.nn.sigmoid(w), stats


# ----------------------------------------------------------------------------------------
# Stage 2: the conditional trigger generator
# ----------------------------------------------------------------------------------------


class TriggerGenerator(nn.Module):
  """``G(z, c) = scale · tanh(MLP([z, onehot(c)]))`` reshaped to ``image_shape``.

  The last layer starts at zero, so every class starts from the empty trigger and the
  magnitude it ends with is the magnitude the target loss asked for.
  """

  image_shape: tuple[int, int, int]
  num_classes: int
  hidden: int = 256
  scale: float = 1.0

  @nn.compact
  def __call__(self, z: jax.Array, c: jax.Array) -> jax.Array:
    h = jnp.concatenate([z, jax.nn.one_hot(c, self.num_classes, dtype=z.dtype)], axis=-1)
    h = nn.relu(nn.Dense(self.hidden, kernel_init=_prng.lecun_normal())(h))
    h = nn.relu(nn.Dense(self.hidden, kernel_init=_prng.lecun_normal())(h))
    h = nn.Dense(int(np.prod(self.image_shape)), kernel_init=nn.initializers.zeros)(h)
    return self.scale * jnp.tanh(h).reshape(z.shape[:-1] + tuple(self.image_shape))


def _generator(config: DeepInspectConfig, image_shape, num_classes) -> TriggerGenerator:
  return TriggerGenerator(tuple(image_shape), num_classes, config.generator_hidden,
                          config.perturbation_scale)


def _generator_losses(config, apply_fn, gen, variables, gen_params, x, z):
  """Per-class target CE, magnitude and success of ``G`` on images ``x`` (B, H, W, ch) with
  noise ``z`` (C, B, noise_dim)."""

  def one_class(zc, c):
    delta = gen.apply(gen_params, zc, jnp.full(zc.shape[:1], c))
    logits = apply_fn(variables, jnp.clip(x + delta, 0.0, 1.0))
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.full(x.shape[:1], c)).mean()
    return ce, jnp.mean(jnp.abs(delta)), jnp.mean(jnp.argmax(logits, -1) == c)

  return jax.vmap(one_class)(z, jnp.arange(z.shape[0]))


def _generator_step(config, apply_fn, gen, variables, gen_params, opt_state, substitute, key):
  num_classes = gen.num_classes
  k_idx, k_z = jax.random.split(key)
  n = substitute.shape[0]
  x = substitute[jax.random.randint(k_idx, (config.batch_size,), 0, n)]
  z = _prng.normal(k_z, (num_classes, config.batch_size, config.noise_dim))

  def loss_fn(p):
    ce, mag, _ = _generator_losses(config, apply_fn, gen, variables, p, x, z)
    return jnp.sum(ce + config.magnitude_weight * mag), (ce, mag)

  (loss, (ce, mag)), grads = jax.value_and_grad(loss_fn, has_aux=True)(gen_params)
  updates, opt_state = optax.adam(config.generator_lr).update(grads, opt_state, gen_params)
  return optax.apply_updates(gen_params, updates), opt_state, loss, ce, mag


_generator_losses_jit = jax.jit(_generator_losses, static_argnums=(0, 1, 2))
_generator_step_jit = jax.jit(_generator_step, static_argnums=(0, 1, 2))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _generator_scan(config, apply_fn, gen, variables, gen_params, opt_state, substitute, key):
  def body(carry, t):
    p, state = carry
    p, state, loss, _, _ = _generator_step(config, apply_fn, gen, variables, p, state,
                                           substitute, jax.random.fold_in(key, t))
    return (p, state), loss

  (gen_params, opt_state), loss = jax.lax.scan(body, (gen_params, opt_state),
                                               jnp.arange(config.generator_steps))
  return gen_params, opt_state, loss


def train_trigger_generator(apply_fn, variables: PyTree, substitute: jax.Array,
                            num_classes: int, config: DeepInspectConfig = DeepInspectConfig(),
                            *, key: jax.Array) -> tuple[PyTree, dict]:
  """Stage 2: trains :class:`TriggerGenerator` on ``L_G`` (module docstring) over the
  substitute images ``(N, H, W, ch)`` and measures every class's statistic.

  Returns:
    ``(generator_params, stats)`` with per-class ``statistic`` (``E_z mean |G(z, c)|`` over
    ``statistic_samples`` noise draws), ``success`` (fraction of substitute images that
    ``clip(x + G(z, c))`` sends to ``c``), ``cross_entropy``, and the summed training loss
    ``L_G`` of the first and the last step (``initial_loss``, ``final_loss``).
  """
  static = _stage_config(config, _GENERATOR_FIELDS)
  substitute = jnp.asarray(substitute, jnp.float32)
  gen = _generator(static, substitute.shape[1:], num_classes)
  k_init, k_train, k_eval, k_idx = jax.random.split(key, 4)
  gen_params = gen.init(k_init, jnp.zeros((1, config.noise_dim)), jnp.zeros((1,), jnp.int32))
  opt_state = optax.adam(config.generator_lr).init(gen_params)
  if _use_scan(config):
    gen_params, opt_state, loss = _generator_scan(static, apply_fn, gen, variables,
                                                  gen_params, opt_state, substitute, k_train)
    loss = np.asarray(loss)
  else:
    loss = []
    for t in range(config.generator_steps):
      gen_params, opt_state, l, _, _ = _generator_step_jit(
          static, apply_fn, gen, variables, gen_params, opt_state, substitute,
          jax.random.fold_in(k_train, t))
      loss.append(l)
    loss = np.asarray(jnp.stack(loss))
  m = config.statistic_samples
  x = substitute[jax.random.choice(k_idx, substitute.shape[0], (m,),
                                   replace=substitute.shape[0] < m)]
  z = _prng.normal(k_eval, (num_classes, m, config.noise_dim))
  ce, mag, success = _generator_losses_jit(
      static, apply_fn, gen, variables, gen_params, x, z)
  stats = dict(statistic=np.asarray(mag), success=np.asarray(success),
               cross_entropy=np.asarray(ce), initial_loss=float(loss[0]),
               final_loss=float(loss[-1]))
  return gen_params, stats


# ----------------------------------------------------------------------------------------
# Stage 3: DMAD anomaly detection and patching
# ----------------------------------------------------------------------------------------


def double_mad_anomaly(values, threshold: float = 2.0) -> dict:
  """Double-MAD outlier test for abnormally SMALL values.

  With ``m = median(v)``, ``MAD_L = median(m − v_i : v_i ≤ m)`` and
  ``MAD_R = median(v_i − m : v_i ≥ m)``, the anomaly index of ``v_i`` is
  ``(m − v_i) / (1.4826 MAD_L)`` when ``v_i ≤ m`` and ``−(v_i − m) / (1.4826 MAD_R)`` above
  the median (a zero deviation scores 0; a nonzero one over a zero MAD scores ±inf).  Flagged:
  index ``> threshold``, i.e. ``v_i < m − threshold · 1.4826 · MAD_L``.

  Returns:
    dict of ``scores`` (per value), ``flagged`` (sorted list of indices), ``median``,
    ``mad_left``, ``mad_right``.
  """
  v = np.asarray(values, np.float64)
  if v.ndim != 1 or v.size < 1 or not np.all(np.isfinite(v)):
    raise ValueError(f"values must be a non-empty finite 1-D vector, got {v!r}")
  med = float(np.median(v))
  mad_left = float(np.median(med - v[v <= med]))
  mad_right = float(np.median(v[v >= med] - med))

  def index(dev, mad):
    with np.errstate(divide="ignore", invalid="ignore"):
      return np.where(dev == 0, 0.0, dev / (MAD_SCALE * mad) if mad > 0 else np.inf)

  below = v <= med
  scores = np.where(below, index(np.maximum(med - v, 0.0), mad_left),
                    -index(np.maximum(v - med, 0.0), mad_right))
  flagged = [int(i) for i in np.flatnonzero(scores > threshold)]
  return dict(scores=scores, flagged=flagged, median=med, mad_left=mad_left,
              mad_right=mad_right)


def _patch_tx(config: DeepInspectConfig) -> optax.GradientTransformation:
  return optax.chain(optax.add_decayed_weights(config.patch_weight_decay),
                     optax.sgd(config.patch_lr, momentum=config.patch_momentum or None))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _patch_step(config, apply_fn, gen, params, opt_state, rest, gen_params, flagged_mask, x, y,
                key):
  """One SGD step on CE(f(x'), y): the first ``round(fraction · B)`` (≥ 1) images of the
  batch become ``clip(x + G(z, t))`` with ``t`` uniform over the flagged classes."""
  bsz = x.shape[0]
  n_trig = max(1, int(round(config.patch_fraction * bsz)))
  k_t, k_z = jax.random.split(key)
  t = jax.random.categorical(k_t, jnp.where(flagged_mask, 0.0, -jnp.inf), shape=(n_trig,))
  z = _prng.normal(k_z, (n_trig, config.noise_dim))
  triggered = jnp.clip(x[:n_trig] + gen.apply(gen_params, z, t), 0.0, 1.0)
  x = x.at[:n_trig].set(triggered)

  def loss_fn(p):
    logits = apply_fn({"params": p, **rest}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = _patch_tx(config).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


# ----------------------------------------------------------------------------------------
# The defense
# ----------------------------------------------------------------------------------------


def deepinspect(apply_fn, variables: PyTree, images, labels,
                config: DeepInspectConfig = DeepInspectConfig(), *, key: jax.Array):
  """Runs DeepInspect's three stages (module docstring) and patches the model if a class is
  flagged.

  Args:
    apply_fn: ``apply_fn(variables, images) -> logits`` in inference mode.
    variables: the model's Flax variables; only ``"params"`` changes.
    images, labels: the defender's clean set (NHWC float in [0, 1], integer labels).
    config: :class:`DeepInspectConfig` (None: the defaults).
    key: PRNG key; every random draw derives from it.

  Returns:
    :class:`~ibau_jax.defenses.DefenseResult`: ``variables`` unchanged (the same object)
    when nothing is flagged, else patched (in the container type of the input).
    ``history`` (plain Python values: lists, not arrays) has one dict per stage, each with
    ``stage`` (index), ``name`` and ``seconds``: ``"inversion"`` (per-class ``loss``,
    ``cross_entropy``, ``initial_prob``, ``prob``), ``"trigger_generation"`` (per-class
    ``statistic``, ``success``, ``cross_entropy``; ``initial_loss``, ``final_loss``),
    ``"detection"`` (``scores``, ``flagged``, ``median``, ``mad_left``, ``mad_right``,
    ``statistic``), ``"patching"`` (``patched``, ``flagged``, per-epoch mean ``losses``;
    ``patched`` False and no losses when nothing was flagged).

  Raises:
    ValueError: a ``config`` that is not a :class:`DeepInspectConfig`, bad inputs or
      non-finite ``variables`` (before any work), or the inversion's or the generator's final losses, or a patching epoch's
      mean loss, are NaN or infinite (lower ``inversion_lr``, ``generator_lr`` or
      ``patch_lr``); nothing of that stage is saved.
  """
  from ibau_jax.defenses import DefenseResult, check_inputs
  config = _checks.config_of("deepinspect", config, DeepInspectConfig)
  check_inputs(apply_fn, variables, images, labels, config.batch_size, key=key,
               task="DeepInspect")
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  image_shape = tuple(images.shape[1:])
  num_classes = int(jax.eval_shape(apply_fn, variables, images[:1]).shape[1])
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  static = _stage_config(config, _PATCH_FIELDS)
  k_inv, k_gen, k_patch = jax.random.split(key, 3)
  history = []

  def finish(name, start, stats, params_now, save_state=None):
    entry = dict(stage=len(history), name=name, **_checks.plain(stats),
                 seconds=time.perf_counter() - start)
    history.append(entry)
    if save_state is not None:
      save(*save_state)
    if config.callback is not None:
      config.callback(entry["stage"], dict(entry), _checks.with_params(variables, params_now))

  # Stages 1 and 2 are saved (with the history so far) when a checkpoint folder is given.
  path = _resume.path(config.checkpoint_dir, CHECKPOINT_FILE)
  done, digest = 0, ""
  if path is not None:
    digest = _resume.fingerprint(config, arrays=(variables, images, labels, key))
    gen_shapes = jax.eval_shape(
        _generator(_stage_config(config, _GENERATOR_FIELDS), image_shape, num_classes).init,
        jax.random.PRNGKey(0), jnp.zeros((1, config.noise_dim)), jnp.zeros((1,), jnp.int32))
    template = dict(inverted=jax.ShapeDtypeStruct(
        (num_classes, config.inversion_per_class) + image_shape, jnp.float32),
        gen_params=gen_shapes)
    loaded = _resume.load(path, digest, template)
    if loaded is not None:
      done, _, state, text = loaded
      inverted, gen_params = state["inverted"], state["gen_params"]
      for entry in json.loads(text):
        entry["seconds_before"] = entry["seconds"]
        history.append(entry)
        if config.callback is not None:
          config.callback(entry["stage"], dict(entry), variables)

  def save(step, inverted, gen_params):
    if path is not None:
      if gen_params is None:  # (not trained yet: zeros of its shapes keep the file's layout)
        gen_params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), gen_shapes)
      _resume.save(path, digest, step, sum(h["seconds"] for h in history),
                   dict(inverted=inverted, gen_params=gen_params),
                   _resume.to_json([{k: v for k, v in h.items() if k != "seconds_before"}
                                    for h in history]))

  # Stage 1: model inversion.
  if done < 1:
    start = time.perf_counter()
    inverted, stats = model_inversion(apply_fn, variables, image_shape, num_classes, config,
                                      key=k_inv)
    _checks.finite_values(stats["loss"], "DeepInspect's model inversion",
                          "check that the model's outputs are finite, or lower "
                          "DeepInspectConfig.inversion_lr")
    finish("inversion", start, stats, params, save_state=(1, inverted, None))
  inv_images = inverted.reshape((-1,) + image_shape)
  inv_labels = jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), config.inversion_per_class)

  # Stage 2: trigger generation.
  if done < 2:
    start = time.perf_counter()
    substitute = (jnp.concatenate([inv_images, images]) if config.use_clean_set_for_generation
                  else inv_images)
    gen_params, stats = train_trigger_generator(apply_fn, variables, substitute, num_classes,
                                                config, key=k_gen)
    _checks.finite_values([stats["final_loss"], *stats["statistic"]],
                          "DeepInspect's trigger generation",
                          "lower DeepInspectConfig.generator_lr or perturbation_scale")
    finish("trigger_generation", start, stats, params, save_state=(2, inverted, gen_params))
  stats = history[1]

  # Stage 3a: anomaly detection.
  start = time.perf_counter()
  detection = double_mad_anomaly(stats["statistic"], config.threshold)
  flagged = detection["flagged"]
  finish("detection", start, dict(detection, statistic=stats["statistic"]), params)

  # Stage 3b: patching.
  start = time.perf_counter()
  if not flagged:
    finish("patching", start, dict(patched=False, flagged=[], losses=[]), params)
    _resume.remove(path)
    return DefenseResult(variables=variables, history=history)
  if config.use_clean_set_for_patching:
    patch_x, patch_y = jnp.concatenate([images, inv_images]), jnp.concatenate([labels,
                                                                               inv_labels])
  else:
    patch_x, patch_y = inv_images, inv_labels
  gen = _generator(static, image_shape, num_classes)
  mask = jnp.zeros(num_classes, bool).at[jnp.asarray(flagged)].set(True)
  n = patch_x.shape[0]
  bsz = min(config.batch_size, n)
  opt_state = _patch_tx(config).init(params)
  losses = []
  for epoch in range(config.patch_epochs):
    k_epoch = jax.random.fold_in(k_patch, epoch)
    order = jax.random.permutation(k_epoch, n)
    epoch_losses = []
    for i in range(n // bsz):
      idx = order[i * bsz:(i + 1) * bsz]
      params, opt_state, loss = _patch_step(static, apply_fn, gen, params, opt_state, rest,
                                            gen_params, mask, patch_x[idx], patch_y[idx],
                                            jax.random.fold_in(k_epoch, i + 1))
      epoch_losses.append(loss)
    losses.append(float(jnp.mean(jnp.stack(epoch_losses))))
    _checks.finite_loss(losses[-1], "DeepInspect's patching", epoch,
                        "lower DeepInspectConfig.patch_lr")
  finish("patching", start, dict(patched=True, flagged=list(flagged), losses=losses), params)
  _resume.remove(path)
  return DefenseResult(variables=_checks.with_params(variables, params), history=history)


__all__ = ["DeepInspectConfig", "TriggerGenerator", "deepinspect", "double_mad_anomaly",
           "model_inversion", "train_trigger_generator"]
