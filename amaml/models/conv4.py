"""Conv4: the four-block convolutional network of MAML (Finn et al., 2017).

Each block is ``conv 3x3 (padding 1, with bias) -> batch norm -> ReLU -> max-pool 2x2``,
then the features are flattened and a linear head gives the logits.

- Omniglot, 28x28x1: ``Conv4(num_classes)`` (``hidden=64``); the spatial size goes
  28 -> 14 -> 7 -> 3 -> 1, so the head sees 64 features.
- miniImageNet, 84x84x3: ``Conv4(num_classes, hidden=32)``; 84 -> 42 -> 21 -> 10 -> 5,
  so the head sees 5 * 5 * 32 = 800 features (flattened in NHWC order: (H, W, C)).

Batch norm is MAML's transductive one: it always normalises with the statistics
(mean, biased variance, eps 1e-5) of the batch it is given, per channel over
(n, H, W); there are no running averages and no ``train`` flag. Its scale and shift
are ordinary parameters, adapted in the inner loop like the conv and head weights.
Under ``jax.vmap`` over tasks every task is normalised with its own statistics.

The conv biases are parameters, as in MAML's network and PyTorch's ``Conv2d``, but the
blocks do not add them: the batch norm subtracts each channel's mean, so a bias before it
changes nothing (``norm(conv(x) + b) == norm(conv(x))``). Their gradient is therefore
exactly 0, and they keep their initial values. Adding them would cost a pass over every
conv output, and their gradient would be rounding noise (about 1e-7 against 1-20 for the
kernels), which an Adam outer step turns into steps of the learning rate's size.

Parameters are a plain nested dict::

    {"conv0": {"kernel": [3, 3, C_in, hidden], "bias": [hidden]},
     "norm0": {"scale": [hidden], "bias": [hidden]},
     ... blocks 1 to num_blocks - 1 ...,
     "head": {"kernel": [features, num_classes], "bias": [num_classes]}}

initialised like PyTorch's defaults: conv and head weights and biases
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (``fan_in = 9 * C_in`` for a conv, the
feature count for the head), batch-norm scale 1 and shift 0.

Use it with amaml's meta step through ``apply``::

    model = Conv4(num_classes=5)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    apply_fn = lambda params, x: model.apply({"params": params}, x)
    loss_fn = amaml.losses.cross_entropy(apply_fn)

``conv_impl`` picks how the convolutions are computed (same values, different
speed): ``"tasks"`` (one ordinary convolution per task, with a hand-written gradient: the
fast form on CPU under ``vmap`` with per-task weights and second-order gradients),
``"matmul"`` (shifted patches and one matrix product), ``"xla"``
(``lax.conv_general_dilated``: the one to use on GPU) or ``"auto"`` (``"tasks"``
when the default JAX backend is the CPU, else ``"xla"``). See
:mod:`amaml.models.layers` and ``benchmarks/throughput.py``.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from amaml.models import layers

BN_EPS = 1e-5


def _uniform_fan_in(fan_in: int):
  """PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def check_channels(module: nn.Module, x, model: str) -> int:
  """``x``'s channel count, with a one-line error when it is not the one ``module``'s kernel
  was built for."""
  if module.has_variable("params", "kernel"):
    expected = module.get_variable("params", "kernel").shape[2]
    if x.shape[-1] != expected:
      raise ValueError(
        f"{module.name} was built for {expected} input channel(s), got an input "
        f"with {x.shape[-1]} (shape {tuple(x.shape)}); {model} expects NHWC input"
      )
  return x.shape[-1]


class _Conv3x3(nn.Module):
  """A 3x3 convolution whose ``bias`` is a parameter that is not added: every one in Conv4
  is followed by a batch norm over the batch's own statistics, which subtracts it again."""

  features: int
  impl: str

  @nn.compact
  def __call__(self, x):
    c_in = check_channels(self, x, "Conv4")
    init = _uniform_fan_in(9 * c_in)
    kernel = self.param("kernel", init, (3, 3, c_in, self.features))
    self.param("bias", init, (self.features,))
    return layers.conv3x3(x, kernel, impl=self.impl)


class _BatchNorm(nn.Module):
  eps: float
  impl: str

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    return layers.batch_norm(x, scale, bias, eps=self.eps, impl=self.impl)


class _Dense(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    init = _uniform_fan_in(x.shape[-1])
    kernel = self.param("kernel", init, (x.shape[-1], self.features))
    bias = self.param("bias", init, (self.features,))
    return x @ kernel + bias


class Conv4(nn.Module):
  """Conv4 for few-shot classification; input NHWC ``[n, H, W, C]`` float,
  output logits ``[n, num_classes]``.

  Attributes:
    num_classes: number of logits (the ``ways`` of the task); ``0``: no head, the output
      is the flattened features ``[n, hidden * h * w]`` (an embedding, for ProtoNets).
    hidden: filters per conv block (64 for Omniglot, 32 for miniImageNet).
    num_blocks: conv blocks; the input needs at least ``2 ** num_blocks`` pixels a side.
    conv_impl: ``"auto"``, ``"tasks"``, ``"matmul"`` or ``"xla"`` (see the module docstring).
    bn_eps: batch-norm epsilon.
  """

  num_classes: int
  hidden: int = 64
  num_blocks: int = 4
  conv_impl: str = "auto"
  bn_eps: float = BN_EPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(
        f"Conv4 expects NHWC input [n, H, W, C], got shape {tuple(x.shape)} ({x.ndim} dims); "
        "for one image add a batch axis (x[None]), for a grey image a channel axis (x[..., None])"
      )
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"Conv4 expects a floating-point input, got {x.dtype}")
    side = 2**self.num_blocks
    if x.shape[1] < side or x.shape[2] < side:
      raise ValueError(
        f"Conv4 with {self.num_blocks} blocks needs at least {side}x{side} pixels, "
        f"got {x.shape[1]}x{x.shape[2]} (input shape {tuple(x.shape)})"
      )
    impl = layers.resolve_conv_impl(self.conv_impl)
    for b in range(self.num_blocks):
      x = _Conv3x3(self.hidden, impl, name=f"conv{b}")(x)
      x = _BatchNorm(self.bn_eps, impl, name=f"norm{b}")(x)
      x = layers.max_pool_2x2(jax.nn.relu(x), impl=impl)
    x = x.reshape(x.shape[0], -1)
    if self.num_classes == 0:
      return x
    return _Dense(self.num_classes, name="head")(x)
