"""Omniglot through TensorFlow Datasets, without TensorFlow.

The stock ``omniglot`` builder cannot prepare the data without TensorFlow (it
walks the zips with ``tf.io.gfile``), and ``tfds.load`` cannot read it. This
module registers a builder of its own, ``amaml_omniglot`` (version 3.0.0), with
the stock builder's features (``image`` uint8 (105, 105, 3) PNG, ``alphabet``
(50 classes), ``alphabet_char_id``, ``label`` (1,623 classes)), the same
example keys (``<alphabet>_<char index>_<XXXX_YY.png>``, hence the same order)
and the same splits, prepared as ``array_record`` and read back with
``tfds.data_source(..., download=False)``. It prepares from, in this order:

1. an Omniglot arrays folder (``arrays_dir``; offline, no network at all;
   splits ``train`` and ``test`` only: which background alphabets form
   ``small1``/``small2`` is not in the arrays), whose images it encodes as 1-bit
   PNGs like the original files;
2. the four official zips in ``zips_dir`` (or TFDS's ``manual_dir``), checked
   against the SHA-256 sums TFDS registers for the stock builder;
3. only with ``download=True``: the same zips fetched by TFDS's download manager
   (checksums checked).

Nothing here downloads unless ``download=True`` is passed explicitly (offline,
TFDS retries for minutes before failing: tests must never ask it to).

The features do not record the drawer, so the 20 images of a character read
back come in the stored (key-hash) order, not in drawer order.

>>> import tempfile, numpy as np
>>> from amaml.data.omniglot_arrays import Alphabet, write_omniglot_arrays
>>> alphabets = [Alphabet("background", "Latin", 1, 2), Alphabet("evaluation", "Keble", 3, 3)]
>>> arrays = write_omniglot_arrays(tempfile.mkdtemp(), np.ones((2, 3, 105, 105), bool),
...                                np.zeros((1, 3, 105, 105), bool), alphabets)
>>> tfds_dir = prepare_tfds_omniglot(tempfile.mkdtemp(), arrays_dir=arrays)
>>> back = read_tfds_omniglot(tfds_dir)
>>> back.background.shape, bool(back.background.all()), bool(back.evaluation.any())
((2, 3, 105, 105), True, False)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from amaml._renamed import renamed_keywords
from amaml.data.omniglot_arrays import Alphabet, OmniglotArrays, read_omniglot_arrays
from amaml.data.omniglot_zips import DOWNLOAD_URL, ZIP_SUMS, ZIPS, check_zip, walk_zip

NAME = "amaml_omniglot"
VERSION = "3.0.0"
NUM_ALPHABETS = 50
NUM_CHARACTERS = 1623


def _png_1bit(paper: np.ndarray) -> bytes:
  """A bool image (True = paper) as a 1-bit PNG, like the original Omniglot files."""
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(np.asarray(paper, bool)).save(buf, format="PNG")
  return buf.getvalue()


def examples_from_arrays(arrays: OmniglotArrays, split: str) -> Iterator[tuple[str, dict]]:
  """``(key, example)`` pairs of the TFDS split ``'train'`` (background) or ``'test'``."""
  part = {"train": "background", "test": "evaluation"}[split]
  names = sorted({a.name for a in arrays.alphabets or ()})
  images = getattr(arrays, part)
  for row in range(images.shape[0]):
    alphabet, k, gid = arrays.character_info(part, row)
    if alphabet is None:
      raise ValueError(f"character {gid} is in no alphabet of alphabets.tsv")
    for d in range(images.shape[1]):
      fname = f"{gid:04d}_{d + 1:02d}.png"
      yield (
        f"{alphabet}_{k}_{fname}",
        {
          "image": _png_1bit(images[row, d]),
          "alphabet": names.index(alphabet),
          "alphabet_char_id": k,
          "label": gid - 1,
        },
      )


def examples_from_zip(path, alphabet_names: list[str]) -> Iterator[tuple[str, dict]]:
  """``(key, example)`` pairs of one official zip (``<top>/<alphabet>/characterNN/XXXX_YY.png``)."""
  for alphabet, k, fname, png in walk_zip(path):
    yield (
      f"{alphabet}_{k}_{fname}",
      {
        "image": png,
        "alphabet": alphabet_names.index(alphabet),
        "alphabet_char_id": k,
        "label": int(fname.split("_")[0]) - 1,
      },
    )


def _zip_names(paths) -> tuple[list[str], list[str]]:
  """Sorted alphabet names and label names (``<alphabet>_<k>`` by global id) of the zips."""
  alphabets, labels = set(), {}
  for p in paths:
    for alphabet, k, fname, _ in walk_zip(p):
      alphabets.add(alphabet)
      labels[int(fname.split("_")[0]) - 1] = f"{alphabet}_{k}"
  return sorted(alphabets), [labels[i] for i in sorted(labels)]


class AmamlOmniglot(tfds.core.GeneratorBasedBuilder):
  """Omniglot with the stock TFDS features, preparable without TensorFlow."""

  VERSION = tfds.core.Version("3.0.0")
  RELEASE_NOTES = {"3.0.0": "Stock `omniglot` 3.0.0 features and keys, prepared without TF."}

  def __init__(self, *, arrays_dir=None, zips_dir=None, **kwargs):
    self._arrays_dir = None if arrays_dir is None else Path(arrays_dir)
    self._zips_dir = None if zips_dir is None else Path(zips_dir)
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls):
    return {
      DOWNLOAD_URL + f: tfds.download.checksums.UrlInfo(size=s, checksum=c, filename=f)
      for f, (s, c) in ZIP_SUMS.items()
    }

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      description="Omniglot (Lake et al. 2015): 1,623 handwritten characters of 50 "
      "alphabets, 20 drawers each, 105x105. Same features as TFDS `omniglot`.",
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(105, 105, 3), encoding_format="png"),
          "alphabet": tfds.features.ClassLabel(num_classes=NUM_ALPHABETS),
          "alphabet_char_id": np.int64,
          "label": tfds.features.ClassLabel(num_classes=NUM_CHARACTERS),
        }
      ),
      supervised_keys=("image", "label"),
      homepage="https://github.com/brendenlake/omniglot/",
    )

  def _set_names(self, alphabets: list[str], labels: list[str]) -> None:
    # The real data has all 50 / 1,623 names; a small fixture keeps numeric names.
    if len(alphabets) == NUM_ALPHABETS:
      self.info.features["alphabet"].names = alphabets
    if len(labels) == NUM_CHARACTERS:
      self.info.features["label"].names = labels

  def _split_generators(self, dl_manager):
    if self._arrays_dir is not None:
      arrays = read_omniglot_arrays(self._arrays_dir)
      if not arrays.alphabets:
        raise FileNotFoundError(
          f"preparing Omniglot for TFDS needs {self._arrays_dir / 'alphabets.tsv'} (which "
          "alphabet each character belongs to); copy it along with the .npz files"
        )
      names = sorted({a.name for a in arrays.alphabets or ()})
      by_id = {}
      for part in ("background", "evaluation"):
        for row in range(getattr(arrays, part).shape[0]):
          alphabet, k, gid = arrays.character_info(part, row)
          by_id[gid] = f"{alphabet}_{k}"
      self._set_names(names, [by_id[i] for i in sorted(by_id)])
      return {s: examples_from_arrays(arrays, s) for s in ("train", "test")}
    paths = self._local_zips(dl_manager)
    if paths is None:
      paths = {
        s: Path(p)
        for s, p in dl_manager.download({s: DOWNLOAD_URL + f for s, f in ZIPS.items()}).items()
      }
    alphabets, labels = _zip_names([paths["train"], paths["test"]])
    self._set_names(alphabets, labels)
    return {s: examples_from_zip(paths[s], alphabets) for s in ZIPS}

  def _local_zips(self, dl_manager) -> dict[str, Path] | None:
    dirs = [self._zips_dir]
    manual = getattr(dl_manager, "_manual_dir", None)  # DownloadConfig(manual_dir=...)
    dirs.append(None if manual is None else Path(manual))
    for d in dirs:
      if d is not None and all((d / f).is_file() for f in ZIPS.values()):
        for f in ZIPS.values():
          check_zip(d / f)
        return {s: d / f for s, f in ZIPS.items()}
    return None

  def _generate_examples(self, **kwargs):  # splits come from the generators above
    raise NotImplementedError


def default_data_dir() -> Path:
  """TFDS's data folder (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``): the default of
  ``tfds_data_dir`` (``data_dir`` is the Omniglot arrays folder, as in ``Config``)."""
  return Path(os.path.expanduser(tfds.core.constants.DATA_DIR))


def _dataset_dir(tfds_data_dir, name: str = NAME) -> Path:
  return Path(tfds_data_dir or default_data_dir()) / name / VERSION


@renamed_keywords(data_dir="tfds_data_dir")
def is_prepared(tfds_data_dir=None, name: str = NAME) -> bool:
  d = _dataset_dir(tfds_data_dir, name)
  return (d / "dataset_info.json").is_file() and any(d.glob("*.array_record*"))


@renamed_keywords(data_dir="tfds_data_dir")
def prepare_tfds_omniglot(
  tfds_data_dir=None,
  *,
  arrays_dir=None,
  zips_dir=None,
  download: bool = False,
  verbose: bool = False,
) -> Path:
  """Prepares ``amaml_omniglot`` as ``array_record`` in TFDS's folder ``tfds_data_dir``
  (default :func:`default_data_dir`); returns that folder.

  From ``arrays_dir`` if given (offline), else from the official zips in
  ``zips_dir``, else, only if ``download=True``, from the zips downloaded by TFDS.
  Does nothing if the dataset is already prepared there. ``verbose`` keeps
  TFDS's messages on stdout (its progress bars go to stderr either way).
  """
  tfds_data_dir = Path(tfds_data_dir or default_data_dir()).expanduser()
  if is_prepared(tfds_data_dir):
    return tfds_data_dir
  if arrays_dir is None and zips_dir is None and not download:
    raise FileNotFoundError(
      f"{NAME} is not prepared in {tfds_data_dir}: pass arrays_dir= (an Omniglot arrays folder, "
      "offline), zips_dir= (a folder holding the four official Omniglot zips), or "
      "download=True (needs internet)"
    )
  builder = AmamlOmniglot(
    data_dir=os.fspath(tfds_data_dir), arrays_dir=arrays_dir, zips_dir=zips_dir
  )
  with contextlib.ExitStack() as stack:
    if not verbose:
      stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
  return tfds_data_dir


@renamed_keywords(data_dir="tfds_data_dir")
def prepared_checksum(tfds_data_dir=None, name: str = NAME) -> str:
  """SHA-256 identifying a prepared dataset (its info and file names and sizes), for caches.

  Raises ``FileNotFoundError``, saying how to prepare it, if it is not prepared.
  """
  d = _dataset_dir(tfds_data_dir, name)
  if not is_prepared(tfds_data_dir, name):
    raise FileNotFoundError(
      f"Omniglot not found: no arrays folder (run `amaml download omniglot` once, or pass "
      f"--data_dir (data_dir= in Python) or set $AMAML_OMNIGLOT_DIR to a folder holding "
      f"images_background.npz and images_evaluation.npz) and no prepared TFDS dataset in {d} "
      "(prepare it once with "
      "amaml.data.prepare_tfds_omniglot(download=True), or arrays_dir=... offline)"
    )
  h = hashlib.sha256((d / "dataset_info.json").read_bytes())
  for f in sorted(d.iterdir()):
    h.update(f"{f.name}:{f.stat().st_size};".encode())
  return h.hexdigest()


@renamed_keywords(data_dir="tfds_data_dir")
def read_tfds_omniglot(tfds_data_dir=None, name: str = NAME) -> OmniglotArrays:
  """Reads the prepared ``train``/``test`` splits back as an :class:`OmniglotArrays`.

  Never downloads. ``name='omniglot'`` reads the stock builder's data if it was
  prepared as ``array_record``. Characters are ordered by label (global id);
  each character's images in stored order (the drawer is not a feature).
  """
  checksum = prepared_checksum(tfds_data_dir, name)
  tfds_data_dir = Path(tfds_data_dir or default_data_dir()).expanduser()
  builder = tfds.builder(name, data_dir=os.fspath(tfds_data_dir), file_format="array_record")
  parts, alphabet_rows = {}, []
  alphabet_names = builder.info.features["alphabet"].names
  for split, part in (("train", "background"), ("test", "evaluation")):
    source = tfds.data_source(
      name,
      split=split,
      data_dir=os.fspath(tfds_data_dir),
      download=False,
      builder_kwargs={"file_format": "array_record"},
    )
    records = source.__getitems__(range(len(source)))
    by_label: dict[int, list[np.ndarray]] = {}
    meta = {}
    for r in records:
      label = int(r["label"])
      img = np.asarray(r["image"])
      by_label.setdefault(label, []).append((img[..., 0] if img.ndim == 3 else img) > 0)
      meta[label] = (int(r["alphabet"]), int(r["alphabet_char_id"]))
    counts = {len(v) for v in by_label.values()}
    if len(counts) != 1:
      raise ValueError(f"{name}/{split}: characters have different numbers of images {counts}")
    labels = sorted(by_label)
    parts[part] = np.stack([np.stack(by_label[lab]) for lab in labels])
    # Alphabets as contiguous ranges of global ids (as in alphabets.tsv).
    for lab in labels:
      a, k = meta[lab]
      aname = alphabet_names[a]
      if alphabet_rows and alphabet_rows[-1][1] == aname and alphabet_rows[-1][3] == lab:
        alphabet_rows[-1][3] = lab + 1
      else:
        alphabet_rows.append([part, aname, lab + 1 - k, lab + 1])
  alphabets = tuple(Alphabet(*row) for row in alphabet_rows)
  return OmniglotArrays(parts["background"], parts["evaluation"], alphabets, checksum)
