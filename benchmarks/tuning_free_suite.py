"""The tuning-free suite: task families x budgets x untuned alpha0, amaml's default against
MAML's best cell and the candidate defaults.

    python benchmarks/tuning_free_suite.py --families linear sinusoid      # some families
    python benchmarks/tuning_free_suite.py --methods adam+search maml dog+search  # some methods
    python benchmarks/tuning_free_suite.py --render old.jsonl.gz new.jsonl.gz  # new replaces old

A *family* is a task distribution with its model, inner steps and two budgets: ``short``
meta steps and ``long`` (5-10x more). Each (family, method) trains every cell (alpha0 x
seed) as ONE vmapped program (``robustness.make_chunk``: ``lax.scan`` over steps of
``vmap`` over cells), scores the cells at ``short`` steps, trains on to ``long`` and
scores them again (the short budget is the first ``short`` steps of the long run: no
method here has a schedule tied to the run's length). Every cell of every method is scored
the same way: amaml's test-time adaptation (1-10 inner steps and a multiple of alpha chosen
on meta-validation tasks, each task keeping its iterate with the lowest support loss:
:mod:`amaml.adaptation`), then the query metric on meta-test tasks (accuracy in %, or MSE
for regression). Each row also holds ``test_coarse`` (the selection before the guard, on
the grid 2, 1, 1/2, 1/4, 1/8) and ``test_fixed`` (MAML's 10 steps at alpha);
``--render ... --field test_coarse`` tabulates those.

Methods (``METHODS``): ``maml`` (Adam at 1e-3, alpha fixed at alpha0), amaml's default
(:data:`DEFAULT`, ``adam+search``: Alpha MAML with Adam at optax's 1e-3 outside, beta fixed,
alpha0 replaced by :func:`amaml.rates.search_alpha`'s choice on the first meta-batch, the
same from every alpha0), and the other
candidates: the same Alpha MAML with another outer optimizer (D-Adaptation, ``dadapt``,
also with a larger initial estimate; Prodigy, schedule-free AdamW, DoG, Mechanic around
Adam, Adam with beta by hypergradient over a discounted horizon) or another rule for the
per-tensor alpha (one alpha, ``adam-scalar``; each alpha kept within 100x or 10x of the
largest, ``adam-ratio100``, ``adam-ratio10``), with or without the search (the suffix
``+search``).

Writes ``benchmarks/results/tuning-free-suite.jsonl.gz`` (one line per cell and budget:
its scores, alpha's mean along the run and each tensor's final alpha), heat maps
``docs/images/tuning-free-suite.png`` and prints the tables of BENCHMARKS.md: one per
family with the column "default's worst start minus MAML's best", and a summary.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import amaml
from amaml.data import load_omniglot, sample_tasks
from amaml.env import versions

sys.path.insert(0, str(Path(__file__).resolve().parent))
import robustness  # noqa: E402  (the vmapped grid machinery)

ROOT = Path(__file__).resolve().parents[1]
ALPHAS = (0.01, 0.1, 1.0, 4.0)
OUT = ROOT / "benchmarks" / "results" / "tuning-free-suite.jsonl.gz"


# ----------------------------------------------------------------------------- families
class Family(NamedTuple):
  """A task family: ``setup(seed) -> (params, loss_fn)``, a sampler and its budgets."""

  setup: Callable  # seed -> (initial params, loss_fn)
  sample: Callable  # (key, split data, num_tasks) -> TaskBatch
  data: Callable  # () -> {"train", "val", "test"} split data (None for generated tasks)
  inner_steps: int
  meta_batch: int
  short: int
  long: int
  seeds: int
  eval_tasks: int
  val_tasks: int
  note: str


def _mlp_setup(hidden, out, in_shape, loss):
  model = amaml.models.MLP(hidden=hidden, out=out)

  def apply(p, x):
    return model.apply({"params": p}, x.reshape(x.shape[0], -1))

  def setup(seed):
    params = model.init(jax.random.key(seed), jnp.zeros((1, math.prod(in_shape))))["params"]
    return params, loss(apply)

  return setup


def _sinusoid_hard(key, n, shots=20, queries=20):
  """y = A sin(w x - phase): A ~ U[1, 10], w ~ U[0.5, 1.5], phase ~ U[0, 2 pi],
  x ~ U[-7.5, 7.5]; ``shots`` support and ``queries`` query points."""
  ka, kw, kp, kx = jax.random.split(key, 4)
  amp = jax.random.uniform(ka, (n, 1, 1), minval=1.0, maxval=10.0)
  freq = jax.random.uniform(kw, (n, 1, 1), minval=0.5, maxval=1.5)
  phase = jax.random.uniform(kp, (n, 1, 1), maxval=2 * jnp.pi)
  x = jax.random.uniform(kx, (n, shots + queries, 1), minval=-7.5, maxval=7.5)
  y = amp * jnp.sin(freq * x - phase)
  return amaml.TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


LINEAR_DIM, LINEAR_SHOTS = 10, 10
#: The best inner rate of the linear family in closed form. One step on the support MSE
#: ``(1/K)|X theta - y|^2`` from any theta gives ``theta' - w = (I - c X^T X)(theta - w)``
#: with ``c = 2 alpha / K``; with x ~ N(0, I_d), E[X^T X] = K I and E[(X^T X)^2] =
#: K (K + d + 1) I (Wishart), so the expected query MSE ``|theta' - w|^2`` is
#: ``(1 - 2cK + c^2 K (K + d + 1)) |theta - w|^2``, least at c = 1 / (K + d + 1).
LINEAR_BEST_ALPHA = LINEAR_SHOTS / (2 * (LINEAR_SHOTS + LINEAR_DIM + 1))


def _linear_tasks(key, n, shots=LINEAR_SHOTS, queries=LINEAR_SHOTS, dim=LINEAR_DIM):
  """y = x . w, x ~ N(0, I_d), w ~ N(w_bar, I_d) with w_bar ~ N(0, I_d) fixed."""
  w_bar = jax.random.normal(jax.random.key(12345), (dim, 1))
  kw, kx = jax.random.split(key)
  w = w_bar + jax.random.normal(kw, (n, dim, 1))
  x = jax.random.normal(kx, (n, shots + queries, dim))
  y = x @ w
  return amaml.TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def _linear_setup(seed):
  params = {"w": 0.1 * jax.random.normal(jax.random.key(seed), (LINEAR_DIM, 1))}
  return params, amaml.losses.mse(lambda p, x: x @ p["w"])


def _omniglot_data(image_size=28, num_train=None):
  @functools.cache  # once per family, not once per method
  def load():
    s = load_omniglot("maml", image_size=image_size, num_train=num_train)
    return {k: jnp.asarray(getattr(s, k).images) for k in ("train", "val", "test")}

  return load


def _episodes(ways, shots, queries=5):
  return lambda k, images, n: sample_tasks(k, images, ways, shots, queries, n)


def _conv4_setup(ways, hidden, image_size=28):
  model = amaml.models.Conv4(num_classes=ways, hidden=hidden)
  loss = amaml.losses.cross_entropy(lambda p, x: model.apply({"params": p}, x))

  def setup(seed):
    x = jnp.zeros((1, image_size, image_size, 1))
    return model.init(jax.random.key(seed), x)["params"], loss

  return setup


_generated = lambda: {"train": None, "val": None, "test": None}
_ce = amaml.losses.cross_entropy
FAMILIES: dict[str, Family] = {
  "linear": Family(
    _linear_setup,
    lambda k, _, n: _linear_tasks(k, n),
    _generated,
    1,
    25,
    200,
    2000,
    3,
    600,
    200,
    f"y = x.w, d={LINEAR_DIM}, {LINEAR_SHOTS} shots, "
    f"1 step; best alpha {LINEAR_BEST_ALPHA:.3f} in closed form",
  ),
  "sinusoid": Family(
    _mlp_setup((40, 40), 1, (1,), amaml.losses.mse),
    lambda k, _, n: amaml.sinusoid_tasks(k, n),
    _generated,
    1,
    25,
    500,
    3000,
    3,
    600,
    200,
    "MAML's sinusoid, MLP 1-40-40-1, 10 shots, 1 step",
  ),
  "sinusoid-hard": Family(
    _mlp_setup((40, 40), 1, (1,), amaml.losses.mse),
    lambda k, _, n: _sinusoid_hard(k, n),
    _generated,
    5,
    25,
    300,
    1500,
    3,
    600,
    200,
    "A in [1, 10], freq in [0.5, 1.5], phase in [0, 2pi], x in [-7.5, 7.5], 20 shots, 5 steps",
  ),
  "omniglot-mlp": Family(
    _mlp_setup((256, 128, 64, 64), 5, (28, 28, 1), _ce),
    _episodes(5, 1),
    _omniglot_data(),
    1,
    16,
    100,
    500,
    3,
    300,
    100,
    "5w1s, MAML's non-conv net 256-128-64-64 (no batch norm), 1 step",
  ),
  "omniglot-small": Family(
    _mlp_setup((128, 64), 5, (14, 14, 1), _ce),
    _episodes(5, 1),
    _omniglot_data(14, num_train=30),
    1,
    16,
    300,
    1500,
    3,
    300,
    100,
    "5w1s from 30 training characters (120 classes) at 14x14, "
    "MLP 128-64, 1 step: meta-overfits early",
  ),
  "omniglot-5w1s": Family(
    _conv4_setup(5, 32),
    _episodes(5, 1),
    _omniglot_data(),
    1,
    4,
    200,
    1000,
    1,
    200,
    100,
    "Conv4-32, 4 tasks a step, 1 step (reduced CPU "
    "budget: the named config has 64 filters and 32 tasks)",
  ),
  "omniglot-5w5s": Family(
    _conv4_setup(5, 32),
    _episodes(5, 5),
    _omniglot_data(),
    1,
    4,
    150,
    750,
    1,
    200,
    100,
    "Conv4-32, 4 tasks a step, 1 step (reduced CPU budget)",
  ),
  "omniglot-20w1s": Family(
    _conv4_setup(20, 32),
    _episodes(20, 1, 3),
    _omniglot_data(),
    5,
    2,
    60,
    300,
    1,
    100,
    50,
    "Conv4-32, 2 tasks a step, 5 steps, 3 queries per class (reduced CPU budget: no GPU)",
  ),
}


# ----------------------------------------------------------------------------- methods
def _outer(make_opt):
  return lambda loss_fn, k: amaml.alpha_maml(loss_fn, inner_steps=k, optimizer=make_opt())


#: A method name with this suffix starts from :func:`amaml.rates.search_alpha` on its
#: first meta-batch (e.g. ``adam+search``).
SEARCH = "+search"
METHODS: dict[str, Callable] = {
  "maml": lambda loss_fn, k: amaml.maml(loss_fn, inner_steps=k),
  "dadapt": _outer(optax.contrib.dadapt_adamw),
  "adam": _outer(lambda: optax.adam(1e-3)),
  "prodigy": _outer(optax.contrib.prodigy),
  "schedule-free": _outer(optax.contrib.schedule_free_adamw),
  "dog": _outer(optax.contrib.dog),
  "mechanic": _outer(lambda: optax.contrib.mechanize(optax.adam(1.0))),
  "dadapt-d0=1e-4": _outer(lambda: optax.contrib.dadapt_adamw(estim_lr0=1e-4)),
  "dadapt-d0=1e-3": _outer(lambda: optax.contrib.dadapt_adamw(estim_lr0=1e-3)),
  "prodigy-d0=1e-3": _outer(lambda: optax.contrib.prodigy(estim_lr0=1e-3)),
  "adam-hd-discount": lambda loss_fn, k: amaml.alpha_maml(
    loss_fn, inner_steps=k, optimizer=optax.adam, discount=0.9
  ),
  "adam-scalar": lambda loss_fn, k: amaml.alpha_maml(
    loss_fn, inner_steps=k, alpha_granularity="scalar"
  ),
  "adam-ratio100": lambda loss_fn, k: amaml.alpha_maml(loss_fn, inner_steps=k, alpha_max_ratio=100),
  "adam-ratio10": lambda loss_fn, k: amaml.alpha_maml(loss_fn, inner_steps=k, alpha_max_ratio=10),
}
LABELS = {
  "maml": "MAML (Adam 1e-3, alpha fixed)",
  "dadapt": "Alpha MAML + D-Adaptation",
  "adam": "Alpha MAML + Adam 1e-3 (beta fixed)",
  "prodigy": "Alpha MAML + Prodigy",
  "schedule-free": "Alpha MAML + schedule-free AdamW (2.5e-3)",
  "dog": "Alpha MAML + DoG",
  "mechanic": "Alpha MAML + Mechanic(Adam)",
  "dadapt-d0=1e-4": "Alpha MAML + D-Adaptation, d0 = 1e-4",
  "dadapt-d0=1e-3": "Alpha MAML + D-Adaptation, d0 = 1e-3",
  "prodigy-d0=1e-3": "Alpha MAML + Prodigy, d0 = 1e-3",
  "adam-hd-discount": "Alpha MAML + Adam-HD, discount 0.9",
  "adam-scalar": "Alpha MAML + Adam 1e-3 (beta fixed), one alpha",
  "adam-ratio100": "Alpha MAML + Adam 1e-3 (beta fixed), each alpha within 100x of the largest",
  "adam-ratio10": "Alpha MAML + Adam 1e-3 (beta fixed), each alpha within 10x of the largest",
}
for _m in [m for m in METHODS if m != "maml"]:  # every candidate, also searched
  METHODS[_m + SEARCH] = METHODS[_m]
  LABELS[_m + SEARCH] = LABELS[_m] + ", alpha0 searched on the first batch"
#: amaml's default (``amaml.alpha_maml`` and ``amaml train``'s alpha0 search).
DEFAULT = "adam" + SEARCH
LABELS[DEFAULT] += " (amaml default)"


# ----------------------------------------------------------------------------- running
def experiment(family: Family, method: str, data: dict):
  """What ``robustness``' grid functions need: learner, sampler, data, meta-batch."""
  params, loss_fn = family.setup(0)
  learner = METHODS[method](loss_fn, family.inner_steps)
  return SimpleNamespace(
    config=SimpleNamespace(meta_batch=family.meta_batch),
    learner=learner,
    params=params,
    data=data,
    sample=family.sample,
  )


def init_cells(family: Family, exp, cells):
  """Stacked states, one per (alpha0, seed): the seed's weights, every alpha at alpha0."""
  states = []
  for a0, seed in cells:
    st = exp.learner.init(family.setup(seed)[0])
    states.append(st._replace(alpha=jax.tree.map(lambda x: jnp.full_like(x, a0), st.alpha)))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def search_cells(exp, state, images, ids):
  """Every cell's alpha after ``amaml train``'s alpha0 search (:func:`amaml.train.alpha_search`)
  on the first meta-batch of its seed."""
  return amaml.train.alpha_search(exp, vmapped=True)(state, images, ids)


def eval_params(state):
  """The parameters to evaluate: schedule-free's averaged sequence, else ``state.params``."""
  if isinstance(state.opt_state, optax.contrib.ScheduleFreeState):
    return state._replace(
      params=jax.vmap(optax.contrib.schedule_free_eval_params)(state.opt_state, state.params)
    )
  return state


def _val_scores(ev) -> np.ndarray:
  """Per cell, the validation score of the adaptation ``ev`` chose (higher is better)."""
  return np.array([e["val"] for e in ev])


def alpha_tensors(alpha, j: int) -> dict:
  """Cell ``j``'s alpha (stacked over cells) by tensor: ``{"Dense_0/kernel": 0.5, ...}`` (a
  tensor's mean where alpha is per parameter; ``{"": a}`` for one alpha).

  >>> alpha_tensors({"Dense_0": {"bias": np.array([1.0, 2.0])}}, 1)
  {'Dense_0/bias': 2.0}
  """
  return {path: float(np.mean(np.asarray(a)[j])) for path, a in amaml.inner._paths(alpha)}


def _row(name, method, budget, until, cell, e, best, alpha_traj, j, t0, alpha) -> dict:
  """One result row: cell ``j``'s scores ``e`` at ``until`` steps, and ``best``, its scores
  at the validation point that did best so far (``(step, scores)``); ``alpha``: every
  cell's, stacked."""
  scale = 100.0 if "omniglot" in name else 1.0
  mean, ci = amaml.mean_confidence_interval(e["selected"])
  return {
    "family": name,
    "method": method,
    "budget": budget,
    "steps": until,
    "alpha0": cell[0],
    "seed": cell[1],
    "test": mean * scale,
    "test_ci": ci * scale,
    "test_fixed": float(np.mean(e["fixed"])) * scale,
    "test_coarse": float(np.mean(e["selected_coarse"])) * scale,
    "test_best": amaml.mean_confidence_interval(best[1]["selected"])[0] * scale,
    "best_step": best[0],
    "selected_scale": e["selected_scale"],
    "selected_steps": e["selected_steps"],
    "coarse_scale": e["coarse_scale"],
    "coarse_steps": e["coarse_steps"],
    "final_alpha": float(alpha_traj[-1][j]),
    "alpha_traj": [float(a[j]) for a in alpha_traj],
    "final_alpha_tensors": alpha_tensors(alpha, j),
    "wall_s": time.perf_counter() - t0,
  }


def run_family(
  name: str, method: str, alphas=ALPHAS, budgets=None, seeds=None, log_every=None, val_points=0
):
  """Trains and scores one method's cells on family ``name``; returns result rows. With
  ``val_points`` K, the cells are also scored at K evenly spaced steps of the long run, and
  each row's ``test_best`` is the test score at the point (up to its budget) that did best
  on the validation tasks: the parameters a user who keeps the best validation checkpoint
  would test."""
  fam = FAMILIES[name]
  short, long_ = budgets or (fam.short, fam.long)
  seeds = fam.seeds if seeds is None else seeds
  log_every = log_every or math.gcd(short, long_, 100)
  data = fam.data()
  exp = experiment(fam, method, data)
  cells = [(a0, s) for a0 in alphas for s in range(seeds)]
  key = jax.random.key(2026)
  test = fam.sample(jax.random.fold_in(key, 2), data["test"], fam.eval_tasks)
  val = fam.sample(jax.random.fold_in(key, 1), data["val"], fam.val_tasks)
  state = init_cells(fam, exp, cells)
  ids = jnp.asarray([s for _, s in cells], jnp.int32)
  if method.endswith(SEARCH):
    state = search_cells(exp, state, data["train"], ids)
  chunk = robustness.make_chunk(exp, log_every)
  every = max(log_every, long_ // val_points // log_every * log_every) if val_points else long_
  # one budget (--budgets S S): short, unless it is the family's long budget
  one = {short: budget_of(name, short, "short")}
  budgets_at = {long_: "long", short: "short"} if short != long_ else one
  rows, step, t0, alpha_traj = [], 0, time.perf_counter(), []
  best = [(-np.inf, None)] * len(cells)  # per cell: (validation score, (step, scores))
  while step < long_:
    state, m = chunk(state, data["train"], ids, jnp.int32(step))
    alpha_traj.append(np.asarray(m["alpha"][-1]))
    step += log_every
    if step % every and step not in budgets_at:
      continue
    ev = robustness.evaluate_cells(
      exp, eval_params(state), val, test, 64 if "omniglot" in name else 1 << 20
    )
    if val_points:
      scores = _val_scores(ev)
      best = [b if b[0] >= v else (v, (step, e)) for b, v, e in zip(best, scores, ev)]
    for j, cell in enumerate(cells):
      if step in budgets_at:
        b = best[j][1] or (step, ev[j])
        at = budgets_at[step]
        rows.append(_row(name, method, at, step, cell, ev[j], b, alpha_traj, j, t0, state.alpha))
  return rows


def budget_of(family: str, steps: int, recorded: str) -> str:
  """A run of the family's long budget alone (``--budgets L L``) is its long budget; rows
  recorded before this rule name it ``short``."""
  fam = FAMILIES.get(family)
  return "long" if fam and steps == fam.long != fam.short else recorded


# ----------------------------------------------------------------------------- tables
def higher_is_better(family: str) -> bool:
  return family.startswith("omniglot")


def merge(lines: list[dict], new: list[dict]) -> list[dict]:
  """``lines`` without the rows of any (family, method) that ``new`` has rows of, then
  ``new``: the newer result of a (family, method) replaces the older (header lines stay)."""
  key = lambda l: (l.get("family"), l.get("method"))
  replaced = {key(l) for l in new if "family" in l}
  return [l for l in lines if "family" not in l or key(l) not in replaced] + new


def cell_means(rows) -> dict:
  """``(family, budget, method, alpha0) -> mean over seeds`` (non-finite stays nan)."""
  by: dict = {}
  for r in rows:
    by.setdefault((r["family"], r["budget"], r["method"], r["alpha0"]), []).append(r["test"])
  return {k: float(np.mean(v)) if np.all(np.isfinite(v)) else float("nan") for k, v in by.items()}


def worst_best(values, higher: bool) -> tuple[float, float]:
  """The worst and best of a method's cells (a diverged cell is the worst)."""
  v = np.asarray(values, np.float64)
  if not np.all(np.isfinite(v)):
    worst = -np.inf if higher else np.inf
  else:
    worst = v.min() if higher else v.max()
  finite = v[np.isfinite(v)]
  best = (finite.max() if higher else finite.min()) if finite.size else float("nan")
  return float(worst), float(best)


def gap(worst: float, maml_best: float, higher: bool) -> float:
  """The default's worst start against MAML's best: points (accuracy, ``worst - best``,
  >= -1 meets the target) or a ratio (MSE, ``worst / best``, <= 1.1 meets it)."""
  return worst - maml_best if higher else worst / maml_best


def meets(g: float, higher: bool) -> bool:
  return g >= -1.0 if higher else g <= 1.1


def ran(means, family: str, budget: str, method: str, alphas) -> list:
  """The α0 of ``alphas`` at which ``method`` has cells on this family and budget (a method
  whose start does not depend on α0, such as the default, may have run from one α0 only)."""
  return [a for a in alphas if (family, budget, method, a) in means]


def _only(starts, alphas) -> str:
  """The note ``" (a0 = 1 only)"`` where a method ran from fewer starts than the table's."""
  return "" if len(starts) == len(alphas) else f" (a0 = {', '.join(f'{a:g}' for a in starts)} only)"


def family_table(rows, family: str, budget: str, alphas) -> str:
  """One row per method: its cells (mean over seeds), worst, best, spread, and the worst
  start against MAML's best cell."""
  means, higher = cell_means(rows), higher_is_better(family)
  methods = [m for m in METHODS if ran(means, family, budget, m, alphas)]
  maml = (
    worst_best([means[(family, budget, "maml", a)] for a in alphas], higher)[1]
    if ran(means, family, budget, "maml", alphas) == list(alphas)
    else float("nan")
  )
  f = (lambda v: f"{v:.1f}") if higher else (lambda v: f"{v:.3g}")
  fmt = lambda v: "diverged" if not np.isfinite(v) else f(v)
  unit = "points" if higher else "ratio"
  lines = [
    "| method | "
    + " | ".join(f"a0={a:g}" for a in alphas)
    + f" | worst | best | spread | worst vs MAML's best ({unit}) |",
    "| --- |" + " --- |" * (len(alphas) + 4),
  ]
  for m in methods:
    starts = ran(means, family, budget, m, alphas)
    worst, best = worst_best([means[(family, budget, m, a)] for a in starts], higher)
    spread = abs(best - worst) if higher else worst / best
    g = gap(worst, maml, higher)
    mark = " (met)" if meets(g, higher) else ""
    name = f"**{LABELS[m]}**" if m == DEFAULT else LABELS[m]
    g_txt = "-" if m == "maml" else (f"{g:+.1f}{mark}" if higher else f"{g:.2f}x{mark}")
    g_txt = "MAML not run" if np.isnan(maml) else g_txt + _only(starts, alphas)
    cells = [fmt(means[(family, budget, m, a)]) if a in starts else "" for a in alphas]
    lines.append(
      f"| {name} | "
      + " | ".join(cells)
      + f" | {fmt(worst)} | {fmt(best)} | {fmt(spread)} | {g_txt} |"
    )
  return "\n".join(lines)


def summary(rows, alphas, method: str = DEFAULT) -> str:
  """One line per (family, budget) for ``method``, and how many meet the target."""
  means = cell_means(rows)
  lines = [
    f"| family | budget | {LABELS[method]}: worst | MAML's best | worst vs best | met |",
    "| --- | --- | --- | --- | --- | --- |",
  ]
  met = total = 0
  for fam in FAMILIES:
    for budget in ("short", "long"):
      starts = ran(means, fam, budget, method, alphas)
      if not starts or ran(means, fam, budget, "maml", alphas) != list(alphas):
        continue
      higher = higher_is_better(fam)
      worst = worst_best([means[(fam, budget, method, a)] for a in starts], higher)[0]
      best = worst_best([means[(fam, budget, "maml", a)] for a in alphas], higher)[1]
      g = gap(worst, best, higher)
      total += 1
      met += meets(g, higher)
      g_txt = (f"{g:+.1f}" if higher else f"{g:.2f}x") + _only(starts, alphas)
      lines.append(
        f"| {fam} | {budget} | {worst:.3g} | {best:.3g} | {g_txt} | "
        f"{'yes' if meets(g, higher) else 'no'} |"
      )
  return "\n".join(lines) + f"\n\n{LABELS[method]}: the target is met on {met} of {total}."


def overview(rows, alphas) -> str:
  """One row per (family, budget): MAML's best cell, then every other method's worst start
  against it (points, or a ratio for MSE); a method not run there is blank."""
  means = cell_means(rows)
  methods = [m for m in METHODS if m != "maml" and any(r["method"] == m for r in rows)]
  lines = [
    "| family | budget | MAML's best | " + " | ".join(methods) + " |",
    "| --- | --- |" + " --- |" * (len(methods) + 1),
  ]
  for fam in FAMILIES:
    for budget in ("short", "long"):
      if ran(means, fam, budget, "maml", alphas) != list(alphas):
        continue
      higher = higher_is_better(fam)
      best = worst_best([means[(fam, budget, "maml", a)] for a in alphas], higher)[1]
      cells = []
      for m in methods:
        starts = ran(means, fam, budget, m, alphas)
        if not starts:
          cells.append("")
          continue
        g = gap(worst_best([means[(fam, budget, m, a)] for a in starts], higher)[0], best, higher)
        txt = (
          "diverged" if not np.isfinite(g) or g > 1e6 else (f"{g:+.1f}" if higher else f"{g:.2f}x")
        )
        cell = f"**{txt}**" if np.isfinite(g) and meets(g, higher) else txt
        cells.append(cell + _only(starts, alphas))
      lines.append(f"| {fam} | {budget} | {best:.3g} | " + " | ".join(cells) + " |")
  return (
    "Worst start of each method against MAML's best cell (bold: the target is met, "
    "within 1 point or 1.1x):\n\n" + "\n".join(lines)
  )


def report(rows) -> str:
  alphas = sorted({r["alpha0"] for r in rows})
  parts = [overview(rows, alphas)]
  for fam in FAMILIES:
    for budget in ("short", "long"):
      if any(r["family"] == fam and r["budget"] == budget for r in rows):
        steps = next(r["steps"] for r in rows if r["family"] == fam and r["budget"] == budget)
        metric = "accuracy (%)" if higher_is_better(fam) else "MSE"
        parts.append(
          f"**{fam}, {budget} ({steps} steps)**, meta-test {metric}: "
          f"{FAMILIES[fam].note}\n\n" + family_table(rows, fam, budget, alphas)
        )
  methods = sorted({r["method"] for r in rows} - {"maml"}, key=list(METHODS).index)
  parts += [summary(rows, alphas, m) for m in methods]
  return "\n\n".join(parts)


def plot(rows, out: Path) -> Path:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  means = cell_means(rows)
  alphas = sorted({r["alpha0"] for r in rows})
  fams = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
  methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
  fig, axes = plt.subplots(
    2,
    len(fams),
    figsize=(3.2 * len(fams), 2 + 0.5 * len(methods) * 2),
    squeeze=False,
    constrained_layout=True,
  )
  for i, budget in enumerate(("short", "long")):
    for j, fam in enumerate(fams):
      ax = axes[i, j]
      grid = np.array([[means.get((fam, budget, m, a), np.nan) for a in alphas] for m in methods])
      higher = higher_is_better(fam)
      shown = grid if higher else np.log10(grid)
      finite = shown[np.isfinite(shown)]
      lo, hi = (finite.min(), finite.max()) if finite.size else (0, 1)
      ax.imshow(
        shown,
        cmap="viridis" if higher else "viridis_r",
        aspect="auto",
        vmin=lo if hi > lo else lo - 1,  # one value alone: the middle colour, not the worst
        vmax=hi if hi > lo else hi + 1,
      )
      for (y, x), v in np.ndenumerate(grid):
        has = (fam, budget, methods[y], alphas[x]) in means
        txt = (
          "" if not has else "div." if not np.isfinite(v) else f"{v:.1f}" if higher else f"{v:.2g}"
        )
        ax.text(
          x, y, txt, ha="center", va="center", fontsize=6, color="w" if np.isfinite(v) else "k"
        )
      ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas], fontsize=7)
      ax.set_yticks(range(len(methods)), [m if j == 0 else "" for m in methods], fontsize=7)
      ax.set_title(f"{fam}, {budget}", fontsize=8)
      ax.set_xlabel("alpha0", fontsize=7)
  fig.suptitle("Tuning-free suite: meta-test accuracy (%) or MSE, mean over seeds")
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


# ----------------------------------------------------------------------------- main
def main(argv=None):
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--families", nargs="+", choices=tuple(FAMILIES), default=list(FAMILIES))
  ap.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS))
  ap.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
  ap.add_argument("--seeds", type=int, help="seeds per cell (default: the family's)")
  ap.add_argument(
    "--budgets",
    type=int,
    nargs=2,
    metavar=("SHORT", "LONG"),
    help="meta steps of the two budgets (default: the family's; SHORT = LONG runs one "
    "budget, recorded as short)",
  )
  ap.add_argument(
    "--out",
    default=str(OUT),
    help="JSON lines; rows of the same (family, method) already there are replaced",
  )
  ap.add_argument("--images", default=str(ROOT / "docs" / "images"))
  ap.add_argument(
    "--render",
    metavar="JSONL",
    nargs="+",
    help="only print the tables and draw the heat maps of earlier runs (several files: "
    "their rows together, a later file's rows of a (family, method) replacing an earlier's)",
  )
  ap.add_argument(
    "--field",
    default="test",
    choices=("test", "test_coarse", "test_fixed", "test_best"),
    help="the score to tabulate: amaml's test-time adaptation (test), the same "
    "without the support-loss guard on the coarse grid 2..1/8 (test_coarse), "
    "or MAML's fixed 10 steps at alpha (test_fixed), or the test at the validation "
    "point that did best (test_best, with --val_points)",
  )
  ap.add_argument(
    "--val_points",
    type=int,
    default=0,
    help="also score every cell at this many evenly spaced steps of the long run and "
    "record, as test_best, the test score where validation did best (keeping the best "
    "validation checkpoint, as users do against meta-overfitting)",
  )
  args = ap.parse_args(argv)
  out = Path(args.out)
  if args.render:
    lines = []
    for path in args.render:  # a later file's (family, method) replaces an earlier one's
      lines = merge(lines, robustness.read_jsonl(Path(path)))
  else:
    lines = robustness.read_jsonl(out) if out.exists() else []
    out.parent.mkdir(parents=True, exist_ok=True)
    head = {
      "suite": True,
      "date": time.strftime("%Y-%m-%d"),
      "versions": versions(),
      "argv": sys.argv[1:] if argv is None else argv,
    }
    lines.append(head)
    print(json.dumps(head), flush=True)
    for fam in args.families:
      for method in args.methods:
        rows = run_family(
          fam, method, args.alphas, args.budgets, args.seeds, val_points=args.val_points
        )
        lines = merge(lines, rows)
        robustness.write_jsonl(out, lines)  # after every method: a stopped run keeps the rest
        print(json.dumps({k: rows[-1][k] for k in ("family", "method", "wall_s")}), flush=True)
  rows = [
    {**l, "test": l[args.field], "budget": budget_of(l["family"], l["steps"], l["budget"])}
    for l in lines
    if "alpha0" in l and args.field in l
  ]
  print(report(rows))
  try:
    name = "tuning-free-suite" + ("" if args.field == "test" else f"-{args.field}")
    print("wrote", plot(rows, Path(args.images) / f"{name}.png"))
  except ImportError:
    print("matplotlib not installed: no heat maps (pip install amaml[plot])")


if __name__ == "__main__":
  main()
