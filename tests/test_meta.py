"""The jitted, task-vmapped meta step: against a Python loop over tasks, hand-computed
updates, its safeguards, and training that must lower the loss."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amaml

MODEL = amaml.models.MLP(hidden=(16, 16))
LOSS = amaml.losses.mse(lambda p, x: MODEL.apply({"params": p}, x))


def _params(seed=0):
  return MODEL.init(jax.random.key(seed), jnp.zeros((1, 1)))["params"]


def _batch(seed=1, tasks=5):
  return amaml.sinusoid_tasks(jax.random.key(seed), num_tasks=tasks)


def test_vmap_over_tasks_equals_python_loop():
  learner = amaml.alpha_maml(LOSS, alpha=0.05, inner_steps=2)
  params, batch = _params(), _batch()
  alpha = jnp.float32(0.05)
  (loss, _), (g, ga) = jax.value_and_grad(learner.meta_loss, argnums=(0, 1), has_aux=True)(
    params, alpha, batch
  )

  def one(p, a, i):
    adapted, _ = amaml.adapt(LOSS, p, a, batch.support_x[i], batch.support_y[i], inner_steps=2)
    return LOSS(adapted, batch.query_x[i], batch.query_y[i])[0]

  losses, grads, agrads = [], [], []
  for i in range(batch.num_tasks):
    l, (gi, gai) = jax.value_and_grad(one, argnums=(0, 1))(params, alpha, i)
    losses.append(l), grads.append(gi), agrads.append(gai)
  np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-5)
  np.testing.assert_allclose(ga, np.mean(agrads), rtol=1e-4)
  mean_g = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *grads)
  chex.assert_trees_all_close(g, mean_g, rtol=1e-4, atol=1e-6)


def test_step_applies_hand_computed_updates():
  alpha_lr, beta = 1e-5, 0.01
  learner = amaml.alpha_maml(
    LOSS,
    alpha=0.05,
    beta=beta,
    alpha_lr=alpha_lr,
    beta_lr=0.0,
    optimizer=optax.sgd,
    alpha_min=None,
    rate_rule="additive",
    backtrack=False,
  )
  params, batch = _params(), _batch()
  state = learner.init(params)
  (_, _), (g, ga) = jax.value_and_grad(learner.meta_loss, argnums=(0, 1), has_aux=True)(
    params, state.alpha, batch
  )
  new, metrics = learner.step(state, batch)
  assert jax.tree.structure(new.alpha) == jax.tree.structure(params)  # one alpha per tensor
  chex.assert_trees_all_close(
    new.alpha, jax.tree.map(lambda gai: 0.05 - alpha_lr * gai, ga), rtol=1e-6
  )
  chex.assert_trees_all_close(
    new.params, jax.tree.map(lambda p, gi: p - beta * gi, params, g), rtol=1e-5, atol=1e-7
  )
  assert int(new.step) == 1 and not bool(metrics["nonfinite"])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((new.alpha, new.params)))


def test_maml_keeps_rates_fixed_and_equals_plain_adam():
  learner = amaml.maml(LOSS, alpha=0.05, beta=1e-3)
  params, state = _params(), None
  state = learner.init(params)
  opt = optax.adam(1e-3)
  ref_params, ref_state = params, opt.init(params)
  for i in range(3):
    batch = _batch(seed=10 + i)
    state, m = learner.step(state, batch)
    g = jax.grad(lambda p: learner.meta_loss(p, jnp.float32(0.05), batch)[0])(ref_params)
    upd, ref_state = opt.update(g, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, upd)
  assert float(m["alpha"]) == pytest.approx(0.05) and float(m["beta"]) == pytest.approx(1e-3)
  chex.assert_trees_all_close(state.params, ref_params, rtol=1e-5, atol=1e-7)


def test_jitted_step_does_not_recompile():
  traces = []

  def loss_fn(p, x, y):
    traces.append(1)
    return LOSS(p, x, y)

  learner = amaml.alpha_maml(loss_fn, alpha=0.01)
  state = learner.init(_params())
  state, _ = learner.step(state, _batch(seed=2))
  n = len(traces)
  assert n > 0
  for s in range(3, 6):
    state, _ = learner.step(state, _batch(seed=s))
  assert len(traces) == n


def test_nan_batch_leaves_state_unchanged():
  learner = amaml.alpha_maml(LOSS, alpha=0.05, alpha_lr=1e-3, beta_lr=1e-7)
  state, _ = learner.step(learner.init(_params()), _batch(seed=3))
  bad = _batch(seed=4)
  bad = bad._replace(query_y=bad.query_y.at[0, 0, 0].set(jnp.nan))
  new, metrics = learner.step(state, bad)
  assert bool(metrics["nonfinite"]) and int(metrics["nonfinite_streak"]) == 1
  chex.assert_trees_all_equal(
    (new.params, new.alpha, new.opt_state), (state.params, state.alpha, state.opt_state)
  )
  new2, metrics = learner.step(new, bad)
  assert int(metrics["nonfinite_streak"]) == 2
  new3, metrics = learner.step(new2, _batch(seed=5))
  assert not bool(metrics["nonfinite"]) and int(new3.nonfinite_streak) == 0
  assert int(new3.step) == 4


def test_alpha_bounds_hold_and_log_space_stays_positive():
  batch = _batch(seed=6)
  learner = amaml.alpha_maml(LOSS, alpha=0.05, alpha_lr=10.0, alpha_min=0.01, alpha_max=0.06)
  state = learner.init(_params())
  seen = []
  for _ in range(5):
    state, m = learner.step(state, batch)
    seen += [float(a) for a in jax.tree.leaves(state.alpha)]  # one alpha per tensor
  lo, hi = np.float32(0.01), np.float32(0.06)
  assert min(seen) >= lo and max(seen) <= hi
  assert lo in seen or hi in seen  # the bound was hit, and held
  for rule in ("additive", "log", "normalized"):
    learner = amaml.alpha_maml(
      LOSS, alpha=0.05, alpha_lr=1e-3, beta_lr=0.0, rate_rule=rule, alpha_min=None, backtrack=False
    )
    state = learner.init(_params())
    for _ in range(3):
      state, m = learner.step(state, batch)
    a = float(m["alpha"])
    if rule == "additive":
      assert abs(a - 0.05) > 1.0  # plain HD: steps scale with the loss
    elif rule == "log":
      assert a >= 0 and np.isfinite(a)
    else:  # normalized: at most ~hyper_lr relative change per step
      assert 0.05 * np.exp(-3.1e-3) <= a <= 0.05 * np.exp(3.1e-3) and a != 0.05


@pytest.mark.parametrize("granularity", ["tensor", "parameter"])
def test_per_tensor_alpha_steps(granularity):
  learner = amaml.alpha_maml(LOSS, alpha=0.05, alpha_lr=1e-2, alpha_granularity=granularity)
  state = learner.init(_params())
  for seed in range(3):  # the normalized rule's first step is +-alpha_lr for every rate alike
    state, m = learner.step(state, _batch(seed=seed))
  values = np.concatenate([np.ravel(a) for a in jax.tree.leaves(state.alpha)])
  assert np.unique(values).size > 1  # each rate followed its own hypergradient


def test_alpha_maml_training_lowers_the_loss():
  learner = amaml.alpha_maml(
    LOSS
  )  # the defaults: alpha0 = 0.1, Adam at 1e-3 outside, no rate to tune
  state = learner.init(_params())
  eval_batch = amaml.sinusoid_tasks(jax.random.key(99), num_tasks=100)
  before = learner.evaluate(state.params, state.alpha, eval_batch)

  def body(st, key):
    st, m = learner.update(st, amaml.sinusoid_tasks(key, num_tasks=25))
    return st, m

  state, ms = jax.jit(lambda st: jax.lax.scan(body, st, jax.random.split(jax.random.key(0), 1500)))(
    state
  )
  losses = np.asarray(ms["loss"])
  after = learner.evaluate(state.params, state.alpha, eval_batch)
  assert after["loss"].shape == (100,)
  assert np.mean(losses[-100:]) < 0.6 * np.mean(losses[:100])
  assert float(after["loss"].mean()) < 0.5 * float(before["loss"].mean())
  assert float(after["loss"].mean()) < float(after["pre_loss"].mean())
  moved = [abs(np.log(float(a) / 0.1)) for a in jax.tree.leaves(state.alpha)]
  assert max(moved) > np.log(2)  # alpha adapted: a tensor's by more than a factor of 2


def test_bad_configuration_errors():
  with pytest.raises(ValueError, match="inner_steps"):
    amaml.alpha_maml(LOSS, inner_steps=0)
  with pytest.raises(ValueError, match="alpha_granularity"):
    amaml.alpha_maml(LOSS, alpha_granularity="layer")
  with pytest.raises(TypeError, match="factory"):
    amaml.alpha_maml(LOSS, optimizer=optax.adam(1e-3), b1=0.5)


# tasks_at_once: groups of tasks in a loop, each group's gradient taken inside it
MSL = dict(multi_step_loss=10)


@pytest.mark.parametrize(
  "options, tasks_at_once",
  [({}, 1), ({}, 2), (MSL, 2), ({"first_order": True}, 2)],
  ids=["maml-1", "maml-2", "msl-2", "fo-2"],
)
def test_tasks_at_once_equals_all_tasks_at_once(x64, options, tasks_at_once):
  """Groups of 1 and 2 (of 5 tasks: a remainder) give the vmapped meta loss, its aux, its
  gradients in params and in a per-tensor alpha, and the gradient of a gradient."""
  params = jax.tree.map(lambda a: a.astype(jnp.float64), _params())
  batch = jax.tree.map(lambda a: a.astype(jnp.float64), _batch())
  make = lambda k: amaml.alpha_maml(LOSS, inner_steps=2, tasks_at_once=k, **options)
  alpha = make(0).init(params).alpha
  results = []
  for k in (0, tasks_at_once):
    meta_loss = make(k).meta_loss
    value_and_grad = jax.value_and_grad(meta_loss, argnums=(0, 1), has_aux=True)
    (loss, aux), grads = jax.jit(value_and_grad)(params, alpha, batch, 3)
    # d/d alpha of the squared norm of the params' gradient: through the custom VJP again
    norm2 = lambda a: optax.tree.norm(jax.grad(lambda p: meta_loss(p, a, batch, 3)[0])(params)) ** 2
    results.append((loss, aux, grads, jax.jit(jax.grad(norm2))(alpha)))
  chex.assert_trees_all_close(results[1], results[0], rtol=1e-10, atol=1e-12)
  assert float(results[0][3]["Dense_0"]["kernel"]) != 0.0  # the second-order term is there


def test_tasks_at_once_under_vmap_and_without_alpha_gradient(x64):
  """Vmapped over two parameter sets (as ``--seeds`` runs it) and differentiated in params
  alone, groups of tasks equal the vmapped meta loss; its aux is not differentiable."""
  batch = jax.tree.map(lambda a: a.astype(jnp.float64), _batch())
  two = jax.tree.map(lambda *a: jnp.stack(a).astype(jnp.float64), _params(0), _params(1))
  alpha = jnp.float64(0.05)
  grads = [
    jax.jit(
      jax.vmap(jax.grad(lambda p: amaml.maml(LOSS, tasks_at_once=k).meta_loss(p, alpha, batch)[0]))
    )(two)
    for k in (0, 1)
  ]
  chex.assert_trees_all_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)
  grouped = amaml.maml(LOSS, tasks_at_once=2).meta_loss
  with pytest.raises(ValueError, match="aux .* not differentiable.*tasks_at_once=0"):
    jax.grad(lambda p: grouped(p, alpha, batch)[1]["support_loss"])(_params())


def test_tasks_at_once_steps_equal_all_tasks_at_once():
  """Three steps of the default (backtracking, its pre-adaptation pass, Adam, alpha by
  hypergradient), one task at a time, equal the vmapped steps, metrics included."""
  params, runs = _params(), []
  for k in (0, 1):
    learner = amaml.alpha_maml(LOSS, inner_steps=2, tasks_at_once=k)
    state, history = learner.init(params), []
    for seed in range(3):
      state, metrics = learner.step(state, _batch(seed))
      history.append(metrics)
    runs.append((state.params, state.alpha, history))
  chex.assert_trees_all_close(runs[1], runs[0], rtol=2e-5, atol=1e-6)


def test_tasks_at_once_resolves_by_task_size_and_checks_its_value():
  resolve = amaml.inner_loop.resolve_tasks_at_once
  small = _batch(tasks=5)  # sinusoid: 10 query inputs a task
  images = amaml.TaskBatch(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in (
    (32, 5, 28, 28, 1), (32, 5), (32, 75, 28, 28, 1), (32, 75))))  # fmt: skip
  assert resolve(None, small) == 5 and resolve(0, images) == 32 and resolve(64, images) == 32
  assert resolve(4, images) == 4
  single_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
  assert resolve(None, images) == (1 if single_cpu else 32)
  with pytest.raises(ValueError, match="tasks_at_once must be >= 0"):
    resolve(-1, small)
