"""Few-shot data: class-grouped image sources, Omniglot, and N-way K-shot episode samplers.

>>> import numpy as np
>>> from amaml import data
>>> src = data.ClassImages.from_arrays(np.zeros((8, 5, 28, 28), np.uint8))
>>> batch = data.sample_episodes(0, src, ways=5, shots=1, queries=2, num_tasks=4)
>>> batch.support_x.shape, batch.query_y.shape
((4, 5, 28, 28, 1), (4, 10))

The TFDS path (:mod:`amaml.data.tfds_omniglot`) imports ``tensorflow_datasets``,
so its functions are imported on first use.
"""

from amaml._renamed import renamed_keywords
from amaml.data.episodes import EpisodeIterator, sample_episodes, sample_tasks
from amaml.data.omniglot import (
  OmniglotSplits,
  default_cache_dir,
  load_omniglot,
  load_omniglot_characters,
  omniglot_split_indices,
  rotate_classes,
)
from amaml.data.omniglot_arrays import (
  find_omniglot_dir,
  read_omniglot_arrays,
  write_omniglot_arrays,
)
from amaml.data.image_folders import load_image_benchmark
from amaml.data.omniglot_zips import download_omniglot
from amaml.data.sources import ClassImages


@renamed_keywords(data_dir="tfds_data_dir")
def prepare_tfds_omniglot(
  tfds_data_dir=None, *, arrays_dir=None, zips_dir=None, download=False, verbose=False
):
  """Prepares Omniglot for TFDS (``amaml_omniglot``, array_record); see
  :func:`amaml.data.tfds_omniglot.prepare_tfds_omniglot`. Never downloads unless
  ``download=True``."""
  from amaml.data import tfds_omniglot

  return tfds_omniglot.prepare_tfds_omniglot(
    tfds_data_dir, arrays_dir=arrays_dir, zips_dir=zips_dir, download=download, verbose=verbose
  )


__all__ = [
  "ClassImages",
  "EpisodeIterator",
  "OmniglotSplits",
  "default_cache_dir",
  "download_omniglot",
  "find_omniglot_dir",
  "load_image_benchmark",
  "load_omniglot",
  "load_omniglot_characters",
  "omniglot_split_indices",
  "prepare_tfds_omniglot",
  "read_omniglot_arrays",
  "rotate_classes",
  "sample_episodes",
  "sample_tasks",
  "write_omniglot_arrays",
]
