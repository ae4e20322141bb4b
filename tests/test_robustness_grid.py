"""benchmarks/robustness.py: the vmapped grid of training runs equals the runs one by one."""

import dataclasses
import json
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from conftest import slow_except

from amaml import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import robustness  # noqa: E402


@pytest.mark.parametrize(
  "method",
  slow_except(robustness.METHODS, [m for m in robustness.METHODS if "@scalar" not in m]),
)
def test_grid_cells_equal_separate_runs(method):
  budget = dict(steps=6, meta_batch=5, eval_tasks=8, log_every=3)
  cfg = robustness.make_config("sinusoid", method, budget)
  assert cfg.alpha_granularity == ("scalar" if "@scalar" in method else None)
  assert cfg.outer_optimizer == "adam" or "+adam" not in method
  assert cfg.resolved_alpha_search == (method == "alpha-maml")  # amaml's default searches
  exp = train.build(cfg)
  cells = [(0.01, 1e-3, 0), (0.3, 1e-2, 0), (0.05, 1e-4, 1)]
  if not robustness.has_beta0(cfg):  # the default's outer optimizer sets its own rate
    cells = [(a0, None, seed) for a0, _, seed in cells]
  state, hist, _, _ = robustness.run_cells(exp, cells, budget["steps"], budget["log_every"])
  assert hist["alpha"].shape == (budget["steps"], len(cells))

  for j, (a0, b0, seed) in enumerate(cells):
    # the same run written out by hand, from the state of a learner built with these
    # initial rates (the step itself does not depend on them: one compile serves all)
    single = train.build(
      dataclasses.replace(cfg, alpha=a0, beta=b0 or cfg.resolved_beta, seed=seed)
    )
    st = single.learner.init(single.params)
    if cfg.resolved_alpha_search:  # the one-seed run's search, on its own first tasks
      st = train.alpha_search(single)(st, single.data["train"], seed)
    for i in range(budget["steps"]):
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), i)
      st, m = exp.learner.step(st, single.sample(key, None, budget["meta_batch"]))
    np.testing.assert_allclose(hist["alpha"][-1, j], m["alpha"], rtol=1e-5)
    np.testing.assert_allclose(hist["beta"][-1, j], m["beta"], rtol=1e-5)
    chex.assert_trees_all_close(
      jax.tree.map(lambda x: x[j], state.params), st.params, rtol=2e-4, atol=1e-6
    )
    if method == "maml":  # fixed rates stay at the cell's initial values
      assert hist["alpha"][-1, j] == pytest.approx(a0) and hist["beta"][-1, j] == pytest.approx(b0)
    else:
      assert hist["alpha"][-1, j] != pytest.approx(a0, rel=1e-9)


def test_methods_without_beta0_fill_every_column():
  rows = [
    dict(method="alpha-maml", alpha0=0.1, beta0=None, seed=0, test_selected=0.2),
    dict(method="maml", alpha0=0.1, beta0=1e-3, seed=0, test_one_step=0.5),
    dict(method="maml", alpha0=0.1, beta0=1e-2, seed=0, test_one_step=0.6),
  ]
  text = robustness.table(rows, "sinusoid", [0.1], [1e-3, 1e-2])
  assert "| 0.1 | 0.5 / **0.2** | 0.6 / **0.2** |" in text


def test_table_marks_diverged_cells_and_scores_each_method_by_its_protocol():
  rows = [
    dict(method=m, alpha0=a, beta0=1e-3, seed=0, test_one_step=v, test_selected=w)
    for m, a, v, w in [
      ("maml", 0.1, 0.5, 0.3),
      ("alpha-maml", 0.1, 9.0, 0.4),
      ("maml", 4.0, float("nan"), 1.0),
      ("alpha-maml", 4.0, 9.0, 2.0),
    ]
  ]
  text = robustness.table(rows, "sinusoid", [0.1, 4.0], [1e-3])
  assert "| 4 | diverged (1/1) / **2** |" in text  # MAML: 1 step; amaml: selected
  assert "| 0.1 | 0.5 / **0.4** |" in text
  text = robustness.table(rows, "sinusoid", [0.1, 4.0], [1e-3], field="test_selected")
  assert "| 4 | 1 / **2** |" in text


def test_anchor_table_takes_each_methods_best_beta0():
  rows = [
    dict(method="alpha-maml@scalar+adam", alpha0=0.1, beta0=b, seed=0, test_selected=v)
    for b, v in [(1e-4, 0.9), (1e-2, 0.5)]
  ]
  rows += [dict(method="maml+prodigy", alpha0=0.1, beta0=None, seed=0, test_one_step=0.7)]
  text = robustness.anchor_table(rows, "sinusoid", [0.1])
  assert f"| {robustness.LABELS['alpha-maml@scalar+adam']} | 0.5 | 0.5 | 0.5 |" in text
  assert "| maml+prodigy | 0.7 | 0.7 | 0.7 |" in text


def test_grid_cells_at_the_configs_rates_are_the_seeds_run(tmp_path):
  """The grid trains through the loop of ``amaml train --seeds`` (:func:`amaml.seeds.make_chunk`):
  its cells at the config's own rates, seeds 0 and 1, equal the two seeds of a ``--seeds 2``
  run to 1e-6, step by step (each log line's mean loss, the last alpha) and in the final
  weights; a third cell from another alpha0 trains beside them, and after the alpha0 search
  (on a fixed grid) it is the first cell's run."""
  budget = dict(steps=6, meta_batch=5, eval_tasks=8, log_every=3)
  cfg = dataclasses.replace(robustness.make_config("sinusoid", "alpha-maml", budget), hidden=16)
  b0 = cfg.resolved_beta if robustness.has_beta0(cfg) else None
  cells = [(cfg.alpha, b0, 0), (cfg.alpha, b0, 1), (0.5, b0, 0)]
  state, hist, _, _ = robustness.run_cells(train.build(cfg), cells, 6, 3)
  multi, _ = train.train(
    dataclasses.replace(cfg, seeds=2), tmp_path / "r", progress=False, evaluate_at_end=False
  )
  lines = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [3, 6]
  for k in range(2):
    for n, line in enumerate(lines):
      want = hist["loss"][3 * n : 3 * n + 3, k].mean()
      np.testing.assert_allclose(line[f"seed{k}/loss"], want, rtol=1e-6)
      np.testing.assert_allclose(line[f"seed{k}/alpha"], hist["alpha"][3 * n + 2, k], rtol=1e-6)
    chex.assert_trees_all_close(
      jax.tree.map(lambda x: x[k], state.params),
      jax.tree.map(lambda x: x[k], multi.params),
      rtol=1e-6,
      atol=1e-6,
    )
  np.testing.assert_array_equal(hist["loss"][:, 2], hist["loss"][:, 0])  # any alpha0, one run
  np.testing.assert_array_equal(hist["alpha"][:, 2], hist["alpha"][:, 0])


def test_make_chunk_keeps_its_signature_and_outputs():
  """``robustness.make_chunk(exp, length)``: ``(state, images, seeds, start) -> (state,
  {loss, alpha, beta})``, each ``[length, cells]`` (alpha-maml's outer optimizer reports its
  rate as beta)."""
  budget = dict(steps=2, meta_batch=3, eval_tasks=8, log_every=2)
  cfg = dataclasses.replace(robustness.make_config("sinusoid", "alpha-maml", budget), hidden=8)
  exp = train.build(cfg)
  state = robustness.init_cells(cfg, exp, [(0.1, None, 0), (0.2, None, 3)])
  chunk = robustness.make_chunk(exp, 2)
  state, m = chunk(state, None, jax.numpy.asarray([0, 3], "int32"), jax.numpy.int32(4))
  assert set(m) == {"loss", "alpha", "beta"}
  assert all(v.shape == (2, 2) for v in m.values())
  assert np.all(np.isfinite(m["beta"])) and np.all(m["alpha"][:, 0] != m["alpha"][:, 1])
  assert np.all(np.asarray(state.step) == 2)


def test_evaluate_cells_val_is_the_chosen_adaptations_validation_score():
  """``"val"`` is the guarded validation curve, averaged over tasks, at the chosen scale and
  step count, signed so that higher is better (minus the loss on sinusoid)."""
  budget = dict(steps=4, meta_batch=5, eval_tasks=8, log_every=2)
  exp = train.build(robustness.make_config("sinusoid", "maml", budget))
  cells = [(0.01, 1e-3, 0), (0.3, 1e-2, 0)]
  state, _, _, _ = robustness.run_cells(exp, cells, budget["steps"], budget["log_every"])
  val = exp.sample(jax.random.key(1), None, 16)
  test = exp.sample(jax.random.key(2), None, 8)
  ev = robustness.evaluate_cells(exp, state, val, test, 1 << 20)
  for j, e in enumerate(ev):
    curves = robustness._guard(
      robustness.curves_cells(exp, state, val, e["selected_scale"], robustness.EVAL_STEPS)
    )["loss"]
    assert e["val"] == pytest.approx(-curves[j, :, e["selected_steps"]].mean(), rel=1e-5)
