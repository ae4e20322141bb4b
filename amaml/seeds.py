"""Several seeds in one program: ``amaml train --seeds N`` (``Config.seeds``).

A run with ``seed`` s and ``seeds`` N trains N independent runs, seed k being the run of
seed ``s + k`` (:func:`seed_config`): its own initial weights, task stream, alpha, outer
optimizer state and backtracking. They train as ONE compiled program: the state has a
leading axis of N seeds (:func:`init_state`; each seed's weights come from the model's
initializer, :func:`initial_params`, and the data is loaded once) and each meta step is
``jax.vmap`` of the meta step over them, each seed sampling its tasks from its own key
(:func:`make_chunk`, which :func:`amaml.train.make_train_chunk` calls with the seeds
``s + k``). Checkpoints hold the stacked state, so ``--resume`` covers every seed (bitwise,
as for one seed).

:func:`make_chunk` takes any vector of seeds, one per member, repeats allowed: the grids of
``benchmarks/robustness.py`` train through it, one member per cell (initial rates, seed).

Before anything compiles, ``amaml train`` prints what the seeds need in memory
(:func:`memory_line`): the stacked state, exact (``jax.eval_shape``), and the tasks of a
meta step; where the device reports a memory limit, a state larger than it stops the run
with one line (:func:`check_memory`).

What a multi-seed run writes:

* ``metrics.jsonl``: every line holds the mean over seeds under the usual names (``loss``,
  ``alpha``, ``val_accuracy``, ...) and each seed's value as ``seed<k>/<name>``
  (``seed0/loss``, ``seed1/loss``, ...; k counts from 0, the run of seed ``s + k``)
  (:func:`line`). ``step`` and ``steps_per_s`` are shared.
* ``results.json``: ``per_seed``, one entry per seed (``seed``, ``final_alpha``,
  ``final_beta`` and its own final evaluation: ``test``, ``test_adaptation``, maybe
  ``test_fixed``), then ``test`` (and ``test_fixed`` when every seed has it) summarised
  over seeds (:func:`spread`): each metric's mean over seeds, ``<name>_seed_std`` (its
  standard deviation over seeds, ``ddof=1``) and ``<name>_ci95`` (the mean over seeds of
  each seed's 95% CI half-width over tasks). ``final_alpha`` and ``final_beta`` are means.
* with ``--keep_best`` (:mod:`amaml.best`): ``best/``, one checkpoint whose seed k is seed
  k's own best state on validation, and in each ``per_seed`` entry ``tested``,
  ``best_step``, ``best_val_<metric>`` and maybe ``test_last``: its evaluation is that of
  its best state, so ``test`` summarises the seeds' best states.

With ``--alpha_search`` each seed searches its own alpha0 on its own first meta-batch
(:func:`amaml.train.alpha_search`). Seeds train on one device and one process.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from amaml import best, xla_options
from amaml.configs import Config
from amaml.evaluation import meta_test
from amaml.experiment import Experiment, build, run_keys
from amaml.results import kept_line, training_results
from amaml.run_log import summarise


def seed_config(cfg: Config, k: int) -> Config:
  """The configuration of seed ``k`` of ``cfg``: a one-seed run of seed ``cfg.seed + k``."""
  return dataclasses.replace(cfg, seed=cfg.seed + k, seeds=1)


def seed_values(cfg: Config) -> jax.Array:
  """The seeds of ``cfg``'s runs: ``seed, seed + 1, ..., seed + seeds - 1``."""
  return cfg.seed + jnp.arange(cfg.seeds, dtype=jnp.int32)


def seed_experiment(exp: Experiment, k: int) -> Experiment:
  """``exp`` as seed ``k``'s one-seed run sees it (its configuration: its evaluation tasks)."""
  return exp._replace(config=seed_config(exp.config, k))


def seed_state(state, k: int):
  """Seed ``k``'s state of a stacked state."""
  return jax.tree.map(lambda x: x[k], state)


def stack(trees: list):
  """Trees of one structure, stacked along a new leading axis."""
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def check(cfg: Config) -> None:
  """What a multi-seed run needs beyond :meth:`amaml.configs.Config.validate`: a single process."""
  if cfg.seeds > 1 and jax.process_count() > 1:
    raise ValueError(
      f"--seeds {cfg.seeds} with {jax.process_count()} processes: several seeds train in one "
      "process; start one process, or pass --seeds 1"
    )


def initial_params(exp: Experiment, seed: int):
  """The initial weights of the one-seed run of ``seed`` with ``exp``'s configuration:
  ``exp.params`` for ``exp.config.seed``, else the model's initializer on that run's init
  key (``exp.init_params``; no data is loaded). A task setup without ``init_params``
  (:class:`amaml.experiment.TaskSetup`) builds that run (:func:`amaml.experiment.build`)."""
  if seed == exp.config.seed:
    return exp.params
  if exp.init_params is not None:
    return exp.init_params(run_keys(seed).init)
  return build(dataclasses.replace(exp.config, seed=seed, seeds=1)).params


def init_state(exp: Experiment):
  """The stacked initial state of ``exp``'s seeds: seed k starts from the weights of seed
  ``seed + k`` (:func:`initial_params`)."""
  cfg = exp.config
  return stack([exp.learner.init(initial_params(exp, cfg.seed + k)) for k in range(cfg.seeds)])


def make_chunk(exp: Experiment, length: int, update=None):
  """Up to ``length`` meta steps of N independent runs as one jitted loop: ``(state, images,
  start, steps, seeds) -> (state, metrics)``. ``state`` is stacked over N members (leading
  axis) and ``seeds`` (int32, ``[N]``, repeats allowed) holds each member's seed: member j
  takes meta step i on the tasks that a one-seed run of seed ``seeds[j]`` takes it on
  (:func:`amaml.train.step_batch`), by ``update`` (default ``exp.learner.update``),
  ``jax.vmap``-ed over the members. It runs ``min(steps, length)`` steps from ``start``;
  the metrics are stacked ``[length, N]``, the first ``steps`` rows the steps taken. The
  input state is donated. ``amaml train --seeds N`` runs it with the seeds ``seed + k``
  (:func:`amaml.train.make_train_chunk`); ``benchmarks/robustness.py`` with one member per
  cell of its grids."""
  from amaml.train import step_batch  # (amaml.train imports this module)

  update = exp.learner.update if update is None else update
  one = lambda st, images, i, seed: update(st, step_batch(exp, images, i, seed))
  return chunk_loop(jax.vmap(one, in_axes=(0, None, None, 0)), length)


def chunk_loop(step, length: int, **jit_kwargs):
  """The loop of every training chunk (one seed, :func:`amaml.train.make_train_chunk`, or
  several, :func:`make_chunk`): ``step(state, images, i, *args) -> (state, metrics)`` as the
  jitted ``(state, images, start, steps, *args) -> (state, metrics)`` that takes
  ``min(steps, length)`` steps from ``start`` and stacks the metrics over ``length`` rows.
  ``steps`` is traced: one compiled loop serves every chunk size. The state is donated;
  ``jit_kwargs`` go to ``jax.jit`` (through :func:`amaml.xla_options.jit`)."""

  def chunk(state, images, start, steps, *args):
    shapes = jax.eval_shape(step, state, images, start, *args)[1]
    rows = jax.tree.map(lambda s: jnp.zeros((length, *s.shape), s.dtype), shapes)

    def body(j, carry):
      st, rows = carry
      st, m = step(st, images, start + j, *args)
      return st, jax.tree.map(lambda r, v: r.at[j].set(v), rows, m)

    return jax.lax.fori_loop(0, jnp.minimum(steps, length), body, (state, rows))

  return xla_options.jit(chunk, donate_argnums=(0,), **jit_kwargs)


def tree_bytes(tree) -> int:
  """Bytes of the arrays (or ``jax.ShapeDtypeStruct``) of ``tree``."""
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def memory_needs(exp: Experiment, images) -> tuple[int, int]:
  """Bytes of one seed's training state and of one seed's tasks of a meta step, from their
  shapes (``jax.eval_shape``: nothing is computed or compiled)."""
  from amaml.train import step_batch  # (amaml.train imports this module)

  state = jax.eval_shape(exp.learner.init, exp.params)
  batch = jax.eval_shape(lambda x: step_batch(exp, x, 0), images)
  return tree_bytes(state), tree_bytes(batch)


def device_limit(device=None) -> int | None:
  """The memory limit in bytes that ``device`` (default the first) reports, or ``None``
  (a CPU reports none)."""
  stats = (device or jax.devices()[0]).memory_stats()
  return (stats or {}).get("bytes_limit")


def _size(n: float) -> str:
  for unit in ("B", "kB", "MB", "GB"):
    if n < 1000 or unit == "GB":
      return f"{n:.3g} {unit}"
    n /= 1000


def memory_line(seeds: int, state_bytes: int, batch_bytes: int, limit: int | None) -> str:
  """What ``seeds`` seeds need in memory, in one line (see :func:`check_memory`)."""
  n = seeds
  out = (
    f"--seeds {n}: training state {n} x {_size(state_bytes)} = {_size(n * state_bytes)}, "
    f"tasks of a meta step {n} x {_size(batch_bytes)} = {_size(n * batch_bytes)}; "
    "activations grow about linearly with N"
  )
  return out + (f" (device memory limit {_size(limit)})" if limit else "")


def check_memory(exp: Experiment, images, quiet: bool = False) -> str:
  """Before compiling: prints :func:`memory_line` of ``exp``'s seeds to stderr (unless
  ``quiet``) and returns it; raises ``ValueError`` (one line) when the stacked state alone
  exceeds the limit that the device reports (:func:`device_limit`)."""
  n, (state, batch) = exp.config.seeds, memory_needs(exp, images)
  limit = device_limit()
  if limit and n * state > limit:
    raise ValueError(
      f"--seeds {n}: the training state alone needs {n} x {_size(state)} = {_size(n * state)}, "
      f"more than the device's memory limit of {_size(limit)}; lower --seeds"
    )
  text = memory_line(n, state, batch, limit)
  if not quiet:
    print(f"amaml: {text}", file=sys.stderr, flush=True)
  return text


def per_seed(fn, exp: Experiment, state) -> list:
  """``fn(experiment, state)`` of each seed, in order."""
  return [fn(seed_experiment(exp, k), seed_state(state, k)) for k in range(exp.config.seeds)]


def line(recs: list[dict]) -> dict:
  """One dict of per-seed dicts: each number's mean over seeds under its name, and seed k's
  value under ``seed<k>/<name>``."""
  out = {}
  for name, v in recs[0].items():
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      out[name] = float(np.mean([r[name] for r in recs]))
  for k, rec in enumerate(recs):
    out.update({f"seed{k}/{name}": v for name, v in rec.items()})
  return out


def log_line(step: int, pending: list, t_line: float) -> dict:
  """:func:`amaml.run_log.log_line` of a multi-seed run: ``pending`` holds metrics stacked
  over steps and seeds (``(steps, seeds)``); each seed is summarised alone, then
  :func:`line`."""
  stacked = jax.device_get(jax.tree.map(lambda *x: np.concatenate(x), *pending))
  steps, seeds = np.shape(stacked["loss"])[:2]
  recs = [summarise({k: np.asarray(v)[:, i] for k, v in stacked.items()}) for i in range(seeds)]
  return {
    "step": step,
    **line(recs),
    "steps_per_s": steps / max(time.perf_counter() - t_line, 1e-9),
  }


def spread(summaries: list[dict]) -> dict:
  """Evaluation summaries of the seeds (:func:`amaml.evaluation.evaluate`) over seeds: each
  metric's mean, ``<name>_seed_std`` (standard deviation over seeds, ``ddof=1``) and
  ``<name>_ci95`` (the seeds' mean 95% CI half-width over tasks); ``inner_steps`` and
  ``alpha_scale`` when every seed has the same."""
  first = summaries[0]
  out = {"split": first["split"], "tasks": first["tasks"], "seeds": len(summaries)}
  for name in ("inner_steps", "alpha_scale"):
    if name in first and all(s[name] == first[name] for s in summaries):
      out[name] = first[name]
  for name, v in first.items():
    skip = name in out or name in ("inner_steps", "alpha_scale") or name.endswith("_ci95")
    if skip or not isinstance(v, float):
      continue
    values = np.array([s[name] for s in summaries], float)
    out[name] = float(values.mean())
    out[f"{name}_seed_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    if f"{name}_ci95" in first:
      out[f"{name}_ci95"] = float(np.mean([s[f"{name}_ci95"] for s in summaries]))
  return out


def final_results(
  exp, state, step: int, times, evaluate_at_end=True, progress=False, kept=None
) -> dict:
  """``results.json`` of a multi-seed run (see the module's docstring): ``times`` is
  ``(train_seconds, first_chunk_seconds)``; ``state`` a host-local stacked state. With
  ``keep_best``, ``kept`` is the best checkpoint (:func:`amaml.best.restore`; ``None``:
  none) and each seed tests its own best state (:func:`amaml.best.kept_results`)."""
  train_s, compile_s = times

  def one(k: int, best_k) -> dict:
    e, last = seed_experiment(exp, k), seed_state(state, k)
    r = training_results(e.config, last, step, train_s, compile_s)
    out = {"seed": e.config.seed, "final_alpha": r["final_alpha"], "final_beta": r["final_beta"]}
    if exp.config.keep_best:
      out.update(best.kept_results(e, last, best_k, step, evaluate_at_end, progress))
    elif evaluate_at_end:
      out.update(meta_test(e, last.params, last.alpha, progress=progress))
    return out

  seeds = [one(k, b) for k, b in enumerate(best.seed_bests(kept, exp.config.seeds))]
  results = training_results(exp.config, seed_state(state, 0), step, train_s, compile_s)
  return {**results, **combine(seeds)}


def combine(seeds: list[dict]) -> dict:
  """The per-seed results of a multi-seed run and their summary over seeds: ``per_seed``,
  the mean ``final_alpha`` and ``final_beta``, ``test`` (and ``test_fixed``) by
  :func:`spread`."""
  out = {}
  if "final_alpha" in seeds[0]:  # (amaml evaluate reports no rates)
    betas = [s["final_beta"] for s in seeds]
    out["final_alpha"] = float(np.mean([s["final_alpha"] for s in seeds]))
    out["final_beta"] = None if None in betas else float(np.mean(betas))
  out["per_seed"] = seeds
  for name in ("test", "test_fixed"):
    if all(name in s for s in seeds):
      out[name] = spread([s[name] for s in seeds])
  return out


def format_results(results: dict) -> str:
  """A readable summary of a multi-seed results dict: each seed, then the mean over seeds
  with its standard deviation over seeds, next to the 95% CI over tasks."""
  cfg, seeds = results.get("config", {}), results["per_seed"]
  t = results["test"]
  lines = [
    f"{cfg.get('method', '?')} on {cfg.get('task', '?')}: {len(seeds)} seeds, "
    f"{results.get('steps', '?')} meta steps"
    + (f" in {results['train_seconds']:.0f} s" if "train_seconds" in results else "")
  ]
  metric, scale = ("accuracy", 100) if "accuracy" in t else ("loss", 1)
  unit = "%" if scale == 100 else ""
  for s in seeds:
    st = s["test"]
    how = f"{st['inner_steps']} inner steps"
    if st.get("alpha_scale", 1.0) != 1.0:
      how += f" at {st['alpha_scale']:g} x alpha"
    lines.append(
      f"  seed {s['seed']}: meta-test {metric} {scale * st[metric]:.4g}{unit} +- "
      f"{scale * st[f'{metric}_ci95']:.2g}{unit} (95% CI over {st['tasks']} tasks; {how})"
    )
    if "tested" in s:  # keep_best: the step this seed tested (amaml.best)
      lines.append("  " + kept_line(s))
  lines.append(
    f"  mean over {len(seeds)} seeds: {metric} {scale * t[metric]:.4g}{unit} +- "
    f"{scale * t[f'{metric}_seed_std']:.2g}{unit} (std over seeds); 95% CI over tasks +- "
    f"{scale * t[f'{metric}_ci95']:.2g}{unit} (mean over seeds)"
  )
  beta = results.get("final_beta")
  if "final_alpha" in results:
    lines.append(
      f"  final alpha {results['final_alpha']:.4g}"
      + (f", final beta {beta:.4g}" if beta is not None else "")
      + " (means over seeds)"
    )
  return "\n".join(lines)
