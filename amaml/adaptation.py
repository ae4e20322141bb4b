"""Test-time adaptation: which inner rate and how many steps, and the support-loss guard.

At meta-test time a trained model adapts to each new task on its support set. How far to
adapt is chosen on meta-validation tasks (:func:`amaml.train.select_adaptation`): every
rate ``scale * alpha`` with ``scale`` in :data:`ALPHA_SCALES` and every step count up to
``eval_inner_steps`` is scored from one :attr:`amaml.MetaLearner.adaptation_curve` pass per
scale, and :func:`best_adaptation` takes the best.

A choice that is good on average can still overflow on one task. :func:`support_guard`
makes each task stop on its own, from its support set alone (no query label is looked at):
an inner step after which the support loss is higher than before adapting, or not finite,
is not taken, and the task keeps the parameters of the step before.

>>> import numpy as np
>>> query = np.array([[1.0, 0.5, 0.3, 9e9]])   # query loss after 0, 1, 2, 3 steps
>>> support = np.array([[2.0, 1.0, 0.5, np.inf]])
>>> support_guard(query, support).tolist()      # step 3 overflowed: stay at step 2
[[1.0, 0.5, 0.3, 0.3]]
"""
from __future__ import annotations

import numpy as np

#: The candidate test-time rates, as multiples of the trained ``alpha``: from 2 down to 1/8
#: in steps of sqrt(2).
ALPHA_SCALES = tuple(float(2.0 ** (e / 2)) for e in range(2, -7, -1))


def support_guard(curve, support_loss):
  """Per task, the metric ``curve`` ``[tasks, steps + 1]`` with every step from the first
  unsafe one on replaced by the step before it. Step ``k >= 1`` is unsafe when the support
  loss after it, ``support_loss[:, k]``, is not finite or is above the support loss before
  adaptation, ``support_loss[:, 0]``."""
  curve, support = np.asarray(curve), np.asarray(support_loss, np.float64)
  bad = ~(support[:, 1:] <= support[:, :1])  # NaN and inf are unsafe too
  bad = np.concatenate([np.zeros_like(bad[:, :1]), bad], axis=1)
  first_bad = np.where(bad.any(axis=1), bad.argmax(axis=1), bad.shape[1])
  steps = np.arange(curve.shape[1])[None, :]
  index = np.minimum(steps, first_bad[:, None] - 1)
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
