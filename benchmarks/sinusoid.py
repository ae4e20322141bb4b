"""Sinusoid regression: MAML vs Alpha MAML from a grid of initial inner rates, and the
speed of the jitted sinusoid meta step.

    python benchmarks/sinusoid.py                  # the tables in BENCHMARKS.md
    python benchmarks/sinusoid.py --iterations 2000 --seeds 1   # a quick look

Every cell of the grid (initial alpha x seed) of one method trains as ONE vmapped,
jitted computation: a batch of independent runs, each with its own parameters,
optimizer state, alpha and beta. Prints JSON lines and a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import amaml
from amaml import train
from amaml.configs import get_config
from amaml.env import versions
from amaml.meta import tree_mean


def grid(method: str, alphas, seeds: int, iterations: int, chunk: int = 1000):
  cfg = get_config("sinusoid", method=method, iterations=iterations)
  exp = train.build(cfg)
  states = []
  for a0 in alphas:
    for s in range(seeds):
      params = train.build(dataclasses.replace(cfg, seed=s)).params
      st = exp.learner.init(params)
      states.append(st._replace(alpha=jax.tree.map(lambda x: jnp.full_like(x, a0), st.alpha)))
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  cells = len(states)
  train_key = jax.random.key(1234)

  def run_chunk(state, start):
    def body(st, i):
      keys = jax.random.split(jax.random.fold_in(train_key, i), cells)
      batch = jax.vmap(lambda k: exp.sample(k, None, cfg.meta_batch))(keys)
      return jax.vmap(exp.learner.update)(st, batch)

    st, ms = jax.lax.scan(body, state, start + jnp.arange(chunk))
    return st, {k: ms[k][-1] for k in ("alpha", "beta", "loss")}

  run_chunk = jax.jit(run_chunk, donate_argnums=(0,))
  warm = jax.tree.map(jnp.copy, stacked)
  jax.block_until_ready(run_chunk(warm, jnp.int32(0)))  # compile outside the timing
  t0 = time.perf_counter()
  traj = []
  for start in range(0, iterations, chunk):
    stacked, last = run_chunk(stacked, jnp.int32(start))
    traj.append(jax.device_get(last))
  jax.block_until_ready(stacked)
  wall = time.perf_counter() - t0
  test = amaml.sinusoid_tasks(jax.random.key(777), 600)
  rows = []
  for c in range(cells):
    st = jax.tree.map(lambda x: x[c], stacked)
    r = {"method": method, "alpha0": float(alphas[c // seeds]), "seed": c % seeds}
    for steps in (1, 10):
      ev = exp.learner.evaluate(st.params, st.alpha, test, inner_steps=steps)
      m, ci = amaml.mean_confidence_interval(np.asarray(ev["loss"]))
      r[f"mse_{steps}step"], r[f"ci_{steps}step"] = m, ci
    r["final_alpha"] = float(tree_mean(st.alpha))  # the mean of its rates (one per tensor)
    r["final_beta"] = float(amaml.current_learning_rate(st.opt_state))
    r["alpha_traj"] = [float(t["alpha"][c]) for t in traj]
    rows.append(r)
  return rows, wall, cells


def loop_time(method: str, alpha0: float, iterations: int, chunk: int = 1000) -> float:
  """The same training, one run after another (for the vmapped grid's speedup)."""
  cfg = get_config(
    "sinusoid",
    method=method,
    iterations=iterations,
    alpha=alpha0,
    log_every=chunk,
    checkpoint_every=0,
    val_every=0,
  )
  exp = train.build(cfg)
  step = train.make_train_chunk(exp, chunk)
  st = exp.learner.init(exp.params)
  warm = exp.learner.init(jax.tree.map(jnp.copy, exp.params))  # (donated by the call)
  jax.block_until_ready(step(warm, None, jnp.int32(0), jnp.int32(chunk)))  # compile
  t0 = time.perf_counter()
  for start in range(0, iterations, chunk):
    st, ms = step(st, None, jnp.int32(start), jnp.int32(chunk))
  jax.block_until_ready(ms["loss"])
  return time.perf_counter() - t0


def step_speed(inner_steps: int, unroll, repeats: int = 200) -> dict:
  cfg = get_config("sinusoid", inner_steps=inner_steps)
  exp = train.build(cfg)
  learner = amaml.alpha_maml(
    amaml.losses.mse(lambda p, x: amaml.models.MLP().apply({"params": p}, x)),
    alpha=0.01,
    alpha_lr=cfg.alpha_lr,
    inner_steps=inner_steps,
    unroll=unroll,
  )
  state = learner.init(exp.params)
  batches = [amaml.sinusoid_tasks(jax.random.key(i), 25) for i in range(8)]
  t0 = time.perf_counter()
  compiled = jax.jit(learner.update).lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(repeats):
    t = time.perf_counter()
    state, m = compiled(state, batches[i % 8])
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - t)
  med = statistics.median(times[10:])
  return {
    "inner_steps": inner_steps,
    "unroll": str(unroll),
    "compile_s": compile_s,
    "median_step_ms": 1e3 * med,
    "steps_per_s": 1.0 / med,
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--iterations", type=int, default=20000)
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--alphas", type=float, nargs="+", default=[0.001, 0.01, 0.1, 1.0])
  ap.add_argument("--skip-grid", action="store_true")
  args = ap.parse_args()
  print(json.dumps({"versions": versions()}))

  for n in (1, 5):
    for unroll in (True, 1):
      print(json.dumps(step_speed(n, unroll)), flush=True)

  if args.skip_grid:
    return
  table = {}
  for method in ("maml", "alpha-maml"):
    rows, wall, cells = grid(method, args.alphas, args.seeds, args.iterations)
    one = loop_time(method, args.alphas[0], args.iterations)
    print(
      json.dumps(
        {
          "method": method,
          "cells": cells,
          "grid_wall_s": wall,
          "one_run_wall_s": one,
          "speedup_vs_sequential": cells * one / wall,
        }
      ),
      flush=True,
    )
    for r in rows:
      print(json.dumps(r), flush=True)
      table.setdefault((r["alpha0"], method), []).append(r)
  print(
    "\n| alpha0 | MAML MSE (1 step) | Alpha MAML MSE (1 step) | MAML MSE (10 steps) | "
    "Alpha MAML MSE (10 steps) | Alpha MAML final alpha |"
  )
  print("| --- | --- | --- | --- | --- | --- |")
  for a0 in args.alphas:
    m, a = table[(a0, "maml")], table[(a0, "alpha-maml")]
    f = lambda rs, k: f"{np.mean([r[k] for r in rs]):.3f} ({', '.join(f'{r[k]:.3g}' for r in rs)})"
    print(
      f"| {a0:g} | {f(m, 'mse_1step')} | {f(a, 'mse_1step')} | {f(m, 'mse_10step')} | "
      f"{f(a, 'mse_10step')} | {np.mean([r['final_alpha'] for r in a]):.4f} |"
    )


if __name__ == "__main__":
  main()
