"""Command line: ``amaml train``, ``amaml evaluate``, ``amaml plot`` (or ``python -m amaml``).

    amaml train --config sinusoid --out runs/sinusoid
    amaml train --config omniglot-5w1s --method maml --iterations 2000 --out runs/o5
    amaml train --config omniglot-5w1s --out runs/o5 --resume
    amaml evaluate --run runs/o5 --tasks 600 --inner_steps 10
    amaml plot --run runs/o5

Every field of :class:`amaml.configs.Config` is a flag (``--alpha 0.1``,
``--rate_rule normalized``, ...); ``amaml train --help`` lists them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

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
  tr.add_argument("--config", default="sinusoid", choices=sorted(CONFIGS))
  tr.add_argument("--out", default=None, help="run directory (default runs/<config>-<method>)")
  tr.add_argument("--resume", action="store_true", help="continue the run in --out")
  tr.add_argument("--no_progress", action="store_true", help="no progress bar")
  group = tr.add_argument_group("configuration fields (override the named config)")
  for f in dataclasses.fields(Config):
    name = (f.type if isinstance(f.type, str) else f.type.__name__).removesuffix(" | None")
    typ = {"int": int, "float": float, "str": str, "bool": _bool}[name]
    group.add_argument(f"--{f.name}", type=typ, default=None, metavar=name.upper())
  ev = sub.add_parser("evaluate", help="evaluate a run's checkpoint on meta-test tasks")
  ev.add_argument("--run", required=True, help="run directory written by amaml train")
  ev.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ev.add_argument("--split", default="test", choices=["train", "val", "test"])
  ev.add_argument("--tasks", type=int, default=None, help="number of tasks (default: eval_tasks)")
  ev.add_argument("--inner_steps", type=int, default=None,
                  help="test-time inner steps at the trained alpha (default: the run's "
                       "test_adaptation, chosen on validation tasks unless it is 'fixed')")
  pl = sub.add_parser("plot", help="PNG learning curves and alpha/beta trajectories of runs")
  pl.add_argument("--run", required=True, nargs="+", help="run directories")
  pl.add_argument("--out", default=None, help="output folder (default: the first run)")
  return ap


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if args.command == "train":
    from amaml import train

    fields = {f.name for f in dataclasses.fields(Config)}
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    try:
      cfg = get_config(args.config, **overrides)
    except ValueError as e:
      print(f"amaml train: {e}", file=sys.stderr)
      return 2
    out = args.out or f"runs/{args.config}-{cfg.method}"
    _, results = train.train(cfg, out, resume=args.resume, progress=not args.no_progress)
    print(train.format_results(results))
    print(f"  run directory: {out} (results.json, metrics.jsonl, checkpoints/)")
    return 0
  if args.command == "evaluate":
    from amaml import train

    exp, state = train.load_run(args.run, args.step)
    if args.inner_steps is None and args.split == "test":  # the run's own test protocol
      results = train.meta_test(exp, state.params, state.alpha, args.tasks, progress=True)
    else:
      results = {"test": train.evaluate(exp, state.params, state.alpha, args.split, args.tasks,
                                        args.inner_steps, progress=True)}
    print(train.format_results({"config": dataclasses.asdict(exp.config), "steps": int(state.step),
                                **results}))
    print(json.dumps(results["test"]))
    return 0
  if args.command == "plot":
    from amaml.plot import plot_runs

    for path in plot_runs(args.run, args.out):
      print(path)
    return 0
  return 2


if __name__ == "__main__":
  sys.exit(main())
