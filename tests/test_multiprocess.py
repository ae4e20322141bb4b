"""Several processes: two CPU processes on localhost (jax.distributed, gloo collectives)
train a few sharded Alpha MAML steps, each on its half of the tasks, and end with the
state one process computes over all tasks; when one process dies, the other stops with
an error instead of hanging."""
import json
import os
import socket
import subprocess
import sys
import textwrap

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
    print(json.dumps({"devices": jax.device_count(), "alpha": float(state.alpha.addressable_data(0)),
                      "params": [jax.device_get(x).ravel().tolist() for x in leaves]}))
    """)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run(nproc, die_after=0, timeout=240):
  port, env = _free_port(), {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(pid), str(nproc),
                             str(die_after)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env) for pid in range(nproc)]
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


def test_two_processes_equal_one():
  (rc1, out1, err1), = _run(1)
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
