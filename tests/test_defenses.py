"""Baseline defenses: registry, shared input checks, and each defense against a hand computation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict

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


@pytest.mark.parametrize("name", ["ft", "fp", "nad", "anp", "nc", "tabor", "deepinspect", "dp",
                                  "ibau"])
def test_every_defense_checks_its_key_first(name):
  fn, _ = defenses.get_defense(name)
  x, y = _data(24)
  with pytest.raises(ValueError, match="key must be a PRNG key"):
    fn(apply_fn, _variables(), x, y, None, key=0)


def test_ft_config_validation():
  with pytest.raises(ValueError, match="epochs"):
    defenses.FTConfig(epochs=0)
  with pytest.raises(ValueError, match="momentum"):
    defenses.FTConfig(momentum=1.5)


@pytest.mark.parametrize("change,match", [
    (dict(learning_rate="0.01"), r"^FTConfig.learning_rate must be a finite number >= 0, "
                                 r"got '0.01'$"),
    (dict(learning_rate=True), r"^FTConfig.learning_rate must be .*, got True$"),
    (dict(learning_rate=float("inf")), r"^FTConfig.learning_rate must be .*, got inf$"),
    (dict(momentum=None), r"^FTConfig.momentum must be a finite number in \[0, 1\), got None$"),
    (dict(weight_decay=float("inf")), r"^FTConfig.weight_decay must be .*, got inf$"),
    (dict(callback="print"), r"^FTConfig.callback must be callable or None, got 'print'$"),
])
def test_ft_config_rejects_wrong_types_infinities_and_non_callables(change, match):
  with pytest.raises(ValueError, match=match):
    defenses.FTConfig(**change)
  # Numpy numbers are numbers.
  defenses.FTConfig(learning_rate=np.float32(0.01), momentum=np.float64(0.9), weight_decay=0)


def test_fine_tune_returns_the_callers_container_type():
  variables = _variables()
  x, y = _data(16)
  config = defenses.FTConfig(epochs=1, batch_size=8)
  key = jax.random.PRNGKey(0)
  frozen = FrozenDict(variables)
  seen = []
  result = defenses.fine_tune(apply_fn, frozen, x, y,
                              config.replace(callback=lambda e, s, v: seen.append(v)), key=key)
  assert type(result.variables) is FrozenDict and type(seen[0]) is FrozenDict
  assert (jax.tree_util.tree_structure(result.variables)
          == jax.tree_util.tree_structure(frozen))
  # The same numbers as with a plain dict, which stays a plain dict.
  plain = defenses.fine_tune(apply_fn, variables, x, y, config, key=key)
  assert type(plain.variables) is dict
  for a, b in zip(jax.tree_util.tree_leaves(result.variables),
                  jax.tree_util.tree_leaves(plain.variables), strict=True):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------
# Checks every baseline defense shares
# ----------------------------------------------------------------------------------------

BASELINES = [n for n in defenses.defense_names() if n != "ibau"]
# Small settings (batches of 8) with which each defense would start working at once.
_SMALL = {"ft": dict(epochs=1, batch_size=8), "fp": dict(epochs=0, batch_size=8),
          "nad": dict(teacher_epochs=1, epochs=1, batch_size=8),
          "nc": dict(steps=2, log_every=1, batch_size=8),
          "tabor": dict(steps=2, log_every=1, batch_size=8),
          "anp": dict(iterations=2, log_every=1, batch_size=8),
          "dp": dict(epochs=1, batch_size=8),
          "deepinspect": dict(batch_size=8, inversion_steps=1, generator_steps=1)}
_TASK = {"ft": "fine-tuning", "fp": "Fine-Pruning", "nad": "NAD", "nc": "Neural Cleanse",
         "tabor": "TABOR", "anp": "ANP", "dp": "DP-SGD training", "deepinspect": "DeepInspect"}


@pytest.mark.parametrize("container", [dict, FrozenDict])
@pytest.mark.parametrize("collection,value", [("params", np.nan), ("batch_stats", np.inf)])
@pytest.mark.parametrize("name", BASELINES)
def test_non_finite_variables_are_refused_before_any_work(name, collection, value, container):
  fn, cls = defenses.get_defense(name)
  variables = _variables()
  leaves, treedef = jax.tree_util.tree_flatten(variables[collection])
  leaves[-1] = np.asarray(leaves[-1]).copy()
  leaves[-1].reshape(-1)[0] = value
  variables = container({**variables,
                         collection: jax.tree_util.tree_unflatten(treedef, leaves)})
  concrete, seen = [], []

  def counting_apply(v, im):  # records every call on real (not abstract) images
    concrete.append(not isinstance(im, jax.core.Tracer))
    return apply_fn(v, im)

  x, y = _data(16)
  config = cls(**_SMALL[name], callback=lambda *args: seen.append(args))
  with pytest.raises(ValueError, match=rf"^variables\['{collection}'\]\[.*\] contains NaN or "
                                       rf"infinite values \(1 of \d+\); {_TASK[name]} needs a "
                                       "model with finite parameters"):
    fn(counting_apply, variables, x, y, config, key=jax.random.PRNGKey(0))
  assert not any(concrete) and seen == []


@pytest.mark.parametrize("name", BASELINES)
def test_config_none_means_the_defaults_and_another_class_is_refused(name):
  fn, cls = defenses.get_defense(name)
  x, y = _data(6)  # fewer images than any default batch
  with pytest.raises(ValueError, match=rf"fewer than one batch \(batch_size={cls().batch_size}\)"):
    fn(apply_fn, _variables(), x, y, None, key=jax.random.PRNGKey(0))
  other = defenses.FTConfig if cls is not defenses.FTConfig else defenses.get_defense("dp")[1]
  for wrong, got in ((other(), other.__name__), ("fast", "str")):
    with pytest.raises(ValueError, match=rf"^\w+: config must be an instance of {cls.__name__}"
                                         rf".* or None \(the defaults\), got {got}$"):
      fn(apply_fn, _variables(), x, y, wrong, key=jax.random.PRNGKey(0))
