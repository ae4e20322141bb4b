"""Sinusoid regression tasks (Finn et al., 2017), sampled from a JAX PRNG key.

Each task is ``y = A sin(x - phase)`` with ``A ~ U[0.1, 5]``, ``phase ~ U[0, pi]``
and ``x ~ U[-5, 5]``; support and query points are drawn independently.

>>> import jax
>>> batch = sinusoid_tasks(jax.random.key(0), num_tasks=25)
>>> batch.support_x.shape, batch.query_y.shape   # [tasks, points, 1]
((25, 10, 1), (25, 10, 1))
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from amaml.task import TaskBatch


def sinusoid_tasks(
  key: jax.Array,
  num_tasks: int,
  num_support: int = 10,
  num_query: int = 10,
  amplitude: tuple[float, float] = (0.1, 5.0),
  phase: tuple[float, float] = (0.0, math.pi),
  x_range: tuple[float, float] = (-5.0, 5.0),
  return_params: bool = False,
):
  """A :class:`TaskBatch` of sinusoid regression tasks; jittable (static sizes).

  With ``return_params`` also returns ``(amplitudes, phases)``, each ``[tasks]``.
  """
  if num_tasks < 1 or num_support < 1 or num_query < 1:
    raise ValueError(
      f"num_tasks, num_support, num_query must be >= 1, got {num_tasks}, {num_support}, {num_query}"
    )
  k_amp, k_phase, k_x = jax.random.split(key, 3)
  amp = jax.random.uniform(k_amp, (num_tasks,), minval=amplitude[0], maxval=amplitude[1])
  ph = jax.random.uniform(k_phase, (num_tasks,), minval=phase[0], maxval=phase[1])
  x = jax.random.uniform(
    k_x, (num_tasks, num_support + num_query, 1), minval=x_range[0], maxval=x_range[1]
  )  # [tasks, points, 1]
  y = amp[:, None, None] * jnp.sin(x - ph[:, None, None])
  batch = TaskBatch(x[:, :num_support], y[:, :num_support], x[:, num_support:], y[:, num_support:])
  return (batch, (amp, ph)) if return_params else batch
