"""Hypergradient descent on a learning rate, with the safeguards plain HD lacks.

One rule serves both of Alpha MAML's rates (the inner ``alpha`` and the outer
``beta``): given the hypergradient ``h = d loss / d rate``,

* additive (the HD paper):        ``rate <- rate - hyper_lr * h``
* multiplicative (log space):     ``rate <- rate * exp(-hyper_lr * rate * h)``,
  which is plain gradient descent on ``log(rate)`` (``d loss / d log rate =
  rate * h``) and so can never change the rate's sign;

then an optional clip to ``[min_rate, max_rate]``, and a guard: a non-finite
result leaves the rate as it was. Rates may be a scalar or any pytree (one rate
per layer or per parameter); the rule applies leaf by leaf.

>>> import jax.numpy as jnp
>>> round(float(hd_step(jnp.float32(0.1), jnp.float32(2.0), hyper_lr=0.01)), 6)
0.08
>>> float(hd_step(jnp.float32(0.1), jnp.float32(50.0), hyper_lr=0.01, min_rate=0.0))
0.0
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def hd_step(rate: Any, hypergradient: Any, hyper_lr: float, *, log_space: bool = False,
            min_rate: float | None = None, max_rate: float | None = None) -> Any:
  """One hypergradient-descent step on ``rate`` (a scalar or a pytree of rates).

  Args:
    rate: current learning rate(s).
    hypergradient: ``d loss / d rate``, same structure as ``rate``.
    hyper_lr: the hypergradient learning rate (``kappa``). In log space it is the
      step size on ``log(rate)``.
    log_space: multiplicative update (keeps the rate's sign) instead of additive.
    min_rate, max_rate: optional bounds, applied after the step.

  Returns:
    The new rate(s); any leaf whose new value is not finite keeps its old value.
  """
  if min_rate is not None and max_rate is not None and min_rate > max_rate:
    raise ValueError(f"min_rate={min_rate} is above max_rate={max_rate}; swap them")

  def one(r, h):
    if log_space:
      new = r * jnp.exp(-hyper_lr * r * h)
    else:
      new = r - hyper_lr * h
    if min_rate is not None or max_rate is not None:
      new = jnp.clip(new, min_rate, max_rate)
    return jnp.where(jnp.isfinite(new), new, r).astype(jnp.result_type(r))

  return jax.tree.map(one, rate, hypergradient)
