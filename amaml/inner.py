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


def init_alpha(
  params: Any, value: float, granularity: str = "scalar", dtype=None, steps: int | None = None
) -> Any:
  """Initial inner learning rate(s).

  Args:
    params: the model parameters (a pytree).
    value: the initial rate ``alpha_0``.
    granularity: ``"scalar"`` one rate (Alpha MAML, the default); ``"tensor"`` one
      rate per parameter tensor (per layer); ``"parameter"`` one rate per scalar
      parameter (Meta-SGD-like, each adapted by its own hypergradient).
    dtype: defaults to the default float type.
    steps: ``None``: the same rates at every inner step; ``K``: one set of rates per
      inner step (MAML++'s per-step rates), a leading axis of length ``K`` on every
      rate (inner step ``k`` uses copy ``min(k, K - 1)``, see :func:`at_step`).

  >>> import jax.numpy as jnp
  >>> init_alpha({"w": jnp.ones((2, 3)), "b": jnp.ones(3)}, 0.1, "tensor")["w"].shape
  ()
  >>> init_alpha({"w": jnp.ones((2, 3)), "b": jnp.ones(3)}, 0.1, "tensor", steps=5)["w"].shape
  (5,)
  """
  dtype = dtype or jnp.result_type(float)
  lead = () if steps is None else (steps,)
  if granularity == "scalar":
    return jnp.full(lead, value, dtype)
  if granularity == "tensor":
    return jax.tree.map(lambda _: jnp.full(lead, value, dtype), params)
  if granularity == "parameter":
    return jax.tree.map(lambda p: jnp.full(lead + jnp.shape(p), value, dtype), params)
  raise ValueError(f"alpha granularity must be one of {GRANULARITIES}, got {granularity!r}")


def at_step(tree: Any, k: int | jax.Array, select: Any = None) -> Any:
  """Copy ``min(k, K - 1)`` of every leaf with one copy per inner step (a leading axis of
  length ``K``): all leaves, or those where the pytree of bools ``select`` is true.
  Steps past the last copy use the last (a longer test-time adaptation).

  >>> import jax.numpy as jnp
  >>> at_step({"a": jnp.array([1.0, 2.0]), "b": jnp.array([5.0, 6.0])}, 3, {"a": True, "b": False})
  {'a': Array(2., dtype=float32), 'b': Array([5., 6.], dtype=float32)}
  """

  def pick(x, chosen=True):
    if not chosen:
      return x
    return jax.lax.dynamic_index_in_dim(x, jnp.minimum(k, x.shape[0] - 1), keepdims=False)

  return jax.tree.map(pick, tree) if select is None else jax.tree.map(pick, tree, select)


def per_step_copies(params: Any, select: Any, steps: int) -> Any:
  """``params`` with each leaf where the pytree of bools ``select`` is true repeated ``steps``
  times on a new leading axis: one copy per inner step (MAML++'s per-step batch-norm scale
  and shift), read back by :func:`at_step`."""
  return jax.tree.map(
    lambda p, s: jnp.broadcast_to(p, (steps, *jnp.shape(p))) if s else p, params, select
  )


def broadcast_alpha(alpha: Any, params: Any) -> Any:
  """``alpha`` as a pytree shaped like ``params`` (a scalar is shared by all leaves)."""
  if jax.tree.structure(alpha) == jax.tree.structure(params):
    return alpha
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(alpha)) and jnp.ndim(alpha) == 0:
    return jax.tree.map(lambda _: alpha, params)
  raise ValueError(
    "alpha must be a scalar or a pytree with the structure of params (see "
    f"amaml.init_alpha); got structure {jax.tree.structure(alpha)} for params "
    f"{jax.tree.structure(params)}"
  )


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
    lambda kp, leaf: bool(select_fn("/".join(_key_name(k) for k in kp), leaf)), params
  )
  if not any(jax.tree.leaves(mask)):
    raise ValueError(
      f"no parameter matches {select!r}; parameter paths are {[p for p, _ in _paths(params)]}"
    )
  return mask


def _key_name(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _paths(params):
  return [
    ("/".join(_key_name(k) for k in kp), leaf)
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  ]


def sgd_step(
  loss_fn: LossFn, params, alpha, x, y, *, first_order: bool = False, mask: Any = None
) -> tuple[Any, jax.Array]:
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
    lambda sub: loss_fn(with_selected(sub), x, y), has_aux=True
  )([leaves[i] for i in selected])
  if first_order:
    grads = jax.lax.stop_gradient(grads)
  return with_selected(
    [leaves[i] - (alpha_leaves[i] * g).astype(leaves[i].dtype) for i, g in zip(selected, grads)]
  ), loss


def optimizer_step(
  loss_fn: LossFn,
  params: Any,
  opt_state: Any,
  alpha: Any,
  x: Any,
  y: Any,
  optimizer: Any,
  *,
  first_order: bool = False,
  mask: Any = None,
) -> tuple[Any, Any, jax.Array]:
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
  new = jax.tree.map(
    lambda p, a, d, m: p - (a * d).astype(p.dtype) if m else p, params, alphas, direction, keep
  )
  return new, opt_state, loss


def init_carry(params: Any, optimizer: Any = None) -> tuple[Any, Any]:
  """What the inner loop carries from step to step: ``(params, optimizer state)``, the state
  ``()`` for SGD (``optimizer=None``)."""
  return params, (() if optimizer is None else optimizer.init(params))


def inner_step(
  loss_fn: LossFn,
  carry: tuple[Any, Any],
  k: int | jax.Array,
  alpha: Any,
  x: Any,
  y: Any,
  *,
  optimizer: Any = None,
  first_order: bool = False,
  mask: Any = None,
  alpha_per_step: bool = False,
  per_step: Any = None,
) -> tuple[tuple[Any, Any], jax.Array]:
  """Inner step ``k`` from ``carry = (params, optimizer state)`` (:func:`init_carry`): an SGD
  step (:func:`sgd_step`) or one of ``optimizer`` (:func:`optimizer_step`). With
  ``alpha_per_step`` the rates are step ``k``'s copy of ``alpha``; with ``per_step`` (a
  pytree of bools) the selected leaves of ``params`` hold one copy per step
  (:func:`per_step_copies`), the loss sees copy ``k``, and they do not adapt. Returns the
  new carry and the support loss before the step."""
  params, state = carry
  rate = at_step(alpha, k) if alpha_per_step else alpha
  if per_step is not None:
    step_loss = lambda p, x_, y_: loss_fn(at_step(p, k, per_step), x_, y_)
    mask = jax.tree.map(
      lambda m, s: bool(m) and not s,
      mask if mask is not None else jax.tree.map(lambda _: True, per_step),
      per_step,
    )
    if not any(jax.tree.leaves(mask)):
      raise ValueError("every parameter is per-step: none is left for the inner loop to adapt")
  else:
    step_loss = loss_fn
  if optimizer is None:
    params, loss = sgd_step(step_loss, params, rate, x, y, first_order=first_order, mask=mask)
    return (params, state), loss
  params, state, loss = optimizer_step(
    step_loss, params, state, rate, x, y, optimizer, first_order=first_order, mask=mask
  )
  return (params, state), loss


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


def adapt(
  loss_fn: LossFn,
  params: Any,
  alpha: Any,
  x: Any,
  y: Any,
  *,
  inner_steps: int = 1,
  first_order: bool = False,
  unroll: bool | int = True,
  remat: bool = False,
  mask: Any = None,
  optimizer: Any = None,
  alpha_per_step: bool = False,
  per_step: Any = None,
) -> tuple[Any, jax.Array]:
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
    alpha_per_step, per_step: MAML++'s per-step rates and per-step parameters (see
      :func:`inner_step`).

  Returns:
    ``(adapted_params, support_losses)`` with ``support_losses`` of shape
    ``[inner_steps]`` (the loss before each step).
  """
  if inner_steps < 0:
    raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
  if inner_steps == 0:
    return params, jnp.zeros((0,))
  step = dict(optimizer=optimizer, first_order=first_order, mask=mask, per_step=per_step)
  body = lambda carry, k: inner_step(
    loss_fn, carry, k, alpha, x, y, alpha_per_step=alpha_per_step, **step
  )
  carry = init_carry(params, optimizer)
  (out, _), losses = scan_steps(body, carry, inner_steps, unroll=unroll, remat=remat)
  return out, losses


def scan_steps(
  body: Callable, carry: Any, inner_steps: int, *, unroll: bool | int = True, remat: bool = False
) -> tuple[Any, Any]:
  """``lax.scan`` of ``body(carry, k) -> (carry, out)`` over the inner steps ``k = 0, ...,
  inner_steps - 1``, as :func:`adapt` runs them (``unroll``, ``remat``: see there; ``remat``
  implies a rolled loop). Returns the last carry and the outputs stacked over steps."""
  if remat:
    body = jax.checkpoint(body)
    if unroll is True:
      unroll = 1
  return jax.lax.scan(body, carry, jnp.arange(inner_steps), unroll=unroll)
