"""Inner-loop adaptation: a few SGD steps on a task's support set.

``adapt`` is a pure function of ``(params, alpha)``; differentiate it (or a
loss after it) with respect to both and you get the MAML meta-gradient and the
Alpha MAML hypergradient ``d L_query / d alpha`` from one backward pass.

>>> import jax, jax.numpy as jnp
>>> loss_fn = lambda p, x, y: (jnp.mean((x * p["w"] - y) ** 2), {})
>>> params = {"w": jnp.array(0.0)}
>>> x, y = jnp.array([1.0, 2.0]), jnp.array([2.0, 4.0])
>>> new, losses = adapt(loss_fn, params, 0.1, x, y, inner_steps=2)
>>> round(float(new["w"]), 4)   # w <- w - 0.1 * d/dw mean((w x - y)^2), twice
1.5
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

LossFn = Callable[..., tuple[jax.Array, Any]]
GRANULARITIES = ("scalar", "tensor", "parameter")


def init_alpha(params: Any, value: float, granularity: str = "scalar", dtype=None) -> Any:
  """Initial inner learning rate(s).

  Args:
    params: the model parameters (a pytree).
    value: the initial rate ``alpha_0``.
    granularity: ``"scalar"`` one rate (Alpha MAML, the default); ``"tensor"`` one
      rate per parameter tensor (per layer); ``"parameter"`` one rate per scalar
      parameter (Meta-SGD-like, each adapted by its own hypergradient).
    dtype: defaults to the default float type.

  >>> import jax.numpy as jnp
  >>> init_alpha({"w": jnp.ones((2, 3)), "b": jnp.ones(3)}, 0.1, "tensor")["w"].shape
  ()
  """
  dtype = dtype or jnp.result_type(float)
  if granularity == "scalar":
    return jnp.asarray(value, dtype)
  if granularity == "tensor":
    return jax.tree.map(lambda _: jnp.asarray(value, dtype), params)
  if granularity == "parameter":
    return jax.tree.map(lambda p: jnp.full(jnp.shape(p), value, dtype), params)
  raise ValueError(f"alpha granularity must be one of {GRANULARITIES}, got {granularity!r}")


def broadcast_alpha(alpha: Any, params: Any) -> Any:
  """``alpha`` as a pytree shaped like ``params`` (a scalar is shared by all leaves)."""
  if jax.tree.structure(alpha) == jax.tree.structure(params):
    return alpha
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(alpha)) and jnp.ndim(alpha) == 0:
    return jax.tree.map(lambda _: alpha, params)
  raise ValueError(
      "alpha must be a scalar or a pytree with the structure of params (see "
      f"amaml.init_alpha); got structure {jax.tree.structure(alpha)} for params "
      f"{jax.tree.structure(params)}")


def sgd_step(loss_fn: LossFn, params: Any, alpha: Any, x: Any, y: Any, *,
             first_order: bool = False) -> tuple[Any, jax.Array]:
  """One inner step ``params - alpha * grad``; returns ``(new_params, support_loss)``.

  With ``first_order`` the inner gradient is under ``stop_gradient`` (FOMAML):
  the meta-gradient then skips second derivatives, while ``d/d alpha`` stays
  exact for the first-order graph.
  """
  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
  if first_order:
    grads = jax.lax.stop_gradient(grads)
  alphas = broadcast_alpha(alpha, params)
  new = jax.tree.map(lambda p, a, g: p - (a * g).astype(p.dtype), params, alphas, grads)
  return new, loss


def adapt(loss_fn: LossFn, params: Any, alpha: Any, x: Any, y: Any, *, inner_steps: int = 1,
          first_order: bool = False, unroll: bool | int = True,
          remat: bool = False) -> tuple[Any, jax.Array]:
  """Adapts ``params`` to one task by ``inner_steps`` SGD steps on its support set.

  Args:
    loss_fn: ``loss_fn(params, x, y) -> (loss, aux)``.
    params: the meta-parameters (pytree).
    alpha: the inner rate: a scalar, or a pytree like ``params`` (see :func:`init_alpha`).
    x, y: the support set of ONE task (vmap this function over tasks).
    inner_steps: number of inner steps (static).
    first_order: FOMAML (inner gradients under ``stop_gradient``).
    unroll: passed to ``lax.scan``; ``True`` unrolls the loop fully (faster on
      CPU for few steps, see BENCHMARKS.md), ``1`` keeps a rolled loop (faster compile).
    remat: rematerialise each inner step in the backward pass (``jax.checkpoint``):
      memory nearly independent of ``inner_steps`` at the cost of recomputation. It
      implies a rolled loop (``unroll=True`` is taken as ``1``): in a fully unrolled
      loop XLA schedules the recomputation early and saves nothing (measured,
      BENCHMARKS.md, "Memory").

  Returns:
    ``(adapted_params, support_losses)`` with ``support_losses`` of shape
    ``[inner_steps]`` (the loss before each step).
  """
  if inner_steps < 0:
    raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")

  def body(p, _):
    return sgd_step(loss_fn, p, alpha, x, y, first_order=first_order)

  if remat:
    body = jax.checkpoint(body)
    if unroll is True:
      unroll = 1
  if inner_steps == 0:
    return params, jnp.zeros((0,))
  return jax.lax.scan(body, params, None, length=inner_steps, unroll=unroll)
