"""Keeping the parameters that did best on validation: ``amaml train --keep_best``
(``Config.keep_best``).

Every validation of such a run compares its metric (:func:`metric_name`: the query accuracy,
higher is better, on the classification tasks; the query loss, lower is better, on sinusoid)
with the best so far. A strictly better one is saved with Orbax in ``<out>/best/`` (one
checkpoint, written atomically like the others: the state at that step and its metric), and
the run validates its last state too. The final evaluation tests the best checkpoint
(:func:`final_results`); ``amaml evaluate --run`` reads it (:func:`kept_step`).

With ``--seeds N`` (:mod:`amaml.seeds`) each seed is its own run and keeps its own best:
seed k compares its ``seed<k>/val_<metric>``, and the one checkpoint holds the stacked state
whose seed k is seed k's best state so far, each seed's metric and best step (``[N]``; step
-1: no finite validation yet), saved as the step of the latest best (:meth:`Tracker.update`).
Each seed then tests its own best state (:func:`kept_results`, called by
:func:`amaml.seeds.final_results`), a seed without one its last state.

``--resume`` restores the best so far from ``<out>/best/``, so a stopped and resumed run keeps
the checkpoint that an uninterrupted one keeps. (A best checkpoint newer than the checkpoint a
run resumes from is still right: the steps trained again validate to the same numbers, none
strictly better than it.)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import jax
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


def where(mask, new, old):
  """Stacked trees (``--seeds``) leaf by leaf: seed k from ``new`` where ``mask[k]``, else
  from ``old`` (numpy arrays).

  >>> where(np.array([True, False]), {"w": np.array([1, 2])}, {"w": np.array([3, 4])})
  {'w': array([1, 4])}
  """
  pick = lambda a, b: np.where(np.reshape(mask, (-1,) + (1,) * (np.ndim(a) - 1)), a, b)
  return jax.tree.map(pick, new, old)


def _checkpointer(out: Path):
  from amaml.checkpoint import Checkpointer

  return Checkpointer(Path(out) / BEST_DIR, max_to_keep=1)


def _target(state) -> dict:
  """What a best checkpoint holds: the state and its validation metric (float64); of a
  stacked state (``--seeds N``), each seed's metric (float64) and best step (-1: none), ``[N]``."""
  if np.ndim(state.step) == 0:
    return {"state": state, "metric": np.float64(0.0)}
  n = np.shape(state.step)[0]
  return {"state": state, "metric": np.zeros(n, np.float64), "best_step": np.zeros(n, np.int64)}


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


def _number(numbers: dict, key: str) -> float:
  if key not in numbers:
    raise ValueError(f"--keep_best compares {key}, which this validation does not report")
  return float(numbers[key])


class Tracker:
  """The best validation so far of the run of ``exp`` in ``out`` and its checkpoint in
  ``out/best`` (each save opens and closes it: nothing to close).

  ``state``: a state of the run's structure and shardings; with ``resume`` the best so far
  is read from ``out/best``, without it a best checkpoint left there by an earlier run is
  deleted. ``step`` and ``metric``: the best's (``None``: none yet); with ``--seeds N``,
  each seed's (``[N]`` arrays, step -1: none yet), and ``kept`` their stacked state (numpy)."""

  def __init__(self, exp, out: str | os.PathLike, state, resume: bool):
    if "val" not in exp.data:
      raise ValueError(
        "--keep_best: this task has no validation split to choose the parameters on; drop "
        "--keep_best"
      )
    self.name, self.out, self.seeds = metric_name(exp.config), Path(out), exp.config.seeds
    self.step, self.metric, self.kept = None, None, None
    if self.seeds > 1:
      self.step, self.metric = np.full(self.seeds, -1, np.int64), np.zeros(self.seeds)
    if resume:
      kept = restore(out, state)
      if kept is not None:
        self.step, self.metric = kept[1], kept[2]
        self.kept = jax.tree.map(np.array, kept[0]) if self.seeds > 1 else None
    elif (self.out / BEST_DIR).is_dir():
      _write(self.out, 0, None)

  def update(self, step: int, state, numbers: dict) -> None:
    """The validation ``numbers`` (``val_<name>`` keys) of ``state`` at ``step``: saved as
    the best checkpoint when its metric is strictly better than the best so far. With
    seeds, :meth:`update_seeds`."""
    if self.seeds > 1:
      return self.update_seeds(step, state, numbers)
    metric = _number(numbers, f"val_{self.name}")
    if better(self.name, metric, self.metric):
      _write(self.out, step, {"state": state, "metric": np.float64(metric)})
      self.step, self.metric = step, metric

  def update_seeds(self, step: int, state, numbers: dict) -> None:
    """:meth:`update` of a stacked ``state``: each seed k whose ``seed<k>/val_<name>`` is
    strictly better than its best so far keeps its state of ``step``, the others their
    best; saved when any improved, as the checkpoint of the latest step of a best."""
    new = np.array([_number(numbers, f"seed{k}/val_{self.name}") for k in range(self.seeds)])
    old = [None if s < 0 else m for s, m in zip(self.step, self.metric)]
    improved = np.array([better(self.name, n, o) for n, o in zip(new, old)])
    if not improved.any():
      return
    state = jax.tree.map(np.array, state)  # a copy on the host: the next chunk donates ``state``
    self.kept = state if self.kept is None else where(improved, state, self.kept)
    self.step = np.where(improved, step, self.step)
    self.metric = np.where(improved, new, self.metric)
    kept = {"state": self.kept, "metric": self.metric, "best_step": self.step}
    _write(self.out, int(self.step.max()), kept)


def restore(out: str | os.PathLike, state) -> tuple | None:
  """The best checkpoint of the run in ``out``, restored into the structure of ``state``:
  ``(state, step, metric)``; of a stacked ``state`` (``--seeds N``), ``(state, steps,
  metrics)``, each seed's best step (-1: none) and metric (``[N]`` arrays); ``None`` when
  there is none."""
  ckpt = _checkpointer(Path(out))
  try:
    if ckpt.latest_step() is None:
      return None
    kept = ckpt.restore_newest_intact(_target(state))
    if "best_step" in kept:
      return kept["state"], kept["best_step"], kept["metric"]
    return kept["state"], ckpt.latest_step(), float(kept["metric"])
  finally:
    ckpt.close()


def seed_bests(kept, seeds: int) -> list[tuple | None]:
  """The best checkpoint of a stacked run (:func:`restore`'s ``(state, steps, metrics)``, or
  ``None``) as one entry per seed: seed k's ``(state, step, metric)``, or ``None`` where seed
  k has no best (step -1: no finite validation).

  >>> kept = ({"w": np.array([[1.0], [2.0]])}, np.array([4, -1]), np.array([0.5, 0.0]))
  >>> seed_bests(kept, 2)
  [({'w': array([1.])}, 4, 0.5), None]
  """
  from amaml.seeds import seed_state  # (amaml.seeds imports this module)

  if kept is None:
    return [None] * seeds
  state, steps, metrics = kept
  pick = lambda k: (seed_state(state, k), int(steps[k]), float(metrics[k]))
  return [None if steps[k] < 0 else pick(k) for k in range(seeds)]


def kept_step(out: str | os.PathLike) -> int | None:
  """The step of the best checkpoint in the run directory ``out`` (``None``: none kept; with
  seeds, the latest of their best steps)."""
  if not (Path(out) / BEST_DIR).is_dir():
    return None
  ckpt = _checkpointer(Path(out))
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def final_results(run, device_state, step: int, evaluate_at_end: bool, progress: bool) -> dict:
  """What a ``keep_best`` run of one seed adds to ``results.json`` (:func:`kept_results`
  of its best checkpoint). ``run``: the run's ``exp`` and ``out`` (:func:`amaml.train.train`'s);
  ``device_state``: its last state, at ``step``, onto whose shardings the best is restored."""
  from amaml import sharding

  kept = restore(run.out, device_state)
  if kept is not None:
    kept = (sharding.host_local(kept[0]), *kept[1:])
  last = sharding.host_local(device_state)
  return kept_results(run.exp, last, kept, step, evaluate_at_end, progress)


def kept_results(exp, last, kept, step: int, evaluate_at_end: bool, progress: bool) -> dict:
  """What ``keep_best`` adds to the results of a run (or of a seed, ``exp`` its experiment):
  ``tested`` (``"best"``, or ``"last"`` when no validation gave a finite metric), ``best_step``
  and ``best_val_<metric>``, and with ``evaluate_at_end`` the final evaluation
  (:func:`amaml.evaluation.meta_test`) of the best state's parameters and alpha, and
  ``test_last``, the ``test`` of the last state's, when they differ. ``last``: the state at
  ``step``; ``kept``: ``(state, step, metric)`` of the best, or ``None`` (host-local)."""
  name = metric_name(exp.config)
  if kept is None:
    results = {"tested": "last", "best_step": None, f"best_val_{name}": None}
    tested = last
  else:
    tested = kept[0]
    results = {"tested": "best", "best_step": int(kept[1]), f"best_val_{name}": float(kept[2])}
  if evaluate_at_end:
    results.update(meta_test(exp, tested.params, tested.alpha, progress=progress))
    if results["best_step"] not in (None, step):
      results["test_last"] = meta_test(exp, last.params, last.alpha, progress=progress)["test"]
  return results
