"""``jax.random`` draws made with a flat shape and reshaped: the same numbers, compiled faster.

With partitionable Threefry (``jax_threefry_partitionable``, JAX's default), the bits of
element ``i`` of a draw depend only on the key and on ``i``'s position in row-major order,
so a draw of shape ``(a, b, c)`` holds exactly the numbers of the same draw of shape
``(a*b*c,)``, reshaped (the non-partitionable implementation also generates the bits flat;
``tests/test_prng.py`` checks both).  XLA:CPU compiles the multi-dimensional form much more
slowly: measured on this project's 2-core CPU, a ``(3, 3, 8, 16)`` normal draw took 4.0 s
to compile against 0.7 s flat, the Gaussian noise DP-SGD adds to six small-VGG parameter
leaves 9.8 s against 2.2 s, and ``init`` of a small-VGG16 of widths 4/8/8 16.2 s against
3.1 s.  The functions here take ``jax.random``'s arguments and return its values, bit for
bit; the library uses them (and :func:`lecun_normal`, :class:`Dropout`) wherever it draws
a multi-dimensional shape.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _flat(shape: Sequence[int]) -> tuple[int]:
  return (math.prod(int(d) for d in shape),)


def normal(key, shape=(), dtype=jnp.float32) -> jax.Array:
  """``jax.random.normal(key, shape, dtype)``."""
  return jax.random.normal(key, _flat(shape), dtype).reshape(shape)


def uniform(key, shape=(), dtype=jnp.float32, minval=0.0, maxval=1.0) -> jax.Array:
  """``jax.random.uniform(key, shape, dtype, minval, maxval)``."""
  return jax.random.uniform(key, _flat(shape), dtype, minval, maxval).reshape(shape)


def truncated_normal(key, lower, upper, shape=(), dtype=jnp.float32) -> jax.Array:
  """``jax.random.truncated_normal(key, lower, upper, shape, dtype)`` (scalar bounds)."""
  return jax.random.truncated_normal(key, lower, upper, _flat(shape), dtype).reshape(shape)


def bernoulli(key, p, shape=()) -> jax.Array:
  """``jax.random.bernoulli(key, p, shape)`` (scalar ``p``)."""
  return jax.random.bernoulli(key, p, _flat(shape)).reshape(shape)


def randint(key, shape, minval, maxval, dtype=jnp.int32) -> jax.Array:
  """``jax.random.randint(key, shape, minval, maxval, dtype)`` (scalar bounds)."""
  return jax.random.randint(key, _flat(shape), minval, maxval, dtype).reshape(shape)


def check_key(key, name: str = "key") -> None:
  """Raises a ``ValueError`` unless ``key`` is one PRNG key: a typed key array of shape ()
  (``jax.random.key(seed)``) or a raw ``uint32`` array of shape (2,)
  (``jax.random.PRNGKey(seed)``).

  Args:
    key: what the caller passed.
    name: the argument's name, for the message.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
  if isinstance(key, (jax.Array, np.ndarray)):
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
      return
    if dtype == np.uint32 and shape == (2,):
      return
  got = f"{type(key).__name__} {dtype} {shape}" if dtype is not None else repr(key)
  raise ValueError(f"{name} must be a PRNG key, jax.random.key(seed) or "
                   f"jax.random.PRNGKey(seed); got {got}")


def lecun_normal():
  """Flax's default kernel initializer, ``nn.initializers.lecun_normal()``, drawn flat.

  ``w ~ N(0, 1/fan_in)`` truncated to two standard deviations (and rescaled so that the
  variance stays ``1/fan_in``), with ``fan_in`` the product of every axis but the last
  (input channels times the receptive field of a convolution kernel ``(kh, kw, in, out)``).
  """

  def init(key, shape, dtype=jnp.float32):
    shape = tuple(int(d) for d in shape)
    fan_in = shape[-2] * math.prod(shape[:-2]) if len(shape) >= 2 else shape[0]
    variance = jnp.array(1.0 / fan_in, dtype=dtype)
    stddev = jnp.sqrt(variance) / jnp.array(.87962566103423978, dtype)
    return truncated_normal(key, -2, 2, shape, dtype) * stddev

  return init


class Dropout(nn.Dropout):
  """``nn.Dropout`` with its mask drawn flat: the same masks (the class keeps Flax's name,
  so modules get the same automatic names and random streams), compiled faster."""

  @nn.compact
  def __call__(self, inputs, deterministic=None, rng=None):
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep_prob = 1.0 - self.rate
    if rng is None:
      rng = self.make_rng(self.rng_collection)
    shape = list(inputs.shape)
    for dim in self.broadcast_dims:
      shape[dim] = 1
    mask = jnp.broadcast_to(bernoulli(rng, keep_prob, tuple(shape)), inputs.shape)
    return lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))
