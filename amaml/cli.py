"""Command line: ``amaml train``, ``amaml evaluate``, ``amaml plot``, ``amaml download``,
``amaml reproduce`` (or ``python -m amaml``).

    amaml train --config sinusoid --out runs/sinusoid
    amaml train --config omniglot-5w1s --method maml --iterations 2000 --out runs/o5
    amaml train --config omniglot-5w1s --out runs/o5 --resume
    amaml evaluate --run runs/o5 --tasks 600 --inner_steps 10
    amaml evaluate --run runs/o5 runs/o5-maml        # several runs: a comparison table
    amaml plot --run runs/o5
    amaml download omniglot                          # the official zips -> arrays folder
    amaml reproduce omniglot --budget 0.001 --settings 5w1s   # the published table, scaled

Every field of :class:`amaml.configs.Config` is a flag (``--alpha 0.1``,
``--rate_rule normalized``, ...); ``amaml train --help`` lists them.

Exit codes: 0 done; 2 a user error (one line: the problem and the fix); 3 training stopped
by the non-finite guard; 130 / 143 training stopped by SIGINT / SIGTERM after a checkpoint
(one line with the command that resumes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys

from amaml.configs import CONFIGS, Config, get_config


def _bool(text: str) -> bool:
  if text.lower() in ("1", "true", "yes"):
    return True
  if text.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="amaml", description="Alpha MAML in JAX")
  sub = ap.add_subparsers(dest="command", required=True)
  tr = sub.add_parser("train", help="meta-train, then evaluate on the meta-test split")
  tr.add_argument(
    "--config",
    default="sinusoid",
    choices=sorted(CONFIGS),
    help="the named configuration to start from (amaml.configs.CONFIGS) [default: sinusoid]",
  )
  tr.add_argument("--out", default=None, help="run directory (default runs/<config>-<method>)")
  tr.add_argument("--resume", action="store_true", help="continue the run in --out")
  tr.add_argument("--no_progress", action="store_true", help="no progress bar")
  mp = tr.add_argument_group(
    "several processes",
    "run the same command in every process (one per host, or several "
    "on one machine), each with its --process_id; the meta-batch is split over the devices of "
    "all of them and process 0 writes the run directory, which every process must see",
  )
  mp.add_argument(
    "--num_processes", type=int, default=1, metavar="N", help="processes in all [default: 1]"
  )
  mp.add_argument(
    "--process_id",
    type=int,
    default=0,
    metavar="I",
    help="this process: 0 .. num_processes-1 [default: 0]",
  )
  mp.add_argument(
    "--coordinator_address",
    default=None,
    metavar="HOST:PORT",
    help="where process 0 listens, the same in every process (e.g. host0:1234)",
  )
  mp.add_argument(
    "--heartbeat_timeout",
    type=int,
    default=100,
    metavar="SECONDS",
    help="a process silent this long stops the others [default: 100]",
  )
  group = tr.add_argument_group(
    "configuration fields",
    "each flag overrides one field of the named --config; a field "
    "the config does not set has the default shown",
  )
  for f in dataclasses.fields(Config):
    name = (f.type if isinstance(f.type, str) else f.type.__name__).removesuffix(" | None")
    typ = {"int": int, "float": float, "str": str, "bool": _bool}[name]
    choices = f.metadata.get("choices")
    shown = (
      "none"
      if f.default is None
      else ("true" if f.default is True else "false" if f.default is False else f.default)
    )
    group.add_argument(
      f"--{f.name}",
      type=typ,
      default=None,
      choices=choices,
      metavar=name.upper() if choices is None else None,
      help=f"{f.metadata.get('help', '')} [default: {shown!s}]",
    )
  ev = sub.add_parser("evaluate", help="evaluate a run's checkpoint on meta-test tasks")
  ev.add_argument(
    "--run",
    required=True,
    nargs="+",
    help="run directories written by amaml train (several: a comparison table)",
  )
  ev.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ev.add_argument("--split", default="test", choices=["train", "val", "test"])
  ev.add_argument("--tasks", type=int, default=None, help="number of tasks (default: eval_tasks)")
  ev.add_argument(
    "--inner_steps",
    type=int,
    default=None,
    help="test-time inner steps at the trained alpha (default: the run's "
    "test_adaptation, chosen on validation tasks unless it is 'fixed')",
  )
  pl = sub.add_parser("plot", help="PNG learning curves and alpha/beta trajectories of runs")
  pl.add_argument("--run", required=True, nargs="+", help="run directories")
  pl.add_argument("--out", default=None, help="output folder (default: the first run)")
  dl = sub.add_parser(
    "download",
    help="fetch a data set (the official zips, SHA-256 checked) and write the folder amaml reads",
  )
  dl.add_argument("dataset", choices=["omniglot"])
  dl.add_argument(
    "--out",
    default=None,
    help="arrays folder to write (default ~/.cache/amaml/omniglot, where amaml train looks for it)",
  )
  dl.add_argument(
    "--url",
    default=None,
    help="where the zips are (default: the data set's GitHub repository; file:// URLs work too)",
  )
  dl.add_argument("--no_progress", action="store_true", help="no progress bar")
  _reproduce_parser(sub)
  return ap


def _reproduce_parser(sub) -> None:
  """``amaml reproduce``'s flags (:mod:`amaml.reproduce`)."""
  from amaml import reproduce

  rp = sub.add_parser(
    "reproduce",
    help="reproduce a published table: amaml's default, MAML and MAML++ at the papers' "
    "schedules against the published accuracies",
    description="Trains and evaluates amaml's default (alpha-maml), MAML and MAML++ on "
    "every setting at its paper's schedule, one run after another (seeds too: no vmapped "
    "multi-seed run yet), and writes the table against the published numbers to stdout, "
    "OUT/reproduce.md and OUT/reproduce.jsonl. Running it again skips finished runs and "
    "resumes the others. The full schedules take days on a CPU: they are meant for a GPU.",
  )
  rp.add_argument("benchmark", choices=["omniglot"], help="the published table")
  for flag, choices in (("settings", reproduce.SETTINGS), ("methods", reproduce.METHODS)):
    rp.add_argument(
      f"--{flag}",
      nargs="+",
      default=list(choices),
      metavar=flag[:-1].upper(),
      help=f"a subset of {' '.join(choices)} [default: all]",
    )
  rp.add_argument(
    "--seeds",
    type=int,
    default=1,
    metavar="N",
    help="seeds 0..N-1 per setting and method, run one after another (no vmapped "
    "multi-seed run yet) [default: 1]",
  )
  rp.add_argument(
    "--budget",
    type=float,
    default=1.0,
    metavar="F",
    help="scale every schedule (meta steps, MAML++'s annealing) by F in (0, 1], e.g. 0.001 "
    "for a CPU smoke run [default: 1, the papers' schedules: days on a CPU, meant for a GPU]",
  )
  rp.add_argument(
    "--out",
    default="runs/reproduce-omniglot",
    help="run directory, one subdirectory per run (<setting>/<method>/seed<k>); a re-run "
    "skips finished runs and resumes the others [default: runs/reproduce-omniglot]",
  )
  rp.add_argument(
    "--data_dir",
    default=None,
    help=next(f for f in dataclasses.fields(Config) if f.name == "data_dir").metadata["help"],
  )
  rp.add_argument(
    "--eval_tasks",
    type=int,
    default=None,
    metavar="N",
    help="meta-test tasks per run, and at most N validation tasks for the test-time choice "
    "(evaluation is not scaled by --budget) [default: each config's, 600 and 100]",
  )
  rp.add_argument("--no_progress", action="store_true", help="no progress bar")


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
  args = _parser().parse_args(argv)
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
    print(
      f"amaml train: {e}; resume with: {resume_command(args.argv, out)}",
      file=sys.stderr,
      flush=True,
    )
    return e.exit_code
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

  rows = []
  for run in args.run:
    exp, state = load_run(run, args.step)
    if args.inner_steps is None and args.split == "test":  # the run's own test protocol
      results = meta_test(exp, state.params, state.alpha, args.tasks, progress=True)
    else:
      results = {
        "test": evaluate(
          exp, state.params, state.alpha, args.split, args.tasks, args.inner_steps, progress=True
        )
      }
    results = {"config": dataclasses.asdict(exp.config), "steps": int(state.step), **results}
    print(f"{run}: " + format_results(results))
    print(json.dumps(results["test"]))
    rows.append((run, results))
  if len(rows) > 1:
    print(comparison_table(rows))
  return 0


def comparison_table(rows) -> str:
  """A markdown table of evaluated runs: ``rows`` is ``[(run directory, results)]``."""
  lines = [
    "| run | method | alpha0 | meta steps | test protocol | accuracy (95% CI) | query loss |",
    "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  for run, r in rows:
    t, cfg = r["test"], r["config"]
    how = f"{t['inner_steps']} steps" + (
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
  out = omniglot_zips.download_omniglot(args.out, progress=not args.no_progress, **kw)
  print(
    f"Omniglot arrays in {out} (amaml finds them there"
    + ("" if args.out is None else "; pass --data_dir or set $AMAML_OMNIGLOT_DIR")
    + ")"
  )
  return 0


def _plot(args) -> int:
  from amaml.plot import plot_runs, runs_table

  for path in plot_runs(args.run, args.out):
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
    print(
      f"amaml reproduce: {e}; resume with the same command: amaml {shlex.join(args.argv)}",
      file=sys.stderr,
      flush=True,
    )
    return e.exit_code
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
