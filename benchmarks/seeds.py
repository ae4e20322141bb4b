"""Wall time per meta step against the number of seeds trained as one program (``--seeds N``).

    python benchmarks/seeds.py                                   # sinusoid and omniglot-5w1s
    python benchmarks/seeds.py --configs omniglot-5w1s --seeds 1 2 4 8 --rounds 3

Each measurement is ``amaml.train.train`` of a config with ``seeds=N`` for ``--lines`` log
lines of ``--log_every`` steps after one warm-up line (its compile), no validation, no
checkpoint and no final evaluation. Its time per step is the median over the log lines
after the first of ``1 / steps_per_s`` (``metrics.jsonl``). The values of N run interleaved,
round after round, in one process, so that load from other users of the machine hits all
alike. Output: one JSON line per measurement, then a table per config of the median over
rounds, the ratio to one seed, and that ratio over N (the cost of a seed against a run of
its own). With ``--peak-gflops`` each row also gives the GFLOP/s achieved and its fraction of that
peak: N times XLA's flop count of one seed's meta step (the jitted ``learner.update``, counted
on its lowered program, before the backend's optimisations).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

import jax

from amaml.configs import get_config
from amaml.env import versions
from amaml.experiment import build
from amaml.train import step_batch, train


def seconds_per_step(config: str, seeds: int, lines: int, log_every: int) -> float:
  """Median seconds per meta step of ``config`` with ``seeds`` seeds (see the module doc)."""
  cfg = get_config(config)
  cfg = dataclasses.replace(
    cfg,
    seeds=seeds,
    iterations=(lines + 1) * log_every,
    log_every=log_every,
    val_every=0,
    checkpoint_every=0,
    max_minutes=0.0,
  )
  with tempfile.TemporaryDirectory() as out:
    train(cfg, out, progress=False, evaluate_at_end=False)
    rows = [json.loads(s) for s in (Path(out) / "metrics.jsonl").read_text().splitlines()]
  return statistics.median(1.0 / r["steps_per_s"] for r in rows[1:])


def step_flops(config: str) -> float:
  """XLA's flop count of one seed's meta step of ``config`` (see the module doc)."""
  exp = build(dataclasses.replace(get_config(config), seeds=1))
  batch = step_batch(exp, (exp.data or {}).get("train"), 0)
  cost = jax.jit(exp.learner.update).lower(exp.learner.init(exp.params), batch).cost_analysis()
  return float(cost.get("flops", float("nan")))


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--configs", nargs="+", default=["sinusoid", "omniglot-5w1s"])
  ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 4])
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--lines", type=int, default=3, help="timed log lines after the warm-up")
  ap.add_argument("--log_every", type=int, default=0, help="default: 100 sinusoid, 5 images")
  ap.add_argument(
    "--peak-gflops", type=float, default=0.0, help="the device's fp32 peak, for its fraction"
  )
  args = ap.parse_args(argv)
  print(json.dumps({"versions": versions(), "argv": sys.argv[1:]}), flush=True)
  for config in args.configs:
    every = args.log_every or (100 if config == "sinusoid" else 5)
    flops = step_flops(config) if args.peak_gflops else float("nan")
    times = {n: [] for n in args.seeds}
    for r in range(args.rounds):
      for n in args.seeds:
        s = seconds_per_step(config, n, args.lines, every)
        times[n].append(s)
        row = {"config": config, "seeds": n, "round": r, "s_per_step": s}
        print(json.dumps(row | {"step_flops_per_seed": flops}), flush=True)
    one = statistics.median(times[args.seeds[0]])
    peak = " GFLOP/s | of peak |" if args.peak_gflops else ""
    print(
      f"\n{config}: | seeds | s / step (median of {args.rounds}) | x one seed | per seed |{peak}"
    )
    for n in args.seeds:
      t = statistics.median(times[n])
      gflops = n * flops / t / 1e9
      peak = f" {gflops:.0f} | {gflops / args.peak_gflops:.1%} |" if args.peak_gflops else ""
      print(f"| {n} | {t:.4g} | {t / one:.2f} | {t / one / n:.2f} |{peak}")


if __name__ == "__main__":
  main()
