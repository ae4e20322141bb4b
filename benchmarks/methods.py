"""Every method on one budget: Omniglot 5-way 1-shot for 30 CPU minutes each, and sinusoid
regression for a fixed number of meta steps (BENCHMARKS.md, "Methods on one budget").

    python benchmarks/methods.py --sinusoid        # trains every method on sinusoid (minutes)
    python benchmarks/methods.py                   # prints the tables from the saved results

The Omniglot runs are ``amaml train`` commands, one after the other on a quiet machine (see
BENCHMARKS.md); their ``results.json`` files are copied to
``benchmarks/results/omniglot-5w1s-<name>-30min.json``. This script reads them and the
sinusoid results (``benchmarks/results/sinusoid-methods.jsonl``) and prints one markdown
table, next to the published Omniglot numbers of each method's paper.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SINUSOID = RESULTS / "sinusoid-methods.jsonl"

# (label, --method, flags of the Omniglot run, flags of the sinusoid run, Omniglot results
# file). Starts: amaml's default from untuned alpha0 (4 and 0.01, far from MAML's 0.4); the
# other methods from their papers' values (MAML's tuned alpha: 0.4 on Omniglot 5-way, 0.01 on
# sinusoid), and MAML also from alpha = 4. Sinusoid has no ProtoNet (it is not classification).
RUNS = [
    ("amaml default (alpha-maml), alpha0 = 4", "alpha-maml", {"alpha": 4.0}, {"alpha": 4.0},
     "omniglot-5w1s-dadapt-default-a4-30min.json"),
    ("amaml default (alpha-maml), alpha0 = 0.01", "alpha-maml", {"alpha": 0.01},
     {"alpha": 0.01}, "omniglot-5w1s-dadapt-default-a0.01-30min.json"),
    ("alpha-maml with inner Adam, alpha0 = 0.1", "alpha-maml", {"inner_optimizer": "adam"},
     {"inner_optimizer": "adam", "alpha": 0.1}, "omniglot-5w1s-alpha-maml-adam-30min.json"),
    ("MAML, tuned alpha (0.4; sinusoid 0.01)", "maml", {"alpha": 0.4}, {"alpha": 0.01},
     "omniglot-5w1s-maml-30min.json"),
    ("MAML, alpha = 4", "maml", {"alpha": 4.0}, {"alpha": 4.0}, "omniglot-5w1s-maml-a4-30min.json"),
    ("FOMAML, alpha = 0.4 (sinusoid 0.01)", "fomaml", {"alpha": 0.4}, {"alpha": 0.01},
     "omniglot-5w1s-fomaml-30min.json"),
    ("Meta-SGD, alpha0 = 0.1 (sinusoid 0.01)", "meta-sgd", {}, {"alpha": 0.01},
     "omniglot-5w1s-meta-sgd-30min.json"),
    ("ANIL, alpha = 0.4 (sinusoid 0.01)", "anil", {"alpha": 0.4}, {"alpha": 0.01},
     "omniglot-5w1s-anil-30min.json"),
    # MAML++ is first order for its first third of training (50 of 150 epochs): here the
    # first 300 of about 1,000 Omniglot steps, 6,000 of the 20,000 sinusoid steps
    ("MAML++, alpha0 = 0.1 (sinusoid 0.01)", "maml++", {"first_order_steps": 300},
     {"alpha": 0.01, "first_order_steps": 6000}, "omniglot-5w1s-maml++-30min.json"),
    ("Reptile, inner Adam 1e-3, 5 steps, epsilon = 1 (sinusoid: SGD 0.01)", "reptile",
     {"inner_optimizer": "adam", "alpha": 0.001, "inner_steps": 5},
     {"alpha": 0.01, "inner_steps": 5}, "omniglot-5w1s-reptile-30min.json"),
    ("ProtoNets", "protonet", {}, None, "omniglot-5w1s-protonet-30min.json"),
]

# published Omniglot 5-way 1-shot / 20-way 1-shot accuracies (%), from each paper's table
PUBLISHED = {
    "maml": ("98.7 ± 0.4 / 95.8 ± 0.3", "Finn et al. 2017, Table 1"),
    "fomaml": ("98.3 ± 0.5 / 89.4 ± 0.5", "Finn et al. 2017, Table 1"),
    "meta-sgd": ("99.53 ± 0.26 / 95.93 ± 0.38", "Li et al. 2017, Table 1"),
    "maml++": ("99.47 / 97.65 ± 0.05", "Antoniou et al. 2019, Table 1"),
    "protonet": ("98.8 / 96.0", "Snell et al. 2017, Table 1"),
    "reptile": ("97.68 ± 0.04 / 89.43 ± 0.14", "Nichol et al. 2018, Table 1 (transductive)"),
}

# sinusoid: MAML's setting (1 inner step, meta-batch 25), each method's own start
SINUSOID_STEPS = 20000


def train_sinusoid(steps: int) -> None:
  """Every row of :data:`RUNS` with sinusoid flags; appends to ``SINUSOID``."""
  from amaml import train
  from amaml.configs import get_config

  for label, method, _, flags, _ in RUNS:
    if flags is None:
      continue
    cfg = get_config("sinusoid", method=method, iterations=steps, log_every=1000,
                     val_every=0, checkpoint_every=0, **flags)
    with tempfile.TemporaryDirectory() as out:
      try:
        _, results = train.train(cfg, out, progress=False)
      except FloatingPointError:
        results = None  # diverged: the table says so
    rec = {"label": label, "method": method, "flags": flags, "steps": steps}
    if results is not None:
      rec.update(seconds_per_step=results["train_seconds"] / results["steps"],
                 mse=results["test"]["loss"], mse_ci95=results["test"]["loss_ci95"],
                 inner_steps=results["test"]["inner_steps"],
                 final_alpha=results["final_alpha"], versions=results["versions"])
    print(json.dumps(rec), flush=True)
    with open(SINUSOID, "a") as f:
      f.write(json.dumps(rec) + "\n")


def _accuracy(test: dict) -> tuple[float, float]:
  """(accuracy, CI) in % from a results ``test`` entry (old files say ``post_accuracy``)."""
  key = "accuracy" if "accuracy" in test else "post_accuracy"
  return 100 * test[key], 100 * test[f"{key}_ci95"]


def table() -> str:
  published = dict(PUBLISHED)
  sinusoid = {}
  if SINUSOID.exists():
    for line in SINUSOID.read_text().splitlines():
      rec = json.loads(line)
      sinusoid[rec["label"]] = rec
  lines = ["| method, start | meta steps in 30 min | s / step (with validation) | Omniglot 5w1s, 600 tasks (95% CI) "
           "| sinusoid MSE, 600 tasks (95% CI) | published 5w1s / 20w1s (%) |",
           "| --- | --- | --- | --- | --- | --- |"]
  for label, method, _, sin_flags, name in RUNS:
    path = RESULTS / name
    if path.exists():
      r = json.loads(path.read_text())
      acc, ci = _accuracy(r["test"])
      omni = (f"{r['steps']:,}", f"{r['train_seconds'] / r['steps']:.2f}", f"{acc:.2f}% ± {ci:.2f}%")
    else:
      omni = ("not run", "", "")
    s = sinusoid.get(label)
    sin = ("" if sin_flags is None else "not run" if s is None else
           "diverged" if "mse" not in s else f"{s['mse']:.3f} ± {s['mse_ci95']:.3f}")
    pub = published.pop(method, None)  # once, at the method's first row
    pub = f"{pub[0]} ({pub[1]})" if pub else ""
    lines.append(f"| {label} | {' | '.join(omni)} | {sin} | {pub} |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sinusoid", action="store_true", help="train every method on sinusoid first")
  ap.add_argument("--steps", type=int, default=SINUSOID_STEPS, help="sinusoid meta steps")
  args = ap.parse_args(argv)
  if args.sinusoid:
    train_sinusoid(args.steps)
  print(table())


if __name__ == "__main__":
  main()
