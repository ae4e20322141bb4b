"""iMAML (Rajeswaran, Finn, Kakade & Levine, 2019): the meta-gradient by implicit differentiation.

Each task adapts ``params`` (``theta``) by solving a regularised problem on its support set::

    phi*(theta, lam) = argmin_phi G(phi),   G(phi) = L_s(phi) + (lam / 2) |phi - theta|^2

with ``inner_steps`` steps of gradient descent at rate ``alpha`` (or of an inner optimizer's
direction), stopping early once ``|grad G| <= inner_tol``. The solver is *not*
differentiated through: the meta-gradient comes from the optimality condition alone, so
memory does not grow with ``inner_steps`` (``benchmarks/memory.py``).

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
mean over tasks) is the mean of the tasks' ``dL_q/dlam``. With ``lam_lr > 0``, ``lam``
follows it by the rule of Alpha MAML's ``alpha`` (:mod:`amaml.rates`; by default the
scale-free ``"normalized"`` rule, which moves ``log lam`` and so keeps ``lam`` positive).

Both derivatives are one ``jax.custom_vjp`` (:func:`implicit_adapt`), so ``jax.grad`` of
:attr:`~amaml.meta.MetaLearner.meta_loss` with respect to ``params`` (and ``lam``) is the
implicit meta-gradient (and hypergradient).

Test-time adaptation (``evaluate``, ``adaptation_curve``) is the same proximal inner loop
with the same ``lam``, ``alpha`` and ``inner_tol``: its step count and a multiple of
``alpha`` can be chosen on validation tasks (:func:`amaml.train.select_adaptation`) as for
the other methods.

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
import numpy as np
import optax

from amaml import inner, inner_loop, meta, rates, safeguards
from amaml.defaults import BY_METHOD
from amaml.meta import MetaLearner, MetaState, MetaStep, meta_learner, meta_state
from amaml.rates import DEFAULT_RULE
from amaml.task import TaskBatch


class LamState(NamedTuple):
  """:attr:`MetaState.alpha_state <amaml.meta.MetaState>` of :func:`imaml`: the
  regularisation strength ``lam`` and the state of the rule it follows."""

  lam: jax.Array
  rule_state: Any


def _support_grad(loss_fn: Callable, x: Any, y: Any) -> Callable:
  """``phi -> grad L_s(phi)`` on one task's support set."""
  return jax.grad(lambda p: loss_fn(p, x, y)[0])


def proximal_objective(
  loss_fn: Callable, params: Any, lam: jax.Array, phi: Any, x: Any, y: Any
) -> jax.Array:
  """``G(phi) = L_s(phi) + lam/2 |phi - params|^2``: what iMAML's inner loop minimises."""
  return loss_fn(phi, x, y)[0] + 0.5 * lam * optax.tree.norm(
    optax.tree.sub(phi, params), squared=True
  )


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

  ``carry = (phi, optimizer state, done)``: the step is ``phi - alpha * d`` with ``d`` the
  gradient of ``G`` (``optimizer=None``) or an Optax direction of it; once ``|grad G| <=
  tol`` (``done``, which stays true) ``phi`` and the state are held. Returns the new carry
  and ``|grad G|`` at the ``phi`` it started from.
  """
  phi, opt_state, done = carry
  grads = jax.tree.map(
    lambda g, p, t: g + (lam * (p - t)).astype(g.dtype),
    _support_grad(loss_fn, x, y)(phi),
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


def _init_carry(params: Any, optimizer: Any) -> tuple:
  return params, (() if optimizer is None else optimizer.init(params)), jnp.array(False)


def proximal_adapt(
  loss_fn: Callable,
  params: Any,
  lam: jax.Array,
  alpha: jax.Array,
  x: Any,
  y: Any,
  *,
  inner_steps: int,
  tol: float = 0.0,
  optimizer: Any = None,
) -> tuple[Any, dict]:
  """iMAML's inner loop: up to ``inner_steps`` :func:`proximal_step` from ``phi = params``, a
  ``lax.while_loop`` that stops once ``|grad G| <= tol`` (never, for ``tol=0``). Not meant to
  be differentiated (see :func:`implicit_adapt`).

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
    cond, body, (jnp.zeros((), jnp.int32), _init_carry(params, optimizer), zero)
  )
  return phi, {"inner_steps_taken": k - done.astype(jnp.int32), "inner_grad_norm": grad_norm}


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
  _, vjp = jax.vjp(_support_grad(loss_fn, x, y), phi)
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
  """``adapt(params, lam, alpha, x, y) -> (phi*, info)``: :func:`proximal_adapt` with
  iMAML's implicit derivative as its ``jax.custom_vjp``. The cotangent ``g`` of ``phi*``
  maps to ``v = (I + H / lam)^-1 g`` for ``params`` (:func:`implicit_gradient`) and to
  ``-(phi* - params)^T v / lam`` for ``lam`` (the module docstring derives both); ``alpha``
  and the data get zero. Second derivatives of it are not defined."""
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
  implicit function theorem and conjugate gradient (derivations in :mod:`amaml.imaml`).

  Args:
    loss_fn: ``loss_fn(params, x, y) -> (loss, aux)`` for one task's set.
    lam: the regularisation strength ``lambda``: the inner loop minimises ``L_s(phi) +
      lam/2 |phi - params|^2``. Larger: adaptation stays nearer ``params``.
    alpha: the inner solver's step (its learning rate); fixed. Gradient descent on the
      regularised problem is stable for ``alpha < 2 / (L + lam)``, ``L`` the support
      loss's curvature.
    inner_steps: the most inner steps per task (training, and test time by default).
    cg_steps: conjugate-gradient steps for ``(I + H / lam) v = g`` (the paper: 5).
    cg_tol: CG's relative residual tolerance (it stops earlier once reached).
    inner_tol: the inner solver's own tolerance: a task stops once the gradient norm of
      the regularised problem is at most this (``0``: always ``inner_steps`` steps).
    inner_optimizer: ``None`` or ``"sgd"`` (gradient descent), ``"momentum"``, ``"adam"``
      (:func:`amaml.inner.inner_optimizer`) or an Optax direction without a rate; its
      rate is ``alpha``. The implicit gradient holds for any solver that reaches ``phi*``.
    optimizer: the outer optimizer, a built ``optax.GradientTransformation``; ``None``:
      Adam at ``beta`` (as :func:`amaml.maml`).
    beta: the outer rate of the default optimizer.
    lam_lr: the hypergradient rate of ``lam`` (``0``, the default: ``lam`` is fixed);
      ``lam`` then follows ``dL_q/dlam`` by ``rate_rule``, as ``alpha`` does in Alpha MAML.
    rate_rule: ``lam``'s rule (:func:`amaml.rates.rate_rule`).
    lam_min, lam_max: bounds on a learned ``lam``.
    track_pre_adaptation: also report the query loss before adaptation.
    donate: donate the input state's buffers to ``step``.

  Returns:
    A :class:`~amaml.meta.MetaLearner`. ``state.alpha`` is ``alpha``; ``state.alpha_state``
    is a :class:`LamState` holding ``lam``. ``meta_loss``, ``evaluate`` and
    ``adaptation_curve`` take the keyword ``lam`` too: ``None`` is the ``lam`` given here,
    which is every step's ``lam`` unless ``lam_lr > 0``; a learned ``lam`` must be passed
    (``lam=state.alpha_state.lam``), and ``None`` then raises ``ValueError``. The metrics
    add ``lam``, ``lam_hypergradient``, ``inner_steps_taken`` and ``inner_grad_norm``
    (means over tasks) to the usual ones.
  """
  _check(lam, alpha, inner_steps, cg_steps, cg_tol, inner_tol, lam_lr, lam_min)
  opt = optimizer if optimizer is not None else optax.adam(beta)
  if not isinstance(opt, optax.GradientTransformation):
    raise ValueError(
      "optimizer must be a built optax.GradientTransformation (e.g. optax.adam(1e-3)) or None"
    )
  if isinstance(inner_optimizer, str):
    inner_optimizer = inner.inner_optimizer(inner_optimizer)
  lam_rule = rates.rate_rule(lam_lr, rate_rule, min_rate=lam_min, max_rate=lam_max)
  solver = dict(tol=inner_tol, optimizer=inner_optimizer)
  cg = dict(cg_steps=cg_steps, cg_tol=cg_tol)
  adapt = implicit_adapt(loss_fn, inner_steps=inner_steps, **solver, **cg)

  def lam_or_default(lam_):
    if lam_ is not None:
      return lam_
    if lam_lr:
      raise ValueError("this imaml learns lam (lam_lr > 0): pass lam=state.alpha_state.lam")
    return jnp.asarray(lam, jnp.result_type(float))

  mean_loss = _mean_loss(loss_fn, adapt)

  def meta_loss(params, alpha_, batch: TaskBatch, lam=None):
    return mean_loss(params, lam_or_default(lam), alpha_, batch)

  step = _step(mean_loss, opt, lam_rule, lam, alpha)
  if track_pre_adaptation:
    step = meta.track_pre_adaptation(step, inner_loop.inner_loop(loss_fn, steps=inner_steps))
  step = safeguards.skip_nonfinite(step, checked=("loss", "grad_norm", "lam_hypergradient"))
  step = meta.report(
    step, lambda state: {"lam": state.alpha_state.lam, "nonfinite_streak": state.nonfinite_streak}
  )
  evaluate, adaptation_curve = _test_time(loss_fn, lam_or_default, inner_steps, **solver)
  return meta_learner(
    step, meta_loss=meta_loss, evaluate=evaluate, adaptation_curve=adaptation_curve, donate=donate
  )


def _mean_loss(loss_fn: Callable, adapt: Callable) -> Callable:
  """``(params, lam, alpha, batch) -> (loss, aux)``: the mean over tasks of the query loss
  after ``adapt`` (:func:`implicit_adapt`), and of its aux and solver information."""

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


def _test_time(
  loss_fn: Callable, lam_of: Callable, default_inner_steps: int, *, tol: float, optimizer: Any
) -> tuple[Callable, Callable]:
  """iMAML's ``evaluate`` and ``adaptation_curve`` (un-jitted): the proximal inner loop at
  ``lam_of(lam)``, reporting the query loss (and aux) before and after, or after every step.
  The curve's ``"support_loss"`` (which :func:`amaml.adaptation.support_guard` judges by) is
  the objective the inner loop descends, :func:`proximal_objective`."""
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

  def adaptation_curve(params, alpha_, batch: TaskBatch, inner_steps: int, lam=None):
    lam_ = lam_of(lam)

    def one(sx, sy, qx, qy):
      step = functools.partial(proximal_step, loss_fn, params, lam_, alpha_, sx, sy, **solver)
      scores = lambda phi: (
        loss_fn(phi, qx, qy),
        proximal_objective(loss_fn, params, lam_, phi, sx, sy),
      )
      body = lambda carry, _: (step(carry)[0], scores(carry[0]))
      last, curve = jax.lax.scan(body, _init_carry(params, optimizer), None, length=inner_steps)
      return jax.tree.map(lambda c, f: jnp.concatenate([c, f[None]]), curve, scores(last[0]))

    (loss, aux), support = jax.vmap(one)(*batch)
    return {"loss": loss, **aux, "support_loss": support}

  return evaluate, adaptation_curve
