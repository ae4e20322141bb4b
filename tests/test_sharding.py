"""Data-parallel meta steps (amaml.sharding): the sharded step equals the single-device one,
compiles once, and an uneven split is refused with the fix.

Several devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` set before
JAX starts, so those checks run in a subprocess (this process has one CPU device).
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import amaml
from amaml import sharding, train
from amaml.configs import Config, get_config
from amaml.task import TaskBatch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_devices(code: str, devices: int = 4, timeout: float = 300) -> dict:
  """Runs ``code`` in a fresh Python with ``devices`` forced CPU devices; returns the JSON
  object it prints on its last line."""
  env = {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": REPO,
  }
  proc = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


_STEP_CHECKS = """
import json, dataclasses
import jax, jax.numpy as jnp, numpy as np
import amaml
from amaml import sharding, train
from amaml.configs import get_config

out = {"devices": len(jax.devices())}
model = amaml.models.MLP(hidden=(16, 16))
params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
loss_fn = amaml.losses.mse(lambda p, x: model.apply({"params": p}, x))
learner = amaml.alpha_maml(loss_fn, alpha=0.01, beta=1e-3, alpha_lr=1e-3, beta_lr=1e-6)
mesh = sharding.task_mesh()
step = sharding.sharded_step(learner, mesh)
single, sharded = learner.init(params), sharding.replicate(learner.init(params), mesh)
loss_single, loss_sharded = [], []
for i in range(4):
  batch = amaml.sinusoid_tasks(jax.random.key(i), 8)
  single, m1 = learner.step(single, batch)
  sharded, m4 = step(sharded, sharding.shard_batch(batch, mesh) if i % 2 else batch)
  loss_single.append(float(m1["loss"])); loss_sharded.append(float(m4["loss"]))
out["losses"] = [loss_single, loss_sharded]
def rel_diff(x, y):  # largest difference of a leaf, relative to the leaf's scale
  return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / (np.max(np.abs(a)) + 1e-12))
             for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
out["max_state_diff"] = rel_diff(single, sharded)
out["alpha"] = [  # per tensor
    [float(a) for a in jax.tree.leaves(st.alpha)] for st in (single, sharded)
]
out["step_compiles"] = step.jitted._cache_size()
out["state_spec"] = sorted({str(x.sharding.spec) for x in jax.tree.leaves(sharded)})
out["state_devices"] = sorted({len(x.sharding.device_set) for x in jax.tree.leaves(sharded)})
b = sharding.shard_batch(amaml.sinusoid_tasks(jax.random.key(0), 8), mesh)
out["shard_rows"] = sorted({s.data.shape[0] for s in b.support_x.addressable_shards})
hlo = step.jitted.lower(sharded, b).compile().as_text()
out["all_reduce"] = "all-reduce" in hlo
errors = []
for bad in (lambda: sharding.shard_batch(amaml.sinusoid_tasks(jax.random.key(0), 6), mesh),
            lambda: step(sharded, amaml.sinusoid_tasks(jax.random.key(0), 10)),
            lambda: sharding.task_mesh(8)):
  try:
    bad()
    errors.append(None)
  except ValueError as e:
    errors.append(str(e))
out["errors"] = errors

# The training chunk (on-device sampling under lax.scan) with a mesh: compiled once,
# equal to the single-device chunk.
cfg = get_config("sinusoid", hidden=16, meta_batch=8, log_every=5, iterations=10, val_every=0,
                 checkpoint_every=0)
exp = train.build(cfg)
ref = train.make_train_chunk(exp, 5)
chunk = train.make_train_chunk(exp, 5, mesh)
s_mesh = sharding.replicate(jax.tree.map(np.array, exp.learner.init(exp.params)), mesh)
s_ref = exp.learner.init(exp.params)  # donated below (with exp.params): s_mesh holds copies
for start in (0, 5, 10):
  s_ref, m_ref = ref(s_ref, None, jnp.int32(start), jnp.int32(5))
  s_mesh, m_mesh = chunk(s_mesh, None, jnp.int32(start), jnp.int32(5))
out["chunk_compiles"] = chunk._cache_size()
out["chunk_loss"] = [np.asarray(m_ref["loss"]).tolist(), np.asarray(m_mesh["loss"]).tolist()]
out["chunk_state_diff"] = rel_diff(s_ref, s_mesh)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def four_devices():
  return run_with_devices(_STEP_CHECKS)


def test_subprocess_sees_four_devices(four_devices):
  assert four_devices["devices"] == 4


def test_sharded_step_equals_single_device_step(four_devices):
  single, sharded = four_devices["losses"]
  np.testing.assert_allclose(sharded, single, rtol=1e-5)
  assert four_devices["max_state_diff"] < 1e-5
  a1, a4 = four_devices["alpha"]
  assert all(a != pytest.approx(0.01, rel=1e-6) for a in a1)  # every alpha moved,
  assert a4 == pytest.approx(a1, rel=1e-5)  # identically on 4 devices


def test_layout_is_task_split_batch_and_replicated_state(four_devices):
  assert four_devices["shard_rows"] == [2]  # 8 tasks / 4 devices
  assert four_devices["state_spec"] in (["P()"], ["PartitionSpec()"])
  assert four_devices["state_devices"] == [4]
  assert four_devices["all_reduce"]  # XLA inserted the gradient reduction


def test_no_recompilation_on_later_calls(four_devices):
  assert four_devices["step_compiles"] == 1  # 4 calls, host and pre-sharded batches
  assert four_devices["chunk_compiles"] == 1  # 3 chunks


def test_training_chunk_with_mesh_equals_single_device(four_devices):
  ref, mesh = four_devices["chunk_loss"]
  np.testing.assert_allclose(mesh, ref, rtol=1e-5)
  assert four_devices["chunk_state_diff"] < 1e-5


def test_uneven_split_and_too_many_devices_are_named(four_devices):
  uneven, uneven_step, too_many = four_devices["errors"]
  assert "num_tasks=6" in uneven and "multiple of 4" in uneven and "4 or 8" in uneven
  assert "num_tasks=10" in uneven_step and "8 or 12" in uneven_step
  assert "devices=8" in too_many and "xla_force_host_platform_device_count" in too_many


# --- in this process (one device) ------------------------------------------------------------


def _learner():
  model = amaml.models.MLP(hidden=(8, 8))
  params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
  loss_fn = amaml.losses.mse(lambda p, x: model.apply({"params": p}, x))
  return amaml.alpha_maml(loss_fn, alpha=0.01, beta=1e-3), params


def test_one_device_mesh_matches_plain_step():
  learner, params = _learner()
  mesh = sharding.task_mesh()
  assert mesh.axis_names == ("tasks",) and mesh.size == len(jax.devices())
  step = sharding.sharded_step(learner, mesh)
  a, b = learner.init(params), learner.init(params)
  for i in range(2):
    batch = amaml.sinusoid_tasks(jax.random.key(i), 5)
    a, _ = learner.step(a, batch)
    b, _ = step(b, batch)
  chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)
  assert step.jitted._cache_size() == 1


@pytest.mark.parametrize(
  "devices, match",
  [
    (-1, "must be >= 0"),
    (len(jax.devices()) + 1, "are available"),
  ],
)
def test_task_mesh_bad_device_counts(devices, match):
  with pytest.raises(ValueError, match=match):
    sharding.task_mesh(devices)


def test_task_mesh_explicit_devices_and_ragged_batch():
  mesh = sharding.task_mesh(jax.devices()[:1])
  assert mesh.size == 1
  ragged = TaskBatch(
    np.zeros((4, 5, 1)), np.zeros((4, 5, 1)), np.zeros((3, 5, 1)), np.zeros((3, 5, 1))
  )
  with pytest.raises(ValueError, match="disagree on the number of tasks"):
    sharding.shard_batch(ragged, mesh)


def test_config_devices_field_validated_and_resume_may_change_it(tmp_path):
  assert Config().devices == 1
  with pytest.raises(ValueError, match="devices=-2"):
    get_config("sinusoid", devices=-2)
  cfg = get_config(
    "sinusoid", hidden=8, meta_batch=2, iterations=10, log_every=5, checkpoint_every=5, val_every=0
  )
  (tmp_path / "r").mkdir()
  (tmp_path / "r" / "config.json").write_text(cfg.to_json())  # a run started on one device
  # devices=0 (all, here one) may differ on --resume: only the placement changes
  state, _ = train.train(
    dataclasses.replace(cfg, devices=0),
    tmp_path / "r",
    resume=True,
    progress=False,
    evaluate_at_end=False,
  )
  assert int(state.step) == 10 and len(state.params["Dense_0"]["kernel"].sharding.device_set) == 1
  assert Config.from_json((tmp_path / "r" / "config.json").read_text()).devices == 0


def test_train_refuses_more_devices_than_available_before_writing(tmp_path):
  cfg = get_config("sinusoid", devices=len(jax.devices()) + 1, meta_batch=2)
  with pytest.raises(ValueError, match="device"):
    train.train(cfg, tmp_path / "r", progress=False)
  assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_cli_training_on_four_devices_matches_one_device(tmp_path):
  """``amaml train --devices 4`` ends within float tolerance of ``--devices 1``, and a
  4-device run repeats itself bitwise."""
  result = run_with_devices(f"""
  import json, dataclasses, jax, numpy as np
  from amaml import train
  from amaml.configs import get_config
  cfg = get_config("sinusoid", hidden=16, meta_batch=8, iterations=60, log_every=10,
                   checkpoint_every=30, val_every=0, eval_tasks=20, eval_batch=10)
  runs = {{}}
  for name, devices in (("one", 1), ("four", 4), ("four_again", 4)):
    state, res = train.train(dataclasses.replace(cfg, devices=devices), "{tmp_path}/" + name,
                             progress=False)
    runs[name] = (jax.tree.leaves(state), res["test"])
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(runs["one"][0], runs["four"][0]))
  same = all(np.array_equal(a, b) for a, b in zip(runs["four"][0], runs["four_again"][0]))
  try:
    train.train(dataclasses.replace(cfg, devices=4, meta_batch=6), "{tmp_path}/uneven")
    uneven = ""
  except ValueError as e:
    uneven = str(e)
  import os
  print(json.dumps({{"diff": diff, "bitwise_repeat": same, "uneven": uneven,
                     "uneven_wrote": os.path.exists("{tmp_path}/uneven"),
                     "test": [runs[k][1]["loss"] for k in runs]}}))
  """)
  assert result["diff"] < 1e-4
  assert result["bitwise_repeat"]
  one, four, again = result["test"]
  assert four == again and four == pytest.approx(one, rel=1e-3)
  assert "meta_batch=6" in result["uneven"] and "multiple of 4" in result["uneven"]
  assert not result["uneven_wrote"]
