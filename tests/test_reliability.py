"""A training run survives faults and bad input.

* Faults: ``amaml train`` killed with SIGKILL (at random moments, and in the middle of a
  checkpoint write) and resumed with ``--resume`` ends bitwise equal to an uninterrupted
  run; checkpoints stay readable after every kill.
* Signals: SIGTERM / SIGINT checkpoint, print the resume command and exit 143 / 130; the
  resumed run equals an uninterrupted one bitwise. Damaged checkpoints: the newest intact
  one is used, with a warning naming the damaged one; none intact, one line and exit 2.
* Divergence: rates 100x too large either adapt back or stop with a clear
  ``FloatingPointError``; no checkpoint ever holds a non-finite value.
* Bad input: every case fails with an error naming the problem and the fix.
* Determinism across seeds, and checkpoints that never unpickle.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import write_fake_omniglot

import amaml
from amaml import cli, train, validate
from amaml.checkpoint import Checkpointer, CorruptCheckpointError
from amaml.configs import Config, get_config
from amaml.data import ClassImages, load_omniglot, read_omniglot_arrays, sample_episodes
from amaml.data import sample_tasks
from amaml.task import TaskBatch, check_task_batch

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
  hidden=8,
  meta_batch=2,
  log_every=10,
  checkpoint_every=10,
  val_every=0,
  eval_tasks=10,
  eval_batch=10,
)


# --- faults ------------------------------------------------------------------------------------


def _cmd(out: Path, iterations: int, resume: bool = False) -> list[str]:
  cmd = [
    sys.executable,
    "-m",
    "amaml",
    "train",
    "--config",
    "sinusoid",
    "--no_progress",
    "--iterations",
    str(iterations),
    "--out",
    str(out),
  ]
  for k, v in TINY.items():
    cmd += [f"--{k}", str(v)]
  return cmd + (["--resume"] if resume else [])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Subprocess environment. The runs share a persistent compilation cache (each process
  would otherwise spend ~4 s compiling the same programs); a cached executable is the
  same program, so bitwise comparisons still hold."""
  return {
    **os.environ,
    "PYTHONPATH": str(REPO),
    "JAX_PLATFORMS": "cpu",
    "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  }


def _start(env: dict, out: Path, iterations: int, resume: bool = False) -> subprocess.Popen:
  out.mkdir(parents=True, exist_ok=True)
  err = open(out.parent / f"{out.name}.stderr", "ab")
  return subprocess.Popen(
    _cmd(out, iterations, resume), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err
  )


def _lines(out: Path) -> int:
  try:
    return len((out / "metrics.jsonl").read_text().splitlines())
  except FileNotFoundError:
    return 0


def _writing_checkpoint(out: Path, min_step: int) -> bool:
  """Orbax is writing a checkpoint of step >= ``min_step`` (under its temporary name; a
  leftover of an earlier kill has a smaller step)."""
  try:
    names = os.listdir(out / "checkpoints")
  except FileNotFoundError:
    return False
  return any(
    "tmp" in n and n.split(".")[0].isdigit() and int(n.split(".")[0]) >= min_step for n in names
  )


def _kill_when(
  proc: subprocess.Popen, ready, delay: float = 0.0, timeout: float = 120, kill: bool = True
) -> bool:
  """SIGKILLs ``proc`` ``delay`` seconds after ``ready()`` holds; False if it ended first.
  With ``kill=False`` only waits for ``ready()``."""
  t_end = time.monotonic() + timeout
  while proc.poll() is None and not ready():
    if time.monotonic() > t_end:
      proc.kill()
      raise TimeoutError("the training subprocess made no progress")
    time.sleep(0.002)
  if delay:
    time.sleep(delay)
  if not kill or proc.poll() is not None:
    return False
  proc.send_signal(signal.SIGKILL)
  return proc.wait() == -signal.SIGKILL


@functools.lru_cache(maxsize=None)
def _target(cfg: Config = get_config("sinusoid", **TINY)):
  """A state of ``cfg``'s structure, shapes and dtypes (a restore target; never donated)."""
  exp = train.build(cfg)
  return exp.learner.init(exp.params)


def _assert_readable(out: Path) -> None:
  """After a kill: the latest checkpoint restores, is finite, and metrics.jsonl parses."""
  for line in (
    (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
  ):
    json.loads(line)
  if not (out / "checkpoints").exists():
    return
  ckpt = Checkpointer(out / "checkpoints")
  step = ckpt.latest_step()
  if step is not None:
    state = ckpt.restore(_target())
    assert int(state.step) == step
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
  ckpt.close()


def _final(out: Path, iterations: int):
  ckpt = Checkpointer(out / "checkpoints")
  assert ckpt.latest_step() == iterations
  leaves = [np.asarray(x) for x in jax.tree.leaves(ckpt.restore(_target()))]
  ckpt.close()
  metrics = [
    {k: v for k, v in json.loads(l).items() if k != "steps_per_s"}
    for l in (out / "metrics.jsonl").read_text().splitlines()
  ]
  test = json.loads((out / "results.json").read_text())["test"]
  return leaves, metrics, test


def _assert_same_run(a: Path, b: Path, iterations: int) -> None:
  leaves_a, metrics_a, test_a = _final(a, iterations)
  leaves_b, metrics_b, test_b = _final(b, iterations)
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(x, y)  # bitwise on CPU
  assert metrics_a == metrics_b and len(metrics_a) == iterations // TINY["log_every"]
  assert test_a == test_b
  _assert_no_pickle(a)
  _assert_no_pickle(b)


def _assert_no_pickle(run: Path) -> None:
  names = [p.name for p in run.rglob("*") if p.is_file()]
  assert not [n for n in names if n.endswith((".pkl", ".pickle", ".pck"))], names


def _finish(env: dict, out: Path, iterations: int) -> None:
  proc = _start(env, out, iterations, resume=True)
  assert proc.wait(timeout=300) == 0, (out.parent / f"{out.name}.stderr").read_text()[-3000:]


def _reference(env: dict, out: Path, iterations: int) -> subprocess.Popen:
  """Starts the uninterrupted run; returns once it has compiled (its first metrics line),
  so the runs started next find the training step in the compilation cache."""
  ref = _start(env, out, iterations)
  _target()  # meanwhile, build the restore target here
  _kill_when(ref, lambda: _lines(out) >= 1, timeout=120, kill=False)
  return ref


def test_sigkill_once_then_resume_equals_uninterrupted_run(tmp_path, env):
  """One kill at a random moment of training; the reference runs alongside."""
  rng = random.Random(0)
  iterations = 60
  ref = _reference(env, tmp_path / "ref", iterations)
  victim = _start(env, tmp_path / "victim", iterations)
  k = rng.randint(1, 3)
  assert _kill_when(victim, lambda: _lines(tmp_path / "victim") >= k, rng.uniform(0, 0.05))
  assert ref.wait(timeout=300) == 0
  _assert_readable(tmp_path / "victim")
  _finish(env, tmp_path / "victim", iterations)
  _assert_same_run(tmp_path / "ref", tmp_path / "victim", iterations)


@pytest.mark.slow
def test_sigkill_repeatedly_then_resume_equals_uninterrupted_run(tmp_path, env):
  """Four kills (three at random moments, one while a checkpoint is being written), each
  followed by ``--resume``; the result equals one uninterrupted run bitwise."""
  rng = random.Random(1)
  iterations = 400
  run = tmp_path / "victim"
  ref = _reference(env, tmp_path / "ref", iterations)
  proc = _start(env, run, iterations)
  kills = 0
  for i in range(4):
    if i:
      proc = _start(env, run, iterations, resume=True)
    k = _lines(run) + rng.randint(1, 6)
    if i == 2:  # mid-write: the checkpoint directory still has its temporary name
      ready = lambda: _lines(run) >= k and _writing_checkpoint(run, k * TINY["log_every"])
      delay = 0.0
    else:
      ready, delay = (lambda: _lines(run) >= k), rng.uniform(0, 0.2)
    killed = _kill_when(proc, ready, delay)
    kills += killed
    if i == 2:
      assert killed, "the run ended before a checkpoint write could be interrupted"
      assert _writing_checkpoint(run, k * TINY["log_every"])  # the half-written one is left...
      ckpt = Checkpointer(run / "checkpoints")
      latest = ckpt.latest_step()
      ckpt.close()
      assert latest is None or latest < k * TINY["log_every"]  # ...and never taken as a step
    _assert_readable(run)
  assert kills >= 3
  assert ref.wait(timeout=300) == 0
  _finish(env, run, iterations)
  _assert_same_run(tmp_path / "ref", run, iterations)


# --- signals -----------------------------------------------------------------------------------

_STOPPED = (
  r"^amaml train: stopped by {sig} at step (\d+); checkpoint in (\S+)/checkpoints/\1; "
  r"resume with: (amaml train .* --resume)$"
)


def _signal_when_logging(proc: subprocess.Popen, out: Path, sig: int, lines: int = 2) -> str:
  """Sends ``sig`` once ``out`` has ``lines`` log lines; returns the last line of stderr."""
  _kill_when(proc, lambda: _lines(out) >= lines, kill=False)
  assert proc.poll() is None, "the run ended before the signal"
  proc.send_signal(sig)
  assert proc.wait(timeout=120) == 128 + sig
  err = (out.parent / f"{out.name}.stderr").read_text()
  assert "Traceback" not in err, err
  return err.strip().splitlines()[-1]


def test_sigterm_checkpoints_prints_the_resume_command_and_resumes_bitwise(tmp_path, env):
  iterations = 100
  ref = _reference(env, tmp_path / "ref", iterations)
  victim = _start(env, tmp_path / "victim", iterations)
  line = _signal_when_logging(victim, tmp_path / "victim", signal.SIGTERM)
  m = re.match(_STOPPED.format(sig="SIGTERM"), line)
  assert m, line
  step = int(m.group(1))
  assert 0 < step < iterations and m.group(2) == str(tmp_path / "victim")
  ckpt = Checkpointer(tmp_path / "victim" / "checkpoints")
  assert ckpt.latest_step() == step
  ckpt.close()
  resume = shlex.split(m.group(3))
  assert (
    resume[0] == "amaml" and resume[1:] == _cmd(tmp_path / "victim", iterations, resume=True)[3:]
  )
  assert ref.wait(timeout=300) == 0
  _finish(env, tmp_path / "victim", iterations)  # the command of the line
  _assert_same_run(tmp_path / "ref", tmp_path / "victim", iterations)


def test_sigint_checkpoints_and_exits_130(tmp_path, env):
  run = tmp_path / "r"
  line = _signal_when_logging(_start(env, run, 300), run, signal.SIGINT, lines=1)
  m = re.match(_STOPPED.format(sig="SIGINT"), line)
  assert m, line
  _assert_readable(run)
  ckpt = Checkpointer(run / "checkpoints")
  assert ckpt.latest_step() == int(m.group(1))
  ckpt.close()


# --- corrupt checkpoints ------------------------------------------------------------------------


def _corrupt(step_dir: Path, how: str) -> None:
  """Damages one file of an Orbax checkpoint: its data file cut in half or overwritten with
  random bytes, or its OCDBT manifest deleted."""
  item = step_dir / "default"
  if how == "missing":
    (item / "manifest.ocdbt").unlink()
    return
  data = max((item / "d").iterdir(), key=lambda p: p.stat().st_size)
  n = data.stat().st_size
  data.write_bytes(data.read_bytes()[: n // 2] if how == "truncated" else os.urandom(n))


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
  """A tiny sinusoid run of 20 steps with its checkpoints of steps 10 and 20, and the state
  of the same run trained on to 30 steps (a resume from step 10 must end there)."""
  root = tmp_path_factory.mktemp("two_checkpoints")
  cfg = get_config("sinusoid", iterations=20, **TINY)
  train.train(cfg, root / "run", progress=False, evaluate_at_end=False)
  state30, _ = train.train(
    get_config("sinusoid", iterations=30, **TINY),
    root / "run30",
    progress=False,
    evaluate_at_end=False,
  )
  return root / "run", [np.asarray(x) for x in jax.tree.leaves(state30)]


def _damaged_copy(src: Path, dst: Path, how: str, steps=(20,)) -> Path:
  shutil.copytree(src, dst)
  for step in steps:
    _corrupt(dst / "checkpoints" / str(step), how)
  return dst


@pytest.mark.parametrize("how", ["truncated", "missing", "garbage"])
def test_evaluate_and_load_run_fall_back_to_the_newest_intact_checkpoint(
  tmp_path, two_checkpoints, how, capsys
):
  run = _damaged_copy(two_checkpoints[0], tmp_path / "run", how)
  code = cli.main(["evaluate", "--run", str(run), "--eval_tasks", "10"])
  out, err = capsys.readouterr()
  assert code == 0 and f"{run}: alpha-maml on sinusoid: 10 meta steps" in out, err
  warning = [l for l in err.splitlines() if l.startswith("amaml: warning:")]
  assert len(warning) == 1 and re.match(
    rf"amaml: warning: checkpoint {re.escape(str(run))}/checkpoints/20 cannot be read \(.+\); "
    r"trying the previous one, step 10$",
    warning[0],
  ), err
  _, state = train.load_run(run)
  assert int(state.step) == 10 and "checkpoints/20 cannot be read" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["truncated", "missing", "garbage"])
def test_resume_continues_from_the_newest_intact_checkpoint(tmp_path, two_checkpoints, how, capsys):
  run = _damaged_copy(two_checkpoints[0], tmp_path / "run", how)
  state, _ = train.train(
    get_config("sinusoid", iterations=30, **TINY),
    run,
    resume=True,
    progress=False,
    evaluate_at_end=False,
  )
  assert "checkpoints/20 cannot be read" in capsys.readouterr().err
  for x, y in zip(jax.tree.leaves(state), two_checkpoints[1], strict=True):
    np.testing.assert_array_equal(np.asarray(x), y)  # from step 10 on, as if never damaged
  steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert steps == [10, 20, 30]
  _assert_readable(run)  # step 20 written again, and 30


def test_no_intact_checkpoint_is_one_line_and_exit_2(tmp_path, two_checkpoints, env):
  run = _damaged_copy(two_checkpoints[0], tmp_path / "run", "truncated", steps=(10, 20))
  for args in (["evaluate", "--run", str(run)], _cmd(run, 30, resume=True)[3:]):
    proc = subprocess.run(
      [sys.executable, "-m", "amaml", *args],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(err) == 3 and all(l.startswith("amaml: warning: checkpoint") for l in err[:2]), err
    assert re.match(
      rf"amaml {args[0]}: no intact checkpoint in {re.escape(str(run))}/checkpoints "
      r"\(steps 10, 20 cannot be read\): start a new --out directory$",
      err[2],
    ), err
  with pytest.raises(CorruptCheckpointError, match="no intact checkpoint"):
    train.load_run(run)


# --- divergence ---------------------------------------------------------------------------------


def _checkpoints_finite(run: Path, cfg: Config) -> list[int]:
  steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  ckpt = Checkpointer(run / "checkpoints")
  for step in steps:
    state = ckpt.restore(_target(cfg), step)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state)), step
  ckpt.close()
  return steps


@pytest.mark.parametrize(
  "overrides, outcome",
  [
    ({"alpha": 1.0}, "adapts"),  # alpha_0 100x the default: the hypergradient brings it back
    # beta_0 of Adam (adapted by hypergradient; the default's D-Adaptation has no beta_0)
    ({"beta": 0.1, "outer_optimizer": "adam"}, "finite"),  # 100x: training stays finite
    (
      {"beta": 1e30, "beta_max": 1e31, "max_nonfinite": 3, "outer_optimizer": "adam"},
      "stops",
    ),  # hopeless: stops
  ],
)
def test_rates_far_too_large_adapt_back_or_stop_cleanly(tmp_path, overrides, outcome):
  cfg = get_config(
    "sinusoid", **{**TINY, "meta_batch": 4, "hidden": 16, "iterations": 40, **overrides}
  )
  try:
    state, _ = train.train(cfg, tmp_path / "r", progress=False, evaluate_at_end=False)
    stopped = None
  except FloatingPointError as e:
    stopped = str(e)
  if outcome == "stops":
    assert stopped is not None and "non-finite meta steps in a row" in stopped
    assert stopped.endswith("Lower --beta") and "last good checkpoint" in stopped  # alpha:
    # the alpha0 search sets it, so the hint does not name --alpha
  else:
    assert stopped is None, stopped
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))
    recs = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(recs[-1]["loss"])
    if outcome == "adapts":
      assert recs[-1]["alpha"] < 0.1 * cfg.alpha
  steps = _checkpoints_finite(tmp_path / "r", cfg)  # never a NaN written
  assert steps or outcome == "stops"


def test_cli_run_stopped_by_the_non_finite_guard_is_one_line_and_exit_3(tmp_path, capsys):
  args = ["train", "--no_progress", "--out", str(tmp_path / "r"), "--iterations", "40"]
  for k, v in {
    **TINY,
    "meta_batch": 4,
    "hidden": 16,
    "beta": 1e30,
    "beta_max": 1e31,
    "max_nonfinite": 3,
    "outer_optimizer": "adam",
  }.items():
    args += [f"--{k}", str(v)]
  assert cli.main(args) == 3
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err, err
  assert re.match(
    r"^amaml train: 3 non-finite meta steps in a row by step \d+: the state was kept "
    r"finite and the last good checkpoint is in .*/checkpoints\. Lower --beta$",
    err,
  ), err


def test_checkpointer_refuses_non_finite_state(tmp_path):
  state = _target()
  ckpt = Checkpointer(tmp_path / "c")
  bad = state._replace(
    params=jax.tree.map(lambda x: x.at[0].set(jnp.nan) if x.ndim else x, state.params)
  )
  with pytest.raises(FloatingPointError, match="refusing to checkpoint non-finite state at step 7"):
    ckpt.save(7, bad)
  inf_alpha = state._replace(alpha=jnp.float32(jnp.inf))
  with pytest.raises(FloatingPointError, match="non-finite"):
    ckpt.save(8, inf_alpha)
  assert ckpt.latest_step() is None and not any(
    p.name.isdigit() for p in (tmp_path / "c").iterdir()
  )
  ckpt.save(9, state)
  assert ckpt.latest_step() == 9
  ckpt.close()


def test_non_finite_inputs_are_flagged_and_skipped_by_the_guard():
  model = amaml.models.MLP(hidden=(8, 8))
  params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
  learner = amaml.alpha_maml(amaml.losses.mse(lambda p, x: model.apply({"params": p}, x)))
  state = learner.init(params)
  batch = amaml.sinusoid_tasks(jax.random.key(0), 4)
  bad = batch._replace(support_x=batch.support_x.at[1, 2, 0].set(jnp.nan))
  new, metrics = learner.step(state, bad)
  assert bool(metrics["nonfinite"]) and int(metrics["nonfinite_streak"]) == 1
  chex.assert_trees_all_equal(state.params, new.params)  # the step was skipped
  with pytest.raises(ValueError, match=r"support_x has 1 non-finite value.*clean the data"):
    validate.check_finite_batch(bad)
  good, metrics = learner.step(new, batch)
  assert not bool(metrics["nonfinite"]) and int(good.nonfinite_streak) == 0


# --- bad input -----------------------------------------------------------------------------------


def _cli(*args: str) -> None:
  """Runs the CLI; raises ``ValueError`` with its stderr if it refuses the arguments."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    try:
      code = cli.main(list(args))
    except SystemExit as e:
      code = e.code
  if code:
    raise ValueError(err.getvalue())


def _images(classes=4, examples=3, dtype=np.uint8):
  return np.zeros((classes, examples, 2, 2, 1), dtype)


def _cls_batch(
  tasks=2,
  ways=3,
  shape=(4, 4, 1),
  x_dtype=np.float32,
  y_dtype=np.int32,
  y_shift=0,
  query_shape=None,
):
  sx = np.zeros((tasks, ways, *shape), x_dtype)
  qx = np.zeros((tasks, ways, *(query_shape or shape)), x_dtype)
  y = (np.tile(np.arange(ways), (tasks, 1)) + y_shift).astype(y_dtype)
  return TaskBatch(sx, y, qx, y)


def _omniglot_dir(tmp: Path, corrupt: str) -> Path:
  d = write_fake_omniglot(tmp / "omniglot", 2, 2, drawers=2)
  bg = d / "images_background.npz"
  if corrupt == "empty":
    bg.write_bytes(b"")
    (d / "SHA256SUMS").unlink()
  elif corrupt == "garbage":
    bg.write_bytes(b"not a zip file at all")
  elif corrupt == "garbage_nosums":
    bg.write_bytes(b"PK\x03\x04 truncated")
    (d / "SHA256SUMS").unlink()
  elif corrupt == "missing":
    bg.unlink()
  elif corrupt == "no_images":
    np.savez(bg, labels=np.zeros(3))
    (d / "SHA256SUMS").unlink()
  return d


def _saved_checkpoint(tmp: Path, hidden: int) -> Checkpointer:
  ckpt = Checkpointer(tmp / f"ckpt{hidden}")
  ckpt.save(1, _target(get_config("sinusoid", hidden=hidden, meta_batch=2)))
  return ckpt


def _restore_mismatch(tmp: Path):
  ckpt = _saved_checkpoint(tmp, hidden=8)
  try:
    ckpt.restore(_target(get_config("sinusoid", hidden=16, meta_batch=2)))
  finally:
    ckpt.close()


def test_a_checkpoint_of_another_shape_is_refused_before_any_read(tmp_path, monkeypatch):
  """The mismatch is found in the checkpoint's metadata, so Orbax starts no read (its own
  check fails with reads in flight, which finish after the error): the message names the
  first array that differs; a matching target restores."""
  ckpt = _saved_checkpoint(tmp_path, hidden=8)
  real_restore = ckpt._manager.restore
  monkeypatch.setattr(ckpt._manager, "restore", lambda *a, **k: pytest.fail("read started"))
  with pytest.raises(ValueError, match=r"Dense_0\.bias: shape \(8,\) saved, \(16,\) expected"):
    ckpt.restore(_target(get_config("sinusoid", hidden=16, meta_batch=2)))
  monkeypatch.setattr(ckpt._manager, "restore", real_restore)
  target = _target(get_config("sinusoid", hidden=8, meta_batch=2))
  restored = ckpt.restore(target)
  assert jax.tree.structure(restored) == jax.tree.structure(target)
  ckpt.close()


def _restore_nothing(tmp: Path):
  ckpt = Checkpointer(tmp / "empty")
  try:
    ckpt.restore(_target())
  finally:
    ckpt.close()


def _resume_other_hidden(tmp: Path):
  run = tmp / "run"
  run.mkdir()
  (run / "config.json").write_text(get_config("sinusoid", hidden=8).to_json())
  train.train(get_config("sinusoid", hidden=16), run, resume=True, progress=False)


BAD_INPUT = {
  # images and episodes (amaml.data)
  "image rank": (
    lambda t: ClassImages(np.zeros((2, 3, 4, 4), np.uint8)),
    ValueError,
    r"5-D \[classes, examples, H, W, C\].*add a channel axis",
  ),
  "image dtype": (
    lambda t: ClassImages.from_arrays(np.zeros((2, 5, 3, 3), np.float32)),
    TypeError,
    r"must be uint8.*convert floats",
  ),
  "one example per class": (
    lambda t: ClassImages(_images(examples=1)),
    ValueError,
    r"at least 2 examples per class.*gather more",
  ),
  "class names": (
    lambda t: ClassImages(_images(), class_names=("a",)),
    ValueError,
    r"1 class names for 4 classes.*one name per class",
  ),
  "ways > classes": (
    lambda t: sample_episodes(0, _images(), ways=5, shots=1, queries=1, num_tasks=1),
    ValueError,
    r"ways=5 exceeds the 4 classes.*lower ways",
  ),
  "shots+queries > examples": (
    lambda t: sample_episodes(0, _images(), ways=2, shots=2, queries=2, num_tasks=1),
    ValueError,
    r"exceeds the 3 examples per class.*lower them",
  ),
  "device sampler dtype": (
    lambda t: sample_tasks(jax.random.key(0), jnp.zeros((4, 3, 2, 2, 1), jnp.float32), 2, 1, 1, 2),
    TypeError,
    r"images must be uint8",
  ),
  # data files
  "empty data file": (
    lambda t: read_omniglot_arrays(_omniglot_dir(t, "empty")),
    ValueError,
    r"corrupt or not an \.npz file.*copy it again",
  ),
  "corrupt data file (checksum)": (
    lambda t: read_omniglot_arrays(_omniglot_dir(t, "garbage")),
    ValueError,
    r"is corrupt: its SHA-256.*copy the file again",
  ),
  "corrupt data file (no checksum)": (
    lambda t: read_omniglot_arrays(_omniglot_dir(t, "garbage_nosums")),
    ValueError,
    r"corrupt or not an \.npz file.*copy it again",
  ),
  "missing data file": (
    lambda t: read_omniglot_arrays(_omniglot_dir(t, "missing")),
    FileNotFoundError,
    r"missing Omniglot file.*amaml download omniglot.*--data_dir",
  ),
  "data file without images": (
    lambda t: read_omniglot_arrays(_omniglot_dir(t, "no_images")),
    ValueError,
    r"has no 'images' array.*not an Omniglot",
  ),
  "data folder missing": (
    lambda t: load_omniglot("maml", data_dir=t / "nowhere", cache_dir=t / "cache"),
    FileNotFoundError,
    r"does not exist: run `amaml download omniglot`.*--data_dir",
  ),
  # task batches (amaml.task, amaml.validate)
  "tasks disagree": (
    lambda t: check_task_batch(TaskBatch(*[np.zeros((n, 5, 1)) for n in (2, 2, 3, 3)])),
    ValueError,
    r"disagree on the number of tasks",
  ),
  "unpaired examples": (
    lambda t: check_task_batch(
      TaskBatch(np.zeros((2, 5, 1)), np.zeros((2, 4, 1)), np.zeros((2, 5, 1)), np.zeros((2, 5, 1)))
    ),
    ValueError,
    r"support_x has 5 examples per task but support_y has 4.*paired",
  ),
  "labels out of range": (
    lambda t: validate.check_classification_batch(_cls_batch(y_shift=1), 3),
    ValueError,
    r"labels from 1 to 3.*needs labels in 0\.\.2; relabel",
  ),
  "negative labels": (
    lambda t: validate.check_classification_batch(_cls_batch(y_shift=-1), 3),
    ValueError,
    r"labels from -1 to 1.*relabel",
  ),
  "float labels": (
    lambda t: validate.check_classification_batch(_cls_batch(y_dtype=np.float32), 3),
    TypeError,
    r"integer class indices, got float32.*astype\(np\.int32\)",
  ),
  "one-hot labels": (
    lambda t: validate.check_classification_batch(
      _cls_batch()._replace(query_y=np.eye(3, dtype=np.float32)[None].repeat(2, 0)), 3
    ),
    ValueError,
    r"looks one-hot.*argmax",
  ),
  "uint8 inputs": (
    lambda t: validate.check_classification_batch(_cls_batch(x_dtype=np.uint8), 3),
    TypeError,
    r"uint8 \(raw pixels\).*/ 255",
  ),
  "wrong image shape": (
    lambda t: validate.check_classification_batch(
      _cls_batch(shape=(4, 4)), 3, example_shape=(4, 4, 1)
    ),
    ValueError,
    r"shape \(4, 4\) but the model expects \(4, 4, 1\).*channel axis",
  ),
  "support/query shapes": (
    lambda t: validate.check_classification_batch(_cls_batch(query_shape=(5, 5, 1)), 3),
    ValueError,
    r"differ in shape.*same images",
  ),
  "non-finite inputs": (
    lambda t: validate.check_regression_batch(
      amaml.sinusoid_tasks(jax.random.key(0), 2)._replace(
        query_y=np.full((2, 10, 1), np.inf, np.float32)
      )
    ),
    ValueError,
    r"query_y has 20 non-finite.*clean the data",
  ),
  "integer regression targets": (
    lambda t: validate.check_regression_batch(TaskBatch(*[np.zeros((2, 5, 1), np.int32)] * 4)),
    TypeError,
    r"floating point.*astype",
  ),
  # checkpoints and runs
  "restore into another config": (
    _restore_mismatch,
    ValueError,
    r"does not match this configuration.*configuration that wrote it",
  ),
  "restore with no checkpoint": (_restore_nothing, FileNotFoundError, r"no checkpoint in"),
  "--resume with other hidden": (
    _resume_other_hidden,
    ValueError,
    r"differs from .*'hidden': \(8, 16\).*or a new --out",
  ),
  "not a run directory": (
    lambda t: train.load_run(t),
    FileNotFoundError,
    r"no config\.json.*amaml train",
  ),
  # configuration and command line
  "CLI field of wrong type": (
    lambda t: _cli("train", "--hidden", "wide"),
    ValueError,
    r"--hidden.*invalid int value: 'wide'",
  ),
  "CLI unknown config": (
    lambda t: _cli("train", "--config", "omniglot-7w"),
    ValueError,
    r"--config.*invalid choice: 'omniglot-7w'",
  ),
  "CLI unknown flag": (
    lambda t: _cli("train", "--colour", "red"),
    ValueError,
    r"unrecognized arguments: --colour",
  ),
  "CLI bad value": (
    lambda t: _cli("train", "--meta_batch", "0", "--out", str(t / "x")),
    ValueError,
    r"meta_batch=0 must be >= 1",
  ),
  "CLI bad devices": (
    lambda t: _cli("train", "--devices", "-1", "--out", str(t / "x")),
    ValueError,
    r"devices=-1 must be >= 0",
  ),
  "CLI bad tasks_at_once": (
    lambda t: _cli("train", "--tasks_at_once", "-1", "--out", str(t / "x")),
    ValueError,
    r"tasks_at_once=-1 must be >= 0 \(0 = all tasks at once\)",
  ),
  "tasks_at_once for a method without it": (
    lambda t: get_config("sinusoid", method="reptile", tasks_at_once=1),
    ValueError,
    r"method='reptile' runs its tasks all at once: --tasks_at_once is for the MAML family",
  ),
  "unknown config name": (
    lambda t: get_config("omniglot-7w"),
    ValueError,
    r"unknown config 'omniglot-7w'; choose one of",
  ),
  "too many devices": (
    lambda t: train.train(
      get_config("sinusoid", devices=len(jax.devices()) + 1), t / "r", progress=False
    ),
    ValueError,
    r"device\(s\) are available; use --devices",
  ),
  # the meta step's own arguments
  "inner steps": (
    lambda t: amaml.alpha_maml(amaml.losses.mse(lambda p, x: x), inner_steps=0),
    ValueError,
    r"inner_steps must be >= 1",
  ),
  "alpha granularity": (
    lambda t: amaml.alpha_maml(amaml.losses.mse(lambda p, x: x), alpha_granularity="layer"),
    ValueError,
    r"alpha_granularity must be one of",
  ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_named_with_the_fix(tmp_path, case):
  fn, exc, match = BAD_INPUT[case]
  with pytest.raises(exc, match=match):
    fn(tmp_path)


def test_enough_bad_input_cases():
  assert len(BAD_INPUT) >= 20


def test_validate_accepts_good_batches_and_refuses_tracers():
  validate.check_classification_batch(_cls_batch(), 3, example_shape=(4, 4, 1))
  validate.check_regression_batch(amaml.sinusoid_tasks(jax.random.key(0), 2))
  images = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 4, 1), dtype=np.uint8)
  validate.check_classification_batch(sample_episodes(0, images, 3, 1, 2, 4), 3, (4, 4, 1))
  with pytest.raises(TypeError, match="outside jax.jit"):
    jax.jit(lambda b: validate.check_finite_batch(b))(_cls_batch())


# --- determinism and no pickle ------------------------------------------------------------------


def test_seed_decides_the_run():
  """Same seed: the same weights and tasks, bitwise; another seed: others. (Same seed, whole
  runs: tests/test_train.py in one process; the fault tests across processes, bitwise.)"""

  def first(seed):  # initial weights and the first training batch of a seed
    cfg = get_config("sinusoid", seed=seed, hidden=8, meta_batch=2)
    exp = train.build(cfg)
    batch = exp.sample(jax.random.fold_in(train.run_keys(cfg).train, 0), None, cfg.meta_batch)
    return [np.asarray(x) for x in jax.tree.leaves((exp.params, batch))]

  a, b, c = first(0), first(0), first(1)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert all(not np.array_equal(x, z) for x, z in zip(a, c) if np.ptp(x) > 0)


def test_checkpoints_are_arrays_and_restore_without_unpickling(tmp_path, monkeypatch):
  cfg = get_config("sinusoid", iterations=10, **TINY)
  state, _ = train.train(cfg, tmp_path / "r", progress=False, evaluate_at_end=False)
  _assert_no_pickle(tmp_path / "r")

  def refuse(*a, **k):
    raise AssertionError("a checkpoint was unpickled")

  monkeypatch.setattr(pickle, "load", refuse)
  monkeypatch.setattr(pickle, "loads", refuse)
  monkeypatch.setattr(pickle, "Unpickler", refuse)
  _, restored = train.load_run(tmp_path / "r")
  chex.assert_trees_all_equal(state, restored)


@pytest.mark.parametrize(
  "args, match",
  [
    (
      ["evaluate", "--run", "{t}/missing"],
      r"^amaml evaluate: .*missing has no config\.json.*amaml train",
    ),
    (["plot", "--run", "{t}/missing"], r"^amaml plot: .*metrics\.jsonl not found.*run directory"),
    (
      ["train", "--config", "omniglot-5w1s", "--data_dir", "{t}/nowhere", "--out", "{t}/r"],
      r"^amaml train: .*nowhere does not exist: run `amaml download omniglot`.*point --data_dir",
    ),
    (
      ["train", "--num_processes", "2", "--out", "{t}/r"],
      r"^amaml train: --num_processes 2 needs --coordinator_address HOST:PORT",
    ),
    (
      [
        "train",
        "--num_processes",
        "2",
        "--process_id",
        "2",
        "--coordinator_address",
        "localhost:1",
        "--out",
        "{t}/r",
      ],
      r"^amaml train: process_id=2 with num_processes=2: the ids are 0 to 1",
    ),
    # a renamed flag: one line naming its new name (amaml.cli_flags.RENAMED_FLAGS)
    (
      ["evaluate", "--run", "{t}/r", "--tasks", "10"],
      r"^amaml evaluate: --tasks was renamed --eval_tasks: pass --eval_tasks 10$",
    ),
    (
      ["evaluate", "--run", "{t}/r", "--inner_steps=3"],
      r"^amaml evaluate: --inner_steps was renamed --eval_inner_steps: pass --eval_inner_steps 3$",
    ),
    (
      ["plot", "--run", "{t}/r", "--out", "{t}/p"],
      r"^amaml plot: --out was renamed --plot_dir: pass --plot_dir .*/p$",
    ),
    (
      ["download", "omniglot", "--out", "{t}/o"],
      r"^amaml download: --out was renamed --data_dir: pass --data_dir .*/o$",
    ),
  ],
)
def test_every_subcommand_reports_user_errors_in_one_line(tmp_path, args, match):
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    code = cli.main([a.format(t=tmp_path) for a in args])
  assert code == 2
  text = err.getvalue()
  assert text.count("\n") == 1 and "Traceback" not in text, text
  assert re.search(match, text), text
