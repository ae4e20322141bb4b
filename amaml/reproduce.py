"""``amaml reproduce omniglot``: the published Omniglot table, reproduced by one command.

Each setting (5w1s, 5w5s, 20w1s, 20w5s) trains and evaluates amaml's default
(``alpha-maml``), MAML and MAML++ through :func:`amaml.train.train`, one run per directory
``<out>/<setting>/<method>/seed<k>``. A finished run (its ``results.json`` complete) is
read back, an unfinished one resumes from its last checkpoint, so running the command
again continues where it stopped. Runs, seeds included, go one after another: there is no
vmapped multi-seed run yet.

What each run is (:func:`run_config`):

- the setting's named config (:data:`SETTINGS`, ``amaml.configs.CONFIGS``): MAML's
  episodes and schedule (Finn et al. 2017): 60,000 meta steps; 32 tasks a step and 1 inner
  step for 5-way, 16 tasks and 5 inner steps for 20-way; Conv4 with 64 filters;
- ``alpha-maml``: that config as it is (tuning-free: alpha0 = 0.1 and the outer optimizer's
  rate adapt themselves; the test-time adaptation is chosen on validation tasks);
- ``maml``: MAML's tuned inner rate (:data:`MAML_ALPHA`: 0.4 for 5-way, 0.1 for 20-way),
  fixed, Adam at beta = 1e-3, and MAML's test protocol (``test_adaptation="fixed"``: 10
  steps at alpha);
- ``maml++``: amaml's ``maml++`` method (per-layer, per-step rates learned by the outer
  loop, per-step batch norm) with the schedule of :func:`amaml.maml_plus_plus`'s
  defaults (Antoniou et al. 2019): 5 inner steps in training and at test, the multi-step
  loss annealed over 5,000 meta steps, first order for 25,000.

``budget`` ``F`` (0 < F <= 1) scales every schedule by ``F``: the meta steps and MAML++'s
two annealing lengths (each at least 1), for a smoke run on a CPU. At ``F = 1`` the twelve
runs take days on a CPU; they are meant for a GPU.

>>> cfg = run_config("20w1s", "maml++", budget=0.01)
>>> cfg.iterations, cfg.inner_steps, cfg.multi_step_loss, cfg.first_order_steps
(600, 5, 50, 250)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple

from amaml.configs import CONFIGS, Config, get_config
from amaml.defaults import BY_METHOD

#: The settings of the table and their named configs.
SETTINGS = {
  "5w1s": "omniglot-5w1s",
  "5w5s": "omniglot-5w5s",
  "20w1s": "omniglot-20w1s",
  "20w5s": "omniglot-20w5s",
}
#: The methods of the table: amaml's default, MAML and MAML++.
METHODS = ("alpha-maml", "maml", "maml++")
#: Published meta-test accuracies (%): MAML (Finn et al. 2017, Table 1) and MAML++
#: (Antoniou et al. 2019, Table 1).
PUBLISHED = {
  "maml": {"5w1s": 98.7, "5w5s": 99.9, "20w1s": 95.8, "20w5s": 98.9},
  "maml++": {"5w1s": 99.47, "5w5s": 99.93, "20w1s": 97.65, "20w5s": 99.33},
}
#: The published row each method is set against: amaml's default has none, so MAML's.
COMPARED_WITH = {"alpha-maml": "maml", "maml": "maml", "maml++": "maml++"}
_LABELS = {"maml": "MAML", "maml++": "MAML++"}
#: MAML's tuned inner rate on Omniglot by ways (Finn et al. 2017).
MAML_ALPHA = {5: 0.4, 20: 0.1}
_HEADER = (
  "| setting | method | seeds | steps run | ours (% ± 95% CI) | published (%) | difference (pp) |",
  "| --- | --- | --- | --- | --- | --- | --- |",
)


class Run(NamedTuple):
  """One training run of the table."""

  setting: str
  method: str
  seed: int
  config: Config
  directory: Path


def maml_plus_plus_schedule() -> dict:
  """MAML++'s inner steps and annealing lengths: its defaults in :data:`amaml.defaults.BY_METHOD`
  (what :func:`amaml.maml_plus_plus` and ``--method maml++`` use where a field says 0)."""
  plus = BY_METHOD["maml++"]
  return {k: plus[k] for k in ("inner_steps", "multi_step_loss", "first_order_steps")}


def scaled(steps: int, budget: float) -> int:
  """``steps`` scaled by ``budget``, at least 1."""
  return max(1, round(steps * budget))


def run_config(setting: str, method: str, *, budget: float = 1.0, seed: int = 0, **overrides):
  """The :class:`~amaml.configs.Config` of one run (see the module docstring): the
  setting's named config, its method's published settings, ``budget`` applied to the
  schedule, then ``overrides`` (any config fields)."""
  name = SETTINGS[setting]
  fields = dict(method=method, seed=seed, iterations=scaled(CONFIGS[name].iterations, budget))
  if method == "maml":
    fields.update(alpha=MAML_ALPHA[CONFIGS[name].ways], test_adaptation="fixed")
  elif method == "maml++":
    plus = maml_plus_plus_schedule()
    fields.update(
      inner_steps=plus["inner_steps"],
      eval_inner_steps=plus["inner_steps"],
      test_adaptation="fixed",
      multi_step_loss=scaled(plus["multi_step_loss"], budget),
      first_order_steps=scaled(plus["first_order_steps"], budget),
    )
  return get_config(name, **{**fields, **overrides})


def check_choices(settings, methods, seeds: int, budget: float) -> None:
  """Raises ``ValueError`` naming the flag and the fix for a bad choice."""
  bad = [s for s in settings if s not in SETTINGS]
  if bad or not settings:
    raise ValueError(f"--settings {' '.join(bad)}: use some of {' '.join(SETTINGS)}")
  bad = [m for m in methods if m not in METHODS]
  if bad or not methods:
    raise ValueError(f"--methods {' '.join(bad)}: use some of {' '.join(METHODS)}")
  if not 0 < budget <= 1:
    raise ValueError(
      f"--budget {budget:g}: use a fraction of the papers' schedules in (0, 1], "
      "e.g. 0.001 for a smoke run on a CPU"
    )
  if seeds < 1:
    raise ValueError(f"--seeds {seeds}: use 1 or more")


def plan(out, settings=tuple(SETTINGS), methods=METHODS, seeds=1, budget=1.0, **overrides):
  """The runs of the table, in order: every setting, method and seed ``0 .. seeds-1``."""
  check_choices(settings, methods, seeds, budget)
  settings, methods = dict.fromkeys(settings), dict.fromkeys(methods)  # once each, in order
  return [
    Run(
      s, m, k, run_config(s, m, budget=budget, seed=k, **overrides), Path(out) / s / m / f"seed{k}"
    )
    for s in settings
    for m in methods
    for k in range(seeds)
  ]


def finished_results(run: Run) -> dict | None:
  """The results of ``run`` if its directory holds them complete, for this configuration."""
  path = run.directory / "results.json"
  if not path.exists():
    return None
  results = json.loads(path.read_text())
  same = results.get("config") == dataclasses.asdict(run.config)
  return results if same and results.get("steps") == run.config.iterations else None


def check_directory(run: Run) -> None:
  """Raises ``ValueError`` when ``run.directory`` holds a run of another configuration."""
  path = run.directory / "config.json"
  if not path.exists():
    return
  old, new = dataclasses.asdict(Config.from_json(path.read_text())), dataclasses.asdict(run.config)
  diff = sorted(k for k in new if old.get(k) != new[k])
  if diff:
    raise ValueError(
      f"{run.directory} holds a run with other {', '.join(diff)} (another --budget or "
      "--data_dir?): pass another --out, or delete that directory to start it over"
    )


def run_one(run: Run, progress: bool = True) -> dict:
  """Trains and evaluates ``run`` with :func:`amaml.train.train` (resuming from its last
  checkpoint; read back when finished) and returns its record (:func:`record`). A run
  stopped by the non-finite guard is recorded as failed."""
  from amaml import train

  results = finished_results(run)
  if results is not None:
    return record(run, results, "reused")
  check_directory(run)
  try:
    _, results = train.train(run.config, run.directory, resume=True, progress=progress)
  except FloatingPointError as e:
    return {**record(run, None, "failed"), "error": str(e).splitlines()[0]}
  return record(run, results, "trained")


def record(run: Run, results: dict | None, status: str) -> dict:
  """One line of ``reproduce.jsonl``: the run, its test numbers (accuracy as a fraction)
  and the versions that produced them."""
  from amaml.env import versions

  rec = {"setting": run.setting, "method": run.method, "seed": run.seed, "status": status}
  rec.update(run_dir=str(run.directory), iterations=run.config.iterations, steps=None)
  rec.update(accuracy=None, accuracy_ci95=None, published=published(run.method, run.setting))
  if results is None:
    return {**rec, "config": dataclasses.asdict(run.config), "versions": versions()}
  t = results["test"]
  rec.update(steps=results["steps"], accuracy=t.get("accuracy"))
  rec.update(accuracy_ci95=t.get("accuracy_ci95"), tasks=t["tasks"])
  rec.update(test_inner_steps=t["inner_steps"], alpha_scale=t["alpha_scale"])
  rec["fixed_protocol_accuracy"] = results.get("test_fixed", t).get("accuracy")
  for k in ("train_seconds", "final_alpha", "final_beta", "config", "versions"):
    rec[k] = results.get(k)
  return rec


def published(method: str, setting: str) -> float:
  """The published accuracy (%) that ``method`` is set against (:data:`COMPARED_WITH`)."""
  return PUBLISHED[COMPARED_WITH[method]][setting]


def table(records: list[dict], settings=tuple(SETTINGS), methods=METHODS) -> str:
  """The Markdown table of run ``records`` (as :func:`run_one` returns them, any number of
  seeds each): one row per setting and method, in the order given. Several seeds: their
  mean and its 95% CI over seeds; one seed: its accuracy and 95% CI over test tasks. A row
  with no record reads "not run", one whose runs all failed "failed"."""
  rows = [
    _row(s, m, [r for r in records if (r["setting"], r["method"]) == (s, m)])
    for s in settings
    for m in methods
  ]
  return "\n".join([*_HEADER, *rows])


def _row(setting: str, method: str, runs: list[dict]) -> str:
  pub = published(method, setting)
  pub_cell = f"{pub:.2f} ({_LABELS[COMPARED_WITH[method]]})"
  done = [r for r in runs if r.get("accuracy") is not None]
  if not done:
    what = "failed" if runs else "not run"
    return f"| {setting} | {method} | 0/{len(runs)} | - | {what} | {pub_cell} | - |"
  acc, ci = _accuracy(done)
  steps = sorted({r["steps"] for r in done})
  steps_cell = f"{steps[0]:,}" + (f"-{steps[-1]:,}" if len(steps) > 1 else "")
  return (
    f"| {setting} | {method} | {len(done)}/{len(runs)} | {steps_cell} | {acc:.2f} ± {ci:.2f} "
    f"| {pub_cell} | {acc - pub:+.2f} |"
  )


def _accuracy(runs: list[dict]) -> tuple[float, float]:
  """Accuracy and 95% CI half-width in %: over test tasks (one run), else over runs."""
  from amaml.stats import mean_confidence_interval

  if len(runs) == 1:
    return 100 * runs[0]["accuracy"], 100 * (runs[0]["accuracy_ci95"] or math.nan)
  return mean_confidence_interval([100 * r["accuracy"] for r in runs])


def reproduce_omniglot(
  out,
  settings=tuple(SETTINGS),
  methods=METHODS,
  seeds: int = 1,
  budget: float = 1.0,
  progress: bool = True,
  log: Callable[[str], None] | None = None,
  **overrides,
) -> tuple[list[dict], str]:
  """Runs the table's runs (:func:`plan`) one after another into ``out`` and returns their
  records and the table. Writes ``out/reproduce.jsonl`` (after every run) and
  ``out/reproduce.md``. ``overrides`` (config fields, e.g. ``data_dir``) apply to every run;
  ``log`` gets a line per run (default: stderr)."""
  runs = plan(out, settings, methods, seeds, budget, **overrides)
  log = log or (lambda line: print(line, file=sys.stderr, flush=True))
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  records = []
  for i, run in enumerate(runs, 1):
    log(
      f"[{i}/{len(runs)}] {run.setting} {run.method} seed {run.seed}: "
      f"{run.config.iterations:,} meta steps in {run.directory}"
    )
    records.append(run_one(run, progress))
    _write_text(out / "reproduce.jsonl", "".join(json.dumps(r) + "\n" for r in records))
  text = caption(budget, seeds) + "\n\n" + table(records, settings, methods)
  _write_text(out / "reproduce.md", text + "\n")
  return records, text


def caption(budget: float, seeds: int) -> str:
  """The line above the table: what was run."""
  from amaml import __version__

  schedule = "the papers' schedules" if budget == 1 else f"{budget:g} of the papers' schedules"
  return (
    f"Omniglot meta-test accuracy, amaml {__version__}: {schedule}, {seeds} seed(s) each; "
    "published: MAML (Finn et al. 2017), MAML++ (Antoniou et al. 2019)."
  )


def _write_text(path: Path, text: str) -> None:
  tmp = path.with_suffix(".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)
