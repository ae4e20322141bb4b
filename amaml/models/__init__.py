"""Flax (linen) models for few-shot learning, and adapters for Flax NNX and Equinox models."""

from amaml.models.mlp import MLP
from amaml.models.conv4 import Conv4
from amaml.models.resnet12 import ResNet12
from amaml.models.adapters import from_equinox, from_nnx

__all__ = ["MLP", "Conv4", "ResNet12", "from_equinox", "from_nnx"]
