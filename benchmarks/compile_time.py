"""Compile time of the jitted meta step, MAML++ against MAML and amaml's default (issue #25).

    python benchmarks/compile_time.py                               # omniglot-20w1s, Conv4-64
    python benchmarks/compile_time.py --meta-batch 2 --hidden 16    # a few minutes on 2 cores
    python benchmarks/compile_time.py --methods maml++ maml++:so maml++:fo maml++:no-msl
    python benchmarks/compile_time.py --methods maml maml++ --unroll false   # rolled loops

Each method runs in a fresh process (no warm cache), one after another. It builds the
config's learner as ``amaml train --method M`` does, then times the first call of
``jax.jit(learner.update)`` in three parts: ``lower_s`` (trace and lower to StableHLO),
``compile_s`` (XLA) and ``first_run_s`` (the first execution), then ``second_run_s`` (a
second execution on the same batch), with the process's CPU time of the first two
(``lower_cpu_s``, ``compile_cpu_s``: steadier than wall time on a shared machine). Absolute
times depend on the backend (a GPU's compile is not a CPU's), so the size of the program is
reported too: the StableHLO text (``stablehlo_chars``, ``stablehlo_ops``: lines with an
``=``) and the optimised HLO (``hlo_instructions``), and XLA's flop count of the step. One
JSON line per method.

What is compiled is what ``amaml train`` compiles first: ``learner.update``, or for a learner
with phases (MAML++'s derivative-order annealing, ``amaml.meta.phase_at``) the update of the
phase that holds the state's step (``"program"`` says which).

Method names are those of ``amaml train --method``; a ``maml++:VARIANT`` is MAML++ with one
part changed, to find what its compile time is made of:

  maml++:so      second order from the first step (no derivative-order annealing)
  maml++:fo      first order throughout (no derivative-order annealing)
  maml++:no-msl  no multi-step loss (the query loss after the last step alone)
  maml++:so-no-msl  both of the above: second order, last step's loss
  maml++:step-N  the meta step of MAML++ at meta step N (its state's ``step`` set to N)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# what each variant passes to amaml.meta.maml_plus_plus over train.make_learner's arguments
VARIANTS = {
  "so": dict(first_order_steps=0),
  "fo": dict(first_order=True),
  "no-msl": dict(multi_step_loss=0),
  "so-no-msl": dict(first_order_steps=0, multi_step_loss=0),
}


def _learner(cfg, loss_fn, variant: str | None):
  """``train.make_learner``, with MAML++'s arguments overridden by ``variant``."""
  from amaml import meta, train

  if variant is None or variant.startswith("step-"):
    return train.make_learner(cfg, loss_fn)
  plus = meta.maml_plus_plus
  meta.maml_plus_plus = lambda loss, **kw: plus(loss, **{**kw, **VARIANTS[variant]})
  try:
    return train.make_learner(cfg, loss_fn)
  finally:
    meta.maml_plus_plus = plus


def _ops(text: str) -> int:
  return sum(1 for line in text.splitlines() if " = " in line)


def _update_at(learner, step: int):
  """What ``amaml train`` compiles at meta ``step``: the learner's phase there (see
  ``amaml.meta.phase_at``), or ``update`` where it has no phases."""
  from amaml import meta

  if not getattr(learner, "phases", ()):
    return learner.update, "update"
  phase = meta.phase_at(learner, step)
  return phase.update, f"phase from step {phase.start}"


def worker(config: str, name: str, overrides: dict) -> dict:
  import jax
  import jax.numpy as jnp

  from amaml import train
  from amaml.configs import get_config
  from amaml.env import versions

  method, _, variant = name.partition(":")
  cfg = get_config(config, method=method, **overrides)
  setup = train.TASKS[cfg.task](cfg, train.run_keys(cfg).init)
  learner = _learner(cfg, setup.loss_fn, variant or None)
  state = learner.init(setup.params)
  step = int(variant[5:]) if variant.startswith("step-") else 0
  state = state._replace(step=jnp.int32(step))
  update, program = _update_at(learner, step)
  batch = setup.sample(jax.random.key(0), setup.data["train"], cfg.meta_batch)
  jax.block_until_ready((state, batch))
  t0, c0 = time.perf_counter(), time.process_time()
  lowered = jax.jit(update).lower(state, batch)
  t1, c1 = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  t2, c2 = time.perf_counter(), time.process_time()
  out = jax.block_until_ready(compiled(state, batch))
  t3 = time.perf_counter()
  jax.block_until_ready(compiled(state, batch))
  t4 = time.perf_counter()
  stablehlo = lowered.as_text()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {
    "config": config,
    "method": name,
    "meta_batch": cfg.meta_batch,
    "hidden": cfg.hidden,
    "inner_steps": cfg.inner_steps,
    "conv_impl": cfg.conv_impl,
    "unroll": cfg.unroll,
    "program": program,
    "lower_s": round(t1 - t0, 3),
    "compile_s": round(t2 - t1, 3),
    "lower_cpu_s": round(c1 - c0, 3),
    "compile_cpu_s": round(c2 - c1, 3),
    "first_run_s": round(t3 - t2, 3),
    "first_call_s": round(t3 - t0, 3),
    "second_run_s": round(t4 - t3, 3),
    "stablehlo_chars": len(stablehlo),
    "stablehlo_ops": _ops(stablehlo),
    "hlo_instructions": _ops(compiled.as_text()),
    "gflop": round((cost or {}).get("flops", float("nan")) / 1e9, 3),
    "loss": float(out[1]["loss"]),
    "versions": versions(),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--config", default="omniglot-20w1s")
  ap.add_argument("--methods", nargs="+", default=["maml", "alpha-maml", "maml++"])
  ap.add_argument("--meta-batch", type=int, help="tasks per meta step (default: the config's)")
  ap.add_argument("--hidden", type=int, help="Conv4 channels (default: the config's)")
  ap.add_argument("--conv-impl", help="Conv4's convolutions: auto (the default), matmul, xla")
  ap.add_argument(
    "--unroll", choices=("true", "false"), help="the inner loop unrolled (the default) or rolled"
  )
  ap.add_argument("--out", help="also write the JSON lines to this file")
  ap.add_argument("--worker", metavar="METHOD", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    fields = ("meta_batch", "hidden", "conv_impl", "unroll")
    overrides = {k: getattr(args, k) for k in fields if getattr(args, k)}
    if "unroll" in overrides:
      overrides["unroll"] = overrides["unroll"] == "true"
    print(json.dumps(worker(args.config, args.worker, overrides)))
    return
  rows = []
  for name in args.methods:
    cmd = [sys.executable, __file__, "--config", args.config, "--worker", name]
    for flag in ("--meta-batch", "--hidden", "--conv-impl", "--unroll"):
      value = getattr(args, flag[2:].replace("-", "_"))
      cmd += [flag, str(value)] if value else []
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if res.returncode != 0:
      print(res.stderr[-3000:], file=sys.stderr)
      row = {"config": args.config, "method": name, "failed": True, "rc": res.returncode}
    else:
      row = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    rows.append(row)
  if args.out:
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
  main()
