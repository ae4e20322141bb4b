"""amaml.jit (``amaml.xla_options``): XLA:CPU compiles amaml's steps with its own convolutions
(not YNNPACK's), the values equal plain ``jax.jit``'s, and the backend is asked on first use."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import amaml
from amaml import xla_options
from amaml.models import Conv4

pytestmark = pytest.mark.skipif(
  jax.default_backend() != "cpu" or not xla_options.supported(),
  reason="XLA:CPU's YNNPACK option: CPU backend, a jax that has it",
)


def _ynn_convolutions(hlo: str) -> int:
  """How many of the compiled module's YNNPACK fusions hold a convolution."""
  bodies = dict(re.findall(r"\n%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S))
  called = re.findall(r'calls=%?([\w.\-]+)[^\n]*"kind":"__ynn_fusion"', hlo)
  return sum("convolution(" in bodies.get(name, "") for name in called)


@pytest.fixture(scope="module")
def tiny():
  """A tiny Alpha MAML learner on Conv4 (32 channels, about the least at which XLA:CPU gives
  YNNPACK a convolution), its state and a meta-batch of 16x16 images."""
  model = Conv4(num_classes=3, hidden=32, conv_impl="tasks")
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))["params"]
  loss_fn = amaml.losses.cross_entropy(lambda p, x: model.apply({"params": p}, x))
  learner = amaml.alpha_maml(loss_fn, alpha=0.1)
  k1, k2 = jax.random.split(jax.random.key(1))
  batch = amaml.TaskBatch(
    jax.random.uniform(k1, (2, 3, 16, 16, 1)),
    jnp.tile(jnp.arange(3), (2, 1)),
    jax.random.uniform(k2, (2, 6, 16, 16, 1)),
    jnp.tile(jnp.arange(3).repeat(2), (2, 1)),
  )
  return learner, learner.init(params), batch


def test_the_cpu_step_runs_xla_convolutions_not_ynnpack(tiny):
  learner, state, batch = tiny
  plain = jax.jit(learner.update).lower(state, batch).compile().as_text()
  if _ynn_convolutions(plain) == 0:
    pytest.skip("this XLA:CPU gives YNNPACK no convolutions by default")
  ours = learner.step.lower(state, batch).compile().as_text()
  assert _ynn_convolutions(ours) == 0
  assert re.search(r"= \S+ convolution\(", ours)  # XLA's own
  assert '"kind":"__ynn_fusion"' in ours  # YNNPACK keeps the products and reductions


def test_the_meta_gradient_equals_plain_jits(tiny):
  learner, state, batch = tiny
  grad = jax.grad(lambda p, a: learner.meta_loss(p, a, batch)[0], argnums=(0, 1))
  ours = xla_options.jit(grad)(state.params, state.alpha)
  plain = jax.jit(grad)(state.params, state.alpha)
  flat = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])
  for a, b in ((flat(ours[0]), flat(plain[0])), (flat(ours[1]), flat(plain[1]))):  # theta, alpha
    assert np.linalg.norm(b) > 0
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)  # float32 rounding, no new result


def test_jit_asks_the_backend_on_first_use(monkeypatch):
  def not_yet():
    raise AssertionError("compiler_options asked before the first call")

  monkeypatch.setattr(xla_options, "compiler_options", not_yet)
  f = xla_options.jit(lambda x: 2 * x)  # building it asks nothing
  with pytest.raises(AssertionError, match="before the first call"):
    f(1.0)
  monkeypatch.undo()
  f = xla_options.jit(lambda x: 2 * x, static_argnums=())
  assert float(f(1.5)) == 3.0
  assert float(f.lower(1.5).compile()(2.0)) == 4.0


def test_jit_inside_another_jit_or_vmap():
  """Compile options belong to the outermost ``jit``: nested, ``amaml.jit`` is a plain one."""
  f = xla_options.jit(lambda x: 2 * x, donate_argnums=(0,))
  assert float(jax.jit(lambda x: f(x) + 1)(1.5)) == 4.0
  np.testing.assert_array_equal(jax.vmap(f)(jnp.arange(3.0)), [0.0, 2.0, 4.0])
  assert float(xla_options.jit(lambda x: f(x) + 1)(1.5)) == 4.0
