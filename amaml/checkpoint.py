"""Atomic checkpoints of a :class:`amaml.MetaState` with Orbax (arrays only, no pickle).

Orbax writes each step into a temporary directory and renames it when complete,
so a process killed mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np


class Checkpointer:
  """Saves and restores training state under ``directory`` (keeps the last ``max_to_keep``)."""

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    """Writes ``state`` at ``step``; refuses non-finite parameters."""
    from amaml.sharding import host_local

    leaves = [x for x in jax.tree.leaves(host_local(state)) if hasattr(x, "dtype")]
    for x in leaves:
      if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(np.asarray(x))):
        raise FloatingPointError(f"refusing to checkpoint non-finite state at step {step}")
    self._manager.save(step, args=self._ocp.args.StandardSave(state), force=True)
    self._manager.wait_until_finished()

  def restore(self, target: Any, step: int | None = None) -> Any:
    """Restores into the structure, shapes and dtypes of ``target``.

    Raises ``ValueError`` if the checkpoint does not fit ``target`` (another
    configuration: model size, ways, rate granularity...).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, target)
    try:
      return self._manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
          f"checkpoint {self.directory}/{step} does not match this configuration ({e}); "
          "resume with the configuration that wrote it, or start a new --out directory") from e

  def close(self) -> None:
    self._manager.close()
