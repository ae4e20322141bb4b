"""Equinox models through amaml's ``loss_fn(params, x, y)``: ``eqx.partition`` into the float
arrays, ``eqx.combine`` in the apply function (``amaml.models.from_equinox``). An MLP on
sinusoid and a conv net with ``eqx.nn.BatchNorm`` (batch statistics, its state dropped) on
fake images: the loss falls, vmap over tasks equals a loop, ANIL's and MAML++'s regular
expressions find the attribute paths, and every method trains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import amaml
from amaml.data import sample_tasks
from amaml.models import layers
from conftest import fake_class_images

eqx = pytest.importorskip("equinox")

SIDE = 14  # fake Omniglot, at half size


class MLP(eqx.Module):
  body0: eqx.nn.Linear
  body1: eqx.nn.Linear
  head: eqx.nn.Linear

  def __init__(self, hidden, key):
    k0, k1, k2 = jax.random.split(key, 3)
    self.body0 = eqx.nn.Linear(1, hidden, key=k0)
    self.body1 = eqx.nn.Linear(hidden, hidden, key=k1)
    self.head = eqx.nn.Linear(hidden, 1, key=k2)

  def __call__(self, x):  # x: [n, 1]; Equinox layers take one example
    one = lambda v: self.head(jax.nn.relu(self.body1(jax.nn.relu(self.body0(v)))))
    return jax.vmap(one)(x)


class CNN(eqx.Module):
  """One block conv 3x3 -> batch norm (this batch's statistics) -> ReLU -> max-pool, then
  a linear head (``ways=0``: no head, the flattened features). Takes NHWC ``[n, H, W, 1]``
  and the batch norm's ``eqx.nn.State``."""

  conv0: eqx.nn.Conv2d
  norm0: eqx.nn.BatchNorm
  head: eqx.nn.Linear | None

  def __init__(self, ways, key, hidden=4):
    k0, k1 = jax.random.split(key)
    self.conv0 = eqx.nn.Conv2d(1, hidden, 3, padding=1, key=k0)
    self.norm0 = eqx.nn.BatchNorm(hidden, axis_name="examples", mode="batch")
    self.head = eqx.nn.Linear(hidden * (SIDE // 2) ** 2, ways, key=k1) if ways else None

  def __call__(self, x, state):
    def features(v, state):  # one CHW image; the batch norm averages over "examples"
      v, state = self.norm0(self.conv0(v), state)
      v = layers.max_pool_2x2(jax.nn.relu(v)[..., None])[..., 0]  # pools axes 1 and 2
      return v.reshape(-1), state

    z, state = jax.vmap(features, axis_name="examples", in_axes=(0, None), out_axes=(0, None))(
      jnp.moveaxis(x, -1, 1), state
    )
    return (z if self.head is None else jax.vmap(self.head)(z)), state


def _mlp():
  params, apply_fn = amaml.models.from_equinox(MLP(16, jax.random.key(0)))
  return params, amaml.losses.mse(apply_fn)


def _cnn(ways=5):
  model, state = eqx.nn.make_with_state(CNN)(ways, jax.random.key(0))
  return amaml.models.from_equinox(model, state)


IMAGES = jnp.asarray(fake_class_images(0, classes=10, size=SIDE))


def _images(seed, tasks=4):
  return sample_tasks(jax.random.key(seed), IMAGES, 5, 1, 2, tasks)


def _paths(tree):
  return [p for p, _ in amaml.inner._paths(tree)]


def test_from_equinox_is_partition_and_combine_with_the_state_left_out():
  model, state = eqx.nn.make_with_state(CNN)(5, jax.random.key(0))
  x = _images(0).support_x[0]
  params, apply_fn = amaml.models.from_equinox(model, state)
  np.testing.assert_allclose(apply_fn(params, x), model(x, state)[0], rtol=1e-6)
  assert _paths(params) == [
    "conv0/weight",
    "conv0/bias",
    "norm0/weight",
    "norm0/bias",
    "head/weight",
    "head/bias",
  ]
  head = amaml.inner.param_mask(params, "^head/")
  assert [p for p, m in amaml.inner._paths(head) if m] == ["head/weight", "head/bias"]
  assert sum(jax.tree.leaves(amaml.inner.param_mask(params, "^norm"))) == 2
  doubled = jax.tree.map(lambda v: 2 * v, params)
  assert not np.allclose(apply_fn(doubled, x), apply_fn(params, x))


def test_equinox_mlp_on_sinusoid_loss_falls():
  params, loss_fn = _mlp()
  learner = amaml.alpha_maml(loss_fn, beta=1e-2)  # the default's Adam, faster for 150 steps
  state, losses = learner.init(params), []
  for i in range(150):
    state, metrics = learner.step(state, amaml.sinusoid_tasks(jax.random.key(i), 8))
    losses.append(float(metrics["loss"]))
  assert isinstance(state.params, MLP)
  # below its start, and below the 4.2 of predicting 0 (E[A^2] / 2, A ~ U[0.1, 5])
  assert np.mean(losses[-20:]) < min(0.75 * np.mean(losses[:20]), 3.2)


def test_equinox_cnn_with_batch_norm_on_images_loss_falls():
  params, apply_fn = _cnn()
  learner = amaml.alpha_maml(amaml.losses.cross_entropy(apply_fn), alpha=0.4)
  state, losses = learner.init(params), []
  for i in range(40):
    state, metrics = learner.step(state, _images(i))
    losses.append(float(metrics["loss"]))
  # below its start, and below chance's log(5) = 1.61
  assert np.mean(losses[-10:]) < min(0.7 * np.mean(losses[:10]), 1.55)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_equinox_meta_loss_under_vmap_equals_a_loop(model):
  """Each task in its own call normalises with its own batch statistics, as under vmap."""
  if model == "mlp":
    (params, loss_fn), batch = _mlp(), amaml.sinusoid_tasks(jax.random.key(0), 4)
  else:
    (params, apply_fn), batch = _cnn(), _images(0)
    loss_fn = amaml.losses.cross_entropy(apply_fn)
  learner = amaml.maml(loss_fn, alpha=0.1, inner_steps=2)
  meta_loss = jax.jit(learner.meta_loss)
  loss, _ = meta_loss(params, jnp.float32(0.1), batch)
  one = lambda t: meta_loss(params, jnp.float32(0.1), jax.tree.map(lambda x: x[t : t + 1], batch))[
    0
  ]
  np.testing.assert_allclose(loss, np.mean([one(t) for t in range(4)]), rtol=1e-5)


def test_anil_on_equinox_adapts_only_the_head():
  params, loss_fn = _mlp()
  batch = amaml.sinusoid_tasks(jax.random.key(0), 2)
  mask = amaml.inner.param_mask(params, "^head/")
  adapted, _ = amaml.adapt(
    loss_fn, params, 0.1, batch.support_x[0], batch.support_y[0], inner_steps=2, mask=mask
  )
  for layer in ("body0", "body1"):
    np.testing.assert_array_equal(getattr(adapted, layer).weight, getattr(params, layer).weight)
  assert not np.allclose(adapted.head.weight, params.head.weight)


LEARNERS = {
  "alpha_maml": lambda f: amaml.alpha_maml(f, inner_steps=2),
  "alpha_maml_paper": lambda f: amaml.alpha_maml_paper(f, alpha=0.01),
  "maml": lambda f: amaml.maml(f, alpha=0.01),
  "fomaml": lambda f: amaml.fomaml(f, alpha=0.01),
  "meta_sgd": lambda f: amaml.meta_sgd(f),
  "anil": lambda f: amaml.anil(f, inner_params="^head/"),
  "reptile": lambda f: amaml.reptile(f, alpha=0.01, inner_steps=2, epsilon=0.1),
}


def _trains(learner, params, batches):
  state = learner.init(params)
  for batch in batches:
    state, metrics = learner.step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
  moved = jax.tree.map(
    lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params, learner.init(params).params
  )
  assert max(jax.tree.leaves(moved)) > 0
  return state


@pytest.mark.parametrize("method", sorted(LEARNERS))
def test_every_method_trains_an_equinox_mlp(method):
  params, loss_fn = _mlp()
  _trains(
    LEARNERS[method](loss_fn),
    params,
    [amaml.sinusoid_tasks(jax.random.key(i), 4) for i in range(3)],
  )


def test_maml_plus_plus_keeps_equinox_batch_norm_parameters_per_step():
  params, apply_fn = _cnn()
  learner = amaml.maml_plus_plus(
    amaml.losses.cross_entropy(apply_fn),
    inner_steps=2,
    multi_step_loss=0,
    first_order_steps=0,
    per_step_params="^norm",
  )
  state = _trains(learner, params, [_images(i) for i in range(3)])
  assert state.params.norm0.weight.shape == (2, 4)  # one copy per inner step
  assert state.params.conv0.weight.shape == params.conv0.weight.shape
  assert state.alpha.head.weight.shape == (2,)  # a rate per tensor and step


def test_protonet_with_an_equinox_embedding():
  params, embed = _cnn(ways=0)
  assert embed(params, _images(0).support_x[0]).shape == (5, 4 * (SIDE // 2) ** 2)
  _trains(amaml.protonet(embed, ways=5), params, [_images(i) for i in range(3)])
