"""Probes used to choose amaml's default hypergradient rate: sinusoid grids of variants.

    python benchmarks/default_probes.py                       # the variants of BENCHMARKS.md
    python benchmarks/default_probes.py --variants '[{"alpha_lr": 0.05, "beta_lr": 0.01}]'

Each variant is a set of ``Config`` overrides of the ``alpha-maml`` method (the default rule
with backtracking). Every variant trains the same cells, alpha0 in {0.01, 0.1, 1, 4} x beta0
in {1e-4, 1e-3, 1e-2} x seeds (one beta0 column when the outer optimizer, like the
default's D-Adaptation, has no rate), 5,000 meta steps on the ``sinusoid`` config, as one vmapped
computation (:mod:`robustness`), and is scored on 600 meta-test tasks after one inner step
and with the test-time adaptation selected on 200 validation tasks. It prints the mean MSE
per (alpha0, beta0) over seeds and the worst/best ratio over cells, the quantity the default
must keep small (the target is 1.5).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time

import jax
import numpy as np

import robustness
from amaml import train

ALPHAS = (0.01, 0.1, 1.0, 4.0)
BETAS = (1e-4, 1e-3, 1e-2)
VARIANTS = [
  {"alpha_lr": 0.03, "beta_lr": 0.03},
  {"alpha_lr": 0.03, "beta_lr": 0.01},
  {"alpha_lr": 0.03, "beta_lr": 0.1},
  {"alpha_lr": 0.05, "beta_lr": 0.05},
]


def probe(overrides: dict, seeds: int, steps: int, alphas=ALPHAS, betas=BETAS) -> dict:
  budget = dict(steps=steps, meta_batch=25, eval_tasks=600, val_tasks=200, log_every=250)
  cfg = dataclasses.replace(robustness.make_config("sinusoid", "alpha-maml", budget), **overrides)
  exp = train.build(cfg)
  if not robustness.has_beta0(cfg):
    betas = (None,)  # a learning-rate-free outer optimizer has no beta0
  cells = list(itertools.product(alphas, betas, range(seeds)))
  t0 = time.perf_counter()
  state, hist, _, _ = robustness.run_cells(exp, cells, steps, budget["log_every"])
  key = train.run_keys(cfg).eval
  test = exp.sample(jax.random.fold_in(key, 2), None, budget["eval_tasks"])
  val = exp.sample(jax.random.fold_in(key, 1), None, budget["val_tasks"])
  ev = robustness.evaluate_cells(exp, state, val, test, 1 << 20)
  out = {"overrides": overrides, "seeds": seeds, "steps": steps}
  for name in ("one_step", "selected"):
    by = {}
    for c, e in zip(cells, ev):
      by.setdefault(c[:2], []).append(float(np.mean(e[name])))
    means = {
      f"{a:g},{b if b is None else format(b, 'g')}": float(np.mean(v)) for (a, b), v in by.items()
    }
    out[name] = means
    out[f"{name}_worst_over_best"] = max(means.values()) / min(means.values())
  out["final_alpha"] = [float(x) for x in hist["alpha"][-1]]
  out["seconds"] = time.perf_counter() - t0
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--variants", type=json.loads, default=VARIANTS)
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=5000)
  ap.add_argument("--alphas", type=float, nargs="+", default=ALPHAS)
  ap.add_argument(
    "--betas",
    type=float,
    nargs="+",
    default=BETAS,
    help="beta0 values (one is enough for a learning-rate-free outer optimizer)",
  )
  args = ap.parse_args(argv)
  for v in args.variants:
    r = probe(v, args.seeds, args.steps, args.alphas, args.betas)
    print(json.dumps(r), flush=True)
    print(
      f"# {v}: worst/best {r['one_step_worst_over_best']:.2f} (1 step), "
      f"{r['selected_worst_over_best']:.2f} (selected); "
      f"best {min(r['one_step'].values()):.3f}, worst {max(r['one_step'].values()):.3f}",
      flush=True,
    )


if __name__ == "__main__":
  main()
