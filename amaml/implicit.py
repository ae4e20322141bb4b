"""iMAML's meta-gradient and ``lam`` hypergradient, by implicit differentiation.

The inner solver (:mod:`amaml.proximal`) finds ``phi*(theta, lam) = argmin_phi G(phi)``, ``G(phi)
= L_s(phi) + (lam / 2) |phi - theta|^2``. Its steps are not differentiated: both derivatives
below come from the optimality condition at the solution.

**The meta-gradient.** At the solution ``grad L_s(phi*) + lam (phi* - theta) = 0``.
Differentiating this identity in ``theta`` (the implicit function theorem; ``H`` is the
Hessian of ``L_s`` at ``phi*`` and ``H + lam I`` is invertible)::

    H dphi*/dtheta + lam (dphi*/dtheta - I) = 0   =>   dphi*/dtheta = (I + H / lam)^-1

and, ``H`` being symmetric, the meta-gradient of the query loss ``L_q(phi*)`` is::

    dL_q/dtheta = (I + H / lam)^-1 g = v,   g = grad L_q(phi*)

found by ``cg_steps`` steps of conjugate gradient on ``(I + H / lam) v = g`` with
Hessian-vector products (reverse over reverse, :func:`implicit_gradient`).

**lam by its own hypergradient: exact, for one inner product.** Differentiating the same
identity in ``lam``::

    H dphi*/dlam + (phi* - theta) + lam dphi*/dlam = 0
      =>   dphi*/dlam = -(H + lam I)^-1 (phi* - theta)

so, as ``H + lam I`` is symmetric and ``(H + lam I)^-1 g = v / lam``::

    dL_q/dlam = -(phi* - theta)^T (H + lam I)^-1 g = -(phi* - theta)^T v / lam

It reuses the ``v`` of the meta-gradient: no further Hessian-vector product and no second
CG solve. It is exact under the same conditions as the meta-gradient itself (``phi*`` a
stationary point of ``G``, ``H + lam I`` invertible, the CG system solved); an inexact
inner solve or a truncated CG enters both alike. The hypergradient of the meta loss (a
mean over tasks) is the mean of the tasks' ``dL_q/dlam``. With ``lam_lr > 0``,
:func:`amaml.imaml`'s ``lam`` follows it by the rule of Alpha MAML's ``alpha``
(:mod:`amaml.rates`; by default the scale-free ``"normalized"`` rule, which moves ``log lam``
and so keeps ``lam`` positive).

Both derivatives are one ``jax.custom_vjp`` (:func:`implicit_adapt`), so ``jax.grad`` of
:attr:`~amaml.meta.MetaLearner.meta_loss` with respect to ``params`` (and ``lam``) is the
implicit meta-gradient (and hypergradient).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from amaml.proximal import proximal_adapt, support_grad


def implicit_gradient(
  loss_fn: Callable,
  phi: Any,
  lam: jax.Array,
  x: Any,
  y: Any,
  g: Any,
  *,
  cg_steps: int,
  cg_tol: float = 1e-10,
) -> Any:
  """``v = (I + H / lam)^-1 g`` by at most ``cg_steps`` steps of conjugate gradient
  (``jax.scipy.sparse.linalg.cg``, relative tolerance ``cg_tol``), ``H`` the Hessian of the
  support loss at ``phi`` applied by Hessian-vector products: ``jax.vjp`` of the gradient
  (``H`` is symmetric, so its VJP is ``H v``), one linearisation, then a reverse pass per
  product. Reverse over reverse, not forward mode: a layer with its own VJP and no forward
  mode, such as Conv4's CPU convolution (:func:`amaml.models.layers.conv3x3`), works too.
  CG assumes ``I + H / lam`` positive definite: true for a convex support loss, and near a
  minimum of a non-convex one once ``lam`` exceeds the most negative eigenvalue of ``H``."""
  _, vjp = jax.vjp(support_grad(loss_fn, x, y), phi)
  hvp = lambda v: vjp(v)[0]

  def matvec(v):
    return jax.tree.map(lambda a, b: a + b / lam, v, hvp(v))

  v, _ = jax.scipy.sparse.linalg.cg(matvec, g, tol=cg_tol, maxiter=cg_steps)
  return v


def _zero_cotangent(x: jax.Array):
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)  # integer inputs (labels) take float0


def implicit_adapt(
  loss_fn: Callable,
  *,
  inner_steps: int,
  tol: float = 0.0,
  optimizer: Any = None,
  cg_steps: int = 5,
  cg_tol: float = 1e-10,
) -> Callable:
  """``adapt(params, lam, alpha, x, y) -> (phi*, info)``:
  :func:`~amaml.proximal.proximal_adapt` with iMAML's implicit derivative as its
  ``jax.custom_vjp``. The cotangent ``g`` of ``phi*`` maps to ``v = (I + H / lam)^-1 g`` for
  ``params`` (:func:`implicit_gradient`) and to ``-(phi* - params)^T v / lam`` for ``lam`` (the
  module docstring derives both); ``alpha`` and the data get zero. Second derivatives of it
  are not defined."""
  solve = functools.partial(
    proximal_adapt, loss_fn, inner_steps=inner_steps, tol=tol, optimizer=optimizer
  )

  @jax.custom_vjp
  def adapt(params, lam, alpha, x, y):
    return solve(params, lam, alpha, x, y)

  def fwd(params, lam, alpha, x, y):
    phi, info = solve(params, lam, alpha, x, y)
    return (phi, info), (phi, params, lam, alpha, x, y)

  def bwd(res, cotangents):
    phi, params, lam, alpha, x, y = res
    v = implicit_gradient(loss_fn, phi, lam, x, y, cotangents[0], cg_steps=cg_steps, cg_tol=cg_tol)
    lam_bar = -optax.tree.vdot(optax.tree.sub(phi, params), v) / lam
    return (
      v,
      lam_bar.astype(jnp.result_type(lam)),
      jax.tree.map(_zero_cotangent, alpha),
      jax.tree.map(_zero_cotangent, x),
      jax.tree.map(_zero_cotangent, y),
    )

  adapt.defvjp(fwd, bwd)
  return adapt
