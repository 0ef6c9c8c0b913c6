"""Convert PyTorch state dicts to Flax variables and back.

A PyTorch state dict (``name -> array``; here read from an ``.npz`` or given as a
mapping, never from a pickle) is mapped leaf by leaf onto the variables of
``get_model(arch, num_classes)``:

* ``Conv2d.weight`` ``(O, I, kh, kw)``  -> ``params/.../kernel`` ``(kh, kw, I, O)``;
* ``Linear.weight`` ``(out, in)``       -> ``params/.../kernel`` ``(in, out)``;
* ``*.bias``                            -> ``params/.../bias``;
* ``BatchNorm2d.weight`` / ``.bias``    -> ``params/.../scale`` / ``bias``;
* ``BatchNorm2d.running_mean`` / ``running_var`` -> ``batch_stats/.../mean`` / ``var``;
* ``num_batches_tracked`` is ignored.

PyTorch's ``Conv2d`` computes a cross-correlation, as ``flax.linen.Conv`` does, so
the kernel is only transposed, never flipped.  Both BatchNorm conventions evaluate
``(x - mean) / sqrt(var + eps) * scale + bias`` with the same (unbiased) running
variance, so the statistics are copied unchanged.

Module names per architecture:

* ``small_vgg16``: ``features.{8s+3j}`` <-> ``conv{s}_{j}``,
  ``features.{8s+3j+1}`` <-> ``bn{s}_{j}`` (the ``nn.Sequential`` indices of the
  official I-BAU code: each stage is conv, bn, elu, conv, bn, elu, pool, dropout),
  ``classifier`` <-> ``classifier``.  The Flax model flattens in PyTorch's
  ``(C, H, W)`` order, so the classifier needs no permutation.
* ``preact_resnet18`` (BackdoorBench / kuangliu key names): ``conv1``, ``bn``,
  ``linear`` keep their names, ``layer{i}.{b}.{bn1,conv1,bn2,conv2}`` <->
  ``layer{i}_{b}/...`` and ``layer{i}.{b}.shortcut.0`` <-> ``layer{i}_{b}/shortcut``.

A state dict saved from ``nn.DataParallel`` (every key prefixed ``module.``) is
accepted too.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np

from ibau_jax.models import get_model

Source = Union[str, os.PathLike, Mapping[str, Any]]

# Input shape used to build the expected variable tree (the released models and
# BackdoorBench's CIFAR/GTSRB models all take 32x32 RGB images).
_DEFAULT_INPUT_SHAPE = (1, 32, 32, 3)

_IGNORED_SUFFIXES = ("num_batches_tracked",)


def _vgg_module_name(flax_module: str) -> str:
  m = re.fullmatch(r"(conv|bn)(\d+)_(\d+)", flax_module)
  if m is None:
    return flax_module  # "classifier"
  kind, stage, j = m.group(1), int(m.group(2)), int(m.group(3))
  index = 8 * stage + 3 * j + (1 if kind == "bn" else 0)
  return f"features.{index}"


def _vgg_torch_module(path: tuple[str, ...]) -> str:
  if len(path) != 1:
    raise ValueError(f"unexpected small_vgg16 module path {'/'.join(path)!r}")
  return _vgg_module_name(path[0])


def _resnet_torch_module(path: tuple[str, ...]) -> str:
  parts = []
  for name in path:
    m = re.fullmatch(r"layer(\d+)_(\d+)", name)
    if m is not None:
      parts.append(f"layer{m.group(1)}.{m.group(2)}")
    elif name == "shortcut":
      parts.append("shortcut.0")
    else:
      parts.append(name)
  return ".".join(parts)


# arch -> function mapping a Flax module path (without the leaf name) to the
# PyTorch module prefix.
_MODULE_NAMERS: dict[str, Callable[[tuple[str, ...]], str]] = {
    "small_vgg16": _vgg_torch_module,
    "preact_resnet18": _resnet_torch_module,
}

# arch -> PyTorch key of the final linear weight (num_classes = its rows).
_CLASSIFIER_KEYS: dict[str, str] = {
    "small_vgg16": "classifier.weight",
    "preact_resnet18": "linear.weight",
}

_LEAF_NAMES: dict[tuple[str, str], str] = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def supported_archs() -> list[str]:
  """Architectures whose PyTorch key names this module knows."""
  return sorted(_MODULE_NAMERS)


def _check_arch(arch: str) -> None:
  if arch not in _MODULE_NAMERS:
    raise ValueError(f"no PyTorch key mapping for arch {arch!r}; "
                     f"supported: {supported_archs()}")


def _torch_key(arch: str, collection: str, path: tuple[str, ...]) -> str:
  """PyTorch state-dict key of the Flax leaf ``variables[collection][path...]``."""
  leaf = _LEAF_NAMES.get((collection, path[-1]))
  if leaf is None:
    raise ValueError(f"cannot map Flax variable {collection}/{'/'.join(path)} "
                     "to a PyTorch key")
  return f"{_MODULE_NAMERS[arch](path[:-1])}.{leaf}"


def _to_torch_layout(flax_value: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and flax_value.ndim == 4:  # (kh, kw, I, O) -> (O, I, kh, kw)
    return np.transpose(flax_value, (3, 2, 0, 1))
  if leaf == "kernel" and flax_value.ndim == 2:  # (in, out) -> (out, in)
    return np.transpose(flax_value)
  return flax_value


def _to_flax_layout(torch_value: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and torch_value.ndim == 4:  # (O, I, kh, kw) -> (kh, kw, I, O)
    return np.transpose(torch_value, (2, 3, 1, 0))
  if leaf == "kernel" and torch_value.ndim == 2:  # (out, in) -> (in, out)
    return np.transpose(torch_value)
  return torch_value


def _torch_shape(flax_shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  if leaf == "kernel" and len(flax_shape) == 4:
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  if leaf == "kernel" and len(flax_shape) == 2:
    return (flax_shape[1], flax_shape[0])
  return tuple(flax_shape)


def _flat_leaves(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
                 ) -> list[tuple[tuple[str, ...], Any]]:
  """``[(path, leaf), ...]`` of a nested dict, in sorted key order."""
  out = []
  for key in sorted(tree):
    value = tree[key]
    if isinstance(value, Mapping):
      out.extend(_flat_leaves(value, prefix + (key,)))
    else:
      out.append((prefix + (key,), value))
  return out


def _set_in(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _read_state(source: Source) -> dict[str, np.ndarray]:
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if not os.path.isfile(path):
      raise ValueError(f"state-dict file not found: {path!r}")
    archive = np.load(path, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
      raise ValueError(f"{path!r} holds a single array, not an .npz state dict")
    with archive:
      state = {k: np.asarray(archive[k]) for k in archive.files}
  elif isinstance(source, Mapping):
    state = {}
    for k, v in source.items():
      if not isinstance(k, str):
        raise ValueError(f"state-dict keys must be strings, got {k!r}")
      state[k] = np.asarray(v)
  else:
    raise ValueError("source must be a path to an .npz file or a mapping of "
                     f"name -> array, got {type(source).__name__}")
  if not state:
    raise ValueError("the state dict is empty")
  if all(k.startswith("module.") for k in state):  # saved from nn.DataParallel
    state = {k[len("module."):]: v for k, v in state.items()}
  return {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}


def _expected_variables(arch: str, num_classes: int,
                        input_shape: tuple[int, ...]) -> dict:
  model = get_model(arch, num_classes)
  x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  return jax.eval_shape(lambda inp: model.init(jax.random.PRNGKey(0), inp, train=False),
                        x)


def load_torch_state(source: Source, arch: str = "small_vgg16",
                     num_classes: int | None = None, *,
                     input_shape: tuple[int, ...] = _DEFAULT_INPUT_SHAPE
                     ) -> dict[str, Any]:
  """Flax variables ``{"params": ..., "batch_stats": ...}`` from a PyTorch state dict.

  The result has exactly the tree structure, shapes and dtypes of
  ``get_model(arch, num_classes).init(key, zeros(input_shape))``; the layout
  conversions are listed in the module docstring.

  Args:
    source: path to an ``.npz`` holding the state dict, or a mapping
      ``torch key -> array``.
    arch: model name (see :func:`supported_archs`).
    num_classes: number of classes; ``None`` reads it from the rows of the final
      linear weight (``classifier.weight`` / ``linear.weight``).
    input_shape: NHWC input shape used to size the model (32x32 RGB by default;
      it fixes the small VGG16's classifier width).

  Returns:
    The variables, as ``jax.Array`` leaves.

  Raises:
    ValueError: unknown arch, missing or unexpected keys, or a shape mismatch
      (the message names the PyTorch key).
  """
  _check_arch(arch)
  state = _read_state(source)
  if num_classes is None:
    classifier_key = _CLASSIFIER_KEYS[arch]
    if classifier_key not in state:
      raise ValueError(f"cannot infer num_classes: key {classifier_key!r} is missing")
    if state[classifier_key].ndim != 2:
      raise ValueError(f"{classifier_key!r} must be 2-D (out, in), got shape "
                       f"{state[classifier_key].shape}")
    num_classes = int(state[classifier_key].shape[0])
  expected = _expected_variables(arch, num_classes, input_shape)

  plan = []  # (collection, path, torch_key, expected ShapeDtypeStruct)
  for collection in sorted(expected):
    for path, leaf in _flat_leaves(expected[collection]):
      plan.append((collection, path, _torch_key(arch, collection, path), leaf))

  wanted = {key for _, _, key, _ in plan}
  missing = sorted(wanted - set(state))
  unexpected = sorted(set(state) - wanted)
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing keys {missing}")
    if unexpected:
      parts.append(f"unexpected keys {unexpected}")
    raise ValueError(f"state dict does not match {arch} with {num_classes} classes: "
                     + "; ".join(parts))

  mismatches = []
  for _, path, key, leaf in plan:
    want = _torch_shape(leaf.shape, path[-1])
    if tuple(state[key].shape) != want:
      mismatches.append(f"{key!r}: got {tuple(state[key].shape)}, expected {want}")
  if mismatches:
    raise ValueError(f"shape mismatch for {'; '.join(mismatches)} (PyTorch layout, "
                     f"{arch} with {num_classes} classes)")

  variables: dict[str, Any] = {}
  for collection, path, key, leaf in plan:
    value = state[key]
    if not (np.issubdtype(value.dtype, np.floating)
            or np.issubdtype(value.dtype, np.integer)):
      raise ValueError(f"{key!r} has non-numeric dtype {value.dtype}")
    converted = _to_flax_layout(value, path[-1]).astype(leaf.dtype)
    _set_in(variables.setdefault(collection, {}), path, jnp.asarray(converted))
  return variables


def export_torch_state(variables: Mapping[str, Any], arch: str = "small_vgg16"
                       ) -> dict[str, np.ndarray]:
  """PyTorch state dict (``torch key -> np.ndarray``) of Flax ``variables``.

  The inverse of :func:`load_torch_state`: ``load_torch_state(export_torch_state(v,
  arch), arch)`` reproduces ``v``.  Kernels are transposed back to PyTorch layout;
  ``num_batches_tracked`` is not written (``load_state_dict(strict=False)`` or
  adding ``torch.tensor(0)`` entries restores it on the PyTorch side).

  Raises:
    ValueError: unknown arch, or a collection / leaf with no PyTorch counterpart.
  """
  _check_arch(arch)
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError("variables must be a mapping with a 'params' collection")
  unknown = sorted(set(variables) - {"params", "batch_stats"})
  if unknown:
    raise ValueError(f"collections {unknown} have no PyTorch counterpart")
  state: dict[str, np.ndarray] = {}
  for collection in sorted(variables):
    for path, value in _flat_leaves(variables[collection]):
      key = _torch_key(arch, collection, path)
      if key in state:
        raise ValueError(f"two Flax variables map to the PyTorch key {key!r}")
      state[key] = np.ascontiguousarray(_to_torch_layout(np.asarray(value), path[-1]))
  return state
