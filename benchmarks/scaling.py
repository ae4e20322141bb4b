"""Meta-training throughput (tasks/s) against the number of devices (amaml.sharding).

    python benchmarks/scaling.py                      # 1, 2, 4 forced CPU devices
    python benchmarks/scaling.py --devices 1 2 --repeats 5 --json scaling.json

Each device count runs in its own process (``XLA_FLAGS=--xla_force_host_platform_device_count=N``
must be set before JAX starts) and times the training chunk of ``amaml train``: ``--length`` meta
steps under ``lax.scan`` with on-device task sampling, the task batch split over a ``"tasks"``
mesh (``devices=1``: the plain single-device chunk, no mesh). Compilation is excluded (one warm-up
chunk); the figure is the median over ``--repeats`` chunks.

Tasks: the sinusoid configuration (MLP 1-40-40-1, 10+10 points, ``meta_batch`` 32), and, when
``amaml.models.Conv4`` exists and Omniglot is found, a small Omniglot one (5-way 1-shot, 32
channels, ``meta_batch`` 8).

On CPU, forced devices are not extra hardware: they split the same cores (this machine's,
``os.cpu_count()``), so the table measures the overhead of partitioning and the all-reduce, and
how XLA:CPU's thread pool is shared, not a real speed-up. On several GPUs or TPU cores the same
code spreads the tasks over real devices.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TASKS = {
  "sinusoid": dict(config="sinusoid", overrides=dict(meta_batch=32)),
  "omniglot-5w1s": dict(
    config="omniglot-5w1s", overrides=dict(meta_batch=8, hidden=32, val_every=0)
  ),
}


def worker(task: str, devices: int, length: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp

  from amaml import sharding, train
  from amaml.configs import get_config

  spec = TASKS[task]
  if task != "sinusoid":
    import amaml.models

    if not hasattr(amaml.models, "Conv4"):
      return {"task": task, "devices": devices, "skipped": "amaml.models.Conv4 does not exist yet"}
  cfg = get_config(spec["config"], log_every=length, devices=devices, **spec["overrides"])
  try:
    exp = train.build(cfg)
  except (FileNotFoundError, ImportError) as e:
    return {"task": task, "devices": devices, "skipped": f"{type(e).__name__}: {e}"}
  mesh = sharding.task_mesh(devices) if devices != 1 else None
  state, images = exp.learner.init(exp.params), exp.data["train"]
  if mesh is not None:
    sharding.check_divisible(cfg.meta_batch, mesh)
    state, images = sharding.replicate((state, images), mesh)
  chunk = train.make_train_chunk(exp, length, mesh)
  t0 = time.perf_counter()
  state, ms = chunk(state, images, jnp.int32(0), jnp.int32(length))
  jax.block_until_ready(ms)
  compile_s = time.perf_counter() - t0
  times = []
  for r in range(repeats):
    t0 = time.perf_counter()
    state, ms = chunk(state, images, jnp.int32((r + 1) * length), jnp.int32(length))
    jax.block_until_ready(ms)
    times.append(time.perf_counter() - t0)
  dt = statistics.median(times)
  return {
    "task": task,
    "devices": devices,
    "meta_batch": cfg.meta_batch,
    "length": length,
    "tasks_per_s": cfg.meta_batch * length / dt,
    "step_ms": 1e3 * dt / length,
    "first_chunk_s": compile_s,
    "compiles": chunk._cache_size(),
    "backend": jax.default_backend(),
    "device_count": len(jax.devices()),
    "cores": os.cpu_count(),
  }


def run(task: str, devices: int, length: int, repeats: int) -> dict:
  env = {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
  }
  proc = subprocess.run(
    [
      sys.executable,
      __file__,
      "--worker",
      task,
      "--devices",
      str(devices),
      "--length",
      str(length),
      "--repeats",
      str(repeats),
    ],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  if proc.returncode:
    return {"task": task, "devices": devices, "skipped": proc.stderr.strip().splitlines()[-1]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
  lines = [
    "| task | devices | tasks/s | speed-up | ms / meta step | first chunk (compile) s |",
    "| --- | ---: | ---: | ---: | ---: | ---: |",
  ]
  base = {}
  for r in rows:
    if "skipped" in r:
      lines.append(f"| {r['task']} | {r['devices']} | skipped: {r['skipped']} | | | |")
      continue
    base.setdefault(r["task"], r["tasks_per_s"])
    lines.append(
      f"| {r['task']} | {r['devices']} | {r['tasks_per_s']:.0f} | "
      f"{r['tasks_per_s'] / base[r['task']]:.2f}x | {r['step_ms']:.2f} | "
      f"{r['first_chunk_s']:.1f} |"
    )
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
  ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
  ap.add_argument("--length", type=int, default=50, help="meta steps per timed chunk")
  ap.add_argument("--repeats", type=int, default=5, help="timed chunks (median)")
  ap.add_argument("--json", default=None, help="also write the rows here")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    print(json.dumps(worker(args.worker, args.devices[0], args.length, args.repeats)))
    return
  rows = [run(task, n, args.length, args.repeats) for task in args.tasks for n in args.devices]
  print(table(rows))
  print(
    f"\nForced CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N) share this "
    f"machine's {os.cpu_count()} cores: the speed-up is not that of N real devices. "
    f"Median of {args.repeats} chunks of {args.length} meta steps, compile excluded."
  )
  if args.json:
    Path(args.json).write_text("\n".join(json.dumps(r) for r in rows) + "\n")


if __name__ == "__main__":
  main()
