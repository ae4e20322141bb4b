"""The inner loop and its hypergradient d L_query / d alpha, against closed forms and
finite differences in float64."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amaml
from amaml import inner


def _problem(seed=0, n_support=6, n_query=8):
  """A small smooth (tanh) MLP regression task, float64."""
  k = jax.random.split(jax.random.key(seed), 6)
  params = {
    "w1": jax.random.normal(k[0], (2, 5)) * 0.7,
    "b1": jax.random.normal(k[1], (5,)) * 0.1,
    "w2": jax.random.normal(k[2], (5, 1)) * 0.7,
    "b2": jnp.zeros((1,)),
  }

  def loss_fn(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2), {}

  xs = jax.random.normal(k[3], (n_support, 2))
  xq = jax.random.normal(k[4], (n_query, 2))
  f = lambda x: jnp.sin(x[:, :1]) + 0.5 * x[:, 1:]
  return loss_fn, params, xs, f(xs), xq, f(xq)


def _query_loss(loss_fn, params, alpha, xs, ys, xq, yq, inner_steps, first_order=False):
  adapted, _ = amaml.adapt(
    loss_fn, params, alpha, xs, ys, inner_steps=inner_steps, first_order=first_order
  )
  return loss_fn(adapted, xq, yq)[0]


def _rel(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def test_alpha_hypergradient_one_step_closed_form(x64):
  loss_fn, params, xs, ys, xq, yq = _problem()
  alpha = jnp.asarray(0.3)
  dalpha = jax.grad(_query_loss, argnums=2)(loss_fn, params, alpha, xs, ys, xq, yq, 1)
  g_support = jax.grad(lambda p: loss_fn(p, xs, ys)[0])(params)
  adapted = jax.tree.map(lambda p, g: p - alpha * g, params, g_support)
  g_query = jax.grad(lambda p: loss_fn(p, xq, yq)[0])(adapted)
  closed = -optax.tree_utils.tree_vdot(g_query, g_support)
  assert dalpha.dtype == jnp.float64
  assert abs(float(dalpha)) > 1e-4  # not trivially zero
  assert _rel(dalpha, closed) < 1e-6


@pytest.mark.parametrize("first_order", [False, True])
def test_alpha_hypergradient_three_steps_finite_differences(x64, first_order):
  loss_fn, params, xs, ys, xq, yq = _problem(seed=1)
  alpha, eps = 0.2, 1e-5
  f = lambda a: _query_loss(loss_fn, params, a, xs, ys, xq, yq, 3, first_order)
  dalpha = jax.grad(f)(jnp.asarray(alpha))
  fd = (f(jnp.asarray(alpha + eps)) - f(jnp.asarray(alpha - eps))) / (2 * eps)
  assert abs(float(dalpha)) > 1e-4
  if first_order:
    # the first-order graph stops the inner gradients: d/d alpha is no longer the
    # derivative of the true function after more than one step
    assert _rel(dalpha, fd) > 1e-3
  else:
    assert _rel(dalpha, fd) < 1e-6


def test_second_order_meta_gradient_finite_differences(x64):
  loss_fn, params, xs, ys, xq, yq = _problem(seed=2)
  f = lambda p: _query_loss(loss_fn, p, jnp.asarray(0.25), xs, ys, xq, yq, 2)
  g = jax.grad(f)(params)
  for i in range(3):
    v = jax.tree.map(lambda p, k=jax.random.key(10 + i): jax.random.normal(k, p.shape), params)
    eps = 1e-5
    plus = f(jax.tree.map(lambda p, d: p + eps * d, params, v))
    minus = f(jax.tree.map(lambda p, d: p - eps * d, params, v))
    fd = (plus - minus) / (2 * eps)
    directional = optax.tree_utils.tree_vdot(g, v)
    assert _rel(directional, fd) < 1e-6


def test_first_order_gradient_is_query_gradient_at_adapted_params(x64):
  loss_fn, params, xs, ys, xq, yq = _problem(seed=3)
  alpha = jnp.asarray(0.25)
  g_fo = jax.grad(lambda p: _query_loss(loss_fn, p, alpha, xs, ys, xq, yq, 2, True))(params)
  g_so = jax.grad(lambda p: _query_loss(loss_fn, p, alpha, xs, ys, xq, yq, 2, False))(params)
  adapted, _ = amaml.adapt(loss_fn, params, alpha, xs, ys, inner_steps=2)
  g_at_adapted = jax.grad(lambda p: loss_fn(p, xq, yq)[0])(adapted)
  chex.assert_trees_all_close(g_fo, g_at_adapted, rtol=1e-12, atol=1e-14)
  # the second-order gradient differs from the first-order one
  diff = max(_rel(a, b) for a, b in zip(jax.tree.leaves(g_so), jax.tree.leaves(g_fo)))
  assert diff > 1e-3


@pytest.mark.parametrize("granularity", ["tensor", "parameter"])
def test_per_parameter_alpha_hypergradients_finite_differences(x64, granularity):
  loss_fn, params, xs, ys, xq, yq = _problem(seed=4)
  alpha = amaml.init_alpha(params, 0.2, granularity)
  f = lambda a: _query_loss(loss_fn, params, a, xs, ys, xq, yq, 2)
  g = jax.grad(f)(alpha)
  leaves, treedef = jax.tree.flatten(alpha)
  g_leaves = jax.tree.leaves(g)
  eps = 1e-5
  rng = np.random.default_rng(0)
  checked = 0
  for i, leaf in enumerate(leaves):
    idx = tuple(int(rng.integers(s)) for s in leaf.shape)  # one entry per leaf

    def bump(d):
      new = list(leaves)
      new[i] = leaf.at[idx].add(d)
      return jax.tree.unflatten(treedef, new)

    fd = (f(bump(eps)) - f(bump(-eps))) / (2 * eps)
    if abs(float(fd)) > 1e-8:
      assert abs(float(g_leaves[i][idx]) - float(fd)) <= 1e-6 * abs(float(fd)) + 1e-10
      checked += 1
  assert checked >= 2
  # rates of different tensors get different hypergradients
  assert len({round(float(jnp.sum(x)), 8) for x in g_leaves}) > 1


def test_init_alpha_and_broadcast_errors():
  params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
  assert amaml.init_alpha(params, 0.5, "parameter")["w"].shape == (2, 3)
  with pytest.raises(ValueError, match="granularity"):
    amaml.init_alpha(params, 0.5, "layer")
  with pytest.raises(ValueError, match="structure of params"):
    inner.broadcast_alpha({"w": jnp.ones(())}, params)


def test_scan_rolled_unrolled_and_remat_agree():
  loss_fn, params, xs, ys, xq, yq = _problem(seed=5)
  outs = []
  for unroll, remat in [(True, False), (1, False), (1, True)]:
    f = lambda p: loss_fn(
      amaml.adapt(loss_fn, p, 0.1, xs, ys, inner_steps=4, unroll=unroll, remat=remat)[0], xq, yq
    )[0]
    outs.append(jax.grad(f)(params))
  for o in outs[1:]:
    chex.assert_trees_all_close(o, outs[0], rtol=1e-5, atol=1e-6)


def test_remat_bounds_the_memory_of_the_meta_gradient():
  """XLA's buffer assignment of the second-order meta-gradient: remat keeps the working
  memory from growing with every inner step (also when asked for an unrolled loop, which
  remat turns into a rolled one: unrolled, XLA would undo the rematerialisation)."""
  model = amaml.models.MLP(hidden=(256, 256))
  params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
  loss_fn = amaml.losses.mse(lambda p, x: model.apply({"params": p}, x))
  x = jnp.linspace(-1.0, 1.0, 1024)[:, None]
  y = jnp.sin(3 * x)

  def temp_mb(remat, unroll=True):
    f = lambda p: loss_fn(
      amaml.adapt(loss_fn, p, 0.01, x, y, inner_steps=12, unroll=unroll, remat=remat)[0], x, y
    )[0]
    mem = jax.jit(jax.grad(f)).lower(params).compile().memory_analysis()
    return mem.temp_size_in_bytes / 2**20

  plain, rolled = temp_mb(False), temp_mb(False, unroll=1)
  assert temp_mb(True) < 0.5 * min(plain, rolled), (temp_mb(True), plain, rolled)
