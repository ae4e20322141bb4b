"""Shared test fixtures: float64, a tiny sinusoid config, fake Omniglot folders.

Trees are compared with ``chex.assert_trees_all_close`` / ``chex.assert_trees_all_equal``.
"""

import os
import shutil
import tempfile
from pathlib import Path

# One persistent XLA compilation cache for the whole test run: many tests train the same tiny
# programs, which then compile once. The first process to load this file (pytest, or xdist's
# controller) makes a fresh folder; the workers and every subprocess (scripts, notebook
# kernels, two-process training) inherit it through the environment; it is removed at the end.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="amaml-tests-xla-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402
import numpy as np
import pytest

from amaml.configs import get_config
from amaml.data.omniglot_arrays import write_omniglot_arrays

# the sinusoid config cut to seconds of training
TINY_SINUSOID = dict(
  hidden=16,
  meta_batch=4,
  iterations=40,
  log_every=10,
  checkpoint_every=20,
  val_every=0,
  eval_tasks=20,
  eval_batch=10,
)


def slow_except(values, fast) -> list:
  """``values`` as parameters, every one not in ``fast`` marked ``slow`` (run with -m slow)."""
  return [v if v in fast else pytest.param(v, marks=pytest.mark.slow) for v in values]


@pytest.fixture
def x64():
  """Run a test in float64 (for finite differences)."""
  with jax.enable_x64(True):
    yield


@pytest.fixture
def tiny_config():
  """A factory of tiny sinusoid configs: ``tiny_config(**overrides)``."""

  def make(**overrides):
    return get_config("sinusoid", **{**TINY_SINUSOID, **overrides})

  return make


def write_fake_omniglot(
  path: Path,
  n_background: int = 6,
  n_evaluation: int = 4,
  *,
  drawers: int = 20,
  seed: int = 0,
  alphabets=None,
  ink: float = 0.15,
  pattern: str = "noise",
) -> Path:
  """Omniglot arrays in ``path`` (``write_omniglot_arrays``' layout), made from ``seed``.

  ``noise``: random ink with an asymmetric blob in one corner, so that the four rotations of
  a character all differ. ``blobs``: one round blob per character whose position depends
  on the class, jittered per drawing, so that a small network can learn the classes.
  """
  rng = np.random.default_rng(seed)
  if pattern == "noise":

    def chars(n, offset):
      out = rng.random((n, drawers, 105, 105)) > ink  # True = paper
      out[:, :, :30, :10] = False
      return out
  elif pattern == "blobs":
    yy, xx = np.mgrid[:105, :105]

    def chars(n, offset):
      out = np.ones((n, drawers, 105, 105), bool)
      for c in range(n):
        cy, cx = 20 + 13 * ((c + offset) % 6), 20 + 30 * (((c + offset) // 6) % 3)
        for d in range(drawers):
          jy, jx = rng.integers(-4, 5, 2)
          out[c, d] = (yy - cy - jy) ** 2 + (xx - cx - jx) ** 2 > 150
      return out
  else:
    raise ValueError(f"pattern={pattern!r}: use noise or blobs")
  background = chars(n_background, 0)
  return write_omniglot_arrays(path, background, chars(n_evaluation, n_background), alphabets)


@pytest.fixture
def fake_omniglot(tmp_path):
  """A factory of fake Omniglot folders under the test's ``tmp_path``:
  ``fake_omniglot(name, n_background, n_evaluation, **write_fake_omniglot_kwargs)``."""

  def make(name: str = "omniglot", *args, **kw) -> Path:
    return write_fake_omniglot(tmp_path / name, *args, **kw)

  return make


def fake_class_images(seed: int = 0, classes: int = 10, size: int = 28) -> np.ndarray:
  """Omniglot-like uint8 images ``[classes, 20, size, size, 1]``: each class a random
  binary pattern, each of its 20 examples that pattern with 10% of the pixels flipped, so
  that a support example tells its class's queries apart from the others."""
  rng = np.random.default_rng(seed)
  protos = rng.random((classes, 1, size, size, 1)) < 0.3
  flips = rng.random((classes, 20, size, size, 1)) < 0.1
  return (np.logical_xor(protos, flips) * 255).astype(np.uint8)


@pytest.fixture
def small_omniglot(monkeypatch, tmp_path):
  """A fake arrays folder: 12 training and 4 + 4 val/test characters (x 4 rotations)."""
  import amaml.data.omniglot as om

  monkeypatch.setattr(om, "MAML_NUM_TRAIN", 12)
  monkeypatch.setattr(om, "MAML_NUM_VAL", 4)
  monkeypatch.setenv("AMAML_CACHE_DIR", str(tmp_path / "cache"))
  return str(write_fake_omniglot(tmp_path / "omni", 12, 8, pattern="blobs"))


def pytest_sessionfinish(session, exitstatus):
  if _OWN_CACHE:  # only the process that made the folder (the workers inherit it)
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
