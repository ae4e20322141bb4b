"""Atomic checkpoints of a :class:`amaml.MetaState` with Orbax (arrays only, no pickle).

Orbax writes each step into a temporary directory and renames it when complete,
so a process killed mid-write leaves the previous checkpoint intact. A checkpoint damaged
afterwards (a file truncated, deleted or overwritten) is found by :meth:`Checkpointer.check`,
which reads every file of it; :meth:`Checkpointer.restore_newest_intact` then falls back to
the newest checkpoint that reads.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np


class CorruptCheckpointError(ValueError):
  """A checkpoint that cannot be read: a file of it is truncated, missing or garbled."""


class Checkpointer:
  """Saves and restores training state under ``directory`` (keeps the last ``max_to_keep``)."""

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=False
      ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

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

    Raises :class:`CorruptCheckpointError` if the checkpoint cannot be read (:meth:`check`)
    and ``ValueError`` if it does not fit ``target`` (another configuration: model size,
    ways, rate granularity...).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    saved = self.check(step)
    abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, target)
    try:
      _check_fits(saved, abstract)
      return self._manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
        f"checkpoint {self.directory}/{step} does not match this configuration ({e}); "
        "resume with the configuration that wrote it, or start a new --out directory"
      ) from e

  def restore_newest_intact(self, target: Any, remove_corrupt: bool = False) -> Any:
    """Restores the newest checkpoint that can be read (see :meth:`restore`). Each newer one
    that cannot is named, with why, in one line on stderr, and with ``remove_corrupt``
    deleted once an intact one is restored (so that a resumed run writes its step again). Raises
    :class:`CorruptCheckpointError` if none can be read, ``FileNotFoundError`` if there is
    none."""
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    for i, step in enumerate(reversed(steps)):
      try:
        state = self.restore(target, step)
      except CorruptCheckpointError as e:
        older = steps[-2 - i] if i + 1 < len(steps) else None
        print(
          f"amaml: warning: {e}; "
          + (
            f"trying the previous one, step {older}" if older is not None else "no older checkpoint"
          ),
          file=sys.stderr,
          flush=True,
        )
        continue
      for newer in steps[len(steps) - i :] if remove_corrupt else ():
        self._manager.delete(newer)
      return state
    raise CorruptCheckpointError(
      f"no intact checkpoint in {self.directory} (steps {', '.join(map(str, steps))} cannot "
      "be read): start a new --out directory"
    )

  def check(self, step: int) -> dict[str, tuple]:
    """Reads every array of checkpoint ``step`` (one at a time, so that a failure leaves no
    read in flight) and its metadata files, and returns each array's shape by name
    (``{"params.Dense_0.kernel": (1, 40), ...}``); raises :class:`CorruptCheckpointError`
    naming the checkpoint and why if any of them cannot be read or an array is missing."""
    path = Path(self.directory) / str(step)
    try:
      return _check_item(path, path / "default")
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise CorruptCheckpointError(f"checkpoint {path} cannot be read ({_one_line(e)})") from None

  def delete(self, step: int) -> None:
    """Removes checkpoint ``step``."""
    self._manager.delete(step)

  def close(self) -> None:
    self._manager.close()


def _check_fits(saved: dict[str, tuple], abstract: Any) -> None:
  """Raises ``ValueError`` naming the first array whose name or shape in a checkpoint
  (``saved``, from :meth:`Checkpointer.check`) differs from ``abstract``'s. Checked before
  Orbax restores: its own check fails with reads in flight, which finish after the error."""
  leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
  key = lambda path: jax.tree_util.keystr(path, simple=True, separator=".")  # Orbax's names
  wanted = {key(path): tuple(a.shape) for path, a in leaves}
  for name in sorted(saved.keys() | wanted.keys()):
    if saved.get(name) != wanted.get(name):
      raise ValueError(f"{name}: shape {saved.get(name)} saved, {wanted.get(name)} expected")


def _check_item(step_dir: Path, item: Path) -> dict[str, tuple]:
  """Parses the JSON metadata of an Orbax step and reads each array of its item (OCDBT and
  zarr, through TensorStore as Orbax does) to the end; raises on the first failure, else
  returns each array's shape by name."""
  import tensorstore as ts

  _read_json(step_dir / "_CHECKPOINT_METADATA")
  tree = _read_json(item / "_METADATA")["tree_metadata"]
  for p in sorted((item / "array_metadatas").glob("*")):
    _read_json(p)
  expected = {
    ".".join(str(k["key"]) for k in leaf["key_metadata"])
    for leaf in tree.values()
    if not leaf["value_metadata"].get("skip_deserialize")
  }  # (None leaves)
  context = ts.Context()
  base = {"driver": "file", "path": f"{item}/"}
  keys = (
    ts.KvStore.open({"driver": "ocdbt", "base": base}, context=context).result().list().result()
  )
  stored = {k.decode()[: -len("/.zarray")] for k in keys if k.endswith(b"/.zarray")}
  if expected - stored:
    raise ValueError(
      f"{len(expected - stored)} of its {len(expected)} arrays are missing, "
      f"e.g. {sorted(expected - stored)[0]}"
    )
  shapes = {}
  for name in sorted(expected):
    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": base, "path": f"{name}/"}}
    array = ts.open(spec, open=True, read=True, context=context).result()
    array.read().result()
    shapes[name] = tuple(array.shape)
  return shapes


def _read_json(path: Path) -> Any:
  try:
    return json.loads(path.read_bytes())
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise ValueError(f"{path.name} is not valid JSON: {e}") from None


def _one_line(e: BaseException) -> str:
  """The first line of an error, without TensorStore's long spec dumps."""
  text = str(e).splitlines()[0] if str(e) else type(e).__name__
  text = text.split(" [tensorstore_spec")[0]
  return text if len(text) <= 300 else text[:297] + "..."
