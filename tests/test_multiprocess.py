"""Several processes: two CPU processes on localhost (jax.distributed, gloo collectives)
train a few sharded Alpha MAML steps, each on its half of the tasks, and end with the
state one process computes over all tasks; when one process dies, the other stops with
an error instead of hanging. The same for ``amaml train --num_processes 2``, whose run
then resumes from its checkpoint."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

WORKER = textwrap.dedent("""
    import json, os, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid, nproc, die_after = (int(a) for a in sys.argv[1:5])
    if nproc > 1:
      jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc,
                                 process_id=pid, heartbeat_timeout_seconds=10)
    import jax.numpy as jnp
    import amaml
    from amaml import sharding

    model = amaml.models.MLP(hidden=(8, 8))
    params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
    loss_fn = amaml.losses.mse(lambda p, x: model.apply({"params": p}, x))
    learner = amaml.alpha_maml(loss_fn, alpha=0.05)
    mesh = sharding.task_mesh()
    step = sharding.sharded_step(learner, mesh)
    state = sharding.replicate(learner.init(params), mesh)
    tasks = 8
    for i in range(3):
      batch = amaml.sinusoid_tasks(jax.random.key(100 + i), tasks)   # the global batch
      share = tasks // nproc                                          # this process's tasks
      local = jax.tree.map(lambda x: x[pid * share:(pid + 1) * share], batch)
      state, metrics = step(state, sharding.shard_batch(local, mesh) if nproc > 1 else batch)
      if i + 1 == die_after and pid == 1:
        os._exit(3)                                                   # a process dies
    leaves = [x.addressable_data(0) for x in jax.tree.leaves(state.params)]
    alpha = [float(a.addressable_data(0)) for a in jax.tree.leaves(state.alpha)]   # per tensor
    print(json.dumps({"devices": jax.device_count(), "alpha": alpha,
                      "params": [jax.device_get(x).ravel().tolist() for x in leaves]}))
    """)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run(nproc, die_after=0, timeout=240):
  port, env = _free_port(), {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", WORKER, str(port), str(pid), str(nproc), str(die_after)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
    )
    for pid in range(nproc)
  ]
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f"a process hung for {timeout} s")
    outs.append((p.returncode, out, err))
  return outs


# amaml train in two processes (below) checks the same equality end to end by default
@pytest.mark.slow
def test_two_processes_equal_one():
  ((rc1, out1, err1),) = _run(1)
  assert rc1 == 0, err1[-2000:]
  two = _run(2)
  for rc, out, err in two:
    assert rc == 0, err[-2000:]
  one = json.loads(out1.splitlines()[-1])
  for _, out, _ in two:
    got = json.loads(out.splitlines()[-1])
    assert got["devices"] == 2
    np.testing.assert_allclose(got["alpha"], one["alpha"], rtol=1e-5)
    for a, b in zip(got["params"], one["params"]):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_dead_process_stops_the_other_with_an_error():
  (rc0, out0, err0), (rc1, _, _) = _run(2, die_after=1)
  assert rc1 == 3
  assert rc0 != 0 and not out0.strip(), "the survivor should fail, not finish"


# amaml train itself: sinusoid, 4 tasks a step (2 per process), a checkpoint every 5 steps
TRAIN = [
  "--config",
  "sinusoid",
  "--meta_batch",
  "4",
  "--log_every",
  "5",
  "--checkpoint_every",
  "5",
  "--val_every",
  "0",
  "--val_tasks",
  "20",
  "--eval_tasks",
  "20",
  "--eval_batch",
  "20",
  "--no_progress",
]


def _start_train(out, nproc, *extra, devices=1):
  """``amaml train`` in ``nproc`` processes (one CPU device each), or in one process with
  ``devices`` forced CPU devices."""
  port, env = _free_port(), {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  group = lambda i: (
    [
      "--num_processes",
      str(nproc),
      "--process_id",
      str(i),
      "--coordinator_address",
      f"localhost:{port}",
      "--heartbeat_timeout",
      "10",
    ]
    if nproc > 1
    else ["--devices", str(devices)]
  )
  return [
    subprocess.Popen(
      [sys.executable, "-m", "amaml", "train", *TRAIN, "--out", str(out), *extra, *group(i)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
    )
    for i in range(nproc)
  ]


def _wait(procs, timeout=300):
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=timeout)
      outs.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f"a process hung for {timeout} s")
  return outs


def _lines(run):
  return [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_amaml_train_in_two_processes_equals_one_process_on_two_devices(tmp_path):
  for rc, out, err in _wait(_start_train(tmp_path / "one", 1, "--iterations", "20", devices=2)):
    assert rc == 0, err[-2000:]
  two = _wait(_start_train(tmp_path / "two", 2, "--iterations", "20"))
  for rc, out, err in two:
    assert rc == 0, err[-2000:]
  assert "meta-test" in two[0][1] and "meta-test" not in two[1][1]  # process 0 alone reports
  one, both = _lines(tmp_path / "one"), _lines(tmp_path / "two")
  assert [r["step"] for r in both] == [5, 10, 15, 20]  # one line per step, written once
  for a, b in zip(one, both):
    np.testing.assert_allclose([b["loss"], b["alpha"]], [a["loss"], a["alpha"]], rtol=1e-4)
  r1, r2 = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
  assert r2["steps"] == 20
  np.testing.assert_allclose(r2["test"]["loss"], r1["test"]["loss"], rtol=1e-3)


# two processes trained, killed and restarted: CI time; test_reliability.py keeps kill/resume
# in the default run
@pytest.mark.slow
def test_a_killed_training_process_stops_the_other_and_the_run_resumes(tmp_path):
  run = tmp_path / "run"
  procs = _start_train(run, 2, "--iterations", "1000000")
  deadline = time.time() + 240
  while not any(p.name.isdigit() for p in (run / "checkpoints").glob("*")):
    assert time.time() < deadline and procs[0].poll() is None, "no checkpoint written"
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGKILL)
  (rc0, out0, err0), _ = _wait(procs, timeout=120)
  assert rc0 == 1, err0[-2000:]
  assert "start every process again with --resume" in err0
  assert "Traceback" not in err0
  saved = max(int(p.name) for p in (run / "checkpoints").glob("*") if p.name.isdigit())
  # both processes again, from the checkpoint, to ten steps past it
  for rc, out, err in _wait(_start_train(run, 2, "--iterations", str(saved + 10), "--resume")):
    assert rc == 0, err[-2000:]
  steps = [r["step"] for r in _lines(run)]
  assert steps == list(range(5, saved + 11, 5))  # the lines after the checkpoint, once
  assert json.loads((run / "results.json").read_text())["steps"] == saved + 10
