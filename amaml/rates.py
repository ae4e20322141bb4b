"""Hypergradient descent on a learning rate, with the safeguards plain HD lacks.

One rule serves both of Alpha MAML's rates (the inner ``alpha`` and the outer
``beta``). Given the hypergradient ``h = d loss / d rate``:

* ``"additive"`` (the HD and Alpha MAML papers): ``rate <- rate - hyper_lr * h``;
* ``"log"`` (multiplicative): ``rate <- rate * exp(-hyper_lr * rate * h)``, plain
  gradient descent on ``log(rate)`` (``d loss / d log rate = rate * h``), which
  can never change the rate's sign;
* ``"normalized"`` (amaml's default, not the papers'): Adam's normalised step on
  the hypergradient ``h`` (moments ``b1 = 0.9``, ``b2 = 0.99``), applied to
  ``log(rate)``: ``rate <- rate * exp(-hyper_lr * m_hat / sqrt(v_hat))``. Each
  step changes the rate by a factor of at most about ``exp(hyper_lr)`` whatever
  the scale of the loss, so one ``hyper_lr`` (:data:`DEFAULT_HYPER_LR`) fits
  every problem and every initial rate. Normalising ``h`` rather than
  ``rate * h`` keeps the step from shrinking with the rate, and the short
  ``b2`` lets the normalisation follow a hypergradient whose scale changes as
  training goes (BENCHMARKS.md, "Tuning-free defaults").

then two safeguards, leaf by leaf: a guard (a step whose hypergradient or whose
new rate, before any clip, is not finite, e.g. an overflow, leaves the rate as it
was) and an optional clip to ``[min_rate, max_rate]`` (``min_rate=0`` keeps the
additive rule from turning the rate negative; ``max_rate`` caps its growth). Rates
may be a scalar or any pytree (one rate per layer or per parameter).

``hyper_lr``, ``min_rate`` and ``max_rate`` may be traced arrays (e.g. under
``optax.inject_hyperparams``); only Python numbers are checked when the rule is built.

>>> import jax.numpy as jnp
>>> round(float(hd_step(jnp.float32(0.1), jnp.float32(2.0), hyper_lr=0.01)), 6)
0.08
>>> float(hd_step(jnp.float32(0.1), jnp.float32(50.0), hyper_lr=0.01, min_rate=0.0))
0.0
>>> float(hd_step(jnp.float32(0.1), -jnp.inf, hyper_lr=0.01, max_rate=1.0))  # kept, not 1.0
0.10000000149011612
>>> rule = rate_rule(0.01, "normalized")
>>> rate = jnp.float32(0.1)
>>> state = rule.init(rate)
>>> rate, state = rule.update(rate, jnp.float32(1e6), state)  # scale-free step
>>> round(float(rate), 4)   # 0.1 * exp(-0.01)
0.099
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

RULES = ("additive", "log", "normalized")

#: amaml's default, the same for ``alpha`` and ``beta`` on every problem: the
#: scale-free rule, moving a rate by at most about 5% per step (chosen by measurement,
#: BENCHMARKS.md, "Tuning-free defaults").
DEFAULT_RULE = "normalized"
DEFAULT_HYPER_LR = 0.05
#: The papers' setting: Alpha MAML's additive rule with the hypergradient rates
#: (kappa) of the HD paper, 1e-3 for an SGD rate (the inner ``alpha``) and 1e-7 for
#: Adam's rate (the outer ``beta``).
PAPER_RULE = "additive"
PAPER_ALPHA_LR = 1e-3
PAPER_BETA_LR = 1e-7
# Adam's epsilon for the normalized rule: far below any real hypergradient, so the rule
# stays scale-free down to tiny losses (a float32 square underflows only below 1e-19).
_EPS = 1e-30
_B1, _B2 = 0.9, 0.99


def hd_step(
  rate: Any,
  hypergradient: Any,
  hyper_lr: float,
  *,
  log_space: bool = False,
  min_rate: float | None = None,
  max_rate: float | None = None,
) -> Any:
  """One stateless hypergradient-descent step (additive, or ``log_space``).

  Args:
    rate: current learning rate(s), a scalar or a pytree.
    hypergradient: ``d loss / d rate``, same structure as ``rate``.
    hyper_lr: the hypergradient learning rate (``kappa``).
    log_space: multiplicative update instead of additive.
    min_rate, max_rate: optional bounds, applied after the step.

  Returns:
    The new rate(s). A leaf whose hypergradient or unclipped new value is not finite
    keeps its old value (unclipped); the others are clipped to the bounds.
  """

  def one(r, h):
    new = r * jnp.exp(-hyper_lr * r * h) if log_space else r - hyper_lr * h
    return _guard_and_clip(new, r, h, min_rate, max_rate)

  return jax.tree.map(one, rate, hypergradient)


def _guard_and_clip(new, old, h, min_rate, max_rate):
  """``new`` clipped to the bounds, or ``old`` where ``h`` or the unclipped ``new`` is not
  finite (a clip alone would turn an infinite step into a jump to the bound)."""
  ok = jnp.isfinite(h) & jnp.isfinite(new)
  if min_rate is not None or max_rate is not None:
    new = jnp.clip(new, min_rate, max_rate)
  return jnp.where(ok, new, old).astype(jnp.result_type(old))


def _check_arguments(hyper_lr, min_rate, max_rate):
  """Checks the arguments given as Python numbers; traced ones are left alone."""

  def number(x):
    return isinstance(x, numbers.Real)

  if number(min_rate) and number(max_rate) and min_rate > max_rate:
    raise ValueError(f"min_rate={min_rate} is above max_rate={max_rate}; swap them")
  if number(hyper_lr) and hyper_lr < 0:
    raise ValueError(f"hyper_lr must be >= 0, got {hyper_lr}")


class RateRule(NamedTuple):
  """A learning-rate update rule: ``init(rate) -> state`` and
  ``update(rate, hypergradient, state) -> (rate, state)``, pure functions. ``by_outer``:
  the rate is a meta-parameter that the outer optimizer steps with the weights
  (:func:`learned_by_outer`); ``update`` then only bounds it."""

  init: Callable[[Any], Any]
  update: Callable[[Any, Any, Any], tuple[Any, Any]]
  by_outer: bool = False


def fixed() -> RateRule:
  """The rule of a rate that does not change (MAML's ``alpha``).

  >>> rule = fixed()
  >>> rule.update(0.1, 5.0, rule.init(0.1))[0]
  0.1
  """
  return RateRule(lambda rate: optax.EmptyState(), lambda rate, h, state: (rate, state))


def learned_by_outer(min_rate: float | None = None, max_rate: float | None = None) -> RateRule:
  """Meta-SGD's rule: the outer optimizer steps the rates with the weights, from the same
  meta-gradient (:func:`amaml.meta.gradient_step`); the rule clips them to ``[min_rate,
  max_rate]`` (``None``: unbounded, free to change sign, as in Meta-SGD)."""
  _check_arguments(0.0, min_rate, max_rate)

  def update(rate, h, state):
    if min_rate is None and max_rate is None:
      return rate, state
    return jax.tree.map(lambda r: jnp.clip(r, min_rate, max_rate), rate), state

  return RateRule(lambda rate: optax.EmptyState(), update, by_outer=True)


def rate_rule(
  hyper_lr: float,
  rate_rule: str = DEFAULT_RULE,
  *,
  min_rate: float | None = None,
  max_rate: float | None = None,
) -> RateRule:
  """The hypergradient-descent rule for a rate (see the module docstring).

  Args:
    hyper_lr: the hypergradient learning rate; ``0`` freezes the rate. A Python number
      must be ``>= 0``; a traced one is not checked.
    rate_rule: ``"additive"``, ``"log"`` or ``"normalized"`` (default :data:`DEFAULT_RULE`,
      as in :func:`amaml.hypergradient` and :func:`amaml.alpha_maml`).
    min_rate, max_rate: optional bounds (see the module docstring for the guard).
  """
  if rate_rule not in RULES:
    raise ValueError(f"rate_rule must be one of {RULES}, got {rate_rule!r}")
  _check_arguments(hyper_lr, min_rate, max_rate)

  if rate_rule in ("additive", "log"):

    def init(rate):
      return optax.EmptyState()

    def update(rate, h, state):
      return hd_step(
        rate, h, hyper_lr, log_space=rate_rule == "log", min_rate=min_rate, max_rate=max_rate
      ), state

    return RateRule(init, update)

  adam = optax.adam(hyper_lr, b1=_B1, b2=_B2, eps=_EPS)

  def init_n(rate):
    return adam.init(rate)

  def update_n(rate, h, state):
    h = jax.tree.map(lambda r, g: g.astype(jnp.result_type(r)), rate, h)
    step, new_state = adam.update(h, state)
    new = jax.tree.map(
      lambda r, g, s: _guard_and_clip(r * jnp.exp(s), r, g, min_rate, max_rate), rate, h, step
    )
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(h)]))
    new_state = jax.lax.cond(ok, lambda: new_state, lambda: state)  # ok computed once
    return new, new_state

  return RateRule(init_n, update_n)


def within_ratio(rule: RateRule, max_ratio: float) -> RateRule:
  """``rule`` whose rates (a pytree: one per tensor, per step or per parameter) stay within a
  factor ``max_ratio`` of the largest: after each update every rate below ``max / max_ratio``
  is raised to it. With one rate per tensor the one-step hypergradient can drive some
  tensors' rates to their floor while another's grows (on the suite's few-character
  Omniglot the body's rates fell to 0.01 while the head's rose to 200: only the head
  adapts, as in ANIL); this keeps every tensor adapting. A rule that never spreads its
  rates that far is unchanged, bit for bit.

  >>> rule = within_ratio(fixed(), 100.0)
  >>> rule.update({"body": jnp.float32(0.5), "head": jnp.float32(200.0)}, None, ())[0]
  {'body': Array(2., dtype=float32), 'head': Array(200., dtype=float32)}
  """
  if isinstance(max_ratio, numbers.Real) and not max_ratio >= 1.0:
    raise ValueError(f"max_ratio must be >= 1 (1 ties every rate to the largest), got {max_ratio}")

  def update(rate, h, state):
    rate, state = rule.update(rate, h, state)
    top = optax.tree.max(rate)
    return jax.tree.map(lambda r: jnp.maximum(r, (top / max_ratio).astype(r.dtype)), rate), state

  return RateRule(rule.init, update, rule.by_outer)


#: The values that :func:`search_alpha` tries for the largest inner rate: 4**-6 (about
#: 2.4e-4) to 4**6 = 4096, in factors of 4. They do not depend on ``alpha0``.
SEARCH_ALPHAS = tuple(4.0**e for e in range(-6, 7))


def search_alpha(meta_loss, state, batch, alphas=SEARCH_ALPHAS, keep: float = 0.5):
  """``state`` with its ``alpha`` set to a rate from the fixed grid ``alphas``, chosen on one
  meta-batch before any meta step, so that the start is the same from every ``alpha0``.

  The largest rate of ``alpha`` takes the chosen value and every other rate keeps its ratio to
  it (one rate per tensor or per step starts equal, so all take the value; where ``alpha0``
  is not positive, all take it). The value is the smallest in ``alphas`` that gives at least
  ``keep`` (by default half) of the largest decrease of the query loss after adaptation on
  ``batch`` (:attr:`amaml.MetaLearner.meta_loss`) below the loss without adaptation
  (``alpha = 0``). Near its minimum this loss is often flat over a decade of rates at
  initialisation, and noisy, and a large inner rate makes the meta-gradient badly
  conditioned; so the search starts low, where much of the decrease is already had, and
  leaves the rate's own rule to raise it. Non-finite losses never win. Where no value lowers the
  loss, ``alpha`` is kept. Pure, jittable and vmappable; it costs one forward pass of the
  inner loop per value.

  >>> from collections import namedtuple
  >>> State = namedtuple("State", "params alpha")
  >>> loss = lambda params, alpha, batch: ((alpha - 0.7) ** 2, {})  # 0.49 without adapting
  >>> [float(search_alpha(loss, State(None, jnp.float32(a0)), None).alpha) for a0 in (0.01, 3)]
  [0.25, 0.25]
  >>> float(search_alpha(loss, State(None, jnp.float32(0.01)), None, keep=0.9).alpha)
  1.0
  """
  grid = jnp.asarray(alphas, jnp.result_type(float))
  top = optax.tree.max(state.alpha)
  ratios = jax.tree.map(lambda a: jnp.where(top > 0, a / top, jnp.ones_like(a)), state.alpha)

  def alpha_at(value):
    return jax.tree.map(lambda r: value.astype(r.dtype) * r, ratios)

  def loss_at(value):
    return meta_loss(state.params, alpha_at(value), batch)[0]

  before = loss_at(jnp.zeros((), grid.dtype))
  losses = jax.lax.map(loss_at, grid)
  losses = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
  target = before - keep * (before - jnp.min(losses))
  improves = jnp.isfinite(before) & (jnp.min(losses) < before)
  chosen = alpha_at(grid[jnp.argmax(losses <= target)])
  return state._replace(
    alpha=jax.tree.map(lambda c, a: jnp.where(improves, c, a), chosen, state.alpha)
  )
