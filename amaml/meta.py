"""The meta step, composed from parts.

A meta-learning method is a :class:`MetaStep`, an ``(init, update)`` pair of pure functions
over a :class:`MetaState`, as an Optax transform is over an optimizer state:
``init(params) -> state`` and ``update(state, task_batch) -> (state, metrics)``. The gradient
methods build it from four parts:

1. the inner loop (:func:`amaml.inner_loop.inner_loop`): steps, optimizer direction, which
   parameters adapt, per-step rates and parameters; its :func:`~amaml.inner_loop.meta_loss` is
   the mean over tasks (``jax.vmap``) of the query loss after adaptation;
2. the rule for ``alpha`` (:mod:`amaml.rates`): by hypergradient (Alpha MAML), fixed
   (:func:`amaml.rates.fixed`: MAML) or learned by the outer optimizer
   (:func:`amaml.rates.learned_by_outer`: Meta-SGD);
3. the outer optimizer, any Optax ``GradientTransformation``;
4. safeguards as wrappers (:mod:`amaml.safeguards`): the non-finite guard and backtracking.

:func:`gradient_step` joins the first three: one ``jax.value_and_grad`` of the meta loss with
respect to ``(params, alpha)`` gives the meta-gradient and the hypergradient ``dL/dalpha`` in
one backward pass. :func:`meta_learner` turns a step into the :class:`MetaLearner` that
training and evaluation use. The presets (``amaml.alpha_maml``, ``maml``, ``meta_sgd``,
``maml_plus_plus``, ``reptile``, ``protonet``, ...) are in :mod:`amaml.methods`.

MAML with an inner Adam on the head only, from the parts:

>>> import jax, optax, amaml
>>> from amaml import inner_loop as il, meta, rates, safeguards
>>> model = amaml.models.MLP()
>>> params = model.init(jax.random.key(0), jax.numpy.zeros((1, 1)))["params"]
>>> loss_fn = amaml.losses.mse(lambda p, x: model.apply({"params": p}, x))
>>> loop = il.inner_loop(loss_fn, steps=2, optimizer="adam", inner_params="^Dense_2/")
>>> step = meta.gradient_step(
...   il.meta_loss(loop), optax.adam(1e-3), rates.fixed(), init_alpha=lambda p: 0.01)
>>> learner = meta.meta_learner(meta.report_rates(safeguards.skip_nonfinite(step)), loop)
>>> state, metrics = learner.step(learner.init(params), amaml.sinusoid_tasks(jax.random.key(1), 4))
>>> sorted(metrics)[:4]
['alpha', 'alpha_hypergradient', 'grad_norm', 'loss']
>>> bool(metrics["nonfinite"]), round(float(metrics["alpha"]), 6)
(False, 0.01)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from amaml import xla_options
from amaml.hd import current_hypergradient, current_learning_rate
from amaml.task import TaskBatch


class MetaState(NamedTuple):
  """Everything a meta-training run carries from one step to the next."""

  params: Any  # meta-parameters theta
  alpha: Any  # inner rate(s): a scalar or a pytree like params
  alpha_state: Any  # state of alpha's update rule
  opt_state: optax.OptState  # outer optimizer state (holds beta when adapted)
  step: jax.Array  # meta-iterations taken, int32
  nonfinite_streak: jax.Array  # consecutive steps skipped by the non-finite guard


def as_rate(alpha):
  """``alpha`` as an array of the default float type if it is a Python number."""
  return jnp.asarray(alpha, jnp.result_type(float)) if isinstance(alpha, (int, float)) else alpha


def meta_state(params, alpha, alpha_state=(), opt_state=()) -> MetaState:
  """A :class:`MetaState` at meta step 0 (a Python number ``alpha`` as a float array). Every
  field is its own buffer, so that a jitted step can donate the state."""
  zeros = [jnp.zeros((), jnp.int32) for _ in range(2)]
  return MetaState(params, as_rate(alpha), alpha_state, opt_state, *zeros)


class MetaStep(NamedTuple):
  """A meta step as an ``(init, update)`` pair of pure functions.

  Attributes:
    init: ``params -> MetaState``.
    update: ``(MetaState, TaskBatch) -> (MetaState, metrics)``; metrics are scalars.
    phases: ``()``, or ``((start, update), ...)`` (:func:`phased`): ``update`` specialised to
      the meta steps from each ``start`` to the next, each a smaller program.
  """

  init: Callable[[Any], MetaState]
  update: Callable[[MetaState, TaskBatch], tuple[MetaState, dict]]
  phases: tuple = ()


def wrap(step: MetaStep, around: Callable[[Callable], Callable]) -> MetaStep:
  """``step`` with ``around(update)`` in place of its ``update`` and of each phase's."""
  phases = tuple((start, around(update)) for start, update in step.phases)
  return MetaStep(step.init, around(step.update), phases)


def phased(phases: Sequence[tuple[int, MetaStep]]) -> MetaStep:
  """One step from ``((start, step), ...)`` (the first ``start`` 0, in order): meta step
  ``t`` runs the ``step`` of the last ``start <= t``, chosen by ``lax.switch`` on
  ``state.step``; :attr:`MetaStep.phases` keeps each one apart. The ``init`` is the first's."""
  starts = tuple(int(start) for start, _ in phases)
  updates = [s.update for _, s in phases]

  def update(state: MetaState, batch: TaskBatch):
    index = jnp.sum(state.step >= jnp.asarray(starts)) - 1
    return jax.lax.switch(index, updates, state, batch)

  return MetaStep(phases[0][1].init, update, tuple(zip(starts, updates)))


def tree_mean(tree) -> jax.Array:
  """The mean over leaves of each leaf's mean (how a per-layer or per-parameter ``alpha``
  is reported as one number)."""
  leaves = jax.tree.leaves(tree)
  return jnp.mean(jnp.stack([jnp.mean(x) for x in leaves]))


def gradient_step(
  meta_loss: Callable,
  outer: optax.GradientTransformation,
  alpha_rule,
  *,
  init_alpha: Callable[[Any], Any],
  meta_params: Callable[[Any], Any] = lambda params: params,
) -> MetaStep:
  """The meta step of a gradient method, unguarded: ``meta_loss(params, alpha, batch, step)
  -> (loss, aux)`` differentiated with respect to ``(params, alpha)``; ``outer`` steps
  ``params``; ``alpha_rule`` (:class:`amaml.rates.RateRule`) steps ``alpha`` from its
  hypergradient, or, if ``alpha_rule.by_outer``, ``outer`` steps ``(params, alpha)`` together
  and the rule then bounds ``alpha``. ``init`` takes the model's parameters through
  ``meta_params`` and ``alpha`` from ``init_alpha(params)``. The metrics: ``loss`` (an aux
  ``final_loss`` takes its place: MAML++'s multi-step loss reports its last step), the aux,
  ``grad_norm``, ``alpha_hypergradient`` and, if ``outer`` adapts its rate by hypergradient,
  ``beta_hypergradient``."""

  def init(params) -> MetaState:
    params = meta_params(params)
    alpha = as_rate(init_alpha(params))
    opt_state = outer.init((params, alpha) if alpha_rule.by_outer else params)
    return meta_state(params, alpha, alpha_rule.init(alpha), opt_state)

  def update(state: MetaState, batch: TaskBatch):
    (loss, aux), (grads, alpha_grad) = jax.value_and_grad(meta_loss, (0, 1), has_aux=True)(
      state.params, state.alpha, batch, state.step
    )
    aux = dict(aux)
    loss = aux.pop("final_loss", loss)
    if alpha_rule.by_outer:
      updates, opt_state = outer.update(
        (grads, alpha_grad), state.opt_state, (state.params, state.alpha)
      )
      params, alpha = optax.apply_updates((state.params, state.alpha), updates)
    else:
      updates, opt_state = outer.update(grads, state.opt_state, state.params)
      params, alpha = optax.apply_updates(state.params, updates), state.alpha
    alpha, alpha_state = alpha_rule.update(alpha, alpha_grad, state.alpha_state)
    metrics = {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "alpha_hypergradient": tree_mean(alpha_grad),
      **aux,
    }
    beta_h = current_hypergradient(opt_state)
    if beta_h is not None:
      metrics["beta_hypergradient"] = beta_h
    new = MetaState(params, alpha, alpha_state, opt_state, state.step + 1, state.nonfinite_streak)
    return new, metrics

  return MetaStep(init, update)


def track_pre_adaptation(step: MetaStep, loop, tasks_at_once: int | None = None) -> MetaStep:
  """``step`` whose metrics add ``pre_loss`` and ``pre_<aux>``: the query loss (and aux) of
  the state's parameters before adaptation, one forward pass of ``loop``'s model,
  ``tasks_at_once`` tasks at a time (:func:`amaml.inner_loop.pre_adaptation_metrics`);
  :func:`amaml.safeguards.backtrack` needs it."""
  from amaml.inner_loop import pre_adaptation_metrics

  def around(update):
    def tracked(state: MetaState, batch: TaskBatch):
      new, metrics = update(state, batch)
      pre = pre_adaptation_metrics(loop, state.params, batch, tasks_at_once)
      return new, {**metrics, **pre}

    return tracked

  return wrap(step, around)


def report(step: MetaStep, metrics_of: Callable[[MetaState], dict]) -> MetaStep:
  """``step`` whose metrics add ``metrics_of(new state)`` (after every safeguard inside)."""

  def around(update):
    def reported(state: MetaState, batch: TaskBatch):
      new, metrics = update(state, batch)
      return new, {**metrics, **metrics_of(new)}

    return reported

  return wrap(step, around)


def rate_metrics(state: MetaState) -> dict:
  """``alpha`` (:func:`tree_mean`), ``nonfinite_streak`` and, where the outer optimizer
  has one (:func:`amaml.current_learning_rate`), ``beta``."""
  out = {"alpha": tree_mean(state.alpha), "nonfinite_streak": state.nonfinite_streak}
  beta = current_learning_rate(state.opt_state)
  return out if beta is None else {**out, "beta": beta}


def report_rates(step: MetaStep) -> MetaStep:
  """``step`` reporting the rates it leaves (:func:`rate_metrics`)."""
  return report(step, rate_metrics)


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
      ``update`` specialised to the meta steps from each ``start`` to the next
      (:func:`phased`). Each equals :attr:`update` on its steps (up to float rounding) as a
      smaller program: MAML++'s derivative-order annealing compiles its first-order and its
      second-order steps apart, where :attr:`update` holds both under ``lax.switch``. A loop
      that knows its step on the host (:func:`amaml.train.train`) runs the phase's
      (:func:`phase_at`).
  """

  init: Callable[[Any], MetaState]
  step: Callable[[MetaState, TaskBatch], tuple[MetaState, dict]]
  evaluate: Callable[..., dict]
  meta_loss: Callable[[Any, Any, TaskBatch], tuple[jax.Array, dict]]
  update: Callable[[MetaState, TaskBatch], tuple[MetaState, dict]]
  adaptation_curve: Callable[..., dict]
  phases: tuple = ()


def meta_learner(
  step: MetaStep,
  loop=None,
  *,
  meta_loss: Callable | None = None,
  evaluate: Callable | None = None,
  adaptation_curve: Callable | None = None,
  donate: bool = False,
) -> MetaLearner:
  """The :class:`MetaLearner` of ``step``: ``step`` jitted (``donate``: the input state's
  buffers are donated), and the meta loss and test-time functions of the inner ``loop``
  (:mod:`amaml.inner_loop`) unless given (un-jitted; they are jitted here)."""
  if loop is not None:
    from amaml import inner_loop

    meta_loss = meta_loss or inner_loop.meta_loss(loop)
    evaluate = evaluate or inner_loop.evaluator(loop)
    adaptation_curve = adaptation_curve or inner_loop.curve(loop)
  return MetaLearner(
    init=step.init,
    step=xla_options.jit(step.update, donate_argnums=(0,) if donate else ()),
    evaluate=xla_options.jit(evaluate, static_argnames=("inner_steps",)),
    meta_loss=meta_loss,
    update=step.update,
    adaptation_curve=xla_options.jit(adaptation_curve, static_argnames=("inner_steps",)),
    phases=step.phases,
  )


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


def __getattr__(name: str):
  """``amaml.meta.<preset>`` (e.g. ``amaml.meta.alpha_maml``): the presets of
  :mod:`amaml.methods`, and ``msl_weights`` of :mod:`amaml.inner_loop`."""
  from amaml import methods  # the presets import this module: resolved on first use

  if name in methods.__all__:
    return getattr(methods, name)
  if name == "msl_weights":
    from amaml.inner_loop import msl_weights

    return msl_weights
  raise AttributeError(f"module 'amaml.meta' has no attribute {name!r}")
