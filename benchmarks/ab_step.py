"""One commit's Conv4 meta step against another's, timed in fresh processes, interleaved.

    python benchmarks/ab_step.py --other /path/to/checkout --config omniglot-5w1s --rounds 3

Each round times ``throughput.py``'s ``amaml-maml`` (or ``--impl alpha``) step, on the
peers' episodes and weights, once with this checkout's amaml and once with ``--other``'s
(``PYTHONPATH``), ``--steps`` steps after one warm-up, and prints each process's median and
the last meta-loss. Pairs measured in the same minute are what compare on a noisy machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def worker(impl: str, config: str, steps: int) -> str:
  sys.path.insert(0, HERE)
  import jax
  import jax.numpy as jnp
  import numpy as np

  import _peers
  import amaml
  from amaml.models import Conv4

  common = _peers.peers_common()
  cfg = common.CONFIGS[config]
  pool = [
    amaml.TaskBatch(
      *(jnp.asarray(a) for a in (xs[..., None], ys.astype(np.int32))),
      *(jnp.asarray(a) for a in (xq[..., None], yq.astype(np.int32))),
    )
    for xs, ys, xq, yq in common.make_pool(cfg, 0, 4)
  ]
  model = Conv4(cfg["ways"])
  params = _peers.conv4_params_from_torch(common.init_params(0, cfg["ways"]))
  loss_fn = amaml.losses.cross_entropy(lambda p, x: model.apply({"params": p}, x))
  kw = dict(
    alpha=cfg["alpha"],
    beta=cfg["outer_lr"],
    inner_steps=cfg["inner_steps"],
    track_pre_adaptation=False,
  )
  learner = (amaml.maml if impl == "maml" else amaml.alpha_maml)(loss_fn, **kw)
  state = learner.init(params)
  step = learner.step.lower(state, pool[0]).compile()
  state, m = step(state, pool[0])
  jax.block_until_ready(m)
  times = []
  for i in range(steps):
    t = time.perf_counter()
    state, m = step(state, pool[(i + 1) % len(pool)])
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  each = " ".join(f"{t:.2f}" for t in times)
  return f"{statistics.median(times):.3f} s/step (steps {each}), loss {float(m['loss']):.5f}"


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--other", required=True, help="another checkout of amaml (its root)")
  ap.add_argument("--config", default="omniglot-5w1s", choices=["omniglot-5w1s", "omniglot-20w1s"])
  ap.add_argument("--impl", default="maml", choices=["maml", "alpha"])
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    print(worker(args.impl, args.config, args.steps), flush=True)
    return
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    "--worker",
    "--other",
    "-",
    "--config",
    args.config,
    "--impl",
    args.impl,
    "--steps",
    str(args.steps),
  ]
  for r in range(args.rounds):
    for name, root in (("this", ROOT), ("other", os.path.abspath(args.other))):
      env = {**os.environ, "PYTHONPATH": root}
      out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
      print(f"round {r} {name}: {out.strip().splitlines()[-1]}", flush=True)


if __name__ == "__main__":
  main()
