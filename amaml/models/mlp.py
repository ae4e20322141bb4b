"""A multi-layer perceptron (MAML's sinusoid regressor: 1-40-40-1 with ReLU)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
  """``Dense -> ReLU`` for each hidden width, then a linear output layer.

  >>> import jax, jax.numpy as jnp
  >>> model = MLP(hidden=(40, 40), out=1)
  >>> params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
  >>> model.apply({"params": params}, jnp.zeros((7, 1))).shape
  (7, 1)
  """

  hidden: Sequence[int] = (40, 40)
  out: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.out)(x)
