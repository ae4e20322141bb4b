"""Training runs end to end on sinusoid: resume equals an uninterrupted run, the CLI
works, bad configurations are named, plots are written."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import slow_except

from amaml import cli, rates, train
from amaml.configs import get_config


def test_resume_equals_uninterrupted_run(tmp_path, tiny_config):
  cfg = tiny_config()
  full, _ = train.train(cfg, tmp_path / "full", progress=False, evaluate_at_end=False)
  half = dataclasses.replace(cfg, iterations=20)
  train.train(half, tmp_path / "split", progress=False, evaluate_at_end=False)
  resumed, _ = train.train(
    cfg, tmp_path / "split", resume=True, progress=False, evaluate_at_end=False
  )
  chex.assert_trees_all_equal(full, resumed)  # bitwise on CPU
  m_full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
  m_split = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
  strip = lambda lines: [
    {k: v for k, v in json.loads(l).items() if k != "steps_per_s"} for l in lines
  ]
  assert strip(m_full) == strip(m_split) and len(m_full) == 4


def test_alpha_search_trains_as_a_run_started_at_the_searched_alpha_from_any_alpha0(
  tmp_path, tiny_config, capsys
):
  cfg = tiny_config(alpha=1.0, alpha_search=True)
  exp = train.build(cfg)
  key = jax.random.fold_in(train.run_keys(cfg).train, 0)
  state = rates.search_alpha(
    exp.learner.meta_loss,
    exp.learner.init(exp.params),
    exp.sample(key, exp.data["train"], cfg.meta_batch),
  )
  alpha0 = float(jax.tree.leaves(state.alpha)[0])
  assert alpha0 < 1.0  # a sinusoid MLP at initialisation: alpha = 1 overshoots
  run = lambda c, d, **kw: train.train(c, tmp_path / d, progress=False, evaluate_at_end=False, **kw)
  searched, _ = train.train(cfg, tmp_path / "searched", evaluate_at_end=False)  # progress shown
  assert f"alpha searched on the first meta-batch: {alpha0:.4g} (" in capsys.readouterr().err
  by_hand, _ = run(dataclasses.replace(cfg, alpha=alpha0, alpha_search=False), "by_hand")
  chex.assert_trees_all_equal(searched, by_hand)
  other, _ = run(dataclasses.replace(cfg, alpha=0.03), "other_alpha0")  # the grid is fixed:
  chex.assert_trees_all_equal(searched, other)  # another alpha0, the same run
  run(dataclasses.replace(cfg, iterations=20), "split")  # a resumed run does not search again
  chex.assert_trees_all_equal(searched, run(cfg, "split", resume=True)[0])


@pytest.mark.parametrize("split", slow_except([10, 20], {10}))
def test_maml_plus_plus_compiles_one_loop_per_order_and_resumes_bitwise(
  split, tmp_path, tiny_config, monkeypatch
):
  """Derivative-order annealing: a loop for the first-order steps, another from
  first_order_steps on, no call across the switch; resumed before the switch (or after it,
  with -m slow), a run equals an uninterrupted one bitwise."""
  calls, make = [], train.make_train_chunk

  def recording(exp, length, mesh=None, update=None):  # each call: (its loop's update, steps)
    chunk = make(exp, length, mesh, update)

    def run(state, images, start, steps):
      calls.append((update, int(start), int(steps)))
      return chunk(state, images, start, steps)

    return run

  monkeypatch.setattr(train, "make_train_chunk", recording)
  cfg = tiny_config(method="maml++", inner_steps=2, first_order_steps=15, multi_step_loss=10)
  full, _ = train.train(cfg, tmp_path / "full", progress=False, evaluate_at_end=False)
  assert len({u for u, _, _ in calls}) == 2
  assert all(s + n <= 15 or s >= 15 for _, s, n in calls)
  assert sum(n for _, _, n in calls) == cfg.iterations
  half = dataclasses.replace(cfg, iterations=split)
  train.train(half, tmp_path / "split", progress=False, evaluate_at_end=False)
  resumed, _ = train.train(
    cfg, tmp_path / "split", resume=True, progress=False, evaluate_at_end=False
  )
  chex.assert_trees_all_equal(full, resumed)  # bitwise on CPU
  lines = lambda d: [
    {k: v for k, v in json.loads(l).items() if k != "steps_per_s"}
    for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
  ]
  assert lines("full") == lines("split")


def test_same_seed_same_metrics_and_loss_falls(tmp_path, tiny_config):
  cfg = tiny_config(iterations=200, log_every=50, checkpoint_every=0)
  _, r1 = train.train(cfg, tmp_path / "a", progress=False)
  _, r2 = train.train(cfg, tmp_path / "b", progress=False)
  assert r1["test"] == r2["test"]
  recs = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
  assert recs[-1]["loss"] < recs[0]["loss"]
  assert r1["test"]["loss"] < r1["test"]["pre_loss"]


def test_refuses_to_overwrite_or_resume_another_config(tmp_path, tiny_config):
  cfg = tiny_config(iterations=20)
  train.train(cfg, tmp_path / "r", progress=False, evaluate_at_end=False)
  with pytest.raises(FileExistsError, match="--resume"):
    train.train(cfg, tmp_path / "r", progress=False, evaluate_at_end=False)
  with pytest.raises(ValueError, match="differs"):
    train.train(dataclasses.replace(cfg, hidden=8), tmp_path / "r", resume=True, progress=False)


def test_divergence_stops_with_a_clear_message(tmp_path, tiny_config):
  # beta so large that the first update leaves weights whose un-adapted loss overflows:
  # backtracking cannot help (it only shrinks alpha), so the guard holds and the run stops
  cfg = tiny_config(beta=1e30, outer_optimizer="adam", max_nonfinite=5, iterations=20)
  with pytest.raises(FloatingPointError, match="non-finite meta steps in a row"):
    train.train(cfg, tmp_path / "d", progress=False)


@pytest.mark.parametrize(
  "overrides, match",
  [
    ({"method": "leo"}, "method"),
    ({"meta_batch": 0}, "meta_batch"),
    ({"checkpoint_every": 15}, "multiple of log_every"),
    ({"rate_rule": "cosine"}, "rate_rule"),
    ({"colour": 1}, "unknown config field"),
    ({"method": "protonet", "alpha_search": True}, "alpha_search"),
  ],
)
def test_bad_config_fields_are_named(overrides, match):
  with pytest.raises(ValueError, match=match):
    get_config("sinusoid", **overrides)


def test_cli_train_evaluate_plot(tmp_path, capsys):
  run = str(tmp_path / "cli")
  args = [
    "train",
    "--config",
    "sinusoid",
    "--out",
    run,
    "--hidden",
    "8",
    "--meta_batch",
    "2",
    "--iterations",
    "20",
    "--log_every",
    "10",
    "--checkpoint_every",
    "10",
    "--val_every",
    "0",
    "--eval_tasks",
    "10",
    "--eval_batch",
    "10",
    "--no_progress",
  ]
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert "query loss before adaptation" in out and "final alpha" in out
  assert cli.main(["evaluate", "--run", run, "--eval_tasks", "10", "--eval_inner_steps", "3"]) == 0
  assert '"inner_steps": 3' in capsys.readouterr().out
  # several runs: one comparison table
  other = str(tmp_path / "cli-maml")
  assert cli.main(args[:4] + [other, "--method", "maml"] + args[5:]) == 0
  capsys.readouterr()
  assert (
    cli.main(["evaluate", "--run", run, other, "--eval_tasks", "10", "--eval_inner_steps", "2"])
    == 0
  )
  table = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ")]
  assert table[0].startswith("| run | method") and len(table) == 4
  assert f"| {run} | alpha-maml |" in table[2] and f"| {other} | maml |" in table[3]
  # without --eval_inner_steps: the run's own protocol, chosen on validation tasks, as in train
  assert cli.main(["evaluate", "--run", run, "--eval_tasks", "10"]) == 0
  out = capsys.readouterr().out
  assert "chosen on 100 val tasks" in out and '"alpha_scale"' in out
  # an outer optimizer amaml does not offer: argparse names the flag and the choices
  with pytest.raises(SystemExit) as e:
    cli.main(["train", "--config", "sinusoid", "--outer_optimizer", "lion"])
  assert e.value.code == 2
  assert "--outer_optimizer: invalid choice: 'lion' (choose from 'adam'" in capsys.readouterr().err
  pytest.importorskip("matplotlib")
  assert cli.main(["plot", "--run", run]) == 0
  for name in ("learning_curves.png", "rates.png"):
    assert (tmp_path / "cli" / name).stat().st_size > 1000
  capsys.readouterr()
  assert cli.main(["plot", "--run", run, other, "--plot_dir", str(tmp_path / "both")]) == 0
  table = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ")]
  assert table[0].startswith("| run | method | alpha0 | steps") and len(table) == 4
  assert table[3].startswith(f"| {other} | maml | 0.1 | 20 |") and "| loss " in table[3]
  with pytest.raises(SystemExit):
    cli.main(["train", "--alpha", "fast"])  # wrong type: argparse names the flag
  assert "--alpha" in capsys.readouterr().err


def test_time_budget_stops_after_a_chunk_and_evaluates(tmp_path, tiny_config):
  # a budget shorter than one step: the run stops after its first chunk (one step), between
  # log lines, and still logs, checkpoints and evaluates it
  cfg = tiny_config(iterations=1000, max_minutes=1e-6)
  state, results = train.train(cfg, tmp_path / "t", progress=False)
  assert int(state.step) == 1 and results["steps"] == 1
  assert "loss" in results["test"]
  from amaml.checkpoint import Checkpointer

  assert Checkpointer(tmp_path / "t" / "checkpoints").latest_step() == 1
  recs = [json.loads(l) for l in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in recs] == [1]


def test_chunks_grow_to_the_time_target_and_change_no_result(tmp_path, monkeypatch, tiny_config):
  # the same run with chunks of one step (a tiny time target) and of log_every steps
  cfg = tiny_config(iterations=30, log_every=10, checkpoint_every=0)
  big, _ = train.train(cfg, tmp_path / "big", progress=False, evaluate_at_end=False)
  monkeypatch.setattr(train, "CHUNK_SECONDS", 0.0)
  small, _ = train.train(cfg, tmp_path / "small", progress=False, evaluate_at_end=False)
  chex.assert_trees_all_equal(big, small)
  strip = lambda p: [
    {k: v for k, v in json.loads(l).items() if k != "steps_per_s"}
    for l in (p / "metrics.jsonl").read_text().splitlines()
  ]
  assert strip(tmp_path / "big") == strip(tmp_path / "small")
  assert [r["step"] for r in strip(tmp_path / "big")] == [10, 20, 30]


def test_remat_flag_reaches_the_learner_and_changes_nothing_but_memory():
  cfg = get_config("sinusoid", inner_steps=3, meta_batch=4)
  assert (
    cli._parser().parse_args(["train", "--config", "sinusoid", "--remat", "true"]).remat is True
  )
  plain, remat = train.build(cfg), train.build(dataclasses.replace(cfg, remat=True))
  batch = plain.sample(jax.random.key(3), None, 4)
  s1, m1 = plain.learner.step(plain.learner.init(plain.params), batch)
  s2, m2 = remat.learner.step(remat.learner.init(remat.params), batch)
  np.testing.assert_allclose(m1["alpha_hypergradient"], m2["alpha_hypergradient"], rtol=1e-5)
  chex.assert_trees_all_close(s1.params, s2.params, rtol=1e-5, atol=1e-7)
  # rematerialised: the backward pass recomputes the inner steps behind a barrier
  lowered = lambda e: jax.jit(e.learner.update).lower(e.learner.init(e.params), batch).as_text()
  assert "optimization_barrier" in lowered(remat) and "optimization_barrier" not in lowered(plain)


def _read_events(folder):
  """Scalars of TensorBoard event files, read with the protobuf that tensorboardX writes:
  each record is a little-endian uint64 length, a 4-byte CRC, the Event bytes, a 4-byte CRC."""
  import struct
  from tensorboardX.proto import event_pb2

  out = {}
  for path in sorted(folder.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos : pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out


def test_tensorboard_events_hold_the_logged_scalars(tmp_path, tiny_config):
  pytest.importorskip("tensorboardX")
  cfg = tiny_config(iterations=30, log_every=10, checkpoint_every=0, tensorboard=True)
  train.train(cfg, tmp_path / "tb", progress=False, evaluate_at_end=False)
  events = _read_events(tmp_path / "tb" / "tensorboard")
  recs = [json.loads(l) for l in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
  assert sorted(events["loss"]) == [10, 20, 30]
  for rec in recs:
    for name in ("loss", "alpha", "beta", "steps_per_s"):
      assert events[name][rec["step"]] == pytest.approx(rec[name], rel=1e-6)
  assert "step" not in events


def test_every_config_task_has_a_setup_in_the_registry(tiny_config):
  from amaml import configs

  assert set(train.TASKS) == set(configs.TASKS)
  setup = train.TASKS["sinusoid"](tiny_config(), jax.random.key(0))
  batch = setup.sample(jax.random.key(1), setup.data["train"], 3)
  loss, _ = setup.loss_fn(setup.params, batch.support_x[0], batch.support_y[0])
  assert batch.support_x.shape[0] == 3 and bool(jnp.isfinite(loss))
  setup.check(batch, None)
  with pytest.raises(ValueError):
    setup.check(batch._replace(query_y=batch.query_y * jnp.nan), None)


@pytest.mark.parametrize("tasks_at_once, grouped", [(0, False), (2, True), (None, False)])
def test_tasks_at_once_reaches_the_learner(tiny_config, tasks_at_once, grouped):
  """``--tasks_at_once`` reaches the meta loss: only a grouped one (here 2 of 4 sinusoid
  tasks; ``None`` keeps sinusoid's small tasks all at once) refuses to differentiate its
  aux, and both give the same loss."""
  exp = train.build(tiny_config(tasks_at_once=tasks_at_once))
  batch = exp.sample(jax.random.key(0), exp.data["train"], 4)
  state = exp.learner.init(exp.params)
  aux_of = lambda p: exp.learner.meta_loss(p, state.alpha, batch)[1]["support_loss"]
  if grouped:
    with pytest.raises(ValueError, match="not differentiable"):
      jax.grad(aux_of)(state.params)
  else:
    jax.grad(aux_of)(state.params)
  loss = exp.learner.meta_loss(state.params, state.alpha, batch)[0]
  all_at_once = train.build(tiny_config(tasks_at_once=0)).learner.meta_loss
  np.testing.assert_allclose(loss, all_at_once(state.params, state.alpha, batch)[0], rtol=1e-6)
