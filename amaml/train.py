"""Training and evaluation runs: ``amaml train`` / ``amaml evaluate`` (see :mod:`amaml.cli`).

A run is a directory holding ``config.json``, ``metrics.jsonl`` (one line every
``log_every`` steps: means over those steps, and the rates at their end),
``checkpoints/`` (Orbax, atomic) and ``results.json`` (the final evaluation, with
the versions that produced it).

Speed: training advances in jitted ``lax.scan`` chunks (a whole log line of fast
steps, or one slow step; :data:`CHUNK_SECONDS`) with episodes sampled on the device
(:func:`amaml.data.sample_tasks`), so the host only draws the progress bar and
checks the time budget. (The host sampler, :class:`amaml.data.EpisodeIterator`,
serves loops of your own around ``learner.step``.) The batch of step ``i`` depends
only on ``(seed, i)``, so a resumed run repeats an uninterrupted one exactly.

``train()`` reads top-down: :func:`_prepare` (run directory, configuration, resume),
:func:`_loop` (chunks, log lines, validation, checkpoints, time budget) and
:func:`_finish` (the final evaluation into ``results.json``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from amaml import losses, meta, rates, sharding, signals, validate
from amaml.adaptation import ALPHA_SCALES, best_adaptation, guarded_curves
from amaml.configs import Config
from amaml.env import versions
from amaml.hd import current_learning_rate
from amaml.imaml import imaml
from amaml.stats import mean_confidence_interval
from amaml.task import TaskBatch


class Experiment(NamedTuple):
  """What a configuration builds: the learner, initial parameters and task samplers."""

  config: Config
  learner: meta.MetaLearner
  params: Any
  data: dict  # split name -> device array of images (or None for sinusoid)
  sample: Callable[[jax.Array, Any, int], TaskBatch]  # (key, split data, num_tasks) -> batch


class TaskSetup(NamedTuple):
  """What a task family gives :func:`build`."""

  params: Any  # initial parameters of its model
  loss_fn: Callable  # (params, x, y) -> (loss, aux)
  data: dict  # split name -> device array of images (or None)
  sample: Callable[[jax.Array, Any, int], TaskBatch]  # (key, split data, num_tasks) -> batch
  check: Callable[[TaskBatch, Any], None]  # (a batch, its split's data): raises on bad data
  embed_fn: Callable | None = None  # (params, x) -> features, for metric methods (protonet)


def sinusoid_setup(cfg: Config, key: jax.Array) -> TaskSetup:
  """MAML's sinusoid regression: an MLP, mean squared error, tasks drawn on the device."""
  from amaml.models import MLP
  from amaml.sinusoid import sinusoid_tasks

  model = MLP(hidden=(cfg.hidden, cfg.hidden), out=1)
  params = model.init(key, jnp.zeros((1, 1), jnp.float32))["params"]
  loss_fn = losses.mse(lambda p, x: model.apply({"params": p}, x))

  def sample(k, _, n):
    return sinusoid_tasks(k, n, num_support=cfg.shots, num_query=cfg.queries)

  if cfg.method == "protonet":
    raise ValueError(
      "method protonet needs a classification task (omniglot or image_folder), "
      "not sinusoid regression"
    )
  return TaskSetup(
    params,
    loss_fn,
    {"train": None, "val": None, "test": None},
    sample,
    lambda batch, _: validate.check_regression_batch(batch),
  )


def omniglot_setup(cfg: Config, key: jax.Array) -> TaskSetup:
  """Omniglot N-way K-shot (``cfg.protocol``'s split): ``cfg.model``, cross-entropy."""
  from amaml.data import load_omniglot

  splits = load_omniglot(cfg.protocol, image_size=cfg.image_size, omniglot_dir=cfg.data_dir or None)
  return classification_setup(
    cfg, key, {name: getattr(splits, name) for name in ("train", "val", "test")}
  )


def image_folder_setup(cfg: Config, key: jax.Array) -> TaskSetup:
  """A few-shot image benchmark (``cfg.dataset``) read from ``cfg.data_dir``: ``cfg.model``."""
  from amaml.data.image_folders import load_image_benchmark

  return classification_setup(
    cfg, key, load_image_benchmark(cfg.dataset, cfg.data_dir or None, image_size=cfg.image_size)
  )


def classification_setup(cfg: Config, key: jax.Array, splits: dict) -> TaskSetup:
  """N-way K-shot classification of ``{split: ClassImages or None}``: the images go to the
  device, episodes are sampled there, the model is ``cfg.model`` (Conv4 or ResNet-12) and
  the loss cross-entropy."""
  from amaml.data import sample_tasks

  data = {name: jnp.asarray(src.images) for name, src in splits.items() if src is not None}
  for name, images in data.items():
    if cfg.ways > images.shape[0]:
      raise ValueError(
        f"ways={cfg.ways} is more than the {images.shape[0]} classes of the "
        f"{name} split; lower --ways"
      )
    if cfg.shots + cfg.queries > images.shape[1]:
      raise ValueError(
        f"shots + queries = {cfg.shots + cfg.queries} is more than the "
        f"{images.shape[1]} examples per class; lower --shots or --queries"
      )
  # ProtoNets: the same network without its head, an embedding
  model = image_model(cfg, num_classes=0 if cfg.method == "protonet" else cfg.ways)
  shape = data["train"].shape[2:]
  params = model.init(key, jnp.zeros((1, *shape), jnp.float32))["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  loss_fn = losses.cross_entropy(apply_fn)

  def sample(k, images, n):
    return sample_tasks(k, images, cfg.ways, cfg.shots, cfg.queries, n)

  def check(batch, images):
    validate.check_classification_batch(batch, cfg.ways, tuple(images.shape[2:]))

  return TaskSetup(params, loss_fn, data, sample, check, embed_fn=apply_fn)


def image_model(cfg: Config, num_classes: int):
  """The Flax network ``cfg.model`` of the image tasks with ``num_classes`` logits (0: no
  head, an embedding): ``Conv4`` with ``cfg.hidden`` filters or ``ResNet12``."""
  from amaml.models import Conv4, ResNet12

  if cfg.model == "resnet12":
    return ResNet12(num_classes=num_classes, conv_impl=cfg.conv_impl)
  return Conv4(num_classes=num_classes, hidden=cfg.hidden, conv_impl=cfg.conv_impl)


# Config.task -> its setup. A new task family is one function here and its name in
# amaml.configs.TASKS.
TASKS: dict[str, Callable[[Config, jax.Array], TaskSetup]] = {
  "sinusoid": sinusoid_setup,
  "omniglot": omniglot_setup,
  "image_folder": image_folder_setup,
}


def build(cfg: Config) -> Experiment:
  """Model, loss, learner and data for ``cfg`` (its task's setup from :data:`TASKS`)."""
  cfg.validate()
  setup = TASKS[cfg.task](cfg, run_keys(cfg).init)
  learner = make_learner(cfg, setup.loss_fn, setup.embed_fn)
  # one batch of each split, checked on the host before anything is compiled for them
  for images in setup.data.values():
    setup.check(setup.sample(jax.random.key(0), images, 2), images)
  return Experiment(cfg, learner, setup.params, setup.data, setup.sample)


def outer_optimizer(name: str):
  """The outer optimizer: ``optax.adam`` (a factory, wrapped in :func:`amaml.hypergradient`
  so that ``beta`` can adapt) or a built learning-rate-free optimizer of ``optax.contrib``."""
  import optax

  if name in ("adam", "sgd"):
    return getattr(optax, name)
  if name == "mechanize":
    return optax.contrib.mechanize(optax.adam(1.0))
  return getattr(optax.contrib, name)()


def _fixed_rate_outer_optimizer(cfg: Config, rate=None):
  """The built outer optimizer of a method that does not adapt its rate (reptile, protonet):
  a factory (adam, sgd) at ``rate`` (a number or an Optax schedule; default
  ``cfg.resolved_beta``), or a learning-rate-free one as it is."""
  outer = outer_optimizer(cfg.resolved_outer_optimizer)
  return outer if hasattr(outer, "update") else outer(cfg.resolved_beta if rate is None else rate)


def make_learner(cfg: Config, loss_fn, embed_fn=None) -> meta.MetaLearner:
  """The :class:`~amaml.meta.MetaLearner` of ``cfg.method`` for ``loss_fn`` (``embed_fn``:
  the embedding that protonet compares)."""
  if cfg.method == "imaml":
    return imaml(
      loss_fn,
      lam=cfg.imaml_lambda,
      alpha=cfg.alpha,
      inner_steps=cfg.inner_steps,
      cg_steps=cfg.cg_steps,
      optimizer=_fixed_rate_outer_optimizer(cfg),
      inner_optimizer=cfg.inner_optimizer,
      track_pre_adaptation=cfg.track_pre_adaptation,
    )
  if cfg.method == "protonet":
    return meta.protonet(embed_fn, ways=cfg.ways, optimizer=_fixed_rate_outer_optimizer(cfg))
  if cfg.method == "reptile":  # its own SGD logs epsilon; another outer optimizer takes it
    epsilon = meta.epsilon_schedule(
      cfg.resolved_epsilon, cfg.iterations, cfg.resolved_epsilon_schedule
    )
    own = cfg.resolved_outer_optimizer == "sgd"
    return meta.reptile(
      loss_fn,
      alpha=cfg.alpha,
      inner_steps=cfg.inner_steps,
      epsilon=epsilon,
      optimizer=None if own else _fixed_rate_outer_optimizer(cfg, epsilon),
      track_pre_adaptation=cfg.track_pre_adaptation,
      inner_params=cfg.inner_params or None,
      inner_optimizer=cfg.inner_optimizer,
    )
  kwargs = dict(
    alpha=cfg.alpha,
    beta=cfg.resolved_beta,
    inner_steps=cfg.inner_steps,
    optimizer=outer_optimizer(cfg.resolved_outer_optimizer),
    track_pre_adaptation=cfg.track_pre_adaptation,
    remat=cfg.remat,
    unroll=True if cfg.unroll else 1,
    alpha_min=cfg.alpha_min,
    alpha_max=cfg.alpha_max,
    beta_min=cfg.beta_min,
    beta_max=cfg.beta_max,
    inner_optimizer=cfg.inner_optimizer,
  )
  rates = dict(alpha_lr=cfg.alpha_lr, beta_lr=cfg.beta_lr)
  plus = cfg.method == "maml++"  # MAML++'s own defaults where a field says none (or 0)
  per_step = (
    cfg.per_step_params if cfg.per_step_params is not None else (_norms(cfg) if plus else None)
  )
  kwargs.update(
    alpha_per_step=plus if cfg.alpha_per_step is None else cfg.alpha_per_step,
    per_step_params=per_step or None,
  )
  if plus:
    return meta.maml_plus_plus(
      loss_fn,
      **{
        **kwargs,
        "alpha_min": None,
        "alpha_max": cfg.alpha_max,
        "multi_step_loss": cfg.multi_step_loss or 5000,
        "first_order_steps": cfg.first_order_steps or 25000,
      },
    )
  kwargs.update(multi_step_loss=cfg.multi_step_loss, first_order_steps=cfg.first_order_steps)
  if cfg.alpha_granularity is not None:  # validate() allows it for alpha-maml(-paper) only
    kwargs.update(alpha_granularity=cfg.alpha_granularity)
  if cfg.method == "alpha-maml":
    return meta.alpha_maml(
      loss_fn, rate_rule=cfg.rate_rule, backtrack=cfg.backtrack, **rates, **kwargs
    )
  if cfg.method == "alpha-maml-paper":
    return meta.alpha_maml_paper(loss_fn, **rates, **kwargs)
  if cfg.method == "meta-sgd":
    return meta.meta_sgd(loss_fn, **{**kwargs, "alpha_min": None, "alpha_max": cfg.alpha_max})
  if cfg.method == "anil":
    return meta.anil(loss_fn, inner_params=cfg.inner_params or _HEADS[cfg.task], **kwargs)
  return meta.maml(
    loss_fn, first_order=cfg.method == "fomaml", inner_params=cfg.inner_params or None, **kwargs
  )


# the model head of each task's model: what ANIL adapts unless --inner_params says otherwise
_HEADS = {"sinusoid": "^Dense_2/", "omniglot": "^head/", "image_folder": "^head/"}
# the batch-norm parameters of each task's model: what maml++ keeps one copy of per inner step
_NORMS = {"omniglot": "^norm", "image_folder": "^norm"}
# ResNet-12 keeps its batch norms in its blocks (block0/norm0/scale, block3/norm_shortcut/bias)
_MODEL_NORMS = {"resnet12": r"^block\d+/norm"}


def _norms(cfg: Config) -> str | None:
  """The batch-norm pattern of ``cfg``'s model (``_MODEL_NORMS``, else ``_NORMS``)."""
  if cfg.task in _NORMS and cfg.model in _MODEL_NORMS:
    return _MODEL_NORMS[cfg.model]
  return _NORMS.get(cfg.task)


class RunKeys(NamedTuple):
  """The random keys of a run, all derived from ``cfg.seed`` here and nowhere else."""

  init: jax.Array  # the model's initial weights
  train: jax.Array  # meta step i samples its tasks with fold_in(train, i)
  eval: jax.Array  # split s, batch b of an evaluation: fold_in(fold_in(eval, s), b)


def run_keys(cfg: Config | int | jax.Array) -> RunKeys:
  """The keys of ``cfg``'s run, or of the run with this seed (see :class:`RunKeys`); a
  traced seed works too (a vmap over seeds)."""
  root = jax.random.key(cfg.seed if isinstance(cfg, Config) else cfg)
  return RunKeys(*(jax.random.fold_in(root, i) for i in range(3)))


def step_batch(exp: Experiment, images, step) -> TaskBatch:
  """The tasks that meta step ``step`` trains on: sampled from ``fold_in(train key, step)``."""
  key = jax.random.fold_in(run_keys(exp.config).train, step)
  return exp.sample(key, images, exp.config.meta_batch)


def make_train_chunk(exp: Experiment, length: int, mesh=None, update=None):
  """Up to ``length`` meta steps as one jitted loop: ``(state, images, start, steps) ->
  (state, metrics)`` runs ``min(steps, length)`` steps from step ``start`` and returns the
  metrics stacked over ``length`` rows (the first ``steps`` are the steps taken). Step ``i``
  samples its tasks from ``(seed, i)`` on the device. The number of steps is a traced
  argument: one compiled loop serves every chunk size, so how a run is cut into chunks
  never changes its numbers (a resumed run equals an uninterrupted one bitwise). With a
  ``mesh`` (:mod:`amaml.sharding`) each batch is split over its devices by task and the
  state stays replicated. The input state is donated. ``update``: the meta step (default
  ``exp.learner.update``; a phase's, :func:`amaml.meta.phase_at`, for the steps it holds)."""
  update = exp.learner.update if update is None else update

  def one(st, images, i):
    batch = step_batch(exp, images, i)
    if mesh is not None:
      batch = sharding.constrain_batch(batch, mesh)
    return update(st, batch)

  def chunk(state, images, start, steps):
    shapes = jax.eval_shape(one, state, images, start)[1]
    rows = jax.tree.map(lambda s: jnp.zeros((length, *s.shape), s.dtype), shapes)

    def body(j, carry):
      st, rows = carry
      st, m = one(st, images, start + j)
      return st, jax.tree.map(lambda r, v: r.at[j].set(v), rows, m)

    return jax.lax.fori_loop(0, jnp.minimum(steps, length), body, (state, rows))

  if mesh is None:
    return jax.jit(chunk, donate_argnums=(0,))
  return jax.jit(chunk, donate_argnums=(0,), out_shardings=sharding.replicated(mesh))


def eval_batches(exp: Experiment, split: str, num_tasks: int):
  """The fixed evaluation batches of ``split`` (they depend only on the seed and the split)."""
  cfg = exp.config
  if split not in exp.data:
    raise ValueError(f"this protocol has no {split!r} split")
  images = exp.data[split]
  eval_key = jax.random.fold_in(run_keys(cfg).eval, {"train": 0, "val": 1, "test": 2}[split])
  for b in range(math.ceil(num_tasks / cfg.eval_batch)):
    yield exp.sample(jax.random.fold_in(eval_key, b), images, cfg.eval_batch)


def _curves(exp: Experiment, params, alpha, batches, steps: int, guard: bool) -> dict:
  """Per-task adaptation curves over ``batches`` (:attr:`MetaLearner.adaptation_curve`),
  with the support-loss guard (:func:`amaml.adaptation.support_guard`) if ``guard``."""
  outs = [
    jax.device_get(exp.learner.adaptation_curve(params, alpha, b, inner_steps=steps))
    for b in batches
  ]
  out = {k: np.concatenate([np.asarray(o[k]) for o in outs]) for k in outs[0]}
  return guarded_curves(out) if guard else out


def select_adaptation(
  exp: Experiment,
  params,
  alpha,
  split: str = "val",
  num_tasks: int | None = None,
  max_steps: int | None = None,
  scales=ALPHA_SCALES,
  guard: bool = True,
) -> dict:
  """Test-time adaptation chosen on meta-validation tasks, so that it cannot diverge.

  Every ``(scale, steps)`` with ``scale`` in ``scales`` (the inner rate is ``scale *
  alpha``) and ``steps`` in ``0..max_steps`` (default ``eval_inner_steps``) is scored
  on ``num_tasks`` (default ``val_tasks``) tasks of ``split``, by query accuracy when
  the loss reports one, else by query loss, each task adapting under the support-loss
  guard (``guard``, :func:`amaml.adaptation.support_guard`). One
  :attr:`MetaLearner.adaptation_curve` pass per scale scores every step count. Returns
  the best ``inner_steps`` and ``alpha_scale``, and the score of each candidate.
  """
  cfg = exp.config
  num_tasks = num_tasks or cfg.val_tasks
  max_steps = max_steps or cfg.eval_inner_steps
  batches = list(eval_batches(exp, split, num_tasks))
  curves = {}
  for scale in scales:
    out = _curves(exp, params, jax.tree.map(lambda x: x * scale, alpha), batches, max_steps, guard)
    key = "accuracy" if "accuracy" in out else "loss"
    curves[scale] = out[key][:num_tasks].mean(axis=0)
  scale, steps, scores = best_adaptation(curves, higher_is_better=key == "accuracy")
  return {
    "inner_steps": steps,
    "alpha_scale": scale,
    "split": split,
    "tasks": num_tasks,
    "selected_by": key,
    "guard": guard,
    "scores": scores,
  }


def evaluate(
  exp: Experiment,
  params,
  alpha,
  split: str = "test",
  num_tasks: int | None = None,
  inner_steps: int | None = None,
  progress: bool = False,
  alpha_scale: float = 1.0,
  guard: bool = False,
) -> dict:
  """Meta-test: adapt on ``num_tasks`` fresh tasks of ``split`` and summarise.

  Returns means and 95% confidence half-widths over tasks of the query loss (and
  accuracy) before and after ``inner_steps`` adaptation steps (default:
  ``eval_inner_steps``) at the rate ``alpha_scale * alpha``; with ``guard``, each task
  stops before a step that raises its support loss above where it started
  (:func:`amaml.adaptation.support_guard`). Tasks depend only on the seed and the split.
  """
  cfg = exp.config
  num_tasks = num_tasks or cfg.eval_tasks
  inner_steps = cfg.eval_inner_steps if inner_steps is None else inner_steps
  a = jax.tree.map(lambda x: x * alpha_scale, alpha)
  per_task: dict[str, list] = {}
  it = eval_batches(exp, split, num_tasks)
  if progress:
    from tqdm.auto import tqdm

    it = tqdm(
      it,
      total=math.ceil(num_tasks / cfg.eval_batch),
      desc=f"evaluate {split}",
      unit="batch",
      leave=False,
    )
  for batch in it:
    out = (
      _guarded_evaluate(exp, params, a, batch, inner_steps)
      if guard
      else exp.learner.evaluate(params, a, batch, inner_steps=inner_steps)
    )
    for k, v in out.items():
      per_task.setdefault(k, []).append(np.asarray(v))
  summary = {
    "split": split,
    "tasks": num_tasks,
    "inner_steps": inner_steps,
    "alpha_scale": alpha_scale,
  }
  for k, v in per_task.items():
    m, ci = mean_confidence_interval(np.concatenate(v)[:num_tasks])
    summary[k] = m
    summary[f"{k}_ci95"] = ci
  return summary


def _guarded_evaluate(exp: Experiment, params, alpha, batch, inner_steps: int) -> dict:
  """:attr:`MetaLearner.evaluate`'s per-task metrics under the support-loss guard."""
  curves = _curves(exp, params, alpha, [batch], inner_steps, guard=True)
  curves.pop("support_loss", None)
  out = {f"pre_{k}": v[:, 0] for k, v in curves.items()}
  out.update({k: v[:, inner_steps] for k, v in curves.items()})
  return out


def meta_test(
  exp: Experiment, params, alpha, num_tasks: int | None = None, progress: bool = False
) -> dict:
  """The final evaluation on the meta-test split, with the test-time adaptation of
  ``test_adaptation``: ``"select"`` chooses it on meta-validation tasks
  (:func:`select_adaptation`), adapts each test task under the support-loss guard, and also
  reports MAML's fixed protocol (no guard) when the choice differs from it; ``"fixed"`` is
  MAML's protocol alone."""
  cfg = exp.config
  if cfg.method == "protonet":  # no inner loop: nothing to adapt or to choose
    return {"test": evaluate(exp, params, alpha, "test", num_tasks, 0, progress)}
  if cfg.test_adaptation == "fixed":
    return {"test": evaluate(exp, params, alpha, "test", num_tasks, progress=progress)}
  split = "val" if "val" in exp.data else "train"  # Omniglot's lake protocol has no val
  choice = select_adaptation(exp, params, alpha, split)
  out = {
    "test": evaluate(
      exp,
      params,
      alpha,
      "test",
      num_tasks,
      choice["inner_steps"],
      progress,
      choice["alpha_scale"],
      guard=True,
    ),
    "test_adaptation": choice,
  }
  if (choice["inner_steps"], choice["alpha_scale"]) != (cfg.eval_inner_steps, 1.0):
    out["test_fixed"] = evaluate(exp, params, alpha, "test", num_tasks, progress=progress)
  return out


def _summarise(ms: dict) -> dict:
  """One log line from metrics stacked over its steps (:data:`amaml.meta.METRIC_REDUCTIONS`)."""
  out = {}
  for k, v in ms.items():
    v = np.asarray(v)
    how = meta.METRIC_REDUCTIONS.get(k, "mean")
    if how == "last":
      out[k] = float(v[-1])
    elif how == "sum":
      out[f"{k}_steps"] = int(v.sum())
    else:
      finite = v[np.isfinite(v)]
      out[k] = float(finite.mean()) if finite.size else float("nan")
  return out


def _truncate_metrics(path: Path, last_step: int) -> None:
  if not path.exists():
    return
  keep = []
  for line in path.read_text().splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by a killed process
      continue
    if rec.get("step", 0) <= last_step:
      keep.append(line)
  tmp = path.with_suffix(".tmp")
  tmp.write_text("".join(l + "\n" for l in keep))
  os.replace(tmp, path)


#: Training advances in calls of the jitted loop (:func:`make_train_chunk`) of about this many
#: seconds (at least one step, at most a log line), so that ``max_minutes`` is honoured to
#: within this much (or one step, if a step is longer). Each call has a fixed cost (on CPU,
#: about 0.35 s for Omniglot 5w1s: its temporary buffers are allocated per call), so calls
#: of one step would train about 20% slower there (BENCHMARKS.md, "Training loop").
CHUNK_SECONDS = 30.0


class _Run(NamedTuple):
  """What :func:`train` prepares: where the run lives, what it trains, and from where."""

  cfg: Config
  out: Path
  exp: Experiment
  state: meta.MetaState
  start: int
  images: Any  # the training split (replicated over the mesh when sharded)
  mesh: Any
  ckpt: Any  # amaml.checkpoint.Checkpointer


def train(
  cfg: Config,
  out_dir: str | os.PathLike,
  *,
  resume: bool = False,
  progress: bool = True,
  evaluate_at_end: bool = True,
) -> tuple[meta.MetaState, dict]:
  """Trains ``cfg`` into ``out_dir``; with ``resume`` continues from its last checkpoint.
  With several processes (:func:`amaml.sharding.initialize` first) every process calls it
  alike; process 0 writes the files.

  Returns the final state and the results dict (also written to ``results.json``).
  Stops with ``FloatingPointError`` after ``max_nonfinite`` non-finite steps in a
  row (the guard keeps the state finite, so no checkpoint holds NaN), and with
  :class:`amaml.signals.Interrupted` after a checkpoint on SIGINT or SIGTERM.
  """
  run = _prepare(cfg, Path(out_dir), resume)
  state, step, train_s, compile_s = _loop(run, progress)
  return state, _finish(run, state, step, train_s, compile_s, evaluate_at_end, progress)


def _prepare(cfg: Config, out: Path, resume: bool) -> _Run:
  """Checks ``cfg`` and ``out``, writes ``config.json``, builds the experiment, restores."""
  from amaml.checkpoint import Checkpointer

  cfg.validate()
  mesh = None
  if cfg.devices != 1 or jax.process_count() > 1:  # before any file is written: fails on too
    mesh = _mesh(cfg)  # few devices or an uneven split
    sharding.check_divisible(cfg.meta_batch, mesh)
  out.mkdir(parents=True, exist_ok=True)
  cfg_path = out / "config.json"
  if cfg_path.exists() and resume:
    old = Config.from_json(cfg_path.read_text())
    may_change = ("iterations", "devices", "max_minutes", "tensorboard")
    diff = {
      f.name: (getattr(old, f.name), getattr(cfg, f.name))
      for f in dataclasses.fields(Config)
      if getattr(old, f.name) != getattr(cfg, f.name) and f.name not in may_change
    }
    if diff:
      raise ValueError(
        f"--resume with a configuration that differs from {cfg_path}: {diff}; "
        f"use the same settings (only {', '.join(may_change)} may change) or a new --out"
      )
  elif (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()) and not resume:
    raise FileExistsError(
      f"{out} already holds a run: pass --resume to continue it, or choose another --out"
    )
  if _primary():
    tmp = cfg_path.with_suffix(".tmp")
    tmp.write_text(cfg.to_json())
    os.replace(tmp, cfg_path)

  exp = build(cfg)
  ckpt = Checkpointer(out / "checkpoints")
  state = exp.learner.init(jax.tree.map(jnp.copy, exp.params))  # the chunks donate it
  images = exp.data["train"]
  if mesh is not None:  # data parallel: tasks split over devices, state and images replicated
    state, images = sharding.replicate((state, images), mesh)
  start = 0
  if resume and ckpt.latest_step() is not None:  # onto the shardings of ``state``
    try:
      state = ckpt.restore_newest_intact(state, remove_corrupt=True)
    except BaseException:
      ckpt.close()
      raise
    start = int(sharding.host_local(state.step))
  elif cfg.alpha_search:
    state = _search_alpha(exp, state, images)
  if _primary():
    _truncate_metrics(out / "metrics.jsonl", start)
  return _Run(cfg, out, exp, state, start, images, mesh, ckpt)


def _search_alpha(exp: Experiment, state: meta.MetaState, images) -> meta.MetaState:
  """``--alpha_search``: alpha0 scaled by :func:`amaml.rates.search_alpha` on the tasks of
  meta step 0 (the same tasks the first step then trains on)."""
  search = jax.jit(functools.partial(rates.search_alpha, exp.learner.meta_loss))
  return search(state, step_batch(exp, images, 0))


def _primary() -> bool:
  """Whether this process writes the run's files (process 0 of several; the only one)."""
  return jax.process_index() == 0


def _mesh(cfg: Config):
  """The task mesh of ``cfg.devices``; with several processes (:func:`amaml.sharding.initialize`)
  it spans the devices of them all (``devices`` 0 or 1)."""
  if jax.process_count() > 1 and cfg.devices not in (0, 1, jax.device_count()):
    raise ValueError(
      f"devices={cfg.devices} with {jax.process_count()} processes: several "
      "processes train on all their devices; pass --devices 0"
    )
  return sharding.task_mesh(0 if jax.process_count() > 1 else cfg.devices)


def _loop(run: _Run, progress: bool):
  """Meta steps from ``run.start`` to ``iterations`` (or ``max_minutes``): a log line every
  ``log_every`` steps, validation and checkpoints at their multiples, a checkpoint at the end.

  The first two calls take single steps; once a step's time is known, each call takes
  as many steps as fit in :data:`CHUNK_SECONDS` (at least one, at most to the next log
  line). One compiled loop serves every call size (:func:`make_train_chunk`), so chunking
  changes no result. A learner with phases (:func:`amaml.meta.phase_at`: MAML++'s first-
  and second-order steps) gets one loop per phase, compiled when the run reaches it; no
  call crosses into the next phase, and a phase's first two calls take single steps again.
  The progress bar is refreshed every second by a thread, so it moves (elapsed time, and
  time against the budget) while a call runs. SIGINT or SIGTERM stops it after the current
  call: a log line, a checkpoint, then :class:`amaml.signals.Interrupted`
  (:mod:`amaml.signals`)."""
  cfg, exp, state, step = run.cfg, run.exp, run.state, run.start
  chunk, chunk_phase = None, None  # the loop of the phase being run, and its first step
  per_call, pending, step_s, fresh = 1, [], None, True
  budget_s = 60 * cfg.max_minutes
  primary = _primary()  # with several processes, process 0 alone draws and writes
  bar = _progress_bar(cfg, step) if progress and primary else None
  t_start = t_line = time.perf_counter()
  ticker = _Ticker(bar, t_start, budget_s)
  board = _tensorboard(run.out) if cfg.tensorboard and primary else None
  compile_s = None
  try:
    with (
      ticker,
      signals.StopRequest() as stop,
      open(run.out / "metrics.jsonl", "a") if primary else contextlib.nullcontext() as log,
    ):
      while step < cfg.iterations:
        phase = meta.phase_at(exp.learner, step)
        if phase.start != chunk_phase:  # a new phase: its own loop, its step time measured anew
          chunk = make_train_chunk(exp, cfg.log_every, run.mesh, phase.update)
          chunk_phase, per_call, step_s, fresh = phase.start, 1, None, True
        n = min(per_call, cfg.log_every - step % cfg.log_every, cfg.iterations - step)
        n = n if phase.end is None else min(n, phase.end - step)
        t0 = time.perf_counter()
        state, ms = chunk(state, run.images, np.int32(step), np.int32(n))  # host values: the
        # same in every process
        ms = jax.tree.map(lambda x: x[:n], sharding.host_local(ms))
        signals.wait_ready(ms["nonfinite_streak"])  # signal handlers run meanwhile
        streak = int(np.asarray(ms["nonfinite_streak"]).max())  # waits for the chunk
        dt = time.perf_counter() - t0
        if fresh:  # the phase's first call: its loop compiled in it
          compile_s = dt if compile_s is None else compile_s
          fresh = False
        elif step_s is None:  # the second single step: no compilation in it
          step_s = dt
          per_call = max(1, min(cfg.log_every, int(CHUNK_SECONDS // max(step_s, 1e-9))))
          per_call = int(sharding.agree(per_call))  # every process: the same chunks
        step += n
        pending.append(ms)
        elapsed = time.perf_counter() - t_start
        out_of_time = bool(sharding.agree(budget_s > 0 and elapsed >= budget_s))
        signum = int(sharding.agree(stop.signum or 0))  # SIGINT, SIGTERM: stop here
        halt = out_of_time or signum > 0
        if (
          step % cfg.log_every == 0 or step >= cfg.iterations or halt or streak >= cfg.max_nonfinite
        ):
          stacked = jax.device_get(jax.tree.map(lambda *x: np.concatenate(x), *pending))
          steps_in_line = len(stacked["loss"])
          rec = {
            "step": step,
            **_summarise(stacked),
            "steps_per_s": steps_in_line / max(time.perf_counter() - t_line, 1e-9),
          }
          pending, t_line = [], time.perf_counter()
          if cfg.val_every and step % cfg.val_every == 0 and "val" in exp.data:
            val = evaluate(
              exp,
              *sharding.host_local((state.params, state.alpha)),
              "val",
              cfg.val_tasks,
              inner_steps=cfg.inner_steps,
            )
            rec.update({f"val_{k}": v for k, v in val.items() if isinstance(v, float)})
          if log is not None:
            log.write(json.dumps(rec) + "\n")
            log.flush()
          if board is not None:
            _write_scalars(board, rec)
          if bar is not None:
            bar.set_postfix(_bar_fields(rec), refresh=False)
        if bar is not None and not budget_s:
          bar.update(n)
        if streak >= cfg.max_nonfinite:
          outer_rate = "--epsilon" if cfg.method == "reptile" else "--beta"
          raise FloatingPointError(
            f"{cfg.max_nonfinite} non-finite meta steps in a row by step {step}: the state was "
            f"kept finite and the last good checkpoint is in {run.ckpt.directory}. "
            "Lower --alpha or "
            f"{outer_rate}, or use the default --method alpha-maml (normalized rule with "
            "backtracking)"
          )
        if (
          (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
          or step >= cfg.iterations
          or halt
        ):
          run.ckpt.save(step, state)
        if signum:
          raise signals.Interrupted(signum, step, f"{run.ckpt.directory}/{step}")
        if halt:
          break
  finally:
    if bar is not None:
      bar.close()
    if board is not None:
      board.close()
    run.ckpt.close()
  return state, step, time.perf_counter() - t_start, compile_s


def _tensorboard(out: Path):
  """A TensorBoard writer for ``out/tensorboard`` (tensorboardX: no TensorFlow needed)."""
  from tensorboardX import SummaryWriter

  return SummaryWriter(str(out / "tensorboard"))


def _write_scalars(board, rec: dict) -> None:
  """The numbers of one ``metrics.jsonl`` line, at its step, under the same names."""
  for k, v in rec.items():
    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
      board.add_scalar(k, v, rec["step"])
  board.flush()


class _Ticker:
  """Refreshes a progress bar every second from a thread while training runs; with a time
  budget it also sets the bar to the seconds elapsed."""

  def __init__(self, bar, t_start: float, budget_s: float):
    import threading

    self.bar, self.t_start, self.budget_s = bar, t_start, budget_s
    self.stop = threading.Event()
    self.thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self.stop.wait(1.0):
      if self.budget_s:
        self.bar.n = min(time.perf_counter() - self.t_start, self.budget_s)
      self.bar.refresh()

  def __enter__(self):
    if self.bar is not None:
      self.thread.start()
    return self

  def __exit__(self, *exc):
    self.stop.set()
    if self.bar is not None:
      self.thread.join()
      if self.budget_s:
        self.bar.n = min(time.perf_counter() - self.t_start, self.budget_s)
        self.bar.refresh()


def _progress_bar(cfg: Config, start: int):
  """Steps against ``iterations``; with ``max_minutes``, seconds against the time budget."""
  from tqdm.auto import tqdm

  desc = f"{cfg.method} {cfg.task}"
  if cfg.max_minutes:
    return tqdm(
      total=round(60 * cfg.max_minutes),
      desc=f"{desc} (time budget)",
      unit="s",
      dynamic_ncols=True,
      bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]",
    )
  return tqdm(total=cfg.iterations, initial=start, desc=desc, unit="step", dynamic_ncols=True)


def _bar_fields(rec: dict) -> dict:
  post = {"step": rec["step"], "loss": f"{rec['loss']:.3f}"}
  if "accuracy" in rec:
    post["acc"] = f"{rec['accuracy']:.3f}"
  post["alpha"] = f"{rec['alpha']:.3g}"
  for rate in ("beta", "epsilon"):
    if rate in rec:
      post[rate] = f"{rec[rate]:.3g}"
  post["it/s"] = f"{rec['steps_per_s']:.2g}"
  return post


def _finish(
  run: _Run, state, step: int, train_s: float, compile_s, evaluate_at_end: bool, progress: bool
) -> dict:
  """The final evaluation, written atomically to ``results.json`` (by process 0; every
  process evaluates its own copy of the state, so each returns the same results)."""
  state = sharding.host_local(state)
  results = {
    "config": dataclasses.asdict(run.cfg),
    "steps": step,
    "train_seconds": train_s,
    "first_chunk_seconds_incl_compile": compile_s,
    "final_alpha": float(meta.tree_mean(state.alpha)),
    "versions": versions(),
  }
  beta = current_learning_rate(state.opt_state)
  results["final_beta"] = None if beta is None else float(beta)
  if evaluate_at_end:
    results.update(meta_test(run.exp, state.params, state.alpha, progress=progress))
  if _primary():
    tmp = run.out / "results.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, run.out / "results.json")
  return results


def load_run(
  run_dir: str | os.PathLike, step: int | None = None
) -> tuple[Experiment, meta.MetaState]:
  """The experiment and state saved in ``run_dir``: checkpoint ``step``, or the newest that
  can be read (each newer one that cannot is named on stderr; see
  :meth:`amaml.checkpoint.Checkpointer.restore_newest_intact`)."""
  from amaml.checkpoint import Checkpointer

  run = Path(run_dir)
  if not (run / "config.json").exists():
    raise FileNotFoundError(
      f"{run} has no config.json: is it a run directory written by amaml train?"
    )
  cfg = Config.from_json((run / "config.json").read_text())
  exp = build(cfg)
  ckpt = Checkpointer(run / "checkpoints")
  try:
    target = exp.learner.init(exp.params)
    state = ckpt.restore_newest_intact(target) if step is None else ckpt.restore(target, step)
  finally:
    ckpt.close()
  return exp, state


def format_results(results: dict) -> str:
  """A readable summary of a results dict."""
  cfg = results.get("config", {})
  t = results["test"]
  lines = [
    f"{cfg.get('method', '?')} on {cfg.get('task', '?')}: {results.get('steps', '?')} meta steps"
    + (f" in {results['train_seconds']:.0f} s" if "train_seconds" in results else "")
  ]
  how = f"{t['inner_steps']} inner steps" if cfg.get("method") != "protonet" else "no inner loop"
  if t.get("alpha_scale", 1.0) != 1.0:
    how += f" at {t['alpha_scale']:g} x alpha"
  if "test_adaptation" in results:
    choice = results["test_adaptation"]
    how += f", chosen on {choice['tasks']} {choice['split']} tasks"
  if "accuracy" in t:
    lines.append(
      f"  meta-test accuracy on {t['tasks']} tasks ({how}): "
      f"{100 * t['accuracy']:.2f}% +- {100 * t['accuracy_ci95']:.2f}% (95% CI)"
    )
  else:
    lines.append(f"  meta-test on {t['tasks']} tasks ({how})")
  lines.append(
    f"  query loss before adaptation {t['pre_loss']:.4f} +- {t['pre_loss_ci95']:.4f}, "
    f"after {t['loss']:.4f} +- {t['loss_ci95']:.4f}"
  )
  fixed = results.get("test_fixed")
  if fixed is not None and "accuracy" in fixed:
    lines.append(
      f"  with MAML's fixed protocol ({fixed['inner_steps']} steps at alpha): "
      f"{100 * fixed['accuracy']:.2f}% +- {100 * fixed['accuracy_ci95']:.2f}%"
    )
  elif fixed is not None:
    lines.append(
      f"  with MAML's fixed protocol ({fixed['inner_steps']} steps at alpha): query loss "
      f"{fixed['loss']:.4f} +- {fixed['loss_ci95']:.4f}"
    )
  if "final_alpha" in results:
    beta = results.get("final_beta")
    lines.append(
      f"  final alpha {results['final_alpha']:.4g}"
      + (f", final beta {beta:.4g}" if beta is not None else "")
    )
  return "\n".join(lines)
