# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Sensitivity to the initial rates: MAML vs Alpha MAML
#
# How much does the result depend on the initial inner rate `alpha0` and, where there is
# one, the initial outer rate `beta0`? We train sinusoid regression from a grid of starting
# rates with four methods and compare the held-out error after adaptation:
#
# - **MAML** (`amaml.maml`): `alpha` stays fixed, and so does the rate `beta` of its outer
#   optimizer, Adam;
# - **the paper's rule** (`amaml.alpha_maml_paper`): `alpha` and Adam's `beta` adapt by
#   additive hypergradient steps `rate -= kappa * h`, with the HD paper's `kappa` (1e-3 for
#   `alpha`, 1e-7 for `beta`), no backtracking;
# - **amaml + Adam-HD** (`amaml.alpha_maml(loss_fn, optimizer=optax.adam)`): amaml's rule
#   for both rates (one `alpha` per parameter tensor, each from `alpha0`): the
#   `"normalized"` rule (Adam-style normalized steps on the log rates,
#   at most about 5% per step, the same hypergradient rate `amaml.rates.DEFAULT_HYPER_LR`
#   for `alpha` and `beta` on every problem) and backtracking (a step whose adaptation more
#   than doubles the query loss of not adapting only halves `alpha`);
# - **amaml's default** (`amaml.alpha_maml(loss_fn)`): the same for `alpha`, but the outer
#   optimizer is Adam with `beta` held at its library value 1e-3. It has no `beta0` to
#   choose, so this method runs over `alpha0` only.
#
# The first three train on the `alpha0 x beta0` grid, amaml's default on one column of
# `alpha0`. (`amaml train` also replaces `alpha0` by `amaml.search_alpha`'s choice on the
# first meta-batch before training with amaml's default, the same from every `alpha0`; this
# notebook leaves that out, to show what the hypergradient does from each `alpha0` on its
# own.)
# Every cell is an independent run with its own parameters, optimizer state and
# rates. A method's whole grid trains as **one** `jax.vmap`-ped, jitted computation:
# `learner.update` vmapped over cells, inside a `lax.scan` over meta steps.

# %%
import os

# AMAML_NOTEBOOK_FAST=1 (the tests) picks tiny sizes; the default gives nicer results.
FAST = os.environ.get("AMAML_NOTEBOOK_FAST", "0") == "1"

ALPHA0S = [0.001, 0.01, 0.1, 1.0] if not FAST else [0.01, 0.1, 1.0]
BETA0S = [1e-4, 1e-3, 1e-2, 3e-2] if not FAST else [1e-4, 1e-3, 1e-2]
ITERATIONS = 200 if FAST else 3000   # meta steps per cell
EVAL_TASKS = 100 if FAST else 600

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import amaml
from amaml.configs import get_config

cfg = get_config("sinusoid")   # the library's sinusoid settings (the problem, not the rates)
model = amaml.models.MLP(hidden=(cfg.hidden, cfg.hidden))
params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
loss_fn = amaml.losses.mse(lambda p, x: model.apply({"params": p}, x))
bounds = dict(alpha_min=cfg.alpha_min, alpha_max=cfg.alpha_max, beta_min=cfg.beta_min,
              beta_max=cfg.beta_max)
learners = {
    "MAML": amaml.maml(loss_fn, **bounds),
    "paper's rule": amaml.alpha_maml_paper(loss_fn, **bounds),
    "amaml + Adam-HD": amaml.alpha_maml(loss_fn, optimizer=optax.adam, **bounds),
    "amaml default": amaml.alpha_maml(loss_fn, **bounds),
}
# Which methods have a beta0: those whose outer optimizer is Adam inside amaml.hypergradient,
# except amaml's default, which holds Adam's beta at its library value.
HAS_BETA0 = {name: name != "amaml default"
             and isinstance(learner.init(params).opt_state, amaml.HypergradientState)
             for name, learner in learners.items()}
DEFAULT_BETA = float(amaml.current_learning_rate(learners["amaml default"].init(params).opt_state))
print(f"paper's rule: additive, kappa {amaml.rates.PAPER_ALPHA_LR:g} (alpha) and "
      f"{amaml.rates.PAPER_BETA_LR:g} (beta), no backtracking")
print(f"amaml + Adam-HD: {amaml.rates.DEFAULT_RULE} rule, hypergradient rate "
      f"{amaml.rates.DEFAULT_HYPER_LR} for alpha and beta, backtracking")
print(f"amaml default: {amaml.rates.DEFAULT_RULE} rule, hypergradient rate "
      f"{amaml.rates.DEFAULT_HYPER_LR} for alpha, backtracking; outer optimizer "
      f"Adam at beta = {DEFAULT_BETA:g}, fixed (no beta0)")
print(f"methods with a beta0: {[name for name, has in HAS_BETA0.items() if has]}")
print(f"{len(ALPHA0S)} alpha0 x {len(BETA0S)} beta0 cells ({len(ALPHA0S)} alpha0 cells without "
      f"beta0) x {ITERATIONS} steps, {cfg.meta_batch} tasks per step")

# %% [markdown]
# ## The grid as one computation
#
# `learner.init` gives one state. The initial rates live in it: `state.alpha`, and
# `state.opt_state.learning_rate`, Adam's rate `beta` inside `amaml.hypergradient` (for
# MAML and amaml's default its `hyper_lr` is 0, so `beta` stays where it starts). We stack
# one state per cell with those fields replaced, and vmap the meta step over the stack.
# amaml's default keeps its `beta` at 1e-3 in every cell, so its stack varies `alpha` only.
# All cells start from the same `theta` and see the same task batches, so they differ
# only in their starting rates.

# %%
def starting_rates(name):
  """The starting rates of `name`'s cells, each [alpha0s, beta0s] (beta0: None, one column)."""
  if HAS_BETA0[name]:
    return tuple(np.meshgrid(ALPHA0S, BETA0S, indexing="ij"))
  return np.asarray(ALPHA0S)[:, None], None

def initial_states(learner, a0, b0):
  state = learner.init(params)

  def cell(a, b=None):
    # every alpha of the state (one per parameter tensor in amaml's default) starts at a
    s = state._replace(alpha=jax.tree.map(lambda x: jnp.full_like(x, a), state.alpha))
    if b is not None:   # Adam's rate beta, in the amaml.hypergradient state
      hd = s.opt_state
      s = s._replace(opt_state=hd._replace(learning_rate=jnp.asarray(b, hd.learning_rate.dtype)))
    return s

  if b0 is None:
    return jax.vmap(cell)(jnp.asarray(a0.ravel()))
  return jax.vmap(cell)(jnp.asarray(a0.ravel()), jnp.asarray(b0.ravel()))

def train_grid(learner, a0, b0):
  def body(states, key):
    batch = amaml.sinusoid_tasks(key, cfg.meta_batch)       # shared by all cells
    states, m = jax.vmap(learner.update, in_axes=(0, None))(states, batch)
    return states, {k: m[k] for k in ("loss", "alpha", "beta")}

  run = jax.jit(lambda s, keys: jax.lax.scan(body, s, keys))
  keys = jax.random.split(jax.random.key(1), ITERATIONS)
  t0 = time.perf_counter()
  states, hist = jax.block_until_ready(run(initial_states(learner, a0, b0), keys))
  print(f"{a0.size} runs x {ITERATIONS} steps in {time.perf_counter() - t0:.1f} s "
        "(one call, compile included)")
  return states, jax.device_get(hist)

held_out = amaml.sinusoid_tasks(jax.random.key(777), EVAL_TASKS)
ZERO_MSE = float(jnp.mean(held_out.query_y ** 2))   # predicting zero everywhere: no learning

def test_mse(learner, states, shape, inner_steps=1):
  per_cell = jax.vmap(lambda s: learner.evaluate(s.params, s.alpha, held_out,
                                                 inner_steps=inner_steps)["loss"])(states)
  return np.asarray(per_cell.mean(axis=1)).reshape(shape)

results = {}
for name, learner in learners.items():
  a0, b0 = starting_rates(name)
  print(f"{name}:", end=" ")
  states, hist = train_grid(learner, a0, b0)
  results[name] = dict(states=states, hist=hist, shape=a0.shape,
                       mse=test_mse(learner, states, a0.shape))
print(f"predicting zero for every input scores {ZERO_MSE:.2f} on the held-out tasks")

# %% [markdown]
# ## Heat maps
#
# Held-out query MSE after one inner step (the training setting), at each run's own final
# `alpha`, on the same tasks for every cell. Same color scale for all methods, capped at
# 30; darker is better. Cells that score worse than predicting zero for every input (no
# learning at all; the value is printed above) are marked `*`. amaml's default has one
# column: its `beta` is 1e-3.

# %%
from matplotlib.colors import LogNorm

def fmt(v):
  return "NaN" if np.isnan(v) else "inf" if np.isinf(v) else f"{v:.2f}" if v < 10 else f"{v:.3g}"

finite = np.concatenate([r["mse"][np.isfinite(r["mse"])] for r in results.values()])
norm = LogNorm(vmin=finite.min(), vmax=30.0, clip=True)
widths = [r["mse"].shape[1] for r in results.values()]
fig, axes = plt.subplots(1, len(results), figsize=(1.3 * sum(widths) + 4, 4.8),
                         gridspec_kw={"width_ratios": widths}, constrained_layout=True)
for ax, (name, r) in zip(axes, results.items()):
  mse = np.where(np.isfinite(r["mse"]), r["mse"], norm.vmax)
  im = ax.imshow(mse, norm=norm, cmap="magma", origin="lower")
  for i, j in np.ndindex(mse.shape):
    v = r["mse"][i, j]
    ax.text(j, i, fmt(v) + ("*" if not v <= ZERO_MSE else ""), ha="center", va="center",
            fontsize=9, color="white" if norm(mse[i, j]) < 0.6 else "black")
  ax.set_yticks(range(len(ALPHA0S)), [f"{a:g}" for a in ALPHA0S])
  ax.set(ylabel="initial inner rate alpha0", title=name)
  if HAS_BETA0[name]:
    ax.set_xticks(range(len(BETA0S)), [f"{b:g}" for b in BETA0S])
    ax.set_xlabel("initial outer rate beta0 (Adam)")
  else:
    ax.set_xticks([0], [f"{DEFAULT_BETA:g}"])
    ax.set_xlabel("outer rate beta\n(Adam's library rate,\nheld fixed)")
fig.colorbar(im, ax=axes, shrink=0.9, extend="max",
             label="held-out query MSE after 1 inner step (log scale)")
plt.show()

print("held-out MSE after 1 step, by alpha0: best / worst over the beta0 columns "
      "(amaml default: its one run)")
print(f"{'alpha0':>8}" + "".join(f"{name:>20}" for name in results))
for i, a0 in enumerate(ALPHA0S):
  cells = []
  for r in results.values():
    row = np.where(np.isfinite(r["mse"][i]), r["mse"][i], np.inf)
    cells.append(fmt(row[0]) if row.size == 1 else f"{fmt(row.min())} / {fmt(row.max())}")
  print(f"{a0:8g}" + "".join(f"{c:>20}" for c in cells))
print()
for name, r in results.items():
  print(f"{name:16s}: {r['mse'].size:2d} runs, best {fmt(np.nanmin(r['mse']))}, "
        f"median {fmt(np.nanmedian(r['mse']))}, "
        f"worse than predicting zero: {int(np.sum(~(r['mse'] <= ZERO_MSE)))} of {r['mse'].size}")

# %% [markdown]
# What to look for (the printed tables give this run's numbers; a spread over `beta0` means
# the result depends on a rate that had to be chosen):
#
# - **MAML** has no way to correct a starting rate. Compare the cells near its tuned rates
#   for this problem (`alpha = 0.01`, with a `beta0` large enough to train in this budget)
#   with the rest of its grid: how many of its cells are marked `*`, or blow up?
# - **The paper's rule** takes additive steps `kappa * h`, and the size of `h` depends on the
#   problem: the HD paper's `kappa` may move a rate by far more, or far less, than its own
#   size in one step. The final rates below show whether `alpha` and `beta` stayed in a
#   sensible range or ran away (a step that makes the state non-finite is not taken: the
#   non-finite guard holds the last finite state).
# - **amaml + Adam-HD** bounds every rate step to about 5% and backtracks from an `alpha`
#   that hurts. Compare its worst cell with its best: the smaller the gap, the less the
#   starting rates matter. `beta` still starts where `beta0` puts it and needs at least
#   `log(10) / 0.05` ≈ 46 steps to move tenfold, so a short budget can still show `beta0`.
# - **amaml's default** has only `alpha0` to start from. Compare its spread over `alpha0`
#   with the others' spread over their whole grid, and its cells with each method's best
#   cell: the difference is what tuning the rates by hand would buy on this budget.
#
# Where did the Alpha MAML variants take the rates? Final `alpha` and `beta` per cell
# (amaml's default keeps `beta` at 1e-3), then the trajectories (`alpha` as a moving
# average over 50 steps: its per-step value is noisy).

# %%
for name in ("paper's rule", "amaml + Adam-HD", "amaml default"):
  r = results[name]
  # per cell, the mean of its rates (amaml's default has one per parameter tensor)
  final_alpha = np.mean([np.reshape(x, (x.shape[0], -1)).mean(axis=1)
                         for x in jax.tree.leaves(r["states"].alpha)], axis=0).reshape(r["shape"])
  final_beta = np.asarray(amaml.current_learning_rate(r["states"].opt_state)).reshape(r["shape"])
  columns = BETA0S if HAS_BETA0[name] else [f"{DEFAULT_BETA:g} (fixed)"]
  print(f"{name}: final alpha / final beta")
  print("alpha0 \\ beta0  " + "".join(f"{b:>20}" if isinstance(b, str) else f"{b:>20g}"
                                      for b in columns))
  for i, a0 in enumerate(ALPHA0S):
    print(f"{a0:<15g} " + "".join(f"{final_alpha[i, j]:>9.3g} / {final_beta[i, j]:<9.2e}"
                                   for j in range(len(columns))))
  print()

window = min(50, ITERATIONS // 4)
smooth = lambda x: np.convolve(x, np.ones(window) / window, mode="valid")
steps = np.arange(1, ITERATIONS + 1)
default, adam_hd = results["amaml default"], results["amaml + Adam-HD"]
fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
for i, a0 in enumerate(ALPHA0S):
  alpha = default["hist"]["alpha"][:, i]
  axes[0].plot(steps, alpha, color=f"C{i}", alpha=0.4, lw=0.5)
  axes[0].plot(steps[window - 1:], smooth(alpha), color=f"C{i}", label=f"alpha0 = {a0:g}")
axes[0].set(xscale="log", yscale="log", xlabel="meta step", ylabel="alpha",
            title="amaml default: alpha (faint: per step)")
colors = plt.cm.viridis(np.linspace(0, 0.9, len(BETA0S)))
for c in range(int(np.prod(adam_hd["shape"]))):
  i, j = np.unravel_index(c, adam_hd["shape"])
  axes[1].plot(steps, adam_hd["hist"]["beta"][:, c], color=colors[j], lw=1,
               label=f"beta0 = {BETA0S[j]:g}" if i == 0 else None)
axes[1].set(xscale="log", yscale="log", xlabel="meta step", ylabel="beta",
            title="amaml + Adam-HD: Adam's beta (all cells)")
for ax in axes:
  ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# `benchmarks/robustness.py --task sinusoid` runs a larger version of this comparison (more
# `alpha0`, several seeds, 5,000 steps per cell, learning-rate-free outer optimizers as
# anchors); its tables are in `BENCHMARKS.md`.
