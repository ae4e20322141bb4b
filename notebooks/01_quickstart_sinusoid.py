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
# # Quickstart: Alpha MAML on sinusoid regression
#
# MAML (Finn et al., 2017) learns an initialisation `theta` from which one or a few SGD
# steps with rate `alpha` on a task's *support* set fit its *query* set. Alpha MAML
# (Behl, Baydin & Torr, 2019) also adapts the rates during training, by hypergradient
# descent. amaml's default adapts the inner rate `alpha` that way and keeps the outer
# (meta) rate `beta` at Adam's library value, 1e-3. Here we start from amaml's default
# `alpha = 0.1`, ten times MAML's tuned value for this problem, and let training correct
# it, with no rate setting of our own.

# %%
import os

# AMAML_NOTEBOOK_FAST=1 (the tests) picks tiny sizes; the default gives nicer results.
FAST = os.environ.get("AMAML_NOTEBOOK_FAST", "0") == "1"

ITERATIONS = 300 if FAST else 10_000   # meta steps
EVAL_TASKS = 100 if FAST else 600      # held-out tasks for the final evaluation

# %%
import functools
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import amaml

print("amaml", amaml.__version__, "| jax", jax.__version__, "|", jax.devices()[0].platform)

# %% [markdown]
# ## Tasks
#
# A task is `y = A sin(x - phase)` with `A ~ U[0.1, 5]`, `phase ~ U[0, pi]` and
# `x ~ U[-5, 5]`. `amaml.sinusoid_tasks` draws a `TaskBatch` of them from a PRNG key: 10
# support and 10 query points per task, arrays shaped `[tasks, points, 1]`.

# %%
batch, (amp, phase) = amaml.sinusoid_tasks(jax.random.key(0), num_tasks=4, return_params=True)
print({name: x.shape for name, x in batch._asdict().items()})

xs = np.linspace(-5, 5, 200)
fig, axes = plt.subplots(1, 4, figsize=(13, 2.8), sharey=True)
for i, ax in enumerate(axes):
  ax.plot(xs, amp[i] * np.sin(xs - phase[i]), "k-", lw=1, label="true curve")
  ax.scatter(batch.support_x[i, :, 0], batch.support_y[i, :, 0], s=18, label="support")
  ax.scatter(batch.query_x[i, :, 0], batch.query_y[i, :, 0], s=18, marker="x", label="query")
  ax.set_title(f"A = {amp[i]:.2f}, phase = {phase[i]:.2f}", fontsize=9)
axes[0].legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Model, loss and learner
#
# MAML's regressor is an MLP 1-40-40-1. A loss for amaml is any
# `loss_fn(params, x, y) -> (loss, aux)`; `amaml.losses.mse` builds one from an apply
# function. `amaml.alpha_maml` returns a `MetaLearner`: `init`, a jitted `step`, its
# un-jitted form `update`, `evaluate`, `meta_loss` and `adaptation_curve`. (`amaml.maml` is
# the same learner with `alpha` frozen and Adam at a fixed outer rate `beta`.)
#
# `amaml.alpha_maml(loss_fn)` needs no rate setting. Its defaults are amaml's additions,
# not the paper's:
#
# - one inner rate per parameter tensor (`alpha_granularity="tensor"`: six here, the
#   MLP's three kernels and three biases), each starting at `alpha = 0.1` and following its
#   own hypergradient by the `"normalized"` rule: Adam-style normalized steps on
#   `log alpha`, so each step changes `alpha` by at most about 5%, whatever the scale of the
#   loss (hypergradient rate `amaml.rates.DEFAULT_HYPER_LR`, the same on every problem);
# - backtracking: a step whose adaptation more than doubles the query loss of not adapting
#   changes nothing but `alpha`, which halves (every tensor's);
# - the outer optimizer is Adam at its library rate `beta = 1e-3`, held fixed
#   (`amaml.methods.default_outer_optimizer`: Adam inside `amaml.hypergradient` with
#   `hyper_lr=0`). `metrics["beta"]` reports it.
#
# Adam with `beta` adapted by hypergradient, as in the paper, is one argument away:
# `amaml.alpha_maml(loss_fn, optimizer=optax.adam, beta=1e-3)` (or `beta_lr=` a positive
# hypergradient rate). A learning-rate-free outer optimizer such as D-Adaptation's AdamW is
# `optimizer=optax.contrib.dadapt_adamw()`. The paper's rule itself, additive steps
# `rate -= kappa * hypergradient` on `alpha` and on Adam's `beta`, with a `kappa` to choose
# per problem, is `amaml.alpha_maml_paper`.
#
# `amaml train` does one more thing before its first meta step: it replaces `alpha0` by the
# smallest power of 4 (4^-6 to 4^6, whatever `alpha0` is) that gets half of the largest
# query-loss decrease on the first meta-batch. The learner does not do that by itself; in Python it is one call,
# `state = amaml.search_alpha(learner.meta_loss, learner.init(params), first_batch)`. This
# notebook leaves it out, to show how the hypergradient corrects a poor `alpha0` on its own.

# %%
model = amaml.models.MLP(hidden=(40, 40))
params = model.init(jax.random.key(1), jnp.zeros((1, 1)))["params"]
loss_fn = amaml.losses.mse(lambda p, x: model.apply({"params": p}, x))

learner = amaml.alpha_maml(loss_fn)   # amaml's defaults: nothing to tune
state0 = learner.init(params)
ALPHA0 = float(jax.tree.leaves(state0.alpha)[0])   # every tensor's: 0.1, 10x MAML's tuned 0.01


def alphas(state):
  """The inner rates by parameter path, one per tensor."""
  return {jax.tree_util.keystr(path, simple=True, separator="/"): float(a)
          for path, a in jax.tree_util.tree_leaves_with_path(state.alpha)}



BETA = float(amaml.current_learning_rate(state0.opt_state))   # Adam's rate: 1e-3, held fixed
print(f"alpha: {len(alphas(state0))} rates, one per parameter tensor, each from {ALPHA0:g}, "
      f"normalized rule, hypergradient rate "
      f"{amaml.rates.DEFAULT_HYPER_LR} (at most ~5% change per step), backtracking on")
print(f"outer optimizer: Adam at beta = {BETA:g}, fixed "
      f"(state: {type(state0.opt_state).__name__})")


# %% [markdown]
# ## Training
#
# The simplest loop calls the jitted step, which vmaps over the tasks of a batch:
#
# ```python
# state = learner.init(params)
# for i in range(ITERATIONS):
#   batch = amaml.sinusoid_tasks(jax.random.key(i), num_tasks=25)
#   state, metrics = learner.step(state, batch)
# ```
#
# Faster: put `learner.update` (the same step, not jitted) in a `lax.scan` that samples its
# tasks on the device. The whole run is then one compiled call, and the scan stacks the
# metrics of every step.

# %%
def body(state, key):
  return learner.update(state, amaml.sinusoid_tasks(key, num_tasks=25))

run = jax.jit(lambda state, keys: jax.lax.scan(body, state, keys))
keys = jax.random.split(jax.random.key(3), ITERATIONS)
t0 = time.perf_counter()
state, hist = jax.block_until_ready(run(state0, keys))
hist = jax.device_get(hist)
print(f"{ITERATIONS} meta steps in {time.perf_counter() - t0:.1f} s (compile included)")
print("metrics of every step:", sorted(hist))
print(f"alpha: {ALPHA0:g} -> " + ", ".join(f"{k} {a:.3g}" for k, a in alphas(state).items()))
print(f"outer rate beta (metrics['beta']): "
      f"{BETA:g} -> {float(amaml.current_learning_rate(state.opt_state)):.4g}")
backtracked = np.flatnonzero(hist["backtracked"]) + 1
print(f"backtracked (alpha halved) at {len(backtracked)} steps"
      + (f", the first at step {backtracked[0]}, the last at step {backtracked[-1]}"
         if len(backtracked) else ""))


# %%
def smooth(x, n=None):
  n = n or max(1, len(x) // 50)
  return np.convolve(x, np.ones(n) / n, mode="valid")

steps = np.arange(1, ITERATIONS + 1)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
axes[0].plot(smooth(hist["loss"]), label="after 1 inner step")
axes[0].plot(smooth(hist["pre_loss"]), ":", label="before adaptation")
axes[0].set(yscale="log", xlabel="meta step", ylabel="query MSE",
            title="meta-training loss (moving average)")
axes[0].legend(fontsize=8)
axes[1].plot(steps, hist["alpha"], color="C0", alpha=0.3, lw=0.5, label="per step")
axes[1].plot(steps[len(steps) - len(smooth(hist["alpha"])):], smooth(hist["alpha"]), color="C0",
             label="moving average")
axes[1].set(xscale="log", yscale="log", xlabel="meta step", ylabel="alpha (mean over tensors)",
            title=f"inner rates alpha (from {ALPHA0:g})")
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# What to look for (the printed lines above give this run's numbers):
#
# - **Backtracking.** If adapting at the starting `alpha` more than doubles the query loss
#   of not adapting, the first steps backtrack: `alpha` halves at each of them and nothing
#   else changes (no parameter update, no optimizer step), until adaptation stops hurting
#   that much. The count printed above says how often it happened and when.
# - **`alpha`** then moves by hypergradient steps of at most about 5%, towards the rate at
#   which one inner step helps most for the current `theta`. Its per-step value is noisy
#   (every step sees new tasks); the moving average shows where it settles.
# - **The outer rate** `beta` stays at Adam's 1e-3 throughout (the printed line above), so
#   the loss curve shows what `alpha` and `theta` do at one outer rate.

# %% [markdown]
# ## Adapted fits
#
# `amaml.adapt` runs the inner loop on one task: SGD steps on its support set, here at the
# learned `alpha` (vmapped over three new tasks, jitted). Before adaptation the meta-learned
# network predicts roughly the average task; one step bends it towards the task, and more
# steps fit it more closely.

# %%
test_batch, (amp, phase) = amaml.sinusoid_tasks(jax.random.key(10), num_tasks=3,
                                                return_params=True)
x_plot = jnp.linspace(-5, 5, 200)[:, None]

@functools.partial(jax.jit, static_argnames="inner_steps")
def adapted_predictions(params, alpha, support_x, support_y, inner_steps):
  def one(sx, sy):
    adapted, _ = amaml.adapt(loss_fn, params, alpha, sx, sy, inner_steps=inner_steps)
    return model.apply({"params": adapted}, x_plot)[:, 0]
  return jax.vmap(one)(support_x, support_y)

fig, axes = plt.subplots(1, 3, figsize=(14, 3.4), sharey=True)
for n, style in ((0, ":"), (1, "-"), (10, "-")):
  pred = adapted_predictions(state.params, state.alpha, test_batch.support_x,
                             test_batch.support_y, inner_steps=n)
  for i, ax in enumerate(axes):
    label = "before adaptation" if n == 0 else f"after {n} step{'s' * (n > 1)}"
    ax.plot(x_plot[:, 0], pred[i], style, label=label)
for i, ax in enumerate(axes):
  ax.plot(x_plot[:, 0], amp[i] * np.sin(x_plot[:, 0] - phase[i]), "k-", lw=2, label="true")
  ax.scatter(test_batch.support_x[i, :, 0], test_batch.support_y[i, :, 0], c="k", marker="^",
             zorder=3, label="support points")
  ax.set_title(f"A = {amp[i]:.2f}, phase = {phase[i]:.2f}", fontsize=9)
axes[0].legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Evaluation with a 95% confidence interval
#
# `learner.evaluate` adapts on each held-out task's support set and scores its query set
# before and after adaptation, one value per task; `amaml.mean_confidence_interval` gives
# the mean and the half-width of its 95% interval (`1.96 * std / sqrt(n)`).

# %%
held_out = amaml.sinusoid_tasks(jax.random.key(777), EVAL_TASKS)
print(f"query MSE on {EVAL_TASKS} held-out tasks at the trained rates "
      "(mean +- 95% CI half-width)")
for n in (1, 10):
  out = learner.evaluate(state.params, state.alpha, held_out, inner_steps=n)
  if n == 1:
    m, ci = amaml.mean_confidence_interval(np.asarray(out["pre_loss"]))
    print(f"  before adaptation: {m:6.3f} +- {ci:.3f}")
  m, ci = amaml.mean_confidence_interval(np.asarray(out["loss"]))
  print(f"  after {n:2d} step{'s' * (n > 1)}:{' ' * (n == 1)}    {m:6.3f} +- {ci:.3f}")

# %% [markdown]
# Next: [02_omniglot](02_omniglot.ipynb) (few-shot image classification),
# [03_hypergradient_explained](03_hypergradient_explained.ipynb) (where `alpha`'s update
# comes from) and [04_sensitivity](04_sensitivity.ipynb) (MAML, the paper's rule, amaml with
# Adam-HD and amaml's default, from a grid of initial rates).
