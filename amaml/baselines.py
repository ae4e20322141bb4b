"""The methods with their own update over amaml's parts: Reptile and Prototypical Networks.

Both are :class:`amaml.meta.MetaStep` s under the non-finite guard
(:func:`amaml.safeguards.skip_nonfinite`); Reptile adapts with the inner loop of
:mod:`amaml.inner_loop` and evaluates as MAML does.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from amaml import inner_loop, meta, safeguards
from amaml.defaults import BY_METHOD
from amaml.meta import MetaLearner, MetaState, MetaStep, meta_learner, meta_state
from amaml.task import TaskBatch


def epsilon_schedule(
  epsilon: float = 1.0, iterations: int | None = None, schedule: str = "linear"
) -> float | optax.Schedule:
  """Reptile's outer step size over a run of ``iterations`` meta steps.

  ``"linear"`` is the paper's (Nichol, Achiam & Schulman, 2018): ``epsilon`` at step 0,
  falling linearly to 0 at step ``iterations`` (and 0 after), i.e. ``epsilon * (1 -
  t / iterations)`` at step ``t``. ``"constant"`` is ``epsilon`` itself (a number, so the
  optimizer state has no schedule count to restore).

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
  alpha: float = BY_METHOD["reptile"]["alpha"],
  inner_steps: int = BY_METHOD["reptile"]["inner_steps"],
  epsilon: float | optax.Schedule = BY_METHOD["reptile"]["epsilon"],
  optimizer: optax.GradientTransformation | None = None,
  track_pre_adaptation: bool = True,
  donate: bool = False,
  inner_params: Any = None,
  inner_optimizer: Any = None,
) -> MetaLearner:
  """Reptile (Nichol, Achiam & Schulman, 2018): first order, no meta-gradient.

  Each task adapts ``params`` by ``inner_steps`` steps at ``alpha`` on its support set (the
  inner loop of :mod:`amaml.inner_loop`; ``inner_optimizer="adam"`` is the paper's inner
  Adam); the outer step moves toward the mean adapted weights, ``theta <- theta +
  epsilon_t * mean_t(theta'_t - theta)``: ``optimizer`` (default ``optax.sgd(epsilon)``)
  receives ``theta - mean_t theta'_t`` as the gradient. ``epsilon`` is a number or an Optax
  schedule of the outer optimizer's step count; the paper's is ``epsilon_schedule(1.0,
  iterations)``, 1 annealed linearly to 0 (the default 1.0 is constant). The count lives in
  the optimizer state, so a restored state resumes the schedule exactly; a step that the
  non-finite guard skips does not advance it. ``metrics["epsilon"]``: each step's size (with
  the default ``optimizer``). ``alpha`` is fixed; ``loss`` and evaluation are MAML's.
  """
  own_optimizer = optimizer is None
  opt = optax.sgd(epsilon) if own_optimizer else optimizer
  loop = inner_loop.inner_loop(
    loss_fn, steps=inner_steps, optimizer=inner_optimizer, inner_params=inner_params
  )
  update = _reptile_update(loop, opt, alpha, epsilon, report_epsilon=own_optimizer)
  step = MetaStep(lambda params: meta_state(params, alpha, (), opt.init(params)), update)
  if track_pre_adaptation:
    step = meta.track_pre_adaptation(step, loop)
  step = safeguards.skip_nonfinite(step, checked=("loss",))
  step = meta.report(step, lambda state: {"nonfinite_streak": state.nonfinite_streak})
  return meta_learner(step, loop, donate=donate)


def _reptile_update(
  loop: inner_loop.InnerLoop, opt: optax.GradientTransformation, alpha, epsilon, *, report_epsilon
) -> Callable:
  """Reptile's unguarded update: each task adapts first order by ``loop`` at ``alpha``, and
  ``opt`` steps ``params`` on ``theta - mean_t theta'_t``. With ``report_epsilon`` (``opt`` is
  ``optax.sgd(epsilon)``), ``metrics["epsilon"]`` is the step's size."""
  epsilon_at = epsilon if callable(epsilon) else (lambda count: jnp.asarray(epsilon))

  def task(params, sx, sy, qx, qy):
    adapted, support = inner_loop.run(loop, params, alpha, sx, sy, first_order=True)
    loss, aux = loop.loss_fn(adapted, qx, qy)
    return adapted, loss, {**aux, "support_loss": support[0]}

  def update(state: MetaState, batch: TaskBatch):
    adapted, losses, aux = jax.vmap(task, in_axes=(None, 0, 0, 0, 0))(state.params, *batch)
    direction = jax.tree.map(lambda p, a: p - jnp.mean(a, axis=0), state.params, adapted)
    updates, opt_state = opt.update(direction, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state._replace(params=params, opt_state=opt_state, step=state.step + 1)
    metrics = {
      "loss": jnp.mean(losses),
      "grad_norm": optax.tree.norm(direction),
      "alpha": state.alpha,
      **jax.tree.map(jnp.mean, aux),
    }
    if report_epsilon:  # optax.sgd(schedule) keeps the schedule's step count in its state
      count = optax.tree_utils.tree_get(state.opt_state, "count")
      metrics["epsilon"] = epsilon_at(0 if count is None else count)
    return new, metrics

  return update


def protonet(
  embed_fn: Callable[[Any, jax.Array], jax.Array],
  *,
  ways: int,
  optimizer: optax.GradientTransformation | None = None,
  beta: float = BY_METHOD["protonet"]["beta"],
  donate: bool = False,
) -> MetaLearner:
  """Prototypical Networks (Snell, Swersky & Zemel, 2017): a metric-based baseline with
  no inner loop. ``embed_fn(params, x) -> [n, d]`` embeds the support and query sets;
  each class's prototype is the mean embedding of its support examples, and a query's
  logits are minus its squared Euclidean distances to the ``ways`` prototypes
  (cross-entropy, accuracy). The outer step is ``optimizer`` (default Adam at ``beta``,
  the paper's 1e-3). The :class:`~amaml.meta.MetaLearner` has the usual fields; ``alpha`` is
  an unused 0 and ``evaluate`` / ``adaptation_curve`` report the same loss for every step
  count.
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

  def update(state: MetaState, batch: TaskBatch):
    (loss, aux), grads = jax.value_and_grad(meta_loss, has_aux=True)(
      state.params, state.alpha, batch
    )
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state._replace(params=params, opt_state=opt_state, step=state.step + 1)
    return new, {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads), "alpha": state.alpha}

  def evaluate(params, alpha_, batch: TaskBatch, inner_steps: int | None = None):
    loss, aux = jax.vmap(task, in_axes=(None, 0, 0, 0, 0))(params, *batch)
    return {"loss": loss, "pre_loss": loss, **aux, **{f"pre_{k}": v for k, v in aux.items()}}

  def adaptation_curve(params, alpha_, batch: TaskBatch, inner_steps: int):
    out = evaluate(params, alpha_, batch)
    return {k: jnp.repeat(out[k][:, None], inner_steps + 1, axis=1) for k in ("loss", "accuracy")}

  step = MetaStep(lambda params: meta_state(params, 0.0, (), opt.init(params)), update)
  step = safeguards.skip_nonfinite(step, checked=("loss", "grad_norm"))
  step = meta.report(step, lambda state: {"nonfinite_streak": state.nonfinite_streak})
  return meta_learner(
    step, meta_loss=meta_loss, evaluate=evaluate, adaptation_curve=adaptation_curve, donate=donate
  )
