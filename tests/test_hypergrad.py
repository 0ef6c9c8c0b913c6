"""The implicit hypergradient against closed forms and finite differences (float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax import hypergrad

ETA = 0.2
ALPHA = 0.3


def _problem(seed=0, n=5, m=3):
  """Quadratic inner problem L_in = ½δᵀAδ − δᵀBθ (so δ* = A⁻¹Bθ) and a quadratic outer loss."""
  rng = np.random.RandomState(seed)
  q = rng.randn(n, n)
  a = q @ q.T / n + np.eye(n)  # SPD, eigenvalues in about [1, 4]
  b = rng.randn(n, m)
  c = rng.randn(n)
  theta = rng.randn(m)
  return a, b, c, theta


def _fixed_point(a, b):
  def phi(delta, theta):
    return delta - ETA * (a @ delta - b @ theta)
  return phi


def _outer(c):
  def loss(delta, theta):
    return 0.5 * jnp.sum((delta - c) ** 2) + 0.5 * ALPHA * jnp.sum(theta ** 2)
  return loss


def _implicit_total_grad(a, b, c, theta, solver):
  phi = _fixed_point(jnp.asarray(a), jnp.asarray(b))
  delta = jnp.asarray(np.linalg.solve(a, b @ theta))
  g_delta, g_theta = jax.grad(_outer(jnp.asarray(c)), argnums=(0, 1))(delta, jnp.asarray(theta))
  (vjp,), residual = hypergrad.fixed_point_vjp(phi, delta, (jnp.asarray(theta),), g_delta, solver)
  return np.asarray(g_theta + vjp), float(residual)


def _closed_form(a, b, c, theta):
  delta = np.linalg.solve(a, b @ theta)
  return b.T @ np.linalg.solve(a, delta - c) + ALPHA * theta


@pytest.mark.parametrize("name,iterations", [("neumann", 400), ("cg", 20), ("normal_cg", 40)])
def test_hypergradient_matches_closed_form(name, iterations):
  with jax.enable_x64(True):
    a, b, c, theta = _problem()
    got, residual = _implicit_total_grad(a, b, c, theta,
                                         hypergrad.make_solver(name, iterations=iterations,
                                                               tol=1e-14))
  np.testing.assert_allclose(got, _closed_form(a, b, c, theta), rtol=1e-8, atol=1e-10)
  assert residual < 1e-8


def test_hypergradient_matches_central_finite_differences():
  with jax.enable_x64(True):
    a, b, c, theta = _problem(seed=1)
    got, _ = _implicit_total_grad(a, b, c, theta, hypergrad.make_solver("cg", iterations=20,
                                                                        tol=1e-14))

  def total(t):  # L_out(δ*(θ), θ) with δ* solved exactly.
    delta = np.linalg.solve(a, b @ t)
    return 0.5 * np.sum((delta - c) ** 2) + 0.5 * ALPHA * np.sum(t ** 2)

  eps = 1e-6
  fd = np.array([(total(theta + eps * e) - total(theta - eps * e)) / (2 * eps)
                 for e in np.eye(theta.size)])
  np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-8)


def test_solvers_agree_at_convergence():
  with jax.enable_x64(True):
    a, b, c, theta = _problem(seed=2, n=8, m=4)
    results = [_implicit_total_grad(a, b, c, theta,
                                    hypergrad.make_solver(name, iterations=it, tol=1e-14))[0]
               for name, it in (("neumann", 600), ("cg", 30), ("normal_cg", 60))]
  np.testing.assert_allclose(results[0], results[1], rtol=1e-8)
  np.testing.assert_allclose(results[1], results[2], rtol=1e-8)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_truncated_neumann_is_the_papers_recursion(k):
  """K Neumann terms: v_0 = 0, v_{j+1} = (∂_δΦ)ᵀ v_j + ∇_δ L_out; result (∂_θΦ)ᵀ v_K."""
  with jax.enable_x64(True):
    a, b, c, theta = _problem(seed=3)
    got, residual = _implicit_total_grad(a, b, c, theta, hypergrad.make_solver("neumann",
                                                                               iterations=k))
  delta = np.linalg.solve(a, b @ theta)
  g_delta = delta - c
  jac_delta = np.eye(a.shape[0]) - ETA * a   # ∂_δ Φ
  jac_theta = ETA * b                        # ∂_θ Φ
  v = np.zeros_like(g_delta)
  for _ in range(k):
    v = jac_delta.T @ v + g_delta
  np.testing.assert_allclose(got, ALPHA * theta + jac_theta.T @ v, rtol=1e-10, atol=1e-12)
  if k >= 1:  # residual of v_{K-1}: ‖(I − J)ᵀ v_{K−1} − g‖ / ‖g‖
    v_prev = np.zeros_like(g_delta)
    for _ in range(k - 1):
      v_prev = jac_delta.T @ v_prev + g_delta
    expected = np.linalg.norm((np.eye(a.shape[0]) - jac_delta).T @ v_prev - g_delta)
    assert residual == pytest.approx(expected / np.linalg.norm(g_delta), rel=1e-8)


def test_custom_fixed_point_gradient_equals_fixed_point_vjp():
  """jax.grad through the decorated inner solver gives the same hypergradient."""
  with jax.enable_x64(True):
    a, b, c, theta = _problem(seed=4)
    a_j, b_j, c_j = jnp.asarray(a), jnp.asarray(b), jnp.asarray(c)
    phi = _fixed_point(a_j, b_j)
    solver = hypergrad.make_solver("cg", iterations=20, tol=1e-14)

    @hypergrad.implicit_fixed_point(phi, solver)
    def inner_solver(init, t):
      del init
      return jnp.linalg.solve(a_j, b_j @ t)

    def total(t):
      return _outer(c_j)(inner_solver(jnp.zeros(a.shape[0]), t), t)

    got = np.asarray(jax.grad(total)(jnp.asarray(theta)))
    got_jit = np.asarray(jax.jit(jax.grad(total))(jnp.asarray(theta)))
  np.testing.assert_allclose(got, _closed_form(a, b, c, theta), rtol=1e-8)
  np.testing.assert_allclose(got_jit, got, rtol=1e-12)


def test_jit_equals_no_jit_on_pytrees():
  """δ and θ as pytrees (dicts); the jitted VJP equals the eager one."""
  a, b, c, theta = _problem(seed=5)
  a_j, b_j = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)

  def phi(delta, params):
    d = jnp.concatenate([delta["u"], delta["w"]])
    t = jnp.concatenate([params["p"], params["q"]])
    new = d - ETA * (a_j @ d - b_j @ t)
    return {"u": new[:2], "w": new[2:]}

  def run(delta, params, cot):
    return hypergrad.fixed_point_vjp(phi, delta, (params,), cot,
                                     hypergrad.make_solver("neumann", iterations=5))

  delta = {"u": jnp.ones(2), "w": jnp.arange(3.0)}
  params = {"p": jnp.asarray(theta[:1], jnp.float32), "q": jnp.asarray(theta[1:], jnp.float32)}
  cot = {"u": jnp.asarray([0.5, -1.0]), "w": jnp.asarray([1.0, 2.0, -0.5])}
  eager = run(delta, params, cot)
  jitted = jax.jit(run)(delta, params, cot)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), eager, jitted)
  assert set(eager[0][0]) == {"p", "q"}


def test_make_solver_rejects_bad_arguments():
  with pytest.raises(ValueError, match="unknown hypergradient solver"):
    hypergrad.make_solver("lbfgs", iterations=3)
  with pytest.raises(ValueError, match=">= 0"):
    hypergrad.make_solver("neumann", iterations=-1)
  with pytest.raises(ValueError, match="at least one iteration"):
    hypergrad.make_solver("cg", iterations=0)
