"""Every method on one budget: Omniglot 5-way 1-shot for 30 CPU minutes each, Omniglot 20-way
1-shot for a fixed number of GPU seconds each, and sinusoid regression for a fixed number of
meta steps (BENCHMARKS.md, "Methods on one budget").

    python benchmarks/methods.py --sinusoid [--names N ...]  # every method (or row N), sinusoid
    python benchmarks/methods.py --omniglot omniglot-20w1s --minutes 0.5 --out DIR
                                                   # amaml train for every method, one by one
    python benchmarks/methods.py                   # prints the table from the saved results

The 5w1s runs are ``amaml train`` commands, one after the other on a quiet machine (see
BENCHMARKS.md); their ``results.json`` files are copied to
``benchmarks/results/omniglot-5w1s-<name>-30min.json``. ``--omniglot`` runs every row of
:data:`RUNS` that way for ``--minutes`` each and writes ``DIR/<config>-<name>-gpu.json``
(``DIR`` defaults to ``benchmarks/results``, whose files the 20w1s column reads). This script reads
them and the sinusoid results (``benchmarks/results/sinusoid-methods.jsonl``) and prints one
markdown table, next to the published Omniglot numbers of each method's paper.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SINUSOID = RESULTS / "sinusoid-methods.jsonl"

# (label, --method, flags of the Omniglot runs, flags of the sinusoid run, name of the
# results: benchmarks/results/omniglot-5w1s-<name>-30min.json and omniglot-20w1s-<name>-gpu.json).
# Starts: Alpha MAML from untuned alpha0 (4 and 0.01, far from MAML's 0.4); the other
# methods from their papers' values (MAML's tuned alpha: 0.4 on Omniglot 5-way, 0.1 on 20-way
# (see ALPHA_20W), 0.01 on sinusoid), and MAML also from alpha = 4. Sinusoid has no ProtoNet
# (it is not classification).
# the alpha-maml rows ran with D-Adaptation outside and no alpha0 search
DADAPT = {"outer_optimizer": "dadapt_adamw", "alpha_search": False}
RUNS = [
  (
    "alpha-maml (one alpha per tensor), D-Adaptation outside, alpha0 = 4",
    "alpha-maml",
    {"alpha": 4.0, "alpha_granularity": "tensor", **DADAPT},
    {"alpha": 4.0, "alpha_granularity": "tensor", **DADAPT},
    "default-tensor-a4",
  ),
  (
    "alpha-maml (one alpha per tensor), D-Adaptation outside, alpha0 = 0.01",
    "alpha-maml",
    {"alpha": 0.01, "alpha_granularity": "tensor", **DADAPT},
    {"alpha": 0.01, "alpha_granularity": "tensor", **DADAPT},
    "default-tensor-a0.01",
  ),
  (
    "alpha-maml with one alpha, D-Adaptation outside, alpha0 = 4",
    "alpha-maml",
    {"alpha": 4.0, "alpha_granularity": "scalar", **DADAPT},
    {"alpha": 4.0, "alpha_granularity": "scalar", **DADAPT},
    "dadapt-default-a4",
  ),
  (
    "alpha-maml with one alpha, D-Adaptation outside, alpha0 = 0.01",
    "alpha-maml",
    {"alpha": 0.01, "alpha_granularity": "scalar", **DADAPT},
    {"alpha": 0.01, "alpha_granularity": "scalar", **DADAPT},
    "dadapt-default-a0.01",
  ),
  (
    "alpha-maml with inner Adam, one alpha, D-Adaptation outside, alpha0 = 0.1",
    "alpha-maml",
    {"inner_optimizer": "adam", "alpha_granularity": "scalar", **DADAPT},
    {"inner_optimizer": "adam", "alpha": 0.1, "alpha_granularity": "scalar", **DADAPT},
    "alpha-maml-adam",
  ),
  (
    "MAML, tuned alpha (0.4; 20w1s 0.1; sinusoid 0.01)",
    "maml",
    {"alpha": 0.4},
    {"alpha": 0.01},
    "maml",
  ),
  ("MAML, alpha = 4", "maml", {"alpha": 4.0}, {"alpha": 4.0}, "maml-a4"),
  (
    "FOMAML, alpha = 0.4 (20w1s 0.1; sinusoid 0.01)",
    "fomaml",
    {"alpha": 0.4},
    {"alpha": 0.01},
    "fomaml",
  ),
  ("Meta-SGD, alpha0 = 0.1 (sinusoid 0.01)", "meta-sgd", {}, {"alpha": 0.01}, "meta-sgd"),
  ("ANIL, alpha = 0.4 (20w1s 0.1; sinusoid 0.01)", "anil", {"alpha": 0.4}, {"alpha": 0.01}, "anil"),
  # MAML++ is first order for its first third of training (50 of 150 epochs): here the
  # first 300 of about 1,000 Omniglot steps, 6,000 of the 20,000 sinusoid steps
  (
    "MAML++, alpha0 = 0.1 (sinusoid 0.01)",
    "maml++",
    {"first_order_steps": 300},
    {"alpha": 0.01, "first_order_steps": 6000},
    "maml++",
  ),
  (
    "Reptile, inner Adam 1e-3, 5 steps, epsilon = 1 (sinusoid: SGD 0.01)",
    "reptile",
    {"inner_optimizer": "adam", "alpha": 0.001, "inner_steps": 5},
    {"alpha": 0.01, "inner_steps": 5},
    "reptile",
  ),
  ("ProtoNets", "protonet", {}, None, "protonet"),
]

# MAML's tuned 5-way alpha (0.4) becomes its 20-way one (0.1, Finn et al. 2017) on 20w1s
ALPHA_20W = {0.4: 0.1}


def _rows(names=None):
  """The rows of :data:`RUNS`, or those whose results name is in ``names``."""
  return [row for row in RUNS if not names or row[4] in names]


def results_file(config: str, name: str) -> str:
  """The results file of one row: 5w1s ran 30 CPU minutes, 20w1s on a GPU."""
  return f"{config}-{name}-{'30min' if config == 'omniglot-5w1s' else 'gpu'}.json"


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


def train_sinusoid(steps: int, names=None) -> None:
  """Every row of :data:`RUNS` with sinusoid flags (or those in ``names``); appends to
  ``SINUSOID``."""
  from amaml import train
  from amaml.configs import get_config

  for label, method, _, flags, name in _rows(names):
    if flags is None:
      continue
    cfg = get_config(
      "sinusoid",
      method=method,
      iterations=steps,
      log_every=1000,
      val_every=0,
      checkpoint_every=0,
      **flags,
    )
    with tempfile.TemporaryDirectory() as out:
      try:
        _, results = train.train(cfg, out, progress=False)
      except FloatingPointError:
        results = None  # diverged: the table says so
    rec = {"label": label, "method": method, "flags": flags, "steps": steps}
    if results is not None:
      rec.update(
        seconds_per_step=results["train_seconds"] / results["steps"],
        mse=results["test"]["loss"],
        mse_ci95=results["test"]["loss_ci95"],
        inner_steps=results["test"]["inner_steps"],
        final_alpha=results["final_alpha"],
        versions=results["versions"],
      )
    print(json.dumps(rec), flush=True)
    with open(SINUSOID, "a") as f:
      f.write(json.dumps(rec) + "\n")


def train_omniglot(config: str, minutes: float, out: Path, names=None) -> None:
  """``amaml train --config CONFIG --method M --max_minutes MINUTES`` for every row of
  :data:`RUNS` (or those in ``names``), one after the other; each ``results.json`` is copied
  to ``OUT/`` :func:`results_file`. Periodic validation and checkpoints are off, so the budget
  is training alone (the test-time adaptation is still chosen on validation tasks)."""
  out.mkdir(parents=True, exist_ok=True)
  for _, method, flags, _, name in _rows(names):
    if "20w" in config and flags.get("alpha") in ALPHA_20W:
      flags = {**flags, "alpha": ALPHA_20W[flags["alpha"]]}
    with tempfile.TemporaryDirectory() as run_dir:
      cmd = [
        sys.executable,
        "-m",
        "amaml",
        "train",
        "--config",
        config,
        "--method",
        method,
        "--max_minutes",
        str(minutes),
        "--val_every",
        "0",
        "--checkpoint_every",
        "0",
        "--out",
        run_dir,
      ]
      for key, value in flags.items():
        cmd += [f"--{key}", str(value)]
      print("$", " ".join(cmd[1:]), flush=True)
      done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      tail = done.stdout.replace("\r", "\n").splitlines()[-6:]
      print("\n".join(tail), flush=True)
      if done.returncode == 0:
        shutil.copy(Path(run_dir) / "results.json", out / results_file(config, name))
      else:  # diverged or broke: the table says so, with the run's last line
        (out / results_file(config, name)).write_text(
          json.dumps({"error": tail[-1] if tail else "", "command": cmd[1:]})
        )


def _accuracy(test: dict) -> tuple[float, float]:
  """(accuracy, CI) in % from a results ``test`` entry (old files say ``post_accuracy``)."""
  key = "accuracy" if "accuracy" in test else "post_accuracy"
  return 100 * test[key], 100 * test[f"{key}_ci95"]


def _omniglot(path: Path, compile_s: bool = False) -> tuple[str, str, str]:
  """(meta steps, seconds per step or, with ``compile_s``, the seconds of the first call,
  compile included; accuracy with CI) of one results file, or 'not run'."""
  if not path.exists():
    return ("not run", "", "")
  r = json.loads(path.read_text())
  if "error" in r:
    return ("failed: " + r["error"], "", "")
  acc, ci = _accuracy(r["test"])
  cost = (
    f"{r['first_chunk_seconds_incl_compile']:.1f}"
    if compile_s
    else f"{r['train_seconds'] / r['steps']:.2f}"
  )
  return (f"{r['steps']:,}", cost, f"{acc:.2f}% ± {ci:.2f}%")


def table() -> str:
  published = dict(PUBLISHED)
  sinusoid = {}
  if SINUSOID.exists():
    for line in SINUSOID.read_text().splitlines():
      rec = json.loads(line)
      sinusoid[rec["method"], json.dumps(rec["flags"], sort_keys=True)] = rec
  lines = [
    "| method, start | 5w1s: meta steps in 30 CPU min | s / step (with validation) "
    "| Omniglot 5w1s, 600 tasks (95% CI) | 20w1s: meta steps in 30 H200 s "
    "| first call, compile included (s) | Omniglot 20w1s, 600 tasks (95% CI) "
    "| sinusoid MSE, 600 tasks (95% CI) | published 5w1s / 20w1s (%) |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for label, method, _, sin_flags, name in RUNS:
    omni = _omniglot(RESULTS / results_file("omniglot-5w1s", name))
    omni += _omniglot(RESULTS / results_file("omniglot-20w1s", name), compile_s=True)
    s = sinusoid.get((method, json.dumps(sin_flags, sort_keys=True)))
    sin = (
      ""
      if sin_flags is None
      else "not run"
      if s is None
      else "diverged"
      if "mse" not in s
      else f"{s['mse']:.3f} ± {s['mse_ci95']:.3f}"
    )
    pub = published.pop(method, None)  # once, at the method's first row
    pub = f"{pub[0]} ({pub[1]})" if pub else ""
    lines.append(f"| {label} | {' | '.join(omni)} | {sin} | {pub} |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sinusoid", action="store_true", help="train every method on sinusoid first")
  ap.add_argument("--steps", type=int, default=SINUSOID_STEPS, help="sinusoid meta steps")
  ap.add_argument(
    "--omniglot", metavar="CONFIG", help="run `amaml train --config CONFIG` for every method first"
  )
  ap.add_argument("--minutes", type=float, default=0.5, help="--omniglot: budget per method")
  ap.add_argument("--out", type=Path, default=RESULTS, help="--omniglot: where results go")
  ap.add_argument("--names", nargs="*", help="only these rows (by results name)")
  args = ap.parse_args(argv)
  if args.sinusoid:
    train_sinusoid(args.steps, args.names)
  if args.omniglot:
    train_omniglot(args.omniglot, args.minutes, args.out, args.names)
  print(table())


if __name__ == "__main__":
  main()
