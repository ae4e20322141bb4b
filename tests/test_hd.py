"""The Optax hypergradient transform against hand-written SGD-HD / Adam-HD reference
loops (the paper's additive rule) and the default normalized rule, its base optimizers
at hyper_lr = 0, its safeguards and ``optax.inject_hyperparams``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amaml
from amaml import rates as rates_lib

A = np.array([1.0, 3.0, 0.5])  # f(p) = 0.5 * sum(A p^2)
P0 = np.array([1.0, -1.0, 2.0])
grad_np = lambda p: A * p


def _run(opt, steps, p0=P0, dtype=jnp.float64):
  params = jnp.asarray(p0, dtype)
  state = opt.init(params)
  update = jax.jit(opt.update)
  rates, traj = [], []
  for _ in range(steps):
    g = jax.grad(lambda p: 0.5 * jnp.sum(jnp.asarray(A, dtype) * p**2))(params)
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
  rates, traj = _run(
    amaml.hypergradient(optax.sgd, learning_rate=0.1, rate_rule="additive", hyper_lr=kappa), 5
  )
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
    p = p - lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
    ref.append(lr)
  rates, traj = _run(
    amaml.hypergradient(
      optax.adam, learning_rate=0.05, rate_rule="additive", hyper_lr=kappa, b1=b1, b2=b2, eps=eps
    ),
    5,
  )
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
  # hyper_lr = 0: exactly the base optimizer at a fixed rate (default rule)
  _, traj_hd = _run(
    amaml.hypergradient(factory, learning_rate=0.01, hyper_lr=0.0, **kwargs), 6, dtype=jnp.float32
  )
  params = jnp.asarray(P0, jnp.float32)
  base = factory(learning_rate=0.01, **kwargs)
  state = base.init(params)
  for i in range(6):
    g = jnp.asarray(A, jnp.float32) * params
    upd, state = base.update(g, state, params)
    params = optax.apply_updates(params, upd)
    np.testing.assert_allclose(traj_hd[i], params, rtol=1e-5, atol=1e-7)
  # a rate far too small grows: consecutive gradients agree
  rates, _ = _run(
    amaml.hypergradient(factory, learning_rate=1e-4, rate_rule="additive", hyper_lr=1e-3, **kwargs),
    20,
    dtype=jnp.float32,
  )
  assert rates[-1] > 1e-4


def test_sgd_hd_shrinks_a_rate_that_oscillates():
  rates, _ = _run(
    amaml.hypergradient(optax.sgd, learning_rate=0.9, rate_rule="additive", hyper_lr=0.01),
    10,
    dtype=jnp.float32,
  )  # 0.9 * 3 > 2: oscillates along the steep axis
  assert rates[-1] < 0.9


def test_composes_with_chain_under_jit():
  opt = optax.chain(
    optax.clip_by_global_norm(1.0), amaml.hypergradient(optax.adam, learning_rate=0.01)
  )  # defaults
  rates, traj = _run(opt, 10, dtype=jnp.float32)
  assert rates[-1] != 0.01
  assert np.sum(A * traj[-1] ** 2) < np.sum(A * P0**2)


def test_log_space_keeps_rate_positive_and_bounds_hold():
  # huge hyper_lr on an oscillating problem: additive HD would go negative
  add, _ = _run(
    amaml.hypergradient(optax.sgd, learning_rate=0.9, rate_rule="additive", hyper_lr=10.0),
    5,
    dtype=jnp.float32,
  )
  assert add.min() < 0
  log, _ = _run(
    amaml.hypergradient(optax.sgd, learning_rate=0.9, hyper_lr=10.0, rate_rule="log"),
    5,
    dtype=jnp.float32,
  )
  assert log.min() >= 0 and log[-1] < 0.9
  bounded, _ = _run(
    amaml.hypergradient(
      optax.sgd, learning_rate=0.9, rate_rule="additive", hyper_lr=10.0, min_rate=0.05, max_rate=1.0
    ),
    5,
    dtype=jnp.float32,
  )
  assert bounded.min() >= 0.05 and bounded.max() <= 1.0
  assert np.isclose(bounded.min(), 0.05)


@pytest.mark.parametrize("rule", rates_lib.RULES)
def test_nonfinite_hypergradient_keeps_rate(rule):
  opt = amaml.hypergradient(optax.sgd, learning_rate=0.1, hyper_lr=1.0, rate_rule=rule)
  params = jnp.ones(3)
  state = opt.init(params)
  _, state = opt.update(jnp.ones(3), state, params)
  _, state = opt.update(jnp.array([jnp.nan, 1.0, 1.0]), state, params)
  assert float(state.learning_rate) == pytest.approx(0.1)


def test_bad_arguments_are_named():
  with pytest.raises(TypeError, match="factory"):
    amaml.hypergradient(optax.adam(1e-3), learning_rate=1e-3)
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
  rates, traj = _run(
    amaml.hypergradient(
      optax.sgd, learning_rate=0.1, rate_rule="additive", hyper_lr=kappa, discount=mu
    ),
    6,
  )
  np.testing.assert_allclose(rates, ref, rtol=1e-12)
  np.testing.assert_allclose(traj[-1], p, rtol=1e-12)
  plain, _ = _run(
    amaml.hypergradient(optax.sgd, learning_rate=0.1, rate_rule="additive", hyper_lr=kappa), 6
  )
  assert np.all(rates[:2] == plain[:2]) and abs(rates[-1] - plain[-1]) > 1e-4  # differs from step 3


def test_discount_out_of_range_is_refused():
  with pytest.raises(ValueError, match="discount must be in"):
    amaml.hypergradient(optax.sgd, learning_rate=0.1, discount=1.0)


def test_default_is_the_normalized_rule_reference_sequence(x64):
  # beta_t = beta_{t-1} exp(-kappa m_hat / sqrt(v_hat)), Adam's moments (0.9, 0.99) on h_t
  kappa, b1, b2 = rates_lib.DEFAULT_HYPER_LR, 0.9, 0.99
  beta, p, g_prev, m, v, ref = 0.1, P0.copy(), np.zeros(3), 0.0, 0.0, []
  for t in range(1, 7):
    g = grad_np(p)
    h = -g @ g_prev  # <g_t, u_{t-1}>, u = -g for SGD
    m, v = b1 * m + (1 - b1) * h, b2 * v + (1 - b2) * h * h
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    beta = beta * np.exp(-kappa * m_hat / (np.sqrt(v_hat) + 1e-30))
    p = p - beta * g
    g_prev = g
    ref.append(beta)
  rates, traj = _run(amaml.hypergradient(optax.sgd, learning_rate=0.1), 6)
  np.testing.assert_allclose(rates, ref, rtol=1e-12)
  np.testing.assert_allclose(traj[-1], p, rtol=1e-12)
  assert rates[1] == pytest.approx(0.1 * np.exp(kappa * np.sqrt(1 - b2**2) / (1 - b1**2)))


def _two_sgd_steps(g1, g2, **kwargs):
  opt = amaml.hypergradient(optax.sgd, rate_rule="additive", **kwargs)
  params = jnp.zeros(3)
  state = opt.init(params)
  u1, state = opt.update(jnp.asarray(g1, jnp.float32), state, params)
  u2, state = opt.update(jnp.asarray(g2, jnp.float32), state, params)
  return float(state.learning_rate), np.asarray(u2)


def test_additive_rule_max_rate_caps_growth():
  # beta_2 = 0.1 + 1 * <g_2, g_1> = 0.1 + 1 + 0.5 = 1.6, capped at 0.5; u_2 = -0.5 g_2
  rate, u2 = _two_sgd_steps(
    [1.0, 1.0, 0.0], [1.0, 0.5, 2.0], learning_rate=0.1, hyper_lr=1.0, max_rate=0.5
  )
  assert rate == pytest.approx(0.5)
  np.testing.assert_allclose(u2, [-0.5, -0.25, -1.0], rtol=1e-6)
  unbounded, _ = _two_sgd_steps([1.0, 1.0, 0.0], [1.0, 0.5, 2.0], learning_rate=0.1, hyper_lr=1.0)
  assert unbounded == pytest.approx(1.6)


def test_additive_rule_min_rate_stops_a_negative_rate():
  # beta_2 = 0.9 + 1 * <g_2, g_1> = 0.9 - 3 = -2.1, kept at min_rate = 0: no step
  rate, u2 = _two_sgd_steps(
    [1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], learning_rate=0.9, hyper_lr=1.0, min_rate=0.0
  )
  assert rate == 0.0 and np.all(u2 == 0.0)
  unbounded, _ = _two_sgd_steps(
    [1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], learning_rate=0.9, hyper_lr=1.0
  )
  assert unbounded == pytest.approx(-2.1)


@pytest.mark.parametrize(
  "g2", [[-jnp.inf, 0.0, 0.0], [-3e38, 0.0, 0.0]], ids=["infinite-hypergradient", "rate-overflows"]
)
def test_nonfinite_step_keeps_the_rate_despite_the_bound(g2):
  # h_2 = <g_2, -g_1> = +inf, or 3e38 and beta = 0.1 + 10 * 3e38 overflows float32: the
  # rate stays 0.1 (the clip alone would have jumped it to max_rate = 1)
  rate, u2 = _two_sgd_steps([-1.0, 0.0, 0.0], g2, learning_rate=0.1, hyper_lr=10.0, max_rate=1.0)
  assert rate == pytest.approx(0.1)
  assert u2[0] == pytest.approx(-0.1 * g2[0], rel=1e-6)


def test_hd_step_guard_comes_before_the_clip():
  got = amaml.hd_step(
    {"a": jnp.float32(0.1), "b": jnp.float32(0.1)},
    {"a": jnp.float32(-jnp.inf), "b": jnp.float32(-100.0)},
    hyper_lr=0.01,
    max_rate=1.0,
    min_rate=0.2,
  )
  assert float(got["a"]) == pytest.approx(0.1)  # 0.1 + inf: kept as it was, not clipped to 1
  assert float(got["b"]) == pytest.approx(1.0)  # 0.1 + 1 = 1.1, clipped


def _inject(**kwargs):
  return optax.inject_hyperparams(functools.partial(amaml.hypergradient, optax.sgd))(**kwargs)


def test_inject_hyperparams_matches_and_reads_hyper_lr_every_step(x64):
  kwargs = dict(learning_rate=0.1, rate_rule="additive", hyper_lr=0.01)
  plain, traj = _run(amaml.hypergradient(optax.sgd, **kwargs), 5)
  injected, traj_i = _run(_inject(**kwargs), 5)
  np.testing.assert_allclose(injected, plain, rtol=1e-12)
  np.testing.assert_allclose(traj_i, traj, rtol=1e-12)
  # the other form: the factory as a static argument
  static = optax.inject_hyperparams(amaml.hypergradient, static_args="optimizer")(
    optax.sgd, **kwargs
  )
  np.testing.assert_allclose(_run(static, 5)[0], plain, rtol=1e-12)
  # the base optimizer's keywords come through (static): momentum changes the path
  heavy = dict(kwargs, momentum=0.9)
  np.testing.assert_allclose(
    _run(_inject(**heavy), 5)[1], _run(amaml.hypergradient(optax.sgd, **heavy), 5)[1], rtol=1e-12
  )
  assert not np.allclose(_run(_inject(**heavy), 5)[1], traj)
  # hyper_lr = 0 injected after the first step freezes the rate at beta_1 = 0.1
  opt = _inject(**kwargs)
  params = jnp.asarray(P0)
  state = opt.init(params)
  for i in range(4):
    if i == 1:
      state.hyperparams["hyper_lr"] = jnp.zeros(())
    _, state = opt.update(jnp.asarray(A) * params, state, params)
    params = params - 0.1 * jnp.asarray(A) * params
  assert float(amaml.current_learning_rate(state)) == 0.1


def test_traced_hyper_lr_and_bounds_under_jit():
  def final_rate(kappa, max_rate):
    opt = amaml.hypergradient(
      optax.sgd, learning_rate=0.1, rate_rule="additive", hyper_lr=kappa, max_rate=max_rate
    )
    params = jnp.zeros(3)
    state = opt.init(params)
    for g in ([1.0, 1.0, 0.0], [1.0, 0.5, 2.0]):
      _, state = opt.update(jnp.asarray(g), state, params)
    return state.learning_rate

  # as test_additive_rule_max_rate_caps_growth, with kappa and max_rate traced
  assert float(jax.jit(final_rate)(1.0, 0.5)) == pytest.approx(0.5)
  assert float(jax.jit(final_rate)(1.0, 10.0)) == pytest.approx(1.6)


def test_bad_numbers_are_named():
  with pytest.raises(ValueError, match="hyper_lr must be >= 0"):
    amaml.hypergradient(optax.sgd, learning_rate=0.1, hyper_lr=-1e-3)
  with pytest.raises(ValueError, match="min_rate=1.0 is above max_rate=0.5"):
    amaml.hypergradient(optax.sgd, learning_rate=0.1, min_rate=1.0, max_rate=0.5)
  with pytest.raises(ValueError, match="rate_rule must be one of"):
    amaml.hypergradient(optax.sgd, learning_rate=0.1, rate_rule="paper")
  # the default hyper_lr is the normalized rule's: the additive rule's scale is the problem's
  with pytest.raises(
    ValueError, match="rate_rule='additive' needs hyper_lr: the HD paper's is 0.001"
  ):
    amaml.hypergradient(optax.sgd, learning_rate=0.1, rate_rule="additive")
