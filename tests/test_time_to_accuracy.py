"""benchmarks/time_to_accuracy.py: the crossing times and the table it reports, on records
written by hand (the benchmark itself needs PyTorch and half an hour per implementation)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import time_to_accuracy as tta  # noqa: E402


def _records(impl, points, minutes_per_round=2.5, steps_per_round=100):
  return [
    {
      "impl": impl,
      "train_minutes": minutes_per_round * (i + 1),
      "steps": steps_per_round * (i + 1),
      "accuracy": acc,
      "ci95": ci,
    }
    for i, (acc, ci) in enumerate(points)
  ]


def test_crossing_is_the_first_evaluation_at_the_target_for_the_mean_and_each_ci_end():
  pts = _records("a", [(0.90, 0.01), (0.962, 0.01), (0.968, 0.005), (0.975, 0.004), (0.98, 0.003)])
  # mean >= 0.97 first at 10 min; mean + ci at 5 min (0.972); mean - ci at 10 min (0.971)
  assert tta.crossing(pts, 0.97) == (10.0, 5.0, 10.0)
  assert tta.crossing(pts, 0.99) == (None, None, None)
  # 97% of 3,000 queries averaged in float32 is 0.96999999: that reaches 97%
  assert tta.crossing(_records("b", [(0.9699999888737997, 0.0036)]), 0.97) == (2.5, 2.5, None)


def test_at_minutes_takes_the_last_evaluation_not_after_the_time():
  pts = _records("a", [(0.9, 0.01), (0.95, 0.01), (0.97, 0.01)])
  assert tta.at_minutes(pts, 5.0)["accuracy"] == 0.95
  assert tta.at_minutes(pts, 6.0)["accuracy"] == 0.95
  assert tta.at_minutes(pts, 1.0) is None
  assert tta.at_minutes(pts, 7.4)["accuracy"] == 0.97  # the 7.5-minute round ran 1% over


def test_table_reports_each_implementation_and_leaves_unreached_cells_out():
  recs = _records(
    "fast", [(0.96, 0.005), (0.975, 0.004), (0.98, 0.004), (0.985, 0.004)]
  ) + _records("slow", [(0.80, 0.02), (0.90, 0.01)], steps_per_round=40)
  text = tta.table(recs)
  lines = {l.split(" | ")[0].strip("| "): l for l in text.splitlines()[2:]}
  fast, slow = lines["fast"], lines["slow"]
  # fast: 400 steps in 10 min = 1.50 s/step; 95% at 2.5 min, 97% at 5 min; 98.5% at 10 min
  assert "| 400 | 1.50 | 2.5 [2.5, 2.5] | 5.0 [5.0, 5.0] | 98.50% ± 0.40% |" in fast
  assert fast.endswith("|  |")  # stopped at 10 minutes: no 30-minute accuracy
  # slow reached neither target and ran 5 minutes: no 10-minute accuracy either
  assert "not reached [not reached, not reached]" in slow and slow.endswith("|  |  |")
  # other minute marks: the run of "fast" lasted 10 minutes, so at 5 and 10 both are given
  text = tta.table(recs, minutes=(5, 10))
  assert "| accuracy at 5 min | accuracy at 10 min |" in text
  assert "| 97.50% ± 0.40% | 98.50% ± 0.40% |" in text
