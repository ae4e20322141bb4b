"""Episode samplers (host numpy, prefetching iterator, on-device jax): task invariants,
determinism, errors. Images encode (class, example) in their pixels so every drawn image
can be traced back to its source."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amaml import TaskBatch
from amaml.data import ClassImages, EpisodeIterator, sample_episodes, sample_tasks

jit_sample_tasks = jax.jit(sample_tasks, static_argnums=(2, 3, 4, 5))


def _coded_images(classes, examples):
  """uint8 [classes, examples, 2, 2, 1]: pixel (0,0) = class, (0,1) = example."""
  x = np.zeros((classes, examples, 2, 2, 1), np.uint8)
  x[:, :, 0, 0, 0] = np.arange(classes)[:, None]
  x[:, :, 0, 1, 0] = np.arange(examples)[None, :]
  x[:, :, 1, :, 0] = 255  # a value at the top of the range
  return x


def _decode(x):
  """(class ids, example ids) [tasks, n] of a float image batch made from _coded_images."""
  x = np.rint(np.asarray(x) * 255).astype(np.int64)
  return x[:, :, 0, 0, 0], x[:, :, 0, 1, 0]


def check_invariants(batch, ways, shots, queries, num_tasks, classes, examples):
  assert isinstance(batch, TaskBatch)
  sx, sy, qx, qy = (np.asarray(a) for a in batch)
  assert sx.shape == (num_tasks, ways * shots, 2, 2, 1) and sx.dtype == np.float32
  assert qx.shape == (num_tasks, ways * queries, 2, 2, 1) and qx.dtype == np.float32
  assert sy.shape == (num_tasks, ways * shots) and sy.dtype == np.int32
  assert qy.shape == (num_tasks, ways * queries) and qy.dtype == np.int32
  assert 0.0 <= sx.min() and sx.max() <= 1.0 and qx.max() == 1.0
  s_cls, s_ex = _decode(sx)
  q_cls, q_ex = _decode(qx)
  assert s_cls.max() < classes and q_ex.max() < examples
  for t in range(num_tasks):
    # labels 0..ways-1, each exactly shots / queries times
    np.testing.assert_array_equal(np.bincount(sy[t], minlength=ways), [shots] * ways)
    np.testing.assert_array_equal(np.bincount(qy[t], minlength=ways), [queries] * ways)
    # one source class per label, the same in support and query; classes distinct
    label_class = {}
    for cls, lab in list(zip(s_cls[t], sy[t])) + list(zip(q_cls[t], qy[t])):
      assert label_class.setdefault(lab, cls) == cls
    assert len(set(label_class.values())) == ways
    # support and query examples disjoint (and no repeats inside a set)
    s_pairs = set(zip(s_cls[t], s_ex[t]))
    q_pairs = set(zip(q_cls[t], q_ex[t]))
    assert len(s_pairs) == ways * shots and len(q_pairs) == ways * queries
    assert not s_pairs & q_pairs


@pytest.mark.parametrize("ways, shots, queries", [(5, 1, 15), (3, 5, 2), (12, 2, 1), (1, 1, 1)])
def test_host_sampler_invariants(ways, shots, queries):
  images = _coded_images(12, 17)
  batch = sample_episodes(0, images, ways, shots, queries, num_tasks=16)
  check_invariants(batch, ways, shots, queries, 16, 12, 17)


def test_host_sampler_accepts_class_images_and_is_deterministic():
  src = ClassImages(_coded_images(30, 20))
  a = sample_episodes(7, src, 5, 1, 15, 8)
  b = sample_episodes(np.random.default_rng(7), src.images, 5, 1, 15, 8)
  c = sample_episodes(8, src, 5, 1, 15, 8)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.support_x, c.support_x)


def test_host_sampler_shuffles_classes_and_label_order():
  images = _coded_images(10, 4)
  batch = sample_episodes(0, images, 10, 1, 1, 200)
  s_cls, _ = _decode(batch.support_x)
  # all 10 classes every task, but label 0 maps to many different classes over tasks
  assert all(sorted(row) == list(range(10)) for row in s_cls)
  assert len(set(s_cls[:, 0])) == 10
  # every class is drawn about equally often as label 0 in 5-way tasks
  batch = sample_episodes(1, images, 5, 1, 1, 4000)
  counts = np.bincount(_decode(batch.support_x)[0].ravel(), minlength=10)
  assert counts.min() > 0.8 * 2000 and counts.max() < 1.2 * 2000


@settings(max_examples=60, deadline=None)
@given(
  classes=st.integers(1, 12),
  examples=st.integers(2, 9),
  data=st.data(),
  num_tasks=st.integers(1, 5),
  seed=st.integers(0, 2**32 - 1),
)
def test_host_sampler_invariants_property(classes, examples, data, num_tasks, seed):
  ways = data.draw(st.integers(1, classes), label="ways")
  shots = data.draw(st.integers(1, examples - 1), label="shots")
  queries = data.draw(st.integers(1, examples - shots), label="queries")
  batch = sample_episodes(seed, _coded_images(classes, examples), ways, shots, queries, num_tasks)
  check_invariants(batch, ways, shots, queries, num_tasks, classes, examples)
  again = sample_episodes(seed, _coded_images(classes, examples), ways, shots, queries, num_tasks)
  np.testing.assert_array_equal(batch.query_x, again.query_x)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(ways=13, shots=1, queries=1), "ways=13 exceeds the 12 classes"),
    (dict(ways=5, shots=10, queries=8), "shots \\+ queries = 10 \\+ 8 = 18 exceeds the 17"),
    (dict(ways=0, shots=1, queries=1), "ways must be a positive int"),
    (dict(ways=5, shots=-1, queries=1), "shots must be a positive int"),
    (dict(ways=5, shots=1, queries=0), "queries must be a positive int"),
    (dict(ways=5, shots=1.0, queries=1), "shots must be a positive int"),
  ],
)
def test_bad_arguments(kwargs, match):
  images = _coded_images(12, 17)
  with pytest.raises(ValueError, match=match):
    sample_episodes(0, images, num_tasks=2, **kwargs)
  with pytest.raises(ValueError, match=match):
    sample_tasks(jax.random.key(0), jnp.asarray(images), num_tasks=2, **kwargs)
  with pytest.raises(ValueError, match=match):
    EpisodeIterator(images, num_tasks=2, **kwargs)


def test_non_positive_num_tasks_and_wrong_dtype():
  images = _coded_images(6, 4)
  with pytest.raises(ValueError, match="num_tasks must be a positive int"):
    sample_episodes(0, images, 2, 1, 1, 0)
  with pytest.raises(TypeError, match="uint8"):
    sample_episodes(0, images.astype(np.float32), 2, 1, 1, 1)
  with pytest.raises(TypeError, match="uint8"):
    sample_tasks(jax.random.key(0), jnp.asarray(images, jnp.float32), 2, 1, 1, 1)


def test_iterator_matches_sequential_calls_and_stops():
  images = _coded_images(20, 10)
  rng = np.random.default_rng(3)
  expected = [sample_episodes(rng, images, 4, 2, 3, 5) for _ in range(6)]
  with EpisodeIterator(images, 4, 2, 3, 5, seed=3, prefetch=2, num_batches=6) as it:
    got = list(it)
  assert len(got) == 6
  for e, g in zip(expected, got):
    for x, y in zip(e, g):
      np.testing.assert_array_equal(x, y)


def test_iterator_device_put_and_close():
  images = _coded_images(20, 10)
  it = EpisodeIterator(images, 4, 1, 1, 3, seed=0, device_put=True)
  batch = next(it)
  assert isinstance(batch.support_x, jax.Array)
  check_invariants(batch, 4, 1, 1, 3, 20, 10)
  it.close()
  assert not it._thread.is_alive()
  with pytest.raises(StopIteration):
    next(it)


def test_iterator_reraises_producer_errors(monkeypatch):
  import amaml.data.episodes as episodes

  def boom(*a, **k):
    raise RuntimeError("sampler failed")

  monkeypatch.setattr(episodes, "sample_episodes", boom)
  it = EpisodeIterator(_coded_images(5, 4), 2, 1, 1, 1)
  with pytest.raises(RuntimeError, match="sampler failed"):
    next(it)
  it.close()


@pytest.mark.parametrize("ways, shots, queries", [(5, 1, 15), (3, 5, 2), (12, 2, 1)])
def test_device_sampler_invariants(ways, shots, queries):
  images = jnp.asarray(_coded_images(12, 17))
  batch = jit_sample_tasks(jax.random.key(1), images, ways, shots, queries, 16)
  assert isinstance(batch.support_x, jax.Array)
  check_invariants(batch, ways, shots, queries, 16, 12, 17)


def test_device_sampler_deterministic_and_key_dependent():
  images = jnp.asarray(_coded_images(30, 20))
  a = jit_sample_tasks(jax.random.key(5), images, 5, 1, 15, 8)
  b = sample_tasks(jax.random.key(5), images, 5, 1, 15, 8)  # un-jitted: same numbers
  c = jit_sample_tasks(jax.random.key(6), images, 5, 1, 15, 8)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.support_x, c.support_x)


def test_device_sampler_under_scan():
  images = jnp.asarray(_coded_images(12, 6))

  @jax.jit
  def run(key):
    def body(count, k):
      b = sample_tasks(k, images, 3, 2, 2, 4)
      return count + 1, b

    return jax.lax.scan(body, 0, jax.random.split(key, 5))

  count, batches = run(jax.random.key(0))
  assert int(count) == 5 and batches.support_x.shape == (5, 4, 6, 2, 2, 1)
  for i in range(5):
    check_invariants(TaskBatch(*(f[i] for f in batches)), 3, 2, 2, 4, 12, 6)
  assert not np.array_equal(batches.support_x[0], batches.support_x[1])


def test_abandoned_iterator_stops_its_thread():
  import gc

  it = EpisodeIterator(_coded_images(20, 10), 4, 1, 1, 3, seed=0, prefetch=1)
  thread = it._thread
  next(it)
  del it
  gc.collect()
  thread.join(timeout=5)
  assert not thread.is_alive()


@pytest.mark.parametrize("device", [False, True])
def test_ordered_class_draws_are_uniform(device):
  """2-way tasks over 6 classes: all 30 (label 0, label 1) class pairs about equally often."""
  images = _coded_images(6, 2)
  if device:
    batch = jit_sample_tasks(jax.random.key(0), jnp.asarray(images), 2, 1, 1, 6000)
  else:
    batch = sample_episodes(0, images, 2, 1, 1, 6000)
  cls, _ = _decode(batch.support_x)
  assert (cls[:, 0] != cls[:, 1]).all()
  counts = np.bincount(cls[:, 0] * 6 + cls[:, 1], minlength=36).reshape(6, 6)
  assert (np.diag(counts) == 0).all()
  off = counts[~np.eye(6, dtype=bool)]
  assert off.min() > 0.7 * 200 and off.max() < 1.3 * 200  # expected 200 each, sd ~14


def test_device_sampler_with_many_classes():
  images = jnp.asarray(_coded_images(250, 3))
  batch = jit_sample_tasks(jax.random.key(2), images, 20, 1, 2, 64)
  check_invariants(batch, 20, 1, 2, 64, 250, 3)
  host = sample_episodes(2, np.asarray(images), 20, 1, 2, 64)
  check_invariants(host, 20, 1, 2, 64, 250, 3)
