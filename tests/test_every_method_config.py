"""Every method trains from its own defaults on every built-in config: a few meta steps at
tiny sizes (fake Omniglot and image folders), each with a finite loss that moves the weights.

Only sizes are overridden (hidden units, meta-batch, queries, image side); each method's
rates, inner steps and optimizers are its defaults on that config (``get_config``, which
applies :data:`amaml.configs.METHOD_DEFAULTS`). Pairs that compile the same program (the
image benchmarks differ only in their folder once the sizes are tiny) train once. A Conv4
meta step takes 10-60 s to compile on 2 CPU cores, so the default run covers every method
on sinusoid and the two methods with their own update (Reptile, ProtoNets) on Omniglot
5w1s; the other pairs run with ``-m slow``.
"""

import dataclasses

import jax
import numpy as np
import pytest

from conftest import write_fake_omniglot
from test_image_folders import write_folders

from amaml import configs, train

TINY = dict(
  hidden=4, meta_batch=2, queries=1, image_size=16, val_tasks=2, eval_tasks=2, eval_batch=2
)
STEPS = 2
DEFAULT_RUN = {(m, "sinusoid") for m in configs.METHODS} | {
  ("reptile", "omniglot-5w1s"),
  ("protonet", "omniglot-5w1s"),
}
PAIRS = [
  pytest.param(m, c, marks=() if (m, c) in DEFAULT_RUN else pytest.mark.slow, id=f"{m}-{c}")
  for m in configs.METHODS
  for c in configs.CONFIGS
]


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
  """``{task: data_dir}``: 16 fake Omniglot characters split 6 / 5 / 5 (x 4 rotations, so
  20 classes for 20-way), and 6 classes of 20 RGB images per split for the benchmarks."""
  import amaml.data.omniglot as om

  root = tmp_path_factory.mktemp("data")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(om, "MAML_NUM_TRAIN", 6)
    mp.setattr(om, "MAML_NUM_VAL", 5)
    mp.setenv("AMAML_CACHE_DIR", str(root / "cache"))
    yield {
      "sinusoid": "",
      "omniglot": str(write_fake_omniglot(root / "omniglot", 10, 6)),
      "image_folder": str(write_folders(root / "images")),
    }


_TRAINED = {}  # one program's config (its folder left out) -> the losses of its steps


def _train_steps(exp: train.Experiment) -> list[float]:
  """``STEPS`` meta steps of ``exp`` from its initial state; the losses, each checked."""
  key = dataclasses.replace(exp.config, dataset="", data_dir="")
  if key not in _TRAINED:
    state = exp.learner.init(exp.params)
    losses = []
    for i in range(STEPS):
      batch = exp.sample(jax.random.key(i), exp.data["train"], exp.config.meta_batch)
      new, m = exp.learner.step(state, batch)
      assert not bool(m["nonfinite"]), f"step {i}: the guard rejected it ({m['loss']})"
      moved = [
        np.any(a != b) for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params))
      ]
      assert any(moved), f"step {i} left every weight where it was"
      losses.append(float(m["loss"]))
      state = new
    _TRAINED[key] = losses
  return _TRAINED[key]


@pytest.mark.parametrize("method, name", PAIRS)
def test_method_trains_from_its_defaults_on_config(method, name, data_dirs):
  base = configs.CONFIGS[name]
  cfg = configs.get_config(name, method=method, data_dir=data_dirs[base.task], **TINY)
  if method == "protonet" and base.task == "sinusoid":  # no classes to make prototypes of
    with pytest.raises(ValueError, match="protonet needs a classification task"):
      train.build(cfg)
    return
  losses = _train_steps(train.build(cfg))
  assert len(losses) == STEPS and np.all(np.isfinite(losses)), losses


def test_only_sizes_are_overridden():
  """The overrides are sizes: each pair keeps its config's and its method's training
  settings (e.g. Reptile's own inner loop, the 20-way configs' 5 inner steps)."""
  cfg = configs.get_config("omniglot-20w1s", method="reptile", **TINY)
  assert (cfg.ways, cfg.shots, cfg.inner_steps, cfg.inner_optimizer, cfg.alpha) == (
    20,
    1,
    5,
    "adam",
    1e-3,
  )
  cfg = configs.get_config("omniglot-20w1s", method="maml", **TINY)
  assert (cfg.inner_steps, cfg.inner_optimizer, cfg.alpha) == (5, "sgd", 0.1)
