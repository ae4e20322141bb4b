"""Test-time adaptation: which inner rate and how many steps, and the support-loss guard.

At meta-test time a trained model adapts to each new task on its support set. How far to
adapt is chosen on meta-validation tasks (:func:`amaml.evaluation.select_adaptation`): every
rate ``scale * alpha`` with ``scale`` in :data:`ALPHA_SCALES` and every step count up to
``eval_inner_steps`` is scored from one :attr:`amaml.MetaLearner.adaptation_curve` pass per
scale, and :func:`best_adaptation` takes the best.

A choice that is good on average can still overflow on one task. :func:`support_guard`
lets each task keep, of the inner loop's iterates, the one with the lowest support loss
so far, judged on its support set alone (no query label is looked at): a step that
overshoots, or overflows, is not kept.

>>> import numpy as np
>>> query = np.array([[1.0, 0.5, 0.3, 9e9]])   # query loss after 0, 1, 2, 3 steps
>>> support = np.array([[2.0, 1.0, 0.5, np.inf]])
>>> support_guard(query, support).tolist()      # step 3 overflowed: keep step 2
[[1.0, 0.5, 0.3, 0.3]]
"""

from __future__ import annotations

import numpy as np

#: The candidate test-time rates, as multiples of the trained ``alpha``: from 2 down to 1/32
#: in steps of sqrt(2). (A rate trained for one inner step is often far too large for ten:
#: the trained ``alpha`` of an image MLP can be 30 times the best ten-step rate.)
ALPHA_SCALES = tuple(float(2.0 ** (e / 2)) for e in range(2, -11, -1))


def support_guard(curve, support_loss):
  """Per task, the metric ``curve`` ``[tasks, steps + 1]`` at the best iterate so far by
  the support loss: entry ``k`` is the metric after step ``j <= k`` with the lowest support
  loss ``support_loss[:, j]`` (the earliest of equals; a NaN is never the lowest). The
  inner loop itself runs on unchanged: only which of its iterates a task keeps changes."""
  curve, support = np.asarray(curve), np.asarray(support_loss, np.float64)
  best = np.zeros(curve.shape[0], np.int64)
  index = np.zeros(curve.shape, np.int64)
  for k in range(1, curve.shape[1]):
    better = support[:, k] < support[np.arange(len(best)), best]
    best = np.where(better, k, best)
    index[:, k] = best
  return np.take_along_axis(curve, index, axis=1)


def guarded_curves(out: dict) -> dict:
  """An :attr:`amaml.MetaLearner.adaptation_curve` output with :func:`support_guard`
  applied to every metric (unchanged where the learner reports no ``support_loss``, as
  ProtoNets, which does not adapt)."""
  if "support_loss" not in out:
    return dict(out)
  support = out["support_loss"]
  return {k: (v if k == "support_loss" else support_guard(v, support)) for k, v in out.items()}


def best_adaptation(curves: dict, higher_is_better: bool) -> tuple[float, int, dict]:
  """The best ``(alpha_scale, inner_steps)`` of mean adaptation curves ``{scale: metric after
  0..K steps}``, and every candidate's score by ``"<scale>x<steps>"``. Non-finite scores
  lose; ties go to scale 1, then to fewer steps. Zero steps (no adaptation) is a candidate
  too: where every rate and step count makes the validation tasks worse, none is taken.

  >>> best_adaptation({1.0: [0.2, 0.6, 0.7], 0.5: [0.2, 0.8, 0.6]}, higher_is_better=True)[:2]
  (0.5, 1)
  """
  scores = {}
  for scale, curve in curves.items():
    score = np.asarray(curve, np.float64) * (1 if higher_is_better else -1)
    for k in range(0 if scale == 1.0 else 1, len(score)):
      scores[(scale, k)] = float(score[k]) if np.isfinite(score[k]) else -np.inf
  scale, steps = max(scores, key=lambda c: (scores[c], c[0] == 1.0, -c[1]))
  return scale, steps, {f"{s:g}x{k}": v for (s, k), v in scores.items()}
