"""Summary statistics for few-shot evaluation."""

from __future__ import annotations

import math

import numpy as np


def mean_confidence_interval(values, confidence: float = 0.95) -> tuple[float, float]:
  """Mean and half-width of the normal-approximation confidence interval.

  The few-shot convention (MAML, ProtoNets): ``1.96 * std / sqrt(n)`` for 95%.

  >>> m, h = mean_confidence_interval([1.0, 2.0, 3.0, 4.0])
  >>> round(m, 3), round(h, 3)
  (2.5, 1.265)
  """
  x = np.asarray(values, np.float64).ravel()
  if x.size == 0:
    raise ValueError("no values to summarise")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  z = math.sqrt(2.0) * _erfinv(confidence)
  sem = x.std(ddof=1) / math.sqrt(x.size) if x.size > 1 else float("nan")
  return float(x.mean()), float(z * sem)


def _erfinv(y: float) -> float:
  # Newton on math.erf: plenty for a confidence level.
  x = 0.0
  for _ in range(60):
    x -= (math.erf(x) - y) / (2.0 / math.sqrt(math.pi) * math.exp(-x * x))
  return x
