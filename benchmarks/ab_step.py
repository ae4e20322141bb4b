"""One commit's Conv4 meta step against another's, timed in fresh processes, interleaved.

    python benchmarks/ab_step.py --other /path/to/checkout --config omniglot-5w1s --rounds 3

Each round runs ``throughput.py``'s worker (``amaml-maml``, or ``amaml-alpha`` with
``--impl alpha``: the step on the peers' episodes and weights) once from this checkout and
once from ``--other``'s own ``benchmarks/throughput.py`` (which imports its own amaml), on a
pool of 4 meta-batches, ``--steps`` timed steps after one warm-up, with the environment as
it is (no allocator tuning), and prints each process's median and last meta-loss. Pairs
measured in the same minute are what compare on a noisy machine.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import throughput  # noqa: E402


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--other", required=True, help="another checkout of amaml (its root)")
  ap.add_argument("--config", default="omniglot-5w1s", choices=["omniglot-5w1s", "omniglot-20w1s"])
  ap.add_argument("--impl", default="maml", choices=["maml", "alpha"])
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")
  args = ap.parse_args(argv)
  worker = ["--worker", f"amaml-{args.impl}", "--config", args.config, "--steps", str(args.steps)]
  worker += ["--warmup", "1", "--seed", "0", "--pool", "4"]
  for r in range(args.rounds):
    for name, root in (("this", ROOT), ("other", os.path.abspath(args.other))):
      cmd = [sys.executable, os.path.join(root, "benchmarks", "throughput.py"), *worker]
      rec = throughput._run(cmd, root, dict(os.environ), args.timeout)
      if "error" in rec:
        raise SystemExit(f"{name} ({root}): {rec['error']}\n{rec['stderr_tail']}")
      print(
        f"round {r} {name}: {rec['median_step_s']:.3f} s/step (p10 {rec['p10']:.2f}, "
        f"p90 {rec['p90']:.2f}), loss {rec['final_meta_loss']:.5f}",
        flush=True,
      )


if __name__ == "__main__":
  main()
