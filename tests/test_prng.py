"""`ibau_jax._prng`: flat draws are `jax.random`'s draws, bit for bit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax import _prng
from ibau_jax import models

def _pairs(key, shape):
  return [
      (_prng.normal(key, shape), jax.random.normal(key, shape)),
      (_prng.uniform(key, shape, jnp.float16, -0.5, 2.0),
       jax.random.uniform(key, shape, jnp.float16, -0.5, 2.0)),
      (_prng.truncated_normal(key, -2, 2, shape), jax.random.truncated_normal(key, -2, 2, shape)),
      (_prng.bernoulli(key, 0.3, shape), jax.random.bernoulli(key, 0.3, shape)),
      (_prng.randint(key, shape, 0, 7), jax.random.randint(key, shape, 0, 7)),
  ]


@pytest.mark.parametrize("partitionable", [True, False])
def test_flat_draws_equal_jax_random(partitionable):
  key = jax.random.PRNGKey(11)
  with jax.threefry_partitionable(partitionable):
    pairs = _pairs(key, (2, 3, 5))
    if partitionable:  # the default: also the edge shapes
      pairs += [(_prng.normal(key, s), jax.random.normal(key, s)) for s in ((), (0, 3), (3, 4))]
    for ours, theirs in pairs:
      assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
      np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  # Not a constant: different keys give different numbers.
  assert not np.array_equal(_prng.normal(key, (3, 4)), _prng.normal(jax.random.PRNGKey(12), (3, 4)))


@pytest.mark.parametrize("shape", [(3, 3, 3, 8), (1, 1, 4, 8), (128, 10), (7, 2)])
def test_lecun_normal_equals_flax_default_kernel_init(shape):
  key = jax.random.PRNGKey(3)
  ours = _prng.lecun_normal()(key, shape)
  theirs = nn.initializers.lecun_normal()(key, shape)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  fan_in = int(np.prod(shape[:-1]))
  if ours.size >= 500:  # variance 1/fan_in (truncation compensated)
    assert np.var(np.asarray(ours)) * fan_in == pytest.approx(1.0, rel=0.15)


class _TwoDropouts(nn.Module):
  cls: type

  @nn.compact
  def __call__(self, x):
    x = self.cls(0.3, deterministic=False)(x)
    x = self.cls(0.5, broadcast_dims=(1,), deterministic=False)(x)
    return self.cls(0.0, deterministic=False)(x)


def test_dropout_keeps_flax_names_and_masks():
  x = jnp.asarray(np.random.RandomState(0).rand(4, 6, 5).astype(np.float32)) + 1.0
  rngs = {"dropout": jax.random.PRNGKey(7)}
  ours = _TwoDropouts(_prng.Dropout).apply({}, x, rngs=rngs)
  theirs = _TwoDropouts(nn.Dropout).apply({}, x, rngs=rngs)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  assert 0.3 < np.mean(np.asarray(ours) == 0) < 0.9
  assert _prng.Dropout.__name__ == nn.Dropout.__name__
  np.testing.assert_array_equal(_prng.Dropout(0.5, deterministic=True).apply({}, x), x)


def test_models_initialise_and_drop_out_exactly_as_with_flax_defaults(monkeypatch):
  model = models.get_model("small_vgg16", 10, widths=(2,))  # one stage: 2 convs, BN, dropout
  x = jnp.asarray(np.random.RandomState(1).rand(2, 8, 8, 3).astype(np.float32))
  rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}

  def run():
    variables = jax.jit(lambda r, x: model.init(r, x))(rngs, x)
    out, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, rngs=rngs,
                                              mutable=["batch_stats"]))(variables, x)
    return variables, out

  calls = []

  def counted(name):
    original = getattr(_prng, name)
    return lambda *a, **k: calls.append(name) or original(*a, **k)

  def unused(*a, **k):
    raise AssertionError("a flat draw was used")

  for name in ("truncated_normal", "bernoulli"):
    monkeypatch.setattr(_prng, name, counted(name))
  ours = run()
  assert set(calls) == {"truncated_normal", "bernoulli"}  # the model draws through _prng
  monkeypatch.setattr(_prng, "lecun_normal", nn.initializers.lecun_normal)
  monkeypatch.setattr(_prng, "Dropout", nn.Dropout)
  for name in ("truncated_normal", "bernoulli"):
    monkeypatch.setattr(_prng, name, unused)
  theirs = run()
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), ours, theirs)


def test_check_key_takes_both_key_kinds_and_names_the_argument():
  _prng.check_key(jax.random.PRNGKey(0))
  _prng.check_key(jax.random.key(0))
  _prng.check_key(np.asarray(jax.random.PRNGKey(3)))
  for bad in (0, None, "seed", jax.random.split(jax.random.PRNGKey(0)), jax.random.key(0)[None],
              np.zeros(2, np.int32), np.zeros(3, np.uint32)):
    with pytest.raises(ValueError, match=r"^rng must be a PRNG key"):
      _prng.check_key(bad, "rng")
