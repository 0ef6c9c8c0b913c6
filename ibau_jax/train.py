"""Supervised training of Flax classifiers (clean or poisoned data), data-parallel.

Training minimises the mean cross-entropy over mini-batches,

    L(θ) = (1/B) Σ_i CE_ε(f_θ(A(x_i)), y_i),

(``CE_ε``: cross-entropy against the label smoothed by ε, ``(1 − ε)·onehot(y) + ε/C``;
ε = 0 is plain cross-entropy) where ``A`` is the random augmentation of :func:`augment` (a random crop after zero padding
and a random horizontal flip), with SGD (optionally momentum / Nesterov) or Adam.  Weight
decay is *coupled* L2 (as in ``torch.optim``): ``λ θ`` is added to the gradient of every
parameter (BatchNorm scales and biases included) before the optimizer update.

The learning-rate schedule ``η(t)`` over step ``t`` is ``"constant"``, ``"cosine"``
(``η₀ · ½(1 + cos(π t / T))`` with ``T`` the total number of steps), ``"linear"``
(``η₀ · (1 − t / T)``) or ``"piecewise"`` (``η₀ · γ^k`` after ``k`` of the epoch
``boundaries`` have passed).  With ``warmup_epochs = w > 0`` the first ``W = w · steps per
epoch`` steps rise linearly from 0 to η₀, ``η(t) = η₀ · t / W``, and the schedule above
runs over the remaining ``T − W`` steps.

Each step is one ``jax.jit``-compiled function (:data:`train_step`) shared by every step and
every :func:`fit` call with the same model, configuration and shapes.  The batch axis is split
over all visible devices with a :class:`jax.sharding.Mesh` (``NamedSharding``: batch split,
parameters and optimizer state replicated); the result equals a one-device run up to
floating-point reduction order (BatchNorm statistics are over the global batch).

The last partial batch of each epoch is dropped (each epoch reshuffles, so different
examples are dropped).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
from typing import Any, Callable, Mapping, Optional, Sequence

import flax
import flax.linen as nn
import flax.serialization
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ibau_jax import _prng
from ibau_jax import files
from ibau_jax import models
from ibau_jax.metrics import check_images, looks_nchw

PyTree = Any
EpochCallback = Callable[[int, Mapping[str, float]], Any]
EvalFn = Callable[[PyTree], Mapping[str, float]]

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "linear", "piecewise")
PAD_MODES = ("constant", "reflect")
CONFIG_FILENAME = "config.json"
_CKPT_PREFIX = "epoch_"
_CKPT_SUFFIX = ".msgpack"


# --------------------------------------------------------------------------- augmentation

def augment(images: jax.Array, key: jax.Array, *, crop_padding: int = 4, flip: bool = True,
            pad_mode: str = "constant") -> jax.Array:
  """Random crop and horizontal flip, independently per image.

  For an image ``x`` of shape (H, W, C), the crop pads ``x`` by ``p = crop_padding`` pixels
  on each side of both spatial axes (``pad_mode="constant"``: zeros, as torchvision's
  ``RandomCrop(padding=p)``; ``"reflect"``: mirror without repeating the edge), then takes
  the H×W window at offset ``(u, v)`` with ``u, v ~ U{0, …, 2p}``; the flip then replaces
  ``x[:, j]`` by ``x[:, W-1-j]`` with probability ½.  Shape and dtype are kept; values stay
  in the range of the input plus 0 (for zero padding).  A pure function of ``key``;
  jittable (``crop_padding``, ``flip`` and ``pad_mode`` are static).

  Args:
    images: array of shape (N, H, W, C).
    key: PRNG key.
    crop_padding: p >= 0; 0 disables the crop.
    flip: enable the random horizontal flip.
    pad_mode: ``"constant"`` (zeros) or ``"reflect"``.

  Returns:
    The augmented images, shape and dtype of ``images``.
  """
  if images.ndim != 4:
    raise ValueError(f"augment expects images of shape (N, H, W, C), got shape {images.shape}")
  if isinstance(crop_padding, bool) or not isinstance(crop_padding, (int, np.integer)) \
      or crop_padding < 0:
    raise ValueError(f"crop_padding must be an integer >= 0, got {crop_padding!r}")
  if pad_mode not in PAD_MODES:
    raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
  n, h, w, c = images.shape
  if pad_mode == "reflect" and crop_padding >= min(h, w):
    raise ValueError(f"reflect padding needs crop_padding < min(H, W) = {min(h, w)}, "
                     f"got {crop_padding}")
  crop_key, flip_key = jax.random.split(key)
  out = images
  if crop_padding > 0:
    p = int(crop_padding)
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode=pad_mode)
    offsets = _prng.randint(crop_key, (n, 2), 0, 2 * p + 1)
    out = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(
        padded, offsets)
  if flip:
    mirror = jax.random.bernoulli(flip_key, 0.5, (n,))
    out = jnp.where(mirror[:, None, None, None], out[:, :, ::-1, :], out)
  return out.astype(images.dtype)


# --------------------------------------------------------------------------- configuration

@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Every knob of :func:`fit`.

  Attributes:
    epochs: passes over the training set.
    batch_size: global batch size (split over devices; must be divisible by their count).
    optimizer: ``"sgd"`` or ``"adam"``.
    learning_rate: η₀, the base learning rate.
    momentum: SGD momentum in [0, 1) (0: plain SGD).  Ignored by Adam.
    nesterov: Nesterov momentum (SGD with momentum > 0 only).
    schedule: ``"constant"``, ``"cosine"``, ``"linear"`` or ``"piecewise"``.
    warmup_epochs: w >= 0, epochs (may be fractional) of linear warm-up from 0 to η₀ before
      the schedule; must be < ``epochs``.
    boundaries: epochs (strictly increasing positive integers) at which the piecewise
      schedule multiplies the learning rate by ``decay_factor``; only for ``"piecewise"``.
    decay_factor: γ in (0, 1] of the piecewise schedule.
    weight_decay: λ >= 0 of the coupled L2 penalty.
    label_smoothing: ε in [0, 1) of the smoothed cross-entropy.
    augment: apply :func:`augment` to every training batch.
    crop_padding: p of the random crop.
    flip: random horizontal flip.
    seed: PRNG seed used by :func:`fit` when no ``key`` is given.
    eval_every: call ``eval_fn`` every this many epochs (and after the last epoch).
    log_every: call ``callback`` every this many epochs (and after the last epoch).
  """

  epochs: int = 1
  batch_size: int = 128
  optimizer: str = "sgd"
  learning_rate: float = 0.01
  momentum: float = 0.9
  nesterov: bool = False
  schedule: str = "constant"
  warmup_epochs: float = 0.0
  boundaries: tuple[int, ...] = ()
  decay_factor: float = 0.1
  weight_decay: float = 5e-4
  label_smoothing: float = 0.0
  augment: bool = True
  crop_padding: int = 4
  flip: bool = True
  seed: int = 0
  eval_every: int = 1
  log_every: int = 1

  def __post_init__(self):
    def integer(name: str, minimum: int) -> None:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"TrainConfig.{name} must be an integer >= {minimum}, got {value!r}")

    def number(name: str) -> float:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
          or not math.isfinite(value):
        raise ValueError(f"TrainConfig.{name} must be a finite number, got {value!r}")
      return float(value)

    for name in ("epochs", "batch_size", "eval_every", "log_every"):
      integer(name, 1)
    integer("crop_padding", 0)
    integer("seed", 0)
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"TrainConfig.optimizer must be one of {OPTIMIZERS}, "
                       f"got {self.optimizer!r}")
    if not number("learning_rate") > 0:
      raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate!r}")
    if not 0.0 <= number("momentum") < 1.0:
      raise ValueError(f"TrainConfig.momentum must be in [0, 1), got {self.momentum!r}")
    if not isinstance(self.nesterov, bool):
      raise ValueError(f"TrainConfig.nesterov must be a bool, got {self.nesterov!r}")
    if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
      raise ValueError("TrainConfig.nesterov=True needs optimizer='sgd' and momentum > 0")
    if not 0.0 <= number("warmup_epochs") < self.epochs:
      raise ValueError(f"TrainConfig.warmup_epochs must be in [0, epochs={self.epochs}), "
                       f"got {self.warmup_epochs!r}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, "
                       f"got {self.schedule!r}")
    if not isinstance(self.boundaries, tuple):
      raise ValueError(f"TrainConfig.boundaries must be a tuple of ints, "
                       f"got {self.boundaries!r}")
    if self.schedule == "piecewise":
      b = self.boundaries
      if not b or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
                      for v in b) or any(x >= y for x, y in zip(b, b[1:])):
        raise ValueError("TrainConfig.boundaries must be a non-empty strictly increasing tuple "
                         f"of positive integers for schedule='piecewise', got {b!r}")
      if b[0] <= self.warmup_epochs:
        raise ValueError(f"TrainConfig.boundaries must all exceed warmup_epochs="
                         f"{self.warmup_epochs!r}, got {b!r}")
    elif self.boundaries:
      raise ValueError(f"TrainConfig.boundaries is only used by schedule='piecewise', "
                       f"got {self.boundaries!r} with schedule={self.schedule!r}")
    if not 0.0 < number("decay_factor") <= 1.0:
      raise ValueError(f"TrainConfig.decay_factor must be in (0, 1], got {self.decay_factor!r}")
    if not 0.0 <= number("label_smoothing") < 1.0:
      raise ValueError(f"TrainConfig.label_smoothing must be in [0, 1), "
                       f"got {self.label_smoothing!r}")
    if not number("weight_decay") >= 0.0:
      raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
    for name in ("augment", "flip"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"TrainConfig.{name} must be a bool, got {getattr(self, name)!r}")

  def replace(self, **changes) -> "TrainConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """JSON-compatible dict (tuples become lists)."""
    d = dataclasses.asdict(self)
    d["boundaries"] = list(d["boundaries"])
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
    """Inverse of :meth:`to_dict`; unknown keys → ``ValueError``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
    d = dict(d)
    if "boundaries" in d:
      d["boundaries"] = tuple(int(b) for b in d["boundaries"])
    return cls(**d)


# Training presets for small-VGG16 on 32x32 images.
#: The 2-core CPU budget: Adam at 2e-3 with a quarter-epoch warm-up and a linear decay to 0
#: over 8 epochs, batch 64, label smoothing 0.1, random flips only (no crop), no weight decay;
#: use it with dropout off (the ``cpu`` experiment preset builds small-VGG16 with
#: ``dropout_rates=(0, 0, 0)``).  Measured on 45,000 CIFAR-10 images on the 2-core CPU of
#: sessions 22-23 (AMD EPYC; ``python -m experiments.attack_table``, docs/results.md): the
#: clean model reaches 78.8 % on the 10,000 test images, and a model trains in
#: 10.9-12.5 minutes alone on the machine (about 86 s of steps per epoch plus poisoning,
#: compilation and evaluation; about 17 minutes on the slower host of session 3).  Why 8
#: epochs: 5 reach 78.5 % (4 reached 77.4 %), but a WaNet model trained with 5 ends 3.8-4.0
#: points under the clean one, with 8 only 2.4 points under.  Why these choices: one annealed
#: epoch reaches 44.9 % test accuracy with the paper's dropout and crop + flip, 62.0 %
#: without dropout, 65.4 % without dropout and augmentation, and 58.9 % with SGD (Nesterov,
#: lr 0.05) instead of Adam; over 8 epochs, adding the random crop (padding 4) ends at
#: 78.0 %, and SGD (Nesterov, lr 0.05, weight decay 5e-4) with crop at 76.5 % (session 23),
#: although this recipe overfits (90 % training accuracy at epoch 8); batch 64 costs 4.2 ms
#: per image against 4.9 ms at batch 128 and 6.6 ms at 256 (XLA:CPU, cache effects).
CPU_PRESET = TrainConfig(epochs=8, batch_size=64, optimizer="adam", learning_rate=2e-3,
                         momentum=0.9, schedule="linear", warmup_epochs=0.25,
                         weight_decay=0.0, label_smoothing=0.1, augment=True,
                         crop_padding=0, flip=True)
#: The paper's scale (50 epochs), for accelerators.
PAPER_PRESET = TrainConfig(epochs=50, batch_size=128, optimizer="sgd", learning_rate=0.05,
                           momentum=0.9, nesterov=True, schedule="cosine", weight_decay=5e-4)


@functools.lru_cache(maxsize=64)
def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
  """The optax transformation of ``config`` (cached: equal arguments → the same object, so
  :data:`train_step` reuses its compiled code across :func:`fit` calls).

  ``update = opt(g + λθ)`` with the learning-rate schedule of the module docstring; the
  schedule's step is the optimizer step, ``steps_per_epoch`` converts epochs to steps.
  """
  if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, (int, np.integer)) \
      or steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
  lr = float(config.learning_rate)
  warmup = int(round(float(config.warmup_epochs) * steps_per_epoch))
  total = config.epochs * steps_per_epoch
  if config.schedule == "constant":
    schedule = optax.constant_schedule(lr)
  elif config.schedule == "cosine":
    schedule = optax.cosine_decay_schedule(lr, decay_steps=max(total - warmup, 1))
  elif config.schedule == "linear":
    schedule = optax.linear_schedule(lr, 0.0, transition_steps=max(total - warmup, 1))
  else:
    schedule = optax.piecewise_constant_schedule(
        lr, {int(b) * steps_per_epoch - warmup: float(config.decay_factor)
             for b in config.boundaries})
  if warmup > 0:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, transition_steps=warmup), schedule], [warmup])
  if config.optimizer == "sgd":
    opt = optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov)
  else:
    opt = optax.adam(schedule)
  if config.weight_decay > 0:
    return optax.chain(optax.add_decayed_weights(float(config.weight_decay)), opt)
  return opt


# --------------------------------------------------------------------------- train state

class TrainState(flax.struct.PyTreeNode):
  """Parameters, BatchNorm statistics, optimizer state and step counter.

  ``model``, ``tx`` and ``config`` are static (part of the tree structure, not leaves):
  :data:`train_step` compiles once per (model, optimizer, config, shapes).  The model (not
  its bound ``apply`` method, which compares by identity) is stored so that equal modules
  share compiled code.
  """

  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  step: jax.Array
  model: nn.Module = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  config: TrainConfig = flax.struct.field(pytree_node=False)

  @property
  def apply_fn(self) -> Callable[..., Any]:
    """``model.apply``."""
    return self.model.apply

  @property
  def variables(self) -> dict[str, PyTree]:
    """``{"params": …, "batch_stats": …}`` (``batch_stats`` only if the model has any)."""
    out = {"params": self.params}
    if self.batch_stats:
      out["batch_stats"] = self.batch_stats
    return out


def create_train_state(model: nn.Module, config: TrainConfig, input_shape: Sequence[int], *,
                       key: jax.Array, steps_per_epoch: int = 1) -> TrainState:
  """Initialises ``model`` on a zero batch of shape ``(1, *input_shape)``.

  Args:
    model: a Flax linen module called as ``model(x, train=bool)``.
    config: the training configuration.
    input_shape: one example's shape, e.g. ``(32, 32, 3)``.
    key: PRNG key for the initialisation.
    steps_per_epoch: optimizer steps per epoch (the cosine and piecewise schedules need it).
  """
  if not isinstance(config, TrainConfig):
    raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
  input_shape = tuple(int(s) for s in input_shape)
  if not input_shape or any(s < 1 for s in input_shape):
    raise ValueError(f"input_shape must be a non-empty tuple of positive ints, "
                     f"got {input_shape}")
  params_key, dropout_key = jax.random.split(key)
  variables = models.init_variables(model, {"params": params_key, "dropout": dropout_key},
                                    jnp.zeros((1,) + input_shape, jnp.float32))
  variables = flax.core.unfreeze(variables)
  params = variables.pop("params")
  batch_stats = variables.pop("batch_stats", {})
  if variables:
    raise ValueError(f"unsupported variable collections {sorted(variables)}; only 'params' and "
                     "'batch_stats' are trained")
  tx = make_optimizer(config, int(steps_per_epoch))
  return TrainState(params=params, batch_stats=batch_stats, opt_state=tx.init(params),
                    step=jnp.zeros((), jnp.int32), model=model, tx=tx, config=config)


# --------------------------------------------------------------------------- steps

def _cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0
                   ) -> jax.Array:
  if smoothing == 0.0:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def _train_step(state: TrainState, images: jax.Array, labels: jax.Array, key: jax.Array,
                augment_mask: Optional[jax.Array] = None
                ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on ``(1/B) Σ CE(f_θ(A(x_i)), y_i)``.

  The step's randomness is ``fold_in(key, step)``, split into the augmentation key and the
  dropout key, so a fixed ``key`` gives a reproducible (and resumable) run.  With a boolean
  ``augment_mask`` of shape (B,), ``A`` is applied only where it is True (the other images
  pass unchanged; the augmented ones get the same draws as without a mask).
  """
  config = state.config
  step_key = jax.random.fold_in(key, state.step)
  aug_key, dropout_key = jax.random.split(step_key)
  x = images.astype(jnp.float32)
  if config.augment:
    augmented = augment(x, aug_key, crop_padding=config.crop_padding, flip=config.flip)
    x = augmented if augment_mask is None else jnp.where(
        augment_mask[:, None, None, None], augmented, x)

  def loss_fn(params):
    variables = {"params": params}
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
    logits, updates = state.apply_fn(variables, x, train=True, mutable=["batch_stats"],
                                     rngs={"dropout": dropout_key})
    return _cross_entropy(logits, labels, config.label_smoothing), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  param_updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, param_updates)
  batch_stats = updates.get("batch_stats", state.batch_stats) if state.batch_stats else \
      state.batch_stats
  metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
  return state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state,
                       step=state.step + 1), metrics


train_step = jax.jit(_train_step)
"""Jitted :func:`_train_step`: ``train_step(state, images, labels, key, augment_mask=None)
-> (state, metrics)``."""


@jax.jit
def eval_step(state: TrainState, images: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Mean cross-entropy and accuracy in inference mode (running BatchNorm statistics,
  dropout off)."""
  logits = state.apply_fn(state.variables, images.astype(jnp.float32), train=False)
  return {"loss": _cross_entropy(logits, labels),
          "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


# --------------------------------------------------------------------------- checkpoints

_atomic_write = files.atomic_write


def save_checkpoint(path: str | os.PathLike, variables: PyTree, config: TrainConfig) -> None:
  """Writes ``variables`` as flax msgpack bytes to ``path`` and ``config`` as
  ``config.json`` in the same directory, each atomically (temp file + ``os.replace``)."""
  if not isinstance(config, TrainConfig):
    raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  data = flax.serialization.msgpack_serialize(
      flax.serialization.to_state_dict(jax.device_get(variables)))
  _atomic_write(path.parent / CONFIG_FILENAME,
                json.dumps(config.to_dict(), indent=2, sort_keys=True).encode())
  _atomic_write(path, data)


def load_checkpoint(path: str | os.PathLike) -> tuple[PyTree, TrainConfig]:
  """Reads a :func:`save_checkpoint` file: ``(state dict of numpy arrays, config)``.

  Restore a structured tree (e.g. an optax state) with
  ``flax.serialization.from_state_dict(template, variables)``.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"no checkpoint file at {path}")
  config_path = path.parent / CONFIG_FILENAME
  if not config_path.is_file():
    raise ValueError(f"no {CONFIG_FILENAME} next to checkpoint {path}")
  variables = flax.serialization.msgpack_restore(path.read_bytes())
  config = TrainConfig.from_dict(json.loads(config_path.read_text()))
  return variables, config


def _checkpoint_path(directory: pathlib.Path, epoch: int) -> pathlib.Path:
  return directory / f"{_CKPT_PREFIX}{epoch:06d}{_CKPT_SUFFIX}"


def latest_checkpoint(directory: str | os.PathLike) -> Optional[tuple[int, pathlib.Path]]:
  """``(epoch, path)`` of the newest epoch checkpoint written by :func:`fit`, or None."""
  directory = pathlib.Path(directory)
  found = []
  for p in directory.glob(f"{_CKPT_PREFIX}*{_CKPT_SUFFIX}") if directory.is_dir() else ():
    stem = p.name[len(_CKPT_PREFIX):-len(_CKPT_SUFFIX)]
    if stem.isdigit():
      found.append((int(stem), p))
  return max(found) if found else None


# --------------------------------------------------------------------------- fit

def _mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("batch",))


def _init_state(model: nn.Module, config: TrainConfig, input_shape: tuple[int, ...],
                key: jax.Array, steps_per_epoch: int) -> TrainState:
  """:func:`create_train_state`, with a model that cannot be initialised on
  ``(1, *input_shape)`` reported as a ``ValueError`` (the original error appended)."""
  try:
    return create_train_state(model, config, input_shape, key=key,
                              steps_per_epoch=steps_per_epoch)
  except ValueError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"model.init failed on images of shape {(1,) + tuple(input_shape)} "
                     f"(fit expects NHWC images (N, H, W, C) that the model takes): "
                     f"{type(e).__name__}: {e}") from e


def _num_classes(state: TrainState, input_shape: tuple[int, ...]) -> int:
  """``C`` of the model's ``(1, C)`` logits on one image, by ``jax.eval_shape`` (traced,
  not run)."""
  out = jax.eval_shape(functools.partial(state.model.apply, train=False), state.variables,
                       jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32))
  if not hasattr(out, "shape") or len(out.shape) != 2 or out.shape[0] != 1:
    raise ValueError(f"the model must return logits of shape (N, num_classes); got {out} "
                     f"for one image of shape {tuple(input_shape)}")
  return int(out.shape[1])


def fit(model: nn.Module, images: Any, labels: Any, config: TrainConfig, *,
        key: Optional[jax.Array] = None, eval_fn: Optional[EvalFn] = None,
        callback: Optional[EpochCallback] = None,
        checkpoint_dir: Optional[str | os.PathLike] = None,
        mesh: Optional[Mesh] = None,
        augment_mask: Any = None
        ) -> tuple[dict[str, PyTree], list[dict[str, float]]]:
  """Trains ``model`` on ``(images, labels)`` (see the module docstring for the objective).

  Epoch ``e`` visits ``permutation(fold_in(shuffle_key, e))`` in ``N // batch_size`` full
  batches (the remainder is dropped).  ``key`` (default ``PRNGKey(config.seed)``) is split
  into the initialisation, shuffle and step keys, so the run is a pure function of it.

  With ``checkpoint_dir``, the train state is saved after every epoch
  (``epoch_NNNNNN.msgpack`` + ``config.json``, only the newest epoch kept); a later call
  resumes from the newest checkpoint if its config equals ``config`` in every field but
  ``epochs`` (otherwise ``ValueError``) and trains up to ``config.epochs``; pass the same
  ``key`` and data to get the uninterrupted run's result (not checked).  With a
  ``"cosine"`` schedule, changing ``epochs`` changes the schedule's horizon.

  Args:
    model: Flax module called as ``model(x, train=bool)``, returning ``(N, C)`` logits.
    images: (N, H, W, C) floating-point pixels, finite and in [0, 1] (uint8 images:
      :func:`ibau_jax.data.to_float`); channels-first shapes (``shape[1]`` in (1, 3),
      ``shape[-1]`` not) are refused as NCHW.
    labels: (N,) integer array with values in [0, C).
    config: training configuration.
    key: PRNG key; default ``jax.random.PRNGKey(config.seed)``.
    eval_fn: ``eval_fn(variables) -> dict`` of metrics, called every ``config.eval_every``
      epochs and after the last; its results join that epoch's history entry.
    callback: ``callback(epoch, metrics)`` every ``config.log_every`` epochs and after the
      last (``epoch`` counts from 1); its return value is ignored.
    checkpoint_dir: directory for per-epoch checkpoints and resumption.
    mesh: the devices, a :class:`jax.sharding.Mesh` whose first axis splits every batch;
      None: all visible devices.
    augment_mask: None (augment every image, if ``config.augment``) or a boolean (N,)
      array: only the images where it is True are augmented (e.g. an attacker who keeps
      triggered images as they are, so that a flip does not make a second trigger).

  Returns:
    ``(variables, history)``: ``{"params", "batch_stats"?}`` and one dict per epoch trained
    by this call (``epoch``, mean train ``loss`` and ``accuracy``, eval metrics).

  Raises:
    ValueError: before any training step, for inputs that break the rules above (checked
      once on the host), a model whose ``init`` fails on the image shape, or a bad config,
      ``augment_mask``, ``mesh`` or checkpoint directory.
  """
  if not isinstance(config, TrainConfig):
    raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
  images = check_images(np.asarray(images))
  if looks_nchw(images.shape):
    raise ValueError(f"images look channels-first (NCHW), shape {images.shape}; fit expects "
                     "NHWC (N, H, W, C): use images.transpose(0, 2, 3, 1)")
  labels = np.asarray(labels)
  if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers of shape ({images.shape[0]},), "
                     f"got {labels.dtype} {labels.shape}")
  n = images.shape[0]
  if augment_mask is not None:
    augment_mask = np.asarray(augment_mask)
    if augment_mask.shape != (n,) or augment_mask.dtype != np.bool_:
      raise ValueError(f"augment_mask must be a boolean array of shape ({n},), got "
                       f"{augment_mask.dtype} {augment_mask.shape}")
  steps_per_epoch = n // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"batch_size={config.batch_size} exceeds the number of examples ({n})")
  mesh = _mesh() if mesh is None else mesh
  n_dev = mesh.devices.shape[0]
  if config.batch_size % n_dev:
    raise ValueError(f"batch_size={config.batch_size} is not divisible by the number of "
                     f"devices ({n_dev})")
  for fn, name in ((eval_fn, "eval_fn"), (callback, "callback")):
    if fn is not None and not callable(fn):
      raise ValueError(f"{name} must be callable or None")
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharded = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))

  if key is None:
    key = jax.random.PRNGKey(config.seed)
  _prng.check_key(key)
  init_key, shuffle_key, step_key = jax.random.split(key, 3)
  state = _init_state(model, config, images.shape[1:], init_key, steps_per_epoch)
  num_classes = _num_classes(state, images.shape[1:])
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}) for a model with {num_classes} "
                     f"outputs; got values in [{labels.min()}, {labels.max()}]")
  start_epoch = 0
  ckpt_dir = None
  if checkpoint_dir is not None:
    ckpt_dir = pathlib.Path(checkpoint_dir)
    files.remove_temporaries(ckpt_dir)  # left by a run killed in the middle of a write
    config_path = ckpt_dir / CONFIG_FILENAME
    if config_path.is_file():
      saved = TrainConfig.from_dict(json.loads(config_path.read_text()))
      if saved.replace(epochs=config.epochs) != config:
        raise ValueError(f"checkpoint directory {ckpt_dir} holds a run with a different "
                         f"config ({saved}); use another directory or the same config")
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None:
      raw, _ = load_checkpoint(latest[1])
      template = {"params": state.params, "batch_stats": state.batch_stats,
                  "opt_state": state.opt_state, "step": state.step, "epoch": 0}
      restored = flax.serialization.from_state_dict(template, raw)
      state = state.replace(params=restored["params"], batch_stats=restored["batch_stats"],
                            opt_state=restored["opt_state"],
                            step=jnp.asarray(restored["step"], jnp.int32))
      start_epoch = int(restored["epoch"])

  state = jax.device_put(state, replicated)
  step_key = jax.device_put(step_key, replicated)
  history: list[dict[str, float]] = []
  for epoch in range(start_epoch, config.epochs):
    order = np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), n))
    sums = None
    for i in range(steps_per_epoch):
      idx = order[i * config.batch_size:(i + 1) * config.batch_size]
      x = jax.device_put(images[idx], batch_sharded)
      y = jax.device_put(labels[idx].astype(np.int32), batch_sharded)
      if augment_mask is None:
        state, metrics = train_step(state, x, y, step_key)
      else:
        state, metrics = train_step(state, x, y, step_key,
                                    jax.device_put(augment_mask[idx], batch_sharded))
      sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
    entry: dict[str, float] = {"epoch": epoch + 1}
    entry.update({k: float(v) / steps_per_epoch for k, v in jax.device_get(sums).items()})
    last = epoch + 1 == config.epochs
    if eval_fn is not None and ((epoch + 1) % config.eval_every == 0 or last):
      entry.update({k: float(v) for k, v in eval_fn(state.variables).items()})
    if ckpt_dir is not None:
      previous = latest_checkpoint(ckpt_dir)
      save_checkpoint(_checkpoint_path(ckpt_dir, epoch + 1),
                      {"params": state.params, "batch_stats": state.batch_stats,
                       "opt_state": state.opt_state, "step": state.step, "epoch": epoch + 1},
                      config)
      if previous is not None and previous[0] != epoch + 1:
        previous[1].unlink(missing_ok=True)
    history.append(entry)
    if callback is not None and ((epoch + 1) % config.log_every == 0 or last):
      callback(epoch + 1, dict(entry))
  return jax.device_get(state.variables), history
