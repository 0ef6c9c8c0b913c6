"""Implicit hypergradients through a fixed point; the only module that imports jaxopt.

Setting.  Let ``δ*(θ)`` be a fixed point of a map ``Φ``, ``δ* = Φ(δ*, θ)``, and let
``L_out(δ, θ)`` be an outer loss.  By the implicit function theorem

    d/dθ L_out(δ*(θ), θ) = ∇_θ L_out + (∂_θ Φ)ᵀ v,   where   (I − ∂_δ Φ)ᵀ v = ∇_δ L_out.

For I-BAU, ``Φ(δ, θ) = δ − η ∇_δ L_in(δ, θ)``, so ``I − ∂_δ Φ = η ∇²_δδ L_in`` and
``(∂_θ Φ)ᵀ v = −η ∇²_θδ L_in v``: the hypergradient
``∇_θ L_out − ∇²_θδ L_in (∇²_δδ L_in)⁻¹ ∇_δ L_out`` of the paper.

This module computes the vector-Jacobian product ``(∂_θ Φ)ᵀ v`` with jaxopt's implicit
differentiation (:func:`jaxopt.implicit_diff.root_vjp`, the VJP behind
``custom_fixed_point``), with a pluggable solver for the linear system in ``v``:

* ``"neumann"``: ``K`` terms of the Neumann series, ``v_K = Σ_{j<K} (∂_δ Φᵀ)^j ∇_δ L_out``
  (what the paper's code does; the truncation is biased unless ``‖∂_δ Φ‖ < 1`` and K is large);
* ``"cg"``: conjugate gradient on ``(I − ∂_δ Φ)ᵀ v = ∇_δ L_out`` (symmetric here; positive
  definite when ``L_in`` is locally convex in δ);
* ``"normal_cg"``: conjugate gradient on the normal equations (any non-singular system).

Every solver also returns the relative residual ``‖(I − ∂_δ Φ)ᵀ v − ∇_δ L_out‖ / ‖∇_δ L_out‖``
(for ``"neumann"`` that of the iterate ``v_{K−1}``, which costs nothing extra; the others
spend one more matrix-vector product).

Replacing jaxopt means rewriting this file alone: the rest of the package calls
:func:`fixed_point_vjp`, :func:`implicit_fixed_point` and :data:`SOLVERS` only.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jaxopt import implicit_diff
from jaxopt import linear_solve

PyTree = Any
MatVec = Callable[[PyTree], PyTree]
# A linear solver: (matvec, b) -> (solution, relative residual).
LinearSolver = Callable[[MatVec, PyTree], tuple[PyTree, jax.Array]]

SOLVERS = ("neumann", "cg", "normal_cg")


def _tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  leaves = jax.tree_util.tree_map(lambda x, y: jnp.vdot(x, y), a, b)
  return sum(jax.tree_util.tree_leaves(leaves))


def _tree_norm(a: PyTree) -> jax.Array:
  return jnp.sqrt(_tree_vdot(a, a))


def _tree_sub(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree_util.tree_map(jnp.subtract, a, b)


def _relative(residual_norm: jax.Array, b: PyTree) -> jax.Array:
  return residual_norm / jnp.maximum(_tree_norm(b), jnp.finfo(jnp.float32).tiny)


def _neumann(matvec: MatVec, b: PyTree, *, iterations: int) -> tuple[PyTree, jax.Array]:
  # jaxopt hands us matvec(u) = Aᵀu with A = ∂_δ Φ − I, and b = −∇_δ L_out.
  # Richardson iteration u ← u + (Aᵀu − b) is u ← (∂_δ Φ)ᵀu + ∇_δ L_out: the Neumann series.
  # K is small and static: a Python loop (unrolled), since XLA:CPU runs convolution
  # gradients inside while-loop bodies many times slower than outside.
  if iterations == 0:
    return jax.tree_util.tree_map(jnp.zeros_like, b), jnp.ones((), jnp.float32)
  # u_1 = −b exactly (the first step from u_0 = 0 needs no product): K − 1 products in all.
  u = jax.tree_util.tree_map(jnp.negative, b)
  residual = jnp.ones((), jnp.float32)  # of u_0 = 0
  for _ in range(iterations - 1):
    increment = _tree_sub(matvec(u), b)
    u = jax.tree_util.tree_map(jnp.add, u, increment)
    # The increment is Aᵀu_{k} − b: the residual of the previous iterate.
    residual = _relative(_tree_norm(increment), b)
  return u, residual


def _cg(matvec: MatVec, b: PyTree, *, iterations: int, tol: float) -> tuple[PyTree, jax.Array]:
  # Solve (−Aᵀ) u = −b, i.e. (I − ∂_δ Φ)ᵀ u = ∇_δ L_out, whose matrix is positive
  # definite when the inner problem is locally convex.
  neg = lambda u: jax.tree_util.tree_map(jnp.negative, matvec(u))
  minus_b = jax.tree_util.tree_map(jnp.negative, b)
  u = linear_solve.solve_cg(neg, minus_b, maxiter=iterations, tol=tol)
  return u, _relative(_tree_norm(_tree_sub(matvec(u), b)), b)


def _normal_cg(matvec: MatVec, b: PyTree, *, iterations: int,
               tol: float) -> tuple[PyTree, jax.Array]:
  u = linear_solve.solve_normal_cg(matvec, b, maxiter=iterations, tol=tol)
  return u, _relative(_tree_norm(_tree_sub(matvec(u), b)), b)


def make_solver(name: str, *, iterations: int, tol: float = 1e-10) -> LinearSolver:
  """Returns the linear solver ``name`` (one of :data:`SOLVERS`).

  Args:
    name: ``"neumann"``, ``"cg"`` or ``"normal_cg"``.
    iterations: K for ``"neumann"`` (number of series terms; 0 drops the implicit term),
      the maximum number of iterations for the CG solvers.
    tol: relative tolerance of the CG solvers (ignored by ``"neumann"``).
  """
  if name not in SOLVERS:
    raise ValueError(f"unknown hypergradient solver {name!r}; choose one of {SOLVERS}")
  if int(iterations) < 0:
    raise ValueError(f"solver iterations must be >= 0, got {iterations}")
  if name == "neumann":
    return functools.partial(_neumann, iterations=int(iterations))
  if int(iterations) < 1:
    raise ValueError(f"{name} needs at least one iteration, got {iterations}")
  fn = _cg if name == "cg" else _normal_cg
  return functools.partial(fn, iterations=int(iterations), tol=float(tol))


def fixed_point_vjp(
    fixed_point_fn: Callable[..., PyTree],
    solution: PyTree,
    args: Sequence[PyTree],
    cotangent: PyTree,
    solver: LinearSolver,
) -> tuple[tuple[PyTree, ...], jax.Array]:
  """Implicit VJP of a fixed point ``x* = T(x*, *args)`` with respect to ``args``.

  Returns ``((∂_args T)ᵀ v, residual)`` where ``v`` solves ``(I − ∂_x T)ᵀ v = cotangent``
  (``cotangent`` is ``∇_x L`` of a loss ``L`` of ``x*``) and ``residual`` is the
  solver's relative residual.  Adding ``∂_args L`` of any direct dependence gives
  ``d L(x*(args), args) / d args``.

  Args:
    fixed_point_fn: ``T(x, *args) -> x``, differentiable in both.
    solution: the point ``x*`` at which to differentiate (treated as a fixed point).
    args: the arguments to differentiate with respect to.
    cotangent: ``∇_x L`` at ``solution``, same structure as ``solution``.
    solver: from :func:`make_solver`.
  """
  residuals = []

  def solve(matvec, b):
    u, residual = solver(matvec, b)
    residuals.append(residual)
    return u

  def optimality(x, *a):
    return _tree_sub(fixed_point_fn(x, *a), x)

  vjps = implicit_diff.root_vjp(optimality, solution, tuple(args), cotangent, solve=solve)
  return tuple(vjps), residuals[0]


def implicit_fixed_point(fixed_point_fn: Callable[..., PyTree], solver: LinearSolver):
  """Decorates ``inner_solver(init, *args) -> x*`` so that ``jax.grad`` through it is implicit.

  The decorated solver's output is differentiated as the fixed point of
  ``fixed_point_fn(x, *args)``; ``init`` gets no gradient.  Everything that should get
  a gradient must be passed in ``args`` (not captured in a closure).
  """

  def solve(matvec, b):
    return solver(matvec, b)[0]

  return implicit_diff.custom_fixed_point(fixed_point_fn, solve=solve)
