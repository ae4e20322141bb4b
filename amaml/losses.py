"""Task losses in the form the meta step expects: ``loss_fn(params, x, y) -> (loss, aux)``.

>>> import jax.numpy as jnp
>>> apply_fn = lambda params, x: x @ params
>>> loss_fn = cross_entropy(apply_fn)
>>> loss, aux = loss_fn(jnp.eye(3), jnp.eye(3) * 10, jnp.array([0, 1, 2]))
>>> float(aux["accuracy"])
1.0
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def mse(apply_fn: Callable[[Any, Any], jax.Array]) -> Callable:
  """Mean squared error of ``apply_fn(params, x)`` against ``y``; aux is empty."""

  def loss_fn(params, x, y):
    pred = apply_fn(params, x)
    return jnp.mean(jnp.square(pred - y)), {}

  return loss_fn


def cross_entropy(apply_fn: Callable[[Any, Any], jax.Array]) -> Callable:
  """Softmax cross-entropy of logits ``apply_fn(params, x)`` against integer labels ``y``;
  aux is ``{"accuracy": ...}``."""

  def loss_fn(params, x, y):
    logits = apply_fn(params, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    acc = jnp.mean((jnp.argmax(logits, -1) == y).astype(logits.dtype))
    return loss, {"accuracy": acc}

  return loss_fn
