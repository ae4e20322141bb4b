"""PNG plots of training runs: learning curves and the alpha / beta trajectories.

Needs matplotlib (``pip install amaml[plot]``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from amaml._renamed import renamed_keywords


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
  """The records of a run's ``metrics.jsonl``."""
  path = Path(run_dir) / "metrics.jsonl"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory of amaml train?")
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _val(rec: dict, name: str):
  """A validation metric of a log line: ``val_<name>``, or ``val_post_<name>``, its key in
  the logs of amaml 0.1 runs, which are still plotted."""
  return rec.get(f"val_{name}", rec.get(f"val_post_{name}"))


def _label(run_dir: Path) -> str:
  cfg_path = run_dir / "config.json"
  if cfg_path.exists():
    cfg = json.loads(cfg_path.read_text())
    return f"{run_dir.name} ({cfg['method']}, alpha0={cfg['alpha']:g})"
  return run_dir.name


def runs_table(run_dirs) -> str:
  """A markdown table comparing runs from their logs: the last logged line (step, training
  query loss and accuracy, alpha, beta), the best validation accuracy, and the meta-test
  accuracy (or query loss) of ``results.json`` when the run has finished."""
  lines = [
    "| run | method | alpha0 | steps | query loss | accuracy | best val accuracy "
    "| alpha | beta | meta-test |",
    "| --- " * 10 + "|",
  ]
  for r in map(Path, run_dirs):
    recs = read_metrics(r)
    last = recs[-1] if recs else {}
    cfg = json.loads((r / "config.json").read_text()) if (r / "config.json").exists() else {}
    vals = [v for v in (_val(x, "accuracy") for x in recs) if v is not None]
    res = json.loads((r / "results.json").read_text()) if (r / "results.json").exists() else {}
    test = res.get("test", {})
    fmt = lambda v, f: "" if v is None else format(v, f)
    acc = (
      ""
      if "loss" not in test
      else f"{100 * test['accuracy']:.2f}% +- {100 * test['accuracy_ci95']:.2f}%"
      if "accuracy" in test
      else f"loss {test['loss']:.4g} +- {test['loss_ci95']:.2g}"
    )
    lines.append(
      " | ".join(
        [
          f"| {r}",
          str(cfg.get("method", "")),
          fmt(cfg.get("alpha"), "g"),
          str(last.get("step", "")),
          fmt(last.get("loss"), ".4g"),
          fmt(last.get("accuracy"), ".3f"),
          fmt(max(vals) if vals else None, ".3f"),
          fmt(last.get("alpha"), ".3g"),
          fmt(last.get("beta"), ".3g"),
          acc,
        ]
      )
      + " |"
    )
  return "\n".join(lines)


@renamed_keywords(out_dir="plot_dir")
def plot_runs(run_dirs, plot_dir: str | os.PathLike | None = None) -> list[Path]:
  """Writes ``learning_curves.png`` and ``rates.png`` for one or more runs into ``plot_dir``
  (``amaml plot --plot_dir``; default: the first run's directory); returns the paths."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = [Path(r) for r in ([run_dirs] if isinstance(run_dirs, (str, os.PathLike)) else run_dirs)]
  out = Path(plot_dir) if plot_dir else runs[0]
  out.mkdir(parents=True, exist_ok=True)
  data = {r: read_metrics(r) for r in runs}
  has_acc = any("accuracy" in rec for recs in data.values() for rec in recs)

  fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 4), squeeze=False)
  for r, recs in data.items():
    steps = [x["step"] for x in recs]
    (line,) = axes[0, 0].plot(steps, [x["loss"] for x in recs], label=f"{_label(r)} query loss")
    if any(_val(x, "loss") is not None for x in recs):
      vs = [(x["step"], _val(x, "loss")) for x in recs if _val(x, "loss") is not None]
      axes[0, 0].plot(*zip(*vs), "--", color=line.get_color(), label=f"{r.name} val")
    if has_acc:
      axes[0, 1].plot(
        steps,
        [x.get("accuracy", float("nan")) for x in recs],
        color=line.get_color(),
        label=_label(r),
      )
      if any(_val(x, "accuracy") is not None for x in recs):
        vs = [(x["step"], _val(x, "accuracy")) for x in recs if _val(x, "accuracy") is not None]
        axes[0, 1].plot(*zip(*vs), "--", color=line.get_color())
  axes[0, 0].set(
    xlabel="meta step", ylabel="query loss after adaptation", yscale="log", title="learning curve"
  )
  axes[0, 0].legend(fontsize=7)
  if has_acc:
    axes[0, 1].set(xlabel="meta step", ylabel="query accuracy after adaptation", title="accuracy")
  fig.tight_layout()
  curves = out / "learning_curves.png"
  fig.savefig(curves, dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for r, recs in data.items():
    steps = [x["step"] for x in recs]
    axes[0].plot(steps, [x["alpha"] for x in recs], label=_label(r))
    if any("beta" in x for x in recs):
      axes[1].plot(steps, [x.get("beta", float("nan")) for x in recs], label=_label(r))
  axes[0].set(xlabel="meta step", ylabel="alpha (inner rate)", yscale="log", title="alpha")
  axes[1].set(xlabel="meta step", ylabel="beta (outer rate)", yscale="log", title="beta")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  rates = out / "rates.png"
  fig.savefig(rates, dpi=110)
  plt.close(fig)
  return [curves, rates]
