"""ResNet-12: shapes, the published parameter count, the vmapped per-task model equals a
loop over tasks, every method steps with it, remat leaves the meta-gradient unchanged,
DropBlock is off unless asked for, and the command line selects it.

Everything runs at tiny widths on 16x16 images (``TINY``); the full network is only
traced (``jax.eval_shape``), never run. What costs time here is XLA compiling a
second-order meta step through 16 convolutions, so the tests of each method's wiring
(patterns, embedding, remat) use one block of the same kind (``SHALLOW``); the vmap test
and the slow run of every method use all four."""

import dataclasses
import functools
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import slow_except

import amaml
from amaml import configs, experiment
from amaml.models import ResNet12
from amaml.models.resnet12 import drop_block
from amaml.task import TaskBatch

TINY = (2, 3, 4, 5)  # block widths small enough to run in a blink
SHALLOW = (2,)  # one block: the same layers and parameter names, a quarter of the compile
# the fast run at one block, the slow one (pytest -m slow) at four
DEPTHS = [SHALLOW, pytest.param(TINY, marks=pytest.mark.slow)]
WAYS = 3
# inits draw with the RngBitGenerator (threefry's compile costs seconds per kernel)
KEY_IMPL = "unsafe_rbg"


def _apply(model):
  return lambda p, x: model.apply({"params": p}, x)


def _batch(tasks=2, shots=1, queries=2, side=16, channels=3, seed=0) -> TaskBatch:
  """Fake images: ``tasks`` WAYS-way tasks, labels 0..WAYS-1 in order."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  xs = jax.random.uniform(k1, (tasks, WAYS * shots, side, side, channels))
  xq = jax.random.uniform(k2, (tasks, WAYS * queries, side, side, channels))
  label = lambda n: jnp.tile(jnp.repeat(jnp.arange(WAYS), n)[None], (tasks, 1))
  return TaskBatch(xs, label(shots), xq, label(queries))


def _key(seed):
  return jax.random.key(seed, impl=KEY_IMPL)


def _init(model, x, seed=1):
  return jax.jit(model.init)(_key(seed), x)["params"]


@functools.lru_cache
def _tiny(num_classes=WAYS, channels=TINY):
  """A tiny ResNet-12 and its parameters for 16x16x3 images (built once per test run)."""
  model = ResNet12(num_classes, channels=channels)
  return model, _init(model, jnp.zeros((1, 16, 16, 3)))


def _num_params(tree) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _published_count(c_in: int, channels, num_classes: int) -> int:
  """ResNet-12's parameters from its layer shapes: per block three 3x3 convolutions and a
  1x1 shortcut (no biases), four batch norms (scale and shift), then the linear head."""
  total = 0
  for c in channels:
    total += 9 * c_in * c + 2 * 9 * c * c + c_in * c + 4 * 2 * c
    c_in = c
  return total + (c_in * num_classes + num_classes if num_classes else 0)


def test_output_shapes():
  model = ResNet12(5)
  for side, c in ((84, 3), (32, 3), (28, 1)):  # miniImageNet, CIFAR-FS, Omniglot
    x = jnp.zeros((4, side, side, c))
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert jax.eval_shape(_apply(model), params, x).shape == (4, 5)
    assert params["block0"]["conv0"]["kernel"].shape == (3, 3, c, 64)
    assert params["block3"]["conv2"]["kernel"].shape == (3, 3, 640, 640)
    assert params["block3"]["conv_shortcut"]["kernel"].shape == (1, 1, 320, 640)
    assert params["head"]["kernel"].shape == (640, 5)
  embed = ResNet12(0)
  params = jax.eval_shape(embed.init, jax.random.key(0), x)["params"]
  assert "head" not in params
  assert jax.eval_shape(_apply(embed), params, x).shape == (4, 640)
  # run (not only traced) at tiny widths: logits, and features of the last width
  x = _batch().query_x[0]
  tiny, params = _tiny()
  out = tiny.apply({"params": params}, x)
  assert out.shape == (WAYS * 2, WAYS) and bool(jnp.all(jnp.isfinite(out)))
  body = {k: v for k, v in params.items() if k != "head"}  # the same network without its head
  features = ResNet12(0, channels=TINY).apply({"params": body}, x)
  assert features.shape == (WAYS * 2, TINY[-1])


def test_parameter_count_is_the_published_one():
  model = ResNet12(5)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 84, 84, 3)))["params"]
  count = _num_params(params)
  assert count == _published_count(3, (64, 160, 320, 640), 5) == 12_427_525
  assert abs(count - 12.4e6) / 12.4e6 < 0.03  # "12.4M" (Lee et al. 2019 and later)
  # at any width and without the head too
  params = jax.eval_shape(
    ResNet12(0, channels=TINY).init, jax.random.key(0), jnp.zeros((1, 16, 16, 1))
  )["params"]
  assert _num_params(params) == _published_count(1, TINY, 0)


def test_batch_norm_is_transductive_and_initialised():
  """Batch statistics (as Conv4): an image's logits depend on the rest of its batch."""
  model, params = _tiny()
  x = _batch().query_x[0]
  np.testing.assert_array_equal(np.asarray(params["block1"]["norm2"]["scale"]), 1.0)
  np.testing.assert_array_equal(np.asarray(params["block1"]["norm_shortcut"]["bias"]), 0.0)
  a = model.apply({"params": params}, x)
  b = model.apply({"params": params}, x.at[1:].set(jnp.flip(x[1:], axis=2)))
  assert not np.allclose(np.asarray(a[0]), np.asarray(b[0]), atol=1e-4)


def _maml_task_loss(model, alpha=0.1):
  """Query cross-entropy after one inner SGD step (amaml's own adapt and loss)."""
  loss_fn = amaml.losses.cross_entropy(_apply(model))

  def task_loss(p, xs, ys, xq, yq):
    adapted, _ = amaml.adapt(loss_fn, p, alpha, xs, ys, inner_steps=1)
    return loss_fn(adapted, xq, yq)[0]

  return task_loss


@pytest.mark.parametrize("channels", DEPTHS)
def test_vmap_over_tasks_equals_loop(channels):
  """Per-task parameters and the second-order MAML meta-gradient: vmapped over 2 tasks
  equals a Python loop over them."""
  model = ResNet12(WAYS, channels=channels)
  batch = _batch()
  stacked = jax.vmap(lambda k: model.init(k, batch.query_x[0])["params"])(
    jax.random.split(_key(2), 2)
  )
  apply = jax.jit(_apply(model))
  out = jax.vmap(apply)(stacked, batch.query_x)
  for t in range(2):
    p_t = jax.tree.map(lambda a: a[t], stacked)
    np.testing.assert_allclose(
      np.asarray(out[t]), np.asarray(apply(p_t, batch.query_x[t])), rtol=1e-5, atol=1e-5
    )
  params = jax.tree.map(lambda a: a[0], stacked)
  task_loss = _maml_task_loss(model)
  meta = lambda p: jnp.mean(jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(p, *batch))
  g_vmap = jax.jit(jax.grad(meta))(params)
  one = jax.jit(jax.grad(task_loss))
  g_loop = jax.tree.map(
    lambda a, b: (a + b) / 2,
    one(params, *(f[0] for f in batch)),
    one(params, *(f[1] for f in batch)),
  )
  scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(g_loop))
  assert scale > 0
  for a, b in zip(jax.tree.leaves(g_vmap), jax.tree.leaves(g_loop)):
    np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, atol=2e-5)


def _config(**overrides) -> configs.Config:
  base = dict(
    task="omniglot",
    model="resnet12",
    ways=WAYS,
    shots=1,
    queries=2,
    meta_batch=2,
    inner_steps=1,
    alpha=0.01,
    image_size=16,
    track_pre_adaptation=False,
  )
  return dataclasses.replace(configs.Config(), **{**base, **overrides}).validate()


def _learner(cfg, channels=SHALLOW):
  """``cfg``'s learner (its default patterns: ANIL's head, MAML++'s batch norms) for a
  tiny ResNet-12, and the tiny network's initial parameters."""
  model = ResNet12(0 if cfg.method == "protonet" else cfg.ways, channels=channels)
  apply = _apply(model)
  params = _init(model, jnp.zeros((1, 16, 16, 3)))
  return experiment.make_learner(cfg, amaml.losses.cross_entropy(apply), apply), params


# the fast run steps second order through a block (maml) and the embedding (protonet); the
# patterns of anil and maml++ are checked without compiling a step
# (test_classification_setup_builds_resnet12), and the other methods differ from maml only
# in their rates and loops (tests/test_common.py): they step in the slow run
FAST_METHODS = ("maml", "protonet")


def _steps(method, channels):
  cfg = _config(method=method)
  learner, params = _learner(cfg, channels)
  state = learner.init(params)
  last = f"block{len(channels) - 1}"
  if method == "maml++":  # one copy of every batch-norm scale and shift per inner step
    assert state.params[last]["norm_shortcut"]["scale"].shape == (1, channels[-1])
    assert state.params[last]["norm1"]["bias"].shape == (1, channels[-1])
    assert state.params[last]["conv0"]["kernel"].shape[:2] == (3, 3)
    assert state.params["head"]["kernel"].shape == (channels[-1], WAYS)
  start = state.params
  for i in range(2):
    state, m = learner.step(state, _batch(seed=i))
    assert np.isfinite(float(m["loss"])) and not bool(m["nonfinite"]), (method, i, m)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), start, state.params)
  assert all(jax.tree.leaves(changed["head" if method != "protonet" else last]))
  if method == "anil":  # the default pattern adapts the head alone: the body still learns
    assert changed["block0"]["conv0"]["kernel"]


@pytest.mark.parametrize(
  "method",
  slow_except(configs.METHODS, FAST_METHODS),
)
def test_every_method_takes_steps(method):
  _steps(method, SHALLOW)


@pytest.mark.slow
@pytest.mark.parametrize("method", configs.METHODS)
def test_every_method_takes_steps_four_blocks(method):
  _steps(method, TINY)


def test_remat_gives_the_same_meta_gradient():
  batch = _batch()
  grads = {}
  for remat in (False, True):
    learner, params = _learner(_config(method="maml", inner_steps=2, remat=remat))
    state = learner.init(params)
    grads[remat] = jax.jit(jax.grad(lambda p: learner.meta_loss(p, state.alpha, batch)[0]))(
      state.params
    )
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads[False])) > 0
  chex.assert_trees_all_close(grads[True], grads[False], rtol=1e-5, atol=1e-6)


def test_drop_block_is_off_unless_asked():
  x = _batch().query_x[0]
  plain, params = _tiny()
  ref = plain.apply({"params": params}, x)
  dropping = ResNet12(WAYS, channels=TINY, drop_rate=0.3)
  # deterministic by default: the same pure function as without DropBlock
  np.testing.assert_array_equal(np.asarray(dropping.apply({"params": params}, x)), np.asarray(ref))
  noisy = dropping.apply({"params": params}, x, deterministic=False, rngs={"dropout": _key(3)})
  assert not np.allclose(np.asarray(noisy), np.asarray(ref), atol=1e-4)


def test_drop_block_drops_square_blocks_and_rescales():
  ones = jnp.ones((8, 12, 12, 4))
  out = np.asarray(drop_block(_key(4), ones, 0.2, 3))
  dropped = out == 0
  assert 0.05 < dropped.mean() < 0.3
  np.testing.assert_allclose(out.sum(), ones.size, rtol=1e-5)  # the mean is kept
  # every dropped pixel lies in a dropped 3x3 square
  d = np.pad(dropped, ((0, 0), (2, 2), (2, 2), (0, 0)))
  in_square = np.zeros_like(dropped)
  for i in range(3):
    for j in range(3):
      square = np.ones_like(dropped)
      for a in range(3):
        for b in range(3):
          square &= d[:, 2 - i + a : 14 - i + a, 2 - j + b : 14 - j + b]
      in_square |= square
  assert (in_square == dropped).all()


def test_classification_setup_builds_resnet12(monkeypatch):
  """``--model resnet12`` through the training setup (the network cut to SHALLOW):
  a head of ``ways`` logits, none for protonet, per-step batch norms for maml++."""
  monkeypatch.setattr(amaml.models, "ResNet12", functools.partial(ResNet12, channels=SHALLOW))
  images = np.random.default_rng(0).integers(0, 256, (4, 3, 16, 16, 1), dtype=np.uint8)
  splits = {s: types.SimpleNamespace(images=images) for s in ("train", "val", "test")}
  for method in ("maml++", "protonet"):
    cfg = _config(method=method, queries=1)
    setup = experiment.classification_setup(cfg, _key(5), splits)
    assert setup.params["block0"]["norm0"]["scale"].shape == (SHALLOW[0],)
    assert ("head" in setup.params) == (method != "protonet")
    learner = experiment.make_learner(cfg, setup.loss_fn, setup.embed_fn)
    state = learner.init(setup.params)
    if method == "maml++":  # per-step copies of the batch norms, and of nothing else
      copied = jax.tree.map(lambda a, b: a.shape != b.shape, state.params, setup.params)
      paths = {
        "/".join(str(k.key) for k in kp): v
        for kp, v in jax.tree_util.tree_flatten_with_path(copied)[0]
      }
      assert paths == {p: "/norm" in p for p in paths}, paths
      assert state.params["block0"]["norm_shortcut"]["bias"].shape == (1, SHALLOW[0])
      # ANIL's default pattern adapts the head, and nothing else
      head = amaml.inner.param_mask(setup.params, experiment.HEADS[cfg.task])
      assert {p for p, v in zip(paths, jax.tree.leaves(head)) if v} == {"head/bias", "head/kernel"}
    batch = setup.sample(jax.random.key(6), setup.data["train"], 2)
    assert setup.embed_fn(setup.params, batch.query_x[0]).shape == (
      WAYS,
      SHALLOW[0] if method == "protonet" else WAYS,
    )


def test_model_flag_and_clear_errors():
  from amaml import cli

  args = cli._parser().parse_args(["train", "--config", "miniimagenet-5w1s", "--model", "resnet12"])
  assert args.model == "resnet12"
  assert experiment.image_model(_config(), 5) == ResNet12(5)
  assert isinstance(experiment.image_model(_config(model="conv4"), 5), amaml.models.Conv4)
  with pytest.raises(ValueError, match="--model resnet12 is for the image tasks"):
    configs.get_config("sinusoid", model="resnet12")
  with pytest.raises(ValueError, match="model='resnet50'"):
    configs.get_config("omniglot-5w1s", model="resnet50")
  model, params = _tiny()
  with pytest.raises(ValueError, match="NHWC"):
    model.apply({"params": params}, jnp.zeros((16, 16, 3)))
  with pytest.raises(ValueError, match="at least 16x16"):
    model.apply({"params": params}, jnp.zeros((2, 8, 8, 3)))
  with pytest.raises(ValueError, match="input channel"):
    model.apply({"params": params}, jnp.zeros((2, 16, 16, 1)))
  with pytest.raises(ValueError, match="positive block widths"):
    ResNet12(WAYS, channels=(4, 0)).init(_key(0), jnp.zeros((1, 16, 16, 3)))
