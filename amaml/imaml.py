"""iMAML (Rajeswaran, Finn, Kakade & Levine, 2019): the meta-gradient by implicit differentiation.

Each task adapts ``params`` (``theta``) by solving a regularised problem on its support set::

    phi*(theta, lam) = argmin_phi G(phi),   G(phi) = L_s(phi) + (lam / 2) |phi - theta|^2

with ``inner_steps`` steps of gradient descent at rate ``alpha`` (or of an inner optimizer's
direction), stopping early once ``|grad G| <= inner_tol`` (:mod:`amaml.proximal`). The solver
is *not* differentiated through: the meta-gradient, and the hypergradient of ``lam``, come
from the optimality condition alone (:mod:`amaml.implicit` derives both), so memory does not
grow with ``inner_steps`` (``benchmarks/memory.py``). This module assembles the learner,
:func:`imaml`; the solver's and the derivatives' functions are importable from here too.

**The learner.** ``state.alpha`` is the fixed ``alpha``; ``state.alpha_state`` is a
:class:`LamState` holding ``lam``. ``meta_loss``, ``evaluate`` and ``adaptation_curve`` take
the keyword ``lam`` too: ``None`` is the ``lam`` given to :func:`imaml`, which is every step's
``lam`` unless ``lam_lr > 0``; a learned ``lam`` must be passed (``lam=state.alpha_state.lam``),
and ``None`` then raises ``ValueError``. The metrics add ``lam``, ``lam_hypergradient``,
``inner_steps_taken`` and ``inner_grad_norm`` (means over tasks) to the usual ones.

Test-time adaptation (``evaluate``, ``adaptation_curve``) is the same proximal inner loop
with the same ``lam``, ``alpha`` and ``inner_tol``: its step count and a multiple of
``alpha`` can be chosen on validation tasks (:func:`amaml.evaluation.select_adaptation`) as
for the other methods.

>>> import jax, amaml
>>> model = amaml.models.MLP(hidden=(16, 16))
>>> params = model.init(jax.random.key(0), jax.numpy.zeros((1, 1)))["params"]
>>> loss_fn = amaml.losses.mse(lambda p, x: model.apply({"params": p}, x))
>>> learner = amaml.imaml(loss_fn, lam=1.0, alpha=0.01, inner_steps=5, cg_steps=5)
>>> batch = amaml.sinusoid_tasks(jax.random.key(1), num_tasks=4)
>>> state, metrics = learner.step(learner.init(params), batch)
>>> float(metrics["lam"]), int(metrics["inner_steps_taken"])
(1.0, 5)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from amaml import inner, inner_loop, meta, rates, safeguards
from amaml.defaults import BY_METHOD
from amaml.implicit import implicit_adapt as implicit_adapt, implicit_gradient as implicit_gradient
from amaml.meta import MetaLearner, MetaState, MetaStep, meta_learner, meta_state
from amaml.proximal import init_carry, proximal_adapt, proximal_objective, proximal_step
from amaml.rates import DEFAULT_RULE
from amaml.task import TaskBatch


class LamState(NamedTuple):
  """:attr:`MetaState.alpha_state <amaml.meta.MetaState>` of :func:`imaml`: the
  regularisation strength ``lam`` and the state of the rule it follows."""

  lam: jax.Array
  rule_state: Any


def _check(lam, alpha, inner_steps, cg_steps, cg_tol, inner_tol, lam_lr, lam_min):
  """One-line ``ValueError`` for a bad argument of :func:`imaml`."""
  if not lam > 0:
    raise ValueError(f"lam={lam} must be > 0 (the strength of the pull toward params)")
  if not alpha > 0:
    raise ValueError(f"alpha={alpha} must be > 0 (the inner solver's step)")
  if inner_steps < 1 or cg_steps < 1:
    raise ValueError(f"inner_steps={inner_steps} and cg_steps={cg_steps} must be >= 1")
  if cg_tol < 0 or inner_tol < 0 or lam_lr < 0:
    raise ValueError(f"cg_tol={cg_tol}, inner_tol={inner_tol} and lam_lr={lam_lr} must be >= 0")
  if lam_min is not None and not 0 < lam_min <= lam:
    raise ValueError(f"lam_min={lam_min} must be in (0, lam={lam}] or None")


def _outer_optimizer(optimizer: Any, beta: float) -> optax.GradientTransformation:
  """``optimizer`` if it is a built Optax optimizer; ``None``: Adam at ``beta``."""
  opt = optimizer if optimizer is not None else optax.adam(beta)
  if not isinstance(opt, optax.GradientTransformation):
    raise ValueError(
      "optimizer must be a built optax.GradientTransformation (e.g. optax.adam(1e-3)) or None"
    )
  return opt


def _solver(inner_steps: int, tol: float, optimizer: Any) -> dict:
  """The inner solver's options (:func:`~amaml.proximal.proximal_adapt`), with a named inner
  optimizer resolved (:func:`amaml.inner.inner_optimizer`)."""
  if isinstance(optimizer, str):
    optimizer = inner.inner_optimizer(optimizer)
  return dict(inner_steps=inner_steps, tol=tol, optimizer=optimizer)


def imaml(
  loss_fn: Callable[..., tuple[jax.Array, dict]],
  *,
  lam: float = BY_METHOD["imaml"]["lam"],
  alpha: float = BY_METHOD["imaml"]["alpha"],
  inner_steps: int = BY_METHOD["imaml"]["inner_steps"],
  cg_steps: int = BY_METHOD["imaml"]["cg_steps"],
  cg_tol: float = 1e-10,
  inner_tol: float = 0.0,
  inner_optimizer: Any = None,
  optimizer: Any = None,
  beta: float = BY_METHOD["imaml"]["beta"],
  lam_lr: float = 0.0,
  rate_rule: str = DEFAULT_RULE,
  lam_min: float | None = 1e-4,
  lam_max: float | None = None,
  track_pre_adaptation: bool = True,
  donate: bool = False,
) -> MetaLearner:
  """iMAML (Rajeswaran et al., 2019): the meta-gradient of a proximal inner loop by the
  implicit function theorem and conjugate gradient (derivations in :mod:`amaml.implicit`).

  Args:
    loss_fn: ``loss_fn(params, x, y) -> (loss, aux)`` for one task's set.
    lam: the regularisation strength ``lambda``: the inner loop minimises ``L_s(phi) +
      lam/2 |phi - params|^2``. Larger: adaptation stays nearer ``params``.
    alpha: the inner solver's step (its learning rate), fixed; gradient descent is stable
      for ``alpha < 2 / (L + lam)``, ``L`` the support loss's curvature.
    inner_steps: the most inner steps per task (training, and test time by default).
    cg_steps, cg_tol: conjugate-gradient steps for ``(I + H / lam) v = g`` (the paper: 5),
      and CG's relative residual tolerance (it stops earlier once reached).
    inner_tol: the inner solver's own tolerance: a task stops once the gradient norm of
      the regularised problem is at most this (``0``: always ``inner_steps`` steps).
    inner_optimizer: ``None`` or ``"sgd"`` (gradient descent), ``"momentum"``, ``"adam"``
      (:func:`amaml.inner.inner_optimizer`) or an Optax direction without a rate; its
      rate is ``alpha``. The implicit gradient holds for any solver that reaches ``phi*``.
    optimizer, beta: the outer optimizer, a built ``optax.GradientTransformation``, or
      ``None``: Adam at ``beta`` (as :func:`amaml.maml`).
    lam_lr: the hypergradient rate of ``lam`` (``0``, the default: ``lam`` is fixed);
      ``lam`` then follows ``dL_q/dlam`` by ``rate_rule``, as ``alpha`` does in Alpha MAML.
    rate_rule: ``lam``'s rule (:func:`amaml.rates.rate_rule`).
    lam_min, lam_max: bounds on a learned ``lam``.
    track_pre_adaptation: also report the query loss before adaptation.
    donate: donate the input state's buffers to ``step``.

  Returns:
    A :class:`~amaml.meta.MetaLearner` whose ``state.alpha_state`` is a :class:`LamState` and
    whose functions take the keyword ``lam`` (the module docstring tells how).
  """
  _check(lam, alpha, inner_steps, cg_steps, cg_tol, inner_tol, lam_lr, lam_min)
  opt = _outer_optimizer(optimizer, beta)
  solver = _solver(inner_steps, inner_tol, inner_optimizer)
  lam_rule = rates.rate_rule(lam_lr, rate_rule, min_rate=lam_min, max_rate=lam_max)
  adapt = implicit_adapt(loss_fn, cg_steps=cg_steps, cg_tol=cg_tol, **solver)
  mean_loss = _mean_loss(loss_fn, adapt)
  step = _step(mean_loss, opt, lam_rule, lam, alpha)
  step = _guarded(step, loss_fn, inner_steps, track_pre_adaptation)
  functions = _functions(loss_fn, mean_loss, _lam_of(lam, lam_lr), **solver)
  return meta_learner(step, **functions, donate=donate)


def _mean_loss(loss_fn: Callable, adapt: Callable) -> Callable:
  """``(params, lam, alpha, batch) -> (loss, aux)``: the mean over tasks of the query loss
  after ``adapt`` (:func:`~amaml.implicit.implicit_adapt`), and of its aux and solver
  information."""

  def task_loss(params, lam_, alpha_, sx, sy, qx, qy):
    phi, info = adapt(params, lam_, alpha_, sx, sy)
    loss, aux = loss_fn(phi, qx, qy)
    return loss, {**aux, **info}

  def mean_loss(params, lam_, alpha_, batch: TaskBatch):
    losses, aux = jax.vmap(task_loss, in_axes=(None, None, None, 0, 0, 0, 0))(
      params, lam_, alpha_, *batch
    )
    return jnp.mean(losses), jax.tree.map(lambda a: jnp.mean(a.astype(losses.dtype)), aux)

  return mean_loss


def _step(mean_loss: Callable, opt, lam_rule: rates.RateRule, lam: float, alpha) -> MetaStep:
  """iMAML's unguarded meta step: ``opt`` steps ``params`` on the implicit meta-gradient,
  ``lam_rule`` steps ``lam`` (held in ``state.alpha_state``) on its hypergradient."""

  def init(params) -> MetaState:
    lam0 = jnp.asarray(lam, jnp.result_type(float))
    return meta_state(params, alpha, LamState(lam0, lam_rule.init(lam0)), opt.init(params))

  def update(state: MetaState, batch: TaskBatch):
    lam_ = state.alpha_state.lam
    (loss, aux), (grads, lam_grad) = jax.value_and_grad(mean_loss, argnums=(0, 1), has_aux=True)(
      state.params, lam_, state.alpha, batch
    )
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_lam, rule_state = lam_rule.update(lam_, lam_grad, state.alpha_state.rule_state)
    lam_state = LamState(new_lam, rule_state)
    new = state._replace(params=params, opt_state=opt_state, alpha_state=lam_state)
    metrics = {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads), "alpha": state.alpha}
    return new._replace(step=state.step + 1), {**metrics, "lam_hypergradient": lam_grad}

  return MetaStep(init, update)


def _guarded(step: MetaStep, loss_fn: Callable, inner_steps: int, pre_adaptation: bool):
  """``step`` tracking the query loss before adaptation (with ``pre_adaptation``), under the
  non-finite guard (which also checks ``lam``'s hypergradient), reporting ``lam``."""
  if pre_adaptation:
    step = meta.track_pre_adaptation(step, inner_loop.inner_loop(loss_fn, steps=inner_steps))
  step = safeguards.skip_nonfinite(step, checked=("loss", "grad_norm", "lam_hypergradient"))
  return meta.report(
    step, lambda state: {"lam": state.alpha_state.lam, "nonfinite_streak": state.nonfinite_streak}
  )


def _lam_of(lam: float, lam_lr: float) -> Callable:
  """``lam_ -> lam_``, and for ``lam_=None`` the fixed ``lam``: an error if ``lam`` is
  learned (``lam_lr > 0``), as the learner's ``lam`` is then the state's."""

  def lam_or_default(lam_):
    if lam_ is not None:
      return lam_
    if lam_lr:
      raise ValueError("this imaml learns lam (lam_lr > 0): pass lam=state.alpha_state.lam")
    return jnp.asarray(lam, jnp.result_type(float))

  return lam_or_default


def _functions(loss_fn, mean_loss, lam_of, *, inner_steps: int, tol: float, optimizer) -> dict:
  """The learner's ``meta_loss``, ``evaluate`` and ``adaptation_curve`` (un-jitted), each
  with the keyword ``lam`` (read by ``lam_of``)."""

  def meta_loss(params, alpha_, batch: TaskBatch, lam=None):
    return mean_loss(params, lam_of(lam), alpha_, batch)

  solver = dict(tol=tol, optimizer=optimizer)
  return dict(
    meta_loss=meta_loss,
    evaluate=_evaluator(loss_fn, lam_of, inner_steps, **solver),
    adaptation_curve=_curve(loss_fn, lam_of, **solver),
  )


def _evaluator(
  loss_fn: Callable, lam_of: Callable, default_inner_steps: int, *, tol: float, optimizer: Any
) -> Callable:
  """iMAML's ``evaluate``: each task's query loss (and aux) before and after the proximal
  inner loop at ``lam_of(lam)`` (``tol`` and ``optimizer``: the solver's)."""
  solver = dict(tol=tol, optimizer=optimizer)

  def evaluate(params, alpha_, batch: TaskBatch, inner_steps: int | None = None, lam=None):
    steps = default_inner_steps if inner_steps is None else inner_steps
    lam_ = lam_of(lam)

    def one(sx, sy, qx, qy):
      pre_loss, pre_aux = loss_fn(params, qx, qy)
      phi, _ = proximal_adapt(loss_fn, params, lam_, alpha_, sx, sy, inner_steps=steps, **solver)
      post_loss, post_aux = loss_fn(phi, qx, qy)
      return {
        "pre_loss": pre_loss,
        "loss": post_loss,
        **post_aux,
        **{f"pre_{k}": v for k, v in pre_aux.items()},
      }

    return jax.vmap(one)(*batch)

  return evaluate


def _curve(loss_fn: Callable, lam_of: Callable, *, tol: float, optimizer: Any) -> Callable:
  """iMAML's ``adaptation_curve``: each task's query loss (and aux) after 0, 1, ...,
  ``inner_steps`` proximal steps at ``lam_of(lam)``. Its ``"support_loss"`` (which
  :func:`amaml.adaptation.support_guard` judges by) is the objective the inner loop descends,
  :func:`~amaml.proximal.proximal_objective`."""

  def adaptation_curve(params, alpha_, batch: TaskBatch, inner_steps: int, lam=None):
    lam_ = lam_of(lam)

    def one(sx, sy, qx, qy):
      step = functools.partial(
        proximal_step, loss_fn, params, lam_, alpha_, sx, sy, tol=tol, optimizer=optimizer
      )
      scores = lambda phi: (
        loss_fn(phi, qx, qy),
        proximal_objective(loss_fn, params, lam_, phi, sx, sy),
      )
      body = lambda carry, _: (step(carry)[0], scores(carry[0]))
      last, curve = jax.lax.scan(body, init_carry(params, optimizer), None, length=inner_steps)
      return jax.tree.map(lambda c, f: jnp.concatenate([c, f[None]]), curve, scores(last[0]))

    (loss, aux), support = jax.vmap(one)(*batch)
    return {"loss": loss, **aux, "support_loss": support}

  return adaptation_curve
