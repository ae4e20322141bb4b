"""The unit of meta-learning data: a task's support and query sets.

A :class:`TaskBatch` holds one task, or a batch of tasks stacked on a leading
axis, as four arrays. Every sampler in amaml (sinusoid, Omniglot, your own)
returns one, and every meta step takes one::

    support_x  # [tasks, ways*shots, ...input shape]
    support_y  # [tasks, ways*shots, ...target shape]
    query_x    # [tasks, ways*queries, ...input shape]
    query_y    # [tasks, ways*queries, ...target shape]

It is a NamedTuple, hence a pytree: it passes through ``jax.jit``, ``jax.vmap``
and ``jax.device_put`` as it is.

>>> import numpy as np
>>> batch = TaskBatch(np.zeros((4, 5, 1)), np.zeros((4, 5, 1)),
...                   np.zeros((4, 10, 1)), np.zeros((4, 10, 1)))
>>> batch.num_tasks
4
"""

from __future__ import annotations

from typing import Any, NamedTuple


class TaskBatch(NamedTuple):
  """Support and query sets of one task or of a batch of tasks (leading axis)."""

  support_x: Any
  support_y: Any
  query_x: Any
  query_y: Any

  @property
  def num_tasks(self) -> int:
    """Size of the leading (task) axis."""
    return int(self.support_x.shape[0])


def check_task_batch(batch: TaskBatch) -> None:
  """Raises ``ValueError`` naming the problem if ``batch`` is malformed.

  Checks that it is a :class:`TaskBatch` of arrays with a common leading task
  axis and that inputs and targets of each set agree in length.
  """
  if not isinstance(batch, TaskBatch):
    raise TypeError(
      f"expected an amaml.TaskBatch, got {type(batch).__name__}; build one with "
      "amaml.TaskBatch(support_x, support_y, query_x, query_y)"
    )
  for name in TaskBatch._fields:
    if not hasattr(getattr(batch, name), "shape"):
      raise TypeError(
        f"TaskBatch.{name} must be an array, got {type(getattr(batch, name)).__name__}"
      )
  shapes = {n: getattr(batch, n).shape for n in TaskBatch._fields}
  if any(len(s) < 2 for s in shapes.values()):
    raise ValueError(
      f"every TaskBatch field needs a task axis and an example axis, got shapes {shapes}; "
      "for a single task add a leading axis (x[None])"
    )
  tasks = {s[0] for s in shapes.values()}
  if len(tasks) != 1:
    raise ValueError(f"TaskBatch fields disagree on the number of tasks (leading axis): {shapes}")
  for a, b in (("support_x", "support_y"), ("query_x", "query_y")):
    if shapes[a][1] != shapes[b][1]:
      raise ValueError(
        f"TaskBatch.{a} has {shapes[a][1]} examples per task but {b} has {shapes[b][1]}: "
        "inputs and targets must be paired"
      )
