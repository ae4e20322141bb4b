"""The initial-rate search (``amaml.rates.search_alpha``): its choice on linear regression
against the closed-form query loss after one step, the same from every start, its edge cases,
and vmap against a loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import amaml
from amaml import rates

LOSS = amaml.losses.mse(lambda w, x: x @ w)


def _tasks(seed, tasks=6, shots=10, dim=4):
  rng = np.random.default_rng(seed)
  w = rng.normal(1.0, 1.0, (tasks, dim))
  xs, xq = rng.normal(size=(2, tasks, shots, dim))
  ys, yq = np.einsum("tsd,td->ts", xs, w), np.einsum("tsd,td->ts", xq, w)
  return amaml.TaskBatch(xs, ys, xq, yq), dim


def _query_loss_after_one_step(batch, w, alpha):
  """By hand: w' = w - alpha * (2/n) Xs^T (Xs w - ys), then the mean query MSE over tasks."""
  out = []
  for xs, ys, xq, yq in zip(*batch):
    w1 = w - alpha * 2.0 / len(ys) * xs.T @ (xs @ w - ys)
    out.append(np.mean((xq @ w1 - yq) ** 2))
  return float(np.mean(out))


@pytest.mark.parametrize("keep", [None, 0.9])  # None: the default, half of the decrease
def test_search_picks_the_smallest_value_with_keep_of_the_decrease_from_any_start(x64, keep):
  batch, dim = _tasks(0)
  w0 = np.zeros(dim)
  losses = [_query_loss_after_one_step(batch, w0, a) for a in rates.SEARCH_ALPHAS]
  before = _query_loss_after_one_step(batch, w0, 0.0)
  target = before - (keep or 0.5) * (before - min(losses))
  expected = rates.SEARCH_ALPHAS[next(i for i, v in enumerate(losses) if v <= target)]
  kwargs = {} if keep is None else {"keep": keep}
  for alpha0 in (1e-3, 0.01, 0.3, 4.0):  # on the grid or not: the same start
    learner = amaml.maml(LOSS, alpha=alpha0, inner_steps=1)
    state = rates.search_alpha(learner.meta_loss, learner.init(jnp.asarray(w0)), batch, **kwargs)
    assert float(state.alpha) == expected
  assert 1e-3 < expected < 4.0  # the search moved every one of these starts


def test_the_default_takes_half_of_the_largest_decrease():
  state = amaml.MetaState(None, jnp.float32(3.0), (), (), jnp.int32(0), jnp.int32(0))
  # 10 without adaptation, 6 at 1/4, 2 at 1, 9 elsewhere: half the decrease (to 6) is had at
  # 1/4; 90% of it (to 2.8) only at 1
  loss = _piecewise({0.0: 10.0, 0.25: 6.0, 1.0: 2.0}, 9.0)
  assert float(rates.search_alpha(loss, state, None).alpha) == 0.25
  assert float(rates.search_alpha(loss, state, None, keep=0.9).alpha) == 1.0


def _piecewise(values, other):
  """A meta-loss by exact alpha (the grid's powers of 4 are exact), ``other`` elsewhere."""

  def loss(params, alpha, batch):
    out = jnp.float32(other)
    for a, v in values.items():
      out = jnp.where(alpha == a, v, out)
    return out, {}

  return loss


def test_nonfinite_losses_lose_and_no_decrease_keeps_alpha():
  state = amaml.MetaState(None, jnp.float32(3.0), (), (), jnp.int32(0), jnp.int32(0))

  # lowest at 4, but NaN there: the lowest finite one, 1/4, wins
  nan_best = _piecewise({0.0: 10.0, 0.25: 2.0, 1.0: 5.0, 4.0: np.nan}, 9.0)
  assert float(rates.search_alpha(nan_best, state, None).alpha) == 0.25
  # every value raises the loss or overflows: alpha0 is kept
  worse = _piecewise({0.0: 1.0, 16.0: np.inf}, 2.0)
  assert float(rates.search_alpha(worse, state, None).alpha) == 3.0
  # no loss without adaptation to compare with: alpha0 is kept
  no_base = _piecewise({0.0: np.nan, 0.25: 2.0}, 9.0)
  assert float(rates.search_alpha(no_base, state, None).alpha) == 3.0
  # alpha0 = 0: the chosen value itself
  zero = state._replace(alpha=jnp.float32(0.0))
  assert float(rates.search_alpha(nan_best, zero, None).alpha) == 0.25


def test_search_sets_the_largest_rate_keeps_the_ratios_and_vmaps_like_a_loop():
  batch, dim = _tasks(1, tasks=4, dim=3)
  params = {"a": jnp.zeros(2), "b": jnp.zeros(dim - 2)}
  loss = amaml.losses.mse(lambda p, x: x @ jnp.concatenate([p["a"], p["b"]]))
  learner = amaml.alpha_maml(loss, alpha=0.01)
  state = learner.init(params)
  state = state._replace(alpha={"a": jnp.float32(0.01), "b": jnp.float32(0.03)})
  got = rates.search_alpha(learner.meta_loss, state, batch)
  assert float(got.alpha["b"]) in rates.SEARCH_ALPHAS  # the largest rate takes a grid value
  np.testing.assert_allclose(float(got.alpha["b"] / got.alpha["a"]), 3.0, rtol=1e-6)
  starts = [state._replace(alpha=jax.tree.map(lambda a: a * f, state.alpha)) for f in (1, 50)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *starts)
  vmapped = jax.vmap(lambda s: rates.search_alpha(learner.meta_loss, s, batch))(stacked)
  for i, s in enumerate(starts):
    one = rates.search_alpha(learner.meta_loss, s, batch)
    for k in ("a", "b"):
      np.testing.assert_allclose(vmapped.alpha[k][i], one.alpha[k], rtol=1e-6)
      np.testing.assert_allclose(one.alpha[k], got.alpha[k], rtol=1e-6)  # 50x the start: the same
