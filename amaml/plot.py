"""PNG plots of training runs: learning curves and the alpha / beta trajectories.

A multi-seed run (``amaml train --seeds N``, :mod:`amaml.seeds`) is drawn as the mean over
its seeds with each seed's curve thin and transparent beside it, in the same color; its
row of :func:`runs_table` gives each value as the mean +- the standard deviation over seeds.

Needs matplotlib (``pip install amaml[plot]``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from amaml._renamed import renamed_keywords


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
  """The records of a run's ``metrics.jsonl``."""
  path = Path(run_dir) / "metrics.jsonl"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory of amaml train?")
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _val_key(recs: list[dict], name: str) -> str:
  """The key of validation metric ``name`` in ``recs``: ``val_<name>``, or ``val_post_<name>``,
  its key in the logs of amaml 0.1 runs, which are still plotted."""
  new, old = f"val_{name}", f"val_post_{name}"
  return old if any(old in x for x in recs) and not any(new in x for x in recs) else new


def seed_count(recs: list[dict]) -> int:
  """The seeds of a multi-seed run's log lines (keys ``seed<k>/loss``); 0 for one seed."""
  first = recs[0] if recs else {}
  n = 0
  while f"seed{n}/loss" in first:
    n += 1
  return n


def _series(recs: list[dict], key: str) -> list[tuple]:
  """``(step, value)`` of the lines that hold ``key``."""
  return [(x["step"], x[key]) for x in recs if x.get(key) is not None]


def plot_metric(ax, recs: list[dict], key: str, style: str = "-", **kw):
  """Draws ``key`` of a run's log lines on ``ax``: the logged value (the mean over seeds of a
  multi-seed run) with ``kw``, and each seed's ``seed<k>/<key>`` as a thin transparent line
  of the same color labelled ``_seed<k>`` (not in legends). Returns the first line, or
  ``None`` when no line holds ``key``."""
  pts = _series(recs, key)
  if not pts:
    return None
  (line,) = ax.plot(*zip(*pts), style, **kw)
  for k in range(seed_count(recs)):
    pts = _series(recs, f"seed{k}/{key}")
    if pts:
      ax.plot(*zip(*pts), style, color=line.get_color(), lw=0.7, alpha=0.35, label=f"_seed{k}")
  return line


def _label(run_dir: Path) -> str:
  cfg_path = run_dir / "config.json"
  if cfg_path.exists():
    cfg = json.loads(cfg_path.read_text())
    return f"{run_dir.name} ({cfg['method']}, alpha0={cfg['alpha']:g})"
  return run_dir.name


def _spread(rec: dict, name: str, seeds: int, fmt: str) -> str:
  """``name`` of a log line; with seeds, its mean +- standard deviation over them."""
  if rec.get(name) is None:
    return ""
  values = [rec[f"seed{k}/{name}"] for k in range(seeds) if rec.get(f"seed{k}/{name}") is not None]
  if len(values) < 2:
    return format(rec[name], fmt)
  return f"{format(rec[name], fmt)} +- {format(float(np.std(values, ddof=1)), '.2g')}"


def _test_cell(test: dict) -> str:
  """The meta-test cell of :func:`runs_table`: the mean and its 95% CI over tasks, or, over
  seeds, the mean and its standard deviation over them."""
  if "loss" not in test:
    return ""
  name = "accuracy" if "accuracy" in test else "loss"
  spread = test[f"{name}_seed_std"] if "seeds" in test else test[f"{name}_ci95"]
  if name == "accuracy":
    cell = f"{100 * test[name]:.2f}% +- {100 * spread:.2f}%"
  else:
    cell = f"loss {test[name]:.4g} +- {spread:.2g}"
  return cell + (f" (std over {test['seeds']} seeds)" if "seeds" in test else "")


def runs_table(run_dirs) -> str:
  """A markdown table comparing runs from their logs: the last logged line (step, training
  query loss and accuracy, alpha, beta), the best validation accuracy, and the meta-test
  accuracy (or query loss) of ``results.json`` when the run has finished, with its 95% CI
  over tasks. A multi-seed run's values are means over its seeds +- their standard
  deviation over seeds (``ddof=1``; the best validation accuracy is that of the mean)."""
  lines = [
    "| run | method | alpha0 | steps | query loss | accuracy | best val accuracy "
    "| alpha | beta | meta-test |",
    "| --- " * 10 + "|",
  ]
  for r in map(Path, run_dirs):
    recs = read_metrics(r)
    last, n = (recs[-1] if recs else {}), seed_count(recs)
    cfg = json.loads((r / "config.json").read_text()) if (r / "config.json").exists() else {}
    vals = [v for _, v in _series(recs, _val_key(recs, "accuracy"))]
    res = json.loads((r / "results.json").read_text()) if (r / "results.json").exists() else {}
    cells = [_spread(last, name, n, f) for name, f in (("loss", ".4g"), ("accuracy", ".3f"))]
    cells.append("" if not vals else format(max(vals), ".3f"))
    cells += [_spread(last, name, n, ".3g") for name in ("alpha", "beta")]
    row = [
      f"| {r}",
      str(cfg.get("method", "")),
      format(cfg["alpha"], "g") if "alpha" in cfg else "",
    ]
    row += [str(last.get("step", "")), *cells, _test_cell(res.get("test", {}))]
    lines.append(" | ".join(row) + " |")
  return "\n".join(lines)


def learning_curves_figure(data: dict):
  """The figure of ``learning_curves.png`` for ``{run directory: log lines}``: query loss
  (and validation loss, dashed) and, for classification, accuracy, against the meta step."""
  import matplotlib.pyplot as plt

  has_acc = any("accuracy" in rec for recs in data.values() for rec in recs)
  fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 4), squeeze=False)
  for r, recs in data.items():
    line = plot_metric(axes[0, 0], recs, "loss", label=f"{_label(r)} query loss")
    color = None if line is None else line.get_color()
    plot_metric(axes[0, 0], recs, _val_key(recs, "loss"), "--", color=color, label=f"{r.name} val")
    if has_acc:
      plot_metric(axes[0, 1], recs, "accuracy", color=color, label=_label(r))
      plot_metric(axes[0, 1], recs, _val_key(recs, "accuracy"), "--", color=color)
  axes[0, 0].set(
    xlabel="meta step", ylabel="query loss after adaptation", yscale="log", title="learning curve"
  )
  axes[0, 0].legend(fontsize=7)
  if has_acc:
    axes[0, 1].set(xlabel="meta step", ylabel="query accuracy after adaptation", title="accuracy")
  fig.tight_layout()
  return fig


def rates_figure(data: dict):
  """The figure of ``rates.png`` for ``{run directory: log lines}``: alpha and beta against the
  meta step."""
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for r, recs in data.items():
    line = plot_metric(axes[0], recs, "alpha", label=_label(r))
    plot_metric(axes[1], recs, "beta", color=line and line.get_color(), label=_label(r))
  axes[0].set(xlabel="meta step", ylabel="alpha (inner rate)", yscale="log", title="alpha")
  axes[1].set(xlabel="meta step", ylabel="beta (outer rate)", yscale="log", title="beta")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  return fig


@renamed_keywords(out_dir="plot_dir")
def plot_runs(run_dirs, plot_dir: str | os.PathLike | None = None) -> list[Path]:
  """Writes ``learning_curves.png`` (:func:`learning_curves_figure`) and ``rates.png``
  (:func:`rates_figure`) for one or more runs into ``plot_dir`` (``amaml plot --plot_dir``;
  default: the first run's directory); returns the paths."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = [Path(r) for r in ([run_dirs] if isinstance(run_dirs, (str, os.PathLike)) else run_dirs)]
  out = Path(plot_dir) if plot_dir else runs[0]
  out.mkdir(parents=True, exist_ok=True)
  data = {r: read_metrics(r) for r in runs}
  paths = []
  for name, make in (("learning_curves.png", learning_curves_figure), ("rates.png", rates_figure)):
    fig = make(data)
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    paths.append(out / name)
  return paths
