"""N-way K-shot classification episodes from :class:`ClassImages`, on the host or on device.

Every task draws ``ways`` distinct classes in random order (the order is the
label: the ``i``-th drawn class gets label ``i``), then ``shots + queries``
distinct examples of each: the first ``shots`` are support, the rest query, so
support and query never share an example. Both samplers return a
:class:`~amaml.task.TaskBatch`, class-major within each set::

  support_x float32 [tasks, ways*shots, H, W, C] in [0, 1]   support_y int32 [tasks, ways*shots]
  query_x   float32 [tasks, ways*queries, H, W, C]           query_y   int32 [tasks, ways*queries]

Classes are drawn by Floyd's algorithm (a uniform ``ways``-subset from ``ways``
random integers per task, whatever the number of classes), then put in random
order; examples are the ``shots + queries`` smallest of uniform random keys per
(task, class, example), in key order. Both are vectorised over tasks (the only
Python/``fori_loop`` loop is Floyd's, over the ``ways`` draws).

* :func:`sample_episodes`: numpy. Deterministic from the seed or
  ``numpy.random.Generator``. :class:`EpisodeIterator` runs it in a background
  thread (optionally ``jax.device_put``-ing each batch) so the device never waits.
* :func:`sample_tasks`: the same with ``jax.random`` on a device-resident uint8
  array, pure and jittable (``ways``, ``shots``, ``queries``, ``num_tasks``
  static), so a whole training loop can run under ``lax.scan``.

>>> import numpy as np
>>> images = np.random.default_rng(0).integers(0, 256, (10, 6, 4, 4, 1), dtype=np.uint8)
>>> b = sample_episodes(0, images, ways=3, shots=1, queries=2, num_tasks=8)
>>> b.support_x.shape, b.support_y[0].tolist(), b.query_y[0].tolist()
((8, 3, 4, 4, 1), [0, 1, 2], [0, 0, 1, 1, 2, 2])
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator

import numpy as np

from amaml.data.sources import ClassImages
from amaml.task import TaskBatch


def _as_images(images) -> Any:
  return images.images if isinstance(images, ClassImages) else images


def check_episode_args(images_shape, ways: int, shots: int, queries: int, num_tasks: int) -> None:
  """Raises ``ValueError`` naming the problem if an episode cannot be drawn."""
  for name, v in (("ways", ways), ("shots", shots), ("queries", queries), ("num_tasks", num_tasks)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  if len(images_shape) < 3:
    raise ValueError(f"images must be [classes, examples, ...], got shape {tuple(images_shape)}")
  classes, examples = int(images_shape[0]), int(images_shape[1])
  if ways > classes:
    raise ValueError(
      f"ways={ways} exceeds the {classes} classes of the source: lower ways or use "
      "a split with more classes"
    )
  if shots + queries > examples:
    raise ValueError(
      f"shots + queries = {shots} + {queries} = {shots + queries} exceeds the {examples} "
      f"examples per class: support and query examples must be distinct, so lower them"
    )


def _labels(ways: int, per_class: int, num_tasks: int) -> np.ndarray:
  lab = np.repeat(np.arange(ways, dtype=np.int32), per_class)
  return np.ascontiguousarray(np.broadcast_to(lab, (num_tasks, ways * per_class)))


def _floyd(rng: np.random.Generator, n: int, k: int, batch: int) -> np.ndarray:
  """``[batch, k]`` uniformly random ordered samples of ``k`` distinct ints in ``[0, n)``."""
  t = rng.integers(0, np.arange(n - k + 1, n + 1), size=(batch, k))  # t[:, i] in [0, n-k+i]
  chosen = np.empty((batch, k), np.int64)
  for i in range(k):  # Floyd: draw t in [0, j]; if taken, take j (never taken yet)
    dup = (chosen[:, :i] == t[:, i : i + 1]).any(axis=1)
    chosen[:, i] = np.where(dup, n - k + i, t[:, i])
  order = np.argsort(rng.random((batch, k)), axis=1)  # Floyd's set, in random order
  return np.take_along_axis(chosen, order, axis=1)


def _smallest_sorted(keys: np.ndarray, k: int) -> np.ndarray:
  """Indices of the ``k`` smallest keys along the last axis, in increasing key order."""
  idx = np.argpartition(keys, k - 1, axis=-1)[..., :k]
  order = np.argsort(np.take_along_axis(keys, idx, axis=-1), axis=-1)
  return np.take_along_axis(idx, order, axis=-1)


def sample_episode_indices(
  rng, num_classes: int, num_examples: int, ways: int, shots: int, queries: int, num_tasks: int
) -> tuple[np.ndarray, np.ndarray]:
  """``(classes [tasks, ways], examples [tasks, ways, shots + queries])`` drawn as described
  in the module docstring (``rng``: a seed or a ``numpy.random.Generator``)."""
  rng = np.random.default_rng(rng)
  check_episode_args((num_classes, num_examples, 1), ways, shots, queries, num_tasks)
  classes = _floyd(rng, num_classes, ways, num_tasks)
  examples = _smallest_sorted(
    rng.random((num_tasks, ways, num_examples), np.float32), shots + queries
  )
  return classes, examples


def sample_episodes(rng, images, ways: int, shots: int, queries: int, num_tasks: int) -> TaskBatch:
  """A :class:`TaskBatch` of ``num_tasks`` N-way K-shot tasks, as numpy arrays.

  ``rng``: an int seed or a ``numpy.random.Generator`` (advanced in place, so
  successive calls give fresh tasks); ``images``: a :class:`ClassImages` or a
  uint8 array ``[classes, examples, H, W, C]``.

  >>> import numpy as np
  >>> images = np.zeros((4, 3, 2, 2, 1), np.uint8)
  >>> sample_episodes(0, images, ways=5, shots=1, queries=1, num_tasks=1)
  Traceback (most recent call last):
  ...
  ValueError: ways=5 exceeds the 4 classes of the source: lower ways or use a split with more classes
  """
  x = np.asarray(_as_images(images))
  if x.dtype != np.uint8:
    raise TypeError(f"images must be uint8 [classes, examples, H, W, C], got {x.dtype}")
  check_episode_args(x.shape, ways, shots, queries, num_tasks)
  classes, examples = sample_episode_indices(
    rng, x.shape[0], x.shape[1], ways, shots, queries, num_tasks
  )
  cls = classes[:, :, None]

  def gather(ex, per_class):  # uint8 gather, then one pass to float32 in [0, 1]
    picked = x[cls, ex].reshape(num_tasks, ways * per_class, *x.shape[2:])
    return np.multiply(picked, np.float32(1.0 / 255.0), dtype=np.float32)

  sx, qx = gather(examples[:, :, :shots], shots), gather(examples[:, :, shots:], queries)
  return TaskBatch(sx, _labels(ways, shots, num_tasks), qx, _labels(ways, queries, num_tasks))


_DONE = object()


def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
  while not stop.is_set():
    try:
      q.put(item, timeout=0.1)
      return True
    except queue.Full:
      continue
  return False


def _produce(q, stop, images, args, rng, device_put, num_batches) -> None:
  try:
    i = 0
    while not stop.is_set() and (num_batches is None or i < num_batches):
      batch = sample_episodes(rng, images, *args)
      if device_put is not False and device_put is not None:
        import jax

        batch = jax.device_put(batch, None if device_put is True else device_put)
      if not _put(q, stop, batch):
        return
      i += 1
    _put(q, stop, _DONE)
  except BaseException as e:  # handed to the consumer, raised there
    _put(q, stop, e)


class EpisodeIterator:
  """Endless (or ``num_batches``-long) stream of :func:`sample_episodes` batches,
  produced ``prefetch`` ahead by a background thread.

  Batch ``i`` equals the ``i``-th call of ``sample_episodes(g, ...)`` with
  ``g = numpy.random.default_rng(seed)``. With ``device_put=True`` (or a
  ``jax.Device``/sharding) batches are put on the device in the thread, so the
  host-to-device copy overlaps the training step. Use it as a context manager,
  or call :meth:`close`, to stop the thread early.

  >>> import numpy as np
  >>> images = np.zeros((6, 4, 2, 2, 1), np.uint8)
  >>> with EpisodeIterator(images, ways=2, shots=1, queries=1, num_tasks=3, seed=0,
  ...                      num_batches=5) as it:
  ...   shapes = [b.query_x.shape for b in it]
  >>> len(shapes), shapes[0]
  (5, (3, 2, 2, 2, 1))
  """

  def __init__(
    self,
    images,
    ways: int,
    shots: int,
    queries: int,
    num_tasks: int,
    *,
    seed=0,
    prefetch: int = 2,
    device_put=False,
    num_batches: int | None = None,
  ):
    self._images = np.asarray(_as_images(images))
    if self._images.dtype != np.uint8:
      raise TypeError(
        f"images must be uint8 [classes, examples, H, W, C], got {self._images.dtype}"
      )
    check_episode_args(self._images.shape, ways, shots, queries, num_tasks)
    if prefetch < 1:
      raise ValueError(f"prefetch must be >= 1, got {prefetch}")
    self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
    self._stop = threading.Event()
    self._exhausted = False
    # The thread holds no reference to `self`, so an abandoned iterator is collected
    # (and its thread told to stop by __del__).
    self._thread = threading.Thread(
      target=_produce,
      name="amaml-episodes",
      daemon=True,
      args=(
        self._queue,
        self._stop,
        self._images,
        (ways, shots, queries, num_tasks),
        np.random.default_rng(seed),
        device_put,
        num_batches,
      ),
    )
    self._thread.start()

  def __iter__(self) -> Iterator[TaskBatch]:
    return self

  def __next__(self) -> TaskBatch:
    if self._exhausted:
      raise StopIteration
    item = self._queue.get()
    if item is _DONE:
      self._exhausted = True
      raise StopIteration
    if isinstance(item, BaseException):
      self._exhausted = True
      raise item
    return item

  def close(self) -> None:
    """Stops the producer thread (idempotent)."""
    self._stop.set()
    self._exhausted = True
    self._thread.join(timeout=5)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    stop = getattr(self, "_stop", None)
    if stop is not None:
      stop.set()


def _floyd_jax(key, n: int, k: int, batch: int):
  """:func:`_floyd` with ``jax.random`` (a ``fori_loop`` over the ``k`` draws)."""
  import jax
  import jax.numpy as jnp

  k_draw, k_order = jax.random.split(key)
  t = jax.random.randint(
    k_draw, (batch, k), 0, jnp.arange(n - k + 1, n + 1, dtype=jnp.int32), dtype=jnp.int32
  )

  def step(i, chosen):
    ti = jax.lax.dynamic_index_in_dim(t, i, axis=1, keepdims=False)
    dup = jnp.any((chosen == ti[:, None]) & (jnp.arange(k) < i), axis=1)
    return chosen.at[:, i].set(jnp.where(dup, n - k + i, ti))

  chosen = jax.lax.fori_loop(0, k, step, jnp.zeros((batch, k), jnp.int32))
  order = jnp.argsort(jax.random.uniform(k_order, (batch, k)), axis=1)
  return jnp.take_along_axis(chosen, order, axis=1)


def sample_tasks(key, images, ways: int, shots: int, queries: int, num_tasks: int) -> TaskBatch:
  """On-device :class:`TaskBatch` of N-way K-shot tasks; pure and jittable.

  ``images``: uint8 ``[classes, examples, H, W, C]`` (a ``jax.Array``, ideally
  already on the device). ``ways``, ``shots``, ``queries`` and ``num_tasks`` must
  be static under ``jax.jit`` (``static_argnums=(2, 3, 4, 5)``). Classes and
  draws as the host sampler (Floyd's algorithm for classes, ``lax.top_k`` of
  uniform keys for examples), with ``jax.random``.

  >>> import jax, jax.numpy as jnp
  >>> images = jnp.zeros((10, 5, 4, 4, 1), jnp.uint8)
  >>> sample = jax.jit(sample_tasks, static_argnums=(2, 3, 4, 5))
  >>> b = sample(jax.random.key(0), images, 5, 1, 3, 16)
  >>> b.support_x.shape, b.query_y.shape, b.query_y.dtype
  ((16, 5, 4, 4, 1), (16, 15), dtype('int32'))
  """
  import jax
  import jax.numpy as jnp

  images = _as_images(images)
  check_episode_args(images.shape, ways, shots, queries, num_tasks)
  if images.dtype != jnp.uint8:
    raise TypeError(f"images must be uint8 [classes, examples, H, W, C], got {images.dtype}")
  num_classes, num_examples = images.shape[0], images.shape[1]
  k_cls, k_ex = jax.random.split(key)
  classes = _floyd_jax(k_cls, num_classes, ways, num_tasks)
  _, examples = jax.lax.top_k(
    jax.random.uniform(k_ex, (num_tasks, ways, num_examples)), shots + queries
  )
  picked = jnp.asarray(images)[classes[:, :, None], examples]  # [tasks, ways, s+q, H, W, C]
  picked = picked.astype(jnp.float32) * jnp.float32(1.0 / 255.0)
  shape = images.shape[2:]
  sx = picked[:, :, :shots].reshape(num_tasks, ways * shots, *shape)
  qx = picked[:, :, shots:].reshape(num_tasks, ways * queries, *shape)
  lab = lambda n: jnp.broadcast_to(
    jnp.repeat(jnp.arange(ways, dtype=jnp.int32), n), (num_tasks, ways * n)
  )
  return TaskBatch(sx, lab(shots), qx, lab(queries))
