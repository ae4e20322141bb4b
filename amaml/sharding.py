"""Data-parallel meta-training: the task batch sharded over devices with JAX's own sharding.

The meta step is unchanged; only where its arrays live changes. A 1-D
:class:`jax.sharding.Mesh` with one axis, ``"tasks"``, spans the devices; every
:class:`~amaml.task.TaskBatch` is split on its leading (task) axis
(``NamedSharding(mesh, P("tasks"))``) and the :class:`~amaml.meta.MetaState` is
replicated (``P()``). Each device then adapts its own tasks (the task ``vmap``
is partitioned), and XLA's partitioner inserts the all-reduce that turns the
per-device sums into the mean meta-gradient and hypergradients, so every device
takes the same optimizer step and the state stays replicated. Nothing here
moves data by hand.

    mesh = task_mesh()                        # all devices
    step = sharded_step(learner, mesh)        # jitted: replicated state, sharded batch
    state = replicate(learner.init(params), mesh)
    state, metrics = step(state, shard_batch(batch, mesh))

Inside a jitted function that samples its own tasks (as :mod:`amaml.train`
does under ``lax.scan``), :func:`constrain_batch` marks the sampled batch as
sharded with :func:`jax.lax.with_sharding_constraint`; with JAX's partitionable
Threefry (the default) the random draws do not depend on the device count, so
the tasks, and hence the results, equal the single-device run up to the order
of the floating-point reductions.

The number of tasks must be a multiple of the number of devices (every device
gets the same share); :func:`check_divisible` says so with the fix.

**Several hosts.** Start every process with :func:`jax.distributed.initialize`
(coordinator address, number of processes and process id, or the cluster's
auto-detection) *before* any other JAX call; then ``jax.devices()`` lists the
devices of all processes and ``task_mesh()`` is a global mesh over them. Run
the same program on every host. On-device sampling (as ``amaml train``
does) needs nothing else: every process traces the same
global batch and computes its own shards. Batches made on the host are passed
as each process's local slice of the global batch: :func:`shard_batch` then
uses :func:`jax.make_array_from_process_local_data`. Every process must call
Orbax's save and restore (it writes replicated arrays once). Host-side reads of
global arrays (``np.asarray`` of metrics, a finiteness check) need the process's own
copy instead (:func:`host_local`), and host-side decisions (stop on a time budget,
how many steps the next call takes) must agree (:func:`agree`). :func:`initialize`
does the set-up, with gloo for the collectives of CPUs. ``amaml train
--num_processes N --process_id i --coordinator_address host0:1234`` does all of this;
``tests/test_multiprocess.py`` runs two CPU processes on localhost, through
:func:`sharded_step` and through ``amaml train`` (equal to one process; a killed
process stops the other, and the run resumes from its checkpoint).

>>> import jax, numpy as np
>>> from amaml.task import TaskBatch
>>> mesh = task_mesh()
>>> batch = shard_batch(TaskBatch(*[np.zeros((4, 5, 1), np.float32)] * 4), mesh)
>>> batch.support_x.sharding.spec
P('tasks',)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from amaml import xla_options
from amaml.task import TaskBatch

AXIS = "tasks"


def task_mesh(devices: int | Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis ``"tasks"``.

  Args:
    devices: ``None`` or ``0``: all devices (``jax.devices()``: the local ones on
      one host, those of every process after :func:`jax.distributed.initialize`);
      an int ``n``: the first ``n`` of them; or a sequence of devices.
  """
  available = jax.devices()
  if devices is None or (
    isinstance(devices, (int, np.integer)) and not isinstance(devices, bool) and devices == 0
  ):
    chosen = available
  elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
    if devices < 0:
      raise ValueError(f"devices={devices} must be >= 0 (0 = all devices)")
    if devices > len(available):
      raise ValueError(
        f"devices={devices} but only {len(available)} {jax.default_backend()} device(s) are "
        f"available; use --devices {len(available)} (or 0 for all). On CPU, set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} before starting Python "
        "to emulate more"
      )
    chosen = available[:devices]
  else:
    chosen = list(devices)
    if not chosen:
      raise ValueError("task_mesh needs at least one device")
  return Mesh(np.asarray(chosen, dtype=object), (AXIS,))


def task_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (task) axis split over the mesh, the rest of each array whole."""
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of the mesh."""
  return NamedSharding(mesh, P())


def check_divisible(num_tasks: int, mesh: Mesh, what: str = "meta_batch") -> None:
  """Raises ``ValueError`` unless ``num_tasks`` splits evenly over the mesh's devices."""
  n = mesh.size
  if num_tasks % n:
    lo, hi = (num_tasks // n) * n, -(-num_tasks // n) * n
    options = " or ".join(str(v) for v in (lo, hi) if v > 0)
    raise ValueError(
      f"{what}={num_tasks} tasks cannot be split evenly over {n} devices: make {what} a "
      f"multiple of {n} (e.g. {options}) or use fewer devices (--devices, or "
      "task_mesh(devices=...))"
    )


def _num_tasks(batch: TaskBatch) -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves or any(np.ndim(x) < 1 for x in leaves):
    raise ValueError("a sharded batch needs a leading task axis on every array")
  sizes = {int(np.shape(x)[0]) for x in leaves}
  if len(sizes) != 1:
    raise ValueError(
      f"batch arrays disagree on the number of tasks (leading axis): {sorted(sizes)}"
    )
  return sizes.pop()


def shard_batch(batch: TaskBatch, mesh: Mesh) -> TaskBatch:
  """Puts ``batch`` on the mesh, split on the task axis.

  With several processes, ``batch`` is this process's slice of the global batch
  (its tasks, in process order), assembled with
  :func:`jax.make_array_from_process_local_data`.
  """
  sharding = task_sharding(mesh)
  if jax.process_count() > 1:
    check_divisible(_num_tasks(batch) * jax.process_count(), mesh, "num_tasks")
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )
  check_divisible(_num_tasks(batch), mesh, "num_tasks")
  return jax.device_put(batch, sharding)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts every array of ``tree`` (a state, parameters, images) on all devices of the mesh.

  With several processes every process passes the same values; each places its copy on
  its own devices (:func:`jax.make_array_from_callback`)."""
  sharding = replicated(mesh)
  if jax.process_count() > 1:

    def put(x):
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x  # already a global array
      host = np.asarray(x)
      return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)
  return jax.device_put(tree, sharding)


def constrain_batch(batch: TaskBatch, mesh: Mesh) -> TaskBatch:
  """Inside ``jit``: marks ``batch`` as split on the task axis (a sharding constraint).

  The task count is static under ``jit``, so a bad count fails at trace time.
  """
  check_divisible(_num_tasks(batch), mesh)
  return jax.lax.with_sharding_constraint(batch, task_sharding(mesh))


def sharded_step(learner, mesh: Mesh, donate: bool = False) -> Callable:
  """``learner.update`` jitted for ``mesh``: state replicated, batch split by task.

  Returns ``step(state, batch) -> (state, metrics)`` like ``learner.step``. The
  state comes out replicated on the mesh and the batch is put on the mesh if it
  is not already, so the compiled step is reused from the second call on.
  """
  rep = replicated(mesh)
  tasks = task_sharding(mesh)

  def update(state, batch):
    return learner.update(state, jax.lax.with_sharding_constraint(batch, tasks))

  jitted = xla_options.jit(update, out_shardings=(rep, rep), donate_argnums=(0,) if donate else ())

  def step(state, batch):
    check_divisible(_num_tasks(batch), mesh, "num_tasks")
    if not all(_has_sharding(x, rep) for x in jax.tree.leaves(state)):
      state = replicate(state, mesh)
    if not all(_has_sharding(x, tasks) for x in jax.tree.leaves(batch)):
      batch = (
        shard_batch(batch, mesh)
        if jax.process_count() > 1
        else jax.tree.map(lambda x: jax.device_put(x, tasks), batch)
      )
    return jitted(state, batch)

  step.jitted = jitted  # for inspection (e.g. ``step.jitted._cache_size()``)
  return step


def initialize(
  coordinator_address: str,
  num_processes: int,
  process_id: int,
  *,
  heartbeat_timeout_seconds: int = 100,
) -> None:
  """Joins this process to a group of ``num_processes`` (:func:`jax.distributed.initialize`);
  call it before any other JAX call. CPU collectives go through gloo. A process that stops
  answering for ``heartbeat_timeout_seconds`` stops the others with an error."""
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(
      f"process_id={process_id} with num_processes={num_processes}: the ids "
      f"are 0 to {num_processes - 1}, one per process"
    )
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPUs only; else unused
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    heartbeat_timeout_seconds=heartbeat_timeout_seconds,
  )


def host_local(tree: Any) -> Any:
  """This process's copy of every replicated array of ``tree``: with several processes a
  global array cannot be read (``np.asarray``) or mixed with local ones, its copy on one of
  this process's devices can. Other leaves are returned as they are."""

  def local(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x.addressable_data(0)
    return x

  return jax.tree.map(local, tree)


def agree(value: Any) -> np.ndarray:
  """Process 0's ``value`` in every process (decisions taken on the host, such as stopping on
  a time budget, must be the same everywhere); the value itself in a single process."""
  if jax.process_count() == 1:
    return np.asarray(value)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def _has_sharding(x, sharding: NamedSharding) -> bool:
  s = getattr(x, "sharding", None)
  return s is not None and s == sharding
