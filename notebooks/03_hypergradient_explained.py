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
# # The hypergradient, explained
#
# Alpha MAML treats the inner learning rate `alpha` as one more parameter: the meta loss
# `L(alpha)` (the query loss after adapting with rate `alpha`) is a differentiable function
# of `alpha`, so `alpha` can follow its gradient. This notebook
#
# 1. draws `L(alpha)` on a toy problem,
# 2. checks `dL/dalpha` from `jax.grad` against finite differences and against the one-step
#    closed form `-<grad L_query(theta'), grad L_support(theta)>`,
# 3. watches hypergradient descent walk `alpha` to the minimum,
# 4. uses `amaml.hypergradient` (the same idea for an optimizer's own rate, such as the outer
#    rate `beta` of the paper's Alpha MAML) on ordinary, non-meta training, against the same
#    optimizer at a fixed rate.

# %%
import os

# AMAML_NOTEBOOK_FAST=1 (the tests) picks tiny sizes; the default gives nicer results.
FAST = os.environ.get("AMAML_NOTEBOOK_FAST", "0") == "1"

NUM_TASKS = 50 if FAST else 200      # tasks in the toy meta-batch
HD_STEPS = 20 if FAST else 40        # hypergradient steps on alpha
TRAIN_STEPS = 150 if FAST else 500   # SGD steps of the logistic regression

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import amaml

jax.config.update("jax_enable_x64", True)   # float64, for clean finite differences

# %% [markdown]
# ## A toy meta-learning problem: linear regression tasks
#
# Each task is `y = <w_task, x> + noise` in 5 dimensions, with `w_task` scattered around a
# common mean and input scales from 0.5 to 2 (so the loss is curved differently along
# different directions). The model is linear, `theta = (w, b)`; MAML adapts it with one SGD
# step on the task's 10 support points and scores the 10 query points.

# %%
D = 5
SCALES = jnp.geomspace(0.5, 2.0, D)
W_MEAN = jnp.linspace(-1.0, 1.0, D)

def linear_tasks(key, num_tasks, n_support=10, n_query=10):
  kw, kx, kn = jax.random.split(key, 3)
  w = W_MEAN + 0.5 * jax.random.normal(kw, (num_tasks, D))
  x = jax.random.normal(kx, (num_tasks, n_support + n_query, D)) * SCALES
  y = jnp.einsum("tnd,td->tn", x, w) + 0.1 * jax.random.normal(kn, x.shape[:2])
  return amaml.TaskBatch(x[:, :n_support], y[:, :n_support], x[:, n_support:], y[:, n_support:])

loss_fn = amaml.losses.mse(lambda p, x: x @ p["w"] + p["b"])
learner = amaml.alpha_maml(loss_fn, inner_steps=1, alpha_granularity="scalar")  # one alpha, as in the paper
theta = {"w": jnp.zeros(D), "b": jnp.zeros(())}
batch = linear_tasks(jax.random.key(0), NUM_TASKS)

# The meta loss: mean over tasks of the query loss after one inner step with rate alpha.
L = jax.jit(lambda alpha: learner.meta_loss(theta, alpha, batch)[0])
alphas = jnp.linspace(0.0, 0.2, 201)
curve = jax.vmap(L)(alphas)
best = float(alphas[jnp.argmin(curve)])
print(f"L(0) = {float(L(0.0)):.3f} (no adaptation); min of the curve: L({best:.3f}) = "
      f"{float(curve.min()):.3f}")

# %%
plt.figure(figsize=(6, 3.5))
plt.plot(alphas, curve)
plt.axvline(best, color="gray", ls=":", lw=1)
plt.xlabel("inner rate alpha"); plt.ylabel("meta loss L(alpha)")
plt.title("query loss after one inner step")
plt.tight_layout()
plt.show()


# %% [markdown]
# ## The derivative three ways
#
# With one inner step, `theta' = theta - alpha * grad L_support(theta)`, and the chain rule
# gives
#
# $$\frac{dL}{d\alpha} = \Big\langle \nabla L_{\rm query}(\theta'),\ \frac{d\theta'}{d\alpha}\Big\rangle
#   = -\big\langle \nabla L_{\rm query}(\theta'),\ \nabla L_{\rm support}(\theta)\big\rangle,$$
#
# averaged over the tasks of the batch: `alpha` should grow when the query gradient after the
# step still points the way the support gradient did, and shrink when the step overshot.
# `jax.grad` gets the same number by differentiating through `amaml.adapt`, and that is what
# `MetaLearner.step` uses (it works for any number of inner steps).

# %%
def closed_form(theta, alpha, batch):
  def one(sx, sy, qx, qy):
    g_support = jax.grad(lambda p: loss_fn(p, sx, sy)[0])(theta)
    adapted = jax.tree.map(lambda p, g: p - alpha * g, theta, g_support)
    g_query = jax.grad(lambda p: loss_fn(p, qx, qy)[0])(adapted)
    return -sum(jnp.vdot(a, b) for a, b in
                zip(jax.tree.leaves(g_query), jax.tree.leaves(g_support)))
  return jnp.mean(jax.vmap(one)(*batch))

dL = jax.jit(jax.grad(L))
h = 1e-5
print(f"{'alpha':>6} {'jax.grad':>12} {'finite diff.':>12} {'closed form':>12} {'max rel. err':>12}")
for a in (0.02, 0.05, best, 0.15):
  g = float(dL(a))
  fd = float((L(a + h) - L(a - h)) / (2 * h))
  cf = float(closed_form(theta, a, batch))
  err = max(abs(fd - g), abs(cf - g)) / max(abs(g), 1e-12)
  print(f"{a:6.3f} {g:12.5f} {fd:12.5f} {cf:12.5f} {err:12.1e}")

# %% [markdown]
# `MetaLearner.step` reports the same quantity as `metrics["alpha_hypergradient"]` (the mean
# over the task batch), computed in the same backward pass as the meta-gradient:

# %%
state = learner.init(theta)._replace(alpha=jnp.asarray(0.05))
_, metrics = learner.step(state, batch)
print(f"metrics['alpha_hypergradient'] = {float(metrics['alpha_hypergradient']):.5f}, "
      f"jax.grad(L)(0.05) = {float(dL(0.05)):.5f}")

# %% [markdown]
# ## Hypergradient descent on alpha
#
# The paper's update for the inner rate is plain gradient descent on `alpha`:
# `alpha <- alpha - alpha_lr * dL/dalpha` (`amaml.hd_step`; in a learner,
# `amaml.alpha_maml_paper`, or `rate_rule="additive"`). amaml's default instead takes
# normalized steps on `log alpha` (the `"normalized"` rule, at the end of this notebook),
# which need no `alpha_lr` chosen for the problem. Here `theta` stays fixed, so the
# curve stays put and we can watch `alpha` walk down it, from a rate far too small and from
# one far too large. With a fresh batch of tasks at every step (as in training) the
# hypergradient is noisy, but the walk ends in about the same place: the minimum of the
# expected meta loss, which the fixed batch of the curve only estimates.

# %%
ALPHA_LR = 3e-4   # the hypergradient's learning rate
starts = jnp.array([0.01, 0.19])

def fresh_hypergradient(alpha, key):   # on a new batch of 25 tasks
  b = linear_tasks(key, 25)
  return jax.grad(lambda a: learner.meta_loss(theta, a, b)[0])(alpha)

def hd_paths(fresh_tasks):
  def walk(alpha0):
    def body(alpha, key):
      g = fresh_hypergradient(alpha, key) if fresh_tasks else jax.grad(L)(alpha)
      alpha = amaml.hd_step(alpha, g, hyper_lr=ALPHA_LR, min_rate=0.0)
      return alpha, alpha
    keys = jax.random.split(jax.random.key(100), HD_STEPS)
    return jnp.concatenate([alpha0[None], jax.lax.scan(body, alpha0, keys)[1]])
  return np.asarray(jax.jit(jax.vmap(walk))(starts))   # [starts, HD_STEPS + 1]

paths, noisy = hd_paths(fresh_tasks=False), hd_paths(fresh_tasks=True)
path_losses = np.asarray(jax.vmap(L)(jnp.asarray(paths.ravel()))).reshape(paths.shape)

fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
axes[0].plot(alphas, curve, color="gray", lw=1)
for k, a0 in enumerate(starts):
  axes[0].plot(paths[k], path_losses[k], "o-", ms=4, label=f"from alpha = {float(a0):g}")
axes[0].set(xlabel="alpha", ylabel="L(alpha)", title="hypergradient descent on the meta loss")
axes[0].legend()
for k, a0 in enumerate(starts):
  line, = axes[1].plot(paths[k], label=f"from {float(a0):g}, same tasks")
  axes[1].plot(noisy[k], "--", color=line.get_color(),
               label=f"from {float(a0):g}, fresh tasks each step")
axes[1].axhline(best, color="gray", ls=":", lw=1, label="minimum of the curve")
axes[1].set(xlabel="hypergradient step", ylabel="alpha", title="alpha along the way")
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()
print("final alpha, same tasks:", paths[:, -1].round(4), "| fresh tasks:", noisy[:, -1].round(4),
      "| minimum of the curve:", round(best, 4))

# %% [markdown]
# In real meta-training `theta` moves at every step too, so `alpha` chases a moving
# minimum, with one hypergradient step per meta step (see the quickstart notebook, where
# `alpha` starts at 0.1 and moves as `theta` learns).
#
# ## The same idea for ordinary training: `amaml.hypergradient`
#
# For a plain optimizer step `params_t = params_{t-1} + beta * u_{t-1}`, the derivative of
# the next loss with respect to the rate is `<g_t, u_{t-1}>`, the dot product of the new
# gradient with the previous update direction (Baydin et al., 2018). `amaml.hypergradient`
# wraps any Optax optimizer with that rule. The paper's Alpha MAML (`amaml.alpha_maml_paper`)
# uses it for the outer rate `beta` of Adam, and so does `amaml.alpha_maml` when given an
# optimizer factory (`optimizer=optax.adam`) or a positive `beta_lr`. With `hyper_lr=0` it
# is exactly the wrapped optimizer at a fixed rate: that is amaml's default outer
# optimizer, Adam with `beta` held at 1e-3 (`amaml.methods.default_outer_optimizer`), and
# how `amaml.maml` keeps Adam's `beta` fixed.
#
# The problem: logistic regression on 2,000 synthetic points in 20 dimensions (input scales
# 0.3 to 3), minibatch SGD with 32 points per step, from initial rates 0.001 to 10. We
# compare the fixed rate, the paper's additive rule (`rate -= hyper_lr * h`) and amaml's
# `"normalized"` rule (Adam-style normalized steps on `log rate`, computed from the
# hypergradient `h`: every step changes the rate by at most about a factor `exp(hyper_lr)`,
# whatever the scale of the loss), at amaml's default `hyper_lr`,
# `amaml.rates.DEFAULT_HYPER_LR`. Each row of runs is one `vmap` over the initial rates.

# %%
n, d = 2000, 20
kx, kw, ky = jax.random.split(jax.random.key(0), 3)
X = jax.random.normal(kx, (n, d)) * jnp.geomspace(0.3, 3.0, d)
w_true = jax.random.normal(kw, (d,))
Y = (jax.random.uniform(ky, (n,)) < jax.nn.sigmoid(X @ w_true)).astype(X.dtype)

def bce(p, x, y):
  return jnp.mean(optax.sigmoid_binary_cross_entropy(x @ p["w"] + p["b"], y))

p0 = {"w": jnp.zeros(d), "b": jnp.zeros(())}
RATES = jnp.array([0.001, 0.01, 0.1, 1.0, 3.0, 10.0])

def run(hyper_lr, rate_rule="additive"):
  opt = amaml.hypergradient(optax.sgd, learning_rate=1.0, hyper_lr=hyper_lr, rate_rule=rate_rule)

  def one(rate0):
    opt_state = opt.init(p0)._replace(learning_rate=rate0)   # the initial rate, vmapped

    def body(carry, key):
      p, s = carry
      idx = jax.random.randint(key, (32,), 0, n)
      updates, s = opt.update(jax.grad(bce)(p, X[idx], Y[idx]), s, p)
      p = optax.apply_updates(p, updates)
      return (p, s), (bce(p, X, Y), amaml.current_learning_rate(s))

    keys = jax.random.split(jax.random.key(1), TRAIN_STEPS)   # same minibatches for all
    return jax.lax.scan(body, (p0, opt_state), keys)[1]

  return jax.device_get(jax.jit(jax.vmap(one))(RATES))

HYPER_LR = amaml.rates.DEFAULT_HYPER_LR   # 0.05: at most ~5% change per step
runs = {"fixed rate (hyper_lr = 0)": run(0.0),
        "SGD-HD, additive (hyper_lr = 1e-2)": run(1e-2),
        f"SGD-HD, normalized (hyper_lr = {HYPER_LR:g})": run(HYPER_LR, "normalized")}

# %%
colors = plt.cm.viridis(np.linspace(0, 0.9, len(RATES)))
fig, axes = plt.subplots(2, 3, figsize=(15, 6.5), sharex=True)
for j, (name, (loss, rate)) in enumerate(runs.items()):
  for i, r0 in enumerate(RATES):
    axes[0, j].plot(loss[i], color=colors[i], label=f"initial rate {float(r0):g}")
    axes[1, j].plot(rate[i], color=colors[i])
  axes[0, j].set(title=name, yscale="log", ylim=(0.16, 1.5), ylabel="full-data loss")
  axes[1, j].set(yscale="log", xlabel="SGD step", ylabel="learning rate")
axes[0, 0].legend(fontsize=8)
plt.tight_layout()
plt.show()

print(f"final full-data loss after {TRAIN_STEPS} steps")
print(f"{'initial rate':>12}" + "".join(f"{name.split(' (')[0]:>22}" for name in runs))
for i, r0 in enumerate(RATES):
  print(f"{float(r0):12g}" + "".join(f"{float(loss[i, -1]):22.4f}" for loss, _ in runs.values()))

# %% [markdown]
# Reading the plots (the table above gives this run's numbers):
#
# - **Fixed rate**: which initial rates train well in this budget, and which are too small
#   to get far or too large to be stable.
# - **Additive rule**: its step is `hyper_lr * h`, and the scale of `h` depends on the
#   problem, the rate and the point of training. Look at how far the rate moves from each
#   start: a `hyper_lr` that moves small rates a long way in a few steps may hardly move
#   large ones, or the other way round, and there is no scale-free choice.
# - **Normalized rule**: every step changes the rate by at most about `exp(hyper_lr)`, here
#   ~5%, whatever the scale of `h`, so the rates from every start move at a similar,
#   bounded pace towards the range where the loss falls. The price of the bound: from a
#   start 100x too small, climbing to the useful range takes at least
#   `log(100) / hyper_lr` ≈ 92 steps.
#
# `amaml.alpha_maml` applies this normalized rule, at this `hyper_lr`, to `alpha` by default,
# and to Adam's `beta` too when `beta` is adapted (an Optax factory such as `optax.adam` as
# the outer optimizer; by default `beta` stays at 1e-3); `amaml.alpha_maml_paper` uses the
# paper's additive rule for both.
