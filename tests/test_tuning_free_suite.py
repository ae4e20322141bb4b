"""benchmarks/tuning_free_suite.py: the smallest suite runs, its tables read hand-written
records correctly, and the linear family's closed-form best alpha is the best."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import tuning_free_suite as suite  # noqa: E402


def _rows(family, budget, method, values):
  return [
    {
      "family": family,
      "budget": budget,
      "method": method,
      "alpha0": a,
      "seed": s,
      "test": v,
      "steps": 10,
    }
    for a, per_seed in values.items()
    for s, v in enumerate(per_seed)
  ]


def test_tables_on_hand_written_records():
  rows = _rows(
    "omniglot-5w1s", "short", "maml", {0.01: [40, 42], 1.0: [80, 90], 4.0: [20, 20]}
  ) + _rows("omniglot-5w1s", "short", suite.DEFAULT, {0.01: [84, 86], 1.0: [86, 88], 4.0: [83, 85]})
  means = suite.cell_means(rows)
  assert means[("omniglot-5w1s", "short", "maml", 1.0)] == 85.0
  # the default's worst start (84) against MAML's best (85): -1 point, just meets the target
  table = suite.family_table(rows, "omniglot-5w1s", "short", [0.01, 1.0, 4.0])
  default_line = next(l for l in table.splitlines() if "amaml default" in l)
  assert "| 85.0 | 87.0 | 84.0 | 84.0 | 87.0 | 3.0 | -1.0 (met) |" in default_line
  assert "| 41.0 | 85.0 | 20.0 | 20.0 | 85.0 | 65.0 | - |" in table
  line = suite.summary(rows, [0.01, 1.0, 4.0])
  assert "| omniglot-5w1s | short | 84 | 85 | -1.0 | yes |" in line
  assert line.endswith("met on 1 of 1.")
  assert "| omniglot-5w1s | short | 85 | **-1.0** |" in suite.overview(rows, [0.01, 1.0, 4.0])


def test_a_method_run_from_fewer_starts_is_tabulated_over_those_it_ran():
  rows = _rows("omniglot-5w1s", "long", "maml", {0.01: [40], 1.0: [90], 4.0: [70]}) + _rows(
    "omniglot-5w1s", "long", suite.DEFAULT, {1.0: [88, 86]}
  )
  # the default from a0 = 1 only (every a0 is the same run): worst 87 against MAML's best 90
  table = suite.family_table(rows, "omniglot-5w1s", "long", [0.01, 1.0, 4.0])
  default_line = next(l for l in table.splitlines() if "amaml default" in l)
  assert "|  | 87.0 |  | 87.0 | 87.0 | 0.0 | -3.0 (a0 = 1 only) |" in default_line
  line = suite.summary(rows, [0.01, 1.0, 4.0])
  assert "| omniglot-5w1s | long | 87 | 90 | -3.0 (a0 = 1 only) | no |" in line
  assert line.endswith("met on 0 of 1.")
  assert "| omniglot-5w1s | long | 90 | -3.0 (a0 = 1 only) |" in suite.overview(
    rows, [0.01, 1.0, 4.0]
  )
  # MAML from some starts only: its best is not known, so no gap is given
  partial = [r for r in rows if not (r["method"] == "maml" and r["alpha0"] == 4.0)]
  assert "MAML not run" in suite.family_table(partial, "omniglot-5w1s", "long", [0.01, 1.0, 4.0])
  assert suite.summary(partial, [0.01, 1.0, 4.0]).endswith("met on 0 of 0.")


def test_regression_ratio_and_divergence():
  rows = _rows("linear", "long", "maml", {0.1: [2.0], 1.0: [float("inf")]}) + _rows(
    "linear", "long", suite.DEFAULT, {0.1: [2.1], 1.0: [2.4]}
  )
  # MSE: lower is better, the gap is a ratio, a diverged cell is MAML's worst not its best
  assert suite.worst_best([2.0, float("inf")], higher=False) == (np.inf, 2.0)
  table = suite.family_table(rows, "linear", "long", [0.1, 1.0])
  assert "| 2 | diverged | diverged | 2 |" in table
  assert "1.20x |" in next(
    l for l in table.splitlines() if "amaml default" in l
  )  # 2.4 / 2.0: missed
  assert suite.summary(rows, [0.1, 1.0]).endswith("met on 0 of 1.")
  assert "| linear | long | 2 | 1.20x |" in suite.overview(rows, [0.1, 1.0])


def test_render_tabulates_the_chosen_field(tmp_path, capsys):
  rows = [
    {**r, "test_coarse": r["test"] - 10.0}
    for r in _rows("omniglot-5w1s", "short", "maml", {0.01: [40.0], 1.0: [80.0]})
    + _rows("omniglot-5w1s", "short", suite.DEFAULT, {0.01: [84.0], 1.0: [86.0]})
  ]
  path = tmp_path / "rows.jsonl.gz"
  suite.robustness.write_jsonl(path, rows)
  suite.main(["--render", str(path), "--field", "test_coarse", "--images", str(tmp_path)])
  out = capsys.readouterr().out
  assert "| omniglot-5w1s | short | 70 | **+4.0** |" in out  # 74 against MAML's 70
  suite.main(["--render", str(path), "--images", str(tmp_path)])
  assert "| omniglot-5w1s | short | 80 | **+4.0** |" in capsys.readouterr().out


def test_linear_best_alpha_is_the_closed_form():
  """The expected query MSE after one step is least at LINEAR_BEST_ALPHA (Monte Carlo)."""
  params, loss_fn = suite._linear_setup(0)
  batch = suite._linear_tasks(jax.random.key(0), 20000)

  def after_one_step(alpha):
    def task(sx, sy, qx, qy):
      g = jax.grad(lambda p: loss_fn(p, sx, sy)[0])(params)
      return loss_fn(jax.tree.map(lambda p, d: p - alpha * d, params, g), qx, qy)[0]

    return jnp.mean(jax.vmap(task)(*batch))

  a = suite.LINEAR_BEST_ALPHA
  grid = np.array([0.6, 0.8, 1.0, 1.25, 1.6]) * a
  losses = np.array([float(after_one_step(x)) for x in grid])
  assert np.argmin(losses) == 2, losses
  # and the closed-form ratio of losses at a and at 0 (no adaptation)
  k, d = suite.LINEAR_SHOTS, suite.LINEAR_DIM
  np.testing.assert_allclose(losses[2] / float(after_one_step(0.0)), 1 - k / (k + d + 1), rtol=0.03)


@pytest.mark.parametrize("method", ["maml", "adam+search"])
def test_smallest_suite_runs(method, tmp_path):
  rows = suite.run_family(
    "linear", method, alphas=(0.01, 1.0), budgets=(2, 4), seeds=1, log_every=2
  )
  assert [(r["budget"], r["steps"], r["alpha0"]) for r in rows] == [
    ("short", 2, 0.01),
    ("short", 2, 1.0),
    ("long", 4, 0.01),
    ("long", 4, 1.0),
  ]
  assert len(rows[-1]["alpha_traj"]) == 2
  tensors = rows[0]["final_alpha_tensors"]  # one alpha for MAML, one per tensor for the default
  assert list(tensors) == ([""] if method == "maml" else ["w"])
  assert tensors[list(tensors)[0]] == pytest.approx(rows[0]["final_alpha"], rel=1e-6)
  if method == "maml":  # alpha is fixed
    assert [r["final_alpha"] for r in rows] == pytest.approx([0.01, 1.0, 0.01, 1.0])
  assert all(np.isfinite(r["test"]) or r["alpha0"] == 1.0 for r in rows)
  assert "| method | a0=0.01 | a0=1 |" in suite.report(rows)


def test_val_points_keep_the_best_validation_point(monkeypatch):
  """With ``val_points``, ``test_best`` is the test score at the validation point that did
  best: here the point at step 4 of 8 (validation scores forced), whose test score is the
  ``long`` test of a run stopped at 4 steps."""
  order = iter([[0.0, 0.0], [5.0, 1.0], [1.0, 2.0]])  # at steps 2, 4, 8, per cell
  monkeypatch.setattr(suite, "_val_scores", lambda *a: np.asarray(next(order)))
  kw = dict(alphas=(0.1, 1.0), seeds=1, log_every=2)
  rows = suite.run_family("linear", "dadapt", budgets=(2, 8), val_points=2, **kw)
  at4 = suite.run_family("linear", "dadapt", budgets=(2, 4), **kw)
  long_rows = [r for r in rows if r["budget"] == "long"]
  assert [r["best_step"] for r in long_rows] == [4, 8]
  assert long_rows[0]["test_best"] == pytest.approx(at4[2]["test"], rel=1e-6)
  assert long_rows[1]["test_best"] == pytest.approx(long_rows[1]["test"], rel=1e-6)
  assert [r["best_step"] for r in rows if r["budget"] == "short"] == [2, 2]
  assert all(r["test_best"] == r["test"] for r in at4)  # no validation points: the last


def test_search_cells_searches_each_cell_on_its_seeds_first_tasks():
  """The vmapped search over cells equals a Python loop of :func:`amaml.rates.search_alpha`,
  cell by cell, on the first meta-batch of the cell's seed."""
  import amaml

  fam = suite.FAMILIES["linear"]
  exp = suite.experiment(fam, suite.DEFAULT, fam.data())
  cells = [(0.01, 0), (4.0, 1)]
  state = suite.init_cells(fam, exp, cells)
  ids = jnp.asarray([s for _, s in cells], jnp.int32)
  searched = suite.search_cells(exp, state, None, ids)
  for j, (a0, seed) in enumerate(cells):
    key = jax.random.fold_in(amaml.train.run_keys(seed).train, 0)
    one = jax.tree.map(lambda x: x[j], state)
    batch = fam.sample(key, None, fam.meta_batch)
    alone = amaml.rates.search_alpha(exp.learner.meta_loss, one, batch)
    got = jax.tree.map(lambda x: x[j], searched.alpha)
    np.testing.assert_allclose(jax.tree.leaves(got), jax.tree.leaves(alone.alpha), rtol=1e-6)
    assert not np.allclose(jax.tree.leaves(got)[0], a0)  # the search moved alpha0


def test_render_a_later_file_replaces_a_family_methods_rows(tmp_path, capsys):
  """Two files with the same (family, method): the later one's cells are tabulated alone,
  not averaged with the earlier's; a (family, method) only in the earlier file stays."""
  old = _rows("omniglot-5w1s", "short", "maml", {0.01: [40.0], 1.0: [80.0]}) + _rows(
    "omniglot-5w1s", "short", suite.DEFAULT, {0.01: [60.0], 1.0: [62.0]}
  )
  new = _rows("omniglot-5w1s", "short", suite.DEFAULT, {0.01: [84.0, 86.0], 1.0: [88.0, 90.0]})
  paths = [tmp_path / "old.jsonl.gz", tmp_path / "new.jsonl.gz"]
  for path, rows in zip(paths, (old, new)):
    suite.robustness.write_jsonl(path, [{"suite": True}, *rows])
  merged = suite.merge(old, new)
  assert [r["test"] for r in merged] == [40.0, 80.0, 84.0, 86.0, 88.0, 90.0]
  suite.main(["--render", *map(str, paths), "--images", str(tmp_path)])
  assert "| omniglot-5w1s | short | 80 | **+5.0** |" in capsys.readouterr().out  # 85 against 80
  alone = suite.family_table(new, "omniglot-5w1s", "short", [0.01, 1.0])  # no MAML rows
  assert alone.splitlines()[-1].endswith("| 85.0 | 89.0 | 85.0 | 89.0 | 4.0 | MAML not run |")


def test_one_budget_is_recorded_as_short_unless_it_is_the_familys_long(monkeypatch):
  """``--budgets S S`` runs one budget, S steps, and records it as the short one; a run of
  the family's long budget alone is its long one, and so is such a row recorded as short."""
  rows = suite.run_family("linear", "maml", alphas=(1.0,), budgets=(2, 2), seeds=1, log_every=2)
  assert [(r["budget"], r["steps"]) for r in rows] == [("short", 2)]
  monkeypatch.setitem(suite.FAMILIES, "linear", suite.FAMILIES["linear"]._replace(long=4))
  rows = suite.run_family("linear", "maml", alphas=(1.0,), budgets=(4, 4), seeds=1, log_every=2)
  assert [(r["budget"], r["steps"]) for r in rows] == [("long", 4)]
  assert suite.budget_of("linear", 4, "short") == "long"
  assert suite.budget_of("linear", 2, "short") == "short"
