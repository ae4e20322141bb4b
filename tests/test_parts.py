"""The parts of the meta step, each alone and composed: the safeguards against hand-computed
states, the phases against a Python choice, the rate rules against hand-computed steps, and a
method built from parts against the preset that names it."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amaml
from amaml import inner_loop as il
from amaml import meta, rates, safeguards
from amaml.meta import MetaStep, meta_state


def _loss(p, x, y):
  return jnp.mean((x @ p["w"] + p["b"] - y) ** 2), {}


def _params():
  return {"w": jnp.array([[0.5], [-0.3]]), "b": jnp.array([0.1])}


def _batch(tasks=3, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  x = lambda i: jax.random.normal(k[i], (tasks, 6, 2))
  w = jnp.array([[1.0], [2.0]])
  sx, qx = x(0), x(1)
  return amaml.TaskBatch(sx, sx @ w, qx, qx @ w)


def _scripted(params_after, loss=1.0, pre_loss=None, support_loss=0.5):
  """A step that sets params, doubles alpha and reports the given losses."""

  def update(state, batch):
    new = state._replace(params=params_after, alpha=2 * state.alpha, step=state.step + 1)
    metrics = {"loss": jnp.float32(loss), "support_loss": jnp.float32(support_loss)}
    if pre_loss is not None:
      metrics["pre_loss"] = jnp.float32(pre_loss)
    return new, metrics

  return MetaStep(lambda p: meta_state(p, 0.1), update)


def test_skip_nonfinite_holds_the_state_and_counts_the_streak():
  bad = safeguards.skip_nonfinite(_scripted(jnp.array([1.0, jnp.nan])))
  state = bad.init(jnp.array([1.0, 2.0]))
  for streak in (1, 2):
    state, m = bad.update(state, None)
    np.testing.assert_array_equal(state.params, [1.0, 2.0])
    assert float(state.alpha) == pytest.approx(0.1) and int(state.step) == streak
    assert int(state.nonfinite_streak) == streak and bool(m["nonfinite"])
  good = safeguards.skip_nonfinite(_scripted(jnp.array([3.0, 4.0])))
  state, m = good.update(state, None)
  np.testing.assert_array_equal(state.params, [3.0, 4.0])
  assert float(state.alpha) == pytest.approx(0.2) and int(state.nonfinite_streak) == 0
  assert not bool(m["nonfinite"]) and int(state.step) == 3
  inf_loss = safeguards.skip_nonfinite(_scripted(jnp.array([3.0, 4.0]), loss=jnp.inf))
  assert bool(inf_loss.update(state, None)[1]["nonfinite"])


@pytest.mark.parametrize(
  "loss, pre_loss, support_loss, hurts",
  [
    (2.1, 1.0, 0.5, True),
    (1.9, 1.0, 0.5, False),
    (jnp.inf, 1.0, 0.5, True),
    (9.0, 1.0, jnp.nan, False),
  ],
)
def test_backtrack_halves_alpha_and_holds_the_rest_where_adaptation_doubles_the_loss(
  loss, pre_loss, support_loss, hurts
):
  step = safeguards.backtrack(
    _scripted(jnp.array([3.0]), loss, pre_loss, support_loss), alpha_max=0.04
  )
  state = step.init(jnp.array([1.0]))._replace(nonfinite_streak=jnp.int32(4))
  new, m = step.update(state, None)
  assert bool(m["backtracked"]) == hurts and int(new.step) == 1
  if hurts:  # alpha 0.1 -> 0.05, clipped to 0.04; params as they were; streak reset
    assert float(new.alpha) == pytest.approx(0.04) and float(new.params[0]) == 1.0
    assert int(new.nonfinite_streak) == 0
  else:
    assert float(new.alpha) == pytest.approx(0.2) and float(new.params[0]) == 3.0
  with pytest.raises(ValueError, match="track_pre_adaptation"):
    safeguards.backtrack(_scripted(jnp.array([3.0]))).update(state, None)


def test_one_alpha_per_tensor_costs_a_program_about_the_size_of_one_alpha():
  """The guards choose the state once (``lax.cond``): their predicate, a chain of scalar
  checks over every leaf of ``alpha`` and its rule's state, is not copied into each leaf's
  output, which made XLA's program grow with the square of the number of tensors (2.7x the
  one-``alpha`` program on this 9-layer MLP, and a 2.4x longer compile of Conv4)."""

  model = amaml.models.MLP(hidden=(4,) * 8)
  params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
  loss_fn = amaml.losses.mse(lambda p, x: model.apply({"params": p}, x))
  batch = amaml.sinusoid_tasks(jax.random.key(1), 4)

  def instructions(granularity):
    learner = amaml.alpha_maml(loss_fn, alpha_granularity=granularity)
    text = learner.step.lower(learner.init(params), batch).compile().as_text()
    return sum(" = " in line for line in text.splitlines())

  assert instructions("tensor") < 1.5 * instructions("scalar")


def test_phased_runs_the_phase_of_each_step_and_wrappers_keep_the_phases():
  mark = lambda v: MetaStep(
    lambda p: meta_state(p, 0.1),
    lambda s, b: (s._replace(params=s.params * 0 + v, step=s.step + 1), {"loss": s.params[0]}),
  )
  step = safeguards.skip_nonfinite(meta.phased(((0, mark(1.0)), (2, mark(2.0)), (5, mark(3.0)))))
  assert [start for start, _ in step.phases] == [0, 2, 5]
  state = step.init(jnp.zeros(1))
  seen = []
  for _ in range(7):
    state, _ = jax.jit(step.update)(state, None)
    seen.append(float(state.params[0]))
  assert seen == [1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0]
  for start, update in step.phases:  # each phase alone is the wrapped step of its own part
    new, m = update(state._replace(params=jnp.array([jnp.nan])), None)
    assert bool(m["nonfinite"]) and int(new.nonfinite_streak) == 1


def test_alpha_by_the_outer_optimizer_is_one_sgd_step_on_the_hypergradient_then_clipped():
  params, batch = _params(), _batch()
  loop = il.inner_loop(_loss)
  loss = il.meta_loss(loop)
  for hi in (None, 0.05):
    step = meta.gradient_step(
      loss, optax.sgd(0.1), rates.learned_by_outer(max_rate=hi), init_alpha=lambda p: 0.03
    )
    state = step.init(params)
    new, m = step.update(state, batch)
    g, h = jax.grad(lambda p, a: loss(p, a, batch)[0], argnums=(0, 1))(params, jnp.float32(0.03))
    want = 0.03 - 0.1 * h if hi is None else min(0.03 - 0.1 * h, hi)
    assert float(new.alpha) == pytest.approx(float(want), rel=1e-5)
    chex.assert_trees_all_close(new.params, jax.tree.map(lambda p, d: p - 0.1 * d, params, g))
    assert float(m["alpha_hypergradient"]) == pytest.approx(float(h), rel=1e-5)


def test_fixed_alpha_never_moves():
  step = meta.gradient_step(
    il.meta_loss(il.inner_loop(_loss)), optax.sgd(0.1), rates.fixed(), init_alpha=lambda p: 0.03
  )
  state = step.init(_params())
  for seed in range(3):
    state, m = step.update(state, _batch(seed=seed))
    assert float(state.alpha) == pytest.approx(0.03) and float(m["alpha_hypergradient"]) != 0


def test_a_method_from_parts_equals_the_preset_with_the_same_options():
  """MAML with an inner Adam on the bias only, built from the parts, equals amaml.maml."""
  loop = il.inner_loop(_loss, steps=2, optimizer="adam", inner_params="^b")
  step = meta.gradient_step(
    il.meta_loss(loop), optax.adam(1e-3), rates.fixed(), init_alpha=lambda p: 0.05
  )
  step = meta.report_rates(safeguards.skip_nonfinite(meta.track_pre_adaptation(step, loop)))
  mine = meta.meta_learner(step, loop)
  preset = amaml.maml(_loss, alpha=0.05, inner_steps=2, inner_optimizer="adam", inner_params="^b")
  a, b = mine.init(_params()), preset.init(_params())
  for seed in range(3):
    (a, ma), (b, mb) = mine.step(a, _batch(seed=seed)), preset.step(b, _batch(seed=seed))
  chex.assert_trees_all_close(a.params, b.params, rtol=1e-6)
  assert set(ma) == set(mb) - {"beta", "beta_hypergradient"}  # maml's Adam reports its rate
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
  np.testing.assert_allclose(
    mine.evaluate(a.params, a.alpha, _batch(seed=9))["loss"],
    preset.evaluate(b.params, b.alpha, _batch(seed=9))["loss"],
    rtol=1e-6,
  )


def test_inner_loop_run_equals_adapt():
  params, batch = _params(), _batch()
  for options in ({}, {"optimizer": "momentum", "inner_params": "^w"}):
    loop = il.inner_loop(_loss, steps=3, **options)
    got = il.run(loop, params, 0.05, batch.support_x[0], batch.support_y[0])
    opt = options.get("optimizer")
    want = amaml.adapt(
      _loss,
      params,
      0.05,
      batch.support_x[0],
      batch.support_y[0],
      inner_steps=3,
      optimizer=amaml.inner.inner_optimizer(opt) if opt else None,
      mask=amaml.inner.param_mask(params, options.get("inner_params")),
    )
    chex.assert_trees_all_close(got, want, rtol=1e-6)
