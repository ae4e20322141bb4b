"""iMAML: the implicit meta-gradient and lambda's hypergradient against closed forms on a
quadratic family (float64), CG against a direct solve, vmap against a loop, training on
sinusoid with the non-finite guard, and the --method imaml path."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import amaml
from amaml import configs, train
from amaml.imaml import implicit_gradient, proximal_adapt
from amaml.task import TaskBatch

D, TASKS, LAM = 4, 3, 0.7
MODEL = amaml.models.MLP(hidden=(8, 8))
MSE = amaml.losses.mse(lambda p, x: MODEL.apply({"params": p}, x))


def quadratic(phi, x, y):
  """``1/2 (phi - y)^T x (phi - y)``: the support loss with ``x = A``, ``y = a``; the query
  loss ``1/2 |phi - b|^2`` with ``x = I``, ``y = b``."""
  r = phi["w"] - y
  return 0.5 * r @ x @ r, {}


def _quadratic_family(seed=0):
  """``TASKS`` tasks with SPD ``A`` (eigenvalues in [0.5, 2]) and random ``a``, ``b``."""
  rng = np.random.default_rng(seed)
  q = np.linalg.qr(rng.normal(size=(TASKS, D, D)))[0]
  a_mat = q @ (rng.uniform(0.5, 2.0, (TASKS, D))[..., None] * np.swapaxes(q, 1, 2))
  batch = TaskBatch(
    support_x=jnp.asarray(a_mat),
    support_y=jnp.asarray(rng.normal(size=(TASKS, D))),
    query_x=jnp.broadcast_to(jnp.eye(D), (TASKS, D, D)),
    query_y=jnp.asarray(rng.normal(size=(TASKS, D))),
  )
  return {"w": jnp.asarray(rng.normal(size=D))}, batch


def _closed_form(theta, lam, batch):
  """phi* = (A + lam I)^-1 (A a + lam theta) per task; the mean query loss; its exact
  gradients in theta, lam (A + lam I)^-1 (phi* - b), and in lam,
  -(A + lam I)^-1 (phi* - theta) . (phi* - b), each averaged over tasks."""
  a_mat, a, b = batch.support_x, batch.support_y, batch.query_y
  m = a_mat + lam * jnp.eye(D)
  phi = jnp.linalg.solve(m, (a_mat @ a[..., None] + lam * theta[:, None]))[..., 0]
  r = phi - b
  loss = jnp.mean(0.5 * jnp.sum(r * r, -1))
  grad = jnp.mean(lam * jnp.linalg.solve(m, r[..., None])[..., 0], 0)
  dphi_dlam = -jnp.linalg.solve(m, (phi - theta)[..., None])[..., 0]
  return phi, loss, grad, jnp.mean(jnp.sum(dphi_dlam * r, -1))


def _quadratic_learner(**kw):
  # alpha (A + lam I) <= 0.3 * 2.7: the inner solve contracts by 0.64 or better per step, so 120
  # steps reach phi* to float64 precision; CG on a 4-dimensional system is exact in 4 steps
  return amaml.imaml(quadratic, lam=LAM, alpha=0.3, inner_steps=120, cg_steps=D, cg_tol=1e-14, **kw)


def test_implicit_meta_gradient_equals_the_exact_one_on_a_quadratic_family(x64):
  theta, batch = _quadratic_family()
  learner = _quadratic_learner()
  phi, want_loss, want_grad, _ = _closed_form(theta["w"], LAM, batch)
  solved, _ = proximal_adapt(
    quadratic, theta, LAM, 0.3, batch.support_x[0], batch.support_y[0], inner_steps=120
  )
  np.testing.assert_allclose(solved["w"], phi[0], rtol=1e-12)
  (loss, _), grad = jax.jit(jax.value_and_grad(learner.meta_loss, has_aux=True))(theta, 0.3, batch)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
  np.testing.assert_allclose(grad["w"], want_grad, rtol=1e-10, atol=1e-12)
  # it is not the first-order gradient mean(phi* - b), which this family tells apart
  assert not np.allclose(grad["w"], jnp.mean(phi - batch.query_y, 0), rtol=1e-3)


def test_lambda_hypergradient_equals_the_exact_one_and_finite_differences(x64):
  theta, batch = _quadratic_family(seed=1)
  learner = _quadratic_learner()
  _, _, _, want = _closed_form(theta["w"], LAM, batch)
  loss_at = jax.jit(lambda lam: learner.meta_loss(theta, 0.3, batch, lam=lam)[0])
  got = jax.grad(loss_at)(LAM)
  eps = 1e-5
  fd = (loss_at(LAM + eps) - loss_at(LAM - eps)) / (2 * eps)
  np.testing.assert_allclose(got, want, rtol=1e-10)
  np.testing.assert_allclose(got, fd, rtol=1e-6)
  # the step reports the same hypergradient and, with lam_lr > 0, lam moves against it
  state = _quadratic_learner(lam_lr=0.1).init(theta)
  new, metrics = _quadratic_learner(lam_lr=0.1).step(state, batch)
  np.testing.assert_allclose(metrics["lam_hypergradient"], want, rtol=1e-10)
  assert np.sign(float(new.alpha_state.lam) - LAM) == -np.sign(float(want))


def _tanh_net(p, x):
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def test_both_derivatives_on_a_network_match_finite_differences(x64):
  """A smooth (tanh) network, whose inner problem the solver reaches to 1e-11 (a ReLU
  network's kinks would make finite differences meaningless)."""
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {
    "w1": 0.5 * jax.random.normal(k1, (1, 8)),
    "b1": jnp.zeros(8),
    "w2": 0.5 * jax.random.normal(k2, (8, 1)),
    "b2": jnp.zeros(1),
  }
  batch = jax.tree.map(
    lambda x: x.astype(jnp.float64), amaml.sinusoid_tasks(jax.random.key(1), num_tasks=2)
  )
  # lam = 5 keeps I + H / lam positive definite here (H's least eigenvalue is about -3)
  learner = amaml.imaml(
    amaml.losses.mse(_tanh_net),
    lam=5.0,
    alpha=0.02,
    inner_steps=3000,
    inner_tol=1e-11,
    cg_steps=40,
    cg_tol=1e-13,
  )
  loss_at = jax.jit(lambda p, lam: learner.meta_loss(p, 0.02, batch, lam=lam)[0])
  g_theta, g_lam = jax.grad(loss_at, argnums=(0, 1))(params, 5.0)
  eps, d = 1e-5, jax.tree.map(jnp.ones_like, params)
  shifted = lambda t: jax.tree.map(lambda a, b: a + t * b, params, d)
  fd_theta = (loss_at(shifted(eps), 5.0) - loss_at(shifted(-eps), 5.0)) / (2 * eps)
  fd_lam = (loss_at(params, 5.0 + eps) - loss_at(params, 5.0 - eps)) / (2 * eps)
  np.testing.assert_allclose(optax.tree.vdot(g_theta, d), fd_theta, rtol=1e-6)
  np.testing.assert_allclose(g_lam, fd_lam, rtol=1e-6)


def test_cg_solution_equals_a_direct_solve(x64):
  """(I + H / lam) v = g on a small logistic regression (convex: H is PSD)."""
  rng = np.random.default_rng(2)
  x, y = jnp.asarray(rng.normal(size=(20, 5))), jnp.asarray(rng.integers(0, 2, 20))
  loss_fn = lambda p, x_, y_: (
    jnp.mean(optax.sigmoid_binary_cross_entropy(x_ @ p["w"] + p["b"], y_.astype(jnp.float64))),
    {},
  )
  phi = {"w": jnp.asarray(rng.normal(size=5)), "b": jnp.asarray(0.3)}
  g = {"w": jnp.asarray(rng.normal(size=5)), "b": jnp.asarray(-1.2)}
  flat_phi, unravel = ravel_pytree(phi)
  h = jax.hessian(lambda f: loss_fn(unravel(f), x, y)[0])(flat_phi)
  lam = 0.05  # small: H / lam dominates, so a wrong Hessian-vector product would show
  want = jnp.linalg.solve(jnp.eye(6) + h / lam, ravel_pytree(g)[0])
  solve = jax.jit(
    lambda steps: implicit_gradient(loss_fn, phi, lam, x, y, g, cg_steps=steps, cg_tol=1e-14),
    static_argnums=0,
  )
  np.testing.assert_allclose(ravel_pytree(solve(6))[0], want, rtol=1e-9)
  short = solve(1)
  assert not np.allclose(ravel_pytree(short)[0], want, rtol=1e-3)  # the steps matter


def test_implicit_gradient_through_the_cpu_convolution_equals_the_xla_one():
  """Conv4's CPU convolution has its own VJP and no forward mode: the Hessian-vector products
  go reverse over reverse, and give what lax.conv (which has both) gives."""
  from amaml.models.layers import conv3x3

  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(3, 5, 5, 2)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(3, 5, 5, 3)), jnp.float32)
  phi = {"k": jnp.asarray(0.3 * rng.normal(size=(3, 3, 2, 3)), jnp.float32)}
  g = {"k": jnp.asarray(rng.normal(size=(3, 3, 2, 3)), jnp.float32)}

  def solve(impl):
    loss_fn = lambda p, x_, y_: (jnp.mean(jnp.tanh(conv3x3(x_, p["k"], impl=impl)) - y_) ** 2, {})
    return implicit_gradient(loss_fn, phi, 0.1, x, y, g, cg_steps=4)

  chex.assert_trees_all_close(solve("matmul"), solve("xla"), rtol=2e-4, atol=1e-5)


def test_meta_gradient_under_vmap_equals_a_loop():
  params = MODEL.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
  batch = amaml.sinusoid_tasks(jax.random.key(3), num_tasks=4)
  learner = amaml.imaml(MSE, lam=2.0, alpha=0.01, inner_steps=5, cg_steps=3, inner_tol=0.5)
  grad = jax.jit(lambda b: jax.grad(lambda p: learner.meta_loss(p, 0.01, b)[0])(params))
  one = [grad(jax.tree.map(lambda x: x[t : t + 1], batch)) for t in range(4)]
  chex.assert_trees_all_close(
    grad(batch), jax.tree.map(lambda *g: sum(g) / 4, *one), rtol=2e-5, atol=1e-6
  )


def test_inner_tolerance_stops_the_solver_early(x64):
  theta, batch = _quadratic_family()
  tight = _quadratic_learner(inner_tol=1e-3)
  _, aux = tight.meta_loss(theta, 0.3, batch)
  assert 5 < float(aux["inner_steps_taken"]) < 120
  assert float(aux["inner_grad_norm"]) <= 1e-3


def test_training_on_sinusoid_lowers_the_loss_and_the_guard_holds_a_nonfinite_step():
  params = MODEL.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
  # lam = 10: a ReLU network's support Hessian has eigenvalues near -4 here, and CG needs
  # I + H / lam positive definite (at lam = 1 the loss falls by 4% in 60 steps, not 19%)
  learner = amaml.imaml(
    MSE, lam=10.0, alpha=0.01, inner_steps=5, cg_steps=5, optimizer=optax.adam(3e-3)
  )
  state, losses = learner.init(params), []
  for i in range(60):
    state, m = learner.step(state, amaml.sinusoid_tasks(jax.random.key(i), num_tasks=8))
    assert not bool(m["nonfinite"])
    losses.append(float(m["loss"]))
  assert {
    "loss",
    "pre_loss",
    "grad_norm",
    "alpha",
    "lam",
    "lam_hypergradient",
    "nonfinite_streak",
    "inner_steps_taken",
  } <= set(m)
  assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10]), losses
  assert learner.step._cache_size() == 1
  curve = learner.adaptation_curve(
    state.params, state.alpha, amaml.sinusoid_tasks(jax.random.key(99), num_tasks=5), 5
  )
  ev = learner.evaluate(
    state.params, state.alpha, amaml.sinusoid_tasks(jax.random.key(99), num_tasks=5)
  )
  np.testing.assert_allclose(curve["loss"][:, -1], ev["loss"], rtol=1e-5)
  np.testing.assert_allclose(curve["loss"][:, 0], ev["pre_loss"], rtol=1e-5)
  # the curve's support loss is the inner objective, which gradient descent lowers
  assert curve["support_loss"].shape == (5, 6)
  assert np.all(np.diff(curve["support_loss"], axis=1) <= 1e-5)
  # the non-finite guard: a NaN in one task leaves the state as it was
  batch = amaml.sinusoid_tasks(jax.random.key(0), num_tasks=8)
  new, m = learner.step(state, batch._replace(query_y=batch.query_y.at[0, 0].set(jnp.nan)))
  assert bool(m["nonfinite"]) and int(new.nonfinite_streak) == 1 and new.step == state.step + 1
  chex.assert_trees_all_equal(new.params, state.params)
  assert learner.step._cache_size() == 1


def test_bad_arguments_name_the_fix():
  with pytest.raises(ValueError, match="lam=0"):
    amaml.imaml(MSE, lam=0.0)
  with pytest.raises(ValueError, match="cg_steps=0"):
    amaml.imaml(MSE, cg_steps=0)
  learner = amaml.imaml(MSE, lam_lr=0.01)
  params = MODEL.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
  with pytest.raises(ValueError, match="alpha_state.lam"):
    learner.evaluate(params, 0.01, amaml.sinusoid_tasks(jax.random.key(0), num_tasks=2))
  with pytest.raises(ValueError, match="imaml_lambda"):
    configs.get_config("sinusoid", method="imaml", imaml_lambda=0.0)
  with pytest.raises(ValueError, match="inner_params"):
    configs.get_config("sinusoid", method="imaml", inner_params="^Dense_2/")


def test_method_imaml_trains_from_a_config(tiny_config, tmp_path):
  cfg = tiny_config(
    method="imaml",
    inner_steps=3,
    cg_steps=3,
    imaml_lambda=2.0,
    alpha=0.01,
    iterations=20,
    checkpoint_every=0,
    eval_tasks=10,
    val_tasks=10,
    eval_inner_steps=3,
  )
  assert cfg.resolved_outer_optimizer == "adam" and cfg.resolved_beta == 1e-3
  exp = train.build(cfg)
  state = exp.learner.init(exp.params)
  assert float(state.alpha_state.lam) == 2.0
  state, results = train.train(cfg, tmp_path / "run", progress=False)
  assert int(state.step) == 20 and np.isfinite(results["test"]["loss"])
  assert results["test_adaptation"]["guard"]  # chosen under the support-loss guard
  assert "lam" in (tmp_path / "run" / "metrics.jsonl").read_text()
