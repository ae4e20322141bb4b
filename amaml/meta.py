"""The meta step: MAML, FOMAML and Alpha MAML as one jitted, task-vmapped function.

``alpha_maml(loss_fn)`` returns a :class:`MetaLearner` whose ``step`` maps
``(state, task_batch) -> (state, metrics)``:

1. for every task (``jax.vmap``): adapt ``params`` on the support set with rate
   ``alpha`` (:func:`amaml.inner.adapt`), then take the query loss;
2. one ``jax.value_and_grad`` of the mean query loss with respect to
   ``(params, alpha)`` together gives the meta-gradient and the inner
   hypergradient ``d L / d alpha`` in the same backward pass;
3. ``params`` take an Optax step: by default D-Adaptation's AdamW, which sets the
   outer rate ``beta`` itself; an optimizer factory such as ``optax.adam`` is wrapped
   in :func:`amaml.hypergradient`, which adapts ``beta`` by hypergradient descent
   (the paper's rule, used by :func:`alpha_maml_paper`);
4. ``alpha`` (by default one rate per parameter tensor) takes a hypergradient-descent
   step (:mod:`amaml.rates`, by default the scale-free ``"normalized"`` rule) from the
   batch hypergradient, which is the *mean* over tasks: it is the derivative of the meta
   loss, itself a mean, so ``alpha_lr`` does not have to change with the meta-batch size;
5. backtracking (amaml's, on by default): if adaptation more than doubled the mean
   query loss of not adapting, only ``alpha`` changes: it halves;
6. a non-finite guard: if the loss, a gradient, a hypergradient or the new
   state is not finite, the state is left as it was (only ``step`` and
   ``nonfinite_streak`` advance) and ``metrics["nonfinite"]`` says so.

``maml`` and ``fomaml`` are the same code with Adam at a fixed ``beta``, ``alpha_lr = 0``
and no backtracking; ``alpha_maml_paper`` is the paper's additive rule for both rates.

A complete training loop on sinusoid regression:

>>> import jax, optax, amaml
>>> model = amaml.models.MLP()
>>> params = model.init(jax.random.key(0), jax.numpy.zeros((1, 1)))["params"]
>>> loss_fn = amaml.losses.mse(lambda p, x: model.apply({"params": p}, x))
>>> learner = amaml.alpha_maml(loss_fn)   # one alpha per tensor from 0.1; D-Adaptation sets beta
>>> state = learner.init(params)
>>> key = jax.random.key(1)
>>> for i in range(3):
...   key, sub = jax.random.split(key)
...   state, metrics = learner.step(state, amaml.sinusoid_tasks(sub, num_tasks=25))
>>> sorted(metrics)[:5]
['alpha', 'alpha_hypergradient', 'backtracked', 'beta', 'grad_norm']
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from amaml import inner, rates
from amaml.hd import current_hypergradient, current_learning_rate, hypergradient
from amaml.rates import DEFAULT_HYPER_LR, DEFAULT_RULE, PAPER_ALPHA_LR, PAPER_BETA_LR, PAPER_RULE
from amaml.task import TaskBatch


class MetaState(NamedTuple):
  """Everything a meta-training run carries from one step to the next."""

  params: Any  # meta-parameters theta
  alpha: Any  # inner rate(s): a scalar or a pytree like params
  alpha_state: Any  # state of alpha's update rule
  opt_state: optax.OptState  # outer optimizer state (holds beta when adapted)
  step: jax.Array  # meta-iterations taken, int32
  nonfinite_streak: jax.Array  # consecutive steps skipped by the non-finite guard


class MetaLearner(NamedTuple):
  """The functions of a meta-learning method (all pure).

  Attributes:
    init: ``params -> MetaState``.
    step: jitted ``(MetaState, TaskBatch) -> (MetaState, metrics)``.
    evaluate: jitted ``(params, alpha, TaskBatch, inner_steps=None) -> per-task metrics``:
      adapt on each support set (``inner_steps`` defaults to training's), report
      query loss and aux before and after adaptation, one value per task.
    meta_loss: ``(params, alpha, TaskBatch) -> (loss, aux)``, the mean over tasks
      of the query loss after adaptation; differentiable in ``params`` and ``alpha``.
    update: the un-jitted ``step``, to compose under ``lax.scan``, ``vmap``, ``jit``.
    adaptation_curve: jitted ``(params, alpha, TaskBatch, inner_steps) -> per-task
      metrics`` of shape ``[tasks, inner_steps + 1]``: the query loss (and aux) and the
      support loss (``"support_loss"``) after 0, 1, ..., ``inner_steps`` inner steps, one
      pass for every test-time step count (see :mod:`amaml.adaptation`).
    phases: ``()``, or ``((start, update), ...)`` with the first ``start`` 0, in order:
      ``update`` specialised to the meta steps from each ``start`` to the next. Each equals
      :attr:`update` on its steps (up to float rounding) as a smaller program: MAML++'s
      derivative-order annealing compiles its first-order and its second-order steps apart,
      where :attr:`update` holds both under ``lax.cond``, and both are compiled. A loop that
      knows its step on the host (:func:`amaml.train.train`) runs the phase's (:func:`phase_at`).
  """

  init: Callable[[Any], MetaState]
  step: Callable[[MetaState, TaskBatch], tuple[MetaState, dict]]
  evaluate: Callable[..., dict]
  meta_loss: Callable[[Any, Any, TaskBatch], tuple[jax.Array, dict]]
  update: Callable[[MetaState, TaskBatch], tuple[MetaState, dict]]
  adaptation_curve: Callable[..., dict]
  phases: tuple = ()


class Phase(NamedTuple):
  """The meta steps ``start`` to ``end`` (exclusive; ``None``: every later step) of a
  learner, and the update that runs them (:func:`phase_at`)."""

  start: int
  end: int | None
  update: Callable[[MetaState, TaskBatch], tuple[MetaState, dict]]


def phase_at(learner: MetaLearner, step: int) -> Phase:
  """The phase of ``learner`` (:attr:`MetaLearner.phases`) that holds meta ``step`` (a host
  integer); a learner without phases has one, ``update`` from step 0 on.

  >>> import amaml, jax.numpy as jnp
  >>> loss_fn = lambda p, x, y: (jnp.mean((x * p - y) ** 2), {})
  >>> learner = amaml.maml_plus_plus(loss_fn, first_order_steps=100)
  >>> [(p.start, p.end) for p in (phase_at(learner, 0), phase_at(learner, 100))]
  [(0, 100), (100, None)]
  >>> phase_at(amaml.maml(loss_fn), 100)[:2]
  (0, None)
  """
  phases = learner.phases or ((0, learner.update),)
  i = max(i for i, (start, _) in enumerate(phases) if start <= step)
  end = phases[i + 1][0] if i + 1 < len(phases) else None
  return Phase(phases[i][0], end, phases[i][1])


#: How a training log reduces each metric of :attr:`MetaLearner.step` over the steps of one
#: log line (:func:`amaml.train.train`): ``"last"`` keeps the value at the line's last step,
#: ``"sum"`` adds them up (logged as ``nonfinite_steps``); every other metric is averaged
#: over its finite values.
METRIC_REDUCTIONS = {
  "alpha": "last",
  "beta": "last",
  "epsilon": "last",
  "lam": "last",
  "nonfinite_streak": "last",
  "nonfinite": "sum",
}


def _all_finite(tree) -> jax.Array:
  leaves = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def guard(state: MetaState, ok: jax.Array, **new: Any) -> MetaState:
  """The non-finite guard of a meta step: ``state`` with the fields in ``new`` (``params``,
  ``opt_state``, ...) where ``ok``, else those fields as they were. ``step`` advances either
  way and ``nonfinite_streak`` counts the steps in a row that were not taken."""
  keep = lambda n, o: jax.tree.map(lambda a, b: jnp.where(ok, a, b), n, o)
  return state._replace(
    **{k: keep(v, getattr(state, k)) for k, v in new.items()},
    step=state.step + 1,
    nonfinite_streak=jnp.where(ok, 0, state.nonfinite_streak + 1).astype(jnp.int32),
  )


def pre_adaptation_metrics(loss_fn: Callable, params, batch: TaskBatch) -> dict:
  """``pre_loss`` and ``pre_<aux>``: the mean over tasks of the query loss (and aux) of
  ``params`` before any adaptation."""
  loss, aux = jax.vmap(loss_fn, in_axes=(None, 0, 0))(params, batch.query_x, batch.query_y)
  return {"pre_loss": jnp.mean(loss), **{f"pre_{k}": jnp.mean(v) for k, v in aux.items()}}


def tree_mean(tree) -> jax.Array:
  """The mean over leaves of each leaf's mean (how a per-layer or per-parameter ``alpha``
  is reported as one number)."""
  leaves = jax.tree.leaves(tree)
  return jnp.mean(jnp.stack([jnp.mean(x) for x in leaves]))


def alpha_maml(
  loss_fn: Callable[..., tuple[jax.Array, dict]],
  *,
  alpha: float = 0.1,
  beta: float = 1e-3,
  alpha_lr: float | None = None,
  beta_lr: float | None = None,
  optimizer: Callable[..., optax.GradientTransformation]
  | optax.GradientTransformation
  | None = None,
  inner_steps: int = 1,
  first_order: bool = False,
  alpha_granularity: str = "tensor",
  rate_rule: str = DEFAULT_RULE,
  backtrack: bool = True,
  alpha_min: float | None = 0.0,
  alpha_max: float | None = None,
  beta_min: float | None = 0.0,
  beta_max: float | None = None,
  track_pre_adaptation: bool = True,
  unroll: bool | int = True,
  remat: bool = False,
  donate: bool = False,
  inner_params: Any = None,
  alpha_update: str = "hypergradient",
  inner_optimizer: Any = None,
  multi_step_loss: int = 0,
  first_order_steps: int = 0,
  alpha_per_step: bool = False,
  per_step_params: Any = None,
  **optimizer_kwargs: Any,
) -> MetaLearner:
  """Alpha MAML (Behl, Baydin & Torr, 2019): MAML with ``alpha`` (and, with an optimizer
  factory, ``beta``) adapted online by hypergradient descent, with amaml's tuning-free
  defaults.

  What is the paper's and what is amaml's: the paper adapts ``alpha`` and ``beta``
  by hypergradient descent with the additive rule ``rate <- rate - kappa * h``
  (``rate_rule="additive"``; :func:`alpha_maml_paper` gives it with the HD paper's
  ``kappa``). The paper's text is not available here; we follow the natural
  derivation of HD through the MAML update, and for ``inner_steps > 1`` we use the
  exact derivative ``d L_query / d alpha`` through every inner step (one
  ``jax.grad``), not a one-step approximation. amaml's additions, all on by
  default, are the scale-free ``"normalized"`` rule with one hyper-learning rate
  for every problem (:data:`amaml.rates.DEFAULT_HYPER_LR`), ``backtrack``, and the
  outer optimizer: D-Adaptation instead of Adam with ``beta`` by hypergradient
  (``optimizer=optax.adam`` gives that back), because the one-step hypergradient of
  ``beta`` is biased low over a long run (Wu et al., ICLR 2018) and took ``beta``
  from 1e-3 to 4e-5 in 30 minutes of Omniglot (BENCHMARKS.md).

  Args:
    loss_fn: ``loss_fn(params, x, y) -> (loss, aux)`` for one task's set (see
      :mod:`amaml.losses`); ``aux`` is a dict of scalars (e.g. accuracy) or ``{}``.
    alpha: initial inner rate ``alpha_0``.
    beta: initial outer (meta) rate ``beta_0`` of an optimizer factory (unused by the
      default optimizer, which sets its own).
    alpha_lr: hypergradient rate for ``alpha`` (``0`` freezes it: MAML). ``None``
      takes the rule's default: :data:`amaml.rates.DEFAULT_HYPER_LR` for
      ``"normalized"`` (a relative change per step), the HD paper's ``1e-3`` for
      ``"additive"``.
    beta_lr: hypergradient rate for ``beta`` (``0`` freezes it). ``None``: the
      same default for ``"normalized"``, the HD paper's Adam value ``1e-7`` for
      ``"additive"``.
    optimizer: the outer optimizer. ``None`` (the default): amaml's choice,
      D-Adaptation's AdamW (``optax.contrib.dadapt_adamw()``, Defazio & Mishchenko,
      2023), which estimates the meta rate itself, so ``beta`` and ``beta_lr`` are
      unused (``metrics["beta"]`` reports its estimate). An Optax optimizer *factory*
      taking ``learning_rate`` (``optax.adam``, ``optax.sgd``, ...): wrapped in
      :func:`amaml.hypergradient`, its rate starts at ``beta`` and follows its
      hypergradient, the paper's outer rule. A built ``GradientTransformation``: used
      as it is (``beta`` and ``beta_lr`` unused).
    inner_steps: inner SGD steps per task.
    first_order: FOMAML (no second derivatives in the meta-gradient).
    alpha_granularity: ``"tensor"`` (the default: one ``alpha`` per parameter tensor),
      ``"scalar"`` (one for the whole model, as in the paper and in :func:`maml`) or
      ``"parameter"`` (see :func:`amaml.init_alpha`); each rate follows its own
      hypergradient, and every rate starts at ``alpha``.
    rate_rule: how ``alpha`` and ``beta`` follow their hypergradients
      (:func:`amaml.rates.rate_rule`): ``"normalized"`` (the default: Adam's
      normalised step on the hypergradient, applied to the log rate; scale-free),
      ``"additive"`` (the paper) or ``"log"``.
    backtrack: amaml's guard against a far too large ``alpha``: a step whose
      adaptation more than doubles the mean query loss of no adaptation at all (or
      makes it non-finite) changes nothing but ``alpha``, which halves. ``params`` and
      ``beta`` then never train against an ``alpha`` that hurts, and ``alpha``
      drops from any start by a factor of 1,000 in 10 steps.
    alpha_min, alpha_max, beta_min, beta_max: bounds on the rates (``None`` = unbounded). The
      default keeps both rates non-negative.
    track_pre_adaptation: also report the query loss before adaptation (one
      extra forward pass over the query sets; ``backtrack`` needs it anyway).
    unroll: ``lax.scan`` unrolling of the inner loop (``True`` = fully unrolled).
    remat: rematerialise inner steps in the backward pass (saves memory; runs the
      inner loop rolled, see :func:`amaml.adapt`).
    donate: donate the input state's buffers to ``step`` (saves memory; the
      state passed in can no longer be used).
    inner_params: which parameters the inner loop adapts (:func:`amaml.inner.param_mask`:
      a regular expression over paths such as ``"head/kernel"``, a callable or a pytree of
      bools); ``None``: all (MAML). ``"^head/"`` on Conv4 is ANIL (:func:`anil`).
    alpha_update: how ``alpha`` learns: ``"hypergradient"`` (Alpha MAML: its own rule,
      ``rate_rule``, from ``d L / d alpha``) or ``"outer"`` (Meta-SGD: the outer optimizer
      steps ``alpha`` with ``params``, from the same gradient; see :func:`meta_sgd`).
    inner_optimizer: the inner loop's optimizer: ``None`` or ``"sgd"`` (MAML's plain
      steps), ``"momentum"``, ``"adam"`` (:func:`amaml.inner.inner_optimizer`) or any
      Optax direction without a learning rate (``optax.scale_by_rms()``, ...). Its rate
      is ``alpha``, which still follows its exact hypergradient: ``d L / d alpha``
      through the inner optimizer's state.
    multi_step_loss: MAML++'s multi-step loss: ``N > 0`` trains on the weighted sum of
      the query losses after every inner step, the weights annealed over the first ``N``
      meta steps from uniform to (almost) the last step alone (:func:`msl_weights`);
      ``metrics["loss"]`` stays the query loss after the last step. The query losses are
      outputs of the inner loop's ``lax.scan`` (``unroll`` and ``remat`` apply).
    first_order_steps: MAML++'s derivative-order annealing: the first ``N`` meta steps
      are first order, the rest second order. ``step`` and ``update`` hold both orders under
      ``lax.cond`` (one program for every step, compiled with both); ``phases`` has one
      program per order, each about half the size, and :func:`amaml.train.train` compiles
      only the one it runs (BENCHMARKS.md, "MAML++ compile time").
    alpha_per_step: MAML++'s per-step rates: one set of rates (of ``alpha_granularity``)
      for every inner step, ``alpha`` then has a leading axis of length ``inner_steps``
      (:func:`amaml.init_alpha` with ``steps``); a longer test-time adaptation reuses the
      last step's rates.
    per_step_params: MAML++'s per-step batch-norm weights: the parameters selected as for
      ``inner_params`` (``"^norm"`` is Conv4's batch-norm scale and shift) get one copy per
      inner step, learned by the outer optimizer only: inner step ``k`` computes its support
      loss with copy ``k`` and the query loss after ``k`` steps uses copy ``k - 1``
      (:func:`amaml.inner.inner_step`). ``init`` takes the model's parameters and makes the
      copies; ``state.params`` then holds them (read one step's model parameters with
      :func:`amaml.inner.at_step`).
    **optimizer_kwargs: passed to ``optimizer`` (``b1``, ``momentum``, ...).
  """
  alpha_lr, beta_lr = _default_hyper_lrs(rate_rule, alpha_lr, beta_lr)
  if optimizer is None:
    optimizer = default_outer_optimizer()
  if isinstance(optimizer, optax.GradientTransformation):
    if optimizer_kwargs:
      raise TypeError("optimizer_kwargs need an optimizer factory, not a built optimizer")
    opt = optimizer
  else:
    opt = hypergradient(
      optimizer,
      learning_rate=beta,
      hyper_lr=beta_lr,
      rate_rule=rate_rule,
      min_rate=beta_min,
      max_rate=beta_max,
      **optimizer_kwargs,
    )
  if alpha_granularity not in inner.GRANULARITIES:
    raise ValueError(
      f"alpha_granularity must be one of {inner.GRANULARITIES}, got {alpha_granularity!r}"
    )
  if inner_steps < 1:
    raise ValueError(f"inner_steps must be >= 1 for meta-learning, got {inner_steps}")
  train_steps = inner_steps  # evaluate's default (its own inner_steps argument shadows this)
  if alpha_update not in ("hypergradient", "outer"):
    raise ValueError(f"alpha_update must be 'hypergradient' or 'outer', got {alpha_update!r}")
  alpha_rule = rates.rate_rule(alpha_lr, rate_rule, min_rate=alpha_min, max_rate=alpha_max)
  mask_of = lambda params: None if inner_params is None else inner.param_mask(params, inner_params)
  per_step_of = lambda params: (
    None if per_step_params is None else inner.param_mask(params, per_step_params)
  )
  if isinstance(inner_optimizer, str):
    inner_optimizer = inner.inner_optimizer(inner_optimizer)

  def step_kwargs(params):
    """How every inner step runs (:func:`amaml.inner.inner_step`)."""
    return dict(
      optimizer=inner_optimizer,
      mask=mask_of(params),
      alpha_per_step=alpha_per_step,
      per_step=per_step_of(params),
    )

  def after(params, steps):
    """The model's parameters for a forward pass after ``steps`` inner steps (per-step
    parameters: the copy of the last step taken)."""
    select = per_step_of(params)
    return params if select is None else inner.at_step(params, jnp.maximum(steps - 1, 0), select)

  def task_loss(params, alpha_, sx, sy, qx, qy, fo, weights):
    if weights is None:
      adapted, support_losses = inner.adapt(
        loss_fn,
        params,
        alpha_,
        sx,
        sy,
        inner_steps=inner_steps,
        first_order=fo,
        unroll=unroll,
        remat=remat,
        **step_kwargs(params),
      )
      loss, aux = loss_fn(after(adapted, inner_steps), qx, qy)
      return loss, {**aux, "support_loss": support_losses[0]}
    # the multi-step loss: the query loss after every inner step, weighted
    kwargs = step_kwargs(params)

    def body(carry, k):
      carry, support = inner.inner_step(loss_fn, carry, k, alpha_, sx, sy, first_order=fo, **kwargs)
      return carry, (support, loss_fn(after(carry[0], k + 1), qx, qy))

    _, (support, (query, aux)) = inner.scan_steps(
      body, inner.init_carry(params, inner_optimizer), inner_steps, unroll=unroll, remat=remat
    )
    last = jax.tree.map(lambda v: v[-1], aux)
    return jnp.sum(weights * query), {**last, "support_loss": support[0], "final_loss": query[-1]}

  def meta_loss(params, alpha_, batch: TaskBatch, *, step=None, first_order_=None):
    """The mean over tasks of the query loss after adaptation (with ``multi_step_loss``
    and a meta ``step``: MAML++'s weighted sum over inner steps)."""
    fo = first_order if first_order_ is None else first_order_
    weights = (
      None
      if not multi_step_loss or step is None
      else msl_weights(step, inner_steps, multi_step_loss)
    )
    losses, aux = jax.vmap(
      functools.partial(task_loss, fo=fo, weights=weights), in_axes=(None, None, 0, 0, 0, 0)
    )(params, alpha_, *batch)
    return jnp.mean(losses), jax.tree.map(jnp.mean, aux)

  annealed = first_order_steps > 0 and not first_order  # derivative-order annealing

  def meta_grads(state: MetaState, batch: TaskBatch, fo: bool | None = None):
    """The meta-loss and its gradients, first order if ``fo``; ``fo=None``: as
    ``first_order``, or with annealing by ``state.step`` (both orders under ``lax.cond``)."""
    grad = lambda fo: jax.value_and_grad(
      functools.partial(meta_loss, step=state.step, first_order_=fo), argnums=(0, 1), has_aux=True
    )(state.params, state.alpha, batch)
    if fo is not None:
      return grad(fo)
    if annealed:
      return jax.lax.cond(state.step < first_order_steps, lambda: grad(True), lambda: grad(False))
    return grad(first_order)

  outer_alpha = alpha_update == "outer"

  def init(params) -> MetaState:
    if per_step_params is not None:
      params = inner.per_step_copies(params, per_step_of(params), inner_steps)
    alpha0 = inner.init_alpha(
      params, alpha, alpha_granularity, steps=inner_steps if alpha_per_step else None
    )
    return MetaState(
      params=params,
      alpha=alpha0,
      alpha_state=alpha_rule.init(alpha0),
      opt_state=opt.init((params, alpha0) if outer_alpha else params),
      step=jnp.zeros((), jnp.int32),
      nonfinite_streak=jnp.zeros((), jnp.int32),
    )

  def update(state: MetaState, batch: TaskBatch):
    return update_with(state, batch)

  def update_with(state: MetaState, batch: TaskBatch, fo: bool | None = None):
    """``update``, first order if ``fo`` (``None``: as :func:`meta_grads` says)."""
    (loss, aux), (grads, alpha_grad) = meta_grads(state, batch, fo)
    if "final_loss" in aux:  # multi-step loss: report (and backtrack on) the last step's
      aux = dict(aux)
      loss = aux.pop("final_loss")
    if outer_alpha:  # Meta-SGD: alpha is a meta-parameter of the outer optimizer
      updates, opt_state = opt.update(
        (grads, alpha_grad), state.opt_state, (state.params, state.alpha)
      )
      params, new_alpha = optax.apply_updates((state.params, state.alpha), updates)
      if alpha_min is not None or alpha_max is not None:
        new_alpha = jax.tree.map(lambda a: jnp.clip(a, alpha_min, alpha_max), new_alpha)
      alpha_state = state.alpha_state
    else:
      updates, opt_state = opt.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      new_alpha, alpha_state = alpha_rule.update(state.alpha, alpha_grad, state.alpha_state)
    ok = _all_finite((loss, grads, alpha_grad, params, new_alpha, opt_state))
    metrics = {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "alpha_hypergradient": tree_mean(alpha_grad),
    }
    metrics.update(aux)
    if track_pre_adaptation or backtrack:
      metrics.update(
        pre_adaptation_metrics(loss_fn, jax.lax.stop_gradient(after(state.params, 0)), batch)
      )
      pre_loss = metrics["pre_loss"]
    held = state  # what a step that is not taken leaves (the guard: everything as it was)
    hurts = jnp.array(False)
    if backtrack:
      # adaptation more than doubles the loss (or overflows) on a batch that is itself fine:
      # halve alpha, hold everything else. Smaller harm is left to the hypergradient steps (at
      # a tiny alpha, noise alone makes some batches a little worse after adaptation). A
      # batch whose un-adapted query or support loss is not finite is the non-finite
      # guard's business: bad data, not a bad alpha.
      batch_ok = jnp.isfinite(pre_loss) & jnp.isfinite(aux["support_loss"])
      hurts = batch_ok & jnp.logical_not(loss - pre_loss <= jnp.abs(pre_loss))
      halved = jax.tree.map(
        lambda a: jnp.clip(0.5 * a, alpha_min, alpha_max).astype(a.dtype), state.alpha
      )
      held = state._replace(
        alpha=jax.tree.map(lambda h, a: jnp.where(hurts, h, a), halved, state.alpha)
      )
      metrics["backtracked"] = hurts
    take = ok & jnp.logical_not(hurts)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(take, a, b), new, old)
    new_state = MetaState(
      params=keep(params, held.params),
      alpha=keep(new_alpha, held.alpha),
      alpha_state=keep(alpha_state, held.alpha_state),
      opt_state=keep(opt_state, held.opt_state),
      step=state.step + 1,
      nonfinite_streak=jnp.where(ok | hurts, 0, state.nonfinite_streak + 1).astype(jnp.int32),
    )
    metrics.update(
      {
        "alpha": tree_mean(new_state.alpha),
        "nonfinite": jnp.logical_not(ok),
        "nonfinite_streak": new_state.nonfinite_streak,
      }
    )
    beta_now = current_learning_rate(new_state.opt_state)
    if beta_now is not None:
      metrics["beta"] = beta_now
    beta_h = current_hypergradient(opt_state)
    if beta_h is not None:
      metrics["beta_hypergradient"] = beta_h
    return new_state, metrics

  def adapt_eval(params, alpha_, sx, sy, qx, qy, steps):
    """Query loss and aux, and the support loss, after 0, 1, ..., ``steps`` inner steps
    (first order)."""
    kwargs = step_kwargs(params)

    def body(carry, k):
      q = loss_fn(after(carry[0], k), qx, qy)
      carry, support = inner.inner_step(
        loss_fn, carry, k, alpha_, sx, sy, first_order=True, **kwargs
      )
      return carry, (q, support)

    (last, _), (curve, support) = jax.lax.scan(
      body, inner.init_carry(params, inner_optimizer), jnp.arange(steps)
    )
    final = loss_fn(after(last, steps), qx, qy)
    final_support = loss_fn(after(last, steps), sx, sy)[0]
    curve = jax.tree.map(lambda c, f: jnp.concatenate([c, f[None]]), curve, final)
    return curve, jnp.concatenate([support, final_support[None]])

  def evaluate(params, alpha_, batch: TaskBatch, inner_steps: int | None = None):
    steps = train_steps if inner_steps is None else inner_steps

    def one(sx, sy, qx, qy):
      pre_loss, pre_aux = loss_fn(after(params, 0), qx, qy)
      adapted, _ = inner.adapt(
        loss_fn,
        params,
        alpha_,
        sx,
        sy,
        inner_steps=steps,
        first_order=True,
        unroll=1,
        **step_kwargs(params),
      )
      post_loss, post_aux = loss_fn(after(adapted, steps), qx, qy)
      out = {"pre_loss": pre_loss, "loss": post_loss}
      out.update({f"pre_{k}": v for k, v in pre_aux.items()})
      out.update(post_aux)
      return out

    return jax.vmap(one)(*batch)

  def adaptation_curve(params, alpha_, batch: TaskBatch, inner_steps: int):
    (loss, aux), support = jax.vmap(adapt_eval, in_axes=(None, None, 0, 0, 0, 0, None))(
      params, alpha_, *batch, inner_steps
    )
    return {"loss": loss, **aux, "support_loss": support}

  step = jax.jit(update, donate_argnums=(0,) if donate else ())
  return MetaLearner(
    init=init,
    step=step,
    evaluate=jax.jit(evaluate, static_argnames=("inner_steps",)),
    meta_loss=meta_loss,
    update=update,
    adaptation_curve=jax.jit(adaptation_curve, static_argnames=("inner_steps",)),
    phases=(
      (0, functools.partial(update_with, fo=True)),
      (first_order_steps, functools.partial(update_with, fo=False)),
    )
    if annealed
    else (),
  )


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


def default_outer_optimizer() -> optax.GradientTransformation:
  """amaml's outer optimizer: D-Adaptation's AdamW with its defaults (learning-rate
  multiplier 1, no weight decay). It needs no meta rate: on sinusoid and Omniglot it
  trained better from every alpha0 than Adam with beta adapted by hypergradient, whose
  one-step hypergradient lowers beta through a long run (BENCHMARKS.md, "Tuning-free
  defaults")."""
  return optax.contrib.dadapt_adamw()


def _default_hyper_lrs(rule: str, alpha_lr: float | None, beta_lr: float | None):
  """``alpha_lr``/``beta_lr`` with ``None`` replaced by the rule's default."""
  defaults = {
    "normalized": (DEFAULT_HYPER_LR, DEFAULT_HYPER_LR),
    "additive": (PAPER_ALPHA_LR, PAPER_BETA_LR),
  }
  if (alpha_lr is None or beta_lr is None) and rule not in defaults:
    raise ValueError(
      f"rate_rule={rule!r} has no default hypergradient rates: pass alpha_lr "
      "and beta_lr, or use rate_rule='normalized'"
    )
  da, db = defaults.get(rule, (None, None))
  return (da if alpha_lr is None else alpha_lr), (db if beta_lr is None else beta_lr)


def alpha_maml_paper(loss_fn: Callable, **kwargs: Any) -> MetaLearner:
  """Alpha MAML as the paper describes it: the additive rule ``rate <- rate - kappa * h``
  for ``alpha`` and ``beta``, with the HD paper's ``kappa`` (``1e-3`` for the SGD rate
  ``alpha``, ``1e-7`` for Adam's ``beta``) unless given, and no backtracking."""
  kwargs = {
    "rate_rule": PAPER_RULE,
    "backtrack": False,
    "optimizer": optax.adam,
    "alpha_granularity": "scalar",
    **kwargs,
  }
  return alpha_maml(loss_fn, **kwargs)


def maml(
  loss_fn: Callable,
  *,
  alpha: float = 0.01,
  beta: float = 1e-3,
  inner_steps: int = 1,
  first_order: bool = False,
  **kwargs: Any,
) -> MetaLearner:
  """MAML (Finn et al., 2017): :func:`alpha_maml` with ``alpha`` and ``beta`` fixed
  (one ``alpha`` for the whole model, and no backtracking)."""
  kwargs = {"backtrack": False, "optimizer": optax.adam, "alpha_granularity": "scalar", **kwargs}
  return alpha_maml(
    loss_fn,
    alpha=alpha,
    beta=beta,
    alpha_lr=0.0,
    beta_lr=0.0,
    inner_steps=inner_steps,
    first_order=first_order,
    **kwargs,
  )


def fomaml(loss_fn: Callable, **kwargs: Any) -> MetaLearner:
  """First-order MAML: :func:`maml` with ``first_order=True``."""
  return maml(loss_fn, first_order=True, **kwargs)


def meta_sgd(
  loss_fn: Callable, *, alpha: float = 0.01, beta: float = 1e-3, inner_steps: int = 1, **kwargs: Any
) -> MetaLearner:
  """Meta-SGD (Li et al., 2017): one inner rate per parameter, learned by the outer
  optimizer (Adam at a fixed ``beta``) from the same meta-gradient as the weights, and
  free to change sign (no bounds). Every rate starts at ``alpha`` (the paper draws them
  from U[0.005, 0.1]; a constant start keeps every method's ``alpha`` comparable).
  amaml's counterpart adapts the same per-parameter rates by hypergradient instead:
  ``alpha_maml(loss_fn, alpha_granularity="parameter")``."""
  return _outer_alpha(
    loss_fn,
    alpha=alpha,
    beta=beta,
    inner_steps=inner_steps,
    alpha_granularity="parameter",
    **kwargs,
  )


def _outer_alpha(loss_fn: Callable, **kwargs: Any) -> MetaLearner:
  """:func:`alpha_maml` whose ``alpha`` the outer optimizer learns with the weights (Meta-SGD,
  MAML++): Adam at a fixed ``beta``, unbounded rates, no backtracking (each overridable)."""
  kwargs = {
    "backtrack": False,
    "optimizer": optax.adam,
    "alpha_min": None,
    "alpha_max": None,
    **kwargs,
  }
  return alpha_maml(loss_fn, alpha_lr=0.0, beta_lr=0.0, alpha_update="outer", **kwargs)


def anil(loss_fn: Callable, *, inner_params: Any = "^head/", **kwargs: Any) -> MetaLearner:
  """ANIL (Raghu et al., 2020): MAML whose inner loop adapts only the head (the
  parameters whose path matches ``inner_params``, by default Conv4's ``head/``; any
  model works with its own pattern, callable or pytree of bools, see
  :func:`amaml.inner.param_mask`). The body learns in the outer loop only."""
  return maml(loss_fn, inner_params=inner_params, **kwargs)


def epsilon_schedule(
  epsilon: float = 1.0, iterations: int | None = None, schedule: str = "linear"
) -> float | optax.Schedule:
  """Reptile's outer step size over a run of ``iterations`` meta steps.

  ``"linear"`` is the paper's (Nichol, Achiam & Schulman, 2018): ``epsilon`` at step 0,
  falling linearly to 0 at step ``iterations`` (and 0 after), i.e. ``epsilon * (1 -
  t / iterations)`` at step ``t``. ``"constant"`` is ``epsilon`` itself (a number, so the
  optimizer state has the same structure as before schedules existed).

  >>> eps = epsilon_schedule(1.0, 100)
  >>> [round(float(eps(t)), 3) for t in (0, 25, 50, 100, 120)]
  [1.0, 0.75, 0.5, 0.0, 0.0]

  Args:
    epsilon: epsilon0, the step size at step 0.
    iterations: the run's meta steps (needed by ``"linear"``).
    schedule: ``"linear"`` or ``"constant"``.

  Returns:
    An Optax schedule (step count -> epsilon) or, for ``"constant"``, the number.
  """
  if schedule == "constant":
    return epsilon
  if schedule != "linear":
    raise ValueError(f"epsilon schedule {schedule!r}: use linear or constant")
  if iterations is None or iterations < 1:
    raise ValueError(
      f"iterations={iterations}: the linear epsilon schedule anneals to 0 over "
      "the run's meta steps, so it needs iterations >= 1"
    )
  return optax.linear_schedule(epsilon, 0.0, iterations)


def reptile(
  loss_fn: Callable,
  *,
  alpha: float = 0.1,
  inner_steps: int = 5,
  epsilon: float | optax.Schedule = 1.0,
  optimizer: optax.GradientTransformation | None = None,
  track_pre_adaptation: bool = True,
  donate: bool = False,
  inner_params: Any = None,
  inner_optimizer: Any = None,
) -> MetaLearner:
  """Reptile (Nichol, Achiam & Schulman, 2018): first order, no meta-gradient.

  Each task adapts ``params`` by ``inner_steps`` SGD steps at ``alpha`` on its support
  set; the outer step moves toward the mean adapted weights,
  ``theta <- theta + epsilon_t * mean_t(theta'_t - theta)``: ``optimizer`` (default
  ``optax.sgd(epsilon)``) receives ``theta - mean_t theta'_t`` as the gradient.
  ``epsilon`` is a number or an Optax schedule of the outer optimizer's step count; the
  paper's is ``epsilon_schedule(1.0, iterations)``, 1 annealed linearly to 0 (the default
  1.0 is constant). The count lives in the optimizer state, so a restored state resumes
  the schedule exactly; a step that the non-finite guard skips does not advance it.
  ``metrics["epsilon"]`` is the step size of each step when ``optimizer`` is the default.
  ``metrics["loss"]`` is the query loss after adaptation, as for the other methods.
  ``alpha`` is fixed. ``inner_optimizer="adam"`` gives the paper's inner Adam (see
  :func:`alpha_maml`), with ``alpha`` its learning rate.
  """
  own_optimizer = optimizer is None
  opt = optax.sgd(epsilon) if own_optimizer else optimizer
  epsilon_at = epsilon if callable(epsilon) else (lambda count: jnp.asarray(epsilon))
  if isinstance(inner_optimizer, str):
    inner_optimizer = inner.inner_optimizer(inner_optimizer)
  mask_of = lambda params: None if inner_params is None else inner.param_mask(params, inner_params)

  def task(params, sx, sy, qx, qy):
    adapted, support_losses = inner.adapt(
      loss_fn,
      params,
      alpha,
      sx,
      sy,
      inner_steps=inner_steps,
      first_order=True,
      mask=mask_of(params),
      optimizer=inner_optimizer,
    )
    loss, aux = loss_fn(adapted, qx, qy)
    return adapted, loss, {**aux, "support_loss": support_losses[0]}

  def meta_loss(params, alpha_, batch: TaskBatch):
    mask = mask_of(params)

    def one(sx, sy, qx, qy):
      adapted, _ = inner.adapt(
        loss_fn,
        params,
        alpha_,
        sx,
        sy,
        inner_steps=inner_steps,
        mask=mask,
        optimizer=inner_optimizer,
      )
      return loss_fn(adapted, qx, qy)

    losses, aux = jax.vmap(one)(*batch)
    return jnp.mean(losses), jax.tree.map(jnp.mean, aux)

  def init(params) -> MetaState:
    a = jnp.asarray(alpha, jnp.result_type(float))
    return MetaState(
      params=params,
      alpha=a,
      alpha_state=(),
      opt_state=opt.init(params),
      step=jnp.zeros((), jnp.int32),
      nonfinite_streak=jnp.zeros((), jnp.int32),
    )

  def update(state: MetaState, batch: TaskBatch):
    adapted, losses, aux = jax.vmap(task, in_axes=(None, 0, 0, 0, 0))(state.params, *batch)
    direction = jax.tree.map(lambda p, a: p - jnp.mean(a, axis=0), state.params, adapted)
    updates, opt_state = opt.update(direction, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    loss = jnp.mean(losses)
    ok = _all_finite((loss, params, opt_state))
    new_state = guard(state, ok, params=params, opt_state=opt_state)
    metrics = {
      "loss": loss,
      "grad_norm": optax.tree.norm(direction),
      "alpha": state.alpha,
      "nonfinite": jnp.logical_not(ok),
      "nonfinite_streak": new_state.nonfinite_streak,
      **jax.tree.map(jnp.mean, aux),
    }
    if own_optimizer:  # optax.sgd(schedule) keeps the schedule's step count in its state
      count = optax.tree_utils.tree_get(state.opt_state, "count")
      metrics["epsilon"] = epsilon_at(0 if count is None else count)
    if track_pre_adaptation:
      metrics.update(pre_adaptation_metrics(loss_fn, state.params, batch))
    return new_state, metrics

  # evaluation is MAML's: adapt on the support set at alpha, score the query set
  evaluate_like = alpha_maml(
    loss_fn,
    alpha=alpha,
    inner_steps=inner_steps,
    alpha_granularity="scalar",
    inner_params=inner_params,
    optimizer=optax.sgd(0.0),
    inner_optimizer=inner_optimizer,
  )
  step = jax.jit(update, donate_argnums=(0,) if donate else ())
  return MetaLearner(
    init=init,
    step=step,
    evaluate=evaluate_like.evaluate,
    meta_loss=meta_loss,
    update=update,
    adaptation_curve=evaluate_like.adaptation_curve,
  )


def maml_plus_plus(
  loss_fn: Callable,
  *,
  alpha: float = 0.1,
  beta: float = 1e-3,
  inner_steps: int = 5,
  multi_step_loss: int = 5000,
  first_order_steps: int = 25000,
  alpha_per_step: bool = True,
  per_step_params: Any = None,
  **kwargs: Any,
) -> MetaLearner:
  """MAML++ (Antoniou, Edwards & Storkey, 2019), each part also available alone as an
  argument of :func:`alpha_maml`:

  - learned per-layer, per-step inner rates (LSLR): one rate per parameter tensor and inner
    step, stepped by the outer optimizer (``alpha_granularity="tensor"``,
    ``alpha_update="outer"``, ``alpha_per_step``);
  - the multi-step loss, annealed over ``multi_step_loss`` meta steps (MAML++: its first
    10 epochs of 500 meta steps);
  - derivative-order annealing: first order for the first ``first_order_steps`` meta
    steps (MAML++: 50 epochs of 500), then second order;
  - per-step batch-norm scale and shift: ``per_step_params="^norm"`` on Conv4 (a pattern
    over the model's parameter paths, so any model works; ``None``: off). Conv4 normalises
    with each batch's statistics, as MAML does, so there are no running statistics to keep
    per step.

  Not offered: the cosine annealing of the outer rate (pass ``optimizer=`` a scheduled
  Optax optimizer). Outer step: Adam at ``beta``."""
  return _outer_alpha(
    loss_fn,
    alpha=alpha,
    beta=beta,
    inner_steps=inner_steps,
    alpha_granularity="tensor",
    multi_step_loss=multi_step_loss,
    first_order_steps=first_order_steps,
    alpha_per_step=alpha_per_step,
    per_step_params=per_step_params,
    **kwargs,
  )


def protonet(
  embed_fn: Callable[[Any, jax.Array], jax.Array],
  *,
  ways: int,
  optimizer: optax.GradientTransformation | None = None,
  beta: float = 1e-3,
  donate: bool = False,
) -> MetaLearner:
  """Prototypical Networks (Snell, Swersky & Zemel, 2017): a metric-based baseline with
  no inner loop. ``embed_fn(params, x) -> [n, d]`` embeds the support and query sets;
  each class's prototype is the mean embedding of its support examples, and a query's
  logits are minus its squared Euclidean distances to the ``ways`` prototypes
  (cross-entropy, accuracy). The outer step is ``optimizer`` (default Adam at ``beta``,
  the paper's 1e-3). The :class:`MetaLearner` has the usual fields; ``alpha`` is an unused
  0 and ``evaluate`` / ``adaptation_curve`` report the same loss for every step count.
  """
  opt = optimizer if optimizer is not None else optax.adam(beta)

  def task(params, sx, sy, qx, qy):
    zs, zq = embed_fn(params, sx), embed_fn(params, qx)
    onehot = jax.nn.one_hot(sy, ways, dtype=zs.dtype)  # [n_support, ways]
    protos = (onehot.T @ zs) / jnp.maximum(onehot.sum(0), 1.0)[:, None]
    logits = -jnp.sum(jnp.square(zq[:, None, :] - protos[None]), axis=-1)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, qy).mean()
    acc = jnp.mean((jnp.argmax(logits, -1) == qy).astype(logits.dtype))
    return loss, {"accuracy": acc}

  def meta_loss(params, alpha_, batch: TaskBatch):
    losses, aux = jax.vmap(task, in_axes=(None, 0, 0, 0, 0))(params, *batch)
    return jnp.mean(losses), jax.tree.map(jnp.mean, aux)

  def init(params) -> MetaState:
    return MetaState(
      params=params,
      alpha=jnp.zeros((), jnp.result_type(float)),
      alpha_state=(),
      opt_state=opt.init(params),
      step=jnp.zeros((), jnp.int32),
      nonfinite_streak=jnp.zeros((), jnp.int32),
    )

  def update(state: MetaState, batch: TaskBatch):
    (loss, aux), grads = jax.value_and_grad(meta_loss, has_aux=True)(
      state.params, state.alpha, batch
    )
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok = _all_finite((loss, grads, params, opt_state))
    new_state = guard(state, ok, params=params, opt_state=opt_state)
    return new_state, {
      "loss": loss,
      **aux,
      "grad_norm": optax.tree.norm(grads),
      "alpha": state.alpha,
      "nonfinite": jnp.logical_not(ok),
      "nonfinite_streak": new_state.nonfinite_streak,
    }

  def evaluate(params, alpha_, batch: TaskBatch, inner_steps: int | None = None):
    loss, aux = jax.vmap(task, in_axes=(None, 0, 0, 0, 0))(params, *batch)
    return {"loss": loss, "pre_loss": loss, **aux, **{f"pre_{k}": v for k, v in aux.items()}}

  def adaptation_curve(params, alpha_, batch: TaskBatch, inner_steps: int):
    out = evaluate(params, alpha_, batch)
    return {k: jnp.repeat(out[k][:, None], inner_steps + 1, axis=1) for k in ("loss", "accuracy")}

  step = jax.jit(update, donate_argnums=(0,) if donate else ())
  return MetaLearner(
    init=init,
    step=step,
    evaluate=jax.jit(evaluate, static_argnames=("inner_steps",)),
    meta_loss=meta_loss,
    update=update,
    adaptation_curve=jax.jit(adaptation_curve, static_argnames=("inner_steps",)),
  )
