"""Omniglot training end to end on a tiny fake arrays folder: loss falls, resume is exact,
bad settings are named."""

import dataclasses

import chex
import pytest

from conftest import write_fake_omniglot

from amaml import train
from amaml.configs import get_config


@pytest.fixture(scope="module")
def omniglot_dir(tmp_path_factory):
  """12 + 8 'characters' of 20 drawings each: a blob whose position depends on the class."""
  return str(write_fake_omniglot(tmp_path_factory.mktemp("omni"), 12, 8, pattern="blobs"))


@pytest.fixture(autouse=True)
def small_split(monkeypatch, tmp_path):
  """The fake set has 20 characters: MAML protocol split 12 / 4 / 4 (x 4 rotations)."""
  import amaml.data.omniglot as om

  monkeypatch.setattr(om, "MAML_NUM_TRAIN", 12)
  monkeypatch.setattr(om, "MAML_NUM_VAL", 4)
  monkeypatch.setenv("AMAML_CACHE_DIR", str(tmp_path / "cache"))


def _cfg(omniglot_dir, **kw):
  # every test uses this configuration, so the compiled training chunk is shared
  base = dict(
    data_dir=omniglot_dir,
    hidden=8,
    meta_batch=4,
    queries=3,
    iterations=40,
    log_every=10,
    checkpoint_every=20,
    val_every=20,
    val_tasks=8,
    eval_tasks=8,
    eval_batch=8,
    eval_inner_steps=3,
    alpha_lr=1e-3,
  )
  return get_config("omniglot-5w1s", **{**base, **kw})


def test_training_lowers_the_loss_and_evaluates(omniglot_dir, tmp_path):
  cfg = _cfg(omniglot_dir, iterations=60)
  state, results = train.train(cfg, tmp_path / "run", progress=False)
  import json

  recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert recs[-1]["loss"] < recs[0]["loss"]
  assert "val_accuracy" in recs[1]
  t = results["test"]
  assert 0.0 <= t["accuracy"] <= 1.0 and t["tasks"] == 8
  assert t["accuracy"] > t["pre_accuracy"]  # adaptation helps


@pytest.mark.slow  # ~85 s of compiles; the default run keeps bitwise resume after a SIGKILL
def test_resume_is_bitwise(omniglot_dir, tmp_path):  # (tests/test_reliability.py, sinusoid)
  cfg = _cfg(omniglot_dir, val_every=0)  # (validation does not touch the state: not compiled here)
  full, _ = train.train(cfg, tmp_path / "full", progress=False, evaluate_at_end=False)
  train.train(
    dataclasses.replace(cfg, iterations=20),
    tmp_path / "split",
    progress=False,
    evaluate_at_end=False,
  )
  resumed, _ = train.train(
    cfg, tmp_path / "split", resume=True, progress=False, evaluate_at_end=False
  )
  chex.assert_trees_all_equal(full, resumed)


@pytest.mark.parametrize(
  "overrides, match",
  [
    ({"ways": 30}, "more than the .* classes"),
    ({"shots": 10, "queries": 15}, "examples per class"),
  ],
)
def test_bad_episode_settings_are_named(omniglot_dir, overrides, match):
  with pytest.raises(ValueError, match=match):
    train.build(_cfg(omniglot_dir, **overrides))


def test_missing_data_dir_is_named(tmp_path):
  with pytest.raises((FileNotFoundError, ValueError), match="omniglot|Omniglot"):
    train.build(_cfg(str(tmp_path / "nowhere")))


@pytest.mark.parametrize(
  "method",
  [
    "anil",
    "protonet",
    *(pytest.param(m, marks=pytest.mark.slow) for m in ("meta-sgd", "maml++", "reptile")),
  ],
)
def test_every_method_lowers_the_loss_on_an_omniglot_subset(omniglot_dir, tmp_path, method):
  import json

  extra = {
    "maml++": {"multi_step_loss": 20, "first_order_steps": 20, "inner_steps": 2},
    "reptile": {"inner_steps": 3},
    # ANIL adapts the head only: MAML's Omniglot rate (0.4) and more inner steps
    "anil": {"alpha": 0.4, "inner_steps": 3},
  }.get(method, {})
  cfg = _cfg(
    omniglot_dir,
    method=method,
    iterations=60,
    alpha_lr=None,
    checkpoint_every=0,
    val_every=0,
    **{"alpha": 0.1, **extra},
  )
  _, results = train.train(cfg, tmp_path / "run", progress=False)
  recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert recs[-1]["loss"] < 0.9 * recs[0]["loss"], [r["loss"] for r in recs]
  assert 0.0 <= results["test"]["accuracy"] <= 1.0
