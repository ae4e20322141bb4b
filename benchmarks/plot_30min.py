"""Figures of the 30-minute Omniglot 5w1s runs (BENCHMARKS.md, "Omniglot 5-way 1-shot, 30
minutes from untuned starts"), from their logs in ``benchmarks/results/``:

    python benchmarks/plot_30min.py

writes ``docs/images/omniglot-5w1s-30min-curves.png`` (validation accuracy and training
query loss against meta steps) and ``docs/images/omniglot-5w1s-30min-rates.png`` (alpha
and beta).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# label -> metrics file
RUNS = {
  "amaml default, alpha0 = 4": "omniglot-5w1s-dadapt-default-a4-30min-metrics.jsonl",
  "amaml default, alpha0 = 0.01": "omniglot-5w1s-dadapt-default-a0.01-30min-metrics.jsonl",
  "MAML, tuned alpha = 0.4": "omniglot-5w1s-maml-30min-metrics.jsonl",
  "MAML, alpha = 4": "omniglot-5w1s-maml-a4-30min-metrics.jsonl",
  "MAML, alpha = 0.01, beta = 1e-2": "omniglot-5w1s-maml-a0.01-b1e-2-30min-metrics.jsonl",
}


def _read(path: Path) -> list[dict]:
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=str(ROOT / "docs" / "images"))
  args = ap.parse_args(argv)
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = {label: _read(RESULTS / f) for label, f in RUNS.items() if (RESULTS / f).is_file()}
  fig, (ax_val, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.2))
  fig2, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(12, 4.2))
  for i, (label, recs) in enumerate(runs.items()):
    kw = dict(color=f"C{i}", label=label, linestyle="-" if label.startswith("amaml") else "--")
    # older logs (tuned MAML, commit a89f269) name the field val_post_accuracy
    val = [
      (r["step"], r.get("val_accuracy", r.get("val_post_accuracy")))
      for r in recs
      if "val_accuracy" in r or "val_post_accuracy" in r
    ]
    if val:
      ax_val.plot(*zip(*val), marker="o", **kw)
    ax_loss.plot([r["step"] for r in recs], [r["loss"] for r in recs], **kw)
    ax_a.plot([r["step"] for r in recs], [r["alpha"] for r in recs], **kw)
    beta = [(r["step"], r["beta"]) for r in recs if "beta" in r]
    if beta:
      ax_b.plot(*zip(*beta), **kw)
  ax_val.set(
    xlabel="meta step",
    ylabel="validation accuracy (100 tasks; tuned MAML: 50)",
    ylim=(0.2, 1.0),
    title="Omniglot 5w1s, 30 minutes on 2 CPU cores",
  )
  ax_loss.set(xlabel="meta step", ylabel="training query loss after adaptation", yscale="log")
  ax_a.set(xlabel="meta step", ylabel="alpha", yscale="log", title="inner rate")
  ax_b.set(
    xlabel="meta step",
    ylabel="beta (D-Adaptation's estimate for amaml)",
    yscale="log",
    title="outer rate",
  )
  for ax in (ax_val, ax_loss, ax_a, ax_b):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  out = Path(args.out)
  fig.tight_layout()
  fig.savefig(out / "omniglot-5w1s-30min-curves.png", dpi=110)
  fig2.tight_layout()
  fig2.savefig(out / "omniglot-5w1s-30min-rates.png", dpi=110)
  print(out / "omniglot-5w1s-30min-curves.png")
  print(out / "omniglot-5w1s-30min-rates.png")


if __name__ == "__main__":
  main()
