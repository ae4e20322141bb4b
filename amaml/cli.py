"""Command line: ``amaml train``, ``amaml evaluate``, ``amaml plot``, ``amaml download``,
``amaml reproduce`` (or ``python -m amaml``).

    amaml train --config sinusoid --out runs/sinusoid
    amaml train --config omniglot-5w1s --method maml --iterations 2000 --out runs/o5
    amaml train --config omniglot-5w1s --out runs/o5 --resume
    amaml evaluate --run runs/o5 --eval_tasks 600 --eval_inner_steps 10
    amaml evaluate --run runs/o5 runs/o5-maml        # several runs: a comparison table
    amaml plot --run runs/o5 runs/o5-maml --plot_dir plots
    amaml download omniglot                          # the official zips -> arrays folder
    amaml reproduce omniglot --budget 0.001 --settings 5w1s   # the published table, scaled

Every field of :class:`amaml.configs.Config` is a flag (``--alpha 0.1``,
``--rate_rule normalized``, ...); ``amaml train --help`` lists them. The flags of every
subcommand are in :mod:`amaml.cli_flags`.

Exit codes: 0 done; 2 a user error (one line: the problem and the fix); 3 training stopped
by the non-finite guard; 130 / 143 training stopped by SIGINT / SIGTERM after a checkpoint
(one line with the command that resumes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys

from amaml.cli_flags import RenamedFlag
from amaml.cli_flags import parser as _parser
from amaml.configs import Config, get_config


# Errors a user can cause (a missing run, a wrong data folder, an optional package not
# installed, a bad flag value): one line naming the problem and the fix, exit code 2.
_USER_ERRORS = (
  FileNotFoundError,
  NotADirectoryError,
  FileExistsError,
  ValueError,
  ImportError,
  ConnectionError,
)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    args = _parser().parse_args(argv)
  except RenamedFlag as e:
    print(f"amaml {e.command}: {e}", file=sys.stderr)
    return 2
  args.argv = argv
  try:
    return _COMMANDS[args.command](args)
  except _USER_ERRORS as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, ImportError) and e.name:
      msg += f" (install it: pip install 'amaml[{_EXTRAS.get(e.name, 'all')}]')"
    print(f"amaml {args.command}: {msg}", file=sys.stderr)
    return 2


_EXTRAS = {"matplotlib": "plot", "tensorflow_datasets": "tfds", "tensorboardX": "tensorboard"}


def _train(args) -> int:
  fields = {f.name for f in dataclasses.fields(Config)}
  overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
  cfg = get_config(args.config, **overrides)
  if cfg.method == "reptile" and "beta" in overrides:  # still honoured (Config.resolved_epsilon)
    print(
      f"amaml train: warning: for reptile --beta is the old name of --epsilon; pass "
      f"--epsilon {cfg.beta:g}",
      file=sys.stderr,
      flush=True,
    )
  out = args.out or f"runs/{args.config}-{cfg.method}"
  if args.num_processes > 1:
    _join_processes(args)
  from amaml import signals, train

  try:
    _, results = train.train(cfg, out, resume=args.resume, progress=not args.no_progress)
  except signals.Interrupted as e:
    return _interrupted("train", e, resume_command(args.argv, out))
  except FloatingPointError as e:  # the non-finite guard: the state and checkpoints are finite
    print(f"amaml train: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
    return 3
  except Exception as e:
    if args.num_processes == 1 or not _lost_a_process(e):
      raise
    print(
      f"amaml train: process {args.process_id} of {args.num_processes} lost the others "
      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the last "
      f"checkpoint in {out}/checkpoints is intact: start every process again with --resume",
      file=sys.stderr,
      flush=True,
    )
    sys.stdout.flush()
    # now, without jax.distributed's shutdown barrier: with a process gone it can only fail,
    # and JAX's coordination client would then abort this process with a long trace
    os._exit(1)
  if args.process_id == 0:
    print(train.format_results(results))
    print(f"  run directory: {out} (results.json, metrics.jsonl, checkpoints/)")
  return 0


def _interrupted(command: str, e, resume: str) -> int:
  """A run stopped by SIGINT or SIGTERM after a checkpoint (:class:`amaml.signals.Interrupted`
  ``e``): one line with the command that resumes it, and the signal's exit code."""
  print(f"amaml {command}: {e}; resume with: {resume}", file=sys.stderr, flush=True)
  return e.exit_code


def resume_command(argv: list[str], out: str) -> str:
  """The ``amaml`` command line ``argv`` with ``--resume`` (and ``--out``) added."""
  argv = list(argv)
  if not any(a == "--out" or a.startswith("--out=") for a in argv):
    argv += ["--out", out]
  if "--resume" not in argv:
    argv.append("--resume")
  return "amaml " + shlex.join(argv)


def _lost_a_process(e: BaseException | None) -> bool:
  """Whether ``e``, or an error behind it, is a failed collective or coordination call:
  another process died or stopped answering."""
  import jax

  while e is not None:
    if isinstance(e, jax.errors.JaxRuntimeError) or any(
      word in str(e) for word in ("Gloo", "coordination service", "Barrier failed")
    ):
      return True
    e = e.__cause__ or e.__context__
  return False


def _join_processes(args) -> None:
  """``jax.distributed.initialize`` from the flags of ``amaml train`` (before any JAX call)."""
  from amaml import sharding

  if not args.coordinator_address:
    raise ValueError(
      f"--num_processes {args.num_processes} needs --coordinator_address "
      "HOST:PORT (where process 0 listens), the same in every process"
    )
  sharding.initialize(
    args.coordinator_address,
    args.num_processes,
    args.process_id,
    heartbeat_timeout_seconds=args.heartbeat_timeout,
  )


def _evaluate(args) -> int:
  from amaml.evaluation import evaluate, meta_test
  from amaml.results import format_results, load_run

  import numpy as np

  from amaml import best, seeds

  def one(exp, state) -> dict:
    if args.eval_inner_steps is None and args.split == "test":  # the run's own test protocol
      return meta_test(exp, state.params, state.alpha, args.eval_tasks, progress=True)
    steps = args.eval_inner_steps
    test = evaluate(
      exp, state.params, state.alpha, args.split, args.eval_tasks, steps, progress=True
    )
    return {"test": test}

  rows = []
  for run in args.run:
    exp, state = load_run(run, args.step)
    if exp.config.keep_best and args.step is None:  # which checkpoint: one line
      print(_kept_line(run, best.kept_step(run), state.step, exp.config.seed))
    if exp.config.seeds > 1:  # each seed, then the mean and spread over seeds
      each = seeds.per_seed(lambda e, s: {"seed": e.config.seed, **one(e, s)}, exp, state)
      results = seeds.combine(each)
    else:
      results = one(exp, state)
    steps_done = int(np.max(state.step))  # (with seeds, each seed's)
    results = {"config": dataclasses.asdict(exp.config), "steps": steps_done, **results}
    print(f"{run}: " + format_results(results))
    print(json.dumps(results["test"]))
    rows.append((run, results))
  if len(rows) > 1:
    print(comparison_table(rows))
  return 0


def _kept_line(run: str, kept: int | None, steps, seed: int = 0) -> str:
  """What ``amaml evaluate`` says of a run trained with ``--keep_best``: which step it tests.
  ``steps``: the step of the state loaded; with ``--seeds``, each seed's (the first is
  ``seed``), each at its own best (:mod:`amaml.best`)."""
  import numpy as np

  steps = [int(s) for s in np.ravel(steps)]
  if kept is None:
    newest = max(steps)
    return (
      f"{run}: no best checkpoint in {run}/best: evaluating the newest checkpoint, step {newest}"
    )
  which = f"step {steps[0]}"
  if len(steps) > 1:
    which = "each seed's own: " + ", ".join(
      f"seed {seed + k} step {s}" for k, s in enumerate(steps)
    )
  return f"{run}: evaluating the best checkpoint on validation, {which} (--step N for another)"


def comparison_table(rows) -> str:
  """A markdown table of evaluated runs: ``rows`` is ``[(run directory, results)]``."""
  lines = [
    "| run | method | alpha0 | meta steps | test protocol | accuracy (95% CI) | query loss |",
    "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  for run, r in rows:
    t, cfg = r["test"], r["config"]
    how = f"{t.get('inner_steps', 'chosen per seed')} steps" + (
      f" at {t['alpha_scale']:g} x alpha" if t.get("alpha_scale", 1.0) != 1.0 else ""
    )
    acc = (
      f"{100 * t['accuracy']:.2f}% +- {100 * t['accuracy_ci95']:.2f}%" if "accuracy" in t else ""
    )
    lines.append(
      f"| {run} | {cfg['method']} | {cfg['alpha']:g} | {r['steps']} | {how} | {acc} "
      f"| {t['loss']:.4g} +- {t['loss_ci95']:.2g} |"
    )
  return "\n".join(lines)


def _download(args) -> int:
  from amaml.data import omniglot_zips

  kw = {} if args.url is None else {"url": args.url}
  out = omniglot_zips.download_omniglot(args.data_dir, progress=not args.no_progress, **kw)
  print(
    f"Omniglot arrays in {out} (amaml finds them there"
    + ("" if args.data_dir is None else "; pass the same --data_dir or set $AMAML_OMNIGLOT_DIR")
    + ")"
  )
  return 0


def _plot(args) -> int:
  from amaml.plot import plot_runs, runs_table

  for path in plot_runs(args.run, args.plot_dir):
    print(path)
  if len(args.run) > 1:
    print(runs_table(args.run))
  return 0


def _reproduce(args) -> int:
  from amaml import reproduce, signals

  overrides = {"data_dir": args.data_dir} if args.data_dir else {}
  if args.eval_tasks is not None:
    if args.eval_tasks < 1:
      raise ValueError(f"--eval_tasks {args.eval_tasks}: use 1 or more")
    n = args.eval_tasks
    overrides.update(eval_tasks=n, val_tasks=min(n, 100), eval_batch=min(n, 50))
  try:
    _, text = reproduce.reproduce_omniglot(
      args.out,
      args.settings,
      args.methods,
      args.seeds,
      args.budget,
      progress=not args.no_progress,
      **overrides,
    )
  except signals.Interrupted as e:
    return _interrupted("reproduce", e, f"amaml {shlex.join(args.argv)}")
  print(text)
  print(f"  in {args.out}: reproduce.md, reproduce.jsonl, one directory per run")
  return 0


_COMMANDS = {
  "train": _train,
  "evaluate": _evaluate,
  "plot": _plot,
  "download": _download,
  "reproduce": _reproduce,
}


if __name__ == "__main__":
  sys.exit(main())
