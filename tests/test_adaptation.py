"""Test-time adaptation: the support-loss guard against hand-computed curves, the rate grid,
the support losses of ``adaptation_curve`` against a hand-run inner loop, and the guarded
meta-test evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import amaml
from amaml import adaptation, inner, train

TINY = dict(
  hidden=40,
  meta_batch=25,
  log_every=20,
  checkpoint_every=0,
  eval_tasks=50,
  eval_batch=25,
  val_tasks=50,
)


def test_support_guard_against_hand_computed_curves():
  query = np.array(
    [
      [5.0, 4.0, 3.0, 2.0, 1.0],  # support falls throughout: unchanged
      [5.0, 4.0, 3.0, 2.0, 1.0],  # step 2 overshoots, step 3 is best again
      [5.0, 4.0, 3.0, 2.0, 1.0],  # support NaN after step 3
      [5.0, 4.0, 3.0, 2.0, 1.0],  # support inf after step 1, then higher
      [5.0, 4.0, 3.0, 2.0, 1.0],
    ]
  )  # ties keep the earlier step
  support = np.array(
    [
      [9.0, 8.0, 7.0, 6.0, 5.0],
      [9.0, 8.0, 9.5, 7.0, 8.5],
      [9.0, 8.0, 7.0, np.nan, 7.5],
      [9.0, np.inf, 10.0, 9.0, 1.0],
      [9.0, 3.0, 3.0, 9.0, 2.0],
    ]
  )
  expected = [
    [5.0, 4.0, 3.0, 2.0, 1.0],
    [5.0, 4.0, 4.0, 2.0, 2.0],
    [5.0, 4.0, 3.0, 3.0, 3.0],
    [5.0, 5.0, 5.0, 5.0, 1.0],
    [5.0, 4.0, 4.0, 4.0, 1.0],
  ]
  np.testing.assert_array_equal(adaptation.support_guard(query, support), expected)


def test_guarded_curves_guard_every_metric_and_keep_the_support_loss():
  out = {
    "loss": np.array([[1.0, 0.5, 9.0]]),
    "accuracy": np.array([[0.2, 0.6, 0.1]]),
    "support_loss": np.array([[2.0, 1.0, 3.0]]),
  }
  got = adaptation.guarded_curves(out)
  np.testing.assert_array_equal(got["loss"], [[1.0, 0.5, 0.5]])
  np.testing.assert_array_equal(got["accuracy"], [[0.2, 0.6, 0.6]])
  np.testing.assert_array_equal(got["support_loss"], out["support_loss"])
  no_support = {"loss": np.array([[1.0, 9.0]])}  # ProtoNets: nothing to guard
  np.testing.assert_array_equal(adaptation.guarded_curves(no_support)["loss"], [[1.0, 9.0]])


def test_rate_grid_steps_by_sqrt2_and_holds_the_coarse_grid():
  scales = np.array(adaptation.ALPHA_SCALES)
  np.testing.assert_allclose(scales[:-1] / scales[1:], np.sqrt(2.0), rtol=1e-12)
  assert 1.0 in adaptation.ALPHA_SCALES
  assert scales[0] == 2.0 and scales[-1] == 1 / 32
  for s in (2.0, 1.0, 0.5, 0.25, 0.125):
    assert np.isclose(scales, s, rtol=1e-12).any()


def test_adaptation_curve_reports_the_support_loss_after_each_step(tiny_config):
  exp = train.build(tiny_config(**TINY))
  batch = exp.sample(jax.random.key(3), None, 4)
  alpha = jnp.float32(0.02)
  curve = exp.learner.adaptation_curve(exp.params, alpha, batch, inner_steps=3)
  assert curve["support_loss"].shape == (4, 4)
  model = amaml.models.MLP(hidden=(40, 40), out=1)  # the sinusoid config's network
  mse = amaml.losses.mse(lambda p, x: model.apply({"params": p}, x))
  for t in range(4):
    for k in range(4):
      adapted, _ = (
        inner.adapt(
          mse,
          exp.params,
          alpha,
          batch.support_x[t],
          batch.support_y[t],
          inner_steps=k,
          first_order=True,
        )
        if k
        else (exp.params, None)
      )
      want = mse(adapted, batch.support_x[t], batch.support_y[t])[0]
      np.testing.assert_allclose(curve["support_loss"][t, k], want, rtol=1e-5, atol=1e-6)


def test_guarded_evaluation_never_ends_above_not_adapting(tiny_config):
  """At a rate where every task's first step overshoots and the loop overflows, the guarded
  evaluation keeps the un-adapted model (the loss equals the pre-adaptation loss) while
  MAML's protocol blows up; at a small rate it is never worse than not adapting, and equals
  the hand-guarded curve of the unguarded learner."""
  exp = train.build(tiny_config(**TINY))
  blown = train.evaluate(exp, exp.params, jnp.float32(40.0), "test", 50, eval_inner_steps=10)
  assert not blown["loss"] < 10 * blown["pre_loss"]
  guarded = train.evaluate(
    exp, exp.params, jnp.float32(40.0), "test", 50, eval_inner_steps=10, guard=True
  )
  np.testing.assert_allclose(guarded["loss"], guarded["pre_loss"], rtol=1e-6)
  np.testing.assert_allclose(guarded["pre_loss"], blown["pre_loss"], rtol=1e-6)
  safe = train.evaluate(
    exp, exp.params, jnp.float32(0.01), "test", 50, eval_inner_steps=3, guard=True
  )
  assert safe["loss"] < safe["pre_loss"]
  batches = list(train.eval_batches(exp, "test", 50))
  want = []
  for b in batches:
    c = exp.learner.adaptation_curve(exp.params, jnp.float32(0.01), b, inner_steps=3)
    support = np.asarray(c["support_loss"])
    for t in range(support.shape[0]):  # by hand: the lowest support loss among steps 0..3
      want.append(np.asarray(c["loss"])[t, int(np.argmin(support[t]))])
  np.testing.assert_allclose(safe["loss"], np.mean(want[:50]), rtol=1e-5)


def test_old_keywords_name_eval_inner_steps():
  """The test-time inner steps are ``eval_inner_steps`` everywhere (as ``Config``'s)."""
  for fn, old in ((train.select_adaptation, "max_steps"), (train.evaluate, "inner_steps")):
    with pytest.raises(TypeError, match=f"{old}= was renamed eval_inner_steps="):
      fn(None, None, None, **{old: 3})
