"""``amaml.jit``: ``jax.jit`` with amaml's XLA:CPU compile options. Every function amaml
jits goes through it (``learner.step``, ``evaluate``, the training chunks); use it for loops
of your own around ``learner.update`` to compile them the same way.

On the CPU, XLA hands matrix products, reductions and convolutions to YNNPACK by default.
For Conv4's 3x3 convolutions XLA's own convolution (Eigen) is faster: 1.8-2.0x on the
per-task 14x14x64 and 7x7x64 convolutions of 75 query images, 1.4-2.6x over all 2,400
query images with one kernel, 1.3-1.9x slower only on the first layer's per-task 28x28x1
convolutions (BENCHMARKS.md, "XLA's own convolutions on the CPU"): the meta step takes
0.85x the time. So amaml compiles with YNNPACK kept for products and reductions
(:data:`CPU_COMPILER_OPTIONS`). Other backends (GPU, TPU) compile with their defaults. An
installed jax whose XLA lacks the option compiles with its defaults too (:func:`supported`).
"""

from __future__ import annotations

import functools

import jax

#: XLA:CPU's compile options for amaml's jitted functions: YNNPACK for matrix products and
#: reductions (its default also gives it convolutions, ``..._INDIVIDUAL_CONVOLUTION``).
CPU_COMPILER_OPTIONS = {
  "xla_cpu_experimental_ynn_fusion_type": (
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
  ),
}


@functools.cache
def supported() -> bool:
  """Whether this jax's XLA:CPU accepts :data:`CPU_COMPILER_OPTIONS` (one tiny compile)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(1.0).compile()
  except Exception:  # an older jax: no ``compiler_options`` or no such XLA option
    return False
  return True


def compiler_options() -> dict[str, str] | None:
  """:data:`CPU_COMPILER_OPTIONS` on the CPU backend where :func:`supported`, else ``None``."""
  if jax.default_backend() != "cpu" or not supported():
    return None
  return dict(CPU_COMPILER_OPTIONS)


def jit(fun, **kwargs):
  """``jax.jit(fun, **kwargs)`` compiled with :func:`compiler_options`. The backend is
  asked on the first call (or ``.lower``, ``.trace``, ...), not here, so that building a
  learner before :func:`jax.distributed.initialize` stays allowed. Called inside another
  ``jit`` (its arguments are tracers) it is a plain ``jax.jit``: compile options belong to
  the outermost one."""
  return _Jit(fun, kwargs)


class _Jit:
  """A ``jax.jit`` -ed function, jitted on first use (:func:`jit`)."""

  def __init__(self, fun, kwargs):
    functools.update_wrapper(self, fun)
    self._fun, self._kwargs, self._jitted = fun, kwargs, None
    self._nested = jax.jit(fun, **kwargs)

  def _get(self):
    if self._jitted is None:
      self._jitted = jax.jit(self._fun, compiler_options=compiler_options(), **self._kwargs)
    return self._jitted

  def __call__(self, *args, **kwargs):
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs))):
      return self._nested(*args, **kwargs)
    return self._get()(*args, **kwargs)

  def __getattr__(self, name):  # lower, trace, eval_shape, clear_cache, ...
    if name.startswith("__") or name in ("_fun", "_kwargs", "_jitted", "_nested"):
      raise AttributeError(name)
    return getattr(self._get(), name)
