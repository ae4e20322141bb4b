"""What produced a result: library versions and the machine."""

from __future__ import annotations

import os
import platform


def versions() -> dict:
  """Versions of amaml and the libraries it runs on, the backend and the machine.

  >>> v = versions()
  >>> {"amaml", "jax", "backend"} <= set(v)
  True
  """
  import flax
  import jax
  import jaxlib
  import numpy as np
  import optax

  import amaml

  return {
    "amaml": amaml.__version__,
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
    "numpy": np.__version__,
    "python": platform.python_version(),
    "backend": jax.default_backend(),
    "devices": [d.device_kind for d in jax.devices()],
    "cpu": platform.processor() or platform.machine(),
    "cores": os.cpu_count(),
  }
