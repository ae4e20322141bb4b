"""Training runs: ``amaml train`` (see :mod:`amaml.cli`).

A run is a directory holding ``config.json``, ``metrics.jsonl`` (one line every
``log_every`` steps: means over those steps, and the rates at their end),
``checkpoints/`` (Orbax, atomic; with ``keep_best`` also ``best/``, :mod:`amaml.best`) and
``results.json`` (the final evaluation, with the versions that produced it).

Speed: training advances in jitted ``lax.scan`` chunks (a whole log line of fast
steps, or one slow step; :data:`CHUNK_SECONDS`) with episodes sampled on the device
(:func:`amaml.data.sample_tasks`), so the host only draws the progress bar and
checks the time budget. (The host sampler, :class:`amaml.data.EpisodeIterator`,
serves loops of your own around ``learner.step``.) The batch of step ``i`` depends
only on ``(seed, i)`` (:func:`step_batch`), so a resumed run repeats an uninterrupted one
exactly.

``train()`` reads top-down: :func:`_prepare` (run directory, configuration, resume),
:func:`_loop` (chunks, log lines, validation, checkpoints, time budget) and
:func:`_finish` (the final evaluation into ``results.json``).

The other parts of a run have modules of their own: :mod:`amaml.experiment` (what a
configuration builds: :func:`~amaml.experiment.build`, the task registry, the learner,
:func:`~amaml.experiment.run_keys`), :mod:`amaml.evaluation` (meta-testing:
:func:`~amaml.evaluation.evaluate`, :func:`~amaml.evaluation.select_adaptation`,
:func:`~amaml.evaluation.meta_test`), :mod:`amaml.run_log` (``metrics.jsonl``, TensorBoard,
the progress bar) and :mod:`amaml.results` (``results.json``,
:func:`~amaml.results.load_run`, :func:`~amaml.results.format_results`). Their public
names are importable from here too (``amaml.train.build``; see ``__all__``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from amaml import best, meta, rates, seeds, sharding, signals, xla_options
from amaml.adaptation import ALPHA_SCALES, best_adaptation
from amaml.configs import Config
from amaml.evaluation import eval_batches, evaluate, meta_test, select_adaptation
from amaml.experiment import TASKS, Experiment, RunKeys, TaskSetup, build, make_learner, run_keys
from amaml.experiment import classification_setup, image_folder_setup, image_model, omniglot_setup
from amaml.experiment import outer_optimizer, sinusoid_setup
from amaml.results import format_results, load_run, training_results, write_results
from amaml.run_log import RunLog, log_line, truncate_metrics
from amaml.task import TaskBatch

# train's own names, then the public names of the modules above that amaml.train re-exports
__all__ = ["train", "make_train_chunk", "step_batch", "CHUNK_SECONDS"]
__all__ += ["Experiment", "TaskSetup", "RunKeys", "run_keys", "TASKS", "build", "make_learner"]
__all__ += ["sinusoid_setup", "omniglot_setup", "image_folder_setup", "classification_setup"]
__all__ += ["image_model", "outer_optimizer"]  # the above and these: amaml.experiment
__all__ += ["eval_batches", "select_adaptation", "evaluate", "meta_test"]  # amaml.evaluation
__all__ += ["load_run", "format_results"]  # amaml.results
__all__ += ["ALPHA_SCALES", "best_adaptation"]  # amaml.adaptation


def step_batch(exp: Experiment, images, step, seed=None) -> TaskBatch:
  """The tasks that meta step ``step`` trains on: sampled from ``fold_in(train key, step)``
  (the train key of ``seed``, a traced one too; default ``exp.config.seed``)."""
  key = jax.random.fold_in(run_keys(exp.config if seed is None else seed).train, step)
  return exp.sample(key, images, exp.config.meta_batch)


def make_train_chunk(exp: Experiment, length: int, mesh=None, update=None):
  """Up to ``length`` meta steps as one jitted loop: ``(state, images, start, steps) ->
  (state, metrics)`` runs ``min(steps, length)`` steps from step ``start`` and returns the
  metrics stacked over ``length`` rows (the first ``steps`` are the steps taken). Step ``i``
  samples its tasks from ``(seed, i)`` on the device. The number of steps is a traced
  argument: one compiled loop serves every chunk size, so how a run is cut into chunks
  never changes its numbers (a resumed run equals an uninterrupted one bitwise). With a
  ``mesh`` (:mod:`amaml.sharding`) each batch is split over its devices by task and the
  state stays replicated. The input state is donated. ``update``: the meta step (default
  ``exp.learner.update``; a phase's, :func:`amaml.meta.phase_at`, for the steps it holds).
  With ``seeds`` N > 1 the state and the metrics have a leading axis of N seeds and each step
  is ``jax.vmap`` of the meta step over them, seed k's tasks those of the run of seed
  ``seed + k`` (:func:`amaml.seeds.make_chunk`)."""
  update = exp.learner.update if update is None else update
  if exp.config.seeds > 1:
    loop, values = seeds.make_chunk(exp, length, update), seeds.seed_values(exp.config)
    return lambda state, images, start, steps: loop(state, images, start, steps, values)

  def one(st, images, i):
    batch = step_batch(exp, images, i)
    if mesh is not None:
      batch = sharding.constrain_batch(batch, mesh)
    return update(st, batch)

  out = {} if mesh is None else dict(out_shardings=sharding.replicated(mesh))
  return seeds.chunk_loop(one, length, **out)


#: Training advances in calls of the jitted loop (:func:`make_train_chunk`) of about this many
#: seconds (at least one step, at most a log line), so that ``max_minutes`` is honoured to
#: within this much (or one step, if a step is longer). Each call has a fixed cost (on CPU,
#: about 0.35 s for Omniglot 5w1s: its temporary buffers are allocated per call), so calls
#: of one step would train about 20% slower there (BENCHMARKS.md, "Training loop").
CHUNK_SECONDS = 30.0


class _Run(NamedTuple):
  """What :func:`train` prepares: where the run lives, what it trains, and from where."""

  cfg: Config
  out: Path
  exp: Experiment
  state: meta.MetaState
  start: int
  images: Any  # the training split (replicated over the mesh when sharded)
  mesh: Any
  ckpt: Any  # amaml.checkpoint.Checkpointer
  best: Any = None  # amaml.best.Tracker with keep_best


def train(
  cfg: Config,
  out_dir: str | os.PathLike,
  *,
  resume: bool = False,
  progress: bool = True,
  evaluate_at_end: bool = True,
) -> tuple[meta.MetaState, dict]:
  """Trains ``cfg`` into ``out_dir``; with ``resume`` continues from its last checkpoint.
  With several processes (:func:`amaml.sharding.initialize` first) every process calls it
  alike; process 0 writes the files.

  Returns the final state and the results dict (also written to ``results.json``).
  Stops with ``FloatingPointError`` after ``max_nonfinite`` non-finite steps in a
  row (the guard keeps the state finite, so no checkpoint holds NaN), and with
  :class:`amaml.signals.Interrupted` after a checkpoint on SIGINT or SIGTERM.
  """
  run = _prepare(cfg, Path(out_dir), resume, progress)
  state, step, train_s, compile_s = _loop(run, progress)
  return state, _finish(run, state, step, train_s, compile_s, evaluate_at_end, progress)


def _prepare(cfg: Config, out: Path, resume: bool, progress: bool = False) -> _Run:
  """Checks ``cfg`` and ``out``, writes ``config.json``, builds the experiment, restores (or
  searches alpha0, saying what it found when ``progress``)."""
  from amaml.checkpoint import Checkpointer

  cfg.validate()
  seeds.check(cfg)
  mesh = None
  if cfg.devices != 1 or jax.process_count() > 1:  # before any file is written: fails on too
    mesh = _mesh(cfg)  # few devices or an uneven split
    sharding.check_divisible(cfg.meta_batch, mesh)
  _write_config(cfg, out, resume)
  exp = build(cfg)
  if cfg.seeds > 1:  # what the stacked state needs; stops here if the device is too small
    seeds.check_memory(exp, exp.data["train"], quiet=not _primary())
  if cfg.seeds > 1:  # one state per seed, stacked (amaml.seeds)
    state = seeds.init_state(exp)
  else:
    state = exp.learner.init(jax.tree.map(jnp.copy, exp.params))  # the chunks donate it
  images = exp.data["train"]
  if mesh is not None:  # data parallel: tasks split over devices, state and images replicated
    state, images = sharding.replicate((state, images), mesh)
  tracker = best.Tracker(exp, out, state, resume) if cfg.keep_best else None  # (amaml.best)
  ckpt = Checkpointer(out / "checkpoints")
  start = 0
  if resume and ckpt.latest_step() is not None:  # onto the shardings of ``state``
    try:
      state = ckpt.restore_newest_intact(state, remove_corrupt=True)
    except BaseException:
      ckpt.close()
      raise
    start = int(np.max(sharding.host_local(state.step)))  # (with seeds, each seed's)
  elif cfg.resolved_alpha_search:  # each seed on its own first tasks
    many = cfg.seeds > 1
    state = alpha_search(exp, many)(state, images, seeds.seed_values(cfg) if many else cfg.seed)
    if progress and _primary():
      print(f"amaml: {_searched_line(cfg, state.alpha)}", file=sys.stderr, flush=True)
  if _primary():
    truncate_metrics(out / "metrics.jsonl", start)
  return _Run(cfg, out, exp, state, start, images, mesh, ckpt, tracker)


def _write_config(cfg: Config, out: Path, resume: bool) -> None:
  """``out/config.json``, once ``out`` is known to hold no other run: with ``resume``, the
  configuration there may differ from ``cfg`` only in what a resumed run may change; without,
  ``out`` holds no checkpoint."""
  out.mkdir(parents=True, exist_ok=True)
  cfg_path = out / "config.json"
  if cfg_path.exists() and resume:
    old = Config.from_json(cfg_path.read_text())
    may_change = ("iterations", "devices", "max_minutes", "tensorboard")
    diff = {
      f.name: (getattr(old, f.name), getattr(cfg, f.name))
      for f in dataclasses.fields(Config)
      if getattr(old, f.name) != getattr(cfg, f.name) and f.name not in may_change
    }
    if diff:
      raise ValueError(
        f"--resume with a configuration that differs from {cfg_path}: {diff}; "
        f"use the same settings (only {', '.join(may_change)} may change) or a new --out"
      )
  elif (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()) and not resume:
    raise FileExistsError(
      f"{out} already holds a run: pass --resume to continue it, or choose another --out"
    )
  if _primary():
    tmp = cfg_path.with_suffix(".tmp")
    tmp.write_text(cfg.to_json())
    os.replace(tmp, cfg_path)


def alpha_search(exp: Experiment, vmapped: bool = False):
  """``--alpha_search`` as the jitted ``(state, images, seed) -> state``: alpha0 replaced by
  :func:`amaml.rates.search_alpha`'s choice on the tasks of meta step 0 of the run of ``seed``
  (the tasks that step then trains on). ``vmapped``: over stacked states and their seeds
  (``--seeds``, :mod:`amaml.seeds`)."""

  def search(state, images, seed):
    return rates.search_alpha(exp.learner.meta_loss, state, step_batch(exp, images, 0, seed))

  return xla_options.jit(jax.vmap(search, in_axes=(0, None, 0)) if vmapped else search)


def _searched_line(cfg: Config, alpha) -> str:
  """The line ``amaml train`` prints after the alpha0 search: the largest rate it set (one
  per seed with ``--seeds``)."""
  leaves = [
    np.asarray(x).reshape(cfg.seeds, -1) for x in jax.tree.leaves(sharding.host_local(alpha))
  ]
  found = np.max(np.concatenate(leaves, axis=1), axis=1)
  values = ", ".join(f"{v:.4g}" for v in found)
  return (
    f"alpha searched on the first meta-batch: {values} (the same from any --alpha; "
    "--alpha_search false starts from --alpha)"
  )


def _primary() -> bool:
  """Whether this process writes the run's files (process 0 of several; the only one)."""
  return jax.process_index() == 0


def _mesh(cfg: Config):
  """The task mesh of ``cfg.devices``; with several processes (:func:`amaml.sharding.initialize`)
  it spans the devices of them all (``devices`` 0 or 1)."""
  if jax.process_count() > 1 and cfg.devices not in (0, 1, jax.device_count()):
    raise ValueError(
      f"devices={cfg.devices} with {jax.process_count()} processes: several "
      "processes train on all their devices; pass --devices 0"
    )
  return sharding.task_mesh(0 if jax.process_count() > 1 else cfg.devices)


def _loop(run: _Run, progress: bool):
  """Meta steps from ``run.start`` to ``iterations`` (or ``max_minutes``): a log line every
  ``log_every`` steps, validation and checkpoints at their multiples, a checkpoint at the end.

  Each call of the jitted loop takes the steps that ``_Chunks`` sizes: one compiled
  loop per phase (:func:`amaml.meta.phase_at`: MAML++'s first- and second-order steps),
  calls that fit in :data:`CHUNK_SECONDS`, none across a log line or a phase's end; so
  chunking changes no result. The progress bar (:class:`amaml.run_log.RunLog`) is
  refreshed every second by a thread, so it moves (elapsed time, and time against the
  budget) while a call runs. SIGINT or SIGTERM stops it after the current call: a log line,
  a checkpoint, then :class:`amaml.signals.Interrupted` (:mod:`amaml.signals`)."""
  cfg, state, step = run.cfg, run.state, run.start
  chunks, pending = _Chunks(run), []
  primary = _primary()  # with several processes, process 0 alone draws and writes
  t_start = t_line = time.perf_counter()
  try:
    with (
      RunLog(cfg, run.out, step, t_start, progress and primary, primary) as log,
      signals.StopRequest() as stop,
    ):
      while step < cfg.iterations:
        n = chunks.size(step)
        state, ms, streak = chunks(state, step, n)
        step += n
        pending.append(ms)
        signum, halt = _stop_here(stop, t_start, 60 * cfg.max_minutes)
        nonfinite = streak >= cfg.max_nonfinite
        if step % cfg.log_every == 0 or step >= cfg.iterations or halt or nonfinite:
          rec = (seeds.log_line if cfg.seeds > 1 else log_line)(step, pending, t_line)
          pending, t_line = [], time.perf_counter()
          end = step >= cfg.iterations or (halt and not signum)  # (a signal: resumed later)
          log.write({**rec, **_validation(run, state, step, end)})
        log.advance(n)
        if nonfinite:
          raise _nonfinite_error(cfg, step, run.ckpt.directory)
        every = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
        if every or step >= cfg.iterations or halt:
          run.ckpt.save(step, state)
        if signum:
          raise signals.Interrupted(signum, step, f"{run.ckpt.directory}/{step}")
        if halt:
          break
  finally:
    run.ckpt.close()
  return state, step, time.perf_counter() - t_start, chunks.compile_s


class _Chunks:
  """The jitted loop of the phase that a run is in (:func:`make_train_chunk`, built when the
  run reaches the phase) and the size of its calls: a phase's first two calls take single
  steps (the first compiles the loop, the second times a step), the others as many steps as
  fit in :data:`CHUNK_SECONDS` (at least one, at most to the next log line)."""

  def __init__(self, run: _Run):
    self.run = run
    self.loop, self.phase = None, None  # the loop of the phase being run, and its first step
    self.per_call, self.step_s, self.fresh = 1, None, True
    self.compile_s = None  # the run's first call, its compilation included

  def size(self, step: int) -> int:
    """The steps of the call from ``step``: none past the next log line, the run's end or
    its phase's end. A new phase gets its own loop, and its step time is measured anew."""
    cfg = self.run.cfg
    phase = meta.phase_at(self.run.exp.learner, step)
    if phase.start != self.phase:
      self.loop = make_train_chunk(self.run.exp, cfg.log_every, self.run.mesh, phase.update)
      self.phase, self.per_call, self.step_s, self.fresh = phase.start, 1, None, True
    n = min(self.per_call, cfg.log_every - step % cfg.log_every, cfg.iterations - step)
    return n if phase.end is None else min(n, phase.end - step)

  def __call__(self, state, step: int, n: int):
    """``n`` steps from ``step``: the new state, their metrics (this process's copy, on the
    host) and the longest streak of non-finite steps among them."""
    t0 = time.perf_counter()
    # host values for step and n: the same in every process
    state, ms = self.loop(state, self.run.images, np.int32(step), np.int32(n))
    ms = jax.tree.map(lambda x: x[:n], sharding.host_local(ms))
    signals.wait_ready(ms["nonfinite_streak"])  # signal handlers run meanwhile
    streak = int(np.asarray(ms["nonfinite_streak"]).max())  # waits for the chunk
    self._timed(time.perf_counter() - t0)
    return state, ms, streak

  def _timed(self, dt: float) -> None:
    """A call took ``dt`` seconds: the first of a phase compiled its loop; the second, a
    single step without compilation, sets the size of the calls after it."""
    if self.fresh:
      self.compile_s = dt if self.compile_s is None else self.compile_s
      self.fresh = False
    elif self.step_s is None:
      self.step_s = dt
      per_call = max(1, min(self.run.cfg.log_every, int(CHUNK_SECONDS // max(dt, 1e-9))))
      self.per_call = int(sharding.agree(per_call))  # every process: the same chunks


def _stop_here(stop: signals.StopRequest, t_start: float, budget_s: float) -> tuple[int, bool]:
  """After a call: the signal received (SIGINT or SIGTERM; 0: none), and whether to stop
  here (on that signal, or with the time budget spent). Every process agrees on both."""
  elapsed = time.perf_counter() - t_start
  out_of_time = bool(sharding.agree(budget_s > 0 and elapsed >= budget_s))
  signum = int(sharding.agree(stop.signum or 0))
  return signum, out_of_time or signum > 0


def _validation(run: _Run, state, step: int, end: bool = False) -> dict:
  """The validation numbers of the log line at ``step``: on ``val_tasks`` tasks every
  ``val_every`` steps (none without a val split), and at the ``end`` of training with
  ``keep_best`` (whose tracker, :class:`amaml.best.Tracker`, is given every validation)."""
  cfg, exp = run.cfg, run.exp
  due = cfg.val_every and (step % cfg.val_every == 0 or (end and cfg.keep_best))
  if not (due and "val" in exp.data):
    return {}

  def val(exp, state):
    out = evaluate(exp, state.params, state.alpha, "val", cfg.val_tasks, cfg.inner_steps)
    return {f"val_{k}": v for k, v in out.items() if isinstance(v, float)}

  if cfg.seeds > 1:  # each seed's, and their means (amaml.seeds.line)
    numbers = seeds.line(seeds.per_seed(val, exp, sharding.host_local(state)))
  else:
    numbers = val(exp, sharding.host_local(state))
  if run.best is not None:  # with seeds, each seed keeps its own best
    run.best.update(step, state, numbers)
  return numbers


def _nonfinite_error(cfg: Config, step: int, directory) -> FloatingPointError:
  """What ``max_nonfinite`` non-finite meta steps in a row, by ``step``, raise."""
  outer_rate = "--epsilon" if cfg.method == "reptile" else "--beta"
  lower = outer_rate if cfg.resolved_alpha_search else f"--alpha or {outer_rate}"  # (searched)
  other = "" if cfg.method == "alpha-maml" else ", or use the default --method alpha-maml"
  return FloatingPointError(
    f"{cfg.max_nonfinite} non-finite meta steps in a row by step {step}: the state was "
    f"kept finite and the last good checkpoint is in {directory}. Lower {lower}{other}"
  )


def _finish(
  run: _Run, state, step: int, train_s: float, compile_s, evaluate_at_end: bool, progress: bool
) -> dict:
  """The final evaluation, written atomically to ``results.json`` (by process 0; every
  process evaluates its own copy of the state, so each returns the same results)."""
  device_state, state = state, sharding.host_local(state)
  if run.cfg.seeds > 1:  # with keep_best, each seed tests its own best state (amaml.best)
    kept = best.restore(run.out, device_state) if run.cfg.keep_best else None
    times = (train_s, compile_s)
    results = seeds.final_results(run.exp, state, step, times, evaluate_at_end, progress, kept)
    if _primary():
      write_results(run.out, results)
    return results
  results = training_results(run.cfg, state, step, train_s, compile_s)
  if run.cfg.keep_best:  # the best checkpoint's parameters are tested (amaml.best)
    results.update(best.final_results(run, device_state, step, evaluate_at_end, progress))
  elif evaluate_at_end:
    results.update(meta_test(run.exp, state.params, state.alpha, progress=progress))
  if _primary():
    write_results(run.out, results)
  return results
