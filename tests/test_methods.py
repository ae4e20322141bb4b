"""The methods users compare against, on the same core: Meta-SGD, ANIL and Reptile, each
against a hand-written reference on a tiny problem; vmap over tasks equals a loop; no
recompilation; the loss falls (sinusoid here, every method x optimizer in test_common)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amaml
from amaml import configs, meta, train

MODEL = amaml.models.MLP(hidden=(8, 8))
LOSS = amaml.losses.mse(lambda p, x: MODEL.apply({"params": p}, x))
HEAD = "^Dense_2/"


def _params(seed=0, dtype=jnp.float32):
  p = MODEL.init(jax.random.key(seed), jnp.zeros((1, 1)))["params"]
  return jax.tree.map(lambda x: x.astype(dtype), p)


def _batch(seed=1, tasks=3, dtype=jnp.float32):
  b = amaml.sinusoid_tasks(jax.random.key(seed), num_tasks=tasks)
  return jax.tree.map(lambda x: x.astype(dtype), b)


def _central_fd(f, tree, direction, eps):
  plus = jax.tree.map(lambda t, d: t + eps * d, tree, direction)
  minus = jax.tree.map(lambda t, d: t - eps * d, tree, direction)
  return (f(plus) - f(minus)) / (2 * eps)


def test_reptile_moves_toward_the_mean_adapted_weights():
  eps, alpha, k = 0.5, 0.02, 3
  learner = meta.reptile(LOSS, alpha=alpha, inner_steps=k, epsilon=eps)
  params, batch = _params(), _batch()
  new, metrics = learner.step(learner.init(params), batch)
  adapted = []
  for t in range(batch.num_tasks):  # the interpolation by hand, one task at a time
    p = params
    for _ in range(k):
      g = jax.grad(lambda q: LOSS(q, batch.support_x[t], batch.support_y[t])[0])(p)
      p = jax.tree.map(lambda a, b: a - alpha * b, p, g)
    adapted.append(p)
  mean = jax.tree.map(lambda *xs: sum(xs) / len(xs), *adapted)
  chex.assert_trees_all_close(new.params, jax.tree.map(lambda t, m: t + eps * (m - t), params, mean),
                              rtol=1e-5, atol=1e-6)
  query = np.mean([LOSS(a, batch.query_x[t], batch.query_y[t])[0] for t, a in enumerate(adapted)])
  np.testing.assert_allclose(metrics["loss"], query, rtol=1e-5)


def test_anil_adapts_only_the_head_and_its_meta_gradient_is_exact(x64):
  params, batch = _params(dtype=jnp.float64), _batch(dtype=jnp.float64)
  mask = amaml.inner.param_mask(params, HEAD)
  adapted, _ = amaml.adapt(LOSS, params, 0.1, batch.support_x[0], batch.support_y[0],
                           inner_steps=2, mask=mask)
  for name in ("Dense_0", "Dense_1"):  # the body: zero inner step
    chex.assert_trees_all_equal(adapted[name], params[name])
  assert not np.allclose(adapted["Dense_2"]["kernel"], params["Dense_2"]["kernel"])
  learner = meta.anil(LOSS, inner_params=HEAD, alpha=0.1, inner_steps=2)
  f = lambda p: learner.meta_loss(p, jnp.float64(0.1), batch)[0]
  g = jax.grad(f)(params)
  for seed in range(3):  # directional derivatives against central differences
    v = jax.tree.map(lambda x: jax.random.normal(jax.random.key(seed), x.shape, x.dtype), params)
    fd = _central_fd(f, params, v, 1e-5)
    np.testing.assert_allclose(optax.tree_utils.tree_vdot(g, v), fd, rtol=1e-6)
  # the body does get a meta-gradient (through the head's adaptation and the query loss)
  assert float(optax.tree.norm(g["Dense_0"])) > 1e-6


def test_meta_sgd_rate_gradient_is_exact_and_adam_steps_the_rates(x64):
  params, batch = _params(dtype=jnp.float64), _batch(dtype=jnp.float64)
  learner = meta.meta_sgd(LOSS, alpha=0.05, beta=1e-2, inner_steps=2)
  state = learner.init(params)
  assert jax.tree.structure(state.alpha) == jax.tree.structure(params)
  f = lambda a: learner.meta_loss(params, a, batch)[0]
  ga = jax.grad(f)(state.alpha)
  v = jax.tree.map(lambda x: jax.random.normal(jax.random.key(3), x.shape, x.dtype), state.alpha)
  np.testing.assert_allclose(optax.tree_utils.tree_vdot(ga, v),
                             _central_fd(f, state.alpha, v, 1e-6), rtol=1e-6)
  # one step = Adam(beta) on (params, alpha) together, from the same meta-gradient
  new, _ = learner.step(state, batch)
  g = jax.grad(lambda p: learner.meta_loss(p, state.alpha, batch)[0])(params)
  ref = optax.adam(1e-2)
  upd, _ = ref.update((g, ga), ref.init((params, state.alpha)), (params, state.alpha))
  want_params, want_alpha = optax.apply_updates((params, state.alpha), upd)
  chex.assert_trees_all_close(new.params, want_params, rtol=1e-6, atol=1e-9)
  chex.assert_trees_all_close(new.alpha, want_alpha, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["meta-sgd", "anil", "reptile"])
def test_method_meta_loss_under_vmap_equals_a_loop_and_compiles_once(method, tiny_config):
  exp = train.build(tiny_config(method=method, alpha=0.02, inner_steps=2, meta_batch=4))
  state = exp.learner.init(exp.params)
  batch = exp.sample(jax.random.key(0), None, 4)
  loss, _ = exp.learner.meta_loss(state.params, state.alpha, batch)
  one = lambda t: exp.learner.meta_loss(state.params, state.alpha,
                                        jax.tree.map(lambda x: x[t:t + 1], batch))[0]
  np.testing.assert_allclose(loss, np.mean([one(t) for t in range(4)]), rtol=1e-5)
  for i in range(2):
    state, _ = exp.learner.step(state, exp.sample(jax.random.key(i + 1), None, 4))
  assert exp.learner.step._cache_size() == 1


def test_methods_have_their_papers_defaults():
  assert configs.get_config("sinusoid", method="reptile").resolved_beta == 1.0
  assert configs.get_config("sinusoid", method="reptile").resolved_outer_optimizer == "sgd"
  assert configs.get_config("sinusoid", method="meta-sgd").resolved_beta == 1e-3
  with pytest.raises(ValueError, match="no parameter matches"):
    amaml.inner.param_mask(_params(), "^nothing/")


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_alpha_hypergradient_through_an_inner_optimizer_finite_differences(x64, name):
  params, batch = _params(dtype=jnp.float64), _batch(dtype=jnp.float64)
  learner = amaml.alpha_maml(LOSS, inner_steps=3, inner_optimizer=name)
  f = lambda a: learner.meta_loss(params, a, batch)[0]
  for alpha in (0.003, 0.03):
    a = jnp.float64(alpha)
    np.testing.assert_allclose(jax.grad(f)(a), (f(a + 1e-6) - f(a - 1e-6)) / 2e-6, rtol=1e-5)
  # and the inner optimizer is that optimizer: three heavy-ball / Adam steps written out
  p = params
  m = v = jax.tree.map(jnp.zeros_like, params)
  for t in range(1, 4):
    g = jax.grad(lambda q: LOSS(q, batch.support_x[0], batch.support_y[0])[0])(p)
    if name == "momentum":  # d = g + 0.9 d
      m = jax.tree.map(lambda mi, gi: gi + 0.9 * mi, m, g)
      d = m
    else:  # Adam (b1 0.9, b2 0.999, eps 1e-8, eps_root 1e-8), bias-corrected
      m = jax.tree.map(lambda mi, gi: 0.9 * mi + 0.1 * gi, m, g)
      v = jax.tree.map(lambda vi, gi: 0.999 * vi + 0.001 * gi ** 2, v, g)
      d = jax.tree.map(lambda mi, vi: (mi / (1 - 0.9 ** t))
                       / (jnp.sqrt(vi / (1 - 0.999 ** t) + 1e-8) + 1e-8), m, v)
    p = jax.tree.map(lambda a, b: a - 0.03 * b, p, d)
  adapted, _ = amaml.adapt(LOSS, params, 0.03, batch.support_x[0], batch.support_y[0],
                           inner_steps=3, optimizer=amaml.inner.inner_optimizer(name))
  chex.assert_trees_all_close(adapted, p, rtol=1e-12, atol=1e-14)


def test_multi_step_loss_is_the_weighted_sum_over_inner_steps():
  params, batch = _params(), _batch()
  k, anneal = 3, 10
  learner = amaml.alpha_maml(LOSS, inner_steps=k, multi_step_loss=anneal)
  for step in (0, 4, 10, 50):
    w = meta.msl_weights(step, k, anneal)
    np.testing.assert_allclose(float(jnp.sum(w)), 1.0, rtol=1e-6)
    want = []
    for t in range(batch.num_tasks):
      p, per_step = params, []
      for _ in range(k):
        g = jax.grad(lambda q: LOSS(q, batch.support_x[t], batch.support_y[t])[0])(p)
        p = jax.tree.map(lambda a, b: a - 0.1 * b, p, g)
        per_step.append(LOSS(p, batch.query_x[t], batch.query_y[t])[0])
      want.append(float(jnp.dot(w, jnp.stack(per_step))))
    got, aux = learner.meta_loss(params, jnp.float32(0.1), batch, step=step)
    np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)
  # weights: uniform at 0, the last step dominant once annealed, non-increasing in between
  np.testing.assert_allclose(meta.msl_weights(0, k, anneal), [1 / 3] * 3, rtol=1e-6)
  assert float(meta.msl_weights(anneal, k, anneal)[-1]) > 0.97


def test_derivative_order_annealing_switches_from_first_to_second_order():
  params, batch = _params(), _batch()
  fo = amaml.maml(LOSS, alpha=0.1, inner_steps=2, first_order=True)
  so = amaml.maml(LOSS, alpha=0.1, inner_steps=2)
  doa = amaml.maml(LOSS, alpha=0.1, inner_steps=2, first_order_steps=3, optimizer=optax.sgd,
                   beta=1.0)
  g = lambda l: jax.grad(lambda p: l.meta_loss(p, jnp.float32(0.1), batch)[0])(params)
  state = doa.init(params)
  for step, want in ((0, g(fo)), (2, g(fo)), (3, g(so)), (7, g(so))):
    new, _ = doa.step(state._replace(step=jnp.int32(step)), batch)
    # beta = 1 plain SGD: the update is minus the gradient the step used
    chex.assert_trees_all_close(jax.tree.map(lambda a, b: a - b, params, new.params), want,
                                rtol=1e-4, atol=1e-6)
  assert doa.step._cache_size() == 1
  assert float(optax.tree.norm(jax.tree.map(lambda a, b: a - b, g(fo), g(so)))) > 1e-4


def test_protonet_logits_are_minus_squared_distances_to_the_prototypes():
  embed = lambda p, x: x.reshape(x.shape[0], -1) @ p["w"]
  params = {"w": jax.random.normal(jax.random.key(0), (4, 3))}
  learner = meta.protonet(embed, ways=2)
  sx = jax.random.normal(jax.random.key(1), (1, 4, 4))  # 2 ways x 2 shots
  sy = jnp.array([[0, 1, 0, 1]])
  qx = jax.random.normal(jax.random.key(2), (1, 3, 4))
  qy = jnp.array([[1, 0, 1]])
  batch = amaml.TaskBatch(sx, sy, qx, qy)
  loss, aux = learner.meta_loss(params, 0.0, batch)
  zs, zq = np.asarray(sx[0] @ params["w"]), np.asarray(qx[0] @ params["w"])
  protos = np.stack([zs[[0, 2]].mean(0), zs[[1, 3]].mean(0)])
  logits = -((zq[:, None] - protos[None]) ** 2).sum(-1)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(loss, -logp[np.arange(3), [1, 0, 1]].mean(), rtol=1e-5)
  np.testing.assert_allclose(aux["accuracy"], np.mean(logits.argmax(-1) == [1, 0, 1]))
  # vmap over tasks equals a loop
  two = jax.tree.map(lambda x: jnp.concatenate([x, x[:, ::-1]]), batch)
  per = [learner.meta_loss(params, 0.0, jax.tree.map(lambda x: x[t:t + 1], two))[0] for t in (0, 1)]
  np.testing.assert_allclose(learner.meta_loss(params, 0.0, two)[0], np.mean(per), rtol=1e-6)
