"""Flax models, picked by name: ``get_model("small_vgg16", num_classes=10)``."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn

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
  """Returns the Flax module registered as ``name`` with ``num_classes`` outputs."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; known models: {model_names()}")
  if int(num_classes) < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  return _REGISTRY[name](num_classes=int(num_classes), **kwargs)
