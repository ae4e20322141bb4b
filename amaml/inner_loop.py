"""The inner loop as one part: how a task adapts, and the losses and test-time curves built on it.

:func:`inner_loop` fixes everything about adaptation but the rates: the number of steps, the
optimizer's direction, which parameters adapt, and MAML++'s per-step rates and parameters. Its
:class:`InnerLoop` is an ``(init, update)`` pair over one task, as an Optax transform is over
one gradient: ``init(params) -> carry`` and ``update(carry, k, alpha, x, y) -> (carry,
support_loss)`` for inner step ``k``. Every gradient-based method shares it:

* :func:`meta_loss`: the mean over tasks of the query loss after adaptation (optionally
  MAML++'s multi-step loss), differentiable in ``params`` and ``alpha``;
* :func:`evaluator` and :func:`curve`: adaptation on test tasks, before and after, or after
  every step (:attr:`amaml.MetaLearner.evaluate`, :attr:`~amaml.MetaLearner.adaptation_curve`).

>>> import jax.numpy as jnp
>>> loss_fn = lambda p, x, y: (jnp.mean((x * p["w"] - y) ** 2), {})
>>> loop = inner_loop(loss_fn, steps=2)
>>> adapted, support = run(loop, {"w": jnp.array(0.0)}, 0.1, jnp.array([1.0, 2.0]),
...                        jnp.array([2.0, 4.0]))
>>> round(float(adapted["w"]), 4), support.shape   # as amaml.adapt
(1.5, (2,))
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from amaml import inner
from amaml.task import TaskBatch


class InnerLoop(NamedTuple):
  """One task's adaptation (:func:`inner_loop`), all pure functions.

  Attributes:
    init: ``params -> carry``, the ``(params, inner optimizer state)`` that steps carry.
    update: ``(carry, k, alpha, x, y, first_order=False) -> (carry, support_loss)``, inner
      step ``k`` on the support set ``x, y``; ``support_loss`` is the loss before it.
    model: ``(params, k) -> params``, the parameters a forward pass after ``k`` inner steps
      uses (with per-step parameters: copy ``k - 1``; else ``params`` themselves).
    meta_params: ``model params -> meta-parameters`` (adds the per-step copies, if any).
    loss_fn: ``loss_fn(params, x, y) -> (loss, aux)`` for one task's set.
    steps: inner steps in training (and at test time unless told otherwise).
    unroll, remat: how training's ``lax.scan`` runs the steps (:func:`amaml.adapt`).
  """

  init: Callable[[Any], tuple]
  update: Callable[..., tuple]
  model: Callable[[Any, Any], Any]
  meta_params: Callable[[Any], Any]
  loss_fn: Callable
  steps: int
  unroll: bool | int
  remat: bool


def inner_loop(
  loss_fn: Callable,
  *,
  steps: int = 1,
  optimizer: Any = None,
  inner_params: Any = None,
  alpha_per_step: bool = False,
  per_step_params: Any = None,
  unroll: bool | int = True,
  remat: bool = False,
) -> InnerLoop:
  """The inner loop of MAML and its relatives.

  Args:
    loss_fn: ``loss_fn(params, x, y) -> (loss, aux)`` for one task's set.
    steps: inner steps per task.
    optimizer: ``None`` or ``"sgd"`` (plain steps ``params - alpha * grad``), ``"momentum"``,
      ``"adam"`` (:func:`amaml.inner.inner_optimizer`) or an Optax direction without a
      rate; its rate is ``alpha``, differentiable through the optimizer's state.
    inner_params: which parameters adapt (:func:`amaml.inner.param_mask`: a regular
      expression over paths such as ``"head/kernel"``, a callable or a pytree of bools);
      ``None``: all (MAML). ``"^head/"`` on Conv4 is ANIL.
    alpha_per_step: ``alpha`` holds one set of rates per inner step (a leading axis of
      length ``steps``, :func:`amaml.init_alpha`); longer adaptation reuses the last.
    per_step_params: parameters (selected as by ``inner_params``) kept once per inner step
      and not adapted: step ``k`` computes its support loss with copy ``k``
      (:func:`amaml.inner.inner_step`; MAML++'s per-step batch norm, ``"^norm"`` on Conv4).
    unroll, remat: ``lax.scan`` unrolling, and rematerialisation of each step in the
      backward pass (:func:`amaml.adapt`).
  """
  if steps < 1:
    raise ValueError(f"inner_steps must be >= 1 for meta-learning, got {steps}")
  if isinstance(optimizer, str):
    optimizer = inner.inner_optimizer(optimizer)
  select = lambda params, which: None if which is None else inner.param_mask(params, which)

  same = dict(optimizer=optimizer, alpha_per_step=alpha_per_step)

  def update(carry, k, alpha, x, y, first_order=False):
    mask, per_step = select(carry[0], inner_params), select(carry[0], per_step_params)
    step = dict(first_order=first_order, mask=mask, per_step=per_step, **same)
    return inner.inner_step(loss_fn, carry, k, alpha, x, y, **step)

  def model(params, k):
    chosen = select(params, per_step_params)
    return params if chosen is None else inner.at_step(params, jnp.maximum(k - 1, 0), chosen)

  def meta_params(params):
    chosen = select(params, per_step_params)
    return params if chosen is None else inner.per_step_copies(params, chosen, steps)

  init = lambda params: inner.init_carry(params, optimizer)
  return InnerLoop(init, update, model, meta_params, loss_fn, steps, unroll, remat)


def run(loop: InnerLoop, params, alpha, x, y, *, first_order: bool = False, steps=None):
  """``loop``'s ``steps`` (default: its own) inner steps from ``params`` on one task's support
  set; returns ``(adapted params, support losses [steps])``, as :func:`amaml.adapt`."""
  body = lambda carry, k: loop.update(carry, k, alpha, x, y, first_order)
  steps = loop.steps if steps is None else steps
  (adapted, _), losses = inner.scan_steps(
    body, loop.init(params), steps, unroll=loop.unroll, remat=loop.remat
  )
  return adapted, losses


def task_loss(loop: InnerLoop, params, alpha, sx, sy, qx, qy, *, first_order=False, weights=None):
  """One task's query loss after adaptation, and its aux with ``support_loss`` (before the
  first step). With ``weights`` (one per inner step): MAML++'s multi-step loss, the weighted
  sum of the query losses after every step, inside the inner ``lax.scan``; its aux adds
  ``final_loss``, the query loss after the last step."""
  loss_fn = loop.loss_fn
  if weights is None:
    adapted, support = run(loop, params, alpha, sx, sy, first_order=first_order)
    loss, aux = loss_fn(loop.model(adapted, loop.steps), qx, qy)
    return loss, {**aux, "support_loss": support[0]}

  def body(carry, k):
    carry, support = loop.update(carry, k, alpha, sx, sy, first_order)
    return carry, (support, loss_fn(loop.model(carry[0], k + 1), qx, qy))

  _, (support, (query, aux)) = inner.scan_steps(
    body, loop.init(params), loop.steps, unroll=loop.unroll, remat=loop.remat
  )
  last = jax.tree.map(lambda v: v[-1], aux)
  return jnp.sum(weights * query), {**last, "support_loss": support[0], "final_loss": query[-1]}


def msl_weights(step: jax.Array, inner_steps: int, anneal_steps: int) -> jax.Array:
  """MAML++'s multi-step loss weights at meta ``step`` (Antoniou et al., 2019): uniform
  ``1/K`` at first; every step but the last decays linearly to ``0.03/K`` over
  ``anneal_steps`` meta steps, and the last takes the rest (the weights sum to 1).

  >>> [round(float(w), 3) for w in msl_weights(0, 4, 100)]
  [0.25, 0.25, 0.25, 0.25]
  >>> [round(float(w), 4) for w in msl_weights(100, 4, 100)]
  [0.0075, 0.0075, 0.0075, 0.9775]
  """
  k = inner_steps
  frac = jnp.minimum(jnp.asarray(step, jnp.float32) / anneal_steps, 1.0)
  early = jnp.full((k - 1,), jnp.maximum((1.0 - frac) / k, 0.03 / k))
  return jnp.concatenate([early, (1.0 - jnp.sum(early))[None]])


def meta_loss(
  loop: InnerLoop,
  *,
  first_order: bool = False,
  multi_step_loss: int = 0,
  tasks_at_once: int | None = None,
):
  """``meta_loss(params, alpha, batch, step=None) -> (loss, aux)``: the mean over tasks of
  :func:`task_loss` (aux: means over tasks). With ``multi_step_loss = N > 0`` and a meta
  ``step``, MAML++'s weighted sum over inner steps, the weights annealed over ``N`` meta
  steps (:func:`msl_weights`).

  ``tasks_at_once``: how many tasks run together. ``0``: all of them, one ``jax.vmap``.
  ``k > 0``: groups of ``k`` one after another (``jax.lax.map``); differentiated, each
  group's gradient is taken inside the loop and the gradients averaged, as a PyTorch loop
  over tasks accumulates them, so one group's activations are all that is alive at a time
  (:func:`grouped_mean`). ``None``: :func:`resolve_tasks_at_once`, one at a time where that
  is faster (large tasks on a single CPU device), else all. The values and gradients are
  the same either way, up to float rounding."""

  def mean_loss(params, alpha, batch: TaskBatch, step=None):
    use_msl = multi_step_loss and step is not None
    weights = msl_weights(step, loop.steps, multi_step_loss) if use_msl else None

    def one(params, alpha, task, weights):
      return task_loss(loop, params, alpha, *task, first_order=first_order, weights=weights)

    size = resolve_tasks_at_once(tasks_at_once, batch)
    if size < batch.support_x.shape[0]:
      return grouped_mean(one, size)(params, alpha, batch, weights)
    losses, aux = map_tasks(lambda task: one(params, alpha, task, weights), batch, size)
    return jnp.mean(losses), jax.tree.map(jnp.mean, aux)

  return mean_loss


#: From this many elements in one task's query inputs on (Omniglot's 5-way 15-query set is
#: 58,800; a sinusoid task's 10), ``tasks_at_once=None`` on a single CPU device runs the
#: tasks one at a time: their activations then stay in the cache, and the step was 1.2-1.4x
#: faster on Omniglot (BENCHMARKS.md, "One task at a time on the CPU"). Small tasks stay
#: vmapped, where a loop would only add its overhead.
ONE_AT_A_TIME_ELEMENTS = 16384


def resolve_tasks_at_once(tasks_at_once: int | None, batch: TaskBatch) -> int:
  """The number of tasks :func:`meta_loss` runs together on ``batch``: ``tasks_at_once``
  itself, ``0`` or more than the batch's tasks meaning all; ``None``: 1 on a single CPU
  device for tasks whose query inputs hold at least :data:`ONE_AT_A_TIME_ELEMENTS`
  elements, else all (on accelerators, and across devices, where the tasks are sharded)."""
  num_tasks = batch.support_x.shape[0]
  if tasks_at_once is None:
    per_task = math.prod(batch.query_x.shape[1:])
    single_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
    tasks_at_once = 1 if single_cpu and per_task >= ONE_AT_A_TIME_ELEMENTS else 0
  if tasks_at_once < 0:
    raise ValueError(f"tasks_at_once must be >= 0 (0: all tasks at once), got {tasks_at_once}")
  return num_tasks if tasks_at_once == 0 else min(tasks_at_once, num_tasks)


def map_tasks(fn: Callable, tasks, size: int):
  """``fn`` over the leading (task) axis of ``tasks``, ``size`` tasks at a time: one
  ``jax.vmap`` when ``size`` covers them all, else ``jax.lax.map`` over groups of ``size``."""
  if size >= jax.tree.leaves(tasks)[0].shape[0]:
    return jax.vmap(fn)(tasks)
  return jax.lax.map(fn, tasks, batch_size=size)


def grouped_mean(one: Callable, size: int) -> Callable:
  """``mean(params, alpha, batch, weights) -> (loss, aux)``: the mean over ``batch``'s tasks
  of ``one(params, alpha, task, weights) -> (loss, aux)``, ``size`` tasks at a time
  (``jax.lax.map``). Its derivative (a ``custom_vjp``) takes each group's gradient inside
  the loop, with respect to the arguments being differentiated, and averages them: the same
  gradient as the mean's own, and to every order of reverse mode; ``aux`` is not
  differentiable (an error says so), nor is ``weights``."""

  def values(params, alpha, batch, weights):
    return map_tasks(lambda task: one(params, alpha, task, weights), batch, size)

  def means(losses, aux):
    return jnp.mean(losses), jax.tree.map(lambda v: jnp.mean(v, 0), aux)

  @jax.custom_vjp
  def mean(params, alpha, batch, weights):
    return means(*values(params, alpha, batch, weights))

  def fwd(params, alpha, batch, weights):
    wrt = tuple(i for i, x in enumerate((params, alpha)) if _perturbed(x))
    args = jax.tree.map(lambda p: p.value, (params, alpha, batch, weights))
    params, alpha, batch, weights = args

    def each(task):
      value_and_grad = jax.value_and_grad(one, wrt, has_aux=True)
      (loss, aux), grads = value_and_grad(params, alpha, task, weights)
      return loss, aux, grads

    if wrt:
      losses, aux, grads = map_tasks(each, batch, size)
    else:
      (losses, aux), grads = values(*args), ()
    grads = dict(zip(wrt, jax.tree.map(lambda g: jnp.mean(g, 0), grads)))
    return means(losses, aux), (grads, args)

  def bwd(res, cotangent):
    grads, args = res
    loss_ct, aux_ct = cotangent
    if not all(isinstance(c, SymbolicZero) for c in jax.tree.leaves(aux_ct)):
      raise ValueError(
        "the aux of a meta loss over groups of tasks is not differentiable: "
        "use tasks_at_once=0 (all tasks at once, one vmap)"
      )
    out = [_zeros(a) for a in args]
    if not isinstance(loss_ct, SymbolicZero):
      for i, g in grads.items():
        out[i] = jax.tree.map(lambda v: (loss_ct * v).astype(v.dtype), g)
    return tuple(out)

  mean.defvjp(fwd, bwd, symbolic_zeros=True)
  return mean


def _perturbed(tree) -> bool:
  return any(p.perturbed for p in jax.tree.leaves(tree))


def _zeros(tree):
  """Zero cotangents for ``tree`` (``float0`` for integer leaves)."""
  return jax.tree.map(
    lambda x: (
      np.zeros(np.shape(x), jax.dtypes.float0)
      if not jnp.issubdtype(jnp.result_type(x), jnp.inexact)
      else jnp.zeros_like(x)
    ),
    tree,
  )


def pre_adaptation_metrics(
  loop: InnerLoop, params, batch: TaskBatch, tasks_at_once: int | None = None
) -> dict:
  """``pre_loss`` and ``pre_<aux>``: the mean over tasks of the query loss (and aux) of
  ``params`` before any adaptation (not differentiated), ``tasks_at_once`` tasks at a time
  as in :func:`meta_loss`."""
  before = jax.lax.stop_gradient(loop.model(params, 0))
  size = resolve_tasks_at_once(tasks_at_once, batch)
  one = lambda task: loop.loss_fn(before, *task)
  loss, aux = map_tasks(one, (batch.query_x, batch.query_y), size)
  return {"pre_loss": jnp.mean(loss), **{f"pre_{k}": jnp.mean(v) for k, v in aux.items()}}


def evaluator(loop: InnerLoop) -> Callable[..., dict]:
  """``evaluate(params, alpha, batch, inner_steps=None) -> per-task metrics``: each task
  adapts (first order, a rolled loop) and reports its query loss and aux before (``pre_``)
  and after."""

  def evaluate(params, alpha, batch: TaskBatch, inner_steps: int | None = None):
    steps = loop.steps if inner_steps is None else inner_steps
    rolled = loop._replace(unroll=1, remat=False)

    def one(sx, sy, qx, qy):
      pre_loss, pre_aux = loop.loss_fn(loop.model(params, 0), qx, qy)
      adapted, _ = run(rolled, params, alpha, sx, sy, first_order=True, steps=steps)
      post_loss, post_aux = loop.loss_fn(loop.model(adapted, steps), qx, qy)
      return {"pre_loss": pre_loss, "loss": post_loss, **_prefixed(pre_aux), **post_aux}

    return jax.vmap(one)(*batch)

  return evaluate


def _prefixed(aux: dict) -> dict:
  return {f"pre_{k}": v for k, v in aux.items()}


def curve(loop: InnerLoop) -> Callable[..., dict]:
  """``adaptation_curve(params, alpha, batch, inner_steps) -> per-task metrics [tasks,
  inner_steps + 1]``: the query loss (and aux) and ``support_loss`` after 0, 1, ...,
  ``inner_steps`` first-order inner steps, in one pass."""

  def one(params, alpha, sx, sy, qx, qy, steps):
    def body(carry, k):
      query = loop.loss_fn(loop.model(carry[0], k), qx, qy)
      carry, support = loop.update(carry, k, alpha, sx, sy, True)
      return carry, (query, support)

    (last, _), (queries, support) = jax.lax.scan(body, loop.init(params), jnp.arange(steps))
    final = loop.loss_fn(loop.model(last, steps), qx, qy)
    final_support = loop.loss_fn(loop.model(last, steps), sx, sy)[0]
    queries = jax.tree.map(lambda c, f: jnp.concatenate([c, f[None]]), queries, final)
    return queries, jnp.concatenate([support, final_support[None]])

  def adaptation_curve(params, alpha, batch: TaskBatch, inner_steps: int):
    (loss, aux), support = jax.vmap(one, in_axes=(None, None, 0, 0, 0, 0, None))(
      params, alpha, *batch, inner_steps
    )
    return {"loss": loss, **aux, "support_loss": support}

  return adaptation_curve
