"""The methods: presets of a few lines over the parts of :mod:`amaml.meta`.

Every gradient method is an inner loop (:func:`amaml.inner_loop.inner_loop`), a rule for
``alpha`` (:mod:`amaml.rates`), an outer Optax optimizer and safeguards
(:mod:`amaml.safeguards`), joined by :func:`gradient_learner`; the presets choose them:

* :func:`alpha_maml` (amaml's default): one ``alpha`` per tensor by hypergradient,
  Adam at ``beta`` = 1e-3 outside, the non-finite guard and backtracking;
* :func:`alpha_maml_paper`: one ``alpha`` and Adam's ``beta``, both by the additive
  hypergradient rule, the guard;
* :func:`maml`: one fixed ``alpha``, Adam at a fixed ``beta``, the guard;
* :func:`meta_sgd` and :func:`maml_plus_plus`: ``alpha`` per parameter (Meta-SGD) or per
  tensor and inner step (MAML++) learned by the outer optimizer, Adam at ``beta``, the guard.

``fomaml`` and ``anil`` are :func:`maml` with first-order gradients or a head-only inner loop.
Reptile and ProtoNets have their own updates over the same inner loop and guard.

A complete training loop on sinusoid regression:

>>> import jax, amaml
>>> model = amaml.models.MLP()
>>> params = model.init(jax.random.key(0), jax.numpy.zeros((1, 1)))["params"]
>>> loss_fn = amaml.losses.mse(lambda p, x: model.apply({"params": p}, x))
>>> learner = amaml.alpha_maml(loss_fn)   # one alpha per tensor from 0.1; Adam at 1e-3 outside
>>> key = jax.random.key(1)
>>> state = amaml.search_alpha(learner.meta_loss, learner.init(params),
...                            amaml.sinusoid_tasks(key, num_tasks=25))  # alpha0 searched
>>> for i in range(3):
...   key, sub = jax.random.split(key)
...   state, metrics = learner.step(state, amaml.sinusoid_tasks(sub, num_tasks=25))
>>> sorted(metrics)[:5]
['alpha', 'alpha_hypergradient', 'backtracked', 'beta', 'beta_hypergradient']
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from amaml import inner, inner_loop, meta, rates, safeguards
from amaml.baselines import epsilon_schedule, protonet, reptile  # offered here too
from amaml.defaults import BETA, BY_METHOD
from amaml.hd import hypergradient
from amaml.meta import MetaLearner, MetaStep, meta_learner
from amaml.rates import DEFAULT_HYPER_LR, DEFAULT_RULE, PAPER_ALPHA_LR, PAPER_BETA_LR, PAPER_RULE


def gradient_learner(
  loss_fn: Callable,
  *,
  alpha: float,
  alpha_rule: rates.RateRule,
  outer: optax.GradientTransformation,
  alpha_granularity: str = "scalar",
  backtrack: bool = False,
  alpha_min: float | None = 0.0,
  alpha_max: float | None = None,
  first_order: bool = False,
  multi_step_loss: int = 0,
  first_order_steps: int = 0,
  track_pre_adaptation: bool = True,
  tasks_at_once: int | None = None,
  donate: bool = False,
  **loop_options: Any,
) -> MetaLearner:
  """A gradient method from its parts: the inner loop of ``loop_options``
  (:func:`amaml.inner_loop.inner_loop`: ``inner_steps``, ``inner_optimizer``,
  ``inner_params``, ``alpha_per_step``, ``per_step_params``, ``unroll``, ``remat``),
  ``alpha`` from ``alpha`` at ``alpha_granularity`` (:func:`amaml.init_alpha`) following
  ``alpha_rule``, the ``outer`` optimizer, the non-finite guard and, with ``backtrack``,
  backtracking (:mod:`amaml.safeguards`, bounded by ``alpha_min``/``alpha_max``).
  ``first_order``: FOMAML. MAML++'s options: ``multi_step_loss``
  (:func:`amaml.inner_loop.meta_loss`) and ``first_order_steps`` (first order before that
  meta step, then second order, one :func:`amaml.meta.phased` program per order).
  ``tasks_at_once``: how many of a meta-batch's tasks run together
  (:func:`amaml.inner_loop.meta_loss`: ``0`` all, one ``vmap``; ``k``: groups of ``k`` in a
  loop; ``None``: one at a time for large tasks on a single CPU device, else all)."""
  if alpha_granularity not in inner.GRANULARITIES:
    raise ValueError(
      f"alpha_granularity must be one of {inner.GRANULARITIES}, got {alpha_granularity!r}"
    )
  steps = loop_options.pop("inner_steps", 1)
  optimizer = loop_options.pop("inner_optimizer", None)
  loop = inner_loop.inner_loop(loss_fn, steps=steps, optimizer=optimizer, **loop_options)
  per_step = steps if loop_options.get("alpha_per_step") else None
  init_alpha = lambda params: inner.init_alpha(params, alpha, alpha_granularity, steps=per_step)

  def meta_loss_of(fo: bool):
    return inner_loop.meta_loss(
      loop, first_order=fo, multi_step_loss=multi_step_loss, tasks_at_once=tasks_at_once
    )

  def step_of(fo: bool) -> MetaStep:
    loss = meta_loss_of(fo)
    step = meta.gradient_step(
      loss, outer, alpha_rule, init_alpha=init_alpha, meta_params=loop.meta_params
    )
    if track_pre_adaptation or backtrack:
      step = meta.track_pre_adaptation(step, loop, tasks_at_once)
    step = safeguards.skip_nonfinite(step)
    if backtrack:
      step = safeguards.backtrack(step, alpha_min=alpha_min, alpha_max=alpha_max)
    return meta.report_rates(step)

  if first_order_steps > 0 and not first_order:  # derivative-order annealing: two programs
    step = meta.phased(((0, step_of(True)), (first_order_steps, step_of(False))))
  else:
    step = step_of(first_order)
  return meta_learner(step, loop, meta_loss=meta_loss_of(first_order), donate=donate)


def default_outer_optimizer(beta: float = BETA, **adam_kwargs: Any) -> optax.GradientTransformation:
  """amaml's outer optimizer: Adam at its library rate ``beta`` = 1e-3, held fixed (inside
  :func:`amaml.hypergradient` at ``hyper_lr=0``, so ``metrics["beta"]`` reports it). On the
  tuning-free suite's families it held within a point of MAML's best start more often than
  the learning-rate-free optimizers of ``optax.contrib`` and than beta by hypergradient
  (BENCHMARKS.md, "Tuning-free suite"). ``adam_kwargs`` go to ``optax.adam``."""
  return hypergradient(optax.adam, learning_rate=beta, hyper_lr=0.0, min_rate=0.0, **adam_kwargs)


def as_outer_optimizer(
  optimizer: Any = None,
  *,
  beta: float = 1e-3,
  beta_lr: float | None = None,
  rate_rule: str = DEFAULT_RULE,
  beta_min: float | None = 0.0,
  beta_max: float | None = None,
  **optimizer_kwargs: Any,
) -> optax.GradientTransformation:
  """The outer optimizer of ``optimizer``: ``None``, amaml's :func:`default_outer_optimizer`
  at ``beta`` (Adam, its rate fixed; with ``beta_lr`` > 0 following its hypergradient);
  a built ``GradientTransformation``, itself; an Optax factory taking ``learning_rate``
  (``optax.adam``, ...), wrapped in :func:`amaml.hypergradient`: its rate starts at ``beta``
  and follows its hypergradient by ``rate_rule`` at ``beta_lr`` (``0``: fixed; ``None``:
  ``DEFAULT_HYPER_LR``, for the default ``0``) within ``[beta_min, beta_max]``;
  ``optimizer_kwargs`` go to the factory."""
  if optimizer is None and not beta_lr:
    return default_outer_optimizer(beta, **optimizer_kwargs)
  if optimizer is None:
    optimizer = optax.adam
  if isinstance(optimizer, optax.GradientTransformation):
    if optimizer_kwargs:
      raise TypeError("optimizer_kwargs need an optimizer factory, not a built optimizer")
    return optimizer
  return hypergradient(
    optimizer,
    learning_rate=beta,
    hyper_lr=DEFAULT_HYPER_LR if beta_lr is None else beta_lr,
    rate_rule=rate_rule,
    min_rate=beta_min,
    max_rate=beta_max,
    **optimizer_kwargs,
  )


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


def alpha_maml(
  loss_fn: Callable[..., tuple[jax.Array, dict]],
  *,
  alpha: float = BY_METHOD["alpha-maml"]["alpha"],
  beta: float = BETA,
  alpha_lr: float | None = None,
  beta_lr: float | None = None,
  optimizer: Any = None,
  rate_rule: str = DEFAULT_RULE,
  alpha_granularity: str = "tensor",
  backtrack: bool = True,
  alpha_min: float | None = 0.0,
  alpha_max: float | None = None,
  alpha_max_ratio: float | None = None,
  beta_min: float | None = 0.0,
  beta_max: float | None = None,
  alpha_update: str = "hypergradient",
  **options: Any,
) -> MetaLearner:
  """Alpha MAML (Behl, Baydin & Torr, 2019) with amaml's tuning-free defaults: MAML whose
  ``alpha`` (one per parameter tensor) follows its exact hypergradient ``dL_query/dalpha``
  through every inner step by the scale-free ``"normalized"`` rule (:mod:`amaml.rates`),
  with backtracking (:func:`amaml.safeguards.backtrack`) and Adam at ``beta`` = 1e-3 as the
  outer optimizer, ``beta`` fixed (:func:`default_outer_optimizer`). The paper's own setting,
  the additive rule for ``alpha`` and for Adam's ``beta``, is :func:`alpha_maml_paper`.
  ``amaml train`` also replaces ``alpha0`` by a rate from a fixed grid, searched on the first
  meta-batch (:func:`amaml.rates.search_alpha`, ``--alpha_search``), so its run is the same
  from every ``alpha0``; call it on the first state here to do the same.

  Args:
    loss_fn: ``loss_fn(params, x, y) -> (loss, aux)`` for one task's set; ``aux``: scalars.
    alpha: the initial inner rate ``alpha_0``.
    alpha_lr, beta_lr: the hypergradient rates of ``alpha`` and of an optimizer factory's
      ``beta`` (``0`` freezes it; ``None``: the rule's default, ``DEFAULT_HYPER_LR`` for
      ``"normalized"``, the HD paper's ``1e-3`` and ``1e-7`` for ``"additive"``; for the
      default optimizer ``None`` is ``0``).
    optimizer, beta, beta_min, beta_max: the outer optimizer (:func:`as_outer_optimizer`:
      ``None`` for Adam at ``beta``, fixed unless ``beta_lr`` says otherwise; an Optax
      factory whose rate starts at ``beta`` and follows its hypergradient; or a built one).
    rate_rule: ``"normalized"``, ``"additive"`` or ``"log"`` (:func:`amaml.rates.rate_rule`),
      for ``alpha`` and an adapted ``beta``.
    alpha_granularity: ``"tensor"``, ``"scalar"`` or ``"parameter"`` (:func:`amaml.init_alpha`).
    backtrack: halve ``alpha`` instead of a step whose adaptation doubles the query loss.
    alpha_min, alpha_max: bounds on ``alpha`` (``None``: unbounded).
    alpha_max_ratio: keep every rate of a per-tensor (or per-parameter) ``alpha`` within
      this factor of the largest (:func:`amaml.rates.within_ratio`; ``None``: unbounded).
    alpha_update: ``"hypergradient"``, or ``"outer"``: the outer optimizer steps ``alpha``
      with the weights (Meta-SGD, :func:`meta_sgd`).
    **options: the inner loop's and the rest of :func:`gradient_learner`'s (``inner_steps``,
      ``first_order``, ``inner_optimizer``, ``inner_params``, ``unroll``, ``remat``,
      ``track_pre_adaptation``, ``tasks_at_once``, ``donate``, MAML++'s ``multi_step_loss``,
      ``first_order_steps``, ``alpha_per_step``, ``per_step_params``); any other keyword goes
      to the optimizer factory (``b1``, ``momentum``, ...).
  """
  if optimizer is None and beta_lr is None:  # the default: Adam with beta fixed
    beta_lr = 0.0
  alpha_lr, beta_lr = _default_hyper_lrs(rate_rule, alpha_lr, beta_lr)
  bounds = dict(alpha_min=alpha_min, alpha_max=alpha_max)
  alpha_rule = _alpha_rule(alpha_update, alpha_lr, rate_rule, alpha_min, alpha_max)
  if alpha_max_ratio is not None:
    alpha_rule = rates.within_ratio(alpha_rule, alpha_max_ratio)
  learner_options = {k: options.pop(k) for k in _LEARNER_OPTIONS if k in options}
  beta_options = dict(beta=beta, beta_lr=beta_lr, beta_min=beta_min, beta_max=beta_max)
  outer = as_outer_optimizer(optimizer, rate_rule=rate_rule, **beta_options, **options)
  return gradient_learner(
    loss_fn, alpha=alpha, alpha_rule=alpha_rule, outer=outer, **bounds,
    alpha_granularity=alpha_granularity, backtrack=backtrack, **learner_options,
  )  # fmt: skip


def _alpha_rule(alpha_update: str, alpha_lr: float, rule: str, lo, hi) -> rates.RateRule:
  """``alpha``'s rule: by hypergradient (``rule`` at ``alpha_lr``) or by the outer optimizer,
  within ``[lo, hi]``."""
  if alpha_update == "outer":
    return rates.learned_by_outer(lo, hi)
  if alpha_update == "hypergradient":
    return rates.rate_rule(alpha_lr, rule, min_rate=lo, max_rate=hi)
  raise ValueError(f"alpha_update must be 'hypergradient' or 'outer', got {alpha_update!r}")


# the keywords of gradient_learner and inner_loop that alpha_maml passes on (others: the factory)
_LEARNER_OPTIONS = (
  "inner_steps",
  "first_order",
  "inner_optimizer",
  "inner_params",
  "unroll",
  "remat",
  "track_pre_adaptation",
  "tasks_at_once",
  "donate",
  "multi_step_loss",
  "first_order_steps",
  "alpha_per_step",
  "per_step_params",
)


def alpha_maml_paper(loss_fn: Callable, **kwargs: Any) -> MetaLearner:
  """Alpha MAML as the paper describes it: the additive rule ``rate <- rate - kappa * h``
  for ``alpha`` and ``beta``, with the HD paper's ``kappa`` (``1e-3`` for the SGD rate
  ``alpha``, ``1e-7`` for Adam's ``beta``) unless given, one ``alpha``, Adam as the outer
  optimizer, and no backtracking."""
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
  alpha: float = BY_METHOD["maml"]["alpha"],
  beta: float = BY_METHOD["maml"]["beta"],
  **kwargs: Any,
) -> MetaLearner:
  """MAML (Finn et al., 2017): one fixed ``alpha``, Adam at a fixed ``beta``, no
  backtracking; ``first_order=True`` is FOMAML. Keywords as :func:`alpha_maml`'s."""
  kwargs = {"backtrack": False, "optimizer": optax.adam, "alpha_granularity": "scalar", **kwargs}
  return alpha_maml(loss_fn, alpha=alpha, beta=beta, alpha_lr=0.0, beta_lr=0.0, **kwargs)


def fomaml(loss_fn: Callable, **kwargs: Any) -> MetaLearner:
  """First-order MAML: :func:`maml` with ``first_order=True``."""
  return maml(loss_fn, first_order=True, **kwargs)


def meta_sgd(
  loss_fn: Callable,
  *,
  alpha: float = BY_METHOD["meta-sgd"]["alpha"],
  beta: float = BY_METHOD["meta-sgd"]["beta"],
  **kwargs: Any,
) -> MetaLearner:
  """Meta-SGD (Li et al., 2017): one inner rate per parameter, learned by the outer
  optimizer (Adam at a fixed ``beta``) from the same meta-gradient as the weights, and
  free to change sign (no bounds). Every rate starts at ``alpha`` (the paper draws them
  from U[0.005, 0.1]; a constant start keeps every method's ``alpha`` comparable).
  amaml's counterpart adapts the same per-parameter rates by hypergradient instead:
  ``alpha_maml(loss_fn, alpha_granularity="parameter")``."""
  return _outer_alpha(
    loss_fn, alpha=alpha, beta=beta, **{"alpha_granularity": "parameter", **kwargs}
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


def maml_plus_plus(loss_fn: Callable, **kwargs: Any) -> MetaLearner:
  """MAML++ (Antoniou, Edwards & Storkey, 2019), each part also available alone as an
  option of :func:`alpha_maml` (defaults in :data:`amaml.defaults.BY_METHOD`):

  - learned per-layer, per-step inner rates (LSLR): one rate per parameter tensor and inner
    step, stepped by the outer optimizer (``alpha_granularity="tensor"``,
    ``alpha_update="outer"``, ``alpha_per_step``);
  - the multi-step loss, annealed over ``multi_step_loss`` meta steps (MAML++: its first
    10 epochs of 500 meta steps; :func:`amaml.inner_loop.msl_weights`);
  - derivative-order annealing: first order for the first ``first_order_steps`` meta
    steps (MAML++: 50 epochs of 500), then second order;
  - per-step batch-norm scale and shift: ``per_step_params="^norm"`` on Conv4 (a pattern
    over the model's parameter paths, so any model works; ``None``: off). Conv4 normalises
    with each batch's statistics, as MAML does, so there are no running statistics to keep
    per step.

  Not offered: the cosine annealing of the outer rate (pass ``optimizer=`` a scheduled
  Optax optimizer). Outer step: Adam at ``beta``."""
  kwargs = {
    **BY_METHOD["maml++"],
    "alpha_granularity": "tensor",
    "alpha_per_step": True,
    "per_step_params": None,
    **kwargs,
  }
  return _outer_alpha(loss_fn, **kwargs)


__all__ = [
  "alpha_maml",
  "alpha_maml_paper",
  "anil",
  "default_outer_optimizer",
  "epsilon_schedule",
  "fomaml",
  "gradient_learner",
  "maml",
  "maml_plus_plus",
  "meta_sgd",
  "as_outer_optimizer",
  "protonet",
  "reptile",
]
