"""Reading and editing inner layers of a Flax linen model behind an opaque ``apply_fn``.

Several defenses need a layer's activations (Fine-Pruning ranks channels by their mean
activation, NAD matches attention maps, ANP masks neurons) while the public call shape gives
them only ``apply_fn(variables, images) -> logits``.  For Flax linen models this module gets
at the layers anyway: it runs ``apply_fn`` under :func:`flax.linen.intercept_methods`, which
sees every submodule call made during the run (also inside ``jax.jit``), so any linen model
works without changes.  A layer is named by its module path joined with ``"/"`` (for
:class:`~ibau_jax.models.vgg.SmallVGG16`: ``"conv2_1"``, ``"bn2_1"``, ``"classifier"``; for a
nested module ``"block3/conv1"``).  Functions that are not Flax linen models have no layers
here: asking for one raises ``ValueError``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any


def _path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.path)


def list_layers(apply_fn: Callable, variables: PyTree, images: jax.Array
                ) -> list[tuple[str, str, tuple[int, ...]]]:
  """``[(name, module class name, output shape), ...]`` of every submodule ``__call__`` made
  by ``apply_fn(variables, images)``, in call order (shapes from an abstract evaluation; no
  computation)."""
  seen: list[tuple[str, str, tuple[int, ...]]] = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and context.module.path:
      shape = tuple(getattr(out, "shape", ()))
      seen.append((_path(context.module), type(context.module).__name__, shape))
    return out

  def run(v, x):
    with nn.intercept_methods(interceptor):
      return apply_fn(v, x)

  jax.eval_shape(run, variables, images)
  return seen


def last_layer_of_type(apply_fn: Callable, variables: PyTree, images: jax.Array,
                       kind: str = "Conv") -> str:
  """Name of the last layer whose module class is ``kind`` (e.g. the last convolution,
  Fine-Pruning's default).  ``ValueError`` if there is none."""
  names = [name for name, k, _ in list_layers(apply_fn, variables, images) if k == kind]
  if not names:
    raise ValueError(f"the model has no {kind} layer (layers are found only in Flax linen "
                     "models; see ibau_jax.defenses.layers)")
  return names[-1]


def apply_with_layers(apply_fn: Callable, variables: PyTree, images: jax.Array, *,
                      capture: Sequence[str] = (),
                      modify: Optional[Mapping[str, Callable[[jax.Array], jax.Array]]] = None
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``apply_fn(variables, images)`` with chosen layers' outputs replaced and/or recorded.

  For every layer ``name`` in ``modify``, its output ``a`` is replaced by
  ``modify[name](a)`` before the rest of the network sees it; every layer in ``capture`` has
  its (possibly modified) output returned.  Pure and traceable: use it inside ``jax.jit`` and
  ``jax.grad`` (gradients flow through the captured activations and the modifications).

  Returns:
    ``(logits, {name: activation})``.

  Raises:
    ValueError: a named layer was not called during the run (not a Flax linen model, or a
      wrong name; the message lists the names that exist).
  """
  modify = dict(modify or {})
  wanted = set(capture) | set(modify)
  found: dict[str, jax.Array] = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__" or not context.module.path:
      return out
    name = _path(context.module)
    if name in modify:
      out = modify[name](out)
    if name in wanted:
      found[name] = out
    return out

  with nn.intercept_methods(interceptor):
    logits = apply_fn(variables, images)
  missing = wanted - set(found)
  if missing:
    names = [n for n, _, _ in list_layers(apply_fn, variables, images)]
    raise ValueError(f"layers {sorted(missing)} were not called by apply_fn; its layers are "
                     f"{names} (layers are found only in Flax linen models)")
  return logits, {name: found[name] for name in capture}


def channel_mask(mask: jax.Array) -> Callable[[jax.Array], jax.Array]:
  """A ``modify`` function multiplying the last (channel) axis by ``mask`` (shape ``(C,)``)."""
  mask = jnp.asarray(mask)

  def apply(a: jax.Array) -> jax.Array:
    if a.shape[-1] != mask.shape[0]:
      raise ValueError(f"mask has {mask.shape[0]} channels, the layer output has shape "
                       f"{a.shape}")
    return a * mask.astype(a.dtype)

  return apply
