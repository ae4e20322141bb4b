"""Flax NNX and Equinox models as amaml's ``(params, apply_fn)``.

amaml differentiates a loss of a parameter pytree, ``loss_fn(params, x, y)``. A stateful
module becomes one by splitting it into its parameters (what the inner and outer loops
update) and the rest (structure and constants), put back together inside ``apply_fn``:

- NNX: ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``, then
  ``nnx.merge(graphdef, params, rest)(x)``; ``params`` is an ``nnx.State``.
- Equinox: ``params, static = eqx.partition(model, eqx.is_inexact_array)``, then
  ``eqx.combine(params, static)(x)``; ``params`` is the model with ``None`` in place of
  everything that is not a float array.

:func:`from_nnx` and :func:`from_equinox` are these two lines. Parameter paths, which
``inner_params=`` (ANIL) and ``per_step_params=`` (MAML++) search with a regular
expression (:func:`amaml.inner.param_mask`), are the attribute names: an NNX attribute
``head`` holding an ``nnx.Linear`` gives ``head/kernel/value`` and ``head/bias/value``
(``/value`` is the ``nnx.Param`` box), an Equinox one ``head/weight`` and ``head/bias``;
``"^head/"`` selects either.

Batch norm: MAML normalises with each batch's own statistics (under ``vmap`` over tasks,
each task's), so running averages are never read and the non-parameter state is a
constant of ``apply_fn``: updates a forward pass makes to it (NNX ``BatchStat``, an
Equinox ``eqx.nn.State``) are dropped, not carried from step to step. Build NNX's
``nnx.BatchNorm`` with ``use_running_average=False`` and Equinox's ``eqx.nn.BatchNorm``
with ``mode="batch"`` in training mode; a module in eval / inference mode would normalise
with the never-updated initial statistics instead.
"""

from __future__ import annotations

from typing import Any, Callable


def from_nnx(model: Any) -> tuple[Any, Callable]:
  """``(params, apply_fn)`` of a ``flax.nnx`` module: ``params`` its ``nnx.Param``
  state, ``apply_fn(params, *args)`` the module with those parameters called on
  ``args``; every other variable (batch statistics, RNG state) is the module's at the
  time of the split, held constant (see the module docstring).

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> params, apply_fn = from_nnx(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
  >>> apply_fn(params, jnp.ones((5, 2))).shape
  (5, 3)
  """
  from flax import nnx

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply_fn(p, *args, **kwargs):
    # copy: the forward pass writes batch statistics to fresh variables, not to ``rest``'s
    # (whose variables belong to no trace: writing them under jit is an error)
    return nnx.merge(graphdef, p, rest, copy=True)(*args, **kwargs)

  return params, apply_fn


def from_equinox(model: Any, state: Any = None) -> tuple[Any, Callable]:
  """``(params, apply_fn)`` of an Equinox module: ``params`` its float arrays
  (``eqx.partition(model, eqx.is_inexact_array)``), ``apply_fn(params, *args)`` the
  module rebuilt with them and called on ``args``. With ``state`` (an ``eqx.nn.State``,
  from ``eqx.nn.make_with_state``) the module is called as ``model(*args, state)`` and
  only its first output is returned: the new state is dropped (see the module
  docstring).

  >>> import jax, jax.numpy as jnp, equinox as eqx
  >>> params, apply_fn = from_equinox(eqx.nn.Linear(2, 3, key=jax.random.key(0)))
  >>> apply_fn(params, jnp.ones(2)).shape
  (3,)
  """
  import equinox as eqx

  params, static = eqx.partition(model, eqx.is_inexact_array)

  def apply_fn(p, *args, **kwargs):
    module = eqx.combine(p, static)
    if state is None:
      return module(*args, **kwargs)
    return module(*args, state, **kwargs)[0]

  return params, apply_fn
