"""Baseline defenses: registry, shared input checks, and each defense against a hand computation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ibau_jax import defenses
from test_ibau import _data, _variables, apply_fn


def test_registry():
  assert set(defenses.defense_names()) >= {"ft", "ibau", "nc", "tabor", "fp", "nad"}
  fn, cls = defenses.get_defense("ft")
  assert fn is defenses.fine_tune and cls is defenses.FTConfig
  for name in defenses.defense_names():
    fn, cls = defenses.get_defense(name)
    assert callable(fn) and dataclasses.is_dataclass(cls) and "callback" in {
        f.name for f in dataclasses.fields(cls)}
  with pytest.raises(ValueError, match="unknown defense 'nope'"):
    defenses.get_defense("nope")


def test_fine_tune_equals_hand_written_sgd_with_momentum_and_weight_decay():
  variables = _variables()
  x, y = _data(24)
  config = defenses.FTConfig(epochs=2, batch_size=8, learning_rate=0.05, momentum=0.9,
                             weight_decay=0.01)
  key = jax.random.PRNGKey(3)
  seen = []
  result = defenses.fine_tune(apply_fn, variables, x, y,
                              config.replace(callback=lambda e, s, v: seen.append(e)), key=key)
  # By hand: p ← p − lr·m,  m ← μ m + (∇CE + λ p), batches from permutation(fold_in(key, e)).
  params = jax.tree_util.tree_map(np.asarray, variables["params"])
  rest = {"batch_stats": variables["batch_stats"]}
  momentum = jax.tree_util.tree_map(np.zeros_like, params)
  for epoch in range(2):
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), 24))
    for i in range(3):
      idx = order[i * 8:(i + 1) * 8]
      grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
          apply_fn({"params": p, **rest}, jnp.asarray(x[idx])), y[idx]).mean())(params)
      momentum = jax.tree_util.tree_map(lambda m, g, p: 0.9 * m + np.asarray(g) + 0.01 * p,
                                        momentum, grads, params)
      params = jax.tree_util.tree_map(lambda p, m: p - 0.05 * m, params, momentum)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         result.variables["params"], params)
  assert seen == [0, 1] and [h["epoch"] for h in result.history] == [0, 1]
  # Other collections pass through untouched.
  jax.tree_util.tree_map(np.testing.assert_array_equal, result.variables["batch_stats"],
                         variables["batch_stats"])
  # Zero learning rate: nothing moves.
  same = defenses.fine_tune(apply_fn, variables, x, y, config.replace(learning_rate=0.0),
                            key=key)
  jax.tree_util.tree_map(np.testing.assert_array_equal, same.variables["params"],
                         variables["params"])


@pytest.mark.parametrize("change,match", [
    (dict(images=np.full((24, 6, 6, 3), 2.0, np.float32)), r"\[0, 1\]"),
    (dict(labels=np.zeros(24, np.int32)), "single class"),
    (dict(images=np.zeros((4, 6, 6, 3), np.float32), labels=np.arange(4) % 3), "batch"),
])
def test_fine_tune_rejects_bad_input(change, match):
  x, y = _data(24)
  kwargs = {"images": x, "labels": y, **change}
  with pytest.raises(ValueError, match=match):
    defenses.fine_tune(apply_fn, _variables(), kwargs["images"], kwargs["labels"],
                       defenses.FTConfig(batch_size=8), key=jax.random.PRNGKey(0))


def test_ft_config_validation():
  with pytest.raises(ValueError, match="epochs"):
    defenses.FTConfig(epochs=0)
  with pytest.raises(ValueError, match="momentum"):
    defenses.FTConfig(momentum=1.5)
