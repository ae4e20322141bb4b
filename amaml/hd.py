"""An Optax transform that adapts any optimizer's learning rate by hypergradient descent.

``hypergradient(optax.adam, learning_rate=1e-3)`` is Adam whose rate follows amaml's
tuning-free rule (``rate_rule="normalized"``, ``hyper_lr=rates.DEFAULT_HYPER_LR``).
The HD paper's additive rule is one argument away:
``hypergradient(optax.adam, learning_rate=1e-3, rate_rule="additive", hyper_lr=1e-7)``
is Adam-HD, ``hypergradient(optax.sgd, learning_rate=0.01, rate_rule="additive",
hyper_lr=1e-3)`` is SGD-HD (Baydin et al., "Online Learning Rate Adaptation with
Hypergradient Descent", ICLR 2018; the names ``rates.PAPER_RULE``,
``rates.PAPER_ALPHA_LR`` = 1e-3 and ``rates.PAPER_BETA_LR`` = 1e-7 spell the same).
It wraps any Optax optimizer whose last step scales by a learning
rate (``sgd``, ``sgd(momentum=...)``, ``adam``, ``adamw``, ``rmsprop``, ...):
the wrapped optimizer is built with ``learning_rate=1`` so that it yields the
update direction ``u_t`` (sign included, ``params_{t+1} = params_t + beta_t
u_t``), and the rate is adapted with the hypergradient

    h_t = d f(params_t) / d beta_{t-1} = <g_t, u_{t-1}>,
    beta_t = beta_{t-1} - hyper_lr * h_t        (the additive rule),

one global dot product per step over all parameters, before ``u_t`` is scaled
(:mod:`amaml.rates` gives the ``"log"`` and ``"normalized"`` rules on the same ``h_t``).
With ``discount = mu > 0`` the hypergradient looks further back:
``h_t = <g_t, z_{t-1}>`` with ``z_t = mu z_{t-1} + u_t``, the discounted sum of
past directions. This is the Hessian-free form of MARTHE's discounted
hypergradient (Donini et al., "MARTHE: Scheduling the Learning Rate Via Online
Hypergradients", IJCAI 2020): ``mu = 0`` is HD, whose one-step horizon is known
to drive the rate too low (Wu et al., "Understanding Short-Horizon Bias in
Stochastic Meta-Optimization", ICLR 2018).
For SGD, ``u = -g`` and the additive rule is ``beta_t = beta_{t-1} + hyper_lr <g_t, g_{t-1}>``.
For Adam, ``u_{t-1} = -m_hat/(sqrt(v_hat) + eps)`` and the additive rule is that of the
HD paper's reference AdamHD (there ``eps`` is added before bias correction,
an ``O(eps)`` difference).

The current rate is ``state.learning_rate`` (or :func:`current_learning_rate`
on any state that contains one, e.g. inside ``optax.chain``). It is useful for
ordinary training too:

>>> import jax, jax.numpy as jnp, optax
>>> opt = hypergradient(optax.sgd, learning_rate=0.1, rate_rule="additive", hyper_lr=0.01)
>>> params = jnp.array([1.0, -2.0])
>>> state = opt.init(params)
>>> for _ in range(3):
...   grads = jax.grad(lambda p: jnp.sum(p ** 2))(params)
...   updates, state = opt.update(grads, state, params)
...   params = optax.apply_updates(params, updates)
>>> round(float(current_learning_rate(state)), 4)
0.3214

It composes with Optax's wrappers; ``optax.inject_hyperparams`` needs the factory
bound first (or ``static_args="optimizer"``), and then injects ``hyper_lr`` (read at
every step), the bounds and ``discount``; ``learning_rate`` is only the initial rate:

>>> import functools
>>> opt = optax.inject_hyperparams(functools.partial(hypergradient, optax.sgd))(
...     learning_rate=0.1, hyper_lr=0.01)
>>> sorted(opt.init(params).hyperparams)
['discount', 'hyper_lr', 'learning_rate']
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from amaml import rates


class HypergradientState(NamedTuple):
  """State of :func:`hypergradient`."""

  learning_rate: jax.Array  # beta_t, the rate used for the last update
  hypergradient: jax.Array  # h_t = <g_t, u_{t-1}>
  rate_state: Any  # state of the rate's update rule (amaml.rates.rate_rule)
  prev_direction: optax.Updates  # z_{t-1}: past directions at unit rate (u_{t-1} if discount=0)
  inner_state: optax.OptState  # the wrapped optimizer's state
  count: jax.Array  # number of updates so far


def hypergradient(
  optimizer: Callable[..., optax.GradientTransformation],
  learning_rate: float,
  hyper_lr: float | None = None,
  *,
  rate_rule: str = rates.DEFAULT_RULE,
  min_rate: float | None = None,
  max_rate: float | None = None,
  discount: float = 0.0,
  **optimizer_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """Wraps an Optax optimizer so that its learning rate adapts by hypergradient descent.

  Args:
    optimizer: an Optax optimizer *factory* taking ``learning_rate`` (``optax.adam``,
      ``optax.sgd``, ...), whose last step multiplies by the learning rate.
    learning_rate: the initial rate ``beta_0``.
    hyper_lr: the hypergradient learning rate ``kappa`` (``0`` gives exactly the
      wrapped optimizer at a fixed rate); a Python number must be ``>= 0``. ``None``
      (the default) is ``amaml.rates.DEFAULT_HYPER_LR`` for the default rule, where
      it is about the largest relative change of the rate per step; the other rules
      need it given. The additive rule's ``kappa`` has the scale of ``1 / h``: the HD
      paper uses ``1e-3`` for SGD (``rates.PAPER_ALPHA_LR``) and ``1e-7`` to ``1e-8``
      for Adam (``rates.PAPER_BETA_LR``); pass it with ``rate_rule="additive"``.
    rate_rule: how the rate follows its hypergradient (:func:`amaml.rates.rate_rule`):
      ``"normalized"`` (the default, amaml's: Adam's normalised step on ``h`` applied
      to ``log beta``; scale-free), ``"additive"`` (the HD paper, ``rates.PAPER_RULE``)
      or ``"log"`` (multiplicative, keeps it positive).
    min_rate, max_rate: optional bounds on the rate, e.g. ``min_rate=0`` keeps the
      additive rule's rate from turning negative and ``max_rate`` caps its growth
      (for SGD, below ``2 / L`` on an ``L``-smooth loss keeps the steps stable).
    discount: ``mu`` in ``[0, 1)``, how far back the hypergradient looks (about
      ``1 / (1 - mu)`` steps): ``h_t = <g_t, z_{t-1}>``, ``z_t = mu z_{t-1} + u_t``.
      ``0`` (the default here) is the HD paper's one-step hypergradient.
    **optimizer_kwargs: passed to ``optimizer`` (``b1``, ``momentum``, ...); static
      under ``optax.inject_hyperparams``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`HypergradientState`. A step whose hypergradient or new rate (before
    the bounds) is not finite keeps the rate unchanged.
  """
  _check_args(optimizer, discount)
  base = _direction(optimizer, optimizer_kwargs)
  rate = _rate_rule(hyper_lr, rate_rule, min_rate, max_rate)

  def init_fn(params):
    return _init_state(base, rate, learning_rate, params)

  def update_fn(updates, state, params=None, **extra_args):
    return _update(base, rate, discount, updates, state, params, extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_args(optimizer: Any, discount: Any) -> None:
  """A one-line error for a built optimizer in place of a factory, or a ``discount`` (a
  Python number; a traced one is not checked) outside ``[0, 1)``."""
  if isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(
      "hypergradient() takes an optimizer factory such as optax.adam, not a built "
      "optimizer: write hypergradient(optax.adam, learning_rate=1e-3, b1=0.9)"
    )
  if isinstance(discount, numbers.Real) and not 0.0 <= discount < 1.0:
    raise ValueError(f"discount must be in [0, 1), got {discount}; 0 is plain HD")


def _direction(
  optimizer: Callable[..., optax.GradientTransformation], optimizer_kwargs: dict
) -> optax.GradientTransformationExtraArgs:
  """The wrapped optimizer built at ``learning_rate=1``: its update is the direction ``u_t``."""
  # optax.inject_hyperparams binds hypergradient's signature with its defaults, so the extra
  # keywords come back as one keyword ``optimizer_kwargs={...}``.
  optimizer_kwargs = {**optimizer_kwargs.pop("optimizer_kwargs", {}), **optimizer_kwargs}
  return optax.with_extra_args_support(optimizer(learning_rate=1.0, **optimizer_kwargs))


def _rate_rule(hyper_lr, rate_rule: str, min_rate, max_rate) -> rates.RateRule:
  """The rate's rule (:func:`amaml.rates.rate_rule`) at ``hyper_lr``; ``None`` is
  ``rates.DEFAULT_HYPER_LR`` for the default rule, an error for the others."""
  if hyper_lr is None:
    if rate_rule != rates.DEFAULT_RULE and rate_rule in rates.RULES:
      raise ValueError(
        f"rate_rule={rate_rule!r} needs hyper_lr: the HD paper's is "
        f"{rates.PAPER_ALPHA_LR:g} for SGD and {rates.PAPER_BETA_LR:g} for Adam"
      )
    hyper_lr = rates.DEFAULT_HYPER_LR
  return rates.rate_rule(hyper_lr, rate_rule, min_rate=min_rate, max_rate=max_rate)


def _init_state(base, rate: rates.RateRule, learning_rate, params) -> HypergradientState:
  """The state at ``beta_0 = learning_rate``, before any update (``z_0 = 0``)."""
  dtype = jnp.result_type(float)
  lr = jnp.asarray(learning_rate, dtype)
  return HypergradientState(
    learning_rate=lr,
    hypergradient=jnp.zeros((), dtype),
    rate_state=rate.init(lr),
    prev_direction=jax.tree.map(jnp.zeros_like, params),
    inner_state=base.init(params),
    count=jnp.zeros((), jnp.int32),
  )


def _update(base, rate: rates.RateRule, discount, updates, state, params, extra_args: dict):
  """One step: the hypergradient ``h_t = <g_t, z_{t-1}>`` (zero on the first step, where
  ``z_0 = 0``), the rate ``beta_t`` it gives, the update ``beta_t u_t`` and the new
  ``z_t = mu z_{t-1} + u_t``."""
  h = optax.tree_utils.tree_vdot(updates, state.prev_direction).astype(state.learning_rate.dtype)
  lr, rate_state = rate.update(state.learning_rate, h, state.rate_state)
  direction, inner_state = base.update(updates, state.inner_state, params, **extra_args)
  new_updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), direction)
  if not isinstance(discount, numbers.Real) or discount:  # a traced discount may be 0
    direction = jax.tree.map(
      lambda z, u: (discount * z + u).astype(u.dtype), state.prev_direction, direction
    )
  return new_updates, HypergradientState(lr, h, rate_state, direction, inner_state, state.count + 1)


def _hd_state(opt_state) -> HypergradientState | None:
  return optax.tree_utils.tree_get(opt_state, "HypergradientState")


def current_learning_rate(opt_state: optax.OptState) -> jax.Array | None:
  """The adapted learning rate inside ``opt_state``: the rate of a :class:`HypergradientState`,
  else the step size a learning-rate-free optimizer estimated (``estim_lr`` of
  ``optax.contrib.dadapt_adamw`` and ``prodigy``), else ``None`` (e.g. a plain
  ``optax.adam`` state)."""
  found = _hd_state(opt_state)
  if found is not None:
    return found.learning_rate
  return optax.tree_utils.tree_get(opt_state, "estim_lr")


def current_hypergradient(opt_state: optax.OptState) -> jax.Array | None:
  """The last hypergradient ``<g_t, z_{t-1}>`` inside ``opt_state`` (or ``None``)."""
  found = _hd_state(opt_state)
  return None if found is None else found.hypergradient
