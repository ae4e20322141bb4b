"""Episodes per second of the host (numpy) and on-device (jax) episode samplers.

Default: 5-way 1-shot, 15 queries per class, 32 tasks per batch, on the Omniglot
'maml' meta-train split (4,400 classes of 20 x 28x28x1) if the arrays are found,
else a random uint8 array of the same shape.

  python benchmarks/samplers.py [--ways 5 --shots 1 --queries 15 --tasks 32 --seconds 3]
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from amaml import data


def _rate(fn, seconds):
  fn()  # warm-up (compilation)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    fn()
    n += 1
  return n / (time.perf_counter() - t0)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--ways", type=int, default=5)
  ap.add_argument("--shots", type=int, default=1)
  ap.add_argument("--queries", type=int, default=15)
  ap.add_argument("--tasks", type=int, default=32)
  ap.add_argument("--seconds", type=float, default=3.0)
  ap.add_argument("--scan", type=int, default=50, help="batches per lax.scan call")
  a = ap.parse_args()
  args = (a.ways, a.shots, a.queries, a.tasks)

  try:
    images, src = data.load_omniglot("maml").train.images, "omniglot-maml-train"
  except (FileNotFoundError, ValueError):
    images = np.random.default_rng(0).integers(0, 256, (4400, 20, 28, 28, 1), dtype=np.uint8)
    src = "random-uint8"
  out = {
    "source": src,
    "classes": images.shape[0],
    "ways": a.ways,
    "shots": a.shots,
    "queries": a.queries,
    "tasks_per_batch": a.tasks,
    "backend": jax.default_backend(),
  }

  rng = np.random.default_rng(0)
  out["host_batches_per_s"] = _rate(lambda: data.sample_episodes(rng, images, *args), a.seconds)

  with data.EpisodeIterator(images, *args, seed=0, prefetch=4, device_put=True) as it:
    out["host_prefetch_device_put_batches_per_s"] = _rate(
      lambda: jax.block_until_ready(next(it)), a.seconds
    )

  dev_images = jax.device_put(jnp.asarray(images))
  one = jax.jit(data.sample_tasks, static_argnums=(2, 3, 4, 5))
  keys = iter(jax.random.split(jax.random.key(0), 1_000_000))
  out["device_jit_batches_per_s"] = _rate(
    lambda: jax.block_until_ready(one(next(keys), dev_images, *args)), a.seconds
  )

  @jax.jit
  def scanned(key, imgs):  # the sampler inside lax.scan, as in a scanned training loop
    def body(carry, k):
      b = data.sample_tasks(k, imgs, *args)
      return carry + b.query_x.sum() + b.support_x.sum(), None

    return jax.lax.scan(body, jnp.float32(0), jax.random.split(key, a.scan))[0]

  out["device_scan_batches_per_s"] = a.scan * _rate(
    lambda: jax.block_until_ready(scanned(next(keys), dev_images)), a.seconds
  )
  for k in [k for k in out if k.endswith("batches_per_s")]:
    out[k.replace("batches", "episodes")] = round(out[k] * a.tasks)
    out[k] = round(out[k], 1)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
