"""Flax models, picked by name: ``get_model("small_vgg16", num_classes=10)``."""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import numpy as np

from ibau_jax.models.resnet import PreActResNet18
from ibau_jax.models.vgg import SmallVGG16

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "small_vgg16": SmallVGG16,
    "preact_resnet18": PreActResNet18,
}


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
  """Adds ``factory(num_classes=..., **kwargs) -> nn.Module`` under ``name``."""
  _REGISTRY[name] = factory


def model_names() -> list[str]:
  return sorted(_REGISTRY)


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Returns the Flax module registered as ``name`` with ``num_classes`` outputs.

  Args:
    name: a registered name (:func:`model_names`).
    num_classes: an integer >= 2 (a Python or numpy integer; not a float or a bool).
    **kwargs: further fields of the model (e.g. ``widths``), checked by the model.

  Raises:
    ValueError: for an unknown name or any other ``num_classes``.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; known models: {model_names()}")
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
      or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
  return _REGISTRY[name](num_classes=int(num_classes), **kwargs)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("train",))
def _init(model: nn.Module, rngs, images: jax.Array, train: bool):
  return model.init(rngs, images, train=train)


def init_variables(model: nn.Module, rngs, images, train: bool = False):
  """``model.init(rngs, images, train=train)`` as one compiled program per model and shape.

  The same arrays, bit for bit, as the eager call, which compiles every initializer of
  every parameter shape on its own: on CPU the jitted version takes about two thirds of the
  time for the first call (e.g. small-VGG16) and none for later calls with the same model.
  ``model`` must be hashable (Flax modules are).
  """
  return _init(model, rngs, jax.numpy.asarray(images), train=train)
