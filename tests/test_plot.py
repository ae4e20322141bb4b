"""amaml plot (:mod:`amaml.plot`) of a multi-seed run: the mean and each seed's curve, and the
table's mean +- standard deviation over seeds, on hand-written logs."""

import json
from pathlib import Path

import numpy as np
import pytest

from amaml import plot

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

# two seeds, three log lines (validation on the last two); the means are by hand
SEED_LINES = [
  dict(step=10, loss=[2.0, 4.0], accuracy=[0.2, 0.4], alpha=[0.1, 0.3], beta=[1e-3, 3e-3]),
  dict(step=20, loss=[1.0, 3.0], accuracy=[0.5, 0.7], alpha=[0.2, 0.4], beta=[2e-3, 4e-3]),
  dict(step=30, loss=[0.5, 1.5], accuracy=[0.6, 0.9], alpha=[0.25, 0.45], beta=[2e-3, 6e-3]),
]
VAL = {20: [0.4, 0.6], 30: [0.5, 0.9]}


def _write_run(path: Path) -> Path:
  path.mkdir()
  lines = []
  for rec in SEED_LINES:
    line = {"step": rec["step"]}
    for name, v in rec.items():
      if name != "step":
        line[name] = float(np.mean(v))
        line.update({f"seed{k}/{name}": x for k, x in enumerate(v)})
    if rec["step"] in VAL:
      v = VAL[rec["step"]]
      line["val_accuracy"] = float(np.mean(v))
      line.update({f"seed{k}/val_accuracy": x for k, x in enumerate(v)})
    lines.append(line)
  (path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  cfg = {"method": "alpha-maml", "alpha": 0.1, "seeds": 2}
  (path / "config.json").write_text(json.dumps(cfg))
  test = dict(split="test", tasks=10, seeds=2, loss=0.5, accuracy=0.8, accuracy_seed_std=0.05)
  (path / "results.json").write_text(json.dumps({"test": test}))
  return path


def _lines(ax) -> dict:
  """``{label: (x, y)}`` of the lines on ``ax`` (seed k's: ``<mean's label> _seed<k>``)."""
  out, last = {}, None
  for line in ax.get_lines():
    label = line.get_label()
    if label.startswith("_seed"):
      label = f"{last} {label}"
    else:
      last = label
    out[label] = (list(line.get_xdata()), list(line.get_ydata()))
  return out


def test_each_seeds_curve_is_drawn_beside_the_mean(tmp_path):
  import matplotlib.pyplot as plt

  run = _write_run(tmp_path / "multi")
  data = {run: plot.read_metrics(run)}
  assert plot.seed_count(data[run]) == 2
  fig = plot.learning_curves_figure(data)
  loss_ax, acc_ax = fig.axes
  label = f"{plot._label(run)} query loss"
  got = _lines(loss_ax)
  assert set(got) == {label, f"{label} _seed0", f"{label} _seed1"}
  assert got[label] == ([10, 20, 30], [3.0, 2.0, 1.0])
  assert got[f"{label} _seed0"] == ([10, 20, 30], [2.0, 1.0, 0.5])
  assert got[f"{label} _seed1"] == ([10, 20, 30], [4.0, 3.0, 1.5])
  means = {l.get_label(): l for l in loss_ax.get_lines()}
  assert means[label].get_alpha() is None
  seed_line = next(l for l in loss_ax.get_lines() if l.get_label() == "_seed1")
  assert seed_line.get_alpha() < 1 and seed_line.get_linewidth() < means[label].get_linewidth()
  assert seed_line.get_color() == means[label].get_color()
  acc = [l for l in acc_ax.get_lines()]
  ys = [list(l.get_ydata()) for l in acc]
  assert [0.2, 0.5, 0.6] in ys and [0.4, 0.7, 0.9] in ys  # each seed's accuracy
  assert [0.4, 0.5] in ys and [0.6, 0.9] in ys  # each seed's validation accuracy
  plt.close(fig)

  fig = plot.rates_figure(data)
  alpha_ax, beta_ax = fig.axes
  ys = {l.get_label(): list(l.get_ydata()) for l in alpha_ax.get_lines()}
  assert ys["_seed0"] == [0.1, 0.2, 0.25] and ys["_seed1"] == [0.3, 0.4, 0.45]
  np.testing.assert_allclose(ys[plot._label(run)], [0.2, 0.3, 0.35])
  ys = {l.get_label(): list(l.get_ydata()) for l in beta_ax.get_lines()}
  assert ys["_seed0"] == [1e-3, 2e-3, 2e-3] and ys["_seed1"] == [3e-3, 4e-3, 6e-3]
  plt.close(fig)
  assert [p.name for p in plot.plot_runs(run)] == ["learning_curves.png", "rates.png"]


def test_one_seed_runs_have_no_seed_curves(tmp_path):
  import matplotlib.pyplot as plt

  run = tmp_path / "one"
  run.mkdir()
  recs = [dict(step=10, loss=2.0, alpha=0.1), dict(step=20, loss=1.0, alpha=0.2)]
  (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  fig = plot.learning_curves_figure({run: plot.read_metrics(run)})
  assert [list(l.get_ydata()) for l in fig.axes[0].get_lines()] == [[2.0, 1.0]]
  plt.close(fig)


def test_table_gives_the_mean_and_spread_over_seeds(tmp_path):
  """The last line's values: the mean +- the standard deviation over the 2 seeds (ddof=1:
  |a - b| / sqrt(2)); meta-test: results.json's mean +- its std over seeds."""
  run = _write_run(tmp_path / "multi")
  row = plot.runs_table([run]).splitlines()[2]
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[:4] == [str(run), "alpha-maml", "0.1", "30"]
  assert cells[4] == f"1 +- {abs(0.5 - 1.5) / np.sqrt(2):.2g}"  # loss 0.71
  assert cells[5] == f"0.750 +- {0.3 / np.sqrt(2):.2g}"  # accuracy 0.21
  assert cells[6] == "0.700"  # the best mean validation accuracy
  assert cells[7] == f"0.35 +- {0.2 / np.sqrt(2):.2g}"
  assert cells[8] == f"0.004 +- {0.004 / np.sqrt(2):.2g}"
  assert cells[9] == "80.00% +- 5.00% (std over 2 seeds)"
