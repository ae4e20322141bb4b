"""Robustness to untuned initial learning rates: MAML, the paper's Alpha MAML and amaml's
default over an alpha0 x beta0 grid, with optax.contrib's learning-rate-free optimizers as
anchors for the outer rate.

    python benchmarks/robustness.py --task sinusoid    # sinusoid MSE grid (minutes)
    python benchmarks/robustness.py --task omniglot    # Omniglot 5w1s grid, CPU budget
    python benchmarks/robustness.py --task omniglot-20w1s --alphas 0.01 0.1 1 --betas 1e-3
    python benchmarks/robustness.py --task omniglot --full   # paper-scale budget (GPU)

Methods (``--methods``): ``maml`` (fixed rates, Adam), ``alpha-maml-paper`` (the paper's
additive rule for alpha and Adam's beta, with the HD paper's kappa), ``alpha-maml`` (amaml's
default: one alpha per parameter tensor, each by the normalized rule, backtracking,
D-Adaptation's AdamW as the outer optimizer, test-time adaptation chosen on validation
tasks), ``alpha-maml@scalar`` (the same with one alpha), ``alpha-maml@scalar+adam`` (one
alpha, and Adam whose beta follows the normalized rule) and ``maml+<opt>`` for ``<opt>`` in
prodigy, dog, mechanize, cocob, dadapt_adamw (MAML whose outer optimizer has no rate). In
general ``<method>@<g>`` sets ``alpha_granularity=g`` and ``<method>+<opt>`` the outer
optimizer. A method whose outer optimizer has no rate has no beta0: it runs one column,
repeated under every beta0 in the tables.

Every cell (alpha0, beta0, seed) is an independent training run with its own parameters,
optimizer state, alpha and beta. The cells of a method train together as ONE jitted
computation, the loop of ``amaml train --seeds N`` (:func:`amaml.seeds.make_chunk`: a loop
over steps of ``jax.vmap`` of the meta step over cells) with one member per cell
(``--cells-per-call`` splits a large grid into chunks that fit in memory). A cell of seed s
starts from the weights of the run of seed s and sees its tasks, so cells with the same seed
differ only in their rates, and a cell at the config's own rates is the run ``amaml train``
trains with that seed.

Every cell is scored two ways on the same meta-test tasks: MAML's protocol (``fixed``: 10
inner steps at the trained alpha; on sinusoid also the 1-step MSE of MAML's paper) and the
test-time adaptation amaml's default uses (``selected``: the inner steps, 1 to 10, and a
multiple of alpha, chosen per cell on meta-validation tasks). The table reports each method
by its own protocol (``alpha-maml``: selected; the others: fixed) and the JSON lines hold
both for every cell.

Writes ``benchmarks/results/robustness-<task>.jsonl.gz`` (gzipped: the trajectories are
large; one line per cell, with the alpha and
beta trajectories), heat maps ``docs/images/robustness-<task>.png``, alpha/beta trajectories
of the corner cells ``docs/images/robustness-<task>-rates.png``, and prints the markdown
tables of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import amaml
from amaml import adaptation, train
from amaml import seeds as multi_seed  # (grid() has an argument named seeds)
from amaml.configs import OUTER_OPTIMIZERS, get_config
from amaml.env import versions

ROOT = Path(__file__).resolve().parents[1]
ALPHAS = (0.01, 0.04, 0.1, 0.4, 1.0, 4.0)
BETAS = (1e-4, 1e-3, 1e-2)
METHODS = (
  "maml",
  "alpha-maml-paper",
  "alpha-maml@scalar+adam",
  "alpha-maml@scalar+dadapt_adamw",
  "alpha-maml+dadapt_adamw",
  "alpha-maml",
)
ANCHORS = tuple(f"maml+{o}" for o in OUTER_OPTIMIZERS if o != "adam")
LABELS = {
  "maml": "MAML (fixed rates)",
  "alpha-maml-paper": "Alpha MAML, paper's additive rule",
  "alpha-maml@scalar+adam": "alpha-maml with one alpha, beta by hypergradient on Adam",
  "alpha-maml@scalar+dadapt_adamw": "alpha-maml with one alpha, D-Adaptation outside",
  "alpha-maml+dadapt_adamw": "alpha-maml (one alpha per tensor), D-Adaptation outside",
  "alpha-maml": "amaml default (alpha per tensor, Adam 1e-3, alpha0 searched)",
}
CONFIG_NAMES = {
  "sinusoid": "sinusoid",
  "omniglot": "omniglot-5w1s",
  "omniglot-20w1s": "omniglot-20w1s",
}
# CPU budgets (a method's 18 cells in about half an hour on 2 cores), and --full.
_OMNIGLOT_BUDGET = dict(
  cpu=dict(steps=300, meta_batch=8, eval_tasks=100, val_tasks=50, log_every=50),
  full=dict(steps=60000, meta_batch=32, eval_tasks=600, val_tasks=200, log_every=500),
)
BUDGETS = {
  "sinusoid": dict(
    cpu=dict(steps=5000, meta_batch=25, eval_tasks=600, val_tasks=200, log_every=250),
    full=dict(steps=70000, meta_batch=25, eval_tasks=600, val_tasks=200, log_every=1000),
  ),
  "omniglot": _OMNIGLOT_BUDGET,
  "omniglot-20w1s": _OMNIGLOT_BUDGET,
}
EVAL_STEPS = 10  # MAML's test-time inner steps, and the most the selection may choose


def make_config(task: str, method: str, budget: dict):
  """The named config of ``task`` at the budget; ``<method>+<opt>`` is ``method`` with the
  outer optimizer ``opt`` (and no alpha0 search), ``<method>@<granularity>`` with that
  ``alpha_granularity``; plain ``alpha-maml`` is amaml's default (Adam at 1e-3 with beta
  fixed, alpha0 searched on the first meta-batch)."""
  kw = {}
  if "+" in method:
    method, kw["outer_optimizer"] = method.split("+", 1)
    kw["alpha_search"] = False
  if "@" in method:
    method, kw["alpha_granularity"] = method.split("@", 1)
  return get_config(
    CONFIG_NAMES[task],
    method=method,
    iterations=budget["steps"],
    meta_batch=budget["meta_batch"],
    log_every=budget["log_every"],
    checkpoint_every=0,
    val_every=0,
    eval_inner_steps=EVAL_STEPS,
    **kw,
  )


def init_cells(cfg, exp, cells):
  """Stacked MetaStates, one per (alpha0, beta0, seed): the seed's initial weights, with
  alpha and beta (held in the hypergradient optimizer's state) set to the cell's initial
  rates (``beta0`` is ``None`` for an outer optimizer without a rate). The rate rules'
  states do not depend on the rates' values, so one ``update`` serves every cell."""
  params = {}
  states = []
  for a0, b0, seed in cells:
    if seed not in params:  # the model's initializer: the data is not loaded again
      params[seed] = multi_seed.initial_params(exp, seed)
    st = exp.learner.init(params[seed])
    st = st._replace(alpha=jax.tree.map(lambda x: jnp.full_like(x, a0), st.alpha))
    hd = st.opt_state
    if b0 is not None:
      if not isinstance(hd, amaml.HypergradientState):
        raise TypeError("a beta0 needs the hypergradient-wrapped optimizer (beta in the state)")
      st = st._replace(opt_state=hd._replace(learning_rate=jnp.asarray(b0, hd.learning_rate.dtype)))
    states.append(st)
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def make_chunk(exp, length: int):
  """``length`` steps of every cell, jitted: ``(state, images, seeds, start) -> (state,
  {"loss", "alpha", "beta"})``, each ``[length, cells]`` (beta NaN where the outer
  optimizer has none). :func:`amaml.seeds.make_chunk` (the loop of ``amaml train --seeds``)
  with one member per cell, cell j on the tasks of the run of seed ``seeds[j]``. ``exp``
  needs ``learner``, ``sample`` and ``config.meta_batch``."""
  loop = multi_seed.make_chunk(exp, length)

  def chunk(state, images, ids, start):
    state, m = loop(state, images, start, length, ids)
    nan = jnp.full_like(m["alpha"], jnp.nan)
    return state, {"loss": m["loss"], "alpha": m["alpha"], "beta": m.get("beta", nan)}

  return amaml.jit(chunk, donate_argnums=(0,))  # amaml.jit: the options of amaml train


_COMPILED: dict = {}


def _compiled(exp, extra, make):
  """The compiled function of ``exp`` and ``extra``, made once by ``make()``. Keyed by the
  experiment's identity and holding it, so that a new experiment that happens to get a
  freed one's ``id`` never reuses its compiled code."""
  key = (id(exp), extra)
  if key not in _COMPILED or _COMPILED[key][0] is not exp:
    _COMPILED[key] = (exp, make())
  return _COMPILED[key][1]


def run_cells(exp, cells, steps: int, log_every: int):
  """Trains the cells as one computation; returns (final state, per-step metrics, seconds,
  compile seconds)."""
  state = init_cells(exp.config, exp, cells)
  seeds = jnp.asarray([c[2] for c in cells], jnp.int32)
  images = exp.data["train"]
  if exp.config.resolved_alpha_search:  # each cell on its seed's first tasks
    state = train.alpha_search(exp, vmapped=True)(state, images, seeds)
  t0 = time.perf_counter()
  compiled = _compiled(
    exp,
    ("chunk", len(cells), log_every),
    lambda: make_chunk(exp, log_every).lower(state, images, seeds, jnp.int32(0)).compile(),
  )
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


def curves_cells(exp, state, batch, scale: float, inner_steps: int, max_tasks: int = 64):
  """Per cell and task: the query metric after 0..``inner_steps`` inner steps at ``scale *
  alpha`` (:attr:`MetaLearner.adaptation_curve`), ``[cells, tasks, steps + 1]`` for each
  metric. At most ``max_tasks`` (cells x tasks) per call, to bound memory."""
  cells = jax.tree.leaves(state.params)[0].shape[0]
  chunk = max(1, max_tasks // cells)
  fn = _compiled(
    exp,
    ("curve", inner_steps),
    lambda: jax.jit(
      jax.vmap(  # no recompiles
        lambda p, a, b: exp.learner.adaptation_curve(p, a, b, inner_steps=inner_steps),
        in_axes=(0, 0, None),
      )
    ),
  )
  scale = jnp.asarray(scale, jnp.float32)  # a scalar, or one per cell
  alpha = jax.tree.map(
    lambda a: a * scale.reshape((-1,) + (1,) * (a.ndim - 1)) if scale.ndim else a * scale,
    state.alpha,
  )
  outs = []
  n = batch.support_x.shape[0]
  for i in range(0, n, chunk):
    part = jax.tree.map(lambda x: x[i : i + chunk], batch)
    outs.append(jax.device_get(fn(state.params, alpha, part)))
  return {k: np.concatenate([o[k] for o in outs], axis=1) for k in outs[0]}


#: The test-time rate grid before the support-loss guard and the finer grid: kept to score
#: every cell both ways (``selected_coarse``: this grid, no guard).
COARSE_SCALES = (2.0, 1.0, 0.5, 0.25, 0.125)


def _guard(out: dict) -> dict:
  """:func:`amaml.adaptation.guarded_curves` over ``[cells, tasks, steps + 1]`` curves."""
  if "support_loss" not in out:
    return out
  shape = out["support_loss"].shape
  flat = adaptation.guarded_curves({k: v.reshape(-1, shape[-1]) for k, v in out.items()})
  return {k: v.reshape(shape) for k, v in flat.items()}


def _choose(val: dict, key: str, scales) -> list:
  """Per cell, the best ``(scale, steps, score)`` of the mean validation curves ``val``
  (the score as :func:`amaml.adaptation.best_adaptation` ranks it: higher is better)."""
  picks = []
  for j in range(val[1.0][key].shape[0]):
    scale, steps, scores = adaptation.best_adaptation(
      {s: val[s][key][j].mean(axis=0) for s in scales}, higher_is_better=key == "accuracy"
    )
    picks.append((scale, steps, scores[f"{scale:g}x{steps}"]))
  return picks


def evaluate_cells(exp, state, val_batch, test_batch, max_tasks: int):
  """Per cell: MAML's fixed protocol, the selected test-time adaptation of amaml's
  evaluation (the rate and steps chosen on ``val_batch`` over
  :data:`amaml.adaptation.ALPHA_SCALES` by :func:`amaml.adaptation.best_adaptation`, every task
  under the support-loss guard) and the same without the guard over :data:`COARSE_SCALES`
  (``selected_coarse``), all scored on ``test_batch``. ``"val"`` is the selected adaptation's
  validation score (accuracy, or minus the loss; ``-inf`` where not finite)."""
  raw = {
    scale: curves_cells(exp, state, val_batch, scale, EVAL_STEPS, max_tasks)
    for scale in adaptation.ALPHA_SCALES
  }
  key = "accuracy" if "accuracy" in raw[1.0] else "loss"
  chosen = _choose({s: _guard(v) for s, v in raw.items()}, key, adaptation.ALPHA_SCALES)
  coarse = _choose(raw, key, COARSE_SCALES)
  at_alpha = curves_cells(exp, state, test_batch, 1.0, EVAL_STEPS, max_tasks)[key]
  at_chosen = _guard(
    curves_cells(exp, state, test_batch, [c[0] for c in chosen], EVAL_STEPS, max_tasks)
  )[key]
  at_coarse = curves_cells(exp, state, test_batch, [c[0] for c in coarse], EVAL_STEPS, max_tasks)[
    key
  ]
  return [
    {
      "fixed": at_alpha[j, :, EVAL_STEPS],
      "one_step": at_alpha[j, :, 1],
      "selected": at_chosen[j, :, chosen[j][1]],
      "selected_scale": chosen[j][0],
      "selected_steps": chosen[j][1],
      "val": chosen[j][2],
      "selected_coarse": at_coarse[j, :, coarse[j][1]],
      "coarse_scale": coarse[j][0],
      "coarse_steps": coarse[j][1],
    }
    for j in range(len(chosen))
  ]


def grid(task: str, method: str, budget: dict, alphas, betas, seeds: int, cells_per_call: int):
  cfg = make_config(task, method, budget)
  exp = train.build(cfg)
  if not has_beta0(cfg):
    betas = (None,)  # no outer rate to set
  cells = list(itertools.product(alphas, betas, range(seeds)))
  eval_key = train.run_keys(cfg).eval
  test = exp.sample(jax.random.fold_in(eval_key, 2), exp.data["test"], budget["eval_tasks"])
  val_split = "val" if exp.data.get("val") is not None or task == "sinusoid" else "train"
  val = exp.sample(jax.random.fold_in(eval_key, 1), exp.data[val_split], budget["val_tasks"])
  max_tasks = 64 if task != "sinusoid" else 1 << 20  # Conv4 evaluation is memory-bound
  rows, wall, compile_s = [], 0.0, 0.0
  for lo in range(0, len(cells), cells_per_call):
    part = cells[lo : lo + cells_per_call]
    state, hist, w, c = run_cells(exp, part, budget["steps"], budget["log_every"])
    wall, compile_s = wall + w, compile_s + c
    ev = evaluate_cells(exp, state, val, test, max_tasks)
    for j, (a0, b0, seed) in enumerate(part):
      e = ev[j]
      r = {
        "task": task,
        "method": method,
        "alpha0": a0,
        "beta0": b0,
        "seed": seed,
        "steps": budget["steps"],
        "meta_batch": budget["meta_batch"],
        "eval_tasks": budget["eval_tasks"],
        "val_tasks": budget["val_tasks"],
        "final_alpha": float(hist["alpha"][-1, j]),
        "final_beta": float(hist["beta"][-1, j]),
        "final_train_loss": float(hist["loss"][-1, j]),
        "selected_scale": e["selected_scale"],
        "selected_steps": e["selected_steps"],
        "alpha_traj": [float(x) for x in hist["alpha"][:, j]],
        "beta_traj": [float(x) for x in hist["beta"][:, j]],
      }
      names = ["fixed", "selected", "selected_coarse"] + (
        ["one_step"] if task == "sinusoid" else []
      )
      for name in names:
        m, ci = amaml.mean_confidence_interval(e[name])
        r[f"test_{name}"], r[f"test_{name}_ci"] = m, ci
      rows.append(r)
  return rows, wall, compile_s, exp


def has_beta0(cfg) -> bool:
  """Whether ``cfg`` has an outer rate to start: Adam's, unless it is an Alpha MAML that
  holds beta at its library default (amaml's default, ``beta_lr`` 0); other outer
  optimizers set their own."""
  fixed = cfg.method != "maml" and cfg.resolved_beta_lr == 0
  return cfg.resolved_outer_optimizer == "adam" and not fixed


def metric(task):
  return "meta-test accuracy (%)" if task != "sinusoid" else "meta-test MSE"


def protocol(method: str, task: str) -> str:
  """The row field that scores ``method`` by its own test-time protocol."""
  if method.split("@")[0].split("+")[0] == "alpha-maml":
    return "test_selected"
  return "test_one_step" if task == "sinusoid" else "test_fixed"


def by_cell(rows, task, field=None, betas=()) -> dict:
  """``(method, alpha0, beta0) -> [metric of each seed]`` (accuracy in %), each method by its
  own protocol unless ``field`` names one. A method without beta0 also fills every column
  of ``betas`` (its cells are the same whatever beta0 would be)."""
  scale = 100.0 if task != "sinusoid" else 1.0
  by = {}
  for r in rows:
    key = field or protocol(r["method"], task)
    cols = [r["beta0"]] if r["beta0"] is not None or r["method"] in ANCHORS else [None, *betas]
    for b in cols:
      by.setdefault((r["method"], r["alpha0"], b), []).append(r[key] * scale)
  return by


def _fmt(v, task):
  if not np.all(np.isfinite(v)):
    return f"diverged ({int(np.sum(~np.isfinite(v)))}/{len(v)})"
  spread = f" ± {np.std(v):.1f}" if len(v) > 1 else ""
  return (
    f"{np.mean(v):.1f}{spread}"
    if task != "sinusoid"
    else (f"{np.mean(v):.3g}" + (f" ± {np.std(v):.2g}" if len(v) > 1 else ""))
  )


def table(rows, task, alphas, betas, field=None) -> str:
  """One row per alpha0, one column per beta0; each cell lists the grid methods present."""
  by = by_cell(rows, task, field, betas)
  methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
  head = " / ".join(LABELS[m] for m in methods)
  lines = [
    "| alpha0 | " + " | ".join(f"beta0={b:g}" for b in betas) + " |",
    "| --- |" + " --- |" * len(betas),
  ]
  for a in alphas:
    cells = [
      " / ".join(
        f"**{_fmt(by[(m, a, b)], task)}**" if m == "alpha-maml" else _fmt(by[(m, a, b)], task)
        for m in methods
        if (m, a, b) in by
      )
      for b in betas
    ]
    lines.append(f"| {a:g} | " + " | ".join(cells) + " |")
  return f"{metric(task)}: {head}\n\n" + "\n".join(lines)


def anchor_table(rows, task, alphas, field=None) -> str:
  """Methods without a beta0 (the learning-rate-free anchors) and the grid methods' best
  beta0 column, one row per method, one column per alpha0."""
  by = by_cell(rows, task, field)
  higher = task != "sinusoid"
  methods = [m for m in METHODS + ANCHORS if any(r["method"] == m for r in rows)]
  lines = [
    "| method | " + " | ".join(f"alpha0={a:g}" for a in alphas) + " | worst | best |",
    "| --- |" + " --- |" * (len(alphas) + 2),
  ]
  for m in methods:
    vals = {}
    for a in alphas:
      cands = [np.mean(v) for (mm, aa, _), v in by.items() if mm == m and aa == a]
      if cands:
        vals[a] = max(cands) if higher else min(cands)
    if not vals:
      continue
    finite = [v for v in vals.values() if np.isfinite(v)]
    worst = (min(finite) if higher else max(finite)) if len(finite) == len(vals) else float("nan")
    best = (max(finite) if higher else min(finite)) if finite else float("nan")
    f = (lambda v: f"{v:.1f}") if higher else (lambda v: f"{v:.3g}")
    lines.append(
      f"| {LABELS.get(m, m)} | "
      + " | ".join(f(vals[a]) if a in vals else "" for a in alphas)
      + f" | {f(worst)} | {f(best)} |"
    )
  note = "(methods with beta0: their best beta0 for each alpha0)"
  return note + "\n\n" + "\n".join(lines)


def plot(rows, task, alphas, betas, out_dir: Path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import LogNorm

  out_dir.mkdir(parents=True, exist_ok=True)
  label = metric(task)
  by = by_cell(rows, task, betas=betas)
  methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
  grids = {
    m: np.array([[np.mean(by.get((m, a, b), [np.nan])) for b in betas] for a in alphas])
    for m in methods
  }
  allv = np.concatenate([g.ravel() for g in grids.values()])
  allv = allv[np.isfinite(allv)]
  if task != "sinusoid":
    norm, cmap = dict(vmin=float(allv.min()), vmax=float(allv.max())), "viridis"
  else:
    norm, cmap = (
      dict(norm=LogNorm(vmin=max(float(allv.min()), 1e-3), vmax=float(allv.max()))),
      "viridis_r",
    )
  fig, axes = plt.subplots(
    1, len(methods), figsize=(5 * len(methods), 4.2), constrained_layout=True, squeeze=False
  )
  for ax, m in zip(axes[0], methods):
    im = ax.imshow(grids[m], cmap=cmap, aspect="auto", **norm)
    ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_xlabel("initial beta (outer rate)")
    ax.set_ylabel("initial alpha (inner rate)")
    ax.set_title(textwrap.fill(LABELS[m], 40))
    for i in range(len(alphas)):
      for j in range(len(betas)):
        v = grids[m][i, j]
        txt = (
          "not run"
          if (m, alphas[i], betas[j]) not in by
          else "div."
          if not np.isfinite(v)
          else f"{v:.1f}"
          if task != "sinusoid"
          else f"{v:.2g}"
        )
        ax.text(
          j, i, txt, ha="center", va="center", color="w" if np.isfinite(v) else "k", fontsize=8
        )
  fig.colorbar(im, ax=axes[0].tolist(), label=label)
  fig.suptitle(f"{task}: {label}, each method by its own test protocol, mean over seeds")
  heat = out_dir / f"robustness-{task}.png"
  fig.savefig(heat, dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
  corners = {(a, b) for a in (min(alphas), max(alphas)) for b in (min(betas), max(betas))}
  short = {
    "alpha-maml": "amaml",
    "alpha-maml+dadapt_adamw": "amaml+dadapt",
    "alpha-maml@scalar+dadapt_adamw": "amaml+dadapt, one alpha",
    "alpha-maml@scalar+adam": "amaml+adam",
    "alpha-maml-paper": "paper",
  }
  for m, style in (
    ("alpha-maml", "-"),
    ("alpha-maml+dadapt_adamw", (0, (5, 1))),
    ("alpha-maml@scalar+dadapt_adamw", "-."),
    ("alpha-maml@scalar+adam", "--"),
    ("alpha-maml-paper", ":"),
  ):
    for r in rows:
      corner = r["beta0"] is None or (r["alpha0"], r["beta0"]) in corners
      if (
        r["method"] == m and r["seed"] == 0 and r["alpha0"] in (min(alphas), max(alphas)) and corner
      ):
        b0 = "" if r["beta0"] is None else f" b0={r['beta0']:g}"
        lab = f"{short[m]} a0={r['alpha0']:g}{b0}"
        axes[0].plot(r["alpha_traj"], ls=style, label=lab)
        axes[1].plot(r["beta_traj"], ls=style, label=lab)
  axes[0].set(
    yscale="log", xlabel="meta step", ylabel="alpha", title="alpha, corner cells (seed 0)"
  )
  axes[1].set(yscale="log", xlabel="meta step", ylabel="beta", title="beta, corner cells (seed 0)")
  for ax in axes:
    ax.legend(fontsize=6)
  rates = out_dir / f"robustness-{task}-rates.png"
  fig.savefig(rates, dpi=110)
  plt.close(fig)
  return heat, rates


def report(rows, task, alphas, betas) -> str:
  """The markdown tables: the grid (each method by its own protocol), the same grid with
  every method scored by the selected test-time adaptation, and the per-alpha0 summary
  with the learning-rate-free anchors."""
  parts = [table(rows, task, alphas, betas)]
  parts.append(
    "Every method with the test-time adaptation selected on validation tasks:\n\n"
    + table(rows, task, alphas, betas, field="test_selected")
  )
  parts.append(anchor_table(rows, task, alphas))
  return "\n\n".join(parts)


def _render(rows, task, images: Path):
  alphas = sorted({r["alpha0"] for r in rows})
  betas = sorted({r["beta0"] for r in rows if r["beta0"] is not None}) or [BETAS[1]]
  print(report(rows, task, alphas, betas))
  try:
    for p in plot(rows, task, alphas, betas, images):
      print(f"wrote {p}")
  except ImportError:
    print("matplotlib not installed: no heat maps (pip install amaml[plot])")


def read_jsonl(path: Path) -> list[dict]:
  """JSON lines from ``path`` (gzipped when its name ends in ``.gz``)."""
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rt") as f:
    return [json.loads(l) for l in f if l.strip()]


def write_jsonl(path: Path, lines: list[dict]) -> None:
  """Writes ``lines`` atomically (gzipped when the name ends in ``.gz``)."""
  tmp = path.with_name(path.name + ".tmp")
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(tmp, "wt") as f:
    f.write("".join(json.dumps(l) + "\n" for l in lines))
  tmp.replace(path)


def main(argv=None):
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--task", choices=tuple(BUDGETS), default="omniglot")
  ap.add_argument("--full", action="store_true", help="paper-scale budget (for a GPU)")
  ap.add_argument("--steps", type=int, help="override the budget's meta steps per cell")
  ap.add_argument("--meta-batch", type=int, help="override the budget's tasks per step")
  ap.add_argument("--eval-tasks", type=int, help="override the budget's meta-test tasks")
  ap.add_argument("--val-tasks", type=int, help="override the budget's meta-validation tasks")
  ap.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
  ap.add_argument("--betas", type=float, nargs="+", default=list(BETAS))
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--methods", nargs="+", choices=METHODS + ANCHORS, default=list(METHODS))
  ap.add_argument(
    "--cells-per-call",
    type=int,
    default=18,
    help="cells trained together in one vmapped computation",
  )
  ap.add_argument(
    "--out",
    default=None,
    help="JSON lines, gzipped if the name ends in .gz "
    "(default benchmarks/results/robustness-<task>.jsonl.gz)",
  )
  ap.add_argument(
    "--append",
    action="store_true",
    help="add these methods' cells to --out (replacing the same methods' cells)",
  )
  ap.add_argument("--images", default=str(ROOT / "docs" / "images"))
  ap.add_argument(
    "--render",
    metavar="JSONL",
    help="only print the tables and draw the figures of an earlier run's JSON lines",
  )
  args = ap.parse_args(argv)
  if args.render:
    recs = read_jsonl(Path(args.render))
    for r in recs:
      if "grid_wall_s" in r or "budget" in r:
        print(json.dumps(r))
    rows = [r for r in recs if "alpha0" in r]
    _render(rows, rows[0]["task"], Path(args.images))
    return

  budget = dict(BUDGETS[args.task]["full" if args.full else "cpu"])
  for k in ("steps", "meta_batch", "eval_tasks", "val_tasks"):
    if getattr(args, k) is not None:
      budget[k] = getattr(args, k)
  budget["log_every"] = min(budget["log_every"], budget["steps"])
  if budget["steps"] % budget["log_every"]:
    ap.error(f"--steps must be a multiple of {budget['log_every']}")
  out = Path(args.out or ROOT / "benchmarks" / "results" / f"robustness-{args.task}.jsonl.gz")
  out.parent.mkdir(parents=True, exist_ok=True)
  lines = []
  if args.append and out.exists():
    lines = read_jsonl(out)
    lines = [l for l in lines if l.get("method") not in args.methods]
  head = {
    "task": args.task,
    "methods": args.methods,
    "budget": budget,
    "full": args.full,
    "seeds": args.seeds,
    "date": time.strftime("%Y-%m-%d"),
    "versions": versions(),
  }
  lines.append(head)
  print(json.dumps(head), flush=True)
  for method in args.methods:
    r, wall, compile_s, _ = grid(
      args.task, method, budget, args.alphas, args.betas, args.seeds, args.cells_per_call
    )
    timing = {
      "method": method,
      "cells": len(r),
      "cells_per_call": args.cells_per_call,
      "grid_wall_s": wall,
      "grid_compile_s": compile_s,
    }
    print(json.dumps(timing), flush=True)
    lines += [timing] + r
    write_jsonl(out, lines)  # after every method: a stopped run keeps what it finished
  print(f"wrote {out}\n")
  _render([l for l in lines if "alpha0" in l], args.task, Path(args.images))


if __name__ == "__main__":
  main()
