"""``amaml train --keep_best`` (:mod:`amaml.best`) on tiny sinusoid runs: the final evaluation
tests the state of the best validation, a stopped or killed run resumes to the same results,
bad combinations are named in one line, and without the flag nothing changes."""

import dataclasses
import json
import shutil
import signal

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from amaml import best, cli, seeds, signals, train
from amaml.checkpoint import Checkpointer
from amaml.configs import get_config

# a validation every 10 steps, a checkpoint every 20 (the end: 40)
KEEP = dict(keep_best=True, val_every=10, val_tasks=10, iterations=40)
# what the timing of a run changes in results.json
TIMES = ("train_seconds", "first_chunk_seconds_incl_compile")


@pytest.fixture
def val_losses(monkeypatch):
  """``val_losses({step: loss})``: the validation at ``step`` reports ``loss`` as its query
  loss (its other numbers are real), whatever the state; returns the steps validated. With
  ``--seeds`` (``seed`` 0), ``val_losses([{step: loss}, ...])``: seed k's reports
  ``losses[k][step]``."""

  def set_losses(losses: dict):
    at, validated = {}, []
    evaluate = train.evaluate

    def before(log_line):  # the log line (of one seed or several) comes just before its validation
      def line(step, *args):
        at["step"] = step
        return log_line(step, *args)

      return line

    def fake(exp, params, alpha, split, *args, **kw):
      out = evaluate(exp, params, alpha, split, *args, **kw)
      validated.append(at["step"])
      mine = losses if isinstance(losses, dict) else losses[exp.config.seed]  # (seed k: seed k)
      return {**out, "loss": float(mine[at["step"]])}

    monkeypatch.setattr(train, "log_line", before(train.log_line))
    monkeypatch.setattr(seeds, "log_line", before(seeds.log_line))
    monkeypatch.setattr(train, "evaluate", fake)
    return validated

  return set_losses


def _results(path) -> dict:
  out = json.loads((path / "results.json").read_text())
  return {k: v for k, v in out.items() if k not in TIMES}


def test_the_best_validation_is_tested_not_the_last_step(tmp_path, tiny_config, val_losses):
  """Validation peaks at step 20 (a tie at 40 does not replace it): the final evaluation
  tests the state that a run stopped at step 20 ends with, and reports the last step's."""
  validated = val_losses({10: 3.0, 20: 1.0, 30: 2.0, 40: 1.0})
  cfg = tiny_config(**KEEP)
  last, results = train.train(cfg, tmp_path / "keep", progress=False)
  assert validated == [10, 20, 30, 40]
  assert (results["tested"], results["best_step"], results["best_val_loss"]) == ("best", 20, 1.0)
  assert best.kept_step(tmp_path / "keep") == 20
  stopped_cfg = dataclasses.replace(cfg, iterations=20, keep_best=False)  # tests its last state
  stopped, at_20 = train.train(stopped_cfg, tmp_path / "stopped", progress=False)
  kept, step, metric = best.restore(tmp_path / "keep", last)
  assert (step, metric) == (20, 1.0)
  chex.assert_trees_all_equal(kept, stopped)  # bitwise: the state at step 20
  assert results["test"] == at_20["test"]
  assert results["test_adaptation"] == at_20["test_adaptation"]
  lasts = train.meta_test(train.build(cfg), last.params, last.alpha)["test"]
  assert results["test_last"] == lasts != results["test"]
  assert "tested step 20, the best on validation (best_val_loss 1)" in train.format_results(results)
  # amaml evaluate: the best checkpoint, named in one line; --step N: checkpoint N
  _, loaded = train.load_run(tmp_path / "keep")
  chex.assert_trees_all_equal(loaded, stopped)
  assert int(train.load_run(tmp_path / "keep", 40)[1].step) == 40


def test_evaluate_names_the_best_step(tmp_path, tiny_config, val_losses, capsys):
  val_losses({10: 2.0, 20: 1.0, 30: 2.0, 40: 3.0})
  train.train(tiny_config(**KEEP), tmp_path / "r", progress=False, evaluate_at_end=False)
  argv = ["evaluate", "--run", str(tmp_path / "r"), "--eval_tasks", "10", "--eval_inner_steps"]
  assert cli.main(argv + ["1"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0] == f"{tmp_path / 'r'}: evaluating the best checkpoint on validation, step 20 " + (
    "(--step N for another)"
  )
  assert "20 meta steps" in out[1]
  assert cli.main(argv + ["1", "--step", "40"]) == 0
  assert "40 meta steps" in capsys.readouterr().out.splitlines()[0]


def test_resume_after_a_signal_keeps_the_best_so_far(
  tmp_path, tiny_config, val_losses, monkeypatch
):
  """Stopped by SIGTERM at step 25 (best: step 20) and resumed, a run ends as an
  uninterrupted one: without the best so far, step 30 would become the best."""
  val_losses({10: 2.0, 20: 1.0, 30: 1.5, 40: 3.0})
  monkeypatch.setattr(train, "CHUNK_SECONDS", 0.0)  # one step per call
  cfg = tiny_config(**KEEP)
  _, full = train.train(cfg, tmp_path / "full", progress=False)
  calls = []

  def stop_at_25(*args):
    calls.append(1)
    return (signal.SIGTERM, True) if len(calls) == 25 else (0, False)

  monkeypatch.setattr(train, "_stop_here", stop_at_25)
  with pytest.raises(signals.Interrupted, match="at step 25"):
    train.train(cfg, tmp_path / "split", progress=False)
  assert best.kept_step(tmp_path / "split") == 20
  monkeypatch.setattr(train, "_stop_here", lambda *args: (0, False))
  train.train(cfg, tmp_path / "split", resume=True, progress=False)
  assert full["best_step"] == 20
  assert _results(tmp_path / "full") == _results(tmp_path / "split")
  lines = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines if "val_loss" in r] == [10, 20, 30, 40]  # none at the signal


def test_killed_after_a_best_newer_than_the_checkpoint(
  tmp_path, tiny_config, val_losses, monkeypatch
):
  """Killed while writing the checkpoint of step 40, after the best of step 30 was saved: the
  run resumes from step 20 with a best checkpoint ahead of it, and ends as an uninterrupted
  one."""
  val_losses({10: 3.0, 20: 2.0, 30: 1.0, 40: 1.5})
  cfg = tiny_config(**KEEP)
  train.train(cfg, tmp_path / "full", progress=False)
  save = Checkpointer.save

  def dies_at_40(self, step, state):
    if step == 40 and self.directory.endswith("checkpoints"):
      raise KeyboardInterrupt("killed")
    save(self, step, state)

  monkeypatch.setattr(Checkpointer, "save", dies_at_40)
  with pytest.raises(KeyboardInterrupt):
    train.train(cfg, tmp_path / "victim", progress=False)
  monkeypatch.setattr(Checkpointer, "save", save)
  assert best.kept_step(tmp_path / "victim") == 30
  ckpt = Checkpointer(tmp_path / "victim" / "checkpoints")
  assert ckpt.latest_step() == 20
  ckpt.close()
  train.train(cfg, tmp_path / "victim", resume=True, progress=False)
  assert _results(tmp_path / "victim")["best_step"] == 30
  assert _results(tmp_path / "full") == _results(tmp_path / "victim")


def test_real_validation_and_the_flag_off(tmp_path, tiny_config):
  """With the real validation numbers the best is their first minimum, the last state (step
  45, between validations) is validated too; without the flag there is no best/, no end
  validation and no new key, and the test is the last state's."""
  cfg = tiny_config(**{**KEEP, "iterations": 45, "log_every": 5, "checkpoint_every": 0})
  _, on = train.train(cfg, tmp_path / "on", progress=False)
  _, off = train.train(dataclasses.replace(cfg, keep_best=False), tmp_path / "off", progress=False)
  lines = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]
  val = [(r["step"], r["val_loss"]) for r in lines(tmp_path / "on") if "val_loss" in r]
  assert [s for s, _ in val] == [10, 20, 30, 40, 45]
  assert on["best_step"] == val[int(np.argmin([v for _, v in val]))][0]
  assert on["best_val_loss"] == min(v for _, v in val)
  assert [r["step"] for r in lines(tmp_path / "off") if "val_loss" in r] == [10, 20, 30, 40]
  assert not (tmp_path / "off" / "best").exists()
  new = {"tested", "best_step", "best_val_loss", "test_last"}
  assert set(on) - set(off) == new & set(on) and not new & set(off)
  assert off["test"] == on.get("test_last", on["test"])  # the last state's test
  assert off["test"] == on["test"] or on["best_step"] != 45


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--val_every", "0"], "amaml train: --keep_best with --val_every 0: "),
    (["--task", "omniglot", "--protocol", "lake"], "amaml train: --keep_best with --protocol lake"),
  ],
)
def test_bad_combinations_are_one_line(tmp_path, capsys, flags, message):
  argv = ["train", "--keep_best", "--out", str(tmp_path / "r"), "--no_progress", *flags]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith(message) and err.count("\n") == 1
  assert not (tmp_path / "r").exists()
  with pytest.raises(ValueError, match="--keep_best"):
    get_config("sinusoid", keep_best=True, val_every=0)


def test_a_fresh_run_clears_an_old_best(tmp_path, tiny_config, val_losses):
  """A new run (no --resume) in a directory without checkpoints but with a best checkpoint
  left over does not inherit it."""
  val_losses({10: 1.0, 20: 2.0})
  cfg = tiny_config(**{**KEEP, "iterations": 20, "checkpoint_every": 0})
  train.train(cfg, tmp_path / "r", progress=False, evaluate_at_end=False)
  for p in (tmp_path / "r" / "checkpoints").iterdir():
    shutil.rmtree(p)
  val_losses({10: 5.0, 20: 4.0})
  _, results = train.train(cfg, tmp_path / "r", progress=False, evaluate_at_end=False)
  assert (results["best_step"], results["best_val_loss"]) == (20, 4.0)


def test_the_tracker_compares_saves_and_supersedes(tmp_path, tiny_config):
  """Accuracy rises, loss falls, ties and NaN do not count; a better validation at a step
  before the kept one (a run resumed from before it, not bitwise) replaces it."""
  assert best.better("accuracy", 0.6, 0.5) and not best.better("loss", 0.6, 0.5)
  assert best.better("loss", 0.4, 0.5) and best.better("loss", 9.0, None)
  assert not best.better("loss", 0.5, 0.5) and not best.better("loss", float("nan"), None)
  exp = train.build(tiny_config(**KEEP))
  state = exp.learner.init(exp.params)
  best.Tracker(exp, tmp_path, state, resume=False).update(30, state, {"val_loss": 2.0})
  resumed = best.Tracker(exp, tmp_path, state, resume=True)
  assert (resumed.step, resumed.metric) == (30, 2.0)
  resumed.update(20, state, {"val_loss": 2.0})
  assert best.kept_step(tmp_path) == 30
  resumed.update(20, state, {"val_loss": 1.0})
  resumed.update(40, state, {"val_loss": float("nan")})
  assert best.restore(tmp_path, state)[1:] == (20, 1.0)
  with pytest.raises(ValueError, match="val_loss"):
    resumed.update(50, state, {"val_accuracy": 1.0})


def test_each_seed_tests_its_own_best(tmp_path, tiny_config, val_losses):
  """--seeds 2 with validations that peak at different steps (seed 0: 20, a tie at 40 does
  not replace it; seed 1: 30): each seed tests its own best state, bitwise the state that a
  --seeds 2 run stopped at that step has for it, and the summary over seeds is of those."""
  val_losses([{10: 3.0, 20: 1.0, 30: 2.0, 40: 1.0}, {10: 2.0, 20: 2.5, 30: 0.5, 40: 0.7}])
  cfg = tiny_config(**KEEP, seeds=2)
  last, results = train.train(cfg, tmp_path / "keep", progress=False)
  per = results["per_seed"]
  assert [(p["tested"], p["best_step"], p["best_val_loss"]) for p in per] == [
    ("best", 20, 1.0),
    ("best", 30, 0.5),
  ]
  assert best.kept_step(tmp_path / "keep") == 30  # the checkpoint's step: the latest best
  kept, steps, metrics = best.restore(tmp_path / "keep", last)
  assert (steps.tolist(), metrics.tolist()) == ([20, 30], [1.0, 0.5])
  stopped = dataclasses.replace(cfg, iterations=30, checkpoint_every=10, keep_best=False)
  train.train(stopped, tmp_path / "stopped", progress=False, evaluate_at_end=False)
  exp = train.build(cfg)
  for k, at in enumerate((20, 30)):
    want = seeds.seed_state(train.load_run(tmp_path / "stopped", at)[1], k)
    chex.assert_trees_all_equal(seeds.seed_state(kept, k), want)  # bitwise: seed k at step `at`
    mine, end = seeds.seed_experiment(exp, k), seeds.seed_state(last, k)
    assert per[k]["test"] == train.meta_test(mine, want.params, want.alpha)["test"]
    assert per[k]["test_last"] == train.meta_test(mine, end.params, end.alpha)["test"]
    assert per[k]["test_last"] != per[k]["test"]
  assert results["test"] == seeds.spread([p["test"] for p in per])
  assert results["test"] != seeds.spread([p["test_last"] for p in per])
  text = train.format_results(results)
  assert "seed 0: meta-test loss" in text and "seed 1: meta-test loss" in text
  assert "tested step 20, the best on validation (best_val_loss 1)" in text
  assert "tested step 30, the best on validation (best_val_loss 0.5)" in text


def test_seeds_resumed_keep_what_an_uninterrupted_run_keeps(tmp_path, tiny_config, val_losses):
  """A --seeds 2 run stopped at step 20 and resumed to 40 keeps the best checkpoint and writes
  the results of an uninterrupted run: without the bests so far, seed 0 (best: step 20)
  would keep step 30."""
  val_losses([{10: 2.0, 20: 1.0, 30: 1.5, 40: 3.0}, {10: 3.0, 20: 2.0, 30: 1.0, 40: 1.1}])
  cfg = tiny_config(**KEEP, seeds=2)
  last, full = train.train(cfg, tmp_path / "full", progress=False)
  first = dataclasses.replace(cfg, iterations=20)
  train.train(first, tmp_path / "split", progress=False, evaluate_at_end=False)
  assert best.kept_step(tmp_path / "split") == 20
  train.train(cfg, tmp_path / "split", resume=True, progress=False)
  assert [p["best_step"] for p in full["per_seed"]] == [20, 30]
  assert _results(tmp_path / "full") == _results(tmp_path / "split")
  want, got = best.restore(tmp_path / "full", last), best.restore(tmp_path / "split", last)
  chex.assert_trees_all_equal(got[0], want[0])
  assert got[1].tolist() == want[1].tolist() and got[2].tolist() == want[2].tolist()
  assert best.kept_step(tmp_path / "split") == best.kept_step(tmp_path / "full") == 30


def test_evaluate_loads_each_seeds_best(tmp_path, tiny_config, val_losses, capsys):
  """amaml evaluate --run on a --seeds 2 run: each seed's best state (seed 1, which never
  validates to a finite loss: its last state, as its final evaluation), the steps named in
  one line; --step N: checkpoint N of every seed, even where the best checkpoint is step N."""
  nan = float("nan")
  val_losses([{10: 2.0, 20: 1.0, 30: 2.0, 40: 3.0}, dict.fromkeys((10, 20, 30, 40), nan)])
  cfg = tiny_config(**KEEP, seeds=2)
  last, results = train.train(cfg, tmp_path / "r", progress=False)
  seed1 = results["per_seed"][1]
  assert (seed1["tested"], seed1["best_step"], seed1["best_val_loss"]) == ("last", None, None)
  assert "test_last" not in seed1 and results["per_seed"][0]["best_step"] == 20
  argv = ["evaluate", "--run", str(tmp_path / "r"), "--eval_tasks", "10", "--eval_inner_steps"]
  assert cli.main(argv + ["1"]) == 0
  assert capsys.readouterr().out.splitlines()[0] == (
    f"{tmp_path / 'r'}: evaluating the best checkpoint on validation, each seed's own: "
    "seed 0 step 20, seed 1 step 40 (--step N for another)"
  )
  _, loaded = train.load_run(tmp_path / "r")
  kept, steps, _ = best.restore(tmp_path / "r", last)
  assert steps.tolist() == [20, -1] and np.asarray(kept.step).tolist() == [20, 10]
  chex.assert_trees_all_equal(seeds.seed_state(loaded, 0), seeds.seed_state(kept, 0))
  chex.assert_trees_all_equal(seeds.seed_state(loaded, 1), seeds.seed_state(last, 1))
  assert best.kept_step(tmp_path / "r") == 20
  assert np.asarray(train.load_run(tmp_path / "r", 20)[1].step).tolist() == [20, 20]


def test_the_tracker_keeps_each_seeds_best(tmp_path, tiny_config):
  """With seeds each seed compares its own metric (ties and NaN do not count) and keeps its
  own state; the checkpoint is saved as the latest best's step, and a resumed tracker goes on
  from it."""
  exp = train.build(tiny_config(**KEEP, seeds=2))
  state = seeds.init_state(exp)
  at = lambda step: state._replace(step=jnp.full(2, step, jnp.int32))  # the state of `step`
  loss = lambda a, b: {"seed0/val_loss": a, "seed1/val_loss": b}
  tracker = best.Tracker(exp, tmp_path, state, resume=False)
  tracker.update(10, at(10), loss(2.0, float("nan")))
  tracker.update(20, at(20), loss(2.0, 3.0))  # seed 0: a tie
  tracker.update(30, at(30), loss(1.0, 4.0))
  kept, steps, metrics = best.restore(tmp_path, state)
  assert (steps.tolist(), metrics.tolist()) == ([30, 20], [1.0, 3.0])
  assert np.asarray(kept.step).tolist() == [30, 20] and best.kept_step(tmp_path) == 30
  resumed = best.Tracker(exp, tmp_path, state, resume=True)
  resumed.update(40, at(40), loss(1.0, 3.0))  # ties: nothing saved
  assert best.kept_step(tmp_path) == 30
  resumed.update(40, at(40), loss(5.0, 2.0))
  kept, steps, metrics = best.restore(tmp_path, state)
  assert (steps.tolist(), metrics.tolist()) == ([30, 40], [1.0, 2.0])
  assert np.asarray(kept.step).tolist() == [30, 40] and best.kept_step(tmp_path) == 40
  with pytest.raises(ValueError, match="seed1/val_loss"):
    resumed.update(50, state, {"seed0/val_loss": 1.0})
