"""Conv4 and its layers: both conv forms agree (values, gradients, second order), the
vmapped per-task model equals a loop over tasks, batch norm uses batch statistics,
shapes and errors."""

import importlib.util
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import slow_except

import amaml
from amaml.models import Conv4
from amaml.models import layers


def _maml_task_loss(model, alpha=0.4):
  """Query cross-entropy after one inner SGD step (amaml's own adapt and loss)."""
  import amaml

  loss_fn = amaml.losses.cross_entropy(lambda p, x: model.apply({"params": p}, x))

  def task_loss(p, xs, ys, xq, yq):
    adapted, _ = amaml.adapt(loss_fn, p, alpha, xs, ys, inner_steps=1)
    return loss_fn(adapted, xq, yq)[0]

  return task_loss


def _conv_args(key, n=3, h=6, w=5, c=4, o=7, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(key, 3)
  return (
    jax.random.normal(k1, (n, h, w, c), dtype),
    jax.random.normal(k2, (3, 3, c, o), dtype) * 0.3,
    jax.random.normal(k3, (o,), dtype),
  )


def _conv_losses(x, k, b):
  """A scalar function of each conv form, its gradient, and a function of that gradient."""
  r = jnp.cos(jnp.arange(x.shape[0] * x.shape[1] * x.shape[2] * k.shape[3], dtype=x.dtype)).reshape(
    x.shape[:3] + (k.shape[3],)
  )
  out = {}
  for impl in ("matmul", "tasks", "xla"):
    f = lambda x, k, b, impl=impl: jnp.sum(jnp.tanh(layers.conv3x3(x, k, b, impl=impl)) * r)
    g = jax.grad(f, argnums=(0, 1, 2))
    # second order: the gradient of a function of the gradient (what MAML's meta-gradient is)
    h = jax.grad(lambda x, k, b: f(x, k - 0.1 * g(x, k, b)[1], b), argnums=(0, 1, 2))
    out[impl] = (layers.conv3x3(x, k, b, impl=impl), g(x, k, b), h(x, k, b))
  return out


def _assert_trees_close(a, b, rtol, atol):
  chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


def test_matmul_conv_equals_lax_conv_float32():
  out = _conv_losses(*_conv_args(jax.random.key(0)))
  _assert_trees_close(out["matmul"], out["xla"], rtol=1e-4, atol=1e-4)
  _assert_trees_close(out["tasks"], out["xla"], rtol=1e-5, atol=1e-5)


def test_matmul_conv_equals_lax_conv_float64(x64):
  out = _conv_losses(*_conv_args(jax.random.key(1), dtype=jnp.float64))
  _assert_trees_close(out["matmul"], out["xla"], rtol=1e-11, atol=1e-11)
  _assert_trees_close(out["tasks"], out["xla"], rtol=1e-11, atol=1e-11)


def _tasks_meta_gradient(impl, k, xs, ks):
  """A MAML-shaped function of the conv: per task, one inner step on a shared kernel
  (``k``), then a loss of the adapted kernel plus a per-task kernel (``ks``), vmapped over
  tasks (``xs``); its gradient with respect to ``k`` and ``ks`` (second order), and the same
  under a second ``vmap`` (as over seeds)."""
  conv = lambda x, kk: layers.conv3x3(x, kk, impl=impl)

  def task(k, x, kt):
    inner = lambda kk: jnp.sum(jnp.tanh(conv(x, kk)) ** 2)
    adapted = k - 0.1 * jax.grad(inner)(k)
    return jnp.sum(jnp.sin(conv(x, adapted))) + jnp.sum(jnp.cos(conv(x, adapted + kt)))

  meta = lambda k, ks: jnp.mean(jax.vmap(task, (None, 0, 0))(k, xs, ks))
  grad = jax.grad(meta, argnums=(0, 1))
  seeds = jax.vmap(grad, (0, None))(jnp.stack([k, 0.5 * k]), ks)
  return jax.jit(grad)(k, ks), seeds


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.float64, 1e-10)])
def test_tasks_conv_meta_gradient_equals_reference(dtype, tol, channels):
  """``impl="tasks"`` (an ordinary convolution per task; the sum of its taps for an input of
  one channel) gives the second-order gradient of the reference forms under ``vmap`` with
  shared and per-task kernels and a nested ``vmap``."""
  with jax.enable_x64(dtype == jnp.float64):
    x, k, _ = _conv_args(jax.random.key(15), n=6, h=5, w=4, c=channels, o=4, dtype=dtype)
    xs = jnp.stack([x[:3], x[3:]])
    ks = 0.3 * jax.random.normal(jax.random.key(16), (2,) + k.shape, dtype)
    ref = _tasks_meta_gradient("xla", k, xs, ks)
    for impl in ("tasks", "matmul"):
      for a, b in zip(jax.tree.leaves(_tasks_meta_gradient(impl, k, xs, ks)), jax.tree.leaves(ref)):
        # relative to the leaf's largest entry: float32 rounds its entries up to ~20 at 1e-6
        assert float(jnp.max(jnp.abs(a - b))) <= tol * float(jnp.max(jnp.abs(b))), impl


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.float64, 1e-10)])
def test_tasks_conv_kernel_gradient_as_matmul_equals_reference(monkeypatch, dtype, tol):
  """The kernel gradient as the product of patches and ``dy`` (what ``"tasks"`` computes
  over many pixels, forced here at every size) gives the same second-order gradient."""
  monkeypatch.setattr(layers, "KERNEL_GRAD_MATMUL_PIXELS", 0)
  monkeypatch.setattr(layers, "KERNEL_GRAD_MATMUL_CHANNELS", 64)
  with jax.enable_x64(dtype == jnp.float64):
    x, k, _ = _conv_args(jax.random.key(17), n=6, h=5, w=4, c=3, o=4, dtype=dtype)
    xs = jnp.stack([x[:3], x[3:]])
    ks = 0.3 * jax.random.normal(jax.random.key(18), (2,) + k.shape, dtype)
    got, ref = _tasks_meta_gradient("tasks", k, xs, ks), _tasks_meta_gradient("xla", k, xs, ks)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
      assert float(jnp.max(jnp.abs(a - b))) <= tol * float(jnp.max(jnp.abs(b)))
    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(layers.conv3x3(x, k, impl="tasks") ** 2), 1))
    assert " dot(" in grad.lower(x, k).compile().as_text()  # the kernel gradient is the product


@pytest.mark.parametrize("channels, product", [(1, True), (16, False)])
def test_tasks_conv_kernel_gradient_is_a_product_only_over_few_channels(channels, product):
  """Over many pixels (here 200 x 8 x 8) the kernel gradient is the product of patches and
  ``dy`` for an input of few channels, a convolution for one of many."""
  x = jnp.ones((200, 8, 8, channels))
  k = jnp.ones((3, 3, channels, 4))
  grad = jax.jit(jax.grad(lambda x, k: jnp.sum(layers.conv3x3(x, k, impl="tasks") ** 2), 1))
  hlo = grad.lower(x, k).compile().as_text()
  assert (" dot(" in hlo) == product


def test_tasks_conv_runs_one_convolution_per_task():
  """Per-task kernels: a loop of ungrouped convolutions (no ``feature_group_count``, which
  XLA:CPU runs slowly), every operand in NHWC / HWIO layout."""
  xs = jnp.ones((4, 2, 6, 6, 3))
  ks = jnp.ones((4, 3, 3, 3, 5))
  loss = lambda x, k: jnp.sum(layers.conv3x3(x, k, impl="tasks") ** 2)
  step = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))
  hlo = step.lower(xs, ks).compile().as_text()  # printed only when not 1
  assert "feature_group_count" not in hlo and "batch_group_count" not in hlo
  assert "while" in hlo and hlo.count("convolution(") >= 3
  convs = [line for line in hlo.splitlines() if " convolution(" in line]
  assert convs and all("dim_labels=b01f_01io->b01f" in line for line in convs)


def test_one_channel_tasks_conv_is_its_taps_with_no_loop():
  """Per-task kernels on an input of one channel (Omniglot's first layer): the forward is
  the sum of the 9 taps, one fusion, with no loop over tasks (whose output XLA:CPU first
  fills with zeros) and no convolution; values: ``test_tasks_conv_meta_gradient_equals_
  reference``."""
  xs = jnp.ones((4, 2, 6, 6, 1))
  ks = jnp.ones((4, 3, 3, 1, 5))
  conv = lambda x, k: layers.conv3x3(x, k, impl="tasks")
  forward = jax.jit(jax.vmap(conv)).lower(xs, ks).compile().as_text()
  assert " while(" not in forward and " convolution(" not in forward


def test_tasks_conv_under_two_vmaps_is_one_loop():
  """Per-task kernels under a second ``vmap`` (seeds over tasks): the forward convolution
  and each of its two gradients is one loop over every (seed, task) pair, not a loop over
  seeds nested in a loop over tasks (which also moves each stacked operand's axes); values
  under the nested ``vmap``: ``test_tasks_conv_meta_gradient_equals_reference``."""
  xs = jnp.ones((2, 3, 2, 6, 6, 3))
  ks = jnp.ones((2, 3, 3, 3, 3, 5))
  conv = lambda x, k: layers.conv3x3(x, k, impl="tasks")
  loss = lambda x, k: jnp.sum(conv(x, k) ** 2)
  forward = jax.jit(jax.vmap(jax.vmap(conv))).lower(xs, ks).compile().as_text()
  grads = jax.jit(jax.vmap(jax.vmap(jax.grad(loss, (0, 1))))).lower(xs, ks).compile().as_text()
  assert forward.count(" while(") == 1
  assert grads.count(" while(") == 3 and grads.count(" convolution(") == 3


def test_matmul_conv_is_a_real_convolution():
  """Against a direct numpy loop (so both forms cannot be wrong the same way)."""
  x, k, b = _conv_args(jax.random.key(2), n=2, h=4, w=3, c=2, o=3)
  xn, kn, bn = (np.asarray(a, np.float64) for a in (x, k, b))
  xp = np.pad(xn, ((0, 0), (1, 1), (1, 1), (0, 0)))
  ref = np.zeros((2, 4, 3, 3))
  for r in range(4):
    for s in range(3):
      ref[:, r, s] = np.einsum("nijc,ijco->no", xp[:, r : r + 3, s : s + 3], kn) + bn
  np.testing.assert_allclose(
    np.asarray(layers.conv3x3(x, k, b, impl="matmul")), ref, rtol=1e-5, atol=1e-5
  )


def test_max_pool_matches_reduce_window_odd_and_even():
  for h, w in ((6, 4), (7, 5), (3, 3), (2, 2)):
    x = jax.random.normal(jax.random.key(h * 10 + w), (2, h, w, 3))
    ref = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    np.testing.assert_array_equal(np.asarray(layers.max_pool_2x2(x)), np.asarray(ref))
    g = jax.grad(lambda x: jnp.sum(layers.max_pool_2x2(x) ** 2))(x)
    g_ref = jax.grad(
      lambda x: jnp.sum(
        jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") ** 2
      )
    )(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-6)


@pytest.mark.parametrize("shape", [(3, 6, 8, 2), (2, 7, 5, 3)])
def test_max_pool_own_vjp_equals_jax_derivative_on_ties(x64, shape):
  """The CPU's pool (its own VJP) against JAX's derivative of the two maxima (``impl="xla"``)
  on inputs full of ties (integers times a per-channel weight): values, gradients, the
  gradient of a function of the gradient (MAML's second order), under ``vmap`` too."""
  rng = np.random.default_rng(sum(shape))
  inputs = jnp.asarray(rng.integers(-2, 3, size=shape), jnp.float64)
  w = jnp.asarray(rng.normal(size=shape[-1]))
  out = jnp.asarray(rng.normal(size=(shape[0], shape[1] // 2, shape[2] // 2, shape[3])))

  def derivatives(impl, inputs):
    f = lambda w: jnp.sum(jnp.sin(layers.max_pool_2x2(jax.nn.relu(inputs * w), impl=impl) * out))
    second = lambda w: jnp.sum(jnp.cos(w) * jax.grad(f)(w) ** 2)
    x = inputs * w
    pooled, pull = jax.vjp(lambda x: layers.max_pool_2x2(x, impl=impl), x)
    return pooled, pull(out)[0], jax.grad(f)(w), jax.grad(second)(w)

  ties = int(jnp.sum(inputs[:, 0:-1:2] == inputs[:, 1::2]))
  assert ties > 10  # the tie rule is exercised
  own = derivatives("tasks", inputs)
  for a, b in zip(own, derivatives("xla", inputs)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
  assert float(jnp.max(jnp.abs(own[3]))) > 1e-3  # the second order is not trivially zero
  stacked = jnp.stack([inputs, -inputs, 2 * inputs])
  batched = jax.vmap(lambda i: derivatives("tasks", i))(stacked)
  for t in range(3):
    for a, b in zip(batched, derivatives("xla", stacked[t])):
      np.testing.assert_allclose(np.asarray(a[t]), np.asarray(b), rtol=1e-12, atol=1e-12)


def test_max_pool_keeps_forward_mode_with_xla_convolutions():
  x = jax.random.normal(jax.random.key(5), (2, 4, 6, 3))
  v = jax.random.normal(jax.random.key(6), x.shape)
  _, tangent = jax.jvp(lambda x: layers.max_pool_2x2(x, impl="xla"), (x,), (v,))
  want = jax.vjp(lambda x: layers.max_pool_2x2(x, impl="xla"), x)[1]
  # the pool is linear in its input locally: <J v, u> == <v, J^T u>
  u = jax.random.normal(jax.random.key(7), tangent.shape)
  np.testing.assert_allclose(float(jnp.vdot(tangent, u)), float(jnp.vdot(v, want(u)[0])), rtol=1e-5)


def test_batch_norm_uses_batch_statistics():
  x = 3.0 + 2.5 * jax.random.normal(jax.random.key(3), (8, 5, 5, 6))
  y = layers.batch_norm(x, jnp.ones(6), jnp.zeros(6))
  np.testing.assert_allclose(np.asarray(jnp.mean(y, (0, 1, 2))), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(jnp.var(y, (0, 1, 2))), 1.0, atol=1e-3)
  # scale and shift apply after normalisation
  y2 = layers.batch_norm(x, jnp.full(6, 2.0), jnp.full(6, 0.5))
  np.testing.assert_allclose(np.asarray(jnp.mean(y2, (0, 1, 2))), 0.5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(jnp.std(y2, (0, 1, 2))), 2.0, atol=1e-3)


@pytest.mark.parametrize("impl", ["tasks", "xla"])
def test_batch_norm_equals_the_centred_form_to_second_order(x64, impl):
  """``x * a + b`` is ``(x - mean) * scale / sqrt(var + eps) + shift``: values, gradients
  and Hessian-vector products in float64 (MAML differentiates batch norm twice), with the
  CPU's own VJP (``"tasks"``) and with JAX's derivative (``"xla"``, forward mode too), also
  under ``vmap``."""
  keys = jax.random.split(jax.random.key(4), 5)
  x = 3.0 + 2.5 * jax.random.normal(keys[0], (2, 4, 4, 3), jnp.float64)
  scale, shift = 1.0 + jax.random.normal(keys[1], (3,)), jax.random.normal(keys[2], (3,))
  w, v = (jax.random.normal(k, x.shape, jnp.float64) for k in keys[3:])

  def centred(x, scale, shift, eps=1e-5):
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean((x - mean) ** 2, axis=(0, 1, 2))
    return (x - mean) / jnp.sqrt(var + eps) * scale + shift

  def derivatives(bn, x):
    loss = lambda x, s, b: jnp.sum(w * jnp.tanh(bn(x, s, b)))
    grads = jax.grad(loss, (0, 1, 2))(x, scale, shift)
    # reverse over reverse: the Hessian of the loss in (x, scale) times (v, 1)
    hvp = jax.grad(
      lambda x, s: (
        jnp.vdot(jax.grad(loss, (0, 1))(x, s, shift)[0], v)
        + jnp.sum(jax.grad(loss, 1)(x, s, shift))
      ),
      (0, 1),
    )(x, scale)
    return (loss(x, scale, shift), *grads, *hvp)

  bn = lambda x, s, b: layers.batch_norm(x, s, b, impl=impl)
  for a, b in zip(derivatives(bn, x), derivatives(centred, x)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-10)
  stacked = jnp.stack([x, 2.0 * x - 1.0])
  batched = jax.vmap(lambda x: derivatives(bn, x))(stacked)
  for a, b in zip(batched, derivatives(centred, stacked[1])):
    np.testing.assert_allclose(np.asarray(a[1]), np.asarray(b), rtol=1e-10, atol=1e-10)
  if impl == "xla":  # forward over reverse
    hvp = jax.jvp(jax.grad(lambda x: jnp.sum(w * bn(x, scale, shift))), (x,), (v,))[1]
    want = jax.jvp(jax.grad(lambda x: jnp.sum(w * centred(x, scale, shift))), (x,), (v,))[1]
    np.testing.assert_allclose(np.asarray(hvp), np.asarray(want), rtol=1e-10, atol=1e-10)


def test_conv4_is_transductive():
  """Batch statistics: an image's logits depend on the rest of its batch."""
  model = Conv4(5, hidden=8)
  x = jax.random.uniform(jax.random.key(4), (4, 28, 28, 1))
  params = jax.jit(model.init)(jax.random.key(5), x)["params"]
  apply = jax.jit(lambda x: model.apply({"params": params}, x))
  a = apply(x)
  b = apply(x.at[1:].set(jnp.flip(x[1:], axis=2)))
  assert not np.allclose(np.asarray(a[0]), np.asarray(b[0]), atol=1e-4)


def test_conv4_params_and_init():
  model = Conv4(5)
  params = jax.jit(model.init)(jax.random.key(6), jnp.zeros((1, 28, 28, 1)))["params"]
  assert params["conv0"]["kernel"].shape == (3, 3, 1, 64)
  assert params["conv3"]["kernel"].shape == (3, 3, 64, 64)
  assert params["head"]["kernel"].shape == (64, 5)
  np.testing.assert_array_equal(np.asarray(params["norm2"]["scale"]), 1.0)
  np.testing.assert_array_equal(np.asarray(params["norm2"]["bias"]), 0.0)
  bound = 1.0 / np.sqrt(9 * 64)  # PyTorch-like U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  k = np.asarray(params["conv1"]["kernel"])
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound


def test_conv4_biases_change_nothing_and_get_no_gradient():
  """The conv biases are parameters that the blocks do not add (batch norm would subtract
  them again): any bias gives the output of the network with the bias added before every
  batch norm, and their gradient is exactly 0 while every other tensor's is not."""
  model = Conv4(5, hidden=8)
  x = jax.random.uniform(jax.random.key(9), (6, 28, 28, 1))
  params = model.init(jax.random.key(10), x)["params"]
  params = {**params, "conv1": {**params["conv1"], "bias": jnp.full((8,), 3.0)}}

  def with_biases_added(p, x):
    for b in range(4):
      x = layers.conv3x3(x, p[f"conv{b}"]["kernel"], p[f"conv{b}"]["bias"], impl="xla")
      x = layers.batch_norm(x, p[f"norm{b}"]["scale"], p[f"norm{b}"]["bias"])
      x = layers.max_pool_2x2(jax.nn.relu(x))
    return x.reshape(x.shape[0], -1) @ p["head"]["kernel"] + p["head"]["bias"]

  out = model.apply({"params": params}, x)
  np.testing.assert_allclose(out, with_biases_added(params, x), rtol=1e-4, atol=1e-4)
  loss = lambda p: jnp.sum(jnp.square(model.apply({"params": p}, x)))
  grads = jax.grad(loss)(params)
  for name, leaves in grads.items():
    for leaf, g in leaves.items():
      zero = name.startswith("conv") and leaf == "bias"
      assert (float(jnp.max(jnp.abs(g))) == 0.0) == zero, (name, leaf)


def test_conv4_shapes_omniglot_and_miniimagenet():
  # shapes only: jax.eval_shape traces without computing
  model = Conv4(20)
  x = jnp.zeros((3, 28, 28, 1))
  params = jax.eval_shape(model.init, jax.random.key(7), x)["params"]
  assert jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, x).shape == (3, 20)
  mini = Conv4(5, hidden=32)
  x = jnp.zeros((2, 84, 84, 3))
  params = jax.eval_shape(mini.init, jax.random.key(8), x)["params"]
  assert params["conv0"]["kernel"].shape == (3, 3, 3, 32)
  assert params["head"]["kernel"].shape == (5 * 5 * 32, 5)
  assert jax.eval_shape(lambda p, x: mini.apply({"params": p}, x), params, x).shape == (2, 5)


def test_conv4_impls_agree():
  x = jax.random.uniform(jax.random.key(9), (6, 28, 28, 1))
  m = Conv4(5, hidden=8, conv_impl="matmul")
  params = jax.jit(m.init)(jax.random.key(10), x)["params"]
  a = m.apply({"params": params}, x)
  b = Conv4(5, hidden=8, conv_impl="xla").apply({"params": params}, x)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
  if jax.default_backend() == "cpu":
    assert layers.resolve_conv_impl("auto") == "tasks"


def test_conv4_bad_inputs_give_clear_errors():
  model = Conv4(5, hidden=8)
  params = model.init(jax.random.key(11), jnp.zeros((1, 28, 28, 1)))["params"]
  apply = lambda x: model.apply({"params": params}, x)
  with pytest.raises(ValueError, match="NHWC"):
    apply(jnp.zeros((28, 28, 1)))
  with pytest.raises(ValueError, match="input channel"):
    apply(jnp.zeros((2, 28, 28, 3)))
  with pytest.raises(ValueError, match="at least 16x16"):
    apply(jnp.zeros((2, 8, 8, 1)))
  with pytest.raises(ValueError, match="conv_impl"):
    Conv4(5, conv_impl="cudnn").init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


def _maml_setup(num_tasks=3, n_support=4, n_query=6, hidden=8, conv_impl="auto"):
  model = Conv4(3, hidden=hidden, conv_impl=conv_impl)
  key = jax.random.key(12)
  ks = jax.random.split(key, 5)
  xs = jax.random.uniform(ks[0], (num_tasks, n_support, 28, 28, 1))
  xq = jax.random.uniform(ks[1], (num_tasks, n_query, 28, 28, 1))
  ys = jax.random.randint(ks[2], (num_tasks, n_support), 0, 3)
  yq = jax.random.randint(ks[3], (num_tasks, n_query), 0, 3)
  params = model.init(ks[4], xs[0])["params"]

  task_loss = _maml_task_loss(model)

  return model, params, (xs, ys, xq, yq), task_loss


def test_vmap_over_per_task_params_equals_loop():
  model, params, (xs, ys, xq, yq), _ = _maml_setup()
  # per-task parameters (as after adaptation): a stacked pytree
  keys = jax.random.split(jax.random.key(13), xs.shape[0])
  stacked = jax.jit(jax.vmap(lambda k: model.init(k, xs[0])["params"]))(keys)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  out = jax.jit(jax.vmap(apply))(stacked, xq)
  for t in range(xs.shape[0]):
    p_t = jax.tree.map(lambda a: a[t], stacked)
    np.testing.assert_allclose(
      np.asarray(out[t]), np.asarray(apply(p_t, xq[t])), rtol=1e-5, atol=1e-5
    )


# the CPU's default form by default; matmul (its meta-gradient is checked above) with -m slow
@pytest.mark.parametrize("conv_impl", slow_except(["matmul", "tasks"], {"tasks"}))
def test_second_order_meta_gradient_vmap_equals_loop(conv_impl):
  """The MAML meta-gradient (grad through an inner grad step), jitted and vmapped over
  tasks, equals the mean of per-task gradients computed one task at a time (the
  property XLA:CPU broke for a reshape-and-reduce max-pool: see layers.max_pool_2x2)."""
  _, params, (xs, ys, xq, yq), task_loss = _maml_setup(conv_impl=conv_impl)
  meta = lambda p: jnp.mean(jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(p, xs, ys, xq, yq))
  g_vmap = jax.jit(jax.grad(meta))(params)
  one = jax.jit(jax.grad(task_loss))
  g_loop = [one(params, xs[t], ys[t], xq[t], yq[t]) for t in range(xs.shape[0])]
  g_loop = jax.tree.map(lambda *a: sum(a) / len(a), *g_loop)
  # one scale for all leaves: the conv-bias gradients are 0 (Conv4 does not add the biases)
  scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(g_loop))
  for a, b in zip(jax.tree.leaves(g_vmap), jax.tree.leaves(g_loop)):
    np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, atol=2e-5)


def test_conv4_meta_step_one_task_at_a_time_equals_all_at_once():
  """Conv4 on the CPU's forms (the taps, per-task convolutions, batch norm's and the pool's
  own VJPs), one task at a time (``tasks_at_once=1``: every layer unbatched, each task's
  gradient inside a loop), gives the vmapped meta loss and meta-gradient (float64)."""
  model, params, (xs, ys, xq, yq), _ = _maml_setup(num_tasks=2, hidden=4)
  loss_fn = amaml.losses.cross_entropy(lambda p, x: model.apply({"params": p}, x))
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    as64 = lambda a: jnp.asarray(a, jnp.float64)
    batch = amaml.TaskBatch(as64(xs), ys, as64(xq), yq)
    got = []
    for k in (0, 1):
      meta_loss = amaml.maml(loss_fn, alpha=0.4, tasks_at_once=k).meta_loss
      got.append(jax.jit(jax.value_and_grad(meta_loss, has_aux=True))(params, 0.4, batch))
  chex.assert_trees_all_close(got[1], got[0], rtol=1e-9, atol=1e-12)


def _load_peers_bridge():
  path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "_peers.py")
  spec = importlib.util.spec_from_file_location("_amaml_bench_peers", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_matches_peer_reference_forward_from_shared_init():
  peers = _load_peers_bridge()
  if not peers.peers_available():
    pytest.skip("shared/peers not found")
  common = peers.peers_common()
  torch_layout = common.init_params(0, 5)
  params = peers.conv4_params_from_torch(torch_layout)
  x = jax.random.uniform(jax.random.key(14), (7, 28, 28, 1))
  ours = Conv4(5).apply({"params": params}, x)
  # the same network written directly in numpy-free jax.lax, as in the peers' reference
  p = {k: jnp.asarray(v) for k, v in torch_layout.items()}
  h = x
  for b in range(4):
    h = (
      jax.lax.conv_general_dilated(
        h,
        jnp.transpose(p[f"conv{b}.weight"], (2, 3, 1, 0)),
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )
      + p[f"conv{b}.bias"]
    )
    m = jnp.mean(h, (0, 1, 2))
    v = jnp.mean(jnp.square(h - m), (0, 1, 2))
    h = (h - m) * jax.lax.rsqrt(v + 1e-5) * p[f"bn{b}.weight"] + p[f"bn{b}.bias"]
    h = jax.lax.reduce_window(
      jax.nn.relu(h), -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
    )
  ref = h.reshape(7, -1) @ p["fc.weight"].T + p["fc.bias"]
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_second_order_meta_gradient_vmap_equals_loop_on_omniglot():
  """As above, on two real Omniglot 5-way 1-shot tasks (15 queries per class) from the
  peers' episode sampler (many exactly equal activations: ties in the max-pool),
  full-width Conv4 from the peers' weights."""
  peers = _load_peers_bridge()
  if not peers.peers_available():
    pytest.skip("shared/peers (Omniglot episodes) not found")
  common = peers.peers_common()
  try:
    xs, ys, xq, yq = common.make_pool(common.CONFIGS["omniglot-5w1s"], 0, 1)[0]
  except (OSError, ImportError) as e:  # no Omniglot data here
    pytest.skip(f"Omniglot data unavailable: {e}")
  xs, xq = jnp.asarray(xs[:2, ..., None]), jnp.asarray(xq[:2, ..., None])
  ys, yq = jnp.asarray(ys[:2].astype(np.int32)), jnp.asarray(yq[:2].astype(np.int32))
  model = Conv4(5)
  params = peers.conv4_params_from_torch(common.init_params(0, 5))

  task_loss = _maml_task_loss(model)

  meta = lambda p: jnp.mean(jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(p, xs, ys, xq, yq))
  g_vmap = jax.jit(jax.grad(meta))(params)
  one = jax.jit(jax.grad(task_loss))
  g_loop = jax.tree.map(
    lambda a, b: (a + b) / 2,
    one(params, xs[0], ys[0], xq[0], yq[0]),
    one(params, xs[1], ys[1], xq[1], yq[1]),
  )
  for a, b in zip(jax.tree.leaves(g_vmap), jax.tree.leaves(g_loop)):
    if float(jnp.max(jnp.abs(b))) > 1e-4:  # conv biases: 0 (Conv4 does not add them)
      # float32 ties: 3.5e-4 apart with conv_impl="tasks", whose vmapped meta-gradient is
      # 1.1e-6 from float64 on these tasks (docs/design.md); the miscompile was 4-9%
      assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 1e-3
