"""Flax (linen) models for few-shot learning."""
