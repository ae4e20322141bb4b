"""iMAML's inner solver: one task's proximal problem, solved without being differentiated.

Each task adapts ``params`` (``theta``) by minimising, on its support set, the regularised
problem::

    G(phi) = L_s(phi) + (lam / 2) |phi - theta|^2

from ``phi = theta`` by steps ``phi - alpha d``, ``d`` the gradient of ``G`` or an Optax
direction of it (:func:`proximal_step`); :func:`proximal_adapt` takes up to ``inner_steps`` of
them and stops early once ``|grad G| <= tol``. Gradient descent on ``G`` is stable for ``alpha
< 2 / (L + lam)``, ``L`` the curvature of the support loss.

The solver is *not* differentiated through: :mod:`amaml.implicit` differentiates its solution
``phi*`` by the optimality condition alone, so memory does not grow with ``inner_steps``
(``benchmarks/memory.py``). :func:`amaml.imaml` builds the learner on both.

>>> import jax.numpy as jnp
>>> loss_fn = lambda p, x, y: (jnp.mean((x * p - y) ** 2), {})
>>> x, y = jnp.array([1.0, 2.0]), jnp.array([2.0, 4.0])
>>> phi, info = proximal_adapt(loss_fn, jnp.array(0.0), 1.0, 0.1, x, y, inner_steps=30)
>>> round(float(phi), 4), int(info["inner_steps_taken"])   # argmin 2.5 (w - 2)^2 + w^2 / 2 = 5/3
(1.6667, 30)
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def support_grad(loss_fn: Callable, x: Any, y: Any) -> Callable:
  """``phi -> grad L_s(phi)`` on one task's support set."""
  return jax.grad(lambda p: loss_fn(p, x, y)[0])


def proximal_objective(
  loss_fn: Callable, params: Any, lam: jax.Array, phi: Any, x: Any, y: Any
) -> jax.Array:
  """``G(phi) = L_s(phi) + lam/2 |phi - params|^2``: what iMAML's inner loop minimises."""
  return loss_fn(phi, x, y)[0] + 0.5 * lam * optax.tree.norm(
    optax.tree.sub(phi, params), squared=True
  )


def init_carry(params: Any, optimizer: Any = None) -> tuple:
  """The carry of :func:`proximal_step` at ``phi = params``: ``(phi, optimizer state,
  done)``, the state ``()`` for gradient descent (``optimizer=None``), ``done`` false."""
  return params, (() if optimizer is None else optimizer.init(params)), jnp.array(False)


def proximal_step(
  loss_fn: Callable,
  params: Any,
  lam: jax.Array,
  alpha: jax.Array,
  x: Any,
  y: Any,
  carry: tuple,
  *,
  optimizer: Any = None,
  tol: float = 0.0,
):
  """One step of the inner solver on ``G(phi) = L_s(phi) + lam/2 |phi - params|^2``.

  ``carry = (phi, optimizer state, done)`` (:func:`init_carry`): the step is ``phi - alpha *
  d`` with ``d`` the gradient of ``G`` (``optimizer=None``) or an Optax direction of it; once
  ``|grad G| <= tol`` (``done``, which stays true) ``phi`` and the state are held. Returns the
  new carry and ``|grad G|`` at the ``phi`` it started from.
  """
  phi, opt_state, done = carry
  grads = jax.tree.map(
    lambda g, p, t: g + (lam * (p - t)).astype(g.dtype),
    support_grad(loss_fn, x, y)(phi),
    phi,
    params,
  )
  grad_norm = optax.tree.norm(grads)
  done = done | (grad_norm <= tol)
  if optimizer is None:
    direction, new_opt_state = grads, opt_state
  else:
    direction, new_opt_state = optimizer.update(grads, opt_state, phi)
  new_phi = jax.tree.map(lambda p, d: p - (alpha * d).astype(p.dtype), phi, direction)
  hold = lambda new, old: jax.tree.map(lambda a, b: jnp.where(done, b, a), new, old)
  return (hold(new_phi, phi), hold(new_opt_state, opt_state), done), grad_norm


def proximal_adapt(
  loss_fn: Callable, params, lam, alpha, x, y, *, inner_steps: int, tol: float = 0.0, optimizer=None
) -> tuple[Any, dict]:
  """iMAML's inner loop: up to ``inner_steps`` :func:`proximal_step` from ``phi = params``, a
  ``lax.while_loop`` that stops once ``|grad G| <= tol`` (never, for ``tol=0``). Not meant to
  be differentiated (see :func:`amaml.implicit.implicit_adapt`).

  Returns ``(phi, info)``; ``info["inner_steps_taken"]`` counts the steps that moved ``phi``
  and ``info["inner_grad_norm"]`` is ``|grad G|`` at the start of the last step.
  """
  step = functools.partial(
    proximal_step, loss_fn, params, lam, alpha, x, y, optimizer=optimizer, tol=tol
  )

  def body(state):
    k, carry, _ = state
    carry, grad_norm = step(carry)
    return k + 1, carry, grad_norm

  def cond(state):
    k, (_, _, done), _ = state
    return (k < inner_steps) & jnp.logical_not(done)

  zero = jnp.zeros((), jnp.result_type(*jax.tree.leaves(params)))
  k, (phi, _, done), grad_norm = jax.lax.while_loop(
    cond, body, (jnp.zeros((), jnp.int32), init_carry(params, optimizer), zero)
  )
  return phi, {"inner_steps_taken": k - done.astype(jnp.int32), "inner_grad_norm": grad_norm}
