"""Functional building blocks of :class:`amaml.models.Conv4`, written for the MAML step.

Second-order MAML differentiates a task's loss after an inner SGD step, under
``jax.vmap`` over the tasks of a meta-batch. The adapted weights differ per task,
so every convolution after the first inner step has a per-task kernel: vmapped,
``lax.conv_general_dilated`` becomes a *grouped* convolution, and XLA:CPU's grouped
convolution (its gradient above all) is one to two orders of magnitude slower than
the same arithmetic as ordinary convolutions or matrix products. :func:`conv3x3`
therefore has three forms:

- ``"tasks"``: ``lax.conv_general_dilated`` with a batching rule
  (``jax.custom_batching.custom_vmap``) of its own: with per-task kernels it runs one
  ordinary convolution per task (``lax.map``; under a second ``vmap``, as over seeds, one
  loop over every pair), with one kernel for all tasks one convolution over all their
  images; an input of one channel (Omniglot's first layer) is instead the sum of its 9
  taps, element-wise work with no loop. Its gradient is a custom VJP made of two such
  operations (the input gradient a convolution of ``dy`` with the flipped kernel, the
  kernel gradient a convolution of the transposed input with ``dy``, or over many pixels
  of few channels one product of the input's patches with ``dy``; see
  ``_conv3x3_tasks_bwd``) whose own gradients are again
  these two, so every derivative, of any order, under any number of ``vmap`` s, is ungrouped
  convolutions and matrix products, which XLA:CPU runs fast. Reverse mode only (``grad``,
  ``vjp``, grad-of-grad); for forward mode (``jax.jvp``, ``jacfwd``) use ``"xla"``.
- ``"matmul"``: the 9 shifted copies of the zero-padded input concatenated on the
  channel axis ("patches", im2col), then one ``dot_general`` with the kernel
  reshaped to ``[9 * C, O]``. Under ``vmap`` this is a batched matrix product. Its
  gradient is a custom VJP written with the same two operations (see
  ``_conv3x3_matmul_bwd``). Reverse mode only, as ``"tasks"``.
- ``"xla"``: plain ``lax.conv_general_dilated`` (cuDNN on GPU, where it is the better one).

With ``"tasks"`` or ``"matmul"``, :func:`batch_norm` and :func:`max_pool_2x2` have their own
VJPs too (closed forms that write fewer passes over the activations than JAX's derivatives
of their forwards, to every order); with ``"xla"`` JAX differentiates them.

All functions take NHWC activations and HWIO kernels and are pure: use them under
``jit``, ``vmap`` and any order of ``grad``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CONV_IMPLS = ("auto", "matmul", "tasks", "xla")


def resolve_conv_impl(impl: str) -> str:
  """``"auto"`` -> ``"tasks"`` on CPU, ``"xla"`` on any other backend (GPU, TPU)."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
  if impl == "auto":
    return "tasks" if jax.default_backend() == "cpu" else "xla"
  return impl


def conv3x3(
  x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, impl: str = "auto"
) -> jax.Array:
  """3x3 convolution, stride 1, zero padding 1 ("same"), optional bias.

  Args:
    x: ``[n, H, W, C]`` (NHWC).
    kernel: ``[3, 3, C, O]`` (HWIO).
    bias: ``[O]`` or ``None``.
    impl: ``"tasks"`` (one convolution per task), ``"matmul"`` (patches + one matrix
      product), ``"xla"``
      (``lax.conv_general_dilated``) or ``"auto"`` (see :func:`resolve_conv_impl`).

  Returns:
    ``[n, H, W, O]``.
  """
  impl = resolve_conv_impl(impl)
  n, h, w, c = x.shape
  if kernel.shape[:3] != (3, 3, c):
    raise ValueError(
      f"kernel must be [3, 3, {c}, O] for an input with {c} channels, got {kernel.shape}"
    )
  if impl == "xla":
    y = _lax_conv(x, kernel)
  elif impl == "tasks":
    y = _conv3x3_tasks(x, kernel)
  else:
    y = _conv3x3_matmul(x, kernel)
  if bias is not None:
    y = y + bias
  return y


def _patches(x: jax.Array) -> jax.Array:
  """``[n, H, W, C]`` -> ``[n * H * W, 9 * C]``: the 3x3 neighbourhood of every pixel
  (zero padded), in (i, j, c) order, matching ``kernel.reshape(9 * C, O)``."""
  n, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # tap (i, j) meets input pixel (r + i - 1, s + j - 1) = xp[r + i, s + j]
  return jnp.concatenate(
    [xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)], axis=-1
  ).reshape(n * h * w, 9 * c)


def _matmul(a, b, contract):
  return jax.lax.dot_general(a, b, (contract, ((), ())))


@jax.custom_vjp
def _conv3x3_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  n, h, w, c = x.shape
  out = kernel.shape[3]
  return _matmul(_patches(x), kernel.reshape(9 * c, out), ((1,), (0,))).reshape(n, h, w, out)


def _conv3x3_matmul_fwd(x, kernel):
  return _conv3x3_matmul(x, kernel), (x, kernel)


def _conv3x3_matmul_bwd(res, dy):
  # The input gradient of a 3x3 "same" convolution is the 3x3 "same" convolution of dy
  # with the kernel flipped in space and transposed in channels. Writing it so (patches
  # of dy, one matrix product) instead of letting autodiff transpose the patches
  # (dy @ kernel^T, then a sum of 9 shifted pads: a 9x wider, slower product and a
  # scatter-like sum) is the difference that matters on XLA:CPU, most of all in the
  # second-order terms. The rule is itself made of differentiable ops (this same
  # function), so grad-of-grad works; forward mode (jax.jvp) does not, use impl="xla".
  x, kernel = res
  n, h, w, c = x.shape
  out = kernel.shape[3]
  dkernel = _matmul(_patches(x), dy.reshape(n * h * w, out), ((0,), (0,))).reshape(kernel.shape)
  flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
  return _conv3x3_matmul(dy, flipped), dkernel


_conv3x3_matmul.defvjp(_conv3x3_matmul_fwd, _conv3x3_matmul_bwd)


def _lax_conv(x, kernel):
  return jax.lax.conv_general_dilated(
    x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def _flip_transpose(kernel):
  """``[3, 3, C, O]`` -> ``[3, 3, O, C]``, flipped in space: the kernel of the input gradient."""
  return jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))


def _stacked(fn):
  """``fn`` over a leading axis of tasks, one task at a time (``lax.map``). Under a further
  ``vmap`` (seeds over tasks) the two leading axes are merged into one and the loop stays
  one loop over every (seed, task) pair: ``vmap`` of ``lax.map`` itself would nest a loop
  over seeds inside the loop over tasks and move every stacked operand's seed axis behind
  its task axis, copies that cost more than the convolutions' own growth (BENCHMARKS.md,
  "Several seeds in one program")."""

  @jax.custom_batching.custom_vmap
  def stacked(*args):
    return jax.lax.map(lambda a: fn(*a), args)

  @stacked.def_vmap
  def merged(axis_size, in_batched, *args):
    args = _broadcast(axis_size, in_batched, args)
    y = stacked(*(a.reshape(-1, *a.shape[2:]) for a in args))
    return y.reshape(axis_size, -1, *y.shape[1:]), True

  return stacked


def _broadcast(axis_size, in_batched, args):
  """``args`` with a leading axis of ``axis_size`` each: the unbatched ones broadcast."""
  return tuple(
    a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
    for a, batched in zip(args, in_batched)
  )


def _each_task(stacked, axis_size, in_batched, *args):
  """``stacked`` (a :func:`_stacked` function) on one task at a time, unbatched arguments
  shared by every task."""
  return stacked(*_broadcast(axis_size, in_batched, args))


@jax.custom_batching.custom_vmap
def _conv_kernel(x, kernel):
  return _lax_conv(x, kernel)


@_conv_kernel.def_vmap
def _conv_kernel_vmap(axis_size, in_batched, x, kernel):
  x_batched, kernel_batched = in_batched
  if kernel_batched:  # per-task kernels: one ordinary convolution per task
    return _each_task(_convs, axis_size, in_batched, x, kernel), True
  if not x_batched:
    return _conv_kernel(x, kernel), False
  # one kernel for all tasks: the tasks' images are one batch
  t, n, h, w, c = x.shape
  y = _conv_kernel(x.reshape(t * n, h, w, c), kernel)
  return y.reshape(t, n, h, w, kernel.shape[3]), True


_convs = _stacked(_lax_conv)


#: From this many output pixels (images x height x width) on, and for inputs of at most
#: :data:`KERNEL_GRAD_MATMUL_CHANNELS` channels, :func:`_kernel_grad_one` is one matrix
#: product of the input's patches with ``dy``; otherwise a convolution.
KERNEL_GRAD_MATMUL_PIXELS = 8192
#: The most input channels for which :func:`_kernel_grad_one` may be the product (the first
#: layer's images); with more, XLA's own convolution is faster.
KERNEL_GRAD_MATMUL_CHANNELS = 8


def _kernel_grad_one(x, dy):
  """The kernel gradient of one task's 3x3 "same" convolution (``[3, 3, C, O]``).

  dkernel[i, j, c, o] = sum_{n, r, s} xpad[n, r + i, s + j, c] dy[n, r, s, o]. Over many
  pixels of a few channels (the first layer's images at 28x28) it is the product of the
  input's patches with ``dy``, a matrix product with a long contraction, 1.9x faster on
  XLA:CPU than the convolution below. Elsewhere (64 channels, or few pixels: a support set,
  the 7x7 and 3x3 layers) it is the padded convolution of x with channels as the batch and
  images as the features, dy as an [H, W, n, O] kernel, which XLA's own convolution
  (:func:`amaml.jit`) runs 1.7x faster than the product at 14x14x64 (BENCHMARKS.md,
  "Omniglot meta-step throughput"). Its operands are transposed explicitly into XLA:CPU's
  own layout (NHWC, HWIO): given as dimension numbers instead, inside a loop, XLA:CPU keeps
  the swapped layout and runs a naive convolution, 100x slower."""
  n, h, w, c = x.shape
  if n * h * w >= KERNEL_GRAD_MATMUL_PIXELS and c <= KERNEL_GRAD_MATMUL_CHANNELS:
    flat = dy.reshape(n * h * w, dy.shape[3])
    return _matmul(_patches(x), flat, ((0,), (0,))).reshape(3, 3, c, dy.shape[3])
  out = _lax_conv(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3)))
  return jnp.transpose(out, (1, 2, 0, 3))


_kernel_grads = _stacked(_kernel_grad_one)


@jax.custom_batching.custom_vmap
def _kernel_grad_kernel(x, dy):
  return _kernel_grad_one(x, dy)


@_kernel_grad_kernel.def_vmap
def _kernel_grad_kernel_vmap(axis_size, in_batched, x, dy):
  return _each_task(_kernel_grads, axis_size, in_batched, x, dy), True


#: Inputs of at most this many channels (Omniglot's grey images) are convolved as their
#: taps (``_taps``), wider ones as ordinary convolutions (``_conv_kernel``).
TAPS_CHANNELS = 1


def _taps(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The convolution as the sum over its 9 * C taps of a shifted input channel times a row
  of the kernel: element-wise work that XLA fuses into one pass writing the output once.
  Under ``vmap`` per-task kernels only broadcast, so there is no loop over tasks and no
  zero-filled loop output (for Omniglot's first layer, ``[tasks, 75, 28, 28, 64]``)."""
  n, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = None
  for i in range(3):
    for j in range(3):
      for ch in range(c):
        term = xp[:, i : i + h, j : j + w, ch, None] * kernel[i, j, ch]
        y = term if y is None else y + term
  return y


@jax.custom_vjp
def _conv3x3_tasks(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Taps or convolutions forward; either way the derivative below (autodiff of the taps
  would read ``dy`` once per tap for the kernel gradient)."""
  if x.shape[-1] <= TAPS_CHANNELS:
    return _taps(x, kernel)
  return _conv_kernel(x, kernel)


def _conv3x3_tasks_fwd(x, kernel):
  return _conv3x3_tasks(x, kernel), (x, kernel)


def _conv3x3_tasks_bwd(res, dy):
  x, kernel = res
  return _conv3x3_tasks(dy, _flip_transpose(kernel)), _kernel_grad(x, dy)


_conv3x3_tasks.defvjp(_conv3x3_tasks_fwd, _conv3x3_tasks_bwd)


@jax.custom_vjp
def _kernel_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
  return _kernel_grad_kernel(x, dy)


def _kernel_grad_fwd(x, dy):
  return _kernel_grad(x, dy), (x, dy)


def _kernel_grad_bwd(res, g):
  x, dy = res
  return _conv3x3_tasks(dy, _flip_transpose(g)), _conv3x3_tasks(x, g)


_kernel_grad.defvjp(_kernel_grad_fwd, _kernel_grad_bwd)


#: With ``impl`` ``"tasks"`` or ``"matmul"``, :func:`batch_norm` has its own VJP; ``False``:
#: JAX differentiates its forward (``benchmarks/ab_layers.py --set BN_OWN_VJP=false``).
BN_OWN_VJP = True

_BN_AXES = (0, 1, 2)


def batch_norm(
  x: jax.Array, scale: jax.Array, shift: jax.Array, *, eps: float = 1e-5, impl: str = "auto"
) -> jax.Array:
  """Batch norm with the statistics of ``x`` itself (no running averages).

  Normalises every channel of ``x`` (``[n, H, W, C]``) with its mean and biased
  variance over ``(n, H, W)``, then applies ``scale`` and ``shift`` (``[C]``). This is
  ``torch.nn.BatchNorm2d(track_running_stats=False)`` in training mode, the
  transductive batch norm of MAML: under ``vmap`` over tasks each task's set is
  normalised with its own statistics.

  The output is written ``x * a + b`` with per-channel ``a = scale / sqrt(var + eps)`` and
  ``b = shift - mean * a``, which equals ``(x - mean) * a + shift``. In that form ``x`` feeds
  only the mean and ``x - mean``; under a second ``vmap`` (``--seeds``) XLA:CPU then grows the
  mean's YNNPACK reduction over both and over all the work that computes ``x``, and writes
  that work's broadcast operands out in full (the default's meta step 2.5x slower with two
  seeds; BENCHMARKS.md, "Several seeds in one program"). Here ``x`` has a third user, and the
  reduction stays a reduction.

  ``impl`` is the network's convolution form (see :func:`conv3x3`). With ``"tasks"`` or
  ``"matmul"`` (the CPU's, reverse mode only) batch norm has its own VJP, the closed form
  ``dx = a * (dy - mean(dy) - x_hat * mean(dy * x_hat))`` with ``x_hat = (x - mean) / sqrt(var +
  eps)``: two reductions and one element-wise pass, where JAX's derivative of the forward
  keeps ``x - mean`` and, differentiated again (MAML's second order), writes several
  more passes over ``x``'s size. With ``"xla"`` JAX differentiates the forward (forward mode
  too). Both give the same values to every order.
  """
  if BN_OWN_VJP and _own_vjp(impl):
    return _batch_norm_vjp(x, scale, shift, eps)
  return _batch_norm(x, scale, shift, eps)


def _own_vjp(impl: str) -> bool:
  """Whether the network's convolution form (reverse mode only) lets a layer have its own VJP."""
  return resolve_conv_impl(impl) != "xla"


def _batch_norm_parts(x, scale, shift, eps):
  """The output, the per-channel mean and ``1 / sqrt(var + eps)``."""
  mean = jnp.mean(x, axis=_BN_AXES)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), axis=_BN_AXES) + eps)
  a = rstd * scale
  return x * a + (shift - mean * a), mean, rstd


def _batch_norm(x, scale, shift, eps):
  return _batch_norm_parts(x, scale, shift, eps)[0]


_batch_norm_vjp = jax.custom_vjp(_batch_norm, nondiff_argnums=(3,))


def _batch_norm_vjp_fwd(x, scale, shift, eps):
  y, mean, rstd = _batch_norm_parts(x, scale, shift, eps)
  return y, (x, mean, rstd, scale)


def _batch_norm_vjp_bwd(eps, res, dy):
  x, mean, rstd, scale = res
  x_hat = (x - mean) * rstd
  dshift = jnp.sum(dy, axis=_BN_AXES)
  dscale = jnp.sum(dy * x_hat, axis=_BN_AXES)
  n = x.shape[0] * x.shape[1] * x.shape[2]
  dx = (scale * rstd) * (dy - dshift / n - x_hat * (dscale / n))
  return dx, dscale, dshift


_batch_norm_vjp.defvjp(_batch_norm_vjp_fwd, _batch_norm_vjp_bwd)


#: With ``impl`` ``"tasks"`` or ``"matmul"``, :func:`max_pool_2x2` has its own VJP (one
#: element-wise pass); ``False``: JAX differentiates its two maxima (``benchmarks/ab_layers.py
#: --set POOL_OWN_VJP=false`` compares the two).
POOL_OWN_VJP = True


def max_pool_2x2(x: jax.Array, *, impl: str = "auto") -> jax.Array:
  """2x2 max pooling, stride 2, floor mode (an odd last row/column is dropped).

  Written as two element-wise maxima of contiguous halves (rows, then columns): its
  derivatives of every order are selects, which XLA:CPU fuses. It avoids two other forms
  (``benchmarks/throughput.py`` compares them): ``reduce_window``, whose gradient is a slow
  select-and-scatter, and ``reshape(..., 2, ..., 2, C).max((2, 4))``, whose second-order
  gradient under ``vmap`` XLA:CPU computes wrongly.

  ``impl`` is the network's convolution form (see :func:`conv3x3`). With ``"tasks"`` or
  ``"matmul"`` (the CPU's, reverse mode only) the pool has its own VJP: the input gradient
  is the output gradient spread over each window by weights from ``x``, written in one
  element-wise pass, where JAX's derivative of the two maxima writes the gradient of each
  half and adds them. The weights are JAX's own for ``jnp.maximum`` (a tie splits the
  gradient in halves, rows first, then columns), so both give the same values, to every
  order. With ``"xla"`` JAX differentiates the maxima (forward mode too).
  """
  n, h, w, c = x.shape
  if h // 2 == 0 or w // 2 == 0:
    raise ValueError(f"max_pool_2x2 needs at least 2x2 pixels, got {h}x{w}")
  if POOL_OWN_VJP and _own_vjp(impl):
    return _max_pool_vjp(x)
  return _max_pool(x)


def _max_pool(x: jax.Array) -> jax.Array:
  n, h, w, c = x.shape
  h2, w2 = h // 2, w // 2
  x = x[:, : 2 * h2, : 2 * w2, :].reshape(n, h2, 2, w2, 2 * c)
  x = jnp.maximum(x[:, :, 0], x[:, :, 1]).reshape(n, h2, w2, 2, c)
  return jnp.maximum(x[:, :, :, 0], x[:, :, :, 1])


_max_pool_vjp = jax.custom_vjp(_max_pool)


def _max_pool_vjp_fwd(x):
  return _max_pool(x), x


def _max_pool_vjp_bwd(x, dy):
  n, h, w, c = x.shape
  h2, w2 = h // 2, w // 2
  # the weights are piecewise constant in x: no gradient flows through them
  windows = jax.lax.stop_gradient(x[:, : 2 * h2, : 2 * w2, :]).reshape(n, h2, 2, w2, 2, c)
  rows = jnp.maximum(windows[:, :, 0], windows[:, :, 1])  # [n, h2, w2, 2, c]
  weights = (
    _max_share(windows, windows[:, :, ::-1]) * _max_share(rows, rows[:, :, :, ::-1])[:, :, None]
  )
  dx = (dy[:, :, None, :, None, :] * weights).reshape(n, 2 * h2, 2 * w2, c)
  return (jnp.pad(dx, ((0, 0), (0, h - 2 * h2), (0, w - 2 * w2), (0, 0))),)


def _max_share(u, v):
  """JAX's derivative of ``jnp.maximum(u, v)`` with respect to ``u``: 1 where ``u > v``, 1/2
  on a tie, 0 elsewhere."""
  return jnp.where(u > v, 1.0, jnp.where(u == v, 0.5, 0.0)).astype(u.dtype)


_max_pool_vjp.defvjp(_max_pool_vjp_fwd, _max_pool_vjp_bwd)
