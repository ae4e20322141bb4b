"""Robustness to the initial learning rates: MAML vs Alpha MAML over an alpha0 x beta0 grid.

    python benchmarks/robustness.py --task sinusoid    # sinusoid MSE grid (minutes)
    python benchmarks/robustness.py --task omniglot    # Omniglot 5w1s grid, CPU budget
    python benchmarks/robustness.py --task omniglot --full   # paper-scale budget (GPU)

Every cell (alpha0, beta0, seed) is an independent training run with its own parameters,
optimizer state, alpha and beta. The cells of a method train together as ONE jitted
computation: ``jax.vmap`` of the meta step over cells inside a ``lax.scan`` over steps
(``--cells-per-call`` splits a large grid into chunks that fit in memory). Cells with the
same seed start from the same weights and see the same tasks, so they differ only in their
rates. Each method is also timed running single cells one after another (same code, one
cell per call) to report the vmapped grid's speed-up.

Writes ``benchmarks/results/robustness-<task>.jsonl`` (one line per cell, with the alpha and
beta trajectories), heat maps ``docs/images/robustness-<task>.png``, trajectories
``docs/images/robustness-<task>-rates.png``, and prints the markdown table of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import amaml
from amaml import train
from amaml.configs import get_config
from amaml.env import versions

ROOT = Path(__file__).resolve().parents[1]
ALPHAS = (0.01, 0.04, 0.1, 0.4, 1.0, 4.0)
BETAS = (1e-4, 1e-3, 1e-2)
METHODS = ("maml", "alpha-maml")
# CPU budgets (all cells of both methods in well under an hour on 2 cores), and --full.
BUDGETS = {
    "sinusoid": dict(cpu=dict(steps=5000, meta_batch=25, eval_tasks=600, log_every=250),
                     full=dict(steps=70000, meta_batch=25, eval_tasks=600, log_every=1000)),
    "omniglot": dict(cpu=dict(steps=50, meta_batch=4, eval_tasks=100, log_every=10),
                     full=dict(steps=60000, meta_batch=32, eval_tasks=600, log_every=500)),
}


def make_config(task: str, method: str, budget: dict):
  name = "sinusoid" if task == "sinusoid" else "omniglot-5w1s"
  return get_config(name, method=method, iterations=budget["steps"],
                    meta_batch=budget["meta_batch"], log_every=budget["log_every"],
                    checkpoint_every=0, val_every=0)


def init_cells(cfg, exp, cells):
  """Stacked MetaStates, one per (alpha0, beta0, seed): the seed's initial weights, with
  alpha and beta (held in the hypergradient optimizer's state) set to the cell's initial
  rates. The rate rules' states do not depend on the rates' values, so one ``update``
  serves every cell."""
  params = {}
  states = []
  for a0, b0, seed in cells:
    if seed not in params:
      params[seed] = (exp.params if seed == cfg.seed else
                      train.build(dataclasses.replace(cfg, seed=seed)).params)
    st = exp.learner.init(params[seed])
    hd = st.opt_state
    if not isinstance(hd, amaml.HypergradientState):
      raise TypeError("the grid needs the hypergradient-wrapped optimizer (beta in the state)")
    states.append(st._replace(
        alpha=jax.tree.map(lambda x: jnp.full_like(x, a0), st.alpha),
        opt_state=hd._replace(learning_rate=jnp.asarray(b0, hd.learning_rate.dtype))))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def make_chunk(exp, length: int):
  """``length`` steps of every cell: scan over steps of vmap over cells."""
  cfg = exp.config

  def chunk(state, images, seeds, start):
    def body(st, i):
      def one(s, seed):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), i)
        return exp.learner.update(s, exp.sample(key, images, cfg.meta_batch))
      st, m = jax.vmap(one)(st, seeds)
      return st, {k: m[k] for k in ("loss", "alpha", "beta")}
    return jax.lax.scan(body, state, start + jnp.arange(length))

  return jax.jit(chunk, donate_argnums=(0,))


_COMPILED: dict = {}


def run_cells(exp, cells, steps: int, log_every: int):
  """Trains the cells as one computation; returns (final state, per-step metrics, seconds,
  compile seconds)."""
  state = init_cells(exp.config, exp, cells)
  seeds = jnp.asarray([c[2] for c in cells], jnp.int32)
  images = exp.data["train"]
  key = (id(exp), len(cells), log_every)
  t0 = time.perf_counter()
  if key not in _COMPILED:
    _COMPILED[key] = make_chunk(exp, log_every).lower(state, images, seeds, jnp.int32(0)).compile()
  compiled = _COMPILED[key]
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  hist = []
  for start in range(0, steps, log_every):
    state, m = compiled(state, images, seeds, jnp.int32(start))
    hist.append(m)
  jax.block_until_ready(state)
  wall = time.perf_counter() - t0
  hist = jax.device_get(jax.tree.map(lambda *xs: jnp.concatenate(xs), *hist))  # [steps, cells]
  return state, hist, wall, compile_s


def evaluate_cells(exp, state, test_batch, num_steps: int, max_tasks: int = 64):
  """Per cell: query loss (and accuracy) of every test task after ``num_steps`` inner
  steps. At most ``max_tasks`` (cells x tasks) are evaluated per call, to bound memory."""
  cells = jax.tree.leaves(state.params)[0].shape[0]
  chunk = max(1, max_tasks // cells)
  key = ("evaluate", id(exp), num_steps)
  if key not in _COMPILED:  # one jitted function per (experiment, steps): no recompiles
    _COMPILED[key] = jax.jit(jax.vmap(
        lambda p, a, b: exp.learner.evaluate(p, a, b, num_steps=num_steps), in_axes=(0, 0, None)))
  ev = _COMPILED[key]
  outs = []
  n = test_batch.support_x.shape[0]
  for i in range(0, n, chunk):
    part = jax.tree.map(lambda x: x[i:i + chunk], test_batch)
    outs.append(jax.device_get(ev(state.params, state.alpha, part)))
  return {k: np.concatenate([o[k] for o in outs], axis=1) for k in outs[0]}  # [cells, tasks]


def grid(task: str, method: str, budget: dict, alphas, betas, seeds: int, cells_per_call: int):
  cfg = make_config(task, method, budget)
  exp = train.build(cfg)
  cells = list(itertools.product(alphas, betas, range(seeds)))
  _, eval_key = train._keys(cfg)
  test = exp.sample(eval_key, exp.data["test"], budget["eval_tasks"])
  max_tasks = 64 if task == "omniglot" else 1 << 20  # Conv4 evaluation is memory-bound
  rows, wall, compile_s = [], 0.0, 0.0
  for lo in range(0, len(cells), cells_per_call):
    part = cells[lo:lo + cells_per_call]
    state, hist, w, c = run_cells(exp, part, budget["steps"], budget["log_every"])
    wall, compile_s = wall + w, compile_s + c
    ev = evaluate_cells(exp, state, test, 10, max_tasks)
    ev1 = evaluate_cells(exp, state, test, 1, max_tasks) if task == "sinusoid" else None
    for j, (a0, b0, seed) in enumerate(part):
      r = {"task": task, "method": method, "alpha0": a0, "beta0": b0, "seed": seed,
           "steps": budget["steps"], "meta_batch": budget["meta_batch"],
           "eval_tasks": budget["eval_tasks"],
           "final_alpha": float(hist["alpha"][-1, j]), "final_beta": float(hist["beta"][-1, j]),
           "final_train_loss": float(hist["loss"][-1, j]),
           "alpha_traj": [float(x) for x in hist["alpha"][:, j]],
           "beta_traj": [float(x) for x in hist["beta"][:, j]]}
      post = ev["post_loss"][j]
      r["test_loss_10step"] = float(np.mean(post))
      if "post_accuracy" in ev:
        acc = ev["post_accuracy"][j]
        r["test_accuracy"], r["test_accuracy_ci"] = amaml.mean_confidence_interval(acc)
      else:
        r["test_mse_10step"], r["test_mse_10step_ci"] = amaml.mean_confidence_interval(post)
        r["test_mse_1step"], r["test_mse_1step_ci"] = amaml.mean_confidence_interval(
            ev1["post_loss"][j])
      rows.append(r)
  return rows, wall, compile_s, exp


def sequential_time(exp, cells, steps: int, log_every: int) -> float:
  """Seconds to train ``cells`` one after another (one cell per call, compile excluded)."""
  total = 0.0
  for cell in cells:
    _, _, wall, _ = run_cells(exp, [cell], steps, log_every)
    total += wall
  return total


def metric(task):
  return ("test_accuracy", "meta-test accuracy (%)") if task == "omniglot" else \
         ("test_mse_1step", "meta-test MSE after 1 step")


def by_cell(rows, task) -> dict:
  """``(method, alpha0, beta0) -> [metric of each seed]`` (accuracy in %)."""
  key, _ = metric(task)
  scale = 100.0 if task == "omniglot" else 1.0
  by = {}
  for r in rows:
    by.setdefault((r["method"], r["alpha0"], r["beta0"]), []).append(r[key] * scale)
  return by


def table(rows, task, alphas, betas) -> str:
  by = by_cell(rows, task)

  def fmt(v):
    if not np.all(np.isfinite(v)):
      return f"diverged ({int(np.sum(~np.isfinite(v)))}/{len(v)})"
    return f"{np.mean(v):.1f} ± {np.std(v):.1f}" if task == "omniglot" else \
        f"{np.mean(v):.3g} ± {np.std(v):.2g}"
  lines = ["| alpha0 | " + " | ".join(f"beta0={b:g}: MAML / Alpha MAML" for b in betas) + " |",
           "| --- |" + " --- |" * len(betas)]
  for a in alphas:
    cells = [f"{fmt(by[('maml', a, b)])} / **{fmt(by[('alpha-maml', a, b)])}**" for b in betas]
    lines.append(f"| {a:g} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(rows, task, alphas, betas, out_dir: Path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import LogNorm

  out_dir.mkdir(parents=True, exist_ok=True)
  _, label = metric(task)
  by = by_cell(rows, task)
  grids = {m: np.array([[np.mean(by.get((m, a, b), [np.nan])) for b in betas] for a in alphas])
           for m in METHODS}
  allv = np.concatenate([g.ravel() for g in grids.values()])
  allv = allv[np.isfinite(allv)]
  if task == "omniglot":
    norm, cmap = dict(vmin=float(allv.min()), vmax=float(allv.max())), "viridis"
  else:
    norm, cmap = dict(norm=LogNorm(vmin=max(float(allv.min()), 1e-3), vmax=float(allv.max()))), "viridis_r"
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), constrained_layout=True)
  for ax, m in zip(axes, METHODS):
    im = ax.imshow(grids[m], cmap=cmap, aspect="auto", **norm)
    ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_xlabel("initial beta (outer rate)")
    ax.set_ylabel("initial alpha (inner rate)")
    ax.set_title({"maml": "MAML (fixed rates)", "alpha-maml": "Alpha MAML (adapted rates)"}[m])
    for i in range(len(alphas)):
      for j in range(len(betas)):
        v = grids[m][i, j]
        txt = ("div." if not np.isfinite(v) else f"{v:.1f}" if task == "omniglot" else f"{v:.2g}")
        ax.text(j, i, txt, ha="center", va="center", color="w" if np.isfinite(v) else "k",
                fontsize=8)
  fig.colorbar(im, ax=axes, label=label)
  fig.suptitle(f"{task}: {label}, mean over seeds")
  heat = out_dir / f"robustness-{task}.png"
  fig.savefig(heat, dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
  mid = betas[len(betas) // 2]
  for r in rows:
    if r["method"] == "alpha-maml" and r["seed"] == 0 and r["beta0"] == mid:
      axes[0].plot(r["alpha_traj"], label=f"alpha0={r['alpha0']:g}")
    if r["method"] == "alpha-maml" and r["seed"] == 0 and r["alpha0"] == alphas[len(alphas) // 2]:
      axes[1].plot(r["beta_traj"], label=f"beta0={r['beta0']:g}")
  axes[0].set(yscale="log", xlabel="meta step", ylabel="alpha", title=f"Alpha MAML alpha (beta0={mid:g}, seed 0)")
  axes[1].set(yscale="log", xlabel="meta step", ylabel="beta",
              title=f"Alpha MAML beta (alpha0={alphas[len(alphas) // 2]:g}, seed 0)")
  for ax in axes:
    ax.legend(fontsize=7)
  rates = out_dir / f"robustness-{task}-rates.png"
  fig.savefig(rates, dpi=110)
  plt.close(fig)
  return heat, rates


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--task", choices=tuple(BUDGETS), default="omniglot")
  ap.add_argument("--full", action="store_true", help="paper-scale budget (for a GPU)")
  ap.add_argument("--steps", type=int, help="override the budget's meta steps per cell")
  ap.add_argument("--meta-batch", type=int, help="override the budget's tasks per step")
  ap.add_argument("--eval-tasks", type=int, help="override the budget's meta-test tasks")
  ap.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
  ap.add_argument("--betas", type=float, nargs="+", default=list(BETAS))
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
  ap.add_argument("--cells-per-call", type=int, default=18,
                  help="cells trained together in one vmapped computation")
  ap.add_argument("--sequential-cells", type=int, default=2,
                  help="cells also timed one after another, for the speed-up")
  ap.add_argument("--out", default=None, help="JSON lines (default benchmarks/results/robustness-<task>.jsonl)")
  ap.add_argument("--images", default=str(ROOT / "docs" / "images"))
  ap.add_argument("--render", metavar="JSONL", help="only print the table and draw the figures "
                  "of an earlier run's JSON lines")
  args = ap.parse_args(argv)
  if args.render:
    recs = [json.loads(l) for l in Path(args.render).read_text().splitlines() if l.strip()]
    rows = [r for r in recs if "alpha0" in r]
    task = rows[0]["task"]
    alphas = sorted({r["alpha0"] for r in rows})
    betas = sorted({r["beta0"] for r in rows})
    for r in recs:
      if "grid_wall_s" in r:
        print(json.dumps(r))
    print(table(rows, task, alphas, betas))
    for p in plot(rows, task, alphas, betas, Path(args.images)):
      print(f"wrote {p}")
    return

  budget = dict(BUDGETS[args.task]["full" if args.full else "cpu"])
  for k in ("steps", "meta_batch", "eval_tasks"):
    if getattr(args, k) is not None:
      budget[k] = getattr(args, k)
  budget["log_every"] = min(budget["log_every"], budget["steps"])
  if budget["steps"] % budget["log_every"]:
    ap.error(f"--steps must be a multiple of {budget['log_every']}")
  out = Path(args.out or ROOT / "benchmarks" / "results" / f"robustness-{args.task}.jsonl")
  out.parent.mkdir(parents=True, exist_ok=True)
  head = {"task": args.task, "budget": budget, "full": args.full, "seeds": args.seeds,
          "date": time.strftime("%Y-%m-%d"), "versions": versions()}
  lines = [head]
  print(json.dumps(head), flush=True)
  rows = []
  for method in args.methods:
    r, wall, compile_s, exp = grid(args.task, method, budget, args.alphas, args.betas,
                                   args.seeds, args.cells_per_call)
    n_seq = min(args.sequential_cells, len(r))
    seq = sequential_time(exp, [(x["alpha0"], x["beta0"], x["seed"]) for x in r[:n_seq]],
                          budget["steps"], budget["log_every"]) if n_seq else float("nan")
    timing = {"method": method, "cells": len(r), "cells_per_call": args.cells_per_call,
              "grid_wall_s": wall, "grid_compile_s": compile_s,
              "sequential_s_per_cell": seq / max(n_seq, 1),
              "speedup_vs_sequential": len(r) * seq / max(n_seq, 1) / wall}
    print(json.dumps(timing), flush=True)
    lines.append(timing)
    rows += r
    lines += r
  out.write_text("".join(json.dumps(l) + "\n" for l in lines))
  print(f"wrote {out}")
  if set(args.methods) == set(METHODS):
    print()
    print(table(rows, args.task, args.alphas, args.betas))
    try:
      for p in plot(rows, args.task, args.alphas, args.betas, Path(args.images)):
        print(f"wrote {p}")
    except ImportError:
      print("matplotlib not installed: no heat maps (pip install amaml[plot])")


if __name__ == "__main__":
  main()
