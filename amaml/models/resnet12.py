"""ResNet-12: the residual backbone of MetaOptNet (Lee et al., 2019) and much of few-shot learning.

Four residual blocks with ``channels`` filters (``(64, 160, 320, 640)`` by default). A
block with ``c`` filters is::

    x -> conv 3x3 -> BN -> leaky ReLU -> conv 3x3 -> BN -> leaky ReLU -> conv 3x3 -> BN -> (+)
    x -> conv 1x1 -> BN ---------------------------------------------------------------> (+)
      -> leaky ReLU -> max-pool 2x2 [-> dropout (blocks 1, 2) or DropBlock (blocks 3, 4)]

with leaky ReLU of slope 0.1 and convolutions without bias (batch norm follows each one).
Global average pooling then gives ``channels[-1]`` features and a linear ``head`` the
logits. 84x84 inputs go 84 -> 42 -> 21 -> 10 -> 5; the input needs at least 16x16
pixels. For 5-way on 84x84x3 the network has 12,427,525 parameters (12,424,320 before
the head: the "12.4M" of the literature).

Batch norm is the one of :class:`amaml.models.Conv4`, MAML's transductive batch norm:
every batch is normalised with its own statistics (per channel over ``(n, H, W)``), there
are no running averages and no ``train`` flag, and scale and shift are ordinary
parameters adapted by the inner loop. Under ``jax.vmap`` over tasks each task is
normalised with its own statistics.

Parameters are a nested dict; block ``b`` (0 to 3) holds::

    {"block{b}": {"conv0": {"kernel": [3, 3, C_in, c]}, "norm0": {"scale": [c], "bias": [c]},
                  "conv1": ..., "norm1": ..., "conv2": ..., "norm2": ...,
                  "conv_shortcut": {"kernel": [1, 1, C_in, c]}, "norm_shortcut": ...},
     "head": {"kernel": [channels[-1], num_classes], "bias": [num_classes]}}

so ``"^head/"`` selects the head (ANIL) and ``r"^block\\d+/norm"`` every batch-norm scale and
shift (MAML++'s per-step batch norm; ``amaml train --model resnet12 --method maml++`` uses
it). Convolution kernels are initialised He-normal over their fan-out (as MetaOptNet), the
head like PyTorch's default ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (as Conv4), batch-norm
scale 1 and shift 0.

DropBlock (Ghiasi et al., 2018) is off by default (``drop_rate=0``) and, when on, only
acts in a call with ``deterministic=False`` and a ``"dropout"`` rng; the default call is a
pure, deterministic function of parameters and input, as MAML's inner loop needs::

    model = ResNet12(num_classes=5)
    params = model.init(jax.random.key(0), jnp.zeros((1, 84, 84, 3)))["params"]
    apply_fn = lambda params, x: model.apply({"params": params}, x)
    loss_fn = amaml.losses.cross_entropy(apply_fn)

``conv_impl`` picks how the 3x3 convolutions are computed, as for Conv4 (``"tasks"``: one
ordinary convolution per task, the CPU's choice under ``vmap`` with per-task weights;
``"matmul"``: patches and one matrix product; ``"xla"``: for GPU; ``"auto"``: by backend);
see :mod:`amaml.models.layers`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from amaml.models import layers
from amaml.models.conv4 import BN_EPS, _BatchNorm, _Dense, check_channels

CHANNELS = (64, 160, 320, 640)
LEAKY_SLOPE = 0.1
# He-normal over the fan-out (MetaOptNet's kaiming_normal_(mode="fan_out"))
_KERNEL_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def drop_block(key: jax.Array, x: jax.Array, rate: float, block_size: int) -> jax.Array:
  """DropBlock (Ghiasi et al., 2018): zero square blocks of ``x`` (``[n, H, W, C]``),
  each ``block_size`` a side (at most the map's size), so that about ``rate`` of the
  activations are dropped, and rescale the rest to keep the mean. Pure; ``key`` draws
  the block positions (one independent mask per example and channel)."""
  n, h, w, c = x.shape
  size = min(block_size, h, w)
  # the seed rate that drops about `rate` of the map once seeds grow into blocks
  gamma = rate / size**2 * (h * w) / ((h - size + 1) * (w - size + 1))
  seeds = jax.random.bernoulli(key, gamma, (n, h - size + 1, w - size + 1, c)).astype(x.dtype)
  pad = size - 1
  seeds = jnp.pad(seeds, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  # a seed at (i, j) covers rows i..i+size-1 and columns j..j+size-1
  dropped = jax.lax.reduce_window(
    seeds, 0.0, jax.lax.max, (1, size, size, 1), (1, 1, 1, 1), "VALID"
  )
  keep = 1.0 - dropped
  return x * keep * (keep.size / jnp.maximum(jnp.sum(keep), 1.0))


def _dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


class _Conv(nn.Module):
  """A convolution without bias, ``size`` 3 (padding 1) or 1, stride 1."""

  features: int
  size: int
  impl: str

  @nn.compact
  def __call__(self, x):
    c_in = check_channels(self, x, "ResNet12")
    kernel = self.param("kernel", _KERNEL_INIT, (self.size, self.size, c_in, self.features))
    if self.size == 1:
      return x @ kernel[0, 0]
    return layers.conv3x3(x, kernel, impl=self.impl)


class _Block(nn.Module):
  """One residual block: three conv-BN layers and a 1x1 conv-BN shortcut, then a 2x2
  max-pool and, with ``drop_rate``, dropout or DropBlock."""

  features: int
  impl: str
  bn_eps: float
  drop_rate: float
  drop_block_size: int  # 0: plain dropout

  @nn.compact
  def __call__(self, x, deterministic: bool):
    shortcut = _BatchNorm(self.bn_eps, self.impl, name="norm_shortcut")(
      _Conv(self.features, 1, self.impl, name="conv_shortcut")(x)
    )
    for i in range(3):
      x = _Conv(self.features, 3, self.impl, name=f"conv{i}")(x)
      x = _BatchNorm(self.bn_eps, self.impl, name=f"norm{i}")(x)
      if i < 2:
        x = jax.nn.leaky_relu(x, LEAKY_SLOPE)
    x = layers.max_pool_2x2(jax.nn.leaky_relu(x + shortcut, LEAKY_SLOPE), impl=self.impl)
    if self.drop_rate == 0.0 or deterministic:
      return x
    key = self.make_rng("dropout")
    if self.drop_block_size:
      return drop_block(key, x, self.drop_rate, self.drop_block_size)
    return _dropout(key, x, self.drop_rate)


class ResNet12(nn.Module):
  """ResNet-12 for few-shot classification; input NHWC ``[n, H, W, C]`` float (at least
  16x16), output logits ``[n, num_classes]``.

  Attributes:
    num_classes: number of logits (the ``ways`` of the task); ``0``: no head, the output
      is the globally average-pooled features ``[n, channels[-1]]`` (an embedding, for
      ProtoNets).
    channels: filters of the four blocks; ``(64, 160, 320, 640)`` is the published network,
      smaller widths are for tests and quick experiments.
    conv_impl: ``"auto"``, ``"tasks"``, ``"matmul"`` or ``"xla"`` (see :mod:`amaml.models.layers`).
    bn_eps: batch-norm epsilon.
    drop_rate: dropout rate after the first two blocks and DropBlock rate after the last
      two (MetaOptNet's placement); ``0`` (the default): off. Only applied in a call with
      ``deterministic=False``, which then needs a ``"dropout"`` rng.
    drop_block_size: DropBlock's block side (MetaOptNet: 5; capped at the feature map's).
  """

  num_classes: int
  channels: tuple[int, ...] = CHANNELS
  conv_impl: str = "auto"
  bn_eps: float = BN_EPS
  drop_rate: float = 0.0
  drop_block_size: int = 5

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """Logits (or features with ``num_classes=0``) of ``x``; ``deterministic=False``
    turns dropout and DropBlock on when ``drop_rate > 0``."""
    if x.ndim != 4:
      raise ValueError(
        f"ResNet12 expects NHWC input [n, H, W, C], got shape {tuple(x.shape)} ({x.ndim} "
        "dims); for one image add a batch axis (x[None]), for a grey image a channel axis "
        "(x[..., None])"
      )
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"ResNet12 expects a floating-point input, got {x.dtype}")
    if not self.channels or min(self.channels) < 1:
      raise ValueError(f"ResNet12 needs four positive block widths, got channels={self.channels}")
    if not 0.0 <= self.drop_rate < 1.0:
      raise ValueError(f"ResNet12's drop_rate must be in [0, 1), got {self.drop_rate}")
    side = 2 ** len(self.channels)
    if x.shape[1] < side or x.shape[2] < side:
      raise ValueError(
        f"ResNet12 needs at least {side}x{side} pixels, got "
        f"{x.shape[1]}x{x.shape[2]} (input shape {tuple(x.shape)})"
      )
    impl = layers.resolve_conv_impl(self.conv_impl)
    for b, features in enumerate(self.channels):
      x = _Block(
        features,
        impl,
        self.bn_eps,
        self.drop_rate,
        self.drop_block_size if b >= 2 else 0,
        name=f"block{b}",
      )(x, deterministic)
    x = jnp.mean(x, axis=(1, 2))
    if self.num_classes == 0:
      return x
    return _Dense(self.num_classes, name="head")(x)
