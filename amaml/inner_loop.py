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

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

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


def meta_loss(loop: InnerLoop, *, first_order: bool = False, multi_step_loss: int = 0):
  """``meta_loss(params, alpha, batch, step=None) -> (loss, aux)``: the mean over tasks of
  :func:`task_loss` (aux: means over tasks). With ``multi_step_loss = N > 0`` and a meta
  ``step``, MAML++'s weighted sum over inner steps, the weights annealed over ``N`` meta
  steps (:func:`msl_weights`)."""

  def mean_loss(params, alpha, batch: TaskBatch, step=None):
    use_msl = multi_step_loss and step is not None
    weights = msl_weights(step, loop.steps, multi_step_loss) if use_msl else None
    one = functools.partial(task_loss, loop, first_order=first_order, weights=weights)
    losses, aux = jax.vmap(one, in_axes=(None, None, 0, 0, 0, 0))(params, alpha, *batch)
    return jnp.mean(losses), jax.tree.map(jnp.mean, aux)

  return mean_loss


def pre_adaptation_metrics(loop: InnerLoop, params, batch: TaskBatch) -> dict:
  """``pre_loss`` and ``pre_<aux>``: the mean over tasks of the query loss (and aux) of
  ``params`` before any adaptation (not differentiated)."""
  before = jax.lax.stop_gradient(loop.model(params, 0))
  loss, aux = jax.vmap(loop.loss_fn, in_axes=(None, 0, 0))(before, batch.query_x, batch.query_y)
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
