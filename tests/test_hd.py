"""The Optax hypergradient transform against hand-written SGD-HD / Adam-HD reference
loops, its base optimizers at hyper_lr = 0, and its safeguards."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amaml

A = np.array([1.0, 3.0, 0.5])  # f(p) = 0.5 * sum(A p^2)
P0 = np.array([1.0, -1.0, 2.0])
grad_np = lambda p: A * p


def _run(opt, steps, p0=P0, dtype=jnp.float64):
  params = jnp.asarray(p0, dtype)
  state = opt.init(params)
  update = jax.jit(opt.update)
  rates, traj = [], []
  for _ in range(steps):
    g = jax.grad(lambda p: 0.5 * jnp.sum(jnp.asarray(A, dtype) * p ** 2))(params)
    upd, state = update(g, state, params)
    params = optax.apply_updates(params, upd)
    rates.append(float(amaml.current_learning_rate(state)))
    traj.append(np.asarray(params))
  return np.array(rates), np.array(traj)


def test_sgd_hd_matches_reference_sequence(x64):
  beta, kappa = 0.1, 0.01
  # SGD-HD (Baydin et al. 2018, Alg. 1): beta_t = beta_{t-1} + kappa g_t.g_{t-1}; p -= beta_t g_t
  p, g_prev, ref = P0.copy(), np.zeros(3), []
  for _ in range(5):
    g = grad_np(p)
    beta = beta + kappa * g @ g_prev
    p = p - beta * g
    g_prev = g
    ref.append(beta)
  rates, traj = _run(amaml.hypergradient(optax.sgd, learning_rate=0.1, hyper_lr=kappa), 5)
  np.testing.assert_allclose(rates, ref, rtol=1e-12)
  np.testing.assert_allclose(traj[-1], p, rtol=1e-12)
  assert rates[0] == 0.1 and len(set(np.round(rates, 10))) == 5  # h_1 = 0, then beta moves


def test_adam_hd_matches_reference_sequence(x64):
  lr, kappa, b1, b2, eps = 0.05, 0.01, 0.9, 0.999, 1e-8
  # Adam-HD as in the HD paper's reference code (one parameter tensor, one dot product)
  p, m, v, ref = P0.copy(), np.zeros(3), np.zeros(3), []
  for t in range(1, 6):
    g = grad_np(p)
    if t > 1:
      h = g @ (m / (np.sqrt(v) + eps)) * np.sqrt(1 - b2 ** (t - 1)) / (1 - b1 ** (t - 1))
      lr = lr + kappa * h
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + eps)
    ref.append(lr)
  rates, traj = _run(amaml.hypergradient(optax.adam, learning_rate=0.05, hyper_lr=kappa,
                                         b1=b1, b2=b2, eps=eps), 5)
  # eps sits before bias correction in the reference, after it in optax: O(eps) apart
  np.testing.assert_allclose(rates, ref, rtol=1e-7)
  np.testing.assert_allclose(traj[-1], p, rtol=1e-6)
  assert rates[-1] > rates[0] * 1.01


BASES = {
    "sgd": (optax.sgd, {}),
    "momentum": (optax.sgd, {"momentum": 0.9}),
    "nesterov": (optax.sgd, {"momentum": 0.9, "nesterov": True}),
    "adam": (optax.adam, {}),
    "adamw": (optax.adamw, {"weight_decay": 1e-2}),
    "rmsprop": (optax.rmsprop, {}),
    "adagrad": (optax.adagrad, {}),
    "lion": (optax.lion, {}),
}


@pytest.mark.parametrize("name", sorted(BASES))
def test_wrapper_over_base_optimizers(name):
  factory, kwargs = BASES[name]
  # hyper_lr = 0: exactly the base optimizer at a fixed rate
  _, traj_hd = _run(amaml.hypergradient(factory, learning_rate=0.01, hyper_lr=0.0, **kwargs), 6,
                    dtype=jnp.float32)
  params = jnp.asarray(P0, jnp.float32)
  base = factory(learning_rate=0.01, **kwargs)
  state = base.init(params)
  for i in range(6):
    g = jnp.asarray(A, jnp.float32) * params
    upd, state = base.update(g, state, params)
    params = optax.apply_updates(params, upd)
    np.testing.assert_allclose(traj_hd[i], params, rtol=1e-5, atol=1e-7)
  # a rate far too small grows: consecutive gradients agree
  rates, _ = _run(amaml.hypergradient(factory, learning_rate=1e-4, hyper_lr=1e-3, **kwargs), 20,
                  dtype=jnp.float32)
  assert rates[-1] > 1e-4


def test_sgd_hd_shrinks_a_rate_that_oscillates():
  rates, _ = _run(amaml.hypergradient(optax.sgd, learning_rate=0.9, hyper_lr=0.01), 10,
                  dtype=jnp.float32)  # 0.9 * 3 > 2: oscillates along the steep axis
  assert rates[-1] < 0.9


def test_composes_with_chain_under_jit():
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    amaml.hypergradient(optax.adam, learning_rate=0.01, hyper_lr=1e-3))
  rates, traj = _run(opt, 10, dtype=jnp.float32)
  assert rates[-1] != 0.01
  assert np.sum(A * traj[-1] ** 2) < np.sum(A * P0 ** 2)


def test_log_space_keeps_rate_positive_and_bounds_hold():
  # huge hyper_lr on an oscillating problem: additive HD would go negative
  add, _ = _run(amaml.hypergradient(optax.sgd, learning_rate=0.9, hyper_lr=10.0), 5,
                dtype=jnp.float32)
  assert add.min() < 0
  log, _ = _run(amaml.hypergradient(optax.sgd, learning_rate=0.9, hyper_lr=10.0, rate_rule="log"), 5,
                dtype=jnp.float32)
  assert log.min() >= 0 and log[-1] < 0.9
  bounded, _ = _run(amaml.hypergradient(optax.sgd, learning_rate=0.9, hyper_lr=10.0,
                                        min_rate=0.05, max_rate=1.0), 5, dtype=jnp.float32)
  assert bounded.min() >= 0.05 and bounded.max() <= 1.0
  assert np.isclose(bounded.min(), 0.05)


def test_nonfinite_hypergradient_keeps_rate():
  opt = amaml.hypergradient(optax.sgd, learning_rate=0.1, hyper_lr=1.0)
  params = jnp.ones(3)
  state = opt.init(params)
  _, state = opt.update(jnp.ones(3), state, params)
  _, state = opt.update(jnp.array([jnp.nan, 1.0, 1.0]), state, params)
  assert float(state.learning_rate) == pytest.approx(0.1)


def test_bad_arguments_are_named():
  with pytest.raises(TypeError, match="factory"):
    amaml.hypergradient(optax.adam(1e-3), learning_rate=1e-3, hyper_lr=1e-7)
  assert amaml.current_learning_rate(optax.adam(1e-3).init(jnp.ones(2))) is None


def test_discounted_hypergradient_matches_reference_sequence(x64):
  beta, kappa, mu = 0.1, 0.01, 0.8
  # h_t = <g_t, z_{t-1}>, z_t = mu z_{t-1} + u_t with u = -g for SGD (MARTHE, Hessian-free)
  p, z, ref = P0.copy(), np.zeros(3), []
  for _ in range(6):
    g = grad_np(p)
    beta = beta - kappa * g @ z
    p = p - beta * g
    z = mu * z - g
    ref.append(beta)
  rates, traj = _run(amaml.hypergradient(optax.sgd, learning_rate=0.1, hyper_lr=kappa,
                                         discount=mu), 6)
  np.testing.assert_allclose(rates, ref, rtol=1e-12)
  np.testing.assert_allclose(traj[-1], p, rtol=1e-12)
  plain, _ = _run(amaml.hypergradient(optax.sgd, learning_rate=0.1, hyper_lr=kappa), 6)
  assert np.all(rates[:2] == plain[:2]) and abs(rates[-1] - plain[-1]) > 1e-4  # differs from step 3


def test_discount_out_of_range_is_refused():
  with pytest.raises(ValueError, match="discount must be in"):
    amaml.hypergradient(optax.sgd, learning_rate=0.1, hyper_lr=0.01, discount=1.0)
