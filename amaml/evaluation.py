"""Meta-testing a trained model: evaluation tasks, test-time adaptation, the final numbers.

:func:`evaluate` adapts on fresh tasks of a split and returns means and 95% confidence
half-widths over tasks; :func:`select_adaptation` chooses how far to adapt at test time
(the rate and the number of steps) on meta-validation tasks; :func:`meta_test` is the final
evaluation of ``amaml train`` and ``amaml evaluate`` (``Config.test_adaptation``). The tasks
of an evaluation (:func:`eval_batches`) depend only on the seed and the split.

(:mod:`amaml.train` imports every public name here, so ``amaml.train.evaluate`` works too.)
"""

from __future__ import annotations

import math

import jax
import numpy as np

from amaml._renamed import renamed_keywords
from amaml.adaptation import ALPHA_SCALES, best_adaptation, guarded_curves
from amaml.experiment import Experiment, run_keys
from amaml.stats import mean_confidence_interval


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


@renamed_keywords(max_steps="eval_inner_steps")
def select_adaptation(
  exp: Experiment,
  params,
  alpha,
  split: str = "val",
  num_tasks: int | None = None,
  eval_inner_steps: int | None = None,
  scales=ALPHA_SCALES,
  guard: bool = True,
) -> dict:
  """Test-time adaptation chosen on meta-validation tasks, so that it cannot diverge.

  Every ``(scale, steps)`` with ``scale`` in ``scales`` (the inner rate is ``scale *
  alpha``) and ``steps`` in ``0..eval_inner_steps`` is scored on ``num_tasks`` tasks of
  ``split``, by query accuracy when the loss reports one, else by query loss, each task
  adapting under the support-loss guard (``guard``, :func:`amaml.adaptation.support_guard`).
  One :attr:`MetaLearner.adaptation_curve` pass per scale scores every step count.

  Args:
    num_tasks: validation tasks (default ``Config.val_tasks``).
    eval_inner_steps: the most test-time inner steps to consider (default
      ``Config.eval_inner_steps``).

  Returns:
    The best ``inner_steps`` and ``alpha_scale``, and the score of each candidate.
  """
  cfg = exp.config
  num_tasks = num_tasks or cfg.val_tasks
  eval_inner_steps = eval_inner_steps or cfg.eval_inner_steps
  batches = list(eval_batches(exp, split, num_tasks))
  curves = {}
  for scale in scales:
    a = jax.tree.map(lambda x: x * scale, alpha)
    out = _curves(exp, params, a, batches, eval_inner_steps, guard)
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


@renamed_keywords(inner_steps="eval_inner_steps")
def evaluate(
  exp: Experiment,
  params,
  alpha,
  split: str = "test",
  num_tasks: int | None = None,
  eval_inner_steps: int | None = None,
  progress: bool = False,
  alpha_scale: float = 1.0,
  guard: bool = False,
) -> dict:
  """Meta-test: adapt on ``num_tasks`` fresh tasks of ``split`` and summarise.

  Returns means and 95% confidence half-widths over tasks of the query loss (and
  accuracy) before and after ``eval_inner_steps`` adaptation steps (default
  ``Config.eval_inner_steps``; the summary calls it ``inner_steps``) at the rate
  ``alpha_scale * alpha``; with ``guard``, each task stops before a step that raises its
  support loss above where it started (:func:`amaml.adaptation.support_guard`). Tasks
  depend only on the seed and the split.
  """
  cfg = exp.config
  num_tasks = num_tasks or cfg.eval_tasks
  steps = cfg.eval_inner_steps if eval_inner_steps is None else eval_inner_steps
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
      _guarded_evaluate(exp, params, a, batch, steps)
      if guard
      else exp.learner.evaluate(params, a, batch, inner_steps=steps)
    )
    for k, v in out.items():
      per_task.setdefault(k, []).append(np.asarray(v))
  summary = {
    "split": split,
    "tasks": num_tasks,
    "inner_steps": steps,
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
