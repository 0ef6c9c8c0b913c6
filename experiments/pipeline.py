"""The experiment pipeline behind ``python -m experiments.cifar10`` and ``experiments.gtsrb``.

One cell = (attack, defense, seed):

1. load the data set (``--data-dir`` / ``$IBAU_DATA_DIR`` ``.npz`` arrays, else
   tensorflow-datasets; the ``smoke`` preset makes a small synthetic set instead);
2. poison the attacker's training images at ``poison_ratio`` with the attack (a pure function
   of the seed) and train the model on them, or reuse the model a previous cell or run trained
   with the same data, attack and training configuration (``workdir/models/``, or the shared
   ``--model-dir``; an interrupted training resumes from its last epoch);
3. evaluate clean accuracy (ACC), attack success rate on triggered non-target images (ASR) and
   robust accuracy (RA) on the evaluation images;
4. run the defense on the defender's clean set (held out from training), evaluating after
   every round;
5. write the cell atomically to ``workdir/cells/``, then refresh ``results.json``,
   ``results.csv``, ``results.md`` and the plots in ``workdir/plots/`` (for every finished
   cell in the work directory, those of earlier commands with other attacks, defenses or
   seeds too).

Finished cells are skipped when the same command runs again, so a sweep killed at any moment
(even ``kill -9``) continues where it stopped.  Within a cell, I-BAU (after every round), Neural
Cleanse, TABOR, ANP (every ``log_every`` steps) and DeepInspect (after each of its first two
stages) save their state in ``workdir/partial/<cell>/`` and resume from there;
the cell's seconds include the interrupted runs' (the folder is deleted once the cell is
written, and ``partial/`` once it is empty).  ``workdir/config.json`` holds the resolved
configuration; a work directory made with a different configuration is refused.

Splits.  CIFAR-10: the attacker trains on the first ``train_size`` (45,000) training images,
the defender's clean set is the last ``clean_size`` (5,000) training images, evaluation is the
10,000 test images.  GTSRB (only a training subset is shipped in ``../shared/data``): the
attacker trains on ``gtsrb/train_subset``; as in the paper, the defender's clean set is the
first ``clean_size`` images of a seed-0 permutation of the test set and the remaining test
images are for evaluation.
"""

from __future__ import annotations

import argparse
import csv
import copy
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ibau_jax import files

PRESETS = ("smoke", "cpu", "paper")
# Defense names of the experiments: the registry's (ibau_jax.defenses), plus "none" (the
# poisoned model evaluated as it is).  Kept as a function so nothing is imported at import time.
def defense_names() -> list[str]:
  from ibau_jax import defenses
  names = defenses.defense_names()
  first = [n for n in ("ibau", "ft") if n in names]
  return first + [n for n in names if n not in first] + ["none"]

DATASETS = {"cifar10": 10, "gtsrb": 43}
# Defenses that do not train on the defender's clean set (DP-SGD retrains on the poisoned
# training set).
NO_CLEAN_SET = ("dp",)
# Attack names of the experiments: the registry's plus the all-to-all BadNets and a clean
# model ("clean": no poisoning; ASR is then that of the BadNets trigger on a clean model).
EXTRA_ATTACKS = ("badnets_all_to_all", "clean")


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything that determines a sweep's results (saved as ``workdir/config.json``).

  Attributes:
    dataset: ``"cifar10"`` or ``"gtsrb"``.
    preset: the preset the other values came from (``smoke``, ``cpu``, ``paper``).
    attacks: attack names (see :func:`attack_names`).
    defenses: defense names (``ibau``; ``none`` evaluates the poisoned model only).
    seeds: one cell per seed; the seed drives poisoning, training and the defense.
    target: the target class of all-to-one attacks.
    poison_ratio: fraction of the eligible training images that get the trigger (for
      clean-label attacks, whose eligible images are the target class's: as many images
      as this fraction of the whole training set, at most the whole class; see
      :func:`effective_ratio`).
    model: a registered model name; ``model_widths`` overrides small-VGG16's stage widths.
    model_widths: None or the three stage widths of ``small_vgg16``.
    model_options: further keyword arguments of the model's constructor (lists become
      tuples), e.g. ``{"dropout_rates": [0, 0, 0]}`` (the ``cpu`` preset's: training without
      dropout; dropout is off at inference anyway, so the defenses see the same function).
    augment_triggered: False: the attacker's training does not augment the images that
      carry the trigger, so that a random flip does not turn a trigger into its mirror
      image, a second trigger the model must also learn (WaNet's noise-mode images, which
      keep their labels, are augmented like clean ones; True: every image is augmented, as
      in the attacks' papers).
    train_size: attacker's training images (CIFAR-10: the first ones; GTSRB: at most the
      training subset's size).
    clean_size: the defender's clean images.
    eval_size: evaluation images (None: all that are left).
    eval_every: evaluate ACC/ASR/RA after every ``eval_every``-th round (epoch, stage) of a
      defense, for the per-round record and plots; 0: only after the defense.  The numbers
      after the defense are always those of the variables it returns.  It changes what is
      recorded between rounds, not the result, so a work directory resumes with another
      value.
    synthetic: use a generated data set (the smoke preset; no files needed).
    attack_settings: for an attack name, keyword arguments of its constructor that differ
      from its paper's values (``{"sig": {"delta": 0.157}}``; ``--set sig.delta=0.157``).
      They are part of the model's cache key.
    train: :class:`ibau_jax.train.TrainConfig` fields for the attacker's training.
    ibau: :class:`ibau_jax.IBAUConfig` fields that differ from the default.
    ft: :class:`ibau_jax.defenses.FTConfig` fields that differ from the default.
    defense_settings: for every other defense name, its config fields that differ from the
      default (``{"nc": {"steps": 500}}``; ``--set nc.steps=500``).
  """

  dataset: str
  preset: str = "cpu"
  attacks: tuple[str, ...] = ("badnets",)
  defenses: tuple[str, ...] = ("ibau",)
  seeds: tuple[int, ...] = (0,)
  target: int = 0
  poison_ratio: float = 0.1
  model: str = "small_vgg16"
  model_widths: Optional[tuple[int, ...]] = None
  model_options: dict = dataclasses.field(default_factory=dict)
  augment_triggered: bool = True
  train_size: int = 45000
  clean_size: int = 5000
  eval_size: Optional[int] = None
  eval_every: int = 1
  synthetic: bool = False
  attack_settings: dict = dataclasses.field(default_factory=dict)
  train: dict = dataclasses.field(default_factory=dict)
  ibau: dict = dataclasses.field(default_factory=dict)
  ft: dict = dataclasses.field(default_factory=dict)
  defense_settings: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.dataset not in DATASETS:
      raise ValueError(f"unknown dataset {self.dataset!r}; choose from {sorted(DATASETS)}")
    if self.preset not in PRESETS:
      raise ValueError(f"unknown preset {self.preset!r}; choose from {PRESETS}")
    if not isinstance(self.eval_every, int) or isinstance(self.eval_every, bool) \
        or self.eval_every < 0:
      raise ValueError(f"eval_every must be an integer >= 0, got {self.eval_every!r}")
    unknown = [a for a in self.attacks if a not in attack_names()]
    if unknown or not self.attacks:
      raise ValueError(f"unknown attack(s) {unknown}; choose from {attack_names()} or 'all'")
    known = defense_names()
    unknown = [d for d in self.defenses if d not in known]
    if unknown or not self.defenses:
      raise ValueError(f"unknown defense(s) {unknown}; choose from {known} or 'all'")
    if not self.seeds or any(not isinstance(s, int) or s < 0 for s in self.seeds):
      raise ValueError(f"seeds must be non-negative integers, got {self.seeds!r}")
    if not 0 <= self.target < DATASETS[self.dataset]:
      raise ValueError(f"target must be in [0, {DATASETS[self.dataset]}), got {self.target}")
    if not 0 < self.poison_ratio <= 1:
      raise ValueError(f"poison_ratio must be in (0, 1], got {self.poison_ratio}")
    for name in ("train_size", "clean_size"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
    if not isinstance(self.augment_triggered, bool):
      raise ValueError(f"augment_triggered must be true or false, got "
                       f"{self.augment_triggered!r}")
    if not isinstance(self.model_options, dict):
      raise ValueError(f"model_options must be a dict, got {self.model_options!r}")
    if not isinstance(self.attack_settings, dict):
      raise ValueError(f"attack_settings must be a dict, got {self.attack_settings!r}")
    from ibau_jax import attacks
    for name, given in self.attack_settings.items():
      if name not in attacks.attack_names() or not isinstance(given, dict):
        raise ValueError(f"attack_settings: {name!r} must be a registered attack "
                         f"({sorted(attacks.attack_names())}) mapped to a dict of its "
                         f"parameters, got {given!r}")
      if "target" in given or "num_classes" in given:
        raise ValueError(f"attack_settings.{name}: set target with the target field, not "
                         "per attack")
      make_attack(name, self)  # validates the parameters
    try:
      _model(self)
    except (TypeError, ValueError) as e:
      raise ValueError(f"model {self.model!r} with model_widths={self.model_widths} and "
                       f"model_options={self.model_options}: {e}") from None
    self.train_config()  # validates the nested fields
    self.ibau_config()
    self.defense_config("ft")
    if not isinstance(self.defense_settings, dict):
      raise ValueError(f"defense_settings must be a dict, got {self.defense_settings!r}")
    for name in self.defense_settings:
      if name in ("ibau", "ft") or name not in known or name == "none":
        raise ValueError(f"defense_settings: {name!r} is not a defense with settings there "
                         f"(ibau and ft have their own fields); choose from "
                         f"{[n for n in known if n not in ('ibau', 'ft', 'none')]}")
      self.defense_config(name)

  def check_clean_batches(self) -> None:
    """``ValueError`` unless one batch of every listed defense that trains on the clean set
    fits in it (checked by :func:`run` before any model is trained)."""
    for name in self.defenses:
      size = getattr(self.defense_config(name), "batch_size", None) \
          if name not in ("none",) + NO_CLEAN_SET else None
      if size is not None and size > self.clean_size:
        raise ValueError(f"clean_size={self.clean_size} is smaller than one batch of {name} "
                         f"({size}); raise clean_size or set {name}.batch_size to at most "
                         f"{self.clean_size}")

  def train_config(self):
    from ibau_jax import train as train_lib
    try:
      return train_lib.TrainConfig.from_dict(self.train)
    except TypeError as e:
      raise ValueError(f"bad train fields {self.train}: {e}") from None

  def ibau_config(self, **extra):
    return self.defense_config("ibau", **extra)

  def defense_config(self, name: str, **extra):
    """The config object of defense ``name`` (the defaults updated with this config's
    fields for it and with ``extra``)."""
    from ibau_jax import defenses
    _, cls = defenses.get_defense(name)
    given = getattr(self, name) if name in ("ibau", "ft") else \
        self.defense_settings.get(name, {})
    # (The hooks and the checkpoint folder are the pipeline's to set.)
    fields = {f.name for f in dataclasses.fields(cls)} - {"callback", "progress",
                                                           "checkpoint_dir"}
    unknown = set(given) - fields
    if unknown:
      raise ValueError(f"unknown {name} fields {sorted(unknown)}; choose from {sorted(fields)}")
    given = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v)
             if isinstance(v, list) else v for k, v in given.items()}
    return cls(**{**given, **extra})

  def to_dict(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_dict(cls, d: dict) -> "ExperimentConfig":
    d = dict(d)
    for name in ("attacks", "defenses", "seeds", "model_widths"):
      if d.get(name) is not None:
        d[name] = tuple(d[name])
    return cls(**d)


def attack_names() -> list[str]:
  from ibau_jax import attacks
  return sorted(attacks.attack_names()) + list(EXTRA_ATTACKS)


# NAD's released β = 5000 (on a WRN) makes the student diverge on small-VGG16 run in
# inference mode, as every defense here runs it: on the CPU-preset CIFAR-10 BadNets model
# with 100 clean images the student's cross-entropy rose from 0.66 to 10 over the 20 epochs
# and the model ended predicting one class (ACC 10 %), also with β = 5000 on the last layer
# alone.  β = 500 on every layer was stable (cross-entropy 0.66 -> 0.05).  Both experiment
# presets use it (:data:`PAPER_DEFENSE_SETTINGS`).
PAPER_DEFENSE_SETTINGS = {"nad": {"betas": 500.0}}


# The ``cpu`` preset's budgets for the baseline defenses (their papers' step counts are
# sized for GPUs).  Measured on the project's 2-core CPU with small-VGG16 on CIFAR-10,
# 100 clean images, batch 64, the machine shared by two jobs (alone: about half):
# Neural Cleanse 5.5 s per step (ten classes at once), TABOR 11 s, ANP 1.8 s per
# iteration, DeepInspect's generator 1.5 s per step; Fine-Pruning, NAD and fine-tuning take
# seconds at 100 images.  DP-SGD, alone (benchmarks/loops.py, session 10): 1.1 s per batch
# of 128 (per-example gradients), about 7 minutes for its one epoch over 45,000 images.
# With these settings each baseline takes about 4-8 minutes per model alone on the
# machine, where the defaults would take 45 minutes (NC), 90 (TABOR) and 70 (DP-SGD,
# 10 epochs).
CPU_DEFENSE_SETTINGS = {
    **PAPER_DEFENSE_SETTINGS,
    "nc": {"steps": 200, "batch_size": 32},
    "tabor": {"steps": 100, "batch_size": 32},
    "anp": {"iterations": 300},
    "deepinspect": {"generator_steps": 200},
    "dp": {"epochs": 1},
}


def preset(name: str, dataset: str) -> ExperimentConfig:
  """The named preset for ``dataset``.

  * ``smoke``: a synthetic 32x32 data set (2,000 training images), a narrow small-VGG16
    (widths 8, 16, 32), 2 training epochs and 1 I-BAU round: about a minute on 2 CPU cores,
    for checking that everything runs.
  * ``cpu``: the 2-core CPU budget: small-VGG16 without dropout trained with the CPU
    training preset (:data:`ibau_jax.train.CPU_PRESET`), then the default I-BAU; the
    baseline defenses run with fewer steps (:data:`CPU_DEFENSE_SETTINGS`).  Runtime
    of one (attack, ibau) cell on 2 CPU cores (AMD EPYC host of sessions 22-25,
    docs/results.md): CIFAR-10 at most 25 minutes (WaNet's command end to end, the machine
    to itself, session 25: 23.3 minutes, of which training 8 epochs 12.9 and I-BAU's 5
    rounds with its repairs and the evaluations the rest; training alone 10.9-12.9 minutes,
    up to 21 shared); GTSRB at most 15 minutes (BadNets' command end to end alone, session
    25: 11.1 minutes, training 3.2).  A trained model is cached and reused, which leaves the
    I-BAU part (CIFAR-10 WaNet: 7.5-13 minutes).
  * ``paper``: the paper's training (:data:`ibau_jax.train.PAPER_PRESET`, 50 epochs;
    for accelerators), then the default I-BAU.
  """
  from ibau_jax import train as train_lib
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose from {PRESETS}")
  if dataset not in DATASETS:
    raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(DATASETS)}")
  train_size = 45000 if dataset == "cifar10" else 10003
  # The same target class on both data sets (CIFAR-10's "ship", GTSRB's "speed limit
  # 120 km/h"), as in the runs of docs/results.md.
  target = 8
  if name == "smoke":
    return ExperimentConfig(
        dataset=dataset, preset=name, target=1, poison_ratio=0.1, model_widths=(8, 16, 32),
        train_size=2000, clean_size=400, eval_size=400, synthetic=True,
        train=train_lib.TrainConfig(epochs=2, batch_size=100, optimizer="adam",
                                    learning_rate=2e-3, weight_decay=0.0,
                                    augment=False).to_dict(),
        ibau=dict(rounds=1, batch_size=100))
  if name == "cpu":
    # Dropout off for the short CPU training (see ibau_jax.train.CPU_PRESET).
    return ExperimentConfig(dataset=dataset, preset=name, target=target, poison_ratio=0.1,
                            train_size=train_size, clean_size=5000,
                            model_options={"dropout_rates": [0.0, 0.0, 0.0]},
                            train=train_lib.CPU_PRESET.to_dict(),
                            defense_settings=copy.deepcopy(CPU_DEFENSE_SETTINGS))
  return ExperimentConfig(dataset=dataset, preset=name, target=target, poison_ratio=0.1,
                          train_size=train_size, clean_size=5000,
                          train=train_lib.PAPER_PRESET.to_dict(),
                          defense_settings=copy.deepcopy(PAPER_DEFENSE_SETTINGS))


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Splits:
  train_x: np.ndarray
  train_y: np.ndarray
  clean_x: np.ndarray
  clean_y: np.ndarray
  eval_x: np.ndarray
  eval_y: np.ndarray


def synthetic_data(num_classes: int, n: int, seed: int = 0,
                   stream: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """A learnable synthetic image set: each class is a smooth random colour field plus
  noise, float32 ``(n, 32, 32, 3)`` in [0, 1] with balanced labels.

  Args:
    num_classes: number of classes.
    n: number of images.
    seed: draws the class fields (and, with ``stream`` None, the images).
    stream: None: the labels and the noise continue the random stream of the class
      fields.  An integer: they come from a stream of their own (``(seed, stream)``), so
      that sets drawn with different streams share the classes, not the images, and the
      size of one does not change another's images (:func:`load_splits`).

  Returns:
    ``(images, labels)``.
  """
  rng = np.random.RandomState(seed)
  coarse = rng.rand(num_classes, 4, 4, 3)
  fields = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
  if stream is not None:
    rng = np.random.RandomState([seed, stream])
  labels = (np.arange(n) % num_classes).astype(np.int32)
  rng.shuffle(labels)
  images = 0.6 * fields[labels] + 0.4 * rng.rand(n, 32, 32, 3)
  return images.astype(np.float32), labels


def load_splits(config: ExperimentConfig, data_dir: Optional[str]) -> Splits:
  from ibau_jax import data as data_lib
  num_classes = DATASETS[config.dataset]
  if config.synthetic:
    # One stream per split: the training images depend on train_size alone (the model
    # cache key's), not on the clean or evaluation sizes.
    tx, ty = synthetic_data(num_classes, config.train_size, stream=0)
    cx, cy = synthetic_data(num_classes, config.clean_size, stream=1)
    ex, ey = synthetic_data(num_classes, config.eval_size or 1000, stream=2)
    return Splits(tx, ty, cx, cy, ex, ey)
  kwargs = dict(data_dir=data_dir, download=data_dir is None)
  if config.dataset == "cifar10":
    train = data_lib.load("cifar10", "train", **kwargs)
    test = data_lib.load("cifar10", "test", **kwargs)
    n = train.images.shape[0]
    if config.train_size + config.clean_size > n:
      raise ValueError(f"train_size + clean_size = {config.train_size + config.clean_size} "
                       f"exceeds the {n} CIFAR-10 training images")
    tx, ty = train.images[:config.train_size], train.labels[:config.train_size]
    cx, cy = train.images[n - config.clean_size:], train.labels[n - config.clean_size:]
    ex, ey = test.images, test.labels
  else:
    train = data_lib.load("gtsrb", "train", **kwargs)
    test = data_lib.load("gtsrb", "test", **kwargs)
    tx, ty = train.images[:config.train_size], train.labels[:config.train_size]
    order = np.random.RandomState(0).permutation(test.images.shape[0])
    if config.clean_size >= order.size:
      raise ValueError(f"clean_size {config.clean_size} leaves no GTSRB test image to evaluate")
    cx, cy = test.images[order[:config.clean_size]], test.labels[order[:config.clean_size]]
    ex, ey = test.images[order[config.clean_size:]], test.labels[order[config.clean_size:]]
  if config.eval_size is not None:
    ex, ey = ex[:config.eval_size], ey[:config.eval_size]
  f = data_lib.to_float
  return Splits(f(tx), np.asarray(ty, np.int32), f(cx), np.asarray(cy, np.int32), f(ex),
                np.asarray(ey, np.int32))


# --------------------------------------------------------------------------------------
# One cell
# --------------------------------------------------------------------------------------


def _registered(name: str) -> str:
  """The registered attack behind an attack-table name (``clean`` is evaluated with BadNets'
  trigger)."""
  return "badnets" if name in ("clean", "badnets_all_to_all") else name


def make_attack(name: str, config: ExperimentConfig):
  from ibau_jax import attacks
  num_classes = DATASETS[config.dataset]
  registered = _registered(name)
  settings = {k: tuple(v) if isinstance(v, list) else v
              for k, v in config.attack_settings.get(registered, {}).items()}
  if name == "badnets_all_to_all":
    return attacks.get_attack("badnets", mode="all_to_all", num_classes=num_classes, **settings)
  return attacks.get_attack(registered, target=config.target, num_classes=num_classes,
                            **settings)


def _model(config: ExperimentConfig):
  from ibau_jax.models import get_model
  kwargs = {"widths": tuple(config.model_widths)} if config.model_widths else {}
  kwargs.update({k: tuple(v) if isinstance(v, list) else v
                 for k, v in config.model_options.items()})
  return get_model(config.model, DATASETS[config.dataset], **kwargs)


def _digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def cell_name(attack: str, defense: str, seed: int) -> str:
  return f"{attack}__{defense}__seed{seed}"


def effective_ratio(config: ExperimentConfig, attack, labels: np.ndarray) -> float:
  """The ratio passed to :func:`ibau_jax.attacks.poison` (a fraction of the ELIGIBLE images).

  Dirty-label attacks: ``config.poison_ratio`` of the non-target images.  Clean-label attacks
  (SIG), whose only eligible images are the target class's (a tenth of CIFAR-10): as many
  images as ``poison_ratio`` of the whole training set, at most the whole target class
  (BackdoorBench's convention; ``poison_ratio`` of the target class alone, 447 images at 0.1,
  gave a CIFAR-10 SIG model an ASR of 14 % with the cpu preset).
  """
  if not getattr(attack, "clean_label", False):
    return config.poison_ratio
  eligible = int(np.sum(np.asarray(labels) == attack.target))
  if eligible == 0:
    return config.poison_ratio
  return min(1.0, config.poison_ratio * len(labels) / eligible)


def poisoned_training_set(config: ExperimentConfig, attack_name: str, seed: int,
                          splits: Splits) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The attacker's training set ``(images, labels, poisoned mask)`` (a pure function of the
  seed)."""
  import jax
  from ibau_jax import attacks
  if attack_name == "clean":
    return splits.train_x, splits.train_y, np.zeros(len(splits.train_y), bool)
  k_poison, _ = jax.random.split(jax.random.PRNGKey(seed))
  attack = make_attack(attack_name, config)
  noise = attack.cross_ratio * config.poison_ratio if attack_name == "wanet" else 0.0
  x, y, mask = attacks.poison(splits.train_x, splits.train_y, attack,
                              effective_ratio(config, attack, splits.train_y),
                              key=k_poison, num_classes=DATASETS[config.dataset],
                              noise_ratio=noise)
  return np.asarray(x), np.asarray(y), np.asarray(mask)


def train_poisoned(config: ExperimentConfig, attack_name: str, seed: int, splits: Splits,
                   model_dir: pathlib.Path, log: Callable[[str], None], progress: bool):
  """Poisons and trains (or loads the cached model from ``model_dir``); returns
  ``(variables, info)``.  The cache key is everything that determines the model (dataset,
  attack, seed, target, poison ratio, model, training data size and config), so sweeps with
  different defenses can share one ``model_dir``."""
  import flax.serialization
  import jax
  from ibau_jax import train as train_lib

  # Settings of the test-time trigger only (SIG's test_delta) do not change the model.
  attack = make_attack(attack_name, config)
  evaluation_only = type(attack).evaluation_fields
  training_settings = {k: v for k, v in
                       config.attack_settings.get(_registered(attack_name), {}).items()
                       if k not in evaluation_only}
  # The clean model depends on neither the target nor the poisoning ratio.
  poisoning = {} if attack_name == "clean" else dict(target=config.target,
                                                     poison_ratio=config.poison_ratio)
  spec = dict(dataset=config.dataset, attack=attack_name, seed=seed, **poisoning,
              model=config.model,
              model_widths=config.model_widths, train_size=config.train_size,
              **({"model_options": config.model_options} if config.model_options else {}),
              **({"attack_settings": training_settings}
                 if attack_name != "clean" and training_settings else {}),
              **({"clean_label_ratio": "of the training set"}
                 if getattr(attack, "clean_label", False) else {}),
              **({"augment_triggered": False,
                  # WaNet's noise-mode images were first left un-augmented too.
                  **({"noise_mode_augmented": True} if attack_name == "wanet" else {})}
                 if not config.augment_triggered and attack_name != "clean" else {}),
              synthetic=config.synthetic, train=config.train,
              # Synthetic training images are drawn on a stream of their own since the
              # clean and evaluation sizes stopped changing them: older cached models were
              # trained on other images.
              **({"synthetic_splits": "independent"} if config.synthetic else {}))
  folder = model_dir / f"{attack_name}_seed{seed}_{_digest(spec)}"
  final = folder / "variables.msgpack"
  model = _model(config)
  tconfig = config.train_config()
  # Sweeps sharing ``model_dir`` train each model once: a second sweep that needs a model
  # being trained waits for it, then loads it.
  with files.locked(folder, wait=True, on_wait=lambda holder: log(
      f"  model: waiting for {folder.name}, which another process is training ({holder})")):
    if final.is_file():
      info = json.loads((folder / "info.json").read_text())
      template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                   splits.train_x[:1], train=False))
      template = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), template)
      variables = flax.serialization.from_bytes(template, final.read_bytes())
      log(f"  model: reused {folder.name} (trained in {info['train_seconds'] / 60:.1f} min)")
      return variables, info
    files.remove_temporaries(folder)  # a training killed while writing its results
    key = jax.random.PRNGKey(seed)
    _, k_train = jax.random.split(key)
    start = time.perf_counter()
    x, y, mask = poisoned_training_set(config, attack_name, seed, splits)
    # Without augment_triggered, the images that carry the trigger are not augmented (WaNet's
    # noise-mode images, warped at random with their labels kept, are).
    augment_mask = (~mask if not config.augment_triggered and attack_name != "clean" else None)
    bar = _bar(tconfig.epochs, f"train {attack_name} seed {seed}", progress)

    def callback(epoch, metrics):
      bar.update(1)
      bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.3f}")

    variables, history = train_lib.fit(model, x, y, tconfig, key=k_train, callback=callback,
                                       checkpoint_dir=folder / "checkpoints",
                                       augment_mask=augment_mask)
    bar.close()
    seconds = time.perf_counter() - start
    info = dict(spec=spec, poisoned=int(mask.sum()), train_seconds=seconds, history=history)
    files.atomic_write(folder / "info.json", json.dumps(info, indent=1))
    files.atomic_write(final, flax.serialization.to_bytes(jax.device_get(variables)))
    log(f"  model: trained {attack_name} seed {seed} on {len(y)} images ({int(mask.sum())} "
        f"poisoned) in {seconds / 60:.1f} min")
    return variables, info


class _NoBar:
  def update(self, n=1):
    pass

  def set_postfix(self, **kw):
    pass

  def close(self):
    pass


def _bar(total: int, desc: str, progress: bool):
  if not progress:
    return _NoBar()
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)


#: The fields of a defense's result that :func:`run_defense` reports in ``details``.
DETAIL_FIELDS = ("selected_round", "suspect", "stamp", "repair", "warp")


def run_defense(defense: str, dconfig, apply_fn, variables, images, labels, key,
                evaluate: Callable[[Any], dict], *, eval_every: int = 1, desc: str = "",
                progress: bool = False,
                checkpoint_dir: Optional[str | os.PathLike] = None,
                details: Optional[dict] = None):
  """Runs defense ``defense`` (config ``dconfig``) on ``variables`` with the given images.

  ``evaluate(variables) -> {"acc", "asr", "ra"}`` runs after every ``eval_every``-th round
  (0: never) and on the variables the defense returns.  Returns ``(after, rounds, seconds,
  delta)``: the returned variables' metrics, a record per round (the defense's statistics,
  with the metrics where evaluated), the defense's own seconds (without the evaluations;
  with the seconds of interrupted earlier runs that a checkpoint resumed) and its
  recovered perturbation (None if it has none).  ``checkpoint_dir`` goes to the defenses
  that can save and resume their work (a ``checkpoint_dir`` config field: I-BAU, Neural
  Cleanse, TABOR, ANP and DeepInspect); the others ignore it.  The per-round records are
  saved there too (``rounds.json``), so that the rounds a resumed run replays keep the
  metrics measured before the interruption (not for a round interrupted while it was being
  evaluated); the file is removed when the defense finishes.  A ``details`` dict gets what
  the defense reports beyond its rounds, as JSON data (:data:`DETAIL_FIELDS` of its result
  that are not None: I-BAU's ``stamp``, ``repair``, ``warp``, ``suspect`` and
  ``selected_round``).
  """
  from ibau_jax import defenses
  fn, _ = defenses.get_defense(defense)
  fields = {f.name for f in dataclasses.fields(dconfig)}
  if checkpoint_dir is not None and "checkpoint_dir" in fields:
    dconfig = dconfig.replace(checkpoint_dir=str(checkpoint_dir))
  steps = getattr(dconfig, "rounds", None) or getattr(dconfig, "epochs", 1)
  bar = _bar(steps, desc, progress)
  if progress and "progress" in fields:
    # A long inner stage (Neural Cleanse's reverse engineering, I-BAU's repairs) gets a bar of
    # its own.
    inner = {}

    def show(done, total):
      if "bar" not in inner:
        inner["bar"] = _bar(total, f"{desc} ({'repairs' if defense == 'ibau' else 'steps'})",
                            True)
      inner["bar"].update(done - inner["bar"].n)
      if done >= total:
        inner.pop("bar").close()

    dconfig = dconfig.replace(progress=show)
  eval_seconds = [0.0]
  # The per-round records are kept next to the defense's checkpoint, so that rounds a
  # resumed run replays (v is None: their variables were not kept) get back the metrics
  # measured before the interruption.
  records = files.RoundRecords(
      None if checkpoint_dir is None else pathlib.Path(checkpoint_dir) / files.ROUNDS_FILE,
      "step")

  def callback(r, stats, v):
    t = time.perf_counter()
    record = {"step": r, **_jsonable(stats)}
    if v is None:
      record.update(records.restored(r, ("acc", "asr", "ra")))
    elif eval_every and (len(records.records) + 1) % eval_every == 0:
      m = evaluate(v)
      record.update(m)
      bar.set_postfix(acc=f"{m['acc']:.3f}", asr=f"{m['asr']:.3f}")
    records.append(record)
    bar.update(1)
    eval_seconds[0] += time.perf_counter() - t

  start = time.perf_counter()
  result = fn(apply_fn, variables, images, labels, dconfig.replace(callback=callback), key=key)
  # The defense's own time: the evaluations the callback runs are not part of it.
  seconds = time.perf_counter() - start - eval_seconds[0]
  rounds = records.records
  seconds += sum(r.get("seconds_before", 0.0) for r in rounds)
  bar.close()
  delta = getattr(result, "perturbation", None)
  if details is not None:
    # Their seconds are part of the defense's; left out so that a cell is the same data
    # however often its run was interrupted.
    found = {f: getattr(result, f) for f in DETAIL_FIELDS if getattr(result, f, None) is not None}
    details.update(_jsonable({f: {k: x for k, x in v.items() if k != "seconds"}
                              if isinstance(v, dict) else v for f, v in found.items()}))
  # What the defense returns, which need not be its last round's variables (I-BAU's
  # select="probe" / "average"; Neural Cleanse returns the input when it flags nothing).
  after = evaluate(result.variables)
  records.remove()
  return after, rounds, seconds, (None if delta is None else np.asarray(delta))


def run_cell(config: ExperimentConfig, attack_name: str, defense: str, seed: int,
             splits: Splits, model_dir: pathlib.Path, log: Callable[[str], None],
             progress: bool, checkpoint_dir: Optional[pathlib.Path] = None) -> dict:
  import jax
  from ibau_jax import metrics
  from ibau_jax import models

  model = _model(config)
  apply_fn = _apply_fn(model)
  variables, info = train_poisoned(config, attack_name, seed, splits, model_dir, log,
                                   progress)
  attack = make_attack(attack_name, config).for_evaluation()

  all_to_all = attack.mode == "all_to_all"
  target = (np.asarray(attack.relabel(splits.eval_y, num_classes=DATASETS[config.dataset]))
            if all_to_all else attack.target)

  def evaluate(v):
    return {k: float(x) for k, x in metrics.evaluate(apply_fn, v, splits.eval_x,
                                                      splits.eval_y, attack.apply,
                                                      target).items()}

  before = evaluate(variables)
  log(f"  before: ACC {before['acc']:.2%} ASR {before['asr']:.2%} RA {before['ra']:.2%}")
  rounds, seconds, delta, after, details = [], 0.0, None, before, {}
  if defense != "none":
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    images, labels, start_from = splits.clean_x, splits.clean_y, variables
    if defense == "dp":
      # DP-SGD replaces the attacker's training: a fresh model trained with per-example
      # clipping and noise on the poisoned training set (no clean set).
      images, labels, _ = poisoned_training_set(config, attack_name, seed, splits)
      start_from = jax.device_get(models.init_variables(model, jax.random.fold_in(key, 2),
                                                        images[:1]))
    after, rounds, seconds, delta = run_defense(
        defense, config.defense_config(defense), apply_fn, start_from, images, labels, key,
        evaluate, eval_every=config.eval_every, desc=f"{defense} {attack_name} seed {seed}",
        progress=progress, checkpoint_dir=checkpoint_dir, details=details)
  der = metrics.defense_effectiveness_rating(before["acc"], before["asr"], after["acc"],
                                             after["asr"])
  log(f"  after {defense}: ACC {after['acc']:.2%} ASR {after['asr']:.2%} RA {after['ra']:.2%}"
      f" ({seconds:.0f} s)")
  # The attack's and the defense's configs as they were when the cell was computed.
  resolved = resolved_configs(config, dict(attack=attack_name, defense=defense))
  return dict(attack=attack_name, defense=defense, seed=seed, dataset=config.dataset,
              **resolved, target="all_to_all" if all_to_all else attack.target,
              poisoned=info["poisoned"],
              train_seconds=info["train_seconds"], defense_seconds=seconds,
              acc_before=before["acc"], asr_before=before["asr"], ra_before=before["ra"],
              acc_after=after["acc"], asr_after=after["asr"], ra_after=after["ra"],
              der=float(der), rounds=rounds, details=details,
              delta=None if delta is None else delta.tolist())


_DROP = object()


def _numbers(v: Any) -> int:
  """How many numbers (and strings) nested lists hold, at every depth."""
  return sum(_numbers(x) for x in v) if isinstance(v, list) else 1


def _plain(v: Any, budget: int = 64) -> Any:
  """``v`` as JSON data (numbers, strings, lists, dicts), or ``_DROP`` when it is not
  representable or holds more than ``budget`` numbers (reversed triggers, masks)."""
  if v is None or isinstance(v, (bool, int, float, str)):
    return v
  if isinstance(v, (np.generic,)) or (hasattr(v, "shape") and np.ndim(v) == 0):
    return np.asarray(v).item()
  if hasattr(v, "shape"):
    return np.asarray(v).tolist() if np.size(v) <= budget else _DROP
  if isinstance(v, (list, tuple)):
    items = [_plain(x, budget) for x in v]
    if any(x is _DROP for x in items) or _numbers(items) > budget:
      return _DROP
    return items
  if isinstance(v, dict):
    out = {str(k): _plain(x, budget) for k, x in v.items()}
    return {k: x for k, x in out.items() if x is not _DROP}
  return _DROP


def _jsonable(stats: dict) -> dict:
  """The JSON-friendly part of a defense's per-step stats: numbers, strings and small
  arrays or lists (large arrays such as reversed triggers are left out of the results)."""
  out = {k: _plain(v) for k, v in stats.items()}
  return {k: v for k, v in out.items() if v is not _DROP}


_APPLY_FNS: dict = {}


def _apply_fn(model):
  # One function object per model, so compiled code is reused across cells.
  if model not in _APPLY_FNS:
    _APPLY_FNS[model] = lambda v, x: model.apply(v, x, train=False)
  return _APPLY_FNS[model]


# --------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------

CSV_FIELDS = ("dataset", "attack", "defense", "seed", "acc_before", "asr_before", "ra_before",
              "acc_after", "asr_after", "ra_after", "der", "train_seconds", "defense_seconds")


#: Below this ASR before the defense the attack did not take hold: the defense has no
#: backdoor to remove, and its DER says nothing.
ASR_TOOK_HOLD = 0.5
#: The mark of such a cell's DER in :func:`markdown_table`.
WEAK_ATTACK_MARK = "†"


def markdown_table(cells: Sequence[dict]) -> str:
  """The cells as a markdown table (percentages; a DER marked :data:`WEAK_ATTACK_MARK`,
  with a footnote under the table, where ASR before the defense is below
  :data:`ASR_TOOK_HOLD`)."""
  lines = ["| attack | defense | seed | ACC before | ASR before | RA before | ACC after | "
           "ASR after | RA after | DER | train min | defense s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  weak = False
  for c in cells:
    mark = WEAK_ATTACK_MARK if c["asr_before"] < ASR_TOOK_HOLD else ""
    weak = weak or bool(mark)
    lines.append(
        f"| {c['attack']} | {c['defense']} | {c['seed']} | {100 * c['acc_before']:.2f} | "
        f"{100 * c['asr_before']:.2f} | {100 * c['ra_before']:.2f} | "
        f"{100 * c['acc_after']:.2f} | {100 * c['asr_after']:.2f} | "
        f"{100 * c['ra_after']:.2f} | {100 * c['der']:.1f}{mark} | "
        f"{c['train_seconds'] / 60:.1f} | {c['defense_seconds']:.0f} |")
  if weak:
    lines += ["", f"{WEAK_ATTACK_MARK} ASR before the defense below "
                  f"{100 * ASR_TOOK_HOLD:.0f} %: the attack did not take hold, so DER is not "
                  "meaningful."]
  return "\n".join(lines) + "\n"


def markdown_report(config: ExperimentConfig, cells: Sequence[dict],
                    eval_images: Optional[int] = None) -> str:
  """``results.md``: a header saying what the numbers are, then :func:`markdown_table`.

  Args:
    config: the sweep's configuration.
    cells: the cells of the table.
    eval_images: the number of evaluation images (None: ``config.eval_size``, else "all").

  Returns:
    The markdown text.
  """
  count = eval_images if eval_images is not None else config.eval_size
  data = "synthetic data (generated images, not the real data set)" if config.synthetic \
      else "real data"
  images = f"{count} evaluation images" if count is not None else "all evaluation images"
  header = [
      f"Dataset `{config.dataset}`, preset `{config.preset}`, {data}; {images}.",
      "",
      "ACC, ASR, RA and DER are percentages: ACC is the clean accuracy, ASR the share of "
      "triggered non-target images classified as the target, RA the accuracy on those "
      "triggered images; DER = [max(0, ASR before - ASR after) - max(0, ACC before - "
      "ACC after) + 1] / 2 (50 = no change).  \"train min\" is the model's training time "
      "(as recorded when it was trained, also for a model reused from the cache); "
      "\"defense s\" is the defense's time in seconds, which includes the XLA compilation "
      "of its first call.",
      "",
  ]
  return "\n".join(header) + "\n" + markdown_table(cells)


def _versions() -> dict:
  import flax
  import jax
  import optax
  import ibau_jax
  return dict(ibau_jax=ibau_jax.__version__, jax=jax.__version__, flax=flax.__version__,
              optax=optax.__version__, numpy=np.__version__, python=platform.python_version(),
              backend=jax.default_backend(), devices=[str(d) for d in jax.devices()])


def git_commit() -> Optional[str]:
  """The git commit of the code (``git rev-parse HEAD`` in the ``ibau_jax`` package's
  folder), or None when git, or a repository, is not there."""
  import ibau_jax
  folder = pathlib.Path(ibau_jax.__file__).resolve().parent
  try:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True,
                          text=True, timeout=30, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  commit = done.stdout.strip()
  return commit if done.returncode == 0 and commit else None


# Fields of the defenses' configs that the pipeline sets itself (hooks and the checkpoint
# folder), left out of the recorded configs.
_HOOK_FIELDS = ("callback", "progress", "checkpoint_dir")


def config_fields(obj: Any) -> dict:
  """A dataclass's fields as JSON data: hooks (:data:`_HOOK_FIELDS`, callables) left out,
  tuples as lists, arrays of more than 64 numbers as ``"<array shape (…)>"``."""
  out = {}
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    if f.name in _HOOK_FIELDS or callable(value):
      continue
    plain = _plain(value)
    out[f.name] = plain if plain is not _DROP else \
        f"<array shape {tuple(np.shape(value))}>" if hasattr(value, "shape") else repr(value)
  return out


def resolved_configs(config: ExperimentConfig, cell: dict) -> dict:
  """``{"attack_config", "defense_config"}`` of a cell: the fields of the attack object
  (:func:`make_attack`) and of the defense's config that ``config`` resolves to (None for
  the defense ``none``, and for a name the registries no longer know)."""
  def resolve(make, name):
    try:
      return config_fields(make(name))
    except (KeyError, ValueError):
      return None
  defense = cell["defense"]
  return dict(attack_config=resolve(lambda a: make_attack(a, config), cell["attack"]),
              defense_config=None if defense == "none" else
              resolve(config.defense_config, defense))


def _sweep_order(config: ExperimentConfig, keys: Sequence[tuple]) -> Callable[[tuple], tuple]:
  """A sort key for ``(attack, defense, seed)`` in the sweep's order (seeds, then attacks,
  then defenses, as :func:`run` runs them): ``config``'s order first, then the registry's
  order (ascending seeds) for the names it does not list."""
  def extend(first, everything, found):
    rest = [x for x in everything if x in found and x not in first]
    return list(first) + rest + sorted(set(found) - set(first) - set(rest), key=str)
  attacks = extend(config.attacks, attack_names(), {k[0] for k in keys})
  defenses = extend(config.defenses, defense_names(), {k[1] for k in keys})
  seeds = extend(config.seeds, sorted({k[2] for k in keys}), {k[2] for k in keys})
  return lambda k: (seeds.index(k[2]), attacks.index(k[0]), defenses.index(k[1]))


def workdir_cells(config: ExperimentConfig, workdir: str | os.PathLike) -> list[dict]:
  """Every finished cell in ``workdir/cells``, in the sweep's order (:func:`_sweep_order`).

  A work directory takes more (or fewer) attacks, defenses and seeds
  (:func:`check_workdir`), and its other settings are ``config``'s, so every cell there
  belongs to its results, also those of earlier commands with another list.
  """
  folder = pathlib.Path(workdir) / "cells"
  found = {}
  for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
    cell = json.loads(path.read_text())
    if not isinstance(cell, dict) or any(k not in cell for k in ("attack", "defense", "seed")):
      continue
    if path.stem != cell_name(cell["attack"], cell["defense"], cell["seed"]):
      continue  # not a cell the pipeline wrote (a copy under another name)
    found[(cell["attack"], cell["defense"], cell["seed"])] = cell
  order = _sweep_order(config, list(found))
  return [found[k] for k in sorted(found, key=order)]


def write_reports(config: ExperimentConfig, cells: Sequence[dict], workdir: pathlib.Path,
                  splits: Optional[Splits] = None) -> None:
  """Rewrites results.json/.csv/.md for ``cells`` and draws the plots that are missing.

  ``results.json`` holds ``config`` (what :func:`check_workdir` compares), the resolved
  training config (``train_config``), the git commit of the code (``git_commit``, None
  without git), the versions, and the cells (without the recovered perturbations) with
  the attack's and defense's configs each cell recorded when it was computed
  (:func:`resolved_configs`; absent from cells written before they were recorded).
  """
  summary = [{k: v for k, v in c.items() if k != "delta"} for c in cells]
  files.atomic_write(workdir / "results.json", json.dumps(
      dict(config=config.to_dict(), train_config=config.train_config().to_dict(),
           git_commit=git_commit(), versions=_versions(), cells=summary), indent=1))
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
  writer.writeheader()
  for c in cells:
    writer.writerow(c)
  files.atomic_write(workdir / "results.csv", buf.getvalue())
  files.atomic_write(workdir / "results.md", markdown_report(
      config, cells, None if splits is None else len(splits.eval_y)))
  for c in cells:
    name = cell_name(c["attack"], c["defense"], c["seed"])
    if not all((workdir / "plots" / f"{name}_{kind}.png").is_file()
               for kind in ("rounds", "gallery")):
      plot_cell(config, c, workdir / "plots", splits)


def plot_cell(config: ExperimentConfig, cell: dict, folder: pathlib.Path,
              splits: Optional[Splits]) -> None:
  """``<cell>_rounds.png`` (ACC/ASR/RA per round, round 0 = before the defense) and
  ``<cell>_gallery.png`` (clean images, triggered images, the recovered δ and, where I-BAU's
  warp repair ran, its last warp: the displacement field and what it changes)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  name = cell_name(cell["attack"], cell["defense"], cell["seed"])
  folder.mkdir(parents=True, exist_ok=True)
  # Rounds without an evaluation (eval_every) are skipped; the star is the result the
  # defense returned, drawn after the last round.
  done = [(i + 1, r) for i, r in enumerate(cell["rounds"]) if "acc" in r]
  xs = [0] + [i for i, _ in done]
  last = len(cell["rounds"])
  fig, ax = plt.subplots(figsize=(5, 3.2))
  for key, label in (("acc", "ACC"), ("asr", "ASR"), ("ra", "RA")):
    ys = [cell[f"{key}_before"]] + [r[key] for _, r in done]
    line, = ax.plot(xs, [100 * y for y in ys], marker="o", label=label)
    ax.plot([last], [100 * cell[f"{key}_after"]], marker="*", markersize=11, linestyle="",
            color=line.get_color())
  xs = list(range(last + 1))
  ax.set_xlabel("defense steps done (I-BAU rounds, epochs or stages)")
  ax.set_ylabel("%")
  ax.set_ylim(-2, 102)
  ax.set_xticks(xs)
  ax.set_title(f"{config.dataset} {cell['attack']} / {cell['defense']} (seed {cell['seed']})")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  save_figure(fig, folder / f"{name}_rounds.png")
  plt.close(fig)
  if splits is None:
    return
  attack = make_attack(cell["attack"], config).for_evaluation()
  images = splits.eval_x[:6]
  triggered = np.asarray(attack.apply(images))
  has_delta = cell.get("delta") is not None
  warp_info = (cell.get("details") or {}).get("warp") or {}
  has_warp = bool(warp_info.get("active")) and warp_info.get("phi") is not None
  rows = 2 + has_delta + has_warp
  fig, axes = plt.subplots(rows, 6, figsize=(9, 1.6 * rows + 0.4))
  for j in range(6):
    axes[0, j].imshow(images[j])
    axes[1, j].imshow(triggered[j])
  axes[0, 0].set_ylabel("clean")
  axes[1, 0].set_ylabel("triggered")
  if has_delta:
    delta = np.asarray(cell["delta"], np.float32)
    scale = max(float(np.abs(delta).max()), 1e-12)
    axes[2, 0].imshow(0.5 + 0.5 * delta / scale)
    axes[2, 0].set_ylabel("δ (scaled)")
    axes[2, 1].imshow(np.abs(delta).sum(-1), cmap="magma")
    axes[2, 1].set_title("|δ| per pixel", fontsize=8)
    for j in range(6):
      if j >= 2:
        axes[2, j].imshow(np.clip(images[j - 2] + delta, 0, 1))
        axes[2, j].set_title("x + δ", fontsize=8)
  if has_warp:
    # I-BAU's warp repair: the last fitted universal warp (ibau_jax.probe.warp), as its
    # displacement field and as the change it makes to the clean images.
    from ibau_jax import probe
    from ibau_jax.attacks.wanet import upsample
    row = rows - 1
    phi = np.asarray(warp_info["phi"], np.float32)
    field = upsample(phi, images.shape[1], images.shape[2], "bicubic")
    step = max(1, images.shape[1] // 8)
    grid_r, grid_c = np.mgrid[0:images.shape[1]:step, 0:images.shape[2]:step]
    axes[row, 0].imshow(np.ones(images.shape[1:3]), cmap="gray", vmin=0, vmax=1)
    axes[row, 0].quiver(grid_c, grid_r, field[::step, ::step, 1], field[::step, ::step, 0],
                        angles="xy", scale_units="xy", scale=0.5 / step)  # arrows: 2·step × D
    axes[row, 0].set_ylabel("warp")
    axes[row, 0].set_title(f"samples from (max {np.abs(field).max():.2f} px)", fontsize=7)
    changed = np.asarray(probe.warp(images[:5], phi)) - images[:5]
    scale = max(float(np.abs(changed).max()), 1e-12)
    for j in range(1, 6):
      axes[row, j].imshow(0.5 + 0.5 * changed[j - 1] / scale)
      axes[row, j].set_title("warp(x) − x (scaled)", fontsize=8)
  for a in axes.ravel():
    a.set_xticks([])
    a.set_yticks([])
  fig.suptitle(f"{config.dataset} {cell['attack']} (seed {cell['seed']})")
  fig.tight_layout()
  save_figure(fig, folder / f"{name}_gallery.png")
  plt.close(fig)


def save_figure(fig, path: pathlib.Path) -> None:
  """Writes a matplotlib figure as PNG atomically (a killed run leaves no half file)."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  files.atomic_write(path, buf.getvalue())


# --------------------------------------------------------------------------------------
# Sweep
# --------------------------------------------------------------------------------------


def _with_defaults(saved: dict) -> dict:
  """A saved config with the fields it predates (added to ExperimentConfig later) at their
  defaults, so that adding a field does not orphan existing work directories."""
  out = dict(saved)
  for f in dataclasses.fields(ExperimentConfig):
    if f.name not in out:
      if f.default is not dataclasses.MISSING:
        out[f.name] = f.default
      elif f.default_factory is not dataclasses.MISSING:
        out[f.name] = f.default_factory()
  return json.loads(json.dumps(out))


def load_config(workdir: str | os.PathLike) -> ExperimentConfig:
  """The configuration a sweep recorded in ``workdir/config.json`` (fields added to
  ExperimentConfig since then at their defaults)."""
  path = pathlib.Path(workdir) / "config.json"
  return ExperimentConfig.from_dict(_with_defaults(json.loads(path.read_text())))


# Fields that say which cells a sweep has, or what is recorded between a defense's rounds,
# not what a cell's result is: a work directory can be resumed with more (or fewer)
# attacks, defenses or seeds, or another eval_every.
SWEEP_EXTENT = ("attacks", "defenses", "seeds", "eval_every")


def check_workdir(config: ExperimentConfig, workdir: pathlib.Path) -> None:
  """Raises ValueError if ``workdir`` holds results of another configuration (a field
  other than those in :data:`SWEEP_EXTENT` differs); records ``config`` there
  (``config.json``) otherwise."""
  path = workdir / "config.json"
  current = config.to_dict()
  if path.is_file():
    saved = _with_defaults(json.loads(path.read_text()))
    diff = sorted(k for k in set(saved) | set(current)
                  if saved.get(k) != current.get(k) and k not in SWEEP_EXTENT)
    if diff:
      raise ValueError(f"work directory {workdir} holds results of a different configuration "
                       f"(fields {diff} differ); use another --workdir or the same settings")
    if saved == current:
      return
  files.atomic_write(path, json.dumps(current, indent=1))


def run(config: ExperimentConfig, workdir: str | os.PathLike, *,
        data_dir: Optional[str] = None, log: Callable[[str], None] = print,
        progress: bool = True, model_dir: Optional[str | os.PathLike] = None,
        data_cache: Optional[dict] = None) -> list[dict]:
  """Runs every (attack, defense, seed) cell of ``config`` not already in ``workdir``.

  Trained models are cached in ``model_dir`` (default ``workdir/models``); pointing several
  sweeps at one ``model_dir`` trains each model once.  Returns ``config``'s cells (finished
  earlier or now) in sweep order; the reports in ``workdir`` are refreshed after every cell
  and cover every finished cell there (:func:`workdir_cells`), those of earlier commands
  with other attacks, defenses or seeds too.  ``data_cache``: a dict the caller passes to
  several runs in one process, so that sweeps over the same data (dataset, sizes, folder)
  load it once.
  """
  workdir = pathlib.Path(workdir)
  # One sweep per work directory: a second one would delete the first's in-flight
  # temporaries below and write the same cells.
  with files.locked(workdir, hint=BUSY_HINT):
    return _run(config, workdir, data_dir=data_dir, log=log, progress=progress,
                model_dir=model_dir, data_cache=data_cache)


#: What to do when a work directory is busy.
BUSY_HINT = ("another sweep is running in it: wait for it, or run parallel sweeps in "
             "separate work directories (sharing --model-dir) and join their cells with "
             "`python -m experiments.compare_defenses --merge`")


def _run(config: ExperimentConfig, workdir: pathlib.Path, *, data_dir: Optional[str],
         log: Callable[[str], None], progress: bool,
         model_dir: Optional[str | os.PathLike], data_cache: Optional[dict]) -> list[dict]:
  model_dir = pathlib.Path(model_dir) if model_dir is not None else workdir / "models"
  config.check_clean_batches()  # now, not after training the models
  check_workdir(config, workdir)
  # Reports and cells are written by this process alone (the lock above; model folders,
  # which other sweeps may share, are locked and cleaned by the training that resumes them).
  files.remove_temporaries(workdir)
  files.remove_temporaries(workdir / "cells")
  files.remove_temporaries(workdir / "plots")
  files.remove_temporaries(workdir / "partial", recursive=True)
  if not config.synthetic:
    from ibau_jax import data as data_lib
    data_dir = data_dir or os.environ.get(data_lib.DATA_DIR_ENV)
    if data_dir is not None and not pathlib.Path(data_dir).is_dir():
      raise ValueError(f"data directory {data_dir} does not exist")
  start = time.perf_counter()
  data_key = (config.dataset, config.synthetic, config.train_size, config.clean_size,
              config.eval_size, None if config.synthetic else data_dir)
  if data_cache is not None and data_key in data_cache:
    splits = data_cache[data_key]
  else:
    splits = load_splits(config, data_dir)
    if data_cache is not None:
      data_cache[data_key] = splits
  log(f"[{config.dataset}] data: {len(splits.train_y)} training, {len(splits.clean_y)} clean, "
      f"{len(splits.eval_y)} evaluation images ({time.perf_counter() - start:.0f} s)")
  cells = []
  todo = [(a, d, s) for s in config.seeds for a in config.attacks for d in config.defenses]
  for i, (attack_name, defense, seed) in enumerate(todo):
    path = workdir / "cells" / f"{cell_name(attack_name, defense, seed)}.json"
    if path.is_file():
      cells.append(json.loads(path.read_text()))
      log(f"[{i + 1}/{len(todo)}] {attack_name} / {defense} / seed {seed}: done earlier")
      continue
    log(f"[{i + 1}/{len(todo)}] {attack_name} / {defense} / seed {seed}")
    partial = workdir / "partial" / cell_name(attack_name, defense, seed)
    cell = run_cell(config, attack_name, defense, seed, splits, model_dir, log, progress,
                    checkpoint_dir=partial)
    files.atomic_write(path, json.dumps(cell))
    _remove_partial(workdir, partial.name)
    cells.append(cell)
    # The reports cover every finished cell of the work directory, earlier commands' too.
    write_reports(config, workdir_cells(config, workdir), workdir, splits)
  write_reports(config, workdir_cells(config, workdir), workdir, splits)
  _remove_partial(workdir)  # an empty folder an older version left
  return cells


def _remove_partial(workdir: pathlib.Path, name: Optional[str] = None) -> None:
  """Deletes ``workdir/partial/<name>`` (a finished cell's checkpoints), then ``partial/``
  itself once it is empty (it stays while it holds another cell's folder)."""
  partial = workdir / "partial"
  if name is not None:
    shutil.rmtree(partial / name, ignore_errors=True)
  try:
    partial.rmdir()
  except OSError:
    pass


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def config_from_args(dataset: str, args: argparse.Namespace) -> ExperimentConfig:
  base = preset(args.preset, dataset).to_dict()
  if args.attack is not None:
    base["attacks"] = attack_names() if args.attack == "all" else args.attack.split(",")
  if args.defense is not None:
    base["defenses"] = defense_names() if args.defense == "all" else args.defense.split(",")
  if args.seeds is not None:
    try:
      base["seeds"] = [int(s) for s in args.seeds.split(",")]
    except ValueError:
      raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
  for item in args.set:
    field, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
    head, _, sub = field.partition(".")
    if head in ("train", "ibau", "ft") and sub:
      base[head] = {**base[head], sub: _parse_value(value)}
    elif sub and head in attack_names() and head not in EXTRA_ATTACKS:
      settings = dict(base.get("attack_settings") or {})
      settings[head] = {**settings.get(head, {}), sub: _parse_value(value)}
      base["attack_settings"] = settings
    elif sub and head in defense_names() and head != "none":
      settings = dict(base.get("defense_settings") or {})
      settings[head] = {**settings.get(head, {}), sub: _parse_value(value)}
      base["defense_settings"] = settings
    elif head in base and not sub and head not in ("dataset", "preset"):
      base[head] = _parse_value(value)
    else:
      raise ValueError(f"--set: unknown field {field!r}; use one of "
                       f"{sorted(k for k in base if k not in ('dataset', 'preset'))}, "
                       "train.<TrainConfig field>, ibau.<IBAUConfig field>, "
                       "ft.<FTConfig field>, <attack>.<its parameter> or "
                       "<defense>.<its config field>")
  return ExperimentConfig.from_dict(base)


def main(dataset: str, argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog=f"python -m experiments.{dataset}",
      description=f"Train backdoored models on {dataset}, defend them, report ACC/ASR/RA.\n\n"
                  + "\n\n".join(__doc__.split("\n\n")[1:3]),
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Attacks: " + ", ".join(attack_names()) + ". Defenses: "
             + ", ".join(defense_names())
             + ".\nExample: --attack badnets,blend --seeds 0,1 --set ibau.rounds=5 "
             "--set train.epochs=3")
  parser.add_argument("--attack", default=None,
                      help="attack name, comma-separated names, or 'all' (default: badnets)")
  parser.add_argument("--defense", default=None,
                      help="defense name(s), comma-separated, or 'all' (default: ibau)")
  parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0)")
  parser.add_argument("--preset", default="cpu", choices=PRESETS,
                      help="smoke: synthetic data, about a minute; cpu: this 2-core machine; "
                           "paper: the paper's settings, for accelerators")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field (repeatable): e.g. poison_ratio=0.05, "
                           "train.epochs=3, ibau.rounds=5 (values are JSON)")
  parser.add_argument("--data-dir", default=None,
                      help="folder with the .npz arrays (default: $IBAU_DATA_DIR, then "
                           "tensorflow-datasets / download)")
  parser.add_argument("--workdir", default=None,
                      help=f"output folder (default: runs/{dataset}_<preset>)")
  parser.add_argument("--model-dir", default=None,
                      help="cache of trained models, shareable between sweeps (default: "
                           "<workdir>/models)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)
  try:
    config = config_from_args(dataset, args)
  except ValueError as e:
    parser.error(str(e))
  workdir = pathlib.Path(args.workdir or f"runs/{dataset}_{args.preset}")
  try:
    cells = run(config, workdir, data_dir=args.data_dir, progress=not args.no_progress,
                model_dir=args.model_dir)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print()
  print(markdown_table(cells))
  print(f"results in {workdir}/ (results.json, results.csv, results.md, plots/)")
  return 0
