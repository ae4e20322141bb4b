"""Flax (linen) models for few-shot learning."""
from amaml.models.mlp import MLP
from amaml.models.conv4 import Conv4
