"""The methods users compare against, on the same core: Meta-SGD, ANIL and Reptile, each
against a hand-written reference on a tiny problem; vmap over tasks equals a loop; no
recompilation; the loss falls (sinusoid here, every method x optimizer in test_common)."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amaml
from amaml import configs, meta, train
from amaml.data import sample_tasks

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
  chex.assert_trees_all_close(
    new.params, jax.tree.map(lambda t, m: t + eps * (m - t), params, mean), rtol=1e-5, atol=1e-6
  )
  query = np.mean([LOSS(a, batch.query_x[t], batch.query_y[t])[0] for t, a in enumerate(adapted)])
  np.testing.assert_allclose(metrics["loss"], query, rtol=1e-5)


def test_anil_adapts_only_the_head_and_its_meta_gradient_is_exact(x64):
  params, batch = _params(dtype=jnp.float64), _batch(dtype=jnp.float64)
  mask = amaml.inner.param_mask(params, HEAD)
  adapted, _ = amaml.adapt(
    LOSS, params, 0.1, batch.support_x[0], batch.support_y[0], inner_steps=2, mask=mask
  )
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
  np.testing.assert_allclose(
    optax.tree_utils.tree_vdot(ga, v), _central_fd(f, state.alpha, v, 1e-6), rtol=1e-6
  )
  # one step = Adam(beta) on (params, alpha) together, from the same meta-gradient
  new, _ = learner.step(state, batch)
  g = jax.grad(lambda p: learner.meta_loss(p, state.alpha, batch)[0])(params)
  ref = optax.adam(1e-2)
  upd, _ = ref.update((g, ga), ref.init((params, state.alpha)), (params, state.alpha))
  want_params, want_alpha = optax.apply_updates((params, state.alpha), upd)
  chex.assert_trees_all_close(new.params, want_params, rtol=1e-6, atol=1e-9)
  chex.assert_trees_all_close(new.alpha, want_alpha, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["meta-sgd", "anil", "reptile", "maml++"])
def test_method_meta_loss_under_vmap_equals_a_loop_and_compiles_once(method, tiny_config):
  exp = train.build(tiny_config(method=method, alpha=0.02, inner_steps=2, meta_batch=4))
  state = exp.learner.init(exp.params)
  batch = exp.sample(jax.random.key(0), None, 4)
  loss, _ = exp.learner.meta_loss(state.params, state.alpha, batch)
  one = lambda t: exp.learner.meta_loss(
    state.params, state.alpha, jax.tree.map(lambda x: x[t : t + 1], batch)
  )[0]
  np.testing.assert_allclose(loss, np.mean([one(t) for t in range(4)]), rtol=1e-5)
  for i in range(2):
    state, _ = exp.learner.step(state, exp.sample(jax.random.key(i + 1), None, 4))
  assert exp.learner.step._cache_size() == 1


def test_reptile_epsilon_schedule_is_the_papers_linear_anneal():
  n = 400  # hand-computed: epsilon0 * (1 - t / n), 0 from step n on
  eps = amaml.epsilon_schedule(1.0, n)
  for t, want in (
    (0, 1.0),
    (n // 4, 0.75),
    (n // 2, 0.5),
    (3 * n // 4, 0.25),
    (n - 1, 0.0025),
    (n, 0.0),
    (2 * n, 0.0),
  ):
    np.testing.assert_allclose(float(eps(t)), want, rtol=1e-6, atol=1e-7, err_msg=f"step {t}")
  np.testing.assert_allclose(float(amaml.epsilon_schedule(0.5, 10)(4)), 0.3, rtol=1e-6)
  assert amaml.epsilon_schedule(0.7, 10, "constant") == 0.7
  with pytest.raises(ValueError, match="iterations"):
    amaml.epsilon_schedule(1.0, None)
  with pytest.raises(ValueError, match="use linear or constant"):
    amaml.epsilon_schedule(1.0, 10, "cosine")


def test_reptile_step_with_the_schedule_moves_by_epsilon_t_times_the_mean_difference():
  alpha, k, n = 0.02, 2, 8
  learner = meta.reptile(LOSS, alpha=alpha, inner_steps=k, epsilon=amaml.epsilon_schedule(1.0, n))
  state = learner.init(_params())
  for t in range(3):
    batch = _batch(seed=10 + t)
    new, metrics = learner.step(state, batch)
    adapted = []
    for i in range(batch.num_tasks):  # the inner loop by hand
      p = state.params
      for _ in range(k):
        g = jax.grad(lambda q: LOSS(q, batch.support_x[i], batch.support_y[i])[0])(p)
        p = jax.tree.map(lambda a, b: a - alpha * b, p, g)
      adapted.append(p)
    mean = jax.tree.map(lambda *xs: sum(xs) / len(xs), *adapted)
    eps_t = 1.0 - t / n  # 1, 0.875, 0.75
    chex.assert_trees_all_close(
      new.params,
      jax.tree.map(lambda th, m: th + eps_t * (m - th), state.params, mean),
      rtol=1e-5,
      atol=1e-6,
    )
    np.testing.assert_allclose(metrics["epsilon"], eps_t, rtol=1e-6)
    state = new


def test_reptile_schedule_resumes_exactly_from_a_checkpoint(tmp_path):
  """The schedule's step count is in the optimizer state: a state saved after 3 steps and
  restored continues exactly as the uninterrupted run."""
  from amaml.checkpoint import Checkpointer

  learner = meta.reptile(LOSS, alpha=0.02, inner_steps=2, epsilon=amaml.epsilon_schedule(1.0, 6))
  straight = learner.init(_params())
  for t in range(6):
    straight, m = learner.step(straight, _batch(seed=t))
  assert float(m["epsilon"]) == pytest.approx(1 / 6)
  half = learner.init(_params())
  for t in range(3):
    half, _ = learner.step(half, _batch(seed=t))
  ckpt = Checkpointer(tmp_path / "c")
  ckpt.save(3, half)
  resumed = ckpt.restore(learner.init(_params()), 3)
  ckpt.close()
  for t in range(3, 6):
    resumed, _ = learner.step(resumed, _batch(seed=t))
  chex.assert_trees_all_equal(straight, resumed)


def test_reptile_config_epsilon_flags():
  cfg = configs.get_config("sinusoid", method="reptile")
  assert (cfg.resolved_epsilon, cfg.resolved_epsilon_schedule) == (1.0, "linear")
  assert cfg.resolved_outer_optimizer == "sgd" and cfg.beta is None
  learner = train.make_learner(dataclasses.replace(cfg, iterations=4), LOSS)
  state = learner.init(_params())
  eps = []
  for t in range(5):
    state, m = learner.step(state, _batch(seed=t))
    eps.append(float(m["epsilon"]))
  np.testing.assert_allclose(eps, [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-7)
  const = configs.get_config("sinusoid", method="reptile", epsilon=0.3, epsilon_schedule="constant")
  state = train.make_learner(const, LOSS).init(_params())
  assert float(train.make_learner(const, LOSS).step(state, _batch())[1]["epsilon"]) == (
    pytest.approx(0.3)
  )
  # --beta, reptile's old name for epsilon, still sets it; both at once is refused
  assert configs.get_config("sinusoid", method="reptile", beta=0.5).resolved_epsilon == 0.5
  with pytest.raises(ValueError, match="pass --epsilon alone"):
    configs.get_config("sinusoid", method="reptile", beta=0.5, epsilon=0.5)
  with pytest.raises(ValueError, match="method 'maml' takes --beta"):
    configs.get_config("sinusoid", method="maml", epsilon=0.5)
  with pytest.raises(ValueError, match="epsilon=0.0 must be > 0"):
    configs.get_config("sinusoid", method="reptile", epsilon=0.0)
  # a Reptile run written before the schedule existed trained at a constant epsilon
  old = dataclasses.asdict(configs.get_config("sinusoid", method="reptile", beta=0.5))
  del old["epsilon"], old["epsilon_schedule"]
  import json

  back = configs.Config.from_json(json.dumps(old))
  assert (back.resolved_epsilon, back.resolved_epsilon_schedule) == (0.5, "constant")


def test_reptile_defaults_train_on_sinusoid_where_alpha_0_1_diverged(tmp_path):
  """Reptile's defaults on sinusoid (SGD at 0.02 for 5 steps): 200 steps stay finite and the
  loss falls. Its former defaults (alpha 0.1, 1 step: plain SGD at 0.1) went non-finite."""
  import json

  cfg = configs.get_config(
    "sinusoid",
    method="reptile",
    iterations=200,
    log_every=100,
    val_every=0,
    checkpoint_every=0,
    hidden=40,
  )
  assert (cfg.alpha, cfg.inner_steps, cfg.inner_optimizer) == (0.02, 5, "sgd")
  train.train(cfg, tmp_path / "r", progress=False, evaluate_at_end=False)
  recs = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
  assert all(r["nonfinite_steps"] == 0 for r in recs)
  assert recs[-1]["loss"] < recs[0]["loss"] and recs[-1]["epsilon"] == pytest.approx(
    0.005, rel=1e-4
  )


def test_cli_reptile_non_finite_stop_is_one_line_and_exit_3(tmp_path, capsys):
  from amaml import cli

  args = [
    "train",
    "--config",
    "sinusoid",
    "--method",
    "reptile",
    "--no_progress",
    "--out",
    str(tmp_path / "r"),
    "--iterations",
    "20",
    "--hidden",
    "8",
    "--meta_batch",
    "2",
    "--log_every",
    "10",
    "--checkpoint_every",
    "10",
    "--eval_tasks",
    "10",
    "--eval_batch",
    "10",
    "--max_nonfinite",
    "3",
    "--alpha",
    "0.1",
    "--inner_steps",
    "1",
    "--epsilon",
    "1e30",
  ]
  assert cli.main(args) == 3
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err, err
  assert err.startswith("amaml train: 3 non-finite meta steps in a row by step ") and (
    "Lower --alpha or --epsilon" in err
  ), err


def test_methods_have_their_papers_defaults():
  assert configs.get_config("sinusoid", method="reptile").resolved_epsilon == 1.0
  assert configs.get_config("sinusoid", method="reptile").resolved_outer_optimizer == "sgd"
  assert configs.get_config("omniglot-5w1s", method="reptile").inner_optimizer == "adam"
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
      v = jax.tree.map(lambda vi, gi: 0.999 * vi + 0.001 * gi**2, v, g)
      d = jax.tree.map(
        lambda mi, vi: (mi / (1 - 0.9**t)) / (jnp.sqrt(vi / (1 - 0.999**t) + 1e-8) + 1e-8), m, v
      )
    p = jax.tree.map(lambda a, b: a - 0.03 * b, p, d)
  adapted, _ = amaml.adapt(
    LOSS,
    params,
    0.03,
    batch.support_x[0],
    batch.support_y[0],
    inner_steps=3,
    optimizer=amaml.inner.inner_optimizer(name),
  )
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
  doa = amaml.maml(
    LOSS, alpha=0.1, inner_steps=2, first_order_steps=3, optimizer=optax.sgd, beta=1.0
  )
  g = lambda l: jax.grad(lambda p: l.meta_loss(p, jnp.float32(0.1), batch)[0])(params)
  state = doa.init(params)
  for step, want in ((0, g(fo)), (2, g(fo)), (3, g(so)), (7, g(so))):
    new, _ = doa.step(state._replace(step=jnp.int32(step)), batch)
    # beta = 1 plain SGD: the update is minus the gradient the step used
    chex.assert_trees_all_close(
      jax.tree.map(lambda a, b: a - b, params, new.params), want, rtol=1e-4, atol=1e-6
    )
  assert doa.step._cache_size() == 1
  assert float(optax.tree.norm(jax.tree.map(lambda a, b: a - b, g(fo), g(so)))) > 1e-4


def test_derivative_order_phases_equal_the_annealed_update(x64):
  """MAML++'s first- and second-order phases, each its own program, give what the one update
  holding both under lax.cond gives on their steps (multi-step loss and per-step rates on)."""
  params, batch = _params(dtype=jnp.float64), _batch(dtype=jnp.float64)
  learner = amaml.maml_plus_plus(
    LOSS, alpha=0.05, inner_steps=3, first_order_steps=3, multi_step_loss=5
  )
  assert [(p.start, p.end) for p in map(lambda s: meta.phase_at(learner, s), (0, 2, 3, 9))] == [
    (0, 3),
    (0, 3),
    (3, None),
    (3, None),
  ]
  state = learner.init(params)
  update = jax.jit(learner.update)
  phases = {start: jax.jit(fn) for start, fn in learner.phases}
  for step in (0, 2, 3, 7):
    st = state._replace(step=jnp.int32(step))
    want = update(st, batch)
    got = phases[meta.phase_at(learner, step).start](st, batch)
    chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-14)
  first, second = (phases[s](state._replace(step=jnp.int32(5)), batch)[0] for s in (0, 3))
  assert (
    float(optax.tree.norm(jax.tree.map(lambda a, b: a - b, first.params, second.params))) > 1e-6
  )
  # one phase where there is one order
  for one in (amaml.maml(LOSS), amaml.maml_plus_plus(LOSS, first_order_steps=0)):
    assert one.phases == () and meta.phase_at(one, 10) == (0, None, one.update)
  assert amaml.maml_plus_plus(LOSS, first_order=True).phases == ()


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
  per = [
    learner.meta_loss(params, 0.0, jax.tree.map(lambda x: x[t : t + 1], two))[0] for t in (0, 1)
  ]
  np.testing.assert_allclose(learner.meta_loss(params, 0.0, two)[0], np.mean(per), rtol=1e-6)


def _scaled_loss(p, x, y):
  """A linear model with a 'norm' scale: pred = scale * (x w + b)."""
  pred = p["norm"]["scale"] * (x @ p["lin"]["w"] + p["lin"]["b"])
  return jnp.mean((pred - y) ** 2), {}


def test_per_step_rates_and_parameters_follow_a_hand_written_inner_loop(x64):
  params = {
    "lin": {"w": jnp.array([[0.3]]), "b": jnp.array([0.1])},
    "norm": {"scale": jnp.array(1.0)},
  }
  batch = _batch(dtype=jnp.float64)
  k = 3
  learner = amaml.alpha_maml(
    _scaled_loss,
    inner_steps=k,
    alpha=0.1,
    alpha_granularity="tensor",
    alpha_per_step=True,
    per_step_params="^norm/",
  )
  state = learner.init(params)
  assert state.params["norm"]["scale"].shape == (k,) and state.alpha["lin"]["w"].shape == (k,)
  p = {**state.params, "norm": {"scale": jnp.array([1.5, 0.5, 2.0])}}
  a = {
    "lin": {"w": jnp.array([0.1, 0.05, 0.2]), "b": jnp.array([0.02, 0.3, 0.1])},
    "norm": {"scale": jnp.zeros(k)},
  }

  def by_hand(t, steps):
    """Step j: copy min(j, k-1) of the scale and of the rates; the scale never adapts."""
    lin, sx, sy = params["lin"], batch.support_x[t], batch.support_y[t]
    for j in range(steps):
      c = min(j, k - 1)
      scaled = lambda q: _scaled_loss({"lin": q, "norm": {"scale": p["norm"]["scale"][c]}}, sx, sy)[
        0
      ]
      g = jax.grad(scaled)(lin)
      lin = {n: lin[n] - a["lin"][n][c] * g[n] for n in lin}
    last = p["norm"]["scale"][min(max(steps - 1, 0), k - 1)]  # the query after `steps` steps
    return _scaled_loss({"lin": lin, "norm": {"scale": last}}, batch.query_x[t], batch.query_y[t])[
      0
    ]

  want = np.mean([by_hand(t, k) for t in range(batch.num_tasks)])
  np.testing.assert_allclose(learner.meta_loss(p, a, batch)[0], want, rtol=1e-10)
  # a longer test-time adaptation reuses the last step's copies; the curve holds every count
  ev = learner.evaluate(p, a, batch, inner_steps=5)
  np.testing.assert_allclose(
    ev["loss"], [by_hand(t, 5) for t in range(batch.num_tasks)], rtol=1e-10
  )
  curve = learner.adaptation_curve(p, a, batch, inner_steps=5)["loss"]
  np.testing.assert_allclose(curve[1], [by_hand(1, s) for s in range(6)], rtol=1e-10)
  # the meta-gradient through the per-step copies and rates: central differences
  f = lambda pa: learner.meta_loss(*pa, batch)[0]
  g = jax.grad(f)((p, a))
  for seed in range(3):
    v = jax.tree.map(lambda x: jax.random.normal(jax.random.key(seed), x.shape, x.dtype), (p, a))
    np.testing.assert_allclose(
      optax.tree_utils.tree_vdot(g, v), _central_fd(f, (p, a), v, 1e-6), rtol=1e-6
    )
  assert np.all(np.abs(g[0]["norm"]["scale"]) > 0) and np.all(np.abs(g[1]["lin"]["w"]) > 0)


@pytest.mark.parametrize("unroll,remat", [(True, False), (1, False), (1, True)])
def test_multi_step_loss_scan_equals_a_hand_unrolled_loop(x64, unroll, remat):
  """MAML++'s loss (per-step rates and scale, the query loss after every step, weighted) and
  its gradients, first and second order, against the Python loop it was once written as."""
  params = {"lin": {"w": jnp.array([[0.3]]), "b": jnp.array([0.1])}, "norm": {"scale": 1.0}}
  batch, k, anneal = _batch(dtype=jnp.float64), 3, 10
  p = {"lin": params["lin"], "norm": {"scale": jnp.array([1.5, 0.5, 2.0])}}
  a = {
    "lin": {"w": jnp.array([0.1, 0.05, 0.2]), "b": jnp.array([0.02, 0.3, 0.1])},
    "norm": {"scale": jnp.zeros(k)},
  }

  def by_hand(p, a, step, fo):
    w, total = meta.msl_weights(step, k, anneal), 0.0
    for t in range(batch.num_tasks):
      lin, sx, sy = p["lin"], batch.support_x[t], batch.support_y[t]
      for j in range(k):
        norm = {"scale": p["norm"]["scale"][j]}
        g = jax.grad(lambda q: _scaled_loss({"lin": q, "norm": norm}, sx, sy)[0])(lin)
        g = jax.lax.stop_gradient(g) if fo else g
        lin = {n: lin[n] - a["lin"][n][j] * g[n] for n in lin}
        query = _scaled_loss({"lin": lin, "norm": norm}, batch.query_x[t], batch.query_y[t])
        total = total + w[j] * query[0]
    return total / batch.num_tasks

  for step, fo in ((0, False), (4, True), (50, False)):
    learner = amaml.maml_plus_plus(
      _scaled_loss,
      inner_steps=k,
      multi_step_loss=anneal,
      first_order=fo,
      first_order_steps=0,
      per_step_params="^norm/",
      unroll=unroll,
      remat=remat,
    )
    assert learner.init(params).alpha["lin"]["w"].shape == (k,)
    got = jax.value_and_grad(lambda pa: learner.meta_loss(*pa, batch, step=step)[0])((p, a))
    want = jax.value_and_grad(lambda pa: by_hand(*pa, step, fo))((p, a))
    chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-13)


def _conv4_maml_plus_plus():
  model = amaml.models.Conv4(num_classes=5, hidden=4)
  params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  loss = amaml.losses.cross_entropy(lambda p, x: model.apply({"params": p}, x))
  cfg = configs.get_config("omniglot-5w1s", method="maml++", inner_steps=2, hidden=4)
  return cfg, loss, params, train.make_learner(cfg, loss)


def test_maml_plus_plus_on_conv4_keeps_batch_norm_and_rates_per_step():
  cfg, loss, params, learner = _conv4_maml_plus_plus()
  state = learner.init(params)
  assert state.params["norm0"]["scale"].shape == (2, 4)  # one copy per inner step
  assert state.params["conv0"]["kernel"].shape == params["conv0"]["kernel"].shape
  assert state.alpha["conv0"]["kernel"].shape == (2,)  # a rate per layer and step
  off = train.make_learner(dataclasses.replace(cfg, alpha_per_step=False, per_step_params=""), loss)
  assert off.init(params).params["norm0"]["scale"].shape == (4,)


@pytest.mark.slow  # ~35 s to compile; the per-step copies' meta-gradient is checked by hand above
def test_maml_plus_plus_on_conv4_learns_each_steps_batch_norm():
  _, _, params, learner = _conv4_maml_plus_plus()
  state = learner.init(params)
  key = jax.random.key(1)
  images = jax.random.randint(key, (8, 4, 28, 28, 1), 0, 256).astype(jnp.uint8)
  new, metrics = learner.step(state, sample_tasks(key, images, 5, 1, 2, 2))
  assert np.isfinite(float(metrics["loss"]))
  moved = np.abs(np.asarray(new.params["norm0"]["scale"] - state.params["norm0"]["scale"]))
  assert np.all(moved.sum(-1) > 0)  # each step's copy is learned


def test_alpha_granularity_sets_one_rate_per_tensor_or_parameter_from_the_config():
  from amaml import cli

  args = cli._parser().parse_args(
    ["train", "--config", "sinusoid", "--alpha_granularity", "tensor"]
  )
  assert args.alpha_granularity == "tensor"
  model = amaml.models.MLP()
  params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
  loss = amaml.losses.mse(lambda p, x: model.apply({"params": p}, x))
  for granularity, shape in (("tensor", lambda p: ()), ("parameter", jnp.shape)):
    cfg = configs.get_config("sinusoid", alpha_granularity=granularity, alpha=0.01)
    learner = train.make_learner(cfg, loss)
    state = learner.init(params)
    chex.assert_trees_all_equal_shapes(
      state.alpha, jax.tree.map(lambda p: jnp.zeros(shape(p)), params)
    )
    for seed in range(4):  # the normalised rule's first step is the same for every rate
      state, _ = learner.step(state, amaml.sinusoid_tasks(jax.random.key(seed), 4))
    moved = np.array([float(jnp.mean(a)) for a in jax.tree.leaves(state.alpha)])
    assert len(set(np.round(moved, 7))) > 1  # each tensor's rate follows its own hypergradient
  with pytest.raises(ValueError, match="alpha_granularity is for alpha-maml"):
    configs.get_config("sinusoid", method="meta-sgd", alpha_granularity="tensor")
