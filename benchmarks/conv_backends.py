"""Conv4's 3x3 convolutions on XLA:CPU: YNNPACK (XLA's default) against XLA's own
(``amaml.jit``'s compile options, :mod:`amaml.xla_options`), in one process.

    python benchmarks/conv_backends.py [--repeats 5 --rounds 3]

The shapes are those of the Omniglot 5w1s meta step (32 tasks, 5 support and 75 query
images a task, 64 channels): one convolution per task under ``lax.map`` (the per-task
kernels after adaptation), and one over all 2,400 query images with a shared kernel.
Each is compiled twice, with ``jax.jit`` and with ``amaml.jit``; rounds alternate the two.
Prints the median seconds per call of each and their ratio (amaml.jit / jax.jit).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
from jax import lax

import amaml
from amaml.models import layers


def _conv(x, k):
  return layers.conv3x3(x, k, impl="xla")  # lax.conv_general_dilated, "same" padding


def _per_task(x, k):
  return lax.map(lambda a: _conv(*a), (x, k))


CASES = (  # name, function, input shape, kernel shape
  ("per task, 75 x 28x28x1", _per_task, (32, 75, 28, 28, 1), (32, 3, 3, 1, 64)),
  ("per task, 75 x 14x14x64", _per_task, (32, 75, 14, 14, 64), (32, 3, 3, 64, 64)),
  ("per task, 75 x 7x7x64", _per_task, (32, 75, 7, 7, 64), (32, 3, 3, 64, 64)),
  ("per task, 5 x 28x28x1", _per_task, (32, 5, 28, 28, 1), (32, 3, 3, 1, 64)),
  ("per task, 5 x 14x14x64", _per_task, (32, 5, 14, 14, 64), (32, 3, 3, 64, 64)),
  ("shared, 2400 x 28x28x1", _conv, (2400, 28, 28, 1), (3, 3, 1, 64)),
  ("shared, 2400 x 14x14x64", _conv, (2400, 14, 14, 64), (3, 3, 64, 64)),
  ("shared, 2400 x 7x7x64", _conv, (2400, 7, 7, 64), (3, 3, 64, 64)),
)


def _time(f, args, repeats):
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--repeats", type=int, default=5, help="timed calls per round")
  ap.add_argument("--rounds", type=int, default=3)
  args = ap.parse_args(argv)
  print(f"jax {jax.__version__}, amaml.jit options: {amaml.xla_options.compiler_options()}")
  print("| convolution | jax.jit (YNNPACK), s | amaml.jit (XLA's own), s | ratio |")
  print("| --- | --- | --- | --- |")
  key = jax.random.key(0)
  for name, fn, xs, ks in CASES:
    x = jax.random.normal(key, xs)
    k = jax.random.normal(key, ks) * 0.1
    plain, ours = jax.jit(fn), amaml.jit(fn)
    t = {"plain": [], "ours": []}
    for _ in range(args.rounds):
      t["plain"].append(_time(plain, (x, k), args.repeats))
      t["ours"].append(_time(ours, (x, k), args.repeats))
    a, b = statistics.median(t["plain"]), statistics.median(t["ours"])
    print(f"| {name} | {a:.4f} | {b:.4f} | {b / a:.2f} |", flush=True)


if __name__ == "__main__":
  main()
