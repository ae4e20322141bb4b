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

import re
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


def param_mask(params: Any, select: Any = None) -> Any:
  """Which parameters the inner loop adapts: a pytree of Python bools shaped like ``params``.

  ``select``: ``None`` (all of them); a regular expression searched in each leaf's path
  written ``"layer/name"`` (``"head"`` selects Conv4's ``head/kernel`` and
  ``head/bias``: ANIL); a callable ``(path, leaf) -> bool``; or a pytree of bools.

  >>> import jax.numpy as jnp
  >>> param_mask({"body": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}, "^head/")
  {'body': {'w': False}, 'head': {'w': True}}
  """
  if select is None:
    return jax.tree.map(lambda _: True, params)
  if isinstance(select, str):
    pattern = re.compile(select)
    select_fn = lambda path, _: bool(pattern.search(path))
  elif callable(select):
    select_fn = select
  else:
    return jax.tree.map(bool, select)
  mask = jax.tree_util.tree_map_with_path(
      lambda kp, leaf: bool(select_fn("/".join(_key_name(k) for k in kp), leaf)), params)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(f"no parameter matches {select!r}; parameter paths are "
                     f"{[p for p, _ in _paths(params)]}")
  return mask


def _key_name(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _paths(params):
  return [("/".join(_key_name(k) for k in kp), leaf)
          for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]


def sgd_step(loss_fn: LossFn, params: Any, alpha: Any, x: Any, y: Any, *,
             first_order: bool = False, mask: Any = None) -> tuple[Any, jax.Array]:
  """One inner step ``params - alpha * grad``; returns ``(new_params, support_loss)``.

  With ``first_order`` the inner gradient is under ``stop_gradient`` (FOMAML):
  the meta-gradient then skips second derivatives, while ``d/d alpha`` stays
  exact for the first-order graph. ``mask`` (a pytree of Python bools, see
  :func:`param_mask`) limits the step to the selected parameters, and the inner
  gradient is only computed for them (ANIL's saving).
  """
  alphas = broadcast_alpha(alpha, params)
  if mask is None:
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
    if first_order:
      grads = jax.lax.stop_gradient(grads)
    new = jax.tree.map(lambda p, a, g: p - (a * g).astype(p.dtype), params, alphas, grads)
    return new, loss
  leaves, treedef = jax.tree.flatten(params)
  selected = [i for i, m in enumerate(treedef.flatten_up_to(mask)) if m]
  alpha_leaves = treedef.flatten_up_to(alphas)

  def with_selected(sub):
    full = list(leaves)
    for j, i in enumerate(selected):
      full[i] = sub[j]
    return treedef.unflatten(full)

  (loss, _), grads = jax.value_and_grad(
      lambda sub: loss_fn(with_selected(sub), x, y), has_aux=True)([leaves[i] for i in selected])
  if first_order:
    grads = jax.lax.stop_gradient(grads)
  return with_selected([leaves[i] - (alpha_leaves[i] * g).astype(leaves[i].dtype)
                        for i, g in zip(selected, grads)]), loss


def optimizer_step(loss_fn: LossFn, params: Any, opt_state: Any, alpha: Any, x: Any, y: Any,
                   optimizer: Any, *, first_order: bool = False,
                   mask: Any = None) -> tuple[Any, Any, jax.Array]:
  """One inner step of an Optax *direction* ``optimizer`` (a ``GradientTransformation``
  without a learning rate, e.g. ``optax.scale_by_adam(eps_root=1e-8)`` or
  ``optax.trace(0.9)``): ``params - alpha * direction``. ``alpha`` enters linearly, so
  ``d L / d alpha`` through the optimizer's state is exact. Returns ``(new_params,
  new_opt_state, support_loss)``."""
  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
  if first_order:
    grads = jax.lax.stop_gradient(grads)
  if mask is not None:
    grads = jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), grads, mask)
  direction, opt_state = optimizer.update(grads, opt_state, params)
  alphas = broadcast_alpha(alpha, params)
  keep = mask if mask is not None else jax.tree.map(lambda _: True, params)
  new = jax.tree.map(lambda p, a, d, m: p - (a * d).astype(p.dtype) if m else p,
                     params, alphas, direction, keep)
  return new, opt_state, loss


INNER_OPTIMIZERS = ("sgd", "momentum", "adam")


def inner_optimizer(name: str) -> Any:
  """The direction of a named inner optimizer (its rate is ``alpha``): ``"sgd"`` is
  ``None`` (plain gradient steps), ``"momentum"`` ``optax.trace(0.9)`` (heavy ball),
  ``"adam"`` ``optax.scale_by_adam(eps_root=1e-8)`` (``eps_root`` keeps its second
  derivative finite where a gradient is zero)."""
  import optax

  if name == "sgd":
    return None
  if name == "momentum":
    return optax.trace(decay=0.9)
  if name == "adam":
    return optax.scale_by_adam(eps_root=1e-8)
  raise ValueError(f"inner optimizer {name!r}: use one of {INNER_OPTIMIZERS}")


def adapt(loss_fn: LossFn, params: Any, alpha: Any, x: Any, y: Any, *, inner_steps: int = 1,
          first_order: bool = False, unroll: bool | int = True,
          remat: bool = False, mask: Any = None, optimizer: Any = None) -> tuple[Any, jax.Array]:
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
    mask: which parameters adapt (a pytree of bools, see :func:`param_mask`); ``None``:
      all of them.
    optimizer: ``None`` for SGD, or an Optax direction (see :func:`optimizer_step`,
      :func:`inner_optimizer`) whose state starts fresh for each task and is
      differentiated through.

  Returns:
    ``(adapted_params, support_losses)`` with ``support_losses`` of shape
    ``[inner_steps]`` (the loss before each step).
  """
  if inner_steps < 0:
    raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")

  if optimizer is None:
    def body(p, _):
      return sgd_step(loss_fn, p, alpha, x, y, first_order=first_order, mask=mask)
    carry = params
  else:
    def body(c, _):
      p, s, loss = optimizer_step(loss_fn, *c, alpha, x, y, optimizer,
                                  first_order=first_order, mask=mask)
      return (p, s), loss
    carry = (params, optimizer.init(params))

  if remat:
    body = jax.checkpoint(body)
    if unroll is True:
      unroll = 1
  if inner_steps == 0:
    return params, jnp.zeros((0,))
  out, losses = jax.lax.scan(body, carry, None, length=inner_steps, unroll=unroll)
  return (out if optimizer is None else out[0]), losses
