"""`ibau_jax.unlearn`: the hypergradient wiring, compilation, determinism and bad input."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import ibau_jax
from ibau_jax import ibau

from _interrupt import interrupt, recording, saved_step
from _layers import Conv, Dense

H = W = 6
CLASSES = 3


class TinyNet(nn.Module):
  """Conv -> BatchNorm -> tanh -> Dense: small enough to form Hessians explicitly."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Conv(2, (3, 3), padding=1)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = jnp.tanh(x)
    return Dense(CLASSES)(x.reshape((x.shape[0], -1)))


MODEL = TinyNet()


def apply_fn(variables, x):
  return MODEL.apply(variables, x)


def _variables(seed=0):
  v = MODEL.init(jax.random.PRNGKey(seed), jnp.zeros((1, H, W, 3)))
  # Non-trivial BatchNorm statistics, so pass-through is observable.
  stats = jax.tree_util.tree_map(lambda s: s + 0.1, v["batch_stats"])
  return {"params": v["params"], "batch_stats": stats}


def _data(n=24, seed=0):
  rng = np.random.RandomState(seed)
  return rng.rand(n, H, W, 3).astype(np.float32), (np.arange(n) % CLASSES).astype(np.int32)


SMALL = ibau_jax.IBAUConfig(rounds=2, batch_size=8)


# ----------------------------------------------------------------------------------------
# The hypergradient of one outer step against an explicit-Hessian computation
# ----------------------------------------------------------------------------------------


def _brute_force(config, params, rest, delta, x, y, mask, xin, yin, neumann_k=None):
  """g = ∇_θL_out − ∇²_θδ L_in (∇²_δδ L_in)⁻¹ ∇_δ L_out from dense matrices (float64), or with
  K Neumann terms  (∂_θΦ)ᵀ Σ_{j<K} (∂_δΦᵀ)^j ∇_δ L_out."""
  flat_p, unravel = ravel_pytree(params)
  d_shape = delta.shape

  def logits_fn(p, img):
    return apply_fn({"params": p, **rest}, img)

  def l_in(d_flat, p_flat):
    return ibau._inner_loss(config, logits_fn, d_flat.reshape(d_shape), unravel(p_flat), xin,
                            yin)

  def l_out(d_flat, p_flat):
    return ibau._outer_loss(config, logits_fn, d_flat.reshape(d_shape), unravel(p_flat), x, y,
                            mask)

  d_flat = delta.reshape(-1)
  # (Each derivative compiled as one program: op by op it compiles hundreds.)
  g_d, g_p = jax.jit(jax.grad(l_out, argnums=(0, 1)))(d_flat, flat_p)
  h_dd = np.asarray(jax.jit(jax.hessian(l_in, argnums=0))(d_flat, flat_p), np.float64)
  h_pd = np.asarray(jax.jit(jax.jacobian(jax.grad(l_in, argnums=0), argnums=1))(d_flat, flat_p),
                    np.float64)  # shape (δ, θ): ∂_θ ∇_δ L_in
  g_d, g_p = np.asarray(g_d, np.float64), np.asarray(g_p, np.float64)
  if neumann_k is None:
    return g_p - h_pd.T @ np.linalg.solve(h_dd, g_d)
  eta = config.fixed_point_lr
  jac_d = np.eye(h_dd.shape[0]) - eta * h_dd
  v = np.zeros_like(g_d)
  for _ in range(neumann_k):
    v = jac_d.T @ v + g_d
  return g_p + (-eta * h_pd).T @ v


def _one_step_inputs(seed=0):
  variables = _variables(seed)
  x, y = _data(8, seed)
  xin, yin = _data(8, seed + 100)
  delta = jnp.asarray(np.random.RandomState(seed).randn(H, W, 3).astype(np.float32) * 0.1)
  mask = jnp.asarray([1.0, 0, 0, 1.0, 0, 0, 0, 0])
  rest = {"batch_stats": variables["batch_stats"]}
  return variables["params"], rest, delta, x, y, mask, xin, yin


@pytest.mark.parametrize("solver,iterations", [("cg", 200), ("neumann", 5)])
def test_step_hypergradient_matches_explicit_hessians(solver, iterations):
  # A strong ridge (λ = 2) makes ∇²_δδ L_in positive definite, so CG converges to the exact
  # solve and the Neumann series (η = 0.1) contracts.
  config = ibau_jax.IBAUConfig(inner_reg=2.0, fixed_point_lr=0.1, clamp=False, solver=solver,
                               solver_iterations=iterations, solver_tol=1e-12)
  params, rest, delta, x, y, mask, xin, yin = _one_step_inputs()
  logits_fn = lambda p, img: apply_fn({"params": p, **rest}, img)
  _, grads, residual = jax.jit(lambda p: ibau.hypergradient(
      config, logits_fn, p, delta, x, y, mask, xin, yin))(params)
  expected = _brute_force(config, params, rest, delta, x, y, mask, xin, yin,
                          neumann_k=iterations if solver == "neumann" else None)
  got = np.asarray(ravel_pytree(grads)[0], np.float64)
  np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-5)
  # The implicit term matters: without it the gradient is visibly different.
  direct = np.asarray(ravel_pytree(jax.jit(jax.grad(
      lambda p: ibau._outer_loss(config, logits_fn, delta, p, x, y, mask)))(params))[0])
  assert np.linalg.norm(direct - expected) > 10 * np.linalg.norm(got - expected)
  if solver == "cg":
    assert float(residual) < 1e-3


def _brute_force_projected(config, params, rest, delta, x, y, mask, xin, yin, neumann_k=None):
  """The same for Φ = Π_C(δ − η∇_δL_in), with the projection's Jacobian written out:
  at z = δ − η∇_δL_in with ‖z‖ > C, ∂Π_C(z) = (C/‖z‖)(I − ẑẑᵀ)."""
  flat_p, unravel = ravel_pytree(params)
  d_shape = delta.shape
  logits_fn = lambda p, img: apply_fn({"params": p, **rest}, img)
  l_in = lambda d, p: ibau._inner_loss(config, logits_fn, d.reshape(d_shape), unravel(p), xin,
                                       yin)
  l_out = lambda d, p: ibau._outer_loss(config, logits_fn, d.reshape(d_shape), unravel(p), x,
                                        y, mask)
  d_flat = delta.reshape(-1)
  eta, bound = config.fixed_point_lr, config.norm_bound
  z = np.asarray(d_flat - eta * jax.jit(jax.grad(l_in))(d_flat, flat_p), np.float64)
  assert np.linalg.norm(z) > bound, "the test needs the bound to be active"
  z_hat = z / np.linalg.norm(z)
  proj = bound / np.linalg.norm(z) * (np.eye(z.size) - np.outer(z_hat, z_hat))
  g_d, g_p = (np.asarray(g, np.float64)
              for g in jax.jit(jax.grad(l_out, argnums=(0, 1)))(d_flat, flat_p))
  h_dd = np.asarray(jax.jit(jax.hessian(l_in, argnums=0))(d_flat, flat_p), np.float64)
  h_pd = np.asarray(jax.jit(jax.jacobian(jax.grad(l_in, argnums=0), argnums=1))(d_flat, flat_p),
                    np.float64)
  jac_d = proj @ (np.eye(z.size) - eta * h_dd)
  jac_p = proj @ (-eta * h_pd)
  if neumann_k is None:
    v = np.linalg.solve((np.eye(z.size) - jac_d).T, g_d)
  else:
    v = np.zeros_like(g_d)
    for _ in range(neumann_k):
      v = jac_d.T @ v + g_d
  return g_p + jac_p.T @ v


@pytest.mark.parametrize("solver,iterations", [("normal_cg", 400), ("neumann", 5)])
def test_projected_fixed_point_hypergradient_matches_explicit_jacobians(solver, iterations):
  config = ibau_jax.IBAUConfig(inner_reg=2.0, fixed_point_lr=0.1, norm_bound=0.5,
                               fixed_point="projected", solver=solver,
                               solver_iterations=iterations, solver_tol=1e-12)
  params, rest, delta, x, y, mask, xin, yin = _one_step_inputs()
  logits_fn = lambda p, img: apply_fn({"params": p, **rest}, img)
  _, grads, _ = jax.jit(lambda p: ibau.hypergradient(
      config, logits_fn, p, delta, x, y, mask, xin, yin))(params)
  got = np.asarray(ravel_pytree(grads)[0], np.float64)
  k = iterations if solver == "neumann" else None
  expected = _brute_force_projected(config, params, rest, delta, x, y, mask, xin, yin, k)
  np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-5)
  # The projection changes the answer: the unprojected map's hypergradient is far from it.
  unprojected = _brute_force(config, params, rest, delta, x, y, mask, xin, yin, k)
  assert np.linalg.norm(unprojected - expected) > 10 * np.linalg.norm(got - expected)


def test_unperturbed_images_do_not_see_delta():
  """With an all-zero mask, L_out does not depend on δ: ∇_δ L_out = 0, no implicit term."""
  config = ibau_jax.IBAUConfig(clamp=False)
  params, rest, delta, x, y, _, xin, yin = _one_step_inputs(1)
  logits_fn = lambda p, img: apply_fn({"params": p, **rest}, img)
  mask = jnp.zeros((8,))
  _, grads, _ = ibau.hypergradient(config, logits_fn, params, delta, x, y, mask, xin, yin)
  direct = jax.grad(lambda p: ibau._cross_entropy(logits_fn(p, x), y))(params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         grads, direct)


# ----------------------------------------------------------------------------------------
# unlearn(): structure, determinism, compilation, jit vs no-jit
# ----------------------------------------------------------------------------------------


def test_unlearn_returns_same_structure_and_passes_other_collections_through():
  variables = _variables()
  x, y = _data()
  seen = []
  # (No repairs: the returned variables are the last round's.)
  config = SMALL.replace(callback=lambda r, stats, v: seen.append((r, stats, v)),
                         repair_epochs=0, warp_epochs=0)
  result = ibau_jax.unlearn(apply_fn, variables, x, y, config, key=jax.random.PRNGKey(0))
  assert (jax.tree_util.tree_structure(result.variables)
          == jax.tree_util.tree_structure(variables))
  jax.tree_util.tree_map(np.testing.assert_array_equal, result.variables["batch_stats"],
                         variables["batch_stats"])
  changed = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                   result.variables["params"], variables["params"])
  assert max(jax.tree_util.tree_leaves(changed)) > 0
  assert [h["round"] for h in result.history] == [0, 1]
  for h in result.history:
    assert set(h) == {"round", "inner_loss", "outer_loss", "delta_norm", "residual_mean",
                      "residual_max", "inner_choice", "candidate_scores",
                      "candidate_locality", "seconds"}
    assert len(h["candidate_scores"]) == len(h["candidate_locality"]) == 2  # default: 2 solvers
    assert all(0 < v <= 1 for v in h["candidate_locality"])
    assert 0 < h["delta_norm"] <= SMALL.norm_bound + 1e-4
    assert np.isfinite(h["outer_loss"]) and h["seconds"] > 0
  assert result.perturbation.shape == (H, W, 3)
  assert [r for r, _, _ in seen] == [0, 1]
  jax.tree_util.tree_map(np.testing.assert_array_equal, seen[-1][2], result.variables)


def test_unlearn_is_deterministic_for_a_key():
  variables = _variables()
  x, y = _data()
  a = ibau_jax.unlearn(apply_fn, variables, x, y, SMALL, key=jax.random.PRNGKey(3))
  b = ibau_jax.unlearn(apply_fn, variables, x, y, SMALL, key=jax.random.PRNGKey(3))
  c = ibau_jax.unlearn(apply_fn, variables, x, y, SMALL, key=jax.random.PRNGKey(4))
  jax.tree_util.tree_map(np.testing.assert_array_equal, a.variables, b.variables)
  diff = jax.tree_util.tree_map(lambda p, q: float(jnp.max(jnp.abs(p - q))),
                                a.variables["params"], c.variables["params"])
  assert max(jax.tree_util.tree_leaves(diff)) > 0


@pytest.mark.parametrize("select", ["last", "average"])
def test_an_interrupted_unlearn_resumes_after_its_last_saved_round(select, tmp_path):
  variables = _variables()
  x, y = _data()
  config = SMALL.replace(rounds=3, select=select, average_from=1 if select == "average" else 0)
  run = lambda c, k=5: ibau_jax.unlearn(apply_fn, variables, x, y, c, key=jax.random.PRNGKey(k))
  whole = run(config)
  saved = config.replace(checkpoint_dir=str(tmp_path))
  interrupt(run, saved, 1)
  path = tmp_path / ibau.CHECKPOINT_FILE
  assert saved_step(path) == 2
  resumed_config, seen = recording(saved)
  resumed = run(resumed_config)
  assert not path.exists()
  jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.variables, whole.variables)
  np.testing.assert_array_equal(resumed.perturbation, whole.perturbation)
  assert resumed.selected_round == whole.selected_round
  strip = lambda h: {k: v for k, v in h.items() if k not in ("seconds", "seconds_before")}
  assert [strip(h) for h in resumed.history] == [strip(h) for h in whole.history]
  # Rounds 0 and 1 are replayed without variables; round 2 runs.
  assert [(r, v is None, "seconds_before" in s) for r, s, v in seen] == [
      (0, True, True), (1, True, True), (2, False, False)]
  # Another key: the saved state is not used.
  interrupt(run, saved, 1)
  other_config, seen = recording(saved)
  run(other_config, 6)
  assert [v is None for _, _, v in seen] == [False, False, False]


def _scripted_stamp(monkeypatch, shares):
  """Makes the stamp check return ``shares`` in order (the first for the input model, with
  target 1); returns the list of the targets it was asked about, with the input model's
  ``(mask, pattern)`` before its target."""
  calls, answers = [], iter(shares)

  def fake(apply_fn_, variables, images, mask, pattern, target=None, batch_size=100):
    assert mask.shape == (H, W, 1) and pattern.shape == (H, W, 3)
    assert mask.sum() == np.ceil(ibau.LOCALITY_SHARE * H * W)
    if target is None:  # the input model's check: the stamp itself
      calls.append((np.asarray(mask), np.asarray(pattern)))
    calls.append(target)
    return 1, next(answers)

  monkeypatch.setattr(ibau.probe, "stamp_share", fake)
  return calls


def test_retries_rerun_a_round_the_stamp_check_flags_and_resume(monkeypatch, tmp_path):
  variables = _variables()
  x, y = _data()
  run = lambda c: ibau_jax.unlearn(apply_fn, variables, x, y, c, key=jax.random.PRNGKey(5))
  small = SMALL.replace(repair_epochs=0)  # the rounds only (the repair uses the stamp's target)
  plain = run(small)
  # No round flagged: the rounds are the plain ones, each with its share.
  calls = _scripted_stamp(monkeypatch, [1.0, 0.1, 0.2])
  checked = run(small.replace(retries=2))
  stamp = calls.pop(0)
  assert calls == [None, 1, 1]
  jax.tree_util.tree_map(np.testing.assert_array_equal, checked.variables, plain.variables)
  assert [(h["stamp_share"], h["retried"]) for h in checked.history] == [(0.1, []), (0.2, [])]
  assert {k: checked.stamp[k] for k in ("target", "share", "active")} == dict(
      target=1, share=1.0, active=True)
  # An input model the stamp does not move: nothing is checked.
  calls = _scripted_stamp(monkeypatch, [0.3])
  inactive = run(small.replace(retries=2))
  assert calls[1:] == [None] and not inactive.stamp["active"]
  assert all("stamp_share" not in h for h in inactive.history)
  jax.tree_util.tree_map(np.testing.assert_array_equal, inactive.variables, plain.variables)
  # Round 0 flagged once: it runs again with another key; round 1 is flagged with no
  # retries left, is kept, and the caller is warned.
  config = small.replace(retries=1)
  _scripted_stamp(monkeypatch, [1.0, 0.9, 0.1, 0.6])
  with pytest.warns(UserWarning, match="backdoor is likely still there"):
    retried = run(config)
  assert [h["stamp_share"] for h in retried.history] == [0.1, 0.6]
  assert [[d["stamp_share"] for d in h["retried"]] for h in retried.history] == [[0.9], []]
  diff = jax.tree_util.tree_map(lambda p, q: float(jnp.max(jnp.abs(p - q))),
                                retried.variables["params"], plain.variables["params"])
  assert max(jax.tree_util.tree_leaves(diff)) > 0
  # Interrupted after round 0 and resumed: the retry already spent is counted.
  _scripted_stamp(monkeypatch, [1.0, 0.9, 0.1])
  saved = config.replace(checkpoint_dir=str(tmp_path))
  interrupt(run, saved, 0)
  calls = _scripted_stamp(monkeypatch, [1.0, 0.6])
  with pytest.warns(UserWarning, match="backdoor"):
    resumed = run(saved)
  # The stamp is cut from the input model, not from the restored round.
  resumed_stamp = calls.pop(0)
  for a, b in zip(resumed_stamp, stamp):
    np.testing.assert_array_equal(a, b)
  assert calls == [None, 1]
  jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.variables, retried.variables)
  strip = lambda h: {k: v for k, v in h.items() if k not in (
      "seconds", "seconds_before", "stamp_seconds", "retried")}
  assert [strip(h) for h in resumed.history] == [strip(h) for h in retried.history]


def test_retries_with_the_real_stamp_check():
  variables = _variables()
  x, y = _data()
  result = ibau_jax.unlearn(apply_fn, variables, x, y, SMALL.replace(retries=1),
                            key=jax.random.PRNGKey(5))
  assert set(result.stamp) == {"target", "share", "active", "seconds"}
  assert 0 <= result.stamp["target"] < CLASSES and 0.0 <= result.stamp["share"] <= 1.0
  for h in result.history:
    assert ("stamp_share" in h) == result.stamp["active"]


@pytest.mark.parametrize("loop", ["scan", "python"])
def test_second_round_and_second_call_do_not_recompile(loop):
  variables = _variables()
  x, y = _data()
  # A configuration no other test compiles (its own optax object: numbers alone, being
  # arguments of the compiled steps, would not make it new).
  config = SMALL.replace(rounds=3, outer_optimizer=optax.adam(2e-3), loop=loop)
  before, rounds_before = ibau._compiled_programs(), ibau._round_scan_jit._cache_size()
  ibau_jax.unlearn(apply_fn, variables, x, y, config, key=jax.random.PRNGKey(0))
  after_first = ibau._compiled_programs()
  assert after_first > before
  # A second call: other data of the same shape, another key, another callback.
  x2, y2 = _data(seed=5)
  ibau_jax.unlearn(apply_fn, _variables(1), x2, y2, config.replace(callback=lambda *a: None),
                   key=jax.random.PRNGKey(9))
  assert ibau._compiled_programs() == after_first
  if loop == "scan":  # three rounds, one program (the stamp check compiles an inner step)
    assert ibau._round_scan_jit._cache_size() == rounds_before + 1


def test_scan_and_python_loops_give_the_same_result():
  variables = _variables()
  x, y = _data()
  a = ibau_jax.unlearn(apply_fn, variables, x, y, SMALL.replace(loop="scan"),
                       key=jax.random.PRNGKey(2))
  b = ibau_jax.unlearn(apply_fn, variables, x, y, SMALL.replace(loop="python"),
                       key=jax.random.PRNGKey(2))
  jax.tree_util.tree_map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-6),
                         a.variables, b.variables)
  for ha, hb in zip(a.history, b.history):
    for k in ("inner_loss", "outer_loss", "delta_norm", "residual_mean"):
      assert ha[k] == pytest.approx(hb[k], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("loop", ["scan", "python"])
def test_jit_equals_no_jit(loop):
  variables = _variables()
  x, y = _data(16)
  # The rounds' compiled steps (the repair after them is left out: op by op it is slow).
  config = ibau_jax.IBAUConfig(rounds=1, batch_size=8, solver_iterations=2, loop=loop,
                               repair_epochs=0)
  # The same structure with every number the compiled steps read changed (the candidate's
  # learning rate too): the numbers are arguments of the compiled programs, not constants.
  other = config.replace(inner_lr=5.0, inner_reg=0.01, norm_bound=3.0, fixed_point_lr=0.05,
                         outer_lr=3e-3, inner_candidates=(("normalized", 0.5, "step"),))
  results = []
  for c in (config, other):
    jitted = ibau_jax.unlearn(apply_fn, variables, x, y, c, key=jax.random.PRNGKey(1))
    with jax.disable_jit():
      eager = ibau_jax.unlearn(apply_fn, variables, x, y, c, key=jax.random.PRNGKey(1))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                           jitted.variables, eager.variables)
    np.testing.assert_allclose(jitted.perturbation, eager.perturbation, rtol=1e-4, atol=1e-5)
    results.append((jitted, ibau._compiled_programs()))
  (first, count), (second, count_other) = results
  assert count_other == count  # nothing compiled for the second set of numbers
  assert float(jnp.abs(first.perturbation - second.perturbation).max()) > 1e-3


def test_config_is_a_pytree_of_its_numbers():
  config = ibau_jax.IBAUConfig(inner_lr=4, norm_bound=None,
                               inner_refine=("sgd", 0.5, "end"), callback=print)
  leaves, treedef = jax.tree_util.tree_flatten(config)
  # inner_lr, inner_reg, fixed_point_lr, outer_lr (norm_bound None is no leaf), the
  # candidate's and the refine solver's learning rates.
  assert leaves == [4.0, 1e-3, 0.1, 1e-3, 2.0, 0.5]
  assert jax.tree_util.tree_unflatten(treedef, leaves) == config
  doubled = jax.tree_util.tree_map(lambda v: 2 * v, config)
  assert (doubled.inner_lr, doubled.inner_candidates, doubled.inner_refine) == (
      8.0, (("normalized", 4.0, "step"),), ("sgd", 1.0, "end"))
  assert doubled.callback is print and doubled.rounds == config.rounds
  # Only the numbers are leaves: another structure is another tree.
  assert jax.tree_util.tree_structure(config.replace(solver="cg")) != treedef


def test_official_preset_is_the_papers_code():
  cfg = ibau_jax.IBAUConfig.official()
  assert (cfg.rounds, cfg.batch_size, cfg.inner_epochs, cfg.inner_lr, cfg.inner_optimizer) == (
      1, 100, 1, 10.0, "sgd")
  assert (cfg.inner_reg, cfg.norm_bound, cfg.clamp, cfg.pseudo_labels) == (1e-3, 10.0, False, True)
  assert (cfg.perturbed_fraction, cfg.hypergrad_batch, cfg.fixed_point_lr) == (0.01, "first", 0.1)
  assert (cfg.solver, cfg.solver_iterations, cfg.outer_optimizer, cfg.outer_lr) == (
      "neumann", 5, "adam", 1e-3)
  assert (cfg.inner_candidates, cfg.inner_refine, cfg.retries) == ((), None, 0)
  assert ibau_jax.IBAUConfig.official(rounds=5).rounds == 5


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


def _call(images=None, labels=None, variables=None, config=SMALL):
  x, y = _data()
  return ibau_jax.unlearn(apply_fn, _variables() if variables is None else variables,
                          x if images is None else images, y if labels is None else labels,
                          config, key=jax.random.PRNGKey(0))


@pytest.mark.parametrize("kwargs,match", [
    (dict(images=np.zeros((24, H, W), np.float32)), "rank 4"),
    (dict(images=np.zeros((24, H, W, 3), np.uint8)), "floating point"),
    (dict(images=np.full((24, H, W, 3), 2.0, np.float32)), r"\[0, 1\]"),
    (dict(images=np.full((24, H, W, 3), -0.5, np.float32)), r"\[0, 1\]"),
    (dict(images=np.full((24, H, W, 3), np.nan, np.float32)), "NaN"),
    (dict(images=np.full((24, H, W, 3), np.inf, np.float32)), "NaN or infinite"),
    (dict(images=np.zeros((24, H + 1, W, 3), np.float32)), "apply_fn"),
    (dict(labels=np.zeros((23,), np.int32)), "shape"),
    (dict(labels=np.zeros((24,), np.float32)), "integers"),
    (dict(labels=np.full((24,), CLASSES, np.int32)), r"\[0, 3\)"),
    (dict(labels=np.full((24,), -1, np.int32)), r"\[0, 3\)"),
    (dict(labels=np.full((24,), 1, np.int32)), "single class"),
    (dict(images=np.zeros((4, H, W, 3), np.float32), labels=np.arange(4) % 3), "fewer"),
    (dict(images=np.zeros((0, H, W, 3), np.float32), labels=np.zeros((0,), np.int32)), "fewer"),
    (dict(variables={"batch_stats": {}}), "'params'"),
    (dict(variables=[1, 2]), "'params'"),
    (dict(config="official"), "IBAUConfig"),
])
def test_bad_input_raises_clear_value_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _call(**kwargs)


@pytest.mark.parametrize("field,value", [
    ("rounds", 0), ("batch_size", -1), ("batch_size", 2.5), ("inner_lr", 0.0),
    ("inner_lr", float("nan")), ("solver", "lu"), ("solver_iterations", -1),
    ("perturbed_fraction", 0.0), ("perturbed_fraction", 1.5), ("inner_optimizer", "lbfgs"),
    ("outer_optimizer", "rmsprop"), ("hypergrad_batch", "last"), ("norm_bound", -1.0),
    ("rounds", True), ("loop", "vmap"), ("fixed_point", "newton"), ("inner_projection", "never"),
    ("inner_candidates", (("lbfgs", 1.0, "end"),)), ("inner_candidates", (("sgd", -1.0, "end"),)),
    ("outer_lr_decay", 0.0), ("outer_lr_decay", 1.5),
    ("inner_refine", ("lbfgs", 1.0, "end")), ("inner_refine", ("sgd", 0.0, "step")),
    ("inner_refine", ("sgd", 1.0)), ("inner_use", "mean"), ("retries", -1), ("retries", 1.5),
    ("retry_share", 0.0), ("retry_share", 1.5), ("repair_epochs", -1), ("repair_epochs", 1.0),
    ("repair_window", 0), ("repair_fraction", 0.0), ("repair_fraction", 1.5),
    ("repair_lr", 0.0), ("repair_fit_steps", 0), ("repair_share", 0.0), ("repair_share", 2.0),
    ("warp_epochs", -1), ("warp_epochs", 2.0), ("warp_grid", 1), ("warp_bound", 0.0),
    ("warp_bound", float("inf")), ("warp_bound", "0.5"), ("warp_fit_steps", 0),
    ("warp_share", 0.0), ("warp_share", 1.5), ("callback", 3), ("progress", "bar"),
    # Bools must be real bools, not truthy strings or numbers.
    ("shuffle", "no"), ("pseudo_labels", "False"), ("clamp", "yes"), ("clamp", 1),
    # Numbers must be real numbers (not strings, bools or NaN) in their range.
    ("inner_reg", "0.001"), ("inner_reg", -1.0), ("inner_reg", float("nan")),
    ("norm_bound", "10"), ("norm_bound", float("inf")), ("norm_bound", True),
    ("perturbed_fraction", "0.5"), ("perturbed_fraction", float("nan")),
    ("solver_tol", -1.0), ("solver_tol", "x"), ("solver_tol", float("nan")),
    ("solver_iterations", True), ("solver_iterations", 2.0), ("inner_lr", "1"),
    ("outer_lr", True), ("fixed_point_lr", "0.1"), ("outer_lr_decay", "1"),
    ("probe_min_share", np.nan), ("retry_share", "0.5"), ("repair_fraction", True),
    ("repair_lr", "1e-4"), ("average_from", True), ("probe_bounds", ("1",)),
    ("probe_bounds", (True,)), ("inner_candidates", (("sgd", "1.0", "end"),)),
    ("inner_candidates", (("sgd", float("inf"), "end"),)), ("inner_refine", ("sgd", True, "end")),
])
def test_bad_config_raises(field, value):
  with pytest.raises(ValueError, match=field):
    ibau_jax.IBAUConfig(**{field: value})


def test_the_audits_bad_configs_raise_up_front():
  with pytest.raises(ValueError, match=r"IBAUConfig\.pseudo_labels must be a bool, got 'False'"):
    ibau_jax.IBAUConfig.official(batch_size=20, pseudo_labels="False")
  with pytest.raises(ValueError, match=r"IBAUConfig\.inner_reg must be a finite number >= 0, "
                     r"got '0\.001'"):
    ibau_jax.IBAUConfig.official(batch_size=20, inner_reg="0.001")
  with pytest.raises(ValueError, match=r"IBAUConfig\.perturbed_fraction must be a finite number "
                     r"in \(0, 1\], got '0\.5'"):
    ibau_jax.IBAUConfig.official(batch_size=20, perturbed_fraction="0.5")
  with pytest.raises(ValueError, match=r"IBAUConfig\.solver_tol must be a finite number >= 0, "
                     r"got -1\.0"):
    ibau_jax.IBAUConfig.official(batch_size=20, solver_tol=-1.0)
  with pytest.raises(ValueError, match=r"IBAUConfig\.solver_iterations must be an integer >= 0, "
                     r"got True"):
    ibau_jax.IBAUConfig.official(batch_size=20, solver_iterations=True)


_TYPED = [(f.name, f.type) for f in dataclasses.fields(ibau_jax.IBAUConfig)]


@pytest.mark.parametrize("field", [n for n, t in _TYPED if t == "bool"])
@pytest.mark.parametrize("value", ["False", "yes", 0, 1, None])
def test_every_bool_field_needs_a_real_bool(field, value):
  with pytest.raises(ValueError, match=rf"IBAUConfig\.{field} must be a bool"):
    ibau_jax.IBAUConfig(**{field: value})
  for good in (True, False, np.bool_(True)):
    assert getattr(ibau_jax.IBAUConfig(**{field: good}), field) == good


@pytest.mark.parametrize("field", [n for n, t in _TYPED if t in ("int", "float", "Optional[float]")])
@pytest.mark.parametrize("value", ["1", True, False, b"1", [1.0], None])
def test_every_number_field_needs_a_real_number(field, value):
  if value is None and field == "norm_bound":
    return  # None is no bound
  with pytest.raises(ValueError, match=rf"IBAUConfig\.{field} must be"):
    ibau_jax.IBAUConfig(**{field: value})


def test_numpy_numbers_bools_and_the_range_edges_are_accepted():
  config = ibau_jax.IBAUConfig(
      rounds=np.int64(2), clamp=np.bool_(True), inner_reg=0, solver_tol=0.0,
      solver_iterations=np.int32(3), perturbed_fraction=np.float32(0.5), outer_lr_decay=1,
      inner_lr=np.float32(2.0), inner_candidates=(("sgd", np.float32(1.0), "end"),),
      inner_refine=("normalized", np.int64(2), "step"), probe_bounds=(np.float64(1.0), 2),
      norm_bound=None)
  assert (config.rounds, config.solver_iterations, config.solver_tol) == (2, 3, 0.0)
  # The pytree leaves are still plain floats.
  leaves = jax.tree_util.tree_leaves(config)
  assert all(type(v) is float for v in leaves) and 1.0 in leaves and 2.0 in leaves


def test_a_checkpoint_dir_that_is_or_lies_under_a_file_raises(tmp_path):
  file = tmp_path / "taken"
  file.write_text("not a folder")
  for bad in (file, str(file), file / "sub", file / "sub" / "deeper"):
    with pytest.raises(ValueError, match=r"checkpoint_dir must be a folder.*is an existing file"):
      ibau_jax.IBAUConfig.official(batch_size=20, checkpoint_dir=bad)
  with pytest.raises(ValueError, match="checkpoint_dir must be a path or None"):
    ibau_jax.IBAUConfig(checkpoint_dir=3)
  with pytest.raises(ValueError, match="non-empty path"):
    ibau_jax.IBAUConfig(checkpoint_dir="")
  # An existing folder, and a path where one can be made, are fine; nothing is created.
  for good in (tmp_path, str(tmp_path / "new" / "nested")):
    assert ibau_jax.IBAUConfig(checkpoint_dir=good).checkpoint_dir == good
  assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize("collection,value", [
    ("params", np.nan), ("params", np.inf), ("batch_stats", -np.inf), ("batch_stats", np.nan)])
def test_non_finite_variables_raise_a_value_error_naming_the_leaf(collection, value):
  variables = _variables()
  (path, _), *_ = reversed(jax.tree_util.tree_flatten_with_path(variables[collection])[0])
  spoilt = jax.tree_util.tree_map_with_path(
      lambda p, leaf: leaf.at[(0,) * leaf.ndim].set(value) if p == path else leaf,
      variables[collection])
  name = f"variables['{collection}']{jax.tree_util.keystr(path)}"
  # A ValueError about the input (not NonFiniteHypergradientError about outer_lr).
  with pytest.raises(ValueError, match=re.escape(name) + r" contains NaN or infinite values "
                     r"\(1 of \d+\)"):
    _call(variables={**variables, collection: spoilt})


def test_the_finite_check_skips_integer_key_and_non_array_leaves():
  ibau._check_finite_variables({"params": {"w": jnp.ones(3), "step": np.arange(3),
                                           "key": jax.random.key(0), "scale": 2.0,
                                           "flag": True, "none": None}})
  with pytest.raises(ValueError, match=re.escape("variables['params']['scale']")):
    ibau._check_finite_variables({"params": {"w": jnp.ones(3), "scale": float("nan")}})


def test_non_finite_hypergradient_stops_with_clear_error_and_leaves_input_untouched():
  class Fragile(nn.Module):
    """Finite logits, infinite gradient: d/dw √|w| is infinite at w = 0."""

    @nn.compact
    def __call__(self, x):
      w = self.param("w", nn.initializers.zeros, ())
      logits = Dense(CLASSES)(x.reshape((x.shape[0], -1)))
      return logits + jnp.sqrt(jnp.abs(w))

  model = Fragile()
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, H, W, 3)))
  copy = jax.tree_util.tree_map(np.array, variables)
  x, y = _data()
  with pytest.raises(ibau_jax.NonFiniteHypergradientError, match="round 0 at outer step 0"):
    ibau_jax.unlearn(model.apply, variables, x, y, SMALL, key=jax.random.PRNGKey(0))
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, copy)


def test_inner_projection_step_keeps_every_iterate_in_the_ball():
  variables = _variables()
  x, y = _data(8)
  params, rest = variables["params"], {"batch_stats": variables["batch_stats"]}
  norms = {}
  for where in ("end", "step"):
    config = ibau_jax.IBAUConfig(norm_bound=0.5, inner_lr=50.0, inner_projection=where)
    delta = jnp.zeros((H, W, 3))
    state = ibau._inner_tx(config).init(delta)
    norms[where] = []
    for _ in range(4):
      delta, state, _ = ibau._inner_step(config, apply_fn, params, rest, delta, state, x, y)
      norms[where].append(float(jnp.linalg.norm(delta)))
  assert max(norms["step"]) <= 0.5 + 1e-5
  assert norms["step"][-1] == pytest.approx(0.5, rel=1e-4)  # the ascent pushes onto the sphere
  assert max(norms["end"]) > 0.5  # unconstrained steps leave the ball


# ----------------------------------------------------------------------------------------
# Several devices (forced host devices in a child process)
# ----------------------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    sys.path.insert(0, {tests_dir!r})
    import test_ibau as t
    import ibau_jax
    assert jax.device_count() == 4, jax.devices()
    variables = t._variables()
    x, y = t._data(24)
    reference = np.load({reference!r})
    every = jax.sharding.Mesh(np.asarray(jax.devices()), ("batch",))
    for loop, mesh in (("python", None), ("scan", every)):  # None: all devices, as `every`
      a = ibau_jax.unlearn(t.apply_fn, variables, x, y, t.SMALL.replace(loop=loop),
                           key=jax.random.PRNGKey(5), mesh=mesh)
      leaf = jax.tree_util.tree_leaves(a.variables["params"])[0]
      assert len(leaf.sharding.device_set) == 4, leaf.sharding
      leaves = jax.tree_util.tree_leaves(a.variables)
      for i, leaf in enumerate(leaves):
        np.testing.assert_allclose(leaf, reference[f"{{loop}}_leaf{{i}}"], rtol=1e-4, atol=1e-5)
      for k in ("inner_loss", "outer_loss", "delta_norm"):
        np.testing.assert_allclose([h[k] for h in a.history], reference[f"{{loop}}_{{k}}"],
                                   rtol=1e-4, atol=1e-6)
      assert np.abs(np.asarray(a.perturbation) - reference[f"{{loop}}_delta"]).max() < 1e-4
    # Each batch is split: every device holds batch_size / 4 of its images.
    from ibau_jax import ibau
    split = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("batch",)),
                                       jax.sharding.PartitionSpec("batch"))
    xb, yb = ibau._batches_jit(t.SMALL, jax.numpy.asarray(x), jax.numpy.asarray(y),
                               jax.random.PRNGKey(0), split)
    xs, ys = ibau._take_jit(xb, yb, 1, split)
    assert xs.sharding.shard_shape(xs.shape)[0] == 2 and ys.sharding.shard_shape(ys.shape) == (2,)
    try:
      ibau_jax.unlearn(t.apply_fn, variables, x, y, t.SMALL.replace(batch_size=6),
                       key=jax.random.PRNGKey(5))
    except ValueError as e:
      assert "not divisible by the 4 devices" in str(e), e
    else:
      raise AssertionError("batch_size 6 on 4 devices did not raise")
    print("OK")
""")


def test_four_devices_match_one_device(tmp_path):
  # The reference: this process, one device, no mesh (both loops).
  variables = _variables()
  x, y = _data(24)
  reference = {}
  for loop in ("python", "scan"):
    r = ibau_jax.unlearn(apply_fn, variables, x, y, SMALL.replace(loop=loop),
                         key=jax.random.PRNGKey(5))
    for i, leaf in enumerate(jax.tree_util.tree_leaves(r.variables)):
      reference[f"{loop}_leaf{i}"] = np.asarray(leaf)
    for k in ("inner_loss", "outer_loss", "delta_norm"):
      reference[f"{loop}_{k}"] = np.asarray([h[k] for h in r.history])
    reference[f"{loop}_delta"] = np.asarray(r.perturbation)
  np.savez(tmp_path / "reference.npz", **reference)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  code = _CHILD.format(tests_dir=str(pathlib.Path(__file__).parent),
                       reference=str(tmp_path / "reference.npz"))
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().endswith("OK")


def test_normalized_inner_optimizer_takes_steps_of_length_lr():
  variables = _variables()
  x, y = _data(8)
  params, rest = variables["params"], {"batch_stats": variables["batch_stats"]}
  config = ibau_jax.IBAUConfig(inner_optimizer="normalized", inner_lr=0.3, norm_bound=None)
  delta = jnp.asarray(np.random.RandomState(1).randn(H, W, 3).astype(np.float32) * 0.1)
  state = ibau._inner_tx(config).init(delta)
  new, _, _ = ibau._inner_step(config, apply_fn, params, rest, delta, state, x, y)
  step = new - delta
  assert float(jnp.linalg.norm(step)) == pytest.approx(0.3, rel=1e-5)
  # ... along the descent direction of L_in.
  logits_fn = ibau._logits_fn(apply_fn, rest)
  pseudo = jnp.argmax(logits_fn(params, x), axis=-1)
  g = jax.grad(lambda d: ibau._inner_loss(config, logits_fn, d, params, x, pseudo))(delta)
  cosine = jnp.vdot(step, -g) / (jnp.linalg.norm(step) * jnp.linalg.norm(g))
  assert float(cosine) == pytest.approx(1.0, abs=1e-5)


def test_inner_candidates_keep_the_delta_with_the_best_inner_objective():
  variables = _variables()
  x, y = _data(24)
  a = ("sgd", 10.0, "end")
  b = ("normalized", 0.3, "step")

  def config(main, extra=()):
    return ibau_jax.IBAUConfig(rounds=1, batch_size=8, norm_bound=1.0, inner_optimizer=main[0],
                               inner_lr=main[1], inner_projection=main[2],
                               inner_candidates=extra)

  key = jax.random.PRNGKey(4)
  single = [ibau_jax.unlearn(apply_fn, variables, x, y, config(c), key=key) for c in (a, b)]
  alone = [r.perturbation for r in single]
  for r in single:  # one solver: no scores, its δ's locality
    assert r.history[0]["candidate_scores"] == []
    assert r.history[0]["candidate_locality"] == pytest.approx(
        [float(ibau.locality(r.perturbation))], rel=1e-6)
  assert float(jnp.abs(alone[0] - alone[1]).max()) > 1e-2  # the two solvers disagree
  # The inner objective of each on the round's batches (the same shuffle as unlearn's).
  k_perm, _ = jax.random.split(jax.random.fold_in(key, 0))
  xb, yb = ibau._batches(config(a), jnp.asarray(x), jnp.asarray(y), k_perm)
  params, rest = variables["params"], {"batch_stats": variables["batch_stats"]}
  scores = [sum(float(ibau._inner_objective(config(a), apply_fn, params, rest, d, xb[i], yb[i]))
                for i in range(xb.shape[0])) for d in alone]
  best = int(np.argmax(scores))
  for main, extra, want in ((a, b, best), (b, a, 1 - best)):
    for loop in ("python", "scan"):
      r = ibau_jax.unlearn(apply_fn, variables, x, y, config(main, (extra,)).replace(loop=loop),
                           key=key)
      np.testing.assert_allclose(r.perturbation, alone[best], rtol=1e-5, atol=1e-6)
      assert r.history[0]["inner_choice"] == want
      order = [0, 1] if main is a else [1, 0]
      np.testing.assert_allclose(r.history[0]["candidate_scores"],
                                 [scores[i] for i in order], rtol=1e-4)
      np.testing.assert_allclose(r.history[0]["candidate_locality"],
                                 [float(ibau.locality(alone[i])) for i in order], rtol=1e-5)


def test_locality_is_the_energy_share_of_the_top_two_percent_of_locations():
  d = jnp.zeros((10, 10, 3))
  assert float(ibau.locality(d)) == 0.0
  assert float(ibau.locality(d.at[3, 4, 1].set(-2.0))) == pytest.approx(1.0)
  # Spread evenly: the top ⌈0.02 · 100⌉ = 2 locations hold 2 % of the energy.
  assert float(ibau.locality(jnp.ones((10, 10, 3)))) == pytest.approx(0.02)
  # Channels are summed per location: energies 9 (3 channels of 1, 2, 2) and 1 of 10 others.
  d = jnp.zeros((10, 10, 3)).at[0, 0].set(jnp.array([1.0, 2.0, 2.0]))
  d = d.at[5, 5:, 0].set(1.0).at[6, 5:, 0].set(1.0)
  assert float(ibau.locality(d)) == pytest.approx(10 / 19)


@pytest.mark.parametrize("loop", ["python", "scan"])
def test_outer_lr_decay_scales_round_r_updates_by_gamma_to_the_r(loop):
  # With plain SGD the update of round r is exactly γ^r times the undecayed one; for r = 0
  # nothing changes.
  variables = _variables()
  x, y = _data(16)
  base = ibau_jax.IBAUConfig(rounds=1, batch_size=8, outer_optimizer="sgd", outer_lr=0.1,
                             loop=loop)
  key = jax.random.PRNGKey(6)
  plain = ibau_jax.unlearn(apply_fn, variables, x, y, base, key=key)
  decayed = ibau_jax.unlearn(apply_fn, variables, x, y, base.replace(outer_lr_decay=0.5),
                             key=key)
  # Round 0 is not decayed (two compiled programs: equal up to float rounding).
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
                         plain.variables, decayed.variables)
  p, rest = variables["params"], {"batch_stats": variables["batch_stats"]}
  opt = optax.sgd(0.1).init(p)
  xb, yb = ibau._batches(base, jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0))
  delta = jnp.full((H, W, 3), 0.05)
  args = (rest, delta, xb[0], yb[0], xb[1], yb[1], jax.random.PRNGKey(1), jnp.asarray(True))
  one, *_ = ibau._outer_step(base, apply_fn, p, opt, *args, jnp.asarray(2))
  quarter, *_ = ibau._outer_step(base.replace(outer_lr_decay=0.5), apply_fn, p, opt, *args,
                                 jnp.asarray(2))
  jax.tree_util.tree_map(
      lambda a, b, c: np.testing.assert_allclose(b - c, 0.25 * (a - c), rtol=1e-4, atol=1e-7),
      one, quarter, p)


def test_inner_use_all_takes_the_mean_hypergradient_over_the_candidates():
  # With plain SGD an outer step on stacked δs is the mean of the single-δ steps, each with
  # its own perturbed images (mask key folded with the candidate's index).
  variables = _variables()
  x, y = _data(16)
  config = ibau_jax.IBAUConfig(rounds=1, batch_size=8, outer_optimizer="sgd", outer_lr=0.1,
                               perturbed_fraction=0.25)
  p, rest = variables["params"], {"batch_stats": variables["batch_stats"]}
  opt = optax.sgd(0.1).init(p)
  xb, yb = ibau._batches(config, jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0))
  deltas = jnp.stack([jnp.full((H, W, 3), 0.05), jnp.zeros((H, W, 3)).at[:2, :2].set(0.8)])
  key = jax.random.PRNGKey(1)
  rest_args = (xb[0], yb[0], xb[1], yb[1])
  both, _, finite, loss, _ = ibau._outer_step(config, apply_fn, p, opt, rest, deltas, *rest_args,
                                              key, jnp.asarray(True))
  singles = [ibau._outer_step(config, apply_fn, p, opt, rest, deltas[k], *rest_args,
                              jax.random.fold_in(key, k), jnp.asarray(True)) for k in range(2)]
  assert bool(finite)
  assert float(loss) == pytest.approx((float(singles[0][3]) + float(singles[1][3])) / 2,
                                      rel=1e-5)
  jax.tree_util.tree_map(
      lambda b, s0, s1: np.testing.assert_allclose(b, (s0 + s1) / 2, rtol=1e-5, atol=1e-7),
      both, singles[0][0], singles[1][0])
  # The two δs pull differently (else the mean would prove nothing).
  diff = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), singles[0][0],
                                singles[1][0])
  assert max(jax.tree_util.tree_leaves(diff)) > 1e-4


def test_inner_use_all_agrees_between_loops_and_differs_from_best():
  variables = _variables()
  x, y = _data(24)
  config = ibau_jax.IBAUConfig(rounds=2, batch_size=8, norm_bound=1.0, inner_use="all",
                               inner_candidates=(("normalized", 0.3, "step"),))
  key = jax.random.PRNGKey(4)
  runs = {loop: ibau_jax.unlearn(apply_fn, variables, x, y, config.replace(loop=loop), key=key)
          for loop in ("python", "scan")}
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         runs["python"].variables, runs["scan"].variables)
  best = ibau_jax.unlearn(apply_fn, variables, x, y, config.replace(inner_use="best"), key=key)
  diff = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                best.variables["params"], runs["scan"].variables["params"])
  assert max(jax.tree_util.tree_leaves(diff)) > 1e-4
  # Round 0's δ and choice do not depend on how the outer steps use them.
  assert runs["scan"].history[0]["inner_choice"] == best.history[0]["inner_choice"]
  assert runs["scan"].history[0]["delta_norm"] == pytest.approx(best.history[0]["delta_norm"],
                                                                rel=1e-5)


def test_inner_refine_continues_from_the_main_solvers_delta():
  # One round: δ = Π(refine passes started at Π(main passes)), on the round's batches.
  variables = _variables()
  x, y = _data(24)
  main = ibau_jax.IBAUConfig(rounds=1, batch_size=8, norm_bound=1.0, inner_optimizer="sgd",
                             inner_lr=10.0, inner_projection="end", inner_candidates=())
  refined = main.replace(inner_refine=("normalized", 0.3, "step"))
  key = jax.random.PRNGKey(5)
  k_perm, _ = jax.random.split(jax.random.fold_in(key, 0))
  xb, yb = ibau._batches(main, jnp.asarray(x), jnp.asarray(y), k_perm)
  params, rest = variables["params"], {"batch_stats": variables["batch_stats"]}
  step_config = main.replace(inner_optimizer="normalized", inner_lr=0.3, inner_projection="step")

  def passes(config, delta):
    state = ibau._inner_tx(config).init(delta)
    for i in range(xb.shape[0]):
      delta, state, _ = ibau._inner_step(config, apply_fn, params, rest, delta, state,
                                         xb[i], yb[i])
    return ibau._project(delta, config.norm_bound)

  start = passes(main, jnp.zeros((H, W, 3), jnp.float32))
  want = passes(step_config, start)
  assert float(jnp.abs(want - start).max()) > 1e-3  # the refinement moves δ
  plain = ibau_jax.unlearn(apply_fn, variables, x, y, main, key=key)
  np.testing.assert_allclose(plain.perturbation, start, rtol=1e-5, atol=1e-6)
  for loop in ("python", "scan"):
    r = ibau_jax.unlearn(apply_fn, variables, x, y, refined.replace(loop=loop), key=key)
    np.testing.assert_allclose(r.perturbation, want, rtol=1e-5, atol=1e-6)
  assert ibau_jax.IBAUConfig.official().inner_refine is None


def test_a_run_interrupted_in_the_repair_resumes_from_its_last_round(monkeypatch, tmp_path):
  variables = _variables()
  x, y = _data()
  config = SMALL.replace(repair_share=0.01, warp_epochs=0, checkpoint_dir=str(tmp_path))
  run = lambda c: ibau_jax.unlearn(apply_fn, variables, x, y, c, key=jax.random.PRNGKey(5))
  whole = run(config.replace(checkpoint_dir=None))
  assert whole.repair["active"]
  real = ibau._repair

  def killed(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(ibau, "_repair", killed)
  with pytest.raises(KeyboardInterrupt):
    run(config)
  path = tmp_path / ibau.CHECKPOINT_FILE
  assert saved_step(path) == SMALL.rounds  # every round saved, the repair not done
  monkeypatch.setattr(ibau, "_repair", real)
  steps = []  # a progress hook does not change the run's fingerprint
  resumed = run(config.replace(progress=lambda done, total: steps.append(done)))
  assert steps == [1, 2, 3, 4, 5, 6]
  assert not path.exists()
  jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.variables, whole.variables)
  assert resumed.repair["shares"] == whole.repair["shares"]
  # The repair trains the parameters only.
  jax.tree_util.tree_map(np.testing.assert_array_equal, whole.variables["batch_stats"],
                         variables["batch_stats"])
