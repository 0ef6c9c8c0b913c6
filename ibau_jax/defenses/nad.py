"""Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li and Ma, "Neural Attention
Distillation: Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021).

Two stages on the defender's clean set:

1. **Teacher**: the backdoored model fine-tuned for ``teacher_epochs`` (cross-entropy, SGD,
   lr ``teacher_learning_rate``; the paper fine-tunes 5-10 epochs at lr 0.01); this is
   :func:`~ibau_jax.defenses.fine_tune` itself.
2. **Student**: the ORIGINAL backdoored model trained for ``epochs`` on

       L(θ) = CE(f_θ(x), y) + Σ_l β_l · L_AT(a_l^s(x), a_l^t(x)),

   where ``a_l^s``, ``a_l^t`` are the student's and the (frozen) teacher's activations at
   layer ``l``.  The attention map of an activation ``a`` of shape ``(N, H, W, C)`` is
   ``A(a) = Σ_c |a_c|^p`` (shape ``(N, H·W)`` once flattened), normalised per example:
   ``Â = A / (‖A‖₂ + ε)`` with ``ε = 1e-6``, and

       L_AT(a^s, a^t) = (1/(N·H·W)) Σ_i Σ_hw (Â^s_i[hw] − Â^t_i[hw])²,

   the mean of squared differences of the normalised maps, exactly the released code's
   ``F.mse_loss(attention_map(fm_s), attention_map(fm_t))`` (the paper writes the L2 norm
   ``‖Â^s − Â^t‖₂``; its code, and this module, use the mean square).

Which activations: layers are Flax module calls (see :mod:`ibau_jax.defenses.layers`), an
activation function is not a module, so ``a_l`` is ``activation(output of module l)`` with
``NADConfig.activation`` (``"elu"``: the nonlinearity SmallVGG16 applies after each
BatchNorm, so the maps are those of the post-activation features that the next stage reads;
the paper's code takes the output of each residual group of a pre-activation WRN, which is
likewise what the next group reads).  Default layers: the last layer
of each stage, i.e. the last ``BatchNorm`` (else ``Conv``) before every change of the
output's spatial size (SmallVGG16: ``bn0_1``, ``bn1_1``, ``bn2_1``).

Hyper-parameters (released code, CIFAR-10): p = 2, batch 64, SGD momentum 0.9, weight decay
1e-4, 20 epochs.  β = 5000 for every layer here (the released config's CIFAR-10 value,
which it puts on the last group only, with 0 on the two others).  Simplification: the code
trains the student at lr 0.1 for 2 epochs then 0.01, with Nesterov momentum; here the
student uses a constant ``learning_rate`` (default 0.01) and the plain-momentum SGD of
:func:`~ibau_jax.defenses.fine_tune`, so with all β = 0 the student is exactly
``fine_tune`` of the original model.

Like the other defenses it calls the caller's inference ``apply_fn`` (BatchNorm statistics
frozen, dropout off) and changes ``variables["params"]`` only; every other collection
passes through unchanged (teacher and student share it).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from ibau_jax.defenses import _checks
from ibau_jax.defenses import layers as layers_lib
from ibau_jax.defenses.fp import ACTIVATIONS, _check_activation, check_layer_names, layer_kinds
from ibau_jax.defenses.ft import FTConfig, _tx, fine_tune

PyTree = Any

#: ε of the attention-map normalisation (the released code's).
EPS = 1e-6


def attention_map(a: jax.Array, p: float = 2.0, eps: float = EPS) -> jax.Array:
  """``Â = A / (‖A‖₂ + ε)`` with ``A = Σ_c |a_c|^p``: ``(N, ..., C) -> (N, prod(...))``."""
  am = jnp.sum(jnp.abs(a) ** p, axis=-1).reshape(a.shape[0], -1)
  return am / (jnp.linalg.norm(am, axis=-1, keepdims=True) + eps)


def attention_loss(a_s: jax.Array, a_t: jax.Array, p: float = 2.0, eps: float = EPS
                   ) -> jax.Array:
  """``L_AT``: the mean over examples and positions of ``(Â_s − Â_t)²``."""
  return jnp.mean((attention_map(a_s, p, eps) - attention_map(a_t, p, eps)) ** 2)


def default_attention_layers(apply_fn, variables: PyTree, images) -> tuple[str, ...]:
  """The last ``BatchNorm`` (else ``Conv``) layer of each run of equal spatial output size."""
  found = layers_lib.list_layers(apply_fn, variables, images)
  for kind in ("BatchNorm", "Conv"):
    cands = [(name, shape[1:-1]) for name, k, shape in found if k == kind and len(shape) >= 3]
    if cands:
      break
  else:
    raise ValueError("the model has no BatchNorm or Conv layer with spatial outputs to take "
                     "attention maps of; name the layers in NADConfig.layers")
  out = []
  for i, (name, spatial) in enumerate(cands):
    if i + 1 == len(cands) or cands[i + 1][1] != spatial:
      if name not in out:
        out.append(name)
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class NADConfig:
  """Every knob of :func:`nad`.

  Attributes:
    layers: names of the layers whose attention maps are distilled (outputs of rank >= 3,
      ``(N, spatial..., C)``).  None: :func:`default_attention_layers`.
    betas: β_l: one number for every layer, or one per layer (a sequence as long as
      ``layers``); each finite and >= 0.  Default 5000 (the released code's CIFAR-10 value).
    p: the power in ``A = Σ_c |a_c|^p`` (>= 1; the paper: 2).
    activation: nonlinearity applied to each layer's output before its attention map (a key
      of :data:`~ibau_jax.defenses.fp.ACTIVATIONS`; ``"elu"`` matches SmallVGG16).
    teacher_epochs: fine-tuning passes that make the teacher (the paper: 5-10).
    teacher_learning_rate: the teacher's SGD learning rate (the paper: 0.01).
    epochs: passes of the student over the clean set (the code: 20).
    batch_size: images per step, teacher and student (the last partial batch of each epoch
      is dropped).
    learning_rate: the student's SGD learning rate (constant; see the module docstring).
    momentum, weight_decay: of both SGDs (coupled weight decay ``λθ`` added to the gradient).
    callback: ``callback("teacher", stats, teacher_variables)`` after every teacher epoch
      (``stats["epoch"]`` says which), then ``callback(epoch, stats, student_variables)``
      after every student epoch.
  """

  layers: Optional[Sequence[str]] = None
  betas: Union[float, Sequence[float]] = 5000.0
  p: float = 2.0
  activation: str = "elu"
  teacher_epochs: int = 10
  teacher_learning_rate: float = 0.01
  epochs: int = 20
  batch_size: int = 64
  learning_rate: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 1e-4
  callback: Optional[Callable[[Any, dict, PyTree], Any]] = dataclasses.field(
      default=None, compare=False)

  def __post_init__(self):
    if self.layers is not None:
      if isinstance(self.layers, str) or not isinstance(self.layers, Sequence) \
          or not self.layers or not all(isinstance(n, str) and n for n in self.layers):
        raise ValueError(f"NADConfig.layers must be None or a non-empty sequence of layer "
                         f"names, got {self.layers!r}")
      if len(set(self.layers)) != len(self.layers):
        raise ValueError(f"NADConfig.layers has duplicates: {self.layers!r}")
      object.__setattr__(self, "layers", tuple(self.layers))
    if _checks.is_real(self.betas):
      if self.betas < 0:
        raise ValueError(f"NADConfig.betas must be >= 0, got {self.betas!r}")
    else:
      if isinstance(self.betas, str) or not isinstance(self.betas, Sequence) \
          or not self.betas or not all(_checks.is_real(b) and b >= 0 for b in self.betas):
        raise ValueError(f"NADConfig.betas must be a finite number >= 0 or a non-empty "
                         f"sequence of them, got {self.betas!r}")
      if self.layers is not None and len(self.betas) != len(self.layers):
        raise ValueError(f"NADConfig.betas has {len(self.betas)} values for "
                         f"{len(self.layers)} layers {self.layers!r}")
      object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
    _checks.reals("NADConfig", self, ("p",), minimum=1)
    _check_activation("NADConfig", self.activation)
    _checks.integers("NADConfig", self, ("teacher_epochs", "epochs", "batch_size"))
    _checks.sgd("NADConfig", self, learning_rate="teacher_learning_rate")
    _checks.sgd("NADConfig", self)
    _checks.optional_callable("NADConfig", self)

  def replace(self, **changes) -> "NADConfig":
    return dataclasses.replace(self, **changes)

  def teacher_config(self) -> FTConfig:
    """The teacher's fine-tuning settings."""
    return FTConfig(epochs=self.teacher_epochs, batch_size=self.batch_size,
                    learning_rate=self.teacher_learning_rate, momentum=self.momentum,
                    weight_decay=self.weight_decay)

  def student_config(self) -> FTConfig:
    """The student's SGD settings (those of plain fine-tuning with the same optimizer)."""
    return FTConfig(epochs=self.epochs, batch_size=self.batch_size,
                    learning_rate=self.learning_rate, momentum=self.momentum,
                    weight_decay=self.weight_decay)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _student_step(tx_config: FTConfig, apply_fn, layers: tuple, p: float, activation: str,
                  params, opt_state, rest, teacher_params, betas, x, y):
  act = ACTIVATIONS[activation]
  _, t_acts = layers_lib.apply_with_layers(apply_fn, {"params": teacher_params, **rest}, x,
                                           capture=layers)
  t_maps = [jax.lax.stop_gradient(attention_map(act(t_acts[l]), p)) for l in layers]

  def loss_fn(q):
    logits, s_acts = layers_lib.apply_with_layers(apply_fn, {"params": q, **rest}, x,
                                                  capture=layers)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    at = jnp.stack([jnp.mean((attention_map(act(s_acts[l]), p) - t) ** 2)
                    for l, t in zip(layers, t_maps)])
    return ce + jnp.sum(betas.astype(at.dtype) * at), (ce, at)

  (loss, (ce, at)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = _tx(tx_config).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, ce, at


def nad(apply_fn, variables: PyTree, images, labels, config: NADConfig = NADConfig(), *,
        key: jax.Array):
  """Neural Attention Distillation: fine-tunes a teacher, then retrains the original model
  to match the teacher's attention maps (see the module docstring).

  Args:
    apply_fn: ``apply_fn(variables, images) -> logits`` in inference mode (a Flax linen
      model: its layers are reached through :mod:`ibau_jax.defenses.layers`).
    variables: the model's variables; only ``params`` change.
    images, labels: the defender's clean set (float NHWC in [0, 1], integer labels).
    config: :class:`NADConfig` (None: the defaults).
    key: PRNG key; ``teacher_key, student_key = jax.random.split(key)`` shuffle the teacher's
      and the student's epochs (``permutation(fold_in(k, epoch), n)``, as ``fine_tune``).

  Returns:
    :class:`~ibau_jax.defenses.DefenseResult`: the student's variables (in the container
    type of the input); ``history``: one entry per teacher epoch (``stage="teacher"``,
    ``epoch``, mean ``loss``, ``seconds``), then one per student epoch (``stage="student"``,
    ``epoch``, ``layers``, ``betas``, mean total ``loss``, mean ``ce``, mean unweighted
    ``attention`` loss per layer, ``seconds``).

  Raises:
    ValueError: a ``config`` that is not a :class:`NADConfig`, bad inputs, non-finite
      ``variables``, a layer name that is not in the model, a layer output of rank < 3, a
      number of betas that differs from the number of layers, or a teacher or student whose
      loss became non-finite (diverged).
  """
  from ibau_jax.defenses import DefenseResult, check_inputs
  config = _checks.config_of("nad", config, NADConfig)
  check_inputs(apply_fn, variables, images, labels, config.batch_size, key=key,
               task="NAD")
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  known = layer_kinds(apply_fn, variables, images[:1])
  if config.layers is None:
    layers = default_attention_layers(apply_fn, variables, images[:1])
  else:
    layers = tuple(config.layers)
    check_layer_names("NADConfig.layers", layers, known)
  for name in layers:
    shape = known[name][1]
    if len(shape) < 3:
      raise ValueError(f"NADConfig.layers: {name!r} has output shape {shape}; attention maps "
                       "need outputs (N, spatial..., C) of rank >= 3")
  if isinstance(config.betas, tuple):
    if len(config.betas) != len(layers):
      raise ValueError(f"NADConfig.betas has {len(config.betas)} values for {len(layers)} "
                       f"layers {layers!r}")
    betas = config.betas
  else:
    betas = (float(config.betas),) * len(layers)

  teacher_key, student_key = jax.random.split(key)
  history = []

  def teacher_callback(epoch, stats, v):
    if config.callback is not None:
      config.callback("teacher", {**stats, "stage": "teacher"}, v)

  teacher = fine_tune(apply_fn, variables, images, labels,
                      config.teacher_config().replace(callback=teacher_callback),
                      key=teacher_key, what="NAD's teacher (fine-tuning)",
                      hint="lower NADConfig.teacher_learning_rate or raise batch_size")
  history.extend({**h, "stage": "teacher"} for h in teacher.history)
  teacher_params = teacher.variables["params"]

  tx_config = config.student_config().replace(epochs=1)  # one compilation for any epochs
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  opt_state = _tx(tx_config).init(params)
  n, bsz = images.shape[0], config.batch_size
  p = float(config.p)
  beta_array = jnp.asarray(betas, jnp.float32)
  for epoch in range(config.epochs):
    start = time.perf_counter()
    order = jax.random.permutation(jax.random.fold_in(student_key, epoch), n)
    losses, ces, ats = [], [], []
    for i in range(n // bsz):
      idx = order[i * bsz:(i + 1) * bsz]
      params, opt_state, loss, ce, at = _student_step(
          tx_config, apply_fn, layers, p, config.activation, params, opt_state, rest,
          teacher_params, beta_array, images[idx], labels[idx])
      losses.append(loss)
      ces.append(ce)
      ats.append(at)
    entry = dict(stage="student", epoch=epoch, layers=list(layers), betas=list(betas),
                 loss=float(jnp.mean(jnp.stack(losses))),
                 ce=float(jnp.mean(jnp.stack(ces))),
                 attention=[float(a) for a in jnp.mean(jnp.stack(ats), axis=0)],
                 seconds=time.perf_counter() - start)
    _checks.finite_loss(entry["loss"], "NAD's student", epoch,
                        "lower NADConfig.learning_rate or betas, or raise batch_size")
    history.append(entry)
    if config.callback is not None:
      config.callback(epoch, dict(entry), _checks.with_params(variables, params))
  return DefenseResult(variables=_checks.with_params(variables, params), history=history)
