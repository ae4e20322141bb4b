"""Safeguards of a meta step, as wrappers in the manner of ``optax.apply_if_finite``.

Each takes a :class:`amaml.meta.MetaStep` and returns one that does the same work and then
decides what of it to keep:

* :func:`skip_nonfinite`: a step whose loss, gradients or new state are not finite is not
  taken; the state stays as it was, ``state.nonfinite_streak`` counts such steps in a row and
  ``metrics["nonfinite"]`` flags them.
* :func:`backtrack`: a step whose adaptation more than doubles the query loss of not adapting
  at all changes nothing but ``alpha``, which halves.

Both keep MAML++'s phases (:attr:`amaml.meta.MetaStep.phases`): each phase is wrapped alike.

>>> import jax.numpy as jnp, amaml
>>> from amaml.meta import MetaStep, meta_state
>>> blow_up = MetaStep(
...   init=lambda p: meta_state(p, jnp.float32(0.1)),
...   update=lambda s, batch: (s._replace(params=s.params * jnp.inf, step=s.step + 1),
...                            {"loss": jnp.float32(1.0)}))
>>> safe = skip_nonfinite(blow_up)
>>> state, metrics = safe.update(safe.init(jnp.float32(2.0)), None)
>>> float(state.params), int(state.step), int(state.nonfinite_streak), bool(metrics["nonfinite"])
(2.0, 1, 1, True)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from amaml.meta import MetaState, MetaStep, wrap

#: The metrics whose finiteness :func:`skip_nonfinite` checks by default, with the new state:
#: the loss, the norm of the meta-gradient, and the hypergradient of ``alpha``.
CHECKED = ("loss", "grad_norm", "alpha_hypergradient")


def all_finite(tree) -> jax.Array:
  """Whether every floating-point value in ``tree`` is finite (a scalar bool)."""
  leaves = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _where(take, new, old):
  """``new`` where the scalar ``take`` is true, else ``old``: a ``lax.cond``, so that XLA
  computes ``take`` once. As a select per leaf it is fused into every leaf's output, and
  with one ``alpha`` per tensor (dozens of scalar leaves in ``alpha`` and its rule's state)
  that copies ``take``'s scalar work dozens of times: the Conv4 step of amaml's default
  compiled 2.4x slower (BENCHMARKS.md, "The guards' predicate computed once"). Under
  ``vmap`` (``--seeds``, the suite's grids) it is a select again."""
  return jax.lax.cond(take, lambda: new, lambda: old)


def skip_nonfinite(step: MetaStep, checked: tuple[str, ...] = CHECKED) -> MetaStep:
  """``step``, except that an update whose new ``params``, ``alpha``, ``opt_state``, or
  metrics named in ``checked`` (those present) hold a non-finite value keeps the state as it
  was. ``state.step`` advances either way; ``nonfinite_streak`` is reset by a step taken and
  counts the steps in a row that were not; ``metrics["nonfinite"]`` is true for those."""

  def around(update):
    def guarded(state: MetaState, batch):
      new, metrics = update(state, batch)
      values = [metrics[k] for k in checked if k in metrics]
      ok = all_finite((values, new.params, new.alpha, new.opt_state))
      streak = jnp.where(ok, 0, state.nonfinite_streak + 1).astype(jnp.int32)
      kept = _where(ok, new._replace(step=state.step), state)
      return kept._replace(step=new.step, nonfinite_streak=streak), {
        **metrics,
        "nonfinite": jnp.logical_not(ok),
      }

    return guarded

  return wrap(step, around)


def backtrack(
  step: MetaStep,
  *,
  factor: float = 0.5,
  alpha_min: float | None = 0.0,
  alpha_max: float | None = None,
) -> MetaStep:
  """amaml's guard against a far too large ``alpha``: where adaptation more than doubles the
  mean query loss of no adaptation (``metrics["pre_loss"]``, from
  :func:`amaml.meta.track_pre_adaptation` inside), or makes it non-finite, on a batch whose
  un-adapted query and support losses are finite, the step changes nothing but ``alpha``,
  which is multiplied by ``factor`` (clipped to the bounds). ``params`` and the outer rate
  then never train against an ``alpha`` that hurts, and ``alpha`` falls from any start by
  1,000 in 10 steps. Smaller harm is left to the hypergradient (at a tiny ``alpha``, noise
  alone makes some batches a little worse after adaptation); a batch that is not finite
  before adaptation is the non-finite guard's business. ``metrics["backtracked"]`` flags it.
  """

  def around(update):
    def guarded(state: MetaState, batch):
      new, metrics = update(state, batch)
      if "pre_loss" not in metrics:
        raise ValueError("backtrack needs metrics['pre_loss']: wrap track_pre_adaptation inside")
      loss, pre = metrics["loss"], metrics["pre_loss"]
      batch_ok = jnp.isfinite(pre) & jnp.isfinite(metrics["support_loss"])
      hurts = batch_ok & jnp.logical_not(loss - pre <= jnp.abs(pre))
      shrunk = jax.tree.map(
        lambda a: jnp.clip(factor * a, alpha_min, alpha_max).astype(a.dtype), state.alpha
      )
      held = state._replace(
        alpha=shrunk, step=new.step, nonfinite_streak=jnp.zeros_like(state.nonfinite_streak)
      )
      return _where(hurts, held, new), {**metrics, "backtracked": hurts}

    return guarded

  return wrap(step, around)
