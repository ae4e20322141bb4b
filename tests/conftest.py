"""Shared test fixtures."""
import jax
import pytest


@pytest.fixture
def x64():
  """Run a test in float64 (for finite differences)."""
  with jax.enable_x64(True):
    yield
