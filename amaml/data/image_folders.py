"""The standard few-shot image benchmarks, read from local folders.

Nothing here downloads: each data set is distributed by its authors, and its folder is
read where the user put it. :func:`load_image_benchmark` returns ``{"train", "val",
"test"}`` :class:`~amaml.data.ClassImages` (uint8 ``[classes, examples, size, size, 3]``),
cached after the first read as ``<dataset>_<split>_<size>px_<listing hash>.npz`` in
:func:`amaml.data.default_cache_dir` (written atomically).

Two layouts are read, for every data set:

* **a folder per split and class**: ``DIR/train/<class>/<image>``, ``DIR/val/...``,
  ``DIR/test/...`` (how CIFAR-FS, FC100 and tieredImageNet are usually unpacked as
  images, and how many repositories ship miniImageNet);
* **split files** (Ravi & Larochelle's miniImageNet): ``DIR/train.csv``, ``DIR/val.csv``,
  ``DIR/test.csv``, each a header ``filename,label`` then one row per image, with the
  images in ``DIR/images/<filename>``.

==================  ======  ===============================  ===========================================
``dataset``         size    classes train / val / test       where to get it
==================  ======  ===============================  ===========================================
``miniimagenet``    84      64 / 16 / 20 (600 images each)   Ravi & Larochelle 2017 split files (github.com/twitter/meta-learning-lstm) with ImageNet images (image-net.org)
``tieredimagenet``  84      351 / 97 / 160 (732-1300 each)   Ren et al. 2018 (github.com/renmengye/few-shot-ssl-public)
``cifar-fs``        32      64 / 16 / 20 (600 each)          Bertinetto et al. 2019 (github.com/bertinetto/r2d2)
``fc100``           32      60 / 20 / 20 (600 each)          Oreshkin et al. 2018 (github.com/ElementAI/TADAM)
==================  ======  ===============================  ===========================================

The class counts are the published splits; a folder with other counts is read as it is
(and the counts are reported in the error message only when a split is missing). Classes
with more images than the split's smallest class keep their first images by file name
(tieredImageNet: 732 per class, about 10 GB at 84x84).

>>> import tempfile, pathlib, numpy as np
>>> from PIL import Image
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> for split in ("train", "val", "test"):
...   for c in range(2):
...     (root / split / f"c{c}").mkdir(parents=True)
...     for i in range(3):
...       Image.fromarray(np.full((9, 9, 3), 50 * c, np.uint8)).save(root / split / f"c{c}" / f"{i}.png")
>>> splits = load_image_benchmark("cifar-fs", root, image_size=8, cache_dir=False)
>>> splits["train"].images.shape, splits["test"].class_names
((2, 3, 8, 8, 3), ('c0', 'c1'))
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from amaml.data.sources import IMAGE_EXTENSIONS, ClassImages

SPLITS = ("train", "val", "test")


class ImageBenchmark(NamedTuple):
  """A few-shot image benchmark: its name, image size, published class counts, source."""

  title: str
  image_size: int
  classes: tuple[int, int, int]
  source: str
  env_var: str


DATASETS: dict[str, ImageBenchmark] = {
  "miniimagenet": ImageBenchmark(
    "miniImageNet",
    84,
    (64, 16, 20),
    "the split files of Ravi & Larochelle (github.com/twitter/meta-learning-lstm, "
    "train.csv / val.csv / test.csv) with the ImageNet images they name",
    "AMAML_MINIIMAGENET_DIR",
  ),
  "tieredimagenet": ImageBenchmark(
    "tieredImageNet",
    84,
    (351, 97, 160),
    "Ren et al. 2018 (github.com/renmengye/few-shot-ssl-public), unpacked as images",
    "AMAML_TIEREDIMAGENET_DIR",
  ),
  "cifar-fs": ImageBenchmark(
    "CIFAR-FS",
    32,
    (64, 16, 20),
    "Bertinetto et al. 2019 (github.com/bertinetto/r2d2), unpacked as images",
    "AMAML_CIFAR_FS_DIR",
  ),
  "fc100": ImageBenchmark(
    "FC100",
    32,
    (60, 20, 20),
    "Oreshkin et al. 2018 (github.com/ElementAI/TADAM), unpacked as images",
    "AMAML_FC100_DIR",
  ),
}


def _missing(dataset: str, where: str) -> FileNotFoundError:
  d = DATASETS[dataset]
  return FileNotFoundError(
    f"{d.title} not found {where}: get it from {d.source}; put it in a folder holding "
    f"train/ val/ test/ (one sub-folder of images per class), or train.csv val.csv test.csv "
    f"and images/; then pass --data_dir DIR or set ${d.env_var}"
  )


def find_benchmark_dir(dataset: str, data_dir: str | os.PathLike | None = None) -> Path:
  """``data_dir``, else ``$<DATASET>_DIR``; raises ``FileNotFoundError`` saying where to get
  the data and where to put it when neither names a folder in a known layout."""
  if dataset not in DATASETS:
    raise ValueError(f"dataset={dataset!r}: use one of {tuple(DATASETS)}")
  env = DATASETS[dataset].env_var
  if data_dir is None and not os.environ.get(env):
    raise _missing(dataset, f"(no --data_dir given and ${env} is not set)")
  root = Path(data_dir if data_dir is not None else os.environ[env]).expanduser()
  if not root.is_dir():
    raise _missing(dataset, f"at {root} (no such folder)")
  if not (
    all((root / s).is_dir() for s in SPLITS) or all((root / f"{s}.csv").is_file() for s in SPLITS)
  ):
    raise _missing(
      dataset, f"in {root} (it holds neither train/ val/ test/ nor train.csv val.csv test.csv)"
    )
  return root


def split_files(root: Path, split: str) -> dict[str, list[Path]]:
  """``{class: [image file, ...]}`` of one split, classes and files sorted by name."""
  csv_path = root / f"{split}.csv"
  if csv_path.is_file():
    files: dict[str, list[Path]] = {}
    with open(csv_path, newline="") as f:
      rows = csv.reader(f)
      header = next(rows, None)
      if header is None or [h.strip() for h in header[:2]] != ["filename", "label"]:
        raise ValueError(
          f"{csv_path} must start with the header filename,label "
          f"(Ravi & Larochelle's split files), got {header}"
        )
      for i, row in enumerate(rows, start=2):
        if len(row) < 2:
          raise ValueError(f"{csv_path}, line {i}: expected filename,label, got {row}")
        files.setdefault(row[1], []).append(root / "images" / row[0])
    missing = [p for ps in files.values() for p in ps if not p.is_file()]
    if missing:
      raise FileNotFoundError(
        f"{len(missing)} image(s) named in {csv_path} are missing, e.g. "
        f"{missing[0]}: put every image in {root / 'images'}"
      )
    return {c: sorted(files[c]) for c in sorted(files)}
  split_dir = root / split
  return {
    d.name: sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    for d in sorted(split_dir.iterdir())
    if d.is_dir() and not d.name.startswith(".")
  }


def _listing_hash(files: dict[str, list[Path]]) -> str:
  h = hashlib.sha256()
  for c, paths in files.items():
    for p in paths:
      h.update(f"{c}/{p.name}/{p.stat().st_size}\n".encode())
  return h.hexdigest()[:16]


def load_image_benchmark(
  dataset: str,
  data_dir: str | os.PathLike | None = None,
  *,
  image_size: int | None = None,
  cache_dir: str | os.PathLike | bool | None = None,
) -> dict[str, ClassImages]:
  """The ``train``/``val``/``test`` splits of ``dataset`` (a key of :data:`DATASETS`) read
  from ``data_dir`` (see :func:`find_benchmark_dir`), RGB, resized to ``image_size``
  (default: the benchmark's). ``cache_dir=False`` disables the cache."""
  from amaml.data.omniglot import atomic_savez, default_cache_dir

  root = find_benchmark_dir(dataset, data_dir)
  size = image_size or DATASETS[dataset].image_size
  out = {}
  for split in SPLITS:
    files = split_files(root, split)
    if not files:
      raise _missing(dataset, f"in {root}: its {split} split has no classes")
    per_class = min(len(v) for v in files.values())
    path = None
    if cache_dir is not False:
      cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
      path = cache / f"{dataset}_{split}_{size}px_{_listing_hash(files)}.npz"
      if path.is_file():
        with np.load(path) as z:
          out[split] = ClassImages(z["images"], tuple(str(n) for n in z["class_names"]))
        continue
    out[split] = ClassImages.from_files(files, size, channels=3, examples_per_class=per_class)
    if path is not None:
      atomic_savez(path, images=out[split].images, class_names=np.array(out[split].class_names))
  return out
