"""Writes the example notebooks from the cell sources below, and optionally runs them.

    python notebooks/_build.py                 # write the .ipynb files (no outputs)
    python notebooks/_build.py --execute       # write, run with the default budget, save outputs
    python notebooks/_build.py --execute --fast 01 03   # only some, with the CI budget

Edit the cells here, not in the .ipynb files, then run with ``--execute`` so that the
committed notebooks show their outputs. ``tests/test_notebooks.py`` runs them with
``AMAML_NOTEBOOK_FAST=1``.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str):
  return new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str):
  return new_code_cell(textwrap.dedent(text).strip())


BUDGET = '''\
import os

# AMAML_NOTEBOOK_FAST=1 (the tests) picks tiny sizes; the default gives nicer results.
FAST = os.environ.get("AMAML_NOTEBOOK_FAST", "0") == "1"
'''

# ---------------------------------------------------------------------------------------------
QUICKSTART = [
    md("""
    # Quickstart: Alpha MAML on sinusoid regression

    MAML (Finn et al., 2017) learns an initialisation `theta` from which one or a few SGD
    steps with rate `alpha` on a task's *support* set fit its *query* set. Alpha MAML
    (Behl, Baydin & Torr, 2019) also adapts the inner rate `alpha` and the outer (meta) rate
    `beta` during training, by hypergradient descent. Here we start from amaml's default
    `alpha = 0.1`, ten times MAML's tuned value for this problem, and let training correct it,
    with no rate setting of our own.
    """),
    code(BUDGET + '''
ITERATIONS = 300 if FAST else 10_000   # meta steps
EVAL_TASKS = 100 if FAST else 600      # held-out tasks for the final evaluation
'''),
    code("""
    import functools
    import time

    import jax
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np

    import amaml

    print("amaml", amaml.__version__, "| jax", jax.__version__, "|", jax.devices()[0].platform)
    """),
    md("""
    ## Tasks

    A task is `y = A sin(x - phase)` with `A ~ U[0.1, 5]`, `phase ~ U[0, pi]` and
    `x ~ U[-5, 5]`. `amaml.sinusoid_tasks` draws a `TaskBatch` of them from a PRNG key: 10
    support and 10 query points per task, arrays shaped `[tasks, points, 1]`.
    """),
    code("""
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
    """),
    md("""
    ## Model, loss and learner

    MAML's regressor is an MLP 1-40-40-1. A loss for amaml is any
    `loss_fn(params, x, y) -> (loss, aux)`; `amaml.losses.mse` builds one from an apply
    function. `amaml.alpha_maml` returns a `MetaLearner`: `init`, a jitted `step`, its
    un-jitted form `update`, `evaluate`, `meta_loss` and `adaptation_curve`. (`amaml.maml` is
    the same learner with `alpha` and `beta` frozen.)

    `amaml.alpha_maml(loss_fn)` needs no rate setting. Its defaults are amaml's additions,
    not the paper's: initial rates `alpha = 0.1`, `beta = 1e-3`; the `"normalized"` rule
    (Adam-style normalized steps on `log alpha` and `log beta`, computed from their
    hypergradients, so each step changes a rate by at most about 5%, whatever the scale of
    the loss: hypergradient rate `amaml.rates.DEFAULT_HYPER_LR`, the same for both rates on
    every problem); and backtracking (a step whose adaptation more than doubles the query
    loss of not adapting only halves `alpha`). The paper's rule, additive steps
    `rate -= kappa * hypergradient` with a `kappa` to choose per problem, is
    `amaml.alpha_maml_paper`.
    """),
    code("""
    model = amaml.models.MLP(hidden=(40, 40))
    params = model.init(jax.random.key(1), jnp.zeros((1, 1)))["params"]
    loss_fn = amaml.losses.mse(lambda p, x: model.apply({"params": p}, x))

    learner = amaml.alpha_maml(loss_fn)   # amaml's defaults: nothing to tune
    ALPHA0, BETA0 = 0.1, 1e-3             # the default initial rates (alpha: 10x MAML's tuned 0.01)
    print(f"rule: normalized, hypergradient rate {amaml.rates.DEFAULT_HYPER_LR} "
          "(at most ~5% change per step), backtracking on")
    """),
    md("""
    ## Training

    The simplest loop calls the jitted step, which vmaps over the tasks of a batch:

    ```python
    state = learner.init(params)
    for i in range(ITERATIONS):
      batch = amaml.sinusoid_tasks(jax.random.key(i), num_tasks=25)
      state, metrics = learner.step(state, batch)
    ```

    Faster: put `learner.update` (the same step, not jitted) in a `lax.scan` that samples its
    tasks on the device. The whole run is then one compiled call, and the scan stacks the
    metrics of every step.
    """),
    code("""
    def body(state, key):
      return learner.update(state, amaml.sinusoid_tasks(key, num_tasks=25))

    run = jax.jit(lambda state, keys: jax.lax.scan(body, state, keys))
    keys = jax.random.split(jax.random.key(3), ITERATIONS)
    t0 = time.perf_counter()
    state, hist = jax.block_until_ready(run(learner.init(params), keys))
    hist = jax.device_get(hist)
    print(f"{ITERATIONS} meta steps in {time.perf_counter() - t0:.1f} s (compile included)")
    print("metrics of every step:", sorted(hist))
    print(f"alpha: {ALPHA0} -> {float(state.alpha):.4g}    "
          f"beta: {BETA0} -> {float(amaml.current_learning_rate(state.opt_state)):.4g}")
    backtracked = np.flatnonzero(hist["backtracked"]) + 1
    print(f"backtracked (alpha halved) at {len(backtracked)} steps"
          + (f", the first at step {backtracked[0]}, the last at step {backtracked[-1]}"
             if len(backtracked) else ""))
    """),
    code("""
    def smooth(x, n=None):
      n = n or max(1, len(x) // 50)
      return np.convolve(x, np.ones(n) / n, mode="valid")

    steps = np.arange(1, ITERATIONS + 1)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
    axes[0].plot(smooth(hist["loss"]), label="after 1 inner step")
    axes[0].plot(smooth(hist["pre_loss"]), ":", label="before adaptation")
    axes[0].set(yscale="log", xlabel="meta step", ylabel="query MSE",
                title="meta-training loss (moving average)")
    axes[0].legend(fontsize=8)
    axes[1].plot(steps, hist["alpha"], color="C0", alpha=0.3, lw=0.5, label="per step")
    axes[1].plot(steps[len(steps) - len(smooth(hist["alpha"])):], smooth(hist["alpha"]), color="C0",
                 label="moving average")
    axes[1].set(xscale="log", yscale="log", xlabel="meta step", ylabel="alpha",
                title=f"inner rate alpha (from {ALPHA0})")
    axes[1].legend(fontsize=8)
    axes[2].plot(steps, hist["beta"])
    axes[2].set(xscale="log", xlabel="meta step", ylabel="beta",
                title=f"outer rate beta of Adam (from {BETA0})")
    plt.tight_layout()
    plt.show()
    """),
    md("""
    In the committed run (10,000 steps), the first four steps backtrack: adapting at
    `alpha = 0.1`, then 0.05, 0.025 and 0.0125, more than doubled the query loss of not
    adapting, so `alpha` halved each time, to 0.00625, and nothing else changed. The
    hypergradient steps then take it down to about 0.002 by step 100, up to about 0.007 around
    step 400, and back to settle near 0.0036 (the per-step value is noisy: each step sees new
    tasks). `beta` stays at 1e-3 while `alpha` backtracks, grows to about 0.0025 over the
    first hundred steps and peaks near 0.0057 around step 400, then falls to a few 1e-4
    (0.00022 at the end).
    """),
    md("""
    ## Adapted fits

    `amaml.adapt` runs the inner loop on one task: SGD steps on its support set, here at the
    learned `alpha` (vmapped over three new tasks, jitted). Before adaptation the meta-learned
    network predicts roughly the average task; one step bends it towards the task, and more
    steps fit it more closely.
    """),
    code("""
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
    """),
    md("""
    ## Evaluation with a 95% confidence interval

    `learner.evaluate` adapts on each held-out task's support set and scores its query set
    before and after adaptation, one value per task; `amaml.mean_confidence_interval` gives
    the mean and the half-width of its 95% interval (`1.96 * std / sqrt(n)`).
    """),
    code("""
    held_out = amaml.sinusoid_tasks(jax.random.key(777), EVAL_TASKS)
    print(f"query MSE on {EVAL_TASKS} held-out tasks at alpha = {float(state.alpha):.4g} "
          "(mean +- 95% CI half-width)")
    for n in (1, 10):
      out = learner.evaluate(state.params, state.alpha, held_out, inner_steps=n)
      if n == 1:
        m, ci = amaml.mean_confidence_interval(np.asarray(out["pre_loss"]))
        print(f"  before adaptation: {m:6.3f} +- {ci:.3f}")
      m, ci = amaml.mean_confidence_interval(np.asarray(out["loss"]))
      print(f"  after {n:2d} step{'s' * (n > 1)}:{' ' * (n == 1)}    {m:6.3f} +- {ci:.3f}")
    """),
    md("""
    Next: [02_omniglot](02_omniglot.ipynb) (few-shot image classification),
    [03_hypergradient_explained](03_hypergradient_explained.ipynb) (where `alpha`'s update
    comes from) and [04_sensitivity](04_sensitivity.ipynb) (MAML, the paper's rule and amaml's
    default from a grid of initial rates).
    """),
]

# ---------------------------------------------------------------------------------------------
OMNIGLOT = [
    md("""
    # Omniglot: few-shot image classification with Alpha MAML

    Omniglot has 1,623 handwritten characters from 50 alphabets, 20 drawings each. An N-way
    K-shot task draws N classes, gives K labelled images of each (the *support* set) and asks
    for the labels of other images of the same classes (the *query* set). Here: 5-way
    1-shot, MAML's protocol, MAML's 4-block convolutional network (`amaml.models.Conv4`),
    trained briefly with Alpha MAML through `amaml.train.train`, on a CPU.
    """),
    code(BUDGET + """
ITERATIONS = 10 if FAST else 200    # meta steps (a full run: 60,000)
META_BATCH = 2 if FAST else 8       # tasks per meta step (MAML: 32)
HIDDEN = 8 if FAST else 32          # Conv4 channels (MAML: 64)
EVAL_TASKS = 10 if FAST else 200    # validation and meta-test tasks (the convention: 600)
"""),
    code("""
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
    """),
    md("""
    ## The data

    `load_omniglot("maml")` finds the Omniglot arrays (argument, `$AMAML_OMNIGLOT_DIR`, or
    `shared/data/omniglot` next to the repository), resizes them to 28x28 once, caches them,
    and splits the characters as Finn et al. did: 1,100 meta-train, 100 meta-validation and
    423 meta-test characters, each rotated by 0/90/180/270 degrees into 4 classes.
    """),
    code("""
    splits = data.load_omniglot("maml")
    for name in ("train", "val", "test"):
      s = getattr(splits, name)
      print(f"{name:5s}: {s.num_classes} classes x {s.examples_per_class} images of {s.image_shape}, "
            f"{s.images.dtype}")
    """),
    md("""
    ## One episode

    `data.sample_episodes` draws episodes on the host (numpy); `data.sample_tasks` draws them
    with `jax.random` on the device, and is what training uses. A label is the order in which
    its class was drawn, so it means nothing across tasks: the network must learn from the
    support set which drawing is "class 2" in this task.
    """),
    code("""
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
    """),
    md("""
    ## Training

    `amaml.train.train(config, out_dir)` is what `amaml train` runs: it builds the model,
    loss and learner from a `Config`, runs `log_every` meta steps at a time as one `lax.scan`
    with episodes sampled on the device, validates every `val_every` steps, and writes
    `config.json`, `metrics.jsonl`, `checkpoints/` and `results.json` (with a meta-test
    evaluation and its 95% confidence interval) into `out_dir`.

    We start from the `omniglot-5w1s` configuration (MAML's episodes, 60,000 steps) and
    shrink it to run in minutes on a CPU: far fewer steps, a smaller batch, a narrower
    network. Expect well above the 20% of guessing, below the ~98% of a full run (the
    committed run: about 92%).

    The configuration sets nothing about the rates: like every named configuration it uses
    amaml's tuning-free defaults (not the paper's): `alpha` starts at 0.1 (MAML tuned 0.4 for
    5-way Omniglot; pass `alpha=0.4` for that), `beta` at 1e-3, both adapt with the
    `"normalized"` rule at the hypergradient rate `amaml.rates.DEFAULT_HYPER_LR`, with
    backtracking. `method="alpha-maml-paper"` would use the paper's additive rule instead.
    """),
    code("""
    cfg = get_config("omniglot-5w1s", iterations=ITERATIONS, meta_batch=META_BATCH, hidden=HIDDEN,
                     log_every=ITERATIONS // 10, val_every=ITERATIONS // 2, val_tasks=EVAL_TASKS,
                     checkpoint_every=0, eval_tasks=EVAL_TASKS, eval_batch=EVAL_TASKS // 2)
    print({k: getattr(cfg, k) for k in ("method", "ways", "shots", "queries", "inner_steps",
                                        "alpha", "beta", "rate_rule", "backtrack", "meta_batch",
                                        "test_adaptation", "eval_inner_steps")})
    print("hypergradient rate of alpha and beta:", amaml.rates.DEFAULT_HYPER_LR)

    run_dir = Path(tempfile.mkdtemp()) / "omniglot-5w1s"
    state, results = amaml_train.train(cfg, run_dir, progress=False)
    print(sorted(p.name for p in run_dir.iterdir()))
    """),
    md("""
    ## Meta-test accuracy with a 95% confidence interval

    The evaluation in `results.json`: `EVAL_TASKS` new tasks from the 423 held-out characters;
    the interval is `1.96 * std / sqrt(tasks)` over tasks (`amaml.mean_confidence_interval`).
    With `test_adaptation="select"` (the default, amaml's), the test-time adaptation is
    chosen first on meta-validation tasks (`amaml.train.select_adaptation`): the number of
    inner steps, 0 to `eval_inner_steps`, and the rate, the learned `alpha` times 2, 1, 0.5,
    0.25 or 0.125. `results["test_adaptation"]` holds the choice and every candidate's
    validation score; when the choice differs from MAML's fixed protocol
    (`eval_inner_steps` steps at the learned `alpha`), `results["test_fixed"]` holds that too.
    """),
    code("""
    print(amaml_train.format_results(results))
    test = results["test"]
    print(f"accuracy before adaptation (chance level): {100 * test['pre_accuracy']:.1f}% "
          f"+- {100 * test['pre_accuracy_ci95']:.1f}%")
    choice = results["test_adaptation"]
    print(f"chosen on {choice['tasks']} {choice['split']} tasks: {choice['inner_steps']} inner steps "
          f"at {choice['alpha_scale']:g} x alpha")
    """),
    md("""
    Other numbers of inner steps, or more tasks, from the saved run:
    `amaml evaluate --run RUN_DIR --tasks 600 --inner_steps 10` on the command line, or
    `exp, state = amaml.train.load_run(run_dir)` then
    `amaml.train.evaluate(exp, state.params, state.alpha, "test", 600, inner_steps=10)`.

    ## Learning curves and the rates

    `metrics.jsonl` holds one record every `log_every` steps: means over those steps, and the
    rates at their end. (`amaml.plot.plot_runs(run_dir)` writes similar plots as PNG files.)
    """),
    code("""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step = [r["step"] for r in recs]
    val = [(r["step"], r["val_accuracy"]) for r in recs if "val_accuracy" in r]

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.3))
    axes[0].plot(step, [r["loss"] for r in recs], label="after adaptation")
    if "pre_loss" in recs[0]:   # logged when cfg.track_pre_adaptation is on
      axes[0].plot(step, [r["pre_loss"] for r in recs], ":", label="before adaptation")
    axes[0].set(xlabel="meta step", ylabel="query cross-entropy", title="training loss")
    axes[1].plot(step, [r["accuracy"] for r in recs], label="train tasks")
    axes[1].plot(*zip(*val), "o--", label="validation tasks")
    axes[1].axhline(1 / cfg.ways, color="gray", lw=1, ls=":", label="chance")
    axes[1].set(xlabel="meta step", ylabel="query accuracy after adaptation", title="accuracy")
    axes[2].plot(step, [r["alpha"] for r in recs], "o-")
    axes[2].set(xlabel="meta step", title=f"inner rate alpha (from {cfg.alpha:g})")
    axes[3].plot(step, [r["beta"] for r in recs], "o-")
    axes[3].set(xlabel="meta step", title=f"outer rate beta (from {cfg.beta:g})")
    axes[0].legend(fontsize=8); axes[1].legend(fontsize=8)
    plt.tight_layout()
    plt.show()
    """),
    md("""
    In the committed run (200 steps), `alpha` rises steadily from the default 0.1 to about
    0.15, still rising when the run stops (MAML's hand-tuned value for 5-way Omniglot is 0.4).
    `beta` climbs from 1e-3 to about 0.0048 in the first 60 steps, then drifts down to about
    0.0028. The test-time adaptation chosen on validation tasks, 9 steps at the learned
    `alpha`, scores the same on the test tasks as MAML's fixed 10 steps within the
    confidence interval (91.6% and 91.7%, +- 1.0%). For what the rates do from other
    starting points, see [04_sensitivity](04_sensitivity.ipynb).

    ## The same without `amaml.train`

    `amaml.train.train` is a thin layer over the library. The core of it, for your own loops:

    ```python
    import jax, amaml
    from amaml import data

    model = amaml.models.Conv4(num_classes=5)
    params = model.init(jax.random.key(0), jax.numpy.zeros((1, 28, 28, 1)))["params"]
    loss_fn = amaml.losses.cross_entropy(lambda p, x: model.apply({"params": p}, x))
    learner = amaml.alpha_maml(loss_fn)   # amaml's defaults: alpha0 0.1, beta0 1e-3, normalized rule
    images = jax.device_put(data.load_omniglot("maml").train.images)  # uint8 [classes, 20, 28, 28, 1]

    @jax.jit
    def train_chunk(state, keys):  # len(keys) meta steps, episodes drawn on the device
      def body(state, key):
        return learner.update(state, data.sample_tasks(key, images, 5, 1, 15, 32))
      return jax.lax.scan(body, state, keys)

    state = learner.init(params)
    for i in range(100):
      state, metrics = train_chunk(state, jax.random.split(jax.random.key(i), 100))
    ```
    """),
]

# ---------------------------------------------------------------------------------------------
HYPERGRADIENT = [
    md("""
    # The hypergradient, explained

    Alpha MAML treats the inner learning rate `alpha` as one more parameter: the meta loss
    `L(alpha)` (the query loss after adapting with rate `alpha`) is a differentiable function
    of `alpha`, so `alpha` can follow its gradient. This notebook

    1. draws `L(alpha)` on a toy problem,
    2. checks `dL/dalpha` from `jax.grad` against finite differences and against the one-step
       closed form `-<grad L_query(theta'), grad L_support(theta)>`,
    3. watches hypergradient descent walk `alpha` to the minimum,
    4. uses `amaml.hypergradient` (the same idea for the outer rate) on ordinary, non-meta
       training, against the same optimizer at a fixed rate.
    """),
    code(BUDGET + '''
NUM_TASKS = 50 if FAST else 200      # tasks in the toy meta-batch
HD_STEPS = 20 if FAST else 40        # hypergradient steps on alpha
TRAIN_STEPS = 150 if FAST else 500   # SGD steps of the logistic regression
'''),
    code("""
    import jax
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np
    import optax

    import amaml

    jax.config.update("jax_enable_x64", True)   # float64, for clean finite differences
    """),
    md("""
    ## A toy meta-learning problem: linear regression tasks

    Each task is `y = <w_task, x> + noise` in 5 dimensions, with `w_task` scattered around a
    common mean and input scales from 0.5 to 2 (so the loss is curved differently along
    different directions). The model is linear, `theta = (w, b)`; MAML adapts it with one SGD
    step on the task's 10 support points and scores the 10 query points.
    """),
    code("""
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
    learner = amaml.alpha_maml(loss_fn, inner_steps=1)
    theta = {"w": jnp.zeros(D), "b": jnp.zeros(())}
    batch = linear_tasks(jax.random.key(0), NUM_TASKS)

    # The meta loss: mean over tasks of the query loss after one inner step with rate alpha.
    L = jax.jit(lambda alpha: learner.meta_loss(theta, alpha, batch)[0])
    alphas = jnp.linspace(0.0, 0.2, 201)
    curve = jax.vmap(L)(alphas)
    best = float(alphas[jnp.argmin(curve)])
    print(f"L(0) = {float(L(0.0)):.3f} (no adaptation); min of the curve: L({best:.3f}) = "
          f"{float(curve.min()):.3f}")
    """),
    code("""
    plt.figure(figsize=(6, 3.5))
    plt.plot(alphas, curve)
    plt.axvline(best, color="gray", ls=":", lw=1)
    plt.xlabel("inner rate alpha"); plt.ylabel("meta loss L(alpha)")
    plt.title("query loss after one inner step")
    plt.tight_layout()
    plt.show()
    """),
    md(r"""
    ## The derivative three ways

    With one inner step, `theta' = theta - alpha * grad L_support(theta)`, and the chain rule
    gives

    $$\frac{dL}{d\alpha} = \Big\langle \nabla L_{\rm query}(\theta'),\ \frac{d\theta'}{d\alpha}\Big\rangle
      = -\big\langle \nabla L_{\rm query}(\theta'),\ \nabla L_{\rm support}(\theta)\big\rangle,$$

    averaged over the tasks of the batch: `alpha` should grow when the query gradient after the
    step still points the way the support gradient did, and shrink when the step overshot.
    `jax.grad` gets the same number by differentiating through `amaml.adapt`, and that is what
    `MetaLearner.step` uses (it works for any number of inner steps).
    """),
    code("""
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
    """),
    md("""
    `MetaLearner.step` reports the same quantity as `metrics["alpha_hypergradient"]` (the mean
    over the task batch), computed in the same backward pass as the meta-gradient:
    """),
    code("""
    state = learner.init(theta)._replace(alpha=jnp.asarray(0.05))
    _, metrics = learner.step(state, batch)
    print(f"metrics['alpha_hypergradient'] = {float(metrics['alpha_hypergradient']):.5f}, "
          f"jax.grad(L)(0.05) = {float(dL(0.05)):.5f}")
    """),
    md("""
    ## Hypergradient descent on alpha

    The paper's update for the inner rate is plain gradient descent on `alpha`:
    `alpha <- alpha - alpha_lr * dL/dalpha` (`amaml.hd_step`; in a learner,
    `amaml.alpha_maml_paper`, or `rate_rule="additive"`). amaml's default instead takes
    normalized steps on `log alpha` (the `"normalized"` rule, at the end of this notebook),
    which need no `alpha_lr` chosen for the problem. Here `theta` stays fixed, so the
    curve stays put and we can watch `alpha` walk down it, from a rate far too small and from
    one far too large. With a fresh batch of tasks at every step (as in training) the
    hypergradient is noisy, but the walk ends in about the same place: the minimum of the
    expected meta loss, which the fixed batch of the curve only estimates.
    """),
    code("""
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
    """),
    md("""
    In real meta-training `theta` moves at every step too, so `alpha` chases a moving
    minimum, with one hypergradient step per meta step (see the quickstart notebook, where
    `alpha` falls from 0.1 as `theta` learns).

    ## The same idea for ordinary training: `amaml.hypergradient`

    For a plain optimizer step `params_t = params_{t-1} + beta * u_{t-1}`, the derivative of
    the next loss with respect to the rate is `<g_t, u_{t-1}>`, the dot product of the new
    gradient with the previous update direction (Baydin et al., 2018). `amaml.hypergradient`
    wraps any Optax optimizer with that rule; Alpha MAML uses it for its outer rate `beta`.
    With `hyper_lr=0` it is exactly the wrapped optimizer at a fixed rate.

    The problem: logistic regression on 2,000 synthetic points in 20 dimensions (input scales
    0.3 to 3), minibatch SGD with 32 points per step, from initial rates 0.001 to 10. We
    compare the fixed rate, the paper's additive rule (`rate -= hyper_lr * h`) and amaml's
    `"normalized"` rule (Adam-style normalized steps on `log rate`, computed from the
    hypergradient `h`: every step changes the rate by at most about a factor `exp(hyper_lr)`,
    whatever the scale of the loss), at amaml's default `hyper_lr`,
    `amaml.rates.DEFAULT_HYPER_LR`. Each row of runs is one `vmap` over the initial rates.
    """),
    code("""
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
    """),
    code("""
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
    """),
    md("""
    Reading the plots: at a fixed rate only a narrow band of rates trains well in this budget.
    The additive rule rescues rates that are too small (the rate climbs to ~0.1 in a few
    steps) but hardly moves rates that are too large, because its step is `hyper_lr` times a
    hypergradient whose scale depends on the problem. The normalized rule moves every start
    towards the useful range (here between ~0.06 and ~0.3 after 500 steps), in relative steps
    of at most ~5%: from a rate that is far too large it ends with the lowest losses of the
    three, but from 0.001 it needs a few hundred steps to climb, and the additive rule, whose
    first steps jump straight to ~0.1, ends lower there. `amaml.alpha_maml` applies this
    normalized rule, at this `hyper_lr`, to both `alpha` and `beta` by default (amaml's
    choice); `amaml.alpha_maml_paper` uses the paper's additive rule.
    """),
]

# ---------------------------------------------------------------------------------------------
SENSITIVITY = [
    md("""
    # Sensitivity to the initial rates: MAML vs Alpha MAML

    How much does the result depend on the initial inner rate `alpha0` and the initial outer
    rate `beta0`? We train sinusoid regression on a grid of `(alpha0, beta0)` with three
    methods and compare the held-out error after adaptation:

    - **MAML**: the rates stay fixed (`amaml.maml`);
    - **Alpha MAML, the paper's rule**: the rates adapt by additive hypergradient steps
      `rate -= kappa * h`, with the HD paper's `kappa` (1e-3 for `alpha`, 1e-7 for Adam's
      `beta`), no backtracking (`amaml.alpha_maml_paper`);
    - **Alpha MAML, amaml's default**: amaml's additions, not the paper's: the
      `"normalized"` rule (Adam-style normalized steps on the log rates, at most about 5%
      per step, the same hypergradient rate `amaml.rates.DEFAULT_HYPER_LR` for `alpha` and
      `beta` on every problem) and backtracking (a step whose adaptation more than doubles
      the query loss of not adapting only halves `alpha`) (`amaml.alpha_maml`).

    Every cell of a grid is an independent run with its own parameters, Adam state, `alpha`
    and `beta`. A method's whole grid trains as **one** `jax.vmap`-ped, jitted computation:
    `learner.update` vmapped over cells, inside a `lax.scan` over meta steps.
    """),
    code(BUDGET + '''
ALPHA0S = [0.001, 0.01, 0.1, 1.0] if not FAST else [0.01, 0.1, 1.0]
BETA0S = [1e-4, 1e-3, 1e-2, 3e-2] if not FAST else [1e-4, 1e-3, 1e-2]
ITERATIONS = 200 if FAST else 3000   # meta steps per cell
EVAL_TASKS = 100 if FAST else 600
'''),
    code("""
    import time

    import jax
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np

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
        "amaml default": amaml.alpha_maml(loss_fn, **bounds),
    }
    print(f"amaml default: rule={cfg.rate_rule}, hypergradient rate {amaml.rates.DEFAULT_HYPER_LR} "
          f"for alpha and beta, backtrack={cfg.backtrack}")
    print(f"paper's rule: additive, kappa {amaml.rates.PAPER_ALPHA_LR:g} (alpha) and "
          f"{amaml.rates.PAPER_BETA_LR:g} (beta), no backtracking")
    print(f"{len(ALPHA0S)} x {len(BETA0S)} cells x {ITERATIONS} steps, {cfg.meta_batch} tasks per step")
    """),
    md("""
    ## The grid as one computation

    `learner.init` gives one state. The initial rates live in it: `state.alpha`, and
    `state.opt_state.learning_rate` for `beta` (the Adam optimizer is wrapped in
    `amaml.hypergradient` in all three methods; for MAML its `hyper_lr` is 0). We stack one state
    per cell with those two fields replaced, and vmap the meta step over the stack. All cells
    start from the same `theta` and see the same task batches, so they differ only in the
    rates.
    """),
    code("""
    a_grid, b_grid = np.meshgrid(ALPHA0S, BETA0S, indexing="ij")   # [alphas, betas]

    def initial_states(learner):
      state = learner.init(params)
      def cell(a0, b0):
        return state._replace(alpha=jnp.asarray(a0, state.alpha.dtype),
                              opt_state=state.opt_state._replace(learning_rate=jnp.asarray(b0)))
      return jax.vmap(cell)(jnp.asarray(a_grid.ravel()), jnp.asarray(b_grid.ravel()))

    def train_grid(learner):
      def body(states, key):
        batch = amaml.sinusoid_tasks(key, cfg.meta_batch)       # shared by all cells
        states, m = jax.vmap(learner.update, in_axes=(0, None))(states, batch)
        return states, {k: m[k] for k in ("loss", "alpha", "beta")}

      run = jax.jit(lambda s, keys: jax.lax.scan(body, s, keys))
      keys = jax.random.split(jax.random.key(1), ITERATIONS)
      t0 = time.perf_counter()
      states, hist = jax.block_until_ready(run(initial_states(learner), keys))
      print(f"{a_grid.size} runs x {ITERATIONS} steps in {time.perf_counter() - t0:.1f} s "
            "(one call, compile included)")
      return states, jax.device_get(hist)

    held_out = amaml.sinusoid_tasks(jax.random.key(777), EVAL_TASKS)

    def test_mse(learner, states, inner_steps=1):
      per_cell = jax.vmap(lambda s: learner.evaluate(s.params, s.alpha, held_out,
                                                     inner_steps=inner_steps)["loss"])(states)
      return np.asarray(per_cell.mean(axis=1)).reshape(a_grid.shape)

    results = {}
    for name, learner in learners.items():
      print(name, end=": ")
      states, hist = train_grid(learner)
      results[name] = dict(states=states, hist=hist, mse=test_mse(learner, states))
    """),
    md("""
    ## Heat maps

    Held-out query MSE after one inner step (the training setting), at each run's own final
    `alpha`, on the same tasks for every cell. Same color scale for all methods, capped at
    30; darker is better. Predicting zero for every input (no learning at all) scores about
    3.2: cells above that are marked `*`.
    """),
    code("""
    from matplotlib.colors import LogNorm

    finite = np.concatenate([r["mse"][np.isfinite(r["mse"])] for r in results.values()])
    norm = LogNorm(vmin=finite.min(), vmax=30.0, clip=True)
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.6),
                             constrained_layout=True)
    for ax, (name, r) in zip(axes, results.items()):
      mse = np.where(np.isfinite(r["mse"]), r["mse"], norm.vmax)
      im = ax.imshow(mse, norm=norm, cmap="magma", origin="lower")
      for i in range(len(ALPHA0S)):
        for j in range(len(BETA0S)):
          v = r["mse"][i, j]
          txt = ("NaN" if np.isnan(v) else "inf" if np.isinf(v) else
                 f"{v:.2f}" if v < 10 else f"{v:.3g}")
          ax.text(j, i, txt + ("*" if not v <= 3.2 else ""), ha="center", va="center", fontsize=9,
                  color="white" if mse[i, j] < 3.0 else "black")
      ax.set_xticks(range(len(BETA0S)), [f"{b:g}" for b in BETA0S])
      ax.set_yticks(range(len(ALPHA0S)), [f"{a:g}" for a in ALPHA0S])
      ax.set(xlabel="initial outer rate beta0 (Adam)", ylabel="initial inner rate alpha0",
             title=f"{name}: held-out MSE after 1 step")
    fig.colorbar(im, ax=axes, shrink=0.9, extend="max", label="query MSE (log scale)")
    plt.show()
    for name, r in results.items():
      print(f"{name:13s}: best cell {np.nanmin(r['mse']):.4g}, median {np.nanmedian(r['mse']):.4g}, "
            f"cells worse than predicting zero: {int(np.sum(~(r['mse'] <= 3.2)))} of {r['mse'].size}")
    """),
    md("""
    What the committed run (default budget: 3,000 steps per cell) shows:

    - MAML trains well only near its tuned rates: its best cells, `alpha0 = 0.01` with
      `beta0 >= 0.01` (0.53 and 0.54), are the best of all three methods. With `beta0 = 1e-4`
      it barely learns (about 3.1), from `alpha0 = 0.1` or `1` every `beta0` ends worse than
      predicting zero, and from `alpha0 = 1` with `beta0 = 1e-4` the one-step adaptation blows
      up (about 1e6).
    - The paper's rule with the HD paper's `kappa` diverges in every cell. On this problem the
      first hypergradients of `alpha` are in the thousands, so `kappa = 1e-3` moves `alpha`
      by whole units in one step (from 0.001 to 2.6 in the cell `beta0 = 1e-4`); the next
      adaptation overshoots, `beta`'s hypergradient reaches about -1e12 and `beta` jumps to
      about 1e5, and the parameters are wrecked two or three steps in (the non-finite guard then
      holds the wrecked state). The final rates show the runaway: `beta` between 3e4 and 2e7,
      or `alpha` between 100 and 3e19, in every cell but one. That one,
      `alpha0 = 0.01, beta0 = 0.03`, stays finite and ends worse than predicting zero (3.79). The additive rule needs its `kappa` matched to
      the scale of the problem's hypergradients; the HD paper's values do not fit this one.
    - amaml's default trains in every cell: 0.71 to 0.98 (median 0.84), with no visible
      pattern across the grid, so the starting rates hardly matter. It does not reach MAML's
      best cells (0.53) in 3,000 steps: the price of not tuning, on this budget. From
      `alpha0 = 1` backtracking halves `alpha` in the first steps, and from every start
      `alpha` ends between 0.002 and 0.009. `beta` from 1e-4 rises to about 1e-3 by step
      1,000; from 0.01 and 0.03 it holds for a few hundred steps and then falls; at step 3,000
      it is between 7e-5 and 9e-4 in every cell, whatever `beta0`.

    Where did the two Alpha MAML variants take the rates? Final `alpha` and `beta` per cell,
    then the default's trajectories (`alpha` as a moving average over 50 steps: its per-step
    value is noisy).
    """),
    code("""
    for name in ("paper's rule", "amaml default"):
      st = results[name]["states"]
      final_alpha = np.asarray(st.alpha).reshape(a_grid.shape)
      final_beta = np.asarray(amaml.current_learning_rate(st.opt_state)).reshape(a_grid.shape)
      print(f"{name}: final alpha / final beta")
      print("alpha0 \\\\ beta0  " + "".join(f"{b:>20g}" for b in BETA0S))
      for i, a0 in enumerate(ALPHA0S):
        print(f"{a0:<15g} " + "".join(f"{final_alpha[i, j]:>9.3g} / {final_beta[i, j]:<9.2e}"
                                       for j in range(len(BETA0S))))
      print()

    hist = results["amaml default"]["hist"]
    window = min(50, ITERATIONS // 4)
    smooth = lambda x: np.convolve(x, np.ones(window) / window, mode="valid")
    steps = np.arange(1, ITERATIONS + 1)
    j_mid = int(np.argmin(np.abs(np.log(BETA0S) - np.log(1e-3))))   # the beta0 column nearest 1e-3
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.4))
    for i, a0 in enumerate(ALPHA0S):
      alpha = hist["alpha"][:, np.ravel_multi_index((i, j_mid), a_grid.shape)]
      axes[0].plot(steps, alpha, color=f"C{i}", alpha=0.25, lw=0.5)
      axes[0].plot(steps[window - 1:], smooth(alpha), color=f"C{i}", label=f"alpha0 = {a0:g}")
    axes[0].set(xscale="log", yscale="log", xlabel="meta step", ylabel="alpha",
                title=f"amaml default: alpha (beta0 = {BETA0S[j_mid]:g}; faint: per step)")
    axes[0].legend(fontsize=8)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(BETA0S)))
    for c in range(a_grid.size):
      i, j = np.unravel_index(c, a_grid.shape)
      axes[1].plot(steps, hist["beta"][:, c], color=colors[j], lw=1,
                   label=f"beta0 = {BETA0S[j]:g}" if i == 0 else None)
    axes[1].set(xscale="log", yscale="log", xlabel="meta step", ylabel="beta",
                title="amaml default: beta (all cells)")
    axes[1].legend(fontsize=8)
    plt.tight_layout()
    plt.show()
    """),
    md("""
    `benchmarks/sinusoid.py` runs a larger version of this comparison (initial `alpha` x
    seeds, 20,000 steps); its numbers are in `BENCHMARKS.md`.
    """),
]

NOTEBOOKS = {
    "01_quickstart_sinusoid.ipynb": QUICKSTART,
    "02_omniglot.ipynb": OMNIGLOT,
    "03_hypergradient_explained.ipynb": HYPERGRADIENT,
    "04_sensitivity.ipynb": SENSITIVITY,
}


def build(name: str) -> nbformat.NotebookNode:
  nb = new_notebook(cells=NOTEBOOKS[name])
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                               "language": "python"}
  nb.metadata["language_info"] = {"name": "python"}
  return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 900) -> nbformat.NotebookNode:
  from nbclient import NotebookClient

  NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                 resources={"metadata": {"path": str(HERE)}}).execute()
  return nb


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("only", nargs="*", help="notebook name prefixes (default: all)")
  ap.add_argument("--execute", action="store_true", help="run and save outputs")
  ap.add_argument("--fast", action="store_true", help="with AMAML_NOTEBOOK_FAST=1")
  args = ap.parse_args(argv)
  os.environ["AMAML_NOTEBOOK_FAST"] = "1" if args.fast else "0"
  for name in NOTEBOOKS:
    if args.only and not any(name.startswith(p) for p in args.only):
      continue
    nb = build(name)
    if args.execute:
      t0 = time.perf_counter()
      execute(nb)
      print(f"{name}: executed in {time.perf_counter() - t0:.1f} s", flush=True)
    nbformat.validate(nb)
    nbformat.write(nb, HERE / name)
    print(f"wrote {HERE / name}", file=sys.stderr)


if __name__ == "__main__":
  main()
