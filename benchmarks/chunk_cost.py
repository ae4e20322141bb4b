"""The fixed cost of one call of the training loop (``amaml.train.make_train_chunk``).

    python benchmarks/chunk_cost.py                      # Omniglot 5w1s, 20 steps per mode
    python benchmarks/chunk_cost.py --config sinusoid --steps 2000

Trains the same run alternately with one step per call and with ``--steps`` steps per call
(one compiled loop serves both) and prints steps/s for each, twice. The difference is the
cost that :data:`amaml.train.CHUNK_SECONDS` amortises.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from amaml import train
from amaml.configs import get_config


def main(argv=None):
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--config", default="omniglot-5w1s")
  ap.add_argument("--steps", type=int, default=20, help="steps per mode (and per long call)")
  args = ap.parse_args(argv)
  cfg = get_config(args.config, log_every=args.steps)
  exp = train.build(cfg)
  chunk = train.make_train_chunk(exp, args.steps)
  state = exp.learner.init(jax.tree.map(jnp.copy, exp.params))
  images = exp.data["train"]
  step = 0

  def call(n):
    nonlocal state, step
    state, ms = chunk(state, images, jnp.int32(step), jnp.int32(n))
    int(np.asarray(ms["nonfinite_streak"]).max())  # waits, as amaml.train does
    step += n

  t0 = time.perf_counter()
  call(1)
  print(f"compile and first step: {time.perf_counter() - t0:.1f} s", flush=True)
  for per_call in (1, args.steps, 1, args.steps):
    t0 = time.perf_counter()
    for _ in range(args.steps // per_call):
      call(per_call)
    rate = args.steps / (time.perf_counter() - t0)
    print(f"{per_call:>5} step(s) per call: {rate:.3f} steps/s", flush=True)


if __name__ == "__main__":
  main()
