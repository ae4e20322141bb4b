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
# # Omniglot: few-shot image classification with Alpha MAML
#
# Omniglot has 1,623 handwritten characters from 50 alphabets, 20 drawings each. An N-way
# K-shot task draws N classes, gives K labelled images of each (the *support* set) and asks
# for the labels of other images of the same classes (the *query* set). Here: 5-way
# 1-shot, MAML's protocol, MAML's 4-block convolutional network (`amaml.models.Conv4`),
# trained briefly with Alpha MAML through `amaml.train.train`, on a CPU.

# %%
import os

# AMAML_NOTEBOOK_FAST=1 (the tests) picks tiny sizes; the default gives nicer results.
FAST = os.environ.get("AMAML_NOTEBOOK_FAST", "0") == "1"

ITERATIONS = 10 if FAST else 200    # meta steps (a full run: 60,000)
META_BATCH = 2 if FAST else 8       # tasks per meta step (MAML: 32)
HIDDEN = 8 if FAST else 32          # Conv4 channels (MAML: 64)
EVAL_TASKS = 10 if FAST else 200    # validation and meta-test tasks (the convention: 600)

# %%
import json
import tempfile
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np

import amaml
from amaml import data
from amaml import train as amaml_train
from amaml.configs import get_config

print("amaml", amaml.__version__, "| jax", jax.__version__, "|", jax.devices()[0].platform)

# %% [markdown]
# ## The data
#
# `load_omniglot("maml")` finds the Omniglot arrays (argument `data_dir`, `$AMAML_OMNIGLOT_DIR`, or
# `shared/data/omniglot` next to the repository), resizes them to 28x28 once, caches them,
# and splits the characters as Finn et al. did: 1,100 meta-train, 100 meta-validation and
# 423 meta-test characters, each rotated by 0/90/180/270 degrees into 4 classes.

# %%
splits = data.load_omniglot("maml")
for name in ("train", "val", "test"):
  s = getattr(splits, name)
  print(f"{name:5s}: {s.num_classes} classes x {s.examples_per_class} images of {s.image_shape}, "
        f"{s.images.dtype}")

# %% [markdown]
# ## One episode
#
# `data.sample_episodes` draws episodes on the host (numpy); `data.sample_tasks` draws them
# with `jax.random` on the device, and is what training uses. A label is the order in which
# its class was drawn, so it means nothing across tasks: the network must learn from the
# support set which drawing is "class 2" in this task.

# %%
WAYS, SHOTS, QUERIES = 5, 1, 3
ep = data.sample_episodes(0, splits.train, ways=WAYS, shots=SHOTS, queries=QUERIES, num_tasks=1)
print({name: x.shape for name, x in ep._asdict().items()})

fig, axes = plt.subplots(WAYS, 1 + QUERIES, figsize=(1.4 * (1 + QUERIES), 1.4 * WAYS))
for c in range(WAYS):
  axes[c, 0].imshow(ep.support_x[0, c, ..., 0], cmap="gray_r")
  axes[c, 0].set_ylabel(f"label {ep.support_y[0, c]}")
  for q in range(QUERIES):
    axes[c, 1 + q].imshow(ep.query_x[0, c * QUERIES + q, ..., 0], cmap="gray_r")
    axes[c, 1 + q].set_xlabel(f"label {ep.query_y[0, c * QUERIES + q]}", fontsize=8)
axes[0, 0].set_title("support")
for q in range(QUERIES):
  axes[0, 1 + q].set_title(f"query {q + 1}")
for ax in axes.ravel():
  ax.set_xticks([]); ax.set_yticks([])
fig.suptitle("one 5-way 1-shot task (a row per class)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Training
#
# `amaml.train.train(config, out_dir)` is what `amaml train` runs: it builds the model,
# loss and learner from a `Config`, runs the meta steps in jitted `lax.scan` chunks with
# episodes sampled on the device (a whole log line of `log_every` steps per chunk when that
# takes at most a few seconds, else one step per chunk), logs means over every `log_every`
# steps, validates every `val_every` steps, and writes
# `config.json`, `metrics.jsonl`, `checkpoints/` and `results.json` (with a meta-test
# evaluation and its 95% confidence interval) into `out_dir`.
#
# We start from the `omniglot-5w1s` configuration (MAML's episodes, 60,000 steps) and
# shrink it to run in minutes on a CPU: far fewer steps, a smaller batch, a narrower
# network. Expect well above the 20% of guessing, and below the ~98% that MAML reports
# after a full run.
#
# The configuration sets nothing about the rates: like every named configuration it uses
# amaml's tuning-free defaults (not the paper's). There is one inner rate `alpha` per
# parameter tensor (18 for Conv4), and `alpha0` = 0.1 (MAML tuned 0.4 for 5-way Omniglot)
# does not matter: before the first meta step, `amaml.train.train` replaces it by the
# smallest power of 4 (4^-6 to 4^6) that gets half of the largest query-loss decrease on the
# first meta-batch, the same from any `alpha0` (`alpha_search=None`, which means on for `method="alpha-maml"`;
# `alpha_search=False` keeps `alpha0`). Then each rate follows its own hypergradient by the
# `"normalized"` rule at the hypergradient rate `amaml.rates.DEFAULT_HYPER_LR`, with
# backtracking. The outer optimizer is the method's own (`outer_optimizer=None`, looked up
# in `amaml.configs.METHOD_OUTER_OPTIMIZER`): for `method="alpha-maml"` that is Adam at
# `cfg.resolved_beta` (1e-3), held fixed. `beta_lr=` a positive rate, or
# `outer_optimizer="adam"`, makes `beta` follow its hypergradient;
# `outer_optimizer="dadapt_adamw"` gives D-Adaptation's AdamW, which sets its own step size
# (`cfg.beta` then unused); `method="alpha-maml-paper"` the paper's additive rule for both
# rates (with Adam).

# %%
cfg = get_config("omniglot-5w1s", iterations=ITERATIONS, meta_batch=META_BATCH, hidden=HIDDEN,
                 log_every=ITERATIONS // 10, val_every=ITERATIONS // 2, val_tasks=EVAL_TASKS,
                 checkpoint_every=0, eval_tasks=EVAL_TASKS, eval_batch=EVAL_TASKS // 2)
print({k: getattr(cfg, k) for k in ("method", "ways", "shots", "queries", "inner_steps",
                                    "alpha", "alpha_search", "rate_rule", "alpha_lr",
                                    "backtrack", "outer_optimizer", "beta_lr", "meta_batch",
                                    "test_adaptation", "eval_inner_steps")})
OUTER = cfg.resolved_outer_optimizer   # outer_optimizer=None: the method's own
assert cfg.method == "alpha-maml" and cfg.alpha_lr is None   # the settings printed below
SEARCH = cfg.resolved_alpha_search     # alpha_search=None: on for alpha-maml
print("inner rates alpha: one per parameter tensor, each from "
      + ("the searched power of 4" if SEARCH else f"{cfg.alpha:g}") + f", {cfg.rate_rule} rule, "
      f"hypergradient rate "
      f"{amaml.rates.DEFAULT_HYPER_LR} (the rule's default), backtracking {cfg.backtrack}")
if OUTER == "adam" and cfg.resolved_beta_lr == 0:   # beta_lr=None: 0 for alpha-maml's Adam
  print(f"outer optimizer: Adam, beta fixed at {cfg.resolved_beta:g}")
elif OUTER == "adam":
  print(f"outer optimizer: Adam, beta from {cfg.resolved_beta:g}, adapted by hypergradient")
else:
  print(f"outer optimizer: {OUTER}, which sets its own step size (cfg.beta is not used)")

run_dir = Path(tempfile.mkdtemp()) / "omniglot-5w1s"
state, results = amaml_train.train(cfg, run_dir, progress=False)
print(sorted(p.name for p in run_dir.iterdir()))

# %% [markdown]
# ## Meta-test accuracy with a 95% confidence interval
#
# The evaluation in `results.json`: `EVAL_TASKS` new tasks from the 423 held-out characters;
# the interval is `1.96 * std / sqrt(tasks)` over tasks (`amaml.mean_confidence_interval`).
# With `test_adaptation="select"` (the default, amaml's), the test-time adaptation is
# chosen first on meta-validation tasks (`amaml.train.select_adaptation`): the number of
# inner steps, 0 to `eval_inner_steps`, and the rate, the learned `alpha` times 2, 1, 0.5,
# 0.25 or 0.125. `results["test_adaptation"]` holds the choice and every candidate's
# validation score; when the choice differs from MAML's fixed protocol
# (`eval_inner_steps` steps at the learned `alpha`), `results["test_fixed"]` holds that too.

# %%
print(amaml_train.format_results(results))
test = results["test"]
print(f"accuracy before adaptation (chance level): {100 * test['pre_accuracy']:.1f}% "
      f"+- {100 * test['pre_accuracy_ci95']:.1f}%")
choice = results["test_adaptation"]
print(f"chosen on {choice['tasks']} {choice['split']} tasks: {choice['inner_steps']} inner steps "
      f"at {choice['alpha_scale']:g} x alpha")

# %% [markdown]
# Other numbers of inner steps, or more tasks, from the saved run:
# `amaml evaluate --run RUN_DIR --eval_tasks 600 --eval_inner_steps 10` on the command line, or
# `exp, state = amaml.train.load_run(run_dir)` then
# `amaml.train.evaluate(exp, state.params, state.alpha, "test", 600, eval_inner_steps=10)`.
#
# ## Learning curves and the rates
#
# `metrics.jsonl` holds one record every `log_every` steps: means over those steps, and the
# rates at their end. (`amaml.plot.plot_runs(run_dir)` writes similar plots as PNG files.)

# %%
recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
step = [r["step"] for r in recs]
val = [(r["step"], r["val_accuracy"]) for r in recs if "val_accuracy" in r]

fig, axes = plt.subplots(1, 4, figsize=(16, 3.3))
axes[0].plot(step, [r["loss"] for r in recs], label="after adaptation")
if "pre_loss" in recs[0]:   # logged when cfg.track_pre_adaptation or cfg.backtrack is on
  axes[0].plot(step, [r["pre_loss"] for r in recs], ":", label="before adaptation")
axes[0].set(xlabel="meta step", ylabel="query cross-entropy", title="training loss")
axes[1].plot(step, [r["accuracy"] for r in recs], label="train tasks")
axes[1].plot(*zip(*val), "o--", label="validation tasks")
axes[1].axhline(1 / cfg.ways, color="gray", lw=1, ls=":", label="chance")
axes[1].set(xlabel="meta step", ylabel="query accuracy after adaptation", title="accuracy")
axes[2].plot(step, [r["alpha"] for r in recs], "o-")
axes[2].set(xlabel="meta step", title="inner rate alpha (from "
            + ("the searched start)" if SEARCH else f"{cfg.alpha:g})"))
axes[3].plot(step, [r["beta"] for r in recs], "o-")
axes[3].set(xlabel="meta step", yscale="log", ylabel="'beta' in metrics.jsonl",
            title=f"outer step size: {OUTER}'s estimate" if OUTER != "adam" else
            f"outer rate beta (fixed at {cfg.resolved_beta:g})" if cfg.resolved_beta_lr == 0
            else f"outer rate beta (from {cfg.resolved_beta:g})")
axes[0].legend(fontsize=8); axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# What to look for: where `alpha` goes from its searched start (a power of 4, the same from
# any `alpha0`; MAML's hand-tuned value for 5-way Omniglot is 0.4), and whether it is still
# moving when the run stops. The `beta` panel is Adam's rate, logged at the end of each log
# line (and the `final beta` of the results summary above): amaml's default holds it at
# 1e-3, so the line is flat. In the printed results, compare the test-time
# adaptation chosen on validation tasks with MAML's fixed protocol (reported when the
# choice differs), within their confidence intervals. For what the rates do from other
# starting points, see [04_sensitivity](04_sensitivity.ipynb).
#
# ## The same without `amaml.train`
#
# `amaml.train.train` is a thin layer over the library. The core of it, for your own loops:
#
# ```python
# import jax, amaml
# from amaml import data
#
# model = amaml.models.Conv4(num_classes=5)
# params = model.init(jax.random.key(0), jax.numpy.zeros((1, 28, 28, 1)))["params"]
# loss_fn = amaml.losses.cross_entropy(lambda p, x: model.apply({"params": p}, x))
# learner = amaml.alpha_maml(loss_fn)   # one alpha per tensor from 0.1; outer: Adam at 1e-3
# images = jax.device_put(data.load_omniglot("maml").train.images)  # uint8 [classes, 20, 28, 28, 1]
#
# @jax.jit
# def train_chunk(state, keys):  # len(keys) meta steps, episodes drawn on the device
#   def body(state, key):
#     return learner.update(state, data.sample_tasks(key, images, 5, 1, 15, 32))
#   return jax.lax.scan(body, state, keys)
#
# first = data.sample_tasks(jax.random.key(0), images, 5, 1, 15, 32)
# state = amaml.search_alpha(learner.meta_loss, learner.init(params), first)  # alpha0 searched
# for i in range(100):
#   state, metrics = train_chunk(state, jax.random.split(jax.random.key(i), 100))
# ```
