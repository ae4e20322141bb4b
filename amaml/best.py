"""Keeping the parameters that did best on validation: ``amaml train --keep_best``
(``Config.keep_best``).

Every validation of such a run compares its metric (:func:`metric_name`: the query accuracy,
higher is better, on the classification tasks; the query loss, lower is better, on sinusoid)
with the best so far. A strictly better one is saved with Orbax in ``<out>/best/`` (one
checkpoint, written atomically like the others: the state at that step and its metric), and
the run validates its last state too. The final evaluation tests the best checkpoint
(:func:`final_results`); ``amaml evaluate --run`` reads it (:func:`kept_step`).

``--resume`` restores the best so far from ``<out>/best/``, so a stopped and resumed run keeps
the checkpoint that an uninterrupted one keeps. (A best checkpoint newer than the checkpoint a
run resumes from is still right: the steps trained again validate to the same numbers, none
strictly better than it.)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from amaml.configs import Config
from amaml.evaluation import meta_test

#: the folder of a run directory that holds the best checkpoint
BEST_DIR = "best"


def metric_name(cfg: Config) -> str:
  """The validation metric that ``keep_best`` compares: ``"loss"`` (the query mean squared
  error, lower is better) on sinusoid, ``"accuracy"`` (higher is better) on the others."""
  return "loss" if cfg.task == "sinusoid" else "accuracy"


def better(name: str, new: float, old: float | None) -> bool:
  """Whether the finite metric ``new`` improves on ``old`` (``None``: no best yet)."""
  if not math.isfinite(new):
    return False
  return old is None or (new > old if name == "accuracy" else new < old)


def _checkpointer(out: Path):
  from amaml.checkpoint import Checkpointer

  return Checkpointer(Path(out) / BEST_DIR, max_to_keep=1)


def _target(state) -> dict:
  """What a best checkpoint holds: the state and its validation metric (float64)."""
  return {"state": state, "metric": np.float64(0.0)}


def _write(out: Path, step: int, kept: dict | None) -> None:
  """Saves ``kept`` as the best checkpoint of ``step`` in ``out/best`` (``None``: nothing)
  after deleting those of ``step`` and later: left by a run before it was resumed, they are
  superseded (a run resumed bitwise never finds one)."""
  ckpt = _checkpointer(out)
  try:
    for newer in [s for s in ckpt.all_steps() if s >= step]:
      ckpt.delete(newer)
    if kept is not None:
      ckpt.save(step, kept)
  finally:
    ckpt.close()


class Tracker:
  """The best validation so far of the run of ``exp`` in ``out`` and its checkpoint in
  ``out/best`` (each save opens and closes it: nothing to close).

  ``state``: a state of the run's structure and shardings; with ``resume`` the best so far
  is read from ``out/best``, without it a best checkpoint left there by an earlier run is
  deleted."""

  def __init__(self, exp, out: str | os.PathLike, state, resume: bool):
    if "val" not in exp.data:
      raise ValueError(
        "--keep_best: this task has no validation split to choose the parameters on; drop "
        "--keep_best"
      )
    self.name, self.out = metric_name(exp.config), Path(out)
    self.step, self.metric = None, None
    if resume:
      kept = restore(out, state)
      if kept is not None:
        self.step, self.metric = kept[1], kept[2]
    elif (self.out / BEST_DIR).is_dir():
      _write(self.out, 0, None)

  def update(self, step: int, state, numbers: dict) -> None:
    """The validation ``numbers`` (``val_<name>`` keys) of ``state`` at ``step``: saved as
    the best checkpoint when its metric is strictly better than the best so far."""
    key = f"val_{self.name}"
    if key not in numbers:
      raise ValueError(f"--keep_best compares {key}, which this validation does not report")
    metric = float(numbers[key])
    if better(self.name, metric, self.metric):
      _write(self.out, step, {"state": state, "metric": np.float64(metric)})
      self.step, self.metric = step, metric


def restore(out: str | os.PathLike, state) -> tuple | None:
  """The best checkpoint of the run in ``out``, restored into the structure of ``state``:
  ``(state, step, metric)``; ``None`` when there is none."""
  ckpt = _checkpointer(Path(out))
  try:
    if ckpt.latest_step() is None:
      return None
    kept = ckpt.restore_newest_intact(_target(state))
    return kept["state"], ckpt.latest_step(), float(kept["metric"])
  finally:
    ckpt.close()


def kept_step(out: str | os.PathLike) -> int | None:
  """The step of the best checkpoint in the run directory ``out`` (``None``: none kept)."""
  if not (Path(out) / BEST_DIR).is_dir():
    return None
  ckpt = _checkpointer(Path(out))
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def final_results(run, device_state, step: int, evaluate_at_end: bool, progress: bool) -> dict:
  """What a ``keep_best`` run adds to ``results.json``: ``tested`` (``"best"``, or
  ``"last"`` when no validation gave a finite metric), ``best_step`` and
  ``best_val_<metric>``, and with ``evaluate_at_end`` the final evaluation
  (:func:`amaml.evaluation.meta_test`) of the best checkpoint's parameters and alpha, and
  ``test_last``, the ``test`` of the last step's, when they differ. ``run``: the run's
  ``exp`` and ``out`` (:func:`amaml.train.train`'s); ``device_state``: its last state, at
  ``step``, onto whose shardings the best is restored."""
  from amaml import sharding

  last = sharding.host_local(device_state)
  kept = restore(run.out, device_state)
  name = metric_name(run.exp.config)
  if kept is None:
    results = {"tested": "last", "best_step": None, f"best_val_{name}": None}
    tested = last
  else:
    tested = sharding.host_local(kept[0])
    results = {"tested": "best", "best_step": kept[1], f"best_val_{name}": kept[2]}
  if evaluate_at_end:
    results.update(meta_test(run.exp, tested.params, tested.alpha, progress=progress))
    if results["best_step"] not in (None, step):
      results["test_last"] = meta_test(run.exp, last.params, last.alpha, progress=progress)["test"]
  return results
