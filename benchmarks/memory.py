"""Peak memory of the second-order meta step against the number of inner steps, for three
forms of the inner loop: unrolled (the default), rolled (``lax.scan``, ``--unroll false``) and
rolled with rematerialisation (``remat=True``: ``jax.checkpoint`` per step); and of iMAML's
step (``--method imaml``, variant ``imaml``), whose inner loop is not differentiated through,
so that its memory should not grow with the inner steps.

    python benchmarks/memory.py                         # omniglot-20w1s, 1/5/10/20 steps
    python benchmarks/memory.py --inner-steps 1 5 --config omniglot-5w1s
    python benchmarks/memory.py --config sinusoid --variants unrolled imaml

Each (inner steps, variant) point runs in a fresh process (so peak RSS is its own): build the
config, compile one meta step, run it ``--steps`` times. Reported: XLA's buffer
assignment for the compiled step (``memory_analysis()``: temporaries, i.e. the step's
working memory, plus arguments and outputs), the process's peak resident memory, the
compile time and the median step time. Users choose with ``--unroll false`` / ``--remat true``
(``amaml train``) or ``alpha_maml(..., unroll=1, remat=True)``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# config overrides of each variant: the first three are the config's own method (Alpha MAML's
# second-order step, MAML's memory), the last iMAML (imaml_lambda and cg_steps: the config's)
VARIANTS = {
  "unrolled": dict(unroll=True, remat=False),
  "scan": dict(unroll=False, remat=False),
  "remat": dict(unroll=False, remat=True),
  "imaml": dict(method="imaml"),
}


def worker(config: str, inner_steps: int, variant: str, steps: int) -> dict:
  import jax

  from amaml import train
  from amaml.configs import get_config
  from amaml.env import versions

  cfg = get_config(config, inner_steps=inner_steps, **VARIANTS[variant])
  exp = train.build(cfg)
  state = exp.learner.init(exp.params)
  batches = [exp.sample(jax.random.key(i), exp.data["train"], cfg.meta_batch) for i in range(2)]
  rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  t0 = time.perf_counter()
  compiled = jax.jit(exp.learner.update).lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  times = []
  for i in range(steps):
    t = time.perf_counter()
    state, m = compiled(state, batches[i % 2])
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - t)
  mb = lambda b: b / 2**20
  return {
    "config": config,
    "inner_steps": inner_steps,
    "variant": variant,
    **VARIANTS[variant],
    "method": cfg.method,
    "meta_batch": cfg.meta_batch,
    "ways": cfg.ways,
    "queries": cfg.queries,
    "xla_temp_mb": mb(mem.temp_size_in_bytes),
    "xla_argument_mb": mb(mem.argument_size_in_bytes),
    "xla_output_mb": mb(mem.output_size_in_bytes),
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "rss_before_compile_mb": rss_before,
    "compile_s": compile_s,
    "median_step_s": statistics.median(times),
    "loss": float(m["loss"]),
    "versions": versions(),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--config", default="omniglot-20w1s")
  ap.add_argument("--inner-steps", type=int, nargs="+", default=[1, 5, 10, 20])
  ap.add_argument("--steps", type=int, default=2, help="timed meta steps per point")
  ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.jsonl"))
  ap.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
  ap.add_argument(
    "--worker", nargs=3, metavar=("INNER_STEPS", "VARIANT", "STEPS"), help=argparse.SUPPRESS
  )
  args = ap.parse_args(argv)
  if args.worker:
    n, variant, steps = args.worker
    print(json.dumps(worker(args.config, int(n), variant, int(steps))))
    return
  rows = []
  for n in args.inner_steps:
    for variant in args.variants:
      cmd = [
        sys.executable,
        __file__,
        "--config",
        args.config,
        "--worker",
        str(n),
        variant,
        str(args.steps),
      ]
      res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
      if res.returncode != 0:  # -9: killed, on this machine by the out-of-memory killer
        print(res.stderr[-2000:], file=sys.stderr)
        row = {
          "config": args.config,
          "inner_steps": n,
          "variant": variant,
          "failed": True,
          "returncode": res.returncode,
        }
      else:
        row = json.loads(res.stdout.strip().splitlines()[-1])
      print(json.dumps(row), flush=True)
      rows.append(row)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
  ok = [r for r in rows if not r.get("failed")]
  if ok:
    print(
      f"\n{args.config} (meta-batch {ok[0]['meta_batch']}, {ok[0]['ways']}-way, "
      f"{ok[0]['queries']} queries per class), {time.strftime('%Y-%m-%d')}\n"
    )
  names = " / ".join(args.variants)
  print(
    f"| inner steps | XLA temp MB ({names}) | peak RSS MB ({names}) | s/step ({names}) | "
    f"compile s ({names}) |"
  )
  print("| --- | --- | --- | --- | --- |")

  def cell(r, key, fmt):
    return f"killed (rc {r['returncode']})" if r.get("failed") else format(r[key], fmt)

  for n in args.inner_steps:
    rs = [
      [r for r in rows if r["inner_steps"] == n and r["variant"] == v][0] for v in args.variants
    ]
    print(
      f"| {n} | "
      + " | ".join(
        " / ".join(cell(r, k, f) for r in rs)
        for k, f in [
          ("xla_temp_mb", ".0f"),
          ("peak_rss_mb", ".0f"),
          ("median_step_s", ".2f"),
          ("compile_s", ".1f"),
        ]
      )
      + " |"
    )


if __name__ == "__main__":
  main()
