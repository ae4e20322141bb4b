"""Host-side checks of task batches, with errors that name the problem and the fix.

The meta step (:mod:`amaml.meta`) is jitted and takes whatever arrays it is given:
a label out of range silently gives a wrong loss, a NaN input is only caught by
the non-finite guard (which skips the step). Call these on a batch from your own
sampler before training on it (they read the arrays on the host, so call them
outside ``jit``, e.g. on the first batch):

>>> import numpy as np
>>> from amaml.task import TaskBatch
>>> x = np.zeros((2, 5, 4, 4, 1), np.float32)
>>> y = np.tile(np.arange(5, dtype=np.int32), (2, 1))
>>> check_classification_batch(TaskBatch(x, y, x, y), ways=5)
>>> check_classification_batch(TaskBatch(x, y, x, y + 1), ways=5)
Traceback (most recent call last):
...
ValueError: TaskBatch.query_y holds labels from 1 to 5, but a 5-way task needs labels in 0..4; relabel each task's classes 0..ways-1 (or raise ways)
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from amaml.task import TaskBatch, check_task_batch


def _host(batch: TaskBatch) -> dict[str, np.ndarray]:
  for name in TaskBatch._fields:
    if isinstance(getattr(batch, name), jax.core.Tracer):
      raise TypeError(
        "amaml.validate checks concrete arrays on the host: call it outside "
        "jax.jit / vmap / scan, e.g. on the first batch of your sampler"
      )
  return {name: np.asarray(getattr(batch, name)) for name in TaskBatch._fields}


def check_finite_batch(batch: TaskBatch) -> None:
  """Raises ``ValueError`` naming the field if an input or target is NaN or infinite."""
  check_task_batch(batch)
  for name, x in _host(batch).items():
    if np.issubdtype(x.dtype, np.inexact):
      bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
      if bad:
        raise ValueError(
          f"TaskBatch.{name} has {bad} non-finite value(s) (NaN or inf); clean the data "
          "source (e.g. np.nan_to_num, or drop the bad examples) before meta-training"
        )


def check_regression_batch(batch: TaskBatch) -> None:
  """Structure (see :func:`amaml.task.check_task_batch`), float dtypes and finite values."""
  check_task_batch(batch)
  for name, x in _host(batch).items():
    if not np.issubdtype(x.dtype, np.floating):
      raise TypeError(
        f"TaskBatch.{name} must be floating point for regression, got {x.dtype}; "
        f"convert it with x.astype(np.float32)"
      )
  check_finite_batch(batch)


def check_classification_batch(
  batch: TaskBatch, ways: int, example_shape: Sequence[int] | None = None
) -> None:
  """Checks an N-way classification batch before it reaches the meta step.

  Args:
    batch: ``support_x``/``query_x`` float ``[tasks, examples, *example_shape]``,
      ``support_y``/``query_y`` integer class indices ``[tasks, examples]``.
    ways: classes per task; labels must lie in ``0..ways-1``.
    example_shape: the input shape the model was built for (e.g. ``(28, 28, 1)``);
      ``None`` only requires support and query to agree.

  Raises ``TypeError``/``ValueError`` naming the field, what it holds, and the fix.
  """
  if isinstance(ways, bool) or not isinstance(ways, (int, np.integer)) or ways < 1:
    raise ValueError(f"ways must be a positive int, got {ways!r}")
  check_task_batch(batch)
  arrays = _host(batch)
  _check_inputs(arrays, example_shape)
  _check_labels(arrays, ways)
  check_finite_batch(batch)


def _check_inputs(arrays: dict[str, np.ndarray], example_shape: Sequence[int] | None) -> None:
  """Float inputs of one shape in support and query (``example_shape``, if given)."""
  for name in ("support_x", "query_x"):
    x = arrays[name]
    if x.dtype == np.uint8:
      raise TypeError(
        f"TaskBatch.{name} is uint8 (raw pixels); the model takes floats: use "
        f"x.astype(np.float32) / 255"
      )
    if not np.issubdtype(x.dtype, np.floating):
      raise TypeError(
        f"TaskBatch.{name} must be floating point, got {x.dtype}; use x.astype(np.float32)"
      )
  sx, qx = arrays["support_x"].shape[2:], arrays["query_x"].shape[2:]
  if sx != qx:
    raise ValueError(
      f"support and query examples differ in shape: support_x has {sx}, query_x "
      f"has {qx}; both sets must come from the same images"
    )
  if example_shape is not None and tuple(sx) != tuple(example_shape):
    hint = " (add a channel axis: x[..., None])" if tuple(sx) == tuple(example_shape)[:-1] else ""
    raise ValueError(
      f"examples have shape {tuple(sx)} but the model expects "
      f"{tuple(example_shape)}{hint}; resize the images or build the model for "
      "this shape"
    )


def _check_labels(arrays: dict[str, np.ndarray], ways: int) -> None:
  """Integer class indices ``[tasks, examples]`` in ``0..ways-1``."""
  for name in ("support_y", "query_y"):
    y = arrays[name]
    if y.ndim == 3 and np.issubdtype(y.dtype, np.number):
      raise ValueError(
        f"TaskBatch.{name} has shape {y.shape}: looks one-hot; pass class indices "
        f"[tasks, examples] instead (y.argmax(-1))"
      )
    if y.ndim != 2:
      raise ValueError(
        f"TaskBatch.{name} must be [tasks, examples] class indices, got shape {y.shape}"
      )
    if not np.issubdtype(y.dtype, np.integer):
      raise TypeError(
        f"TaskBatch.{name} must hold integer class indices, got {y.dtype}; use y.astype(np.int32)"
      )
    if y.size and (y.min() < 0 or y.max() >= ways):
      raise ValueError(
        f"TaskBatch.{name} holds labels from {y.min()} to {y.max()}, but a {ways}-way task "
        f"needs labels in 0..{ways - 1}; relabel each task's classes 0..ways-1 (or raise ways)"
      )
