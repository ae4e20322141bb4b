"""amaml: Alpha MAML in JAX (public API is filled in module by module)."""
from amaml.task import TaskBatch

__all__ = ["TaskBatch"]
__version__ = "0.1.0"
