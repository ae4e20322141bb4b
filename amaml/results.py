"""A run's results: ``results.json``, reading a run directory back, a readable summary.

:func:`amaml.train.train` ends with :func:`training_results` (steps, times, the final
rates, the versions that produced them) and the final evaluation
(:func:`amaml.evaluation.meta_test`), written atomically by :func:`write_results`.
:func:`load_run` reads a run directory back (``amaml evaluate``) and
:func:`format_results` prints a results dict.

(:mod:`amaml.train` re-exports :func:`load_run` and :func:`format_results`, so
``amaml.train.load_run`` works too.)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from amaml import meta
from amaml.configs import Config
from amaml.env import versions
from amaml.experiment import Experiment, build
from amaml.hd import current_learning_rate


def training_results(
  cfg: Config, state: meta.MetaState, step: int, train_s: float, compile_s: float | None
) -> dict:
  """What a finished training loop reports before its evaluation: the configuration, the
  steps taken, the training time (``compile_s``: the first call's, compilation included),
  the final ``alpha`` (a mean over its entries) and ``beta`` (None when it is not adapted)
  and the versions (``amaml.env.versions()``). ``state`` is a host-local copy."""
  results = {
    "config": dataclasses.asdict(cfg),
    "steps": step,
    "train_seconds": train_s,
    "first_chunk_seconds_incl_compile": compile_s,
    "final_alpha": float(meta.tree_mean(state.alpha)),
    "versions": versions(),
  }
  beta = current_learning_rate(state.opt_state)
  results["final_beta"] = None if beta is None else float(beta)
  return results


def write_results(out: Path, results: dict) -> None:
  """``out/results.json``, written atomically."""
  tmp = out / "results.tmp"
  tmp.write_text(json.dumps(results, indent=1))
  os.replace(tmp, out / "results.json")


def load_run(
  run_dir: str | os.PathLike, step: int | None = None
) -> tuple[Experiment, meta.MetaState]:
  """The experiment and state saved in ``run_dir``: checkpoint ``step``, or the newest that
  can be read (each newer one that cannot is named on stderr; see
  :meth:`amaml.checkpoint.Checkpointer.restore_newest_intact`). A run trained with
  ``keep_best`` gives its best checkpoint (``run_dir/best``, :mod:`amaml.best`) when ``step``
  is ``None`` or that checkpoint's step; with ``--seeds``, when ``step`` is ``None``: each
  seed's own best state (a seed without one: its newest checkpoint's)."""
  from amaml import best
  from amaml.checkpoint import Checkpointer

  run = Path(run_dir)
  if not (run / "config.json").exists():
    raise FileNotFoundError(
      f"{run} has no config.json: is it a run directory written by amaml train?"
    )
  cfg = Config.from_json((run / "config.json").read_text())
  exp = build(cfg)
  ckpt = Checkpointer(run / "checkpoints")
  try:
    target = exp.learner.init(exp.params)
    if cfg.seeds > 1:  # the stacked state of the seeds (amaml.seeds): its shapes
      target = jax.tree.map(lambda x: jnp.stack([x] * cfg.seeds), target)
    kept = best.kept_step(run) if cfg.keep_best else None
    if kept is not None and (step is None or (step == kept and cfg.seeds == 1)):
      state, steps, _ = best.restore(run, target)
      if np.any(np.asarray(steps) < 0):  # seeds without a finite validation: their newest
        state = best.where(np.asarray(steps) >= 0, state, ckpt.restore_newest_intact(target))
    elif step is None:
      state = ckpt.restore_newest_intact(target)
    else:
      state = ckpt.restore(target, step)
  finally:
    ckpt.close()
  return exp, state


def format_results(results: dict) -> str:
  """A readable summary of a results dict (of a multi-seed run:
  :func:`amaml.seeds.format_results`)."""
  if "per_seed" in results:
    from amaml.seeds import format_results as format_seeds

    return format_seeds(results)
  cfg = results.get("config", {})
  t = results["test"]
  lines = [
    f"{cfg.get('method', '?')} on {cfg.get('task', '?')}: {results.get('steps', '?')} meta steps"
    + (f" in {results['train_seconds']:.0f} s" if "train_seconds" in results else "")
  ]
  how = f"{t['inner_steps']} inner steps" if cfg.get("method") != "protonet" else "no inner loop"
  if t.get("alpha_scale", 1.0) != 1.0:
    how += f" at {t['alpha_scale']:g} x alpha"
  if "test_adaptation" in results:
    choice = results["test_adaptation"]
    how += f", chosen on {choice['tasks']} {choice['split']} tasks"
  if "accuracy" in t:
    lines.append(
      f"  meta-test accuracy on {t['tasks']} tasks ({how}): "
      f"{100 * t['accuracy']:.2f}% +- {100 * t['accuracy_ci95']:.2f}% (95% CI)"
    )
  else:
    lines.append(f"  meta-test on {t['tasks']} tasks ({how})")
  lines.append(
    f"  query loss before adaptation {t['pre_loss']:.4f} +- {t['pre_loss_ci95']:.4f}, "
    f"after {t['loss']:.4f} +- {t['loss_ci95']:.4f}"
  )
  fixed = results.get("test_fixed")
  if fixed is not None and "accuracy" in fixed:
    lines.append(
      f"  with MAML's fixed protocol ({fixed['inner_steps']} steps at alpha): "
      f"{100 * fixed['accuracy']:.2f}% +- {100 * fixed['accuracy_ci95']:.2f}%"
    )
  elif fixed is not None:
    lines.append(
      f"  with MAML's fixed protocol ({fixed['inner_steps']} steps at alpha): query loss "
      f"{fixed['loss']:.4f} +- {fixed['loss_ci95']:.4f}"
    )
  if "tested" in results:
    lines.append(kept_line(results))
  if "final_alpha" in results:
    beta = results.get("final_beta")
    lines.append(
      f"  final alpha {results['final_alpha']:.4g}"
      + (f", final beta {beta:.4g}" if beta is not None else "")
    )
  return "\n".join(lines)


def kept_line(results: dict) -> str:
  """The summary's line on the parameters that a ``keep_best`` run (or seed, its ``per_seed``
  entry) tested (:mod:`amaml.best`)."""
  if results["tested"] != "best":
    return "  tested the last parameters: no validation gave a finite metric"
  name = next(k for k in results if k.startswith("best_val_"))
  step, metric = results["best_step"], results[name]
  line = f"  tested step {step}, the best on validation ({name} {metric:.4g})"
  last = results.get("test_last")
  if last is not None and "accuracy" in last:
    line += f"; the last step's accuracy {100 * last['accuracy']:.2f}%"
  elif last is not None:
    line += f"; the last step's query loss {last['loss']:.4f}"
  return line
