"""Bridges to the peer implementations in ``shared/peers`` (benchmarks and tests only).

The peers (PyTorch and plain-JAX MAML on Conv4) start from the numpy weights of
``shared/peers/common.init_params`` in PyTorch layout; :func:`conv4_params_from_torch`
puts those into :class:`amaml.models.Conv4`'s parameter dict, so that amaml and a peer
start from identical weights and compute the same meta-loss.
"""

from __future__ import annotations

import os
import sys

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
PEERS_DIR = os.environ.get(
  "AMAML_PEERS_DIR", os.path.normpath(os.path.join(_HERE, "..", "..", "shared", "peers"))
)
if not os.path.isdir(PEERS_DIR) and os.path.isdir("/work/shared/peers"):
  PEERS_DIR = "/work/shared/peers"


def peers_available() -> bool:
  return os.path.exists(os.path.join(PEERS_DIR, "common.py"))


def peers_common():
  """The peers' ``common`` module (data, configs, shared init)."""
  if PEERS_DIR not in sys.path:
    sys.path.insert(0, PEERS_DIR)
  import common  # noqa: E402  (shared/peers/common.py)

  return common


def conv4_params_from_torch(torch_params, num_blocks: int = 4) -> dict:
  """PyTorch-layout Conv4 weights (``conv{b}.weight`` OIHW, ``conv{b}.bias``,
  ``bn{b}.weight``/``bias``, ``fc.weight`` [out, in], ``fc.bias``) -> Conv4 params.

  The head's input order equals PyTorch's (C, H, W) flattening only when the last
  feature map is 1x1 (28x28 input), the case this is for.
  """
  import jax.numpy as jnp

  get = lambda k: np.asarray(torch_params[k], dtype=np.float32)
  out = {}
  for b in range(num_blocks):
    out[f"conv{b}"] = {
      "kernel": jnp.asarray(np.transpose(get(f"conv{b}.weight"), (2, 3, 1, 0))),
      "bias": jnp.asarray(get(f"conv{b}.bias")),
    }
    out[f"norm{b}"] = {
      "scale": jnp.asarray(get(f"bn{b}.weight")),
      "bias": jnp.asarray(get(f"bn{b}.bias")),
    }
  out["head"] = {"kernel": jnp.asarray(get("fc.weight").T), "bias": jnp.asarray(get("fc.bias"))}
  return out


def conv4_grads_to_torch(grads, num_blocks: int = 4) -> dict:
  """Inverse of :func:`conv4_params_from_torch` for a gradient (numpy float64)."""
  out = {}
  for b in range(num_blocks):
    out[f"conv{b}.weight"] = np.transpose(np.asarray(grads[f"conv{b}"]["kernel"]), (3, 2, 0, 1))
    out[f"conv{b}.bias"] = np.asarray(grads[f"conv{b}"]["bias"])
    out[f"bn{b}.weight"] = np.asarray(grads[f"norm{b}"]["scale"])
    out[f"bn{b}.bias"] = np.asarray(grads[f"norm{b}"]["bias"])
  out["fc.weight"] = np.asarray(grads["head"]["kernel"]).T
  out["fc.bias"] = np.asarray(grads["head"]["bias"])
  return {k: v.astype(np.float64) for k, v in out.items()}
