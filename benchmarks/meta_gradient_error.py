"""The float32 meta-loss and meta-gradient against float64, all tasks at once or one at a time.

    python benchmarks/meta_gradient_error.py --config omniglot-5w1s --tasks 4
    python benchmarks/meta_gradient_error.py --config omniglot-20w1s --tasks 2 4 8 16

On the first ``--tasks`` tasks of ``throughput.py``'s first Omniglot meta-batch (the peers'
sampler and initial weights, ``../shared/peers``), MAML's meta-loss and its gradient in the
parameters (``amaml.maml(...).meta_loss``, Conv4 with ``conv_impl="auto"``) are computed in
float32 with ``tasks_at_once`` 0 (all tasks, one ``vmap``) and 1 (one at a time), and in
float64 with 0. Prints one JSON line per (tasks, tasks_at_once): the loss's relative error,
the gradient's (the norm of the difference over the norm of float64's), and, in float64,
how far one at a time is from all at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _peers  # noqa: E402


def loss_and_grad(cfg, batch, weights, dtype, tasks_at_once):
  """The meta-loss and the flat meta-gradient of MAML on ``batch`` in ``dtype``."""
  import amaml
  from amaml.models import Conv4

  model = Conv4(cfg["ways"])
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), _peers.conv4_params_from_torch(weights))
  loss_fn = amaml.losses.cross_entropy(lambda p, x: model.apply({"params": p}, x))
  learner = amaml.maml(
    loss_fn, alpha=cfg["alpha"], inner_steps=cfg["inner_steps"], tasks_at_once=tasks_at_once
  )
  xs, ys, xq, yq = batch
  as_x = lambda x: jnp.asarray(x[..., None], dtype)
  as_y = lambda y: jnp.asarray(y.astype(np.int32))
  tasks = amaml.TaskBatch(as_x(xs), as_y(ys), as_x(xq), as_y(yq))
  alpha = jnp.asarray(cfg["alpha"], dtype)
  value_and_grad = jax.value_and_grad(learner.meta_loss, has_aux=True)
  (loss, _), grads = jax.jit(value_and_grad)(params, alpha, tasks)
  flat = jnp.concatenate([jnp.ravel(g).astype(jnp.float64) for g in jax.tree.leaves(grads)])
  return float(loss), np.asarray(flat)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", default="omniglot-5w1s", choices=["omniglot-5w1s", "omniglot-20w1s"])
  ap.add_argument("--tasks", nargs="+", type=int, default=[4])
  args = ap.parse_args(argv)
  common = _peers.peers_common()
  cfg = common.CONFIGS[args.config]
  batch = common.make_pool(cfg, 0, 1)[0]
  weights = common.init_params(0, cfg["ways"])
  rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
  for n in args.tasks:
    first = tuple(a[:n] for a in batch)
    with jax.enable_x64(True):
      loss64, grad64 = loss_and_grad(cfg, first, weights, jnp.float64, 0)
      _, grad64_one = loss_and_grad(cfg, first, weights, jnp.float64, 1)
    for k in (0, 1):
      loss32, grad32 = loss_and_grad(cfg, first, weights, jnp.float32, k)
      row = dict(
        config=args.config, tasks=n, tasks_at_once=k, loss32=loss32, loss64=loss64,
        loss_rel_error=abs(loss32 - loss64) / abs(loss64), grad_rel_error=rel(grad32, grad64),
        float64_one_at_a_time_vs_all=rel(grad64_one, grad64), versions={"jax": jax.__version__},
      )  # fmt: skip
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
