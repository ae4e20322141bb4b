"""``amaml reproduce omniglot``: the table from hand-written records, the runs' configs, a
tiny end-to-end run on fake Omniglot arrays, and one-line errors for bad flags."""

import json
import math

import pytest


from amaml import cli, reproduce
from amaml.configs import get_config

COLUMNS = [
  "setting",
  "method",
  "seeds",
  "steps run",
  "ours (% ± 95% CI)",
  "published (%)",
  "difference (pp)",
]


def _rec(setting, method, accuracy, ci=0.004, steps=60000, seed=0):
  return dict(
    setting=setting,
    method=method,
    seed=seed,
    steps=steps,
    accuracy=accuracy,
    accuracy_ci95=ci,
    status="trained",
  )


def _cells(text):
  """The table's rows as lists of cells, the header first."""
  lines = [l for l in text.splitlines() if l.startswith("|")]
  return [[c.strip() for c in l.strip("|").split("|")] for l in lines if "---" not in l]


def test_table_has_every_column_value_and_difference():
  records = [
    _rec("5w1s", "alpha-maml", 0.9912),
    _rec("5w1s", "maml", 0.985, ci=0.0031),
    _rec("5w1s", "maml++", 0.9950, steps=59000),
  ]
  header, *rows = _cells(reproduce.table(records, ["5w1s"]))
  assert header == COLUMNS
  assert rows == [
    ["5w1s", "alpha-maml", "1/1", "60,000", "99.12 ± 0.40", "98.70 (MAML)", "+0.42"],
    ["5w1s", "maml", "1/1", "60,000", "98.50 ± 0.31", "98.70 (MAML)", "-0.20"],
    ["5w1s", "maml++", "1/1", "59,000", "99.50 ± 0.40", "99.47 (MAML++)", "+0.03"],
  ]


def test_table_shows_missing_and_failed_runs_and_pools_seeds():
  records = [
    _rec("20w5s", "maml", 0.97, seed=0),
    _rec("20w5s", "maml", 0.99, seed=1),
    {**_rec("20w5s", "maml++", None), "status": "failed"},
  ]
  rows = _cells(reproduce.table(records, ["20w1s", "20w5s"]))[1:]
  assert len(rows) == 6  # every setting and method, run or not
  by = {(r[0], r[1]): r for r in rows}
  assert by["20w1s", "maml"] == ["20w1s", "maml", "0/0", "-", "not run", "95.80 (MAML)", "-"]
  assert by["20w5s", "maml++"][2:5] == ["0/1", "-", "failed"]
  # two seeds: their mean, and the 95% CI over seeds (1.96 * std / sqrt(2) = 1.96)
  assert by["20w5s", "maml"][2:] == ["2/2", "60,000", "98.00 ± 1.96", "98.90 (MAML)", "-0.90"]


def test_published_numbers():
  assert [reproduce.PUBLISHED["maml"][s] for s in reproduce.SETTINGS] == [98.7, 99.9, 95.8, 98.9]
  plus = [reproduce.PUBLISHED["maml++"][s] for s in reproduce.SETTINGS]
  assert plus == [99.47, 99.93, 97.65, 99.33]


def test_run_configs_follow_the_papers_and_the_budget():
  for setting, name in reproduce.SETTINGS.items():
    named = get_config(name)
    default = reproduce.run_config(setting, "alpha-maml")
    assert default == named  # amaml's default: the named config as it is
    maml = reproduce.run_config(setting, "maml")
    assert (maml.alpha, maml.test_adaptation, maml.eval_inner_steps) == (
      0.4 if named.ways == 5 else 0.1,
      "fixed",
      10,
    )
    assert (maml.iterations, maml.meta_batch, maml.inner_steps) == (
      60000,
      32 if named.ways == 5 else 16,
      1 if named.ways == 5 else 5,
    )
    plus = reproduce.run_config(setting, "maml++", budget=0.001)
    assert (plus.iterations, plus.multi_step_loss, plus.first_order_steps) == (60, 5, 25)
    assert (plus.inner_steps, plus.eval_inner_steps, plus.test_adaptation) == (5, 5, "fixed")
  assert reproduce.run_config("5w1s", "maml", budget=1e-9).iterations == 1


# the named configs cut to seconds: a small network, few tasks and test tasks
TINY = dict(hidden=8, meta_batch=2, queries=2, val_tasks=4, eval_tasks=6, eval_batch=6)


def _reproduce(out, data_dir, methods, budget=1e-4):
  """``reproduce_omniglot`` on 5w1s at ``budget`` (6 meta steps), tiny; its log lines too."""
  lines = []
  records, text = reproduce.reproduce_omniglot(
    out,
    ["5w1s"],
    methods,
    budget=budget,
    progress=False,
    log=lines.append,
    data_dir=data_dir,
    eval_inner_steps=2,
    **TINY,
  )
  return records, text, lines


def _check_table(text, records, methods):
  header, *rows = _cells(text)
  assert header == COLUMNS and [r[1] for r in rows] == list(methods)
  for row, rec in zip(rows, records):
    assert row[0] == "5w1s" and row[2:4] == ["1/1", "6"] and rec["steps"] == 6
    acc, ci = (float(v) for v in row[4].split(" ± "))
    assert math.isfinite(acc) and math.isfinite(ci) and math.isfinite(float(row[6]))
    assert row[5] == f"{reproduce.published(rec['method'], '5w1s'):.2f}" + row[5][5:]
    assert 0.0 <= rec["accuracy"] <= 1.0 and rec["versions"]["amaml"]


def test_reproduce_writes_its_table_and_skips_finished_runs(small_omniglot, tmp_path):
  out = tmp_path / "runs"
  records, text, lines = _reproduce(out, small_omniglot, ["maml"])
  assert lines == [f"[1/1] 5w1s maml seed 0: 6 meta steps in {out}/5w1s/maml/seed0"]
  assert records[0]["status"] == "trained" and records[0]["config"]["alpha"] == 0.4
  _check_table(text, records, ["maml"])
  assert (out / "reproduce.md").read_text() == text + "\n"
  jsonl = [json.loads(l) for l in (out / "reproduce.jsonl").read_text().splitlines()]
  assert jsonl == json.loads(json.dumps(records))
  # a re-run reads the finished run back
  again, text2, _ = _reproduce(out, small_omniglot, ["maml"])
  assert again[0]["status"] == "reused" and text2 == text
  # another budget in the same directory is named, with the fix
  with pytest.raises(ValueError, match="another --out"):
    _reproduce(out, small_omniglot, ["maml"], budget=2e-4)


@pytest.mark.slow  # three compiles of the training loop (MAML++'s 5 steps: ~2 minutes)
def test_reproduce_runs_every_method(small_omniglot, tmp_path):
  records, text, lines = _reproduce(tmp_path / "runs", small_omniglot, reproduce.METHODS)
  assert len(lines) == 3 and [r["status"] for r in records] == ["trained"] * 3
  _check_table(text, records, reproduce.METHODS)
  plus = records[2]["config"]
  assert (plus["inner_steps"], plus["first_order_steps"], plus["multi_step_loss"]) == (5, 2, 1)


@pytest.mark.parametrize(
  "flags, named",
  [
    (["--budget", "0"], "--budget 0: use a fraction"),
    (["--budget", "1.5"], "--budget 1.5"),
    (["--settings", "5w1s", "10w1s"], "--settings 10w1s: use some of 5w1s 5w5s 20w1s 20w5s"),
    (["--methods", "reptile"], "--methods reptile: use some of alpha-maml maml maml++"),
    (["--seeds", "0"], "--seeds 0: use 1 or more"),
    (["--eval_tasks", "0"], "--eval_tasks 0: use 1 or more"),
  ],
)
def test_a_bad_flag_is_one_line(capsys, tmp_path, flags, named):
  assert cli.main(["reproduce", "omniglot", "--out", str(tmp_path / "r"), *flags]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"amaml reproduce: {named}")
  assert not (tmp_path / "r").exists()  # checked before anything is written
