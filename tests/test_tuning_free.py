"""The tuning-free default: scale invariance, recovery of a known best inner rate from far-off
starts, backtracking, the guards under the default, test-time adaptation chosen on
validation tasks, and named configs that carry no rate setting of their own."""

import dataclasses
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import slow_except

import amaml
from amaml import configs, meta, methods, rates, train

MODEL = amaml.models.MLP(hidden=(16, 16))


def _mse(scale=1.0):
  base = amaml.losses.mse(lambda p, x: MODEL.apply({"params": p}, x))
  return lambda p, x, y: (lambda l, aux: (scale * l, aux))(*base(p, x, y))


def _params(seed=0):
  return MODEL.init(jax.random.key(seed), jnp.zeros((1, 1)))["params"]


def _run(learner, params, steps, seed=1):
  state = learner.init(params)
  alphas, betas = [], []
  key = jax.random.key(seed)
  for _ in range(steps):
    key, sub = jax.random.split(key)
    state, m = learner.step(state, amaml.sinusoid_tasks(sub, num_tasks=8))
    alphas.append(float(m["alpha"]))
    betas.append(float(m["beta"]))
  return state, np.array(alphas), np.array(betas)


@pytest.mark.parametrize("outer", slow_except(["default", "dadapt", "adam"], {"default", "dadapt"}))
def test_default_is_scale_invariant(x64, outer):
  """Loss x 1000 with alpha0 / 1000 is the same run: the inner step is unchanged, the outer
  optimizer (the default's Adam at a fixed beta, D-Adaptation's AdamW, or Adam with beta by
  the normalized rule) and alpha's
  normalized rule see gradients and hypergradients 1000x (1e6x for alpha) larger and take
  the same steps. So alpha's trajectory is exactly 1/1000 of the original, beta's (D-Adaptation's
  estimate, or the hypergradient-adapted rate) is the same, and so are the weights (float64,
  and the optimizer's epsilon far below every gradient, so that only rounding differs)."""
  params = jax.tree.map(lambda x: x.astype(jnp.float64), _params())  # float64 weights too
  kw = {
    "default": dict(eps=1e-30),
    "dadapt": dict(optimizer=optax.contrib.dadapt_adamw(eps=1e-30, estim_lr0=1e-6)),
    "adam": dict(optimizer=optax.adam, eps=1e-30),
  }[outer]
  s1, a1, b1 = _run(amaml.alpha_maml(_mse(), alpha=0.3, **kw), params, 25)
  s2, a2, b2 = _run(amaml.alpha_maml(_mse(1000.0), alpha=0.3e-3, **kw), params, 25)
  assert np.ptp(np.log(a1)) > 0.3  # alpha really moved (and backtracked on the way)
  assert np.ptp(np.log(b1)) > 0.1 or outer == "default"  # so did beta, unless held fixed
  np.testing.assert_allclose(a2 * 1000, a1, rtol=1e-6)
  np.testing.assert_allclose(b2, b1, rtol=1e-6)
  close = lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)
  jax.tree.map(close, s1.params, s2.params)


def test_paper_additive_rule_is_not_scale_invariant():
  params = _params()
  _, a1, b1 = _run(amaml.alpha_maml_paper(_mse(), alpha=0.03), params, 10)
  _, a2, b2 = _run(amaml.alpha_maml_paper(_mse(1000.0), alpha=0.03e-3), params, 10)
  assert not np.allclose(a2 * 1000, a1, rtol=1e-2)


# Quadratic tasks with a known best inner rate. Task i: the support loss is
# 0.5 * H * |w - c_i|^2 and the query loss 0.5 * H * |w - c_i - e_i|^2, with the query's
# centre shifted by noise e_i independent of everything else. One inner step gives
# w' - c_i = (1 - alpha H)(w - c_i), so the expected query loss is
# 0.5 H ((1 - alpha H)^2 E|w - c|^2 + E|e|^2): whatever w is, it is smallest at alpha* = 1/H.
H = 4.0
ALPHA_STAR = 1.0 / H


def _quadratic_loss(p, x, y):
  del y
  return 0.5 * H * jnp.sum((p["w"] - jnp.mean(x, axis=0)) ** 2), {}


def _quadratic_tasks(key, num_tasks=16, dim=8):
  kc, ke = jax.random.split(key)
  c = jax.random.normal(kc, (num_tasks, 1, dim))
  e = 0.3 * jax.random.normal(ke, (num_tasks, 1, dim))
  y = jnp.zeros((num_tasks, 1))
  return amaml.TaskBatch(c, y, c + e, y)


@pytest.mark.parametrize("factor", [100.0, 0.01])
def test_recovers_the_best_inner_rate_from_far_off_starts(factor):
  """From alpha0 = 100 alpha* (backtracking halves it, then hypergradient steps) and from
  alpha0 = alpha* / 100 (at most about 3% a step: log(100) / 0.03 = 154 steps, and Adam's
  normalised step is a little below 1), alpha is within 20% of alpha* in 300 steps and
  stays there."""
  learner = amaml.alpha_maml(_quadratic_loss, alpha=factor * ALPHA_STAR)
  state = learner.init({"w": jnp.zeros(8)})
  key = jax.random.key(0)
  alphas = []
  for _ in range(400):
    key, sub = jax.random.split(key)
    state, m = learner.step(state, _quadratic_tasks(sub))
    alphas.append(float(m["alpha"]))
  alphas = np.array(alphas)
  assert abs(alphas[299] / ALPHA_STAR - 1) < 0.2, alphas[299]
  assert np.all(np.abs(alphas[300:] / ALPHA_STAR - 1) < 0.2)


def test_backtracking_halves_alpha_and_holds_everything_else():
  learner = amaml.alpha_maml(_mse(), alpha=5.0)  # one MLP step at 5.0 overshoots badly
  params = _params()
  state = learner.init(params)
  batch = amaml.sinusoid_tasks(jax.random.key(3), num_tasks=8)
  new, m = learner.step(state, batch)
  assert bool(m["backtracked"]) and float(m["loss"]) > float(m["pre_loss"])
  jax.tree.map(lambda a: np.testing.assert_allclose(a, 2.5), new.alpha)  # every tensor's alpha
  jax.tree.map(np.testing.assert_array_equal, new.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, new.opt_state, state.opt_state)
  jax.tree.map(np.testing.assert_array_equal, new.alpha_state, state.alpha_state)
  assert int(new.step) == 1 and int(new.nonfinite_streak) == 0

  # at a small alpha adaptation helps: an ordinary step, weights move
  small = amaml.alpha_maml(_mse(), alpha=1e-3).init(params)
  new, m = learner.step(small, batch)
  assert not bool(m["backtracked"])
  assert float(m["loss"]) <= float(m["pre_loss"])
  assert not np.allclose(jax.tree.leaves(new.params)[0], jax.tree.leaves(params)[0])


def test_backtracking_recovers_from_an_overflowing_alpha():
  """An alpha so large that the adapted loss overflows is halved until training can go on,
  where plain hypergradient steps could never leave it (every step is non-finite)."""
  learner = amaml.alpha_maml(_mse(), alpha=1e20)
  state, alphas, _ = _run(learner, _params(), 80)
  assert alphas[-1] < 1.0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))
  stuck = amaml.alpha_maml(_mse(), alpha=1e20, backtrack=False)
  _, alphas, _ = _run(stuck, _params(), 10)
  assert alphas[-1] == pytest.approx(1e20)


def test_guards_hold_under_the_default():
  learner = amaml.alpha_maml(_mse(), alpha=0.05, alpha_min=0.04, alpha_max=0.06)
  state = learner.init(_params())
  key = jax.random.key(0)
  for _ in range(30):
    key, sub = jax.random.split(key)
    state, m = learner.step(state, amaml.sinusoid_tasks(sub, num_tasks=8))
    assert 0.04 - 1e-7 <= float(m["alpha"]) <= 0.06 + 1e-7
  batch = amaml.sinusoid_tasks(key, num_tasks=8)
  bad = batch._replace(query_y=batch.query_y.at[0, 0].set(jnp.nan))
  new, m = learner.step(state, bad)
  assert bool(m["nonfinite"]) and not bool(m["backtracked"])  # a bad batch is not a bad alpha
  jax.tree.map(np.testing.assert_array_equal, new.params, state.params)
  np.testing.assert_array_equal(new.alpha, state.alpha)
  assert int(new.nonfinite_streak) == 1
  bad = batch._replace(support_x=batch.support_x.at[1, 2, 0].set(jnp.nan))  # only the
  new, m = learner.step(state, bad)  # adapted loss is NaN: still the data's fault
  assert bool(m["nonfinite"]) and not bool(m["backtracked"])
  np.testing.assert_array_equal(new.alpha, state.alpha)


def test_default_rates_resolve_per_rule():
  assert methods._default_hyper_lrs("normalized", None, None) == (rates.DEFAULT_HYPER_LR,) * 2
  assert methods._default_hyper_lrs("additive", None, None) == (
    rates.PAPER_ALPHA_LR,
    rates.PAPER_BETA_LR,
  )
  assert methods._default_hyper_lrs("additive", 5e-3, None) == (5e-3, rates.PAPER_BETA_LR)
  with pytest.raises(ValueError, match="log"):
    methods._default_hyper_lrs("log", None, None)


@pytest.mark.parametrize("name", sorted(configs.CONFIGS))
def test_configs_carry_no_rate_settings_of_their_own(name):
  """Every named config uses the library's default rule, hypergradient rates, guard,
  bounds and initial rates: nothing about the rates is tuned per problem."""
  cfg = configs.CONFIGS[name]
  lib = amaml.alpha_maml.__kwdefaults__
  default = configs.Config()
  assert cfg.rate_rule == lib["rate_rule"] == rates.DEFAULT_RULE
  assert inspect.signature(rates.rate_rule).parameters["rate_rule"].default == cfg.rate_rule
  assert inspect.signature(amaml.hypergradient).parameters["rate_rule"].default == cfg.rate_rule
  assert cfg.alpha_lr is None and cfg.beta_lr is None  # the rule's default
  assert cfg.backtrack is lib["backtrack"] is True
  assert (cfg.alpha_min, cfg.alpha_max) == (lib["alpha_min"], lib["alpha_max"])
  assert (cfg.beta_min, cfg.beta_max) == (lib["beta_min"], lib["beta_max"])
  assert cfg.beta is None  # the method's own beta0 (Config.resolved_beta)
  assert (
    (cfg.alpha, cfg.resolved_beta)
    == (lib["alpha"], lib["beta"])
    == (default.alpha, default.resolved_beta)
  )
  assert cfg.test_adaptation == "select"
  # the outer optimizer is the method's own: for alpha-maml the library's default, Adam at
  # 1e-3 with beta fixed, after alpha0's search
  assert cfg.outer_optimizer is None and lib["optimizer"] is None
  assert configs.METHOD_OUTER_OPTIMIZER["alpha-maml"] == "adam"
  assert cfg.resolved_beta_lr == 0.0 and cfg.resolved_alpha_search
  assert dataclasses.replace(cfg, outer_optimizer="adam").resolved_beta_lr is None
  assert not dataclasses.replace(cfg, method="maml").resolved_alpha_search


# over conftest's tiny sinusoid config: the config's own network and meta-batch
TINY = dict(
  hidden=40,
  meta_batch=25,
  log_every=20,
  checkpoint_every=0,
  eval_tasks=50,
  eval_batch=25,
  val_tasks=50,
)


def test_adaptation_curve_equals_evaluate_at_each_step_count(tiny_config):
  exp = train.build(tiny_config(**TINY))
  batch = exp.sample(jax.random.key(5), None, 6)
  curve = exp.learner.adaptation_curve(exp.params, jnp.float32(0.02), batch, inner_steps=3)
  assert curve["loss"].shape == (6, 4)
  for k in range(4):
    out = exp.learner.evaluate(exp.params, jnp.float32(0.02), batch, inner_steps=k)
    np.testing.assert_allclose(curve["loss"][:, k], out["loss"], rtol=1e-5, atol=1e-6)


def test_selected_test_adaptation_cannot_diverge(tiny_config):
  """At an alpha where MAML's fixed 10 test steps blow up, the selection on validation
  tasks picks a smaller rate or fewer steps, and the test loss stays below not adapting."""
  cfg = tiny_config(**TINY)
  exp = train.build(cfg)
  alpha = jnp.float32(0.08)  # at the initial weights, 10 steps at 0.08 overshoot
  fixed = train.evaluate(exp, exp.params, alpha, "test", 50, eval_inner_steps=10)
  assert not fixed["loss"] < fixed["pre_loss"]  # diverges (or at best does not help)
  choice = train.select_adaptation(exp, exp.params, alpha, "val", 50)
  assert (choice["inner_steps"], choice["alpha_scale"]) != (10, 1.0)
  assert choice["scores"][f"{choice['alpha_scale']:g}x{choice['inner_steps']}"] == max(
    choice["scores"].values()
  )
  chosen = train.evaluate(
    exp, exp.params, alpha, "test", 50, choice["inner_steps"], alpha_scale=choice["alpha_scale"]
  )
  assert chosen["loss"] < 0.9 * chosen["pre_loss"]
  # far too large for any candidate rate: the choice is not to adapt at all
  none = train.select_adaptation(exp, exp.params, jnp.float32(40.0), "val", 50)
  assert none["inner_steps"] == 0 and none["alpha_scale"] == 1.0


def test_train_reports_selected_and_fixed_protocols(tmp_path, tiny_config):
  _, results = train.train(tiny_config(**TINY, alpha=0.4), tmp_path / "run", progress=False)
  choice = results["test_adaptation"]
  assert results["test"]["inner_steps"] == choice["inner_steps"]
  assert results["test"]["alpha_scale"] == choice["alpha_scale"]
  if (choice["inner_steps"], choice["alpha_scale"]) != (10, 1.0):
    assert results["test_fixed"]["inner_steps"] == 10
  assert "chosen on 50 val tasks" in train.format_results(results)
  _, fixed = train.train(
    tiny_config(**TINY, alpha=0.4, test_adaptation="fixed"), tmp_path / "fixed", progress=False
  )
  assert "test_adaptation" not in fixed and fixed["test"]["inner_steps"] == 10


@pytest.mark.parametrize("name", ["prodigy", "dog", "mechanize", "cocob", "dadapt_adamw"])
def test_learning_rate_free_outer_optimizers_train_maml(name, tiny_config):
  """optax.contrib's learning-rate-free optimizers as MAML's outer optimizer: the loss falls."""
  cfg = tiny_config(**TINY, method="maml", alpha=0.01, outer_optimizer=name, iterations=100)
  exp = train.build(cfg)
  state = exp.learner.init(exp.params)
  losses = []
  key = jax.random.key(0)
  for _ in range(100):
    key, sub = jax.random.split(key)
    state, m = exp.learner.step(state, exp.sample(sub, None, 10))
    losses.append(float(m["loss"]))
  assert np.mean(losses[-20:]) < 0.8 * np.mean(losses[:20])
  if name in ("prodigy", "dadapt_adamw"):  # "beta" reports the rate they estimate
    assert float(m["beta"]) > 0 and "beta_hypergradient" not in m
  else:
    assert "beta" not in m  # no rate to report


def test_default_adapts_one_alpha_per_tensor_and_maml_one_alpha():
  """The default (library and every named config) has one alpha per parameter tensor, all
  starting at alpha0; MAML and the paper's rule keep one alpha for the whole model."""
  params = _params()
  alpha = amaml.alpha_maml(_mse(), alpha=0.3).init(params).alpha
  assert jax.tree.structure(alpha) == jax.tree.structure(params)
  assert all(a.shape == () and float(a) == pytest.approx(0.3) for a in jax.tree.leaves(alpha))
  exp = train.build(configs.get_config("sinusoid", alpha=0.3))
  assert jax.tree.structure(exp.learner.init(exp.params).alpha) == jax.tree.structure(exp.params)
  for learner in (
    amaml.maml(_mse(), alpha=0.3),
    amaml.alpha_maml_paper(_mse(), alpha=0.3),
    amaml.alpha_maml(_mse(), alpha=0.3, alpha_granularity="scalar"),
  ):
    assert jnp.shape(learner.init(params).alpha) == ()


def test_default_outer_optimizer_is_adam_at_its_library_rate():
  """amaml's default outer step equals ``optax.adam(1e-3)``'s on the same gradients, and
  ``alpha_maml``'s beta stays at 1e-3 while alpha moves."""
  params = {"w": jnp.arange(3.0), "b": jnp.ones(())}
  ours, ref = meta.default_outer_optimizer(), optax.adam(1e-3)
  s1, s2 = ours.init(params), ref.init(params)
  for i in range(4):
    g = jax.tree.map(lambda p: jnp.sin(p * (i + 1.0)) + 0.1 * i, params)
    u1, s1 = ours.update(g, s1, params)
    u2, s2 = ref.update(g, s2, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12), u1, u2)
  learner = amaml.alpha_maml(_mse(), alpha=0.3)
  state, alphas, betas = _run(learner, _params(), 5)
  np.testing.assert_allclose(betas, 1e-3, rtol=1e-7)
  assert np.ptp(alphas) > 0


@pytest.mark.parametrize("fields", [{}, {"beta_lr": 0.2}, {"outer_optimizer": "adam"}])
def test_resolved_beta_lr_is_what_the_built_learner_does(fields, tiny_config):
  """``Config.resolved_beta_lr`` (a report) matches the alpha-maml learner ``train.build``
  makes: beta stays at beta0 exactly when it says 0 (the default's Adam), else it moves."""
  cfg = tiny_config(**TINY, **fields)
  exp = train.build(cfg)
  state, betas = exp.learner.init(exp.params), []
  for i in range(8):  # (the normalized rule first moves a rate at step 6)
    state, m = exp.learner.step(state, exp.sample(jax.random.key(i), None, 10))
    betas.append(float(m["beta"]))
  fixed = np.ptp(betas) == 0 and np.isclose(betas[0], cfg.resolved_beta, rtol=1e-6)
  assert (cfg.resolved_beta_lr == 0) == fixed
  assert (cfg.resolved_beta_lr == 0) == (fields == {})


def test_within_ratio_raises_the_rates_below_the_largest_over_max_ratio():
  """By hand: the additive rule steps {1, 3} by -0.1 * {2, -1} to {0.8, 3.1}; within a factor
  2 of the largest, 0.8 is raised to 3.1 / 2 = 1.55."""
  rule = rates.within_ratio(rates.rate_rule(0.1, "additive"), 2.0)
  rate = {"body": jnp.float32(1.0), "head": jnp.float32(3.0)}
  h = {"body": jnp.float32(2.0), "head": jnp.float32(-1.0)}
  new, _ = rule.update(rate, h, rule.init(rate))
  assert float(new["body"]) == pytest.approx(1.55)
  assert float(new["head"]) == pytest.approx(3.1)
  with pytest.raises(ValueError, match="max_ratio must be >= 1"):
    rates.within_ratio(rates.fixed(), 0.5)


def test_within_ratio_bounds_the_default_per_tensor_alpha_and_is_inert_when_far():
  """Alpha MAML's per-tensor alpha spreads past a factor 1.2 on sinusoid in 30 steps; with
  ``alpha_max_ratio=1.2`` it stays within it, and with a bound it never reaches (1e9) the
  run is the default's, bit for bit."""

  def spread(**kw):
    state, _, _ = _run(amaml.alpha_maml(_mse(), alpha=0.01, **kw), _params(), 30)
    leaves = jax.tree.leaves(state.alpha)
    return max(map(float, leaves)) / min(map(float, leaves)), state

  free, state = spread()
  bound, _ = spread(alpha_max_ratio=1.2)
  _, far = spread(alpha_max_ratio=1e9)
  assert free > 1.2 and bound <= 1.2 * (1 + 1e-6), (free, bound)
  chex.assert_trees_all_equal(state, far)
