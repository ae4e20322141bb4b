"""Flax (linen) models for few-shot learning."""
from amaml.models.mlp import MLP
