"""Omniglot for few-shot classification: pre-processed once, cached, split by protocol.

:func:`load_omniglot` returns an :class:`OmniglotSplits` of :class:`ClassImages`
(``train``, ``val``, ``test``), uint8 ``[classes, 20, size, size, 1]`` with ink high
(255) and paper 0.

**Source.** The arrays folder (see :mod:`amaml.data.omniglot_arrays`: argument
``data_dir`` (``--data_dir``), else ``$AMAML_OMNIGLOT_DIR``, else ``shared/data/omniglot``
found next to the repository or above the current directory), else a prepared TFDS
dataset (:mod:`amaml.data.tfds_omniglot`; never downloaded from here).

**Pre-processing** (once): ink = 1.0, paper = 0.0, resized 105 -> ``image_size``
with Pillow's BOX filter (area average, the filter the peer baselines use),
stored as ``round(255 * ink)``. The result, all 1,623 characters background
first, is cached as ``omniglot_<size>px_<arrays|tfds>_<source checksum>.npz`` (the
checksum: SHA-256 of the two ``.npz`` files, or of the prepared TFDS files) in ``cache_dir``,
else in amaml's cache root (:func:`default_cache_dir`), written atomically (temporary
file + ``os.replace``), so concurrent runs are safe.

**Protocols** (:func:`omniglot_split_indices`):

* ``'maml'`` (Santoro et al. 2016; Finn et al. 2017): the characters in global id
  order (background 1..964, then evaluation 965..1623) are permuted by
  ``numpy.random.default_rng(split_seed).permutation`` (``split_seed=1`` by
  default, after Finn's ``random.seed(1)``; the exact permutation of Finn's code
  depends on a directory listing and is not reproducible); the first 1,100 are
  meta-train, the next 100 meta-validation (Finn's 1,200 = 1,100 + 100) and the
  remaining 423 meta-test. Every character then gives 4 classes, its images
  rotated by 0, 90, 180 and 270 degrees (counter-clockwise), in all three splits:
  4,400 / 400 / 1,692 classes. Rotations of a character stay in its split.
* ``'lake'`` (Lake et al. 2015): meta-train = the 964 background characters,
  meta-test = the 659 evaluation characters, no rotations. No validation by
  default (``val`` is ``None``); ``num_val=k`` holds out ``k`` background
  characters drawn by ``default_rng(split_seed).permutation`` as validation.

>>> import tempfile, numpy as np
>>> from amaml.data.omniglot_arrays import write_omniglot_arrays
>>> rng = np.random.default_rng(0)
>>> d = write_omniglot_arrays(tempfile.mkdtemp(), rng.random((6, 20, 105, 105)) > 0.1,
...                           rng.random((4, 20, 105, 105)) > 0.1)
>>> s = load_omniglot("maml", data_dir=d, cache_dir=tempfile.mkdtemp(), num_train=6, num_val=2)
>>> s.train.images.shape, s.val.num_classes, s.test.num_classes   # x 4 rotations
((24, 20, 28, 28, 1), 8, 8)
>>> load_omniglot("lake", data_dir=d, cache_dir=tempfile.mkdtemp()).val is None
True
"""

from __future__ import annotations

import functools
import importlib.util
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from amaml._renamed import renamed_keywords
from amaml.data.omniglot_arrays import OmniglotArrays, find_omniglot_dir, read_omniglot_arrays
from amaml.data.omniglot_arrays import CACHE_ENV_VAR, arrays_checksum, default_cache_dir
from amaml.data.sources import ClassImages

MAML_SPLIT_SEED = 1
MAML_NUM_TRAIN = 1100
MAML_NUM_VAL = 100
PROTOCOLS = ("maml", "lake")
_CACHE_FORMAT = 1


class OmniglotSplits(NamedTuple):
  """Meta-train, meta-validation (``None`` if the protocol has none) and meta-test classes."""

  train: ClassImages
  val: ClassImages | None
  test: ClassImages


class OmniglotCharacters(NamedTuple):
  """All characters, unrotated: background rows first, then evaluation rows."""

  characters: ClassImages
  num_background: int


@functools.lru_cache(maxsize=8)
def _box_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``[n_out, n_in]`` weights of Pillow's 1-D BOX resampling (read off Pillow itself).

  Pillow resizes separably (rows, then columns) with the same 1-D filter, so a
  2-D resize of ``x`` is ``A @ x @ A.T``.
  """
  from PIL import Image

  a = np.empty((n_out, n_in), np.float64)
  for i in range(n_in):
    e = np.zeros((1, n_in), np.float32)
    e[0, i] = 1.0
    a[:, i] = np.asarray(Image.fromarray(e, mode="F").resize((n_out, 1), Image.BOX))[0]
  return a.astype(np.float32)


def ink_to_uint8(paper: np.ndarray, size: int, chunk: int = 2048) -> np.ndarray:
  """Bool ``[..., H, W]`` (True = paper) -> uint8 ``[..., size, size]``, ink high.

  Pillow's BOX filter on ``ink = 1.0 - paper`` (area average), then
  ``round(255 * ink)``; agrees with a per-image ``PIL.Image.resize(..., BOX)`` of
  the float image to within one grey level.

  >>> import numpy as np
  >>> paper = np.ones((1, 8, 8), bool); paper[0, :4, :4] = False   # ink top-left
  >>> ink_to_uint8(paper, 2)[0]
  array([[255,   0],
         [  0,   0]], dtype=uint8)
  """
  paper = np.asarray(paper)
  lead, (h, w) = paper.shape[:-2], paper.shape[-2:]
  flat = paper.reshape(-1, h, w)
  out = np.empty((flat.shape[0], size, size), np.uint8)
  ah, aw = _box_matrix(h, size), _box_matrix(w, size)
  for s in range(0, flat.shape[0], chunk):
    ink = 1.0 - flat[s : s + chunk].astype(np.float32)
    n = ink.shape[0]
    y = (ink.reshape(n * h, w) @ aw.T).reshape(n, h, size)  # resize rows
    y = (y.transpose(0, 2, 1).reshape(n * size, h) @ ah.T).reshape(n, size, size)
    y = y.transpose(0, 2, 1)  # resize columns
    out[s : s + chunk] = np.clip(np.rint(y * 255.0), 0, 255).astype(np.uint8)
  return out.reshape(*lead, size, size)


def atomic_savez(path: Path, **arrays) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it the usual permissions
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def _from_full_size(arr: OmniglotArrays, size: int) -> OmniglotCharacters:
  paper = np.concatenate([arr.background, arr.evaluation])
  if paper.shape[-2:] == (size, size):
    images = np.where(paper, np.uint8(0), np.uint8(255))
  else:
    images = ink_to_uint8(paper, size)
  return OmniglotCharacters(
    ClassImages(images[..., None], tuple(arr.character_names())), arr.num_background
  )


def _source(data_dir, source: str, tfds_data_dir) -> tuple[str, str, Callable]:
  """Where the characters come from: ``(tag, checksum, read)``, ``read()`` returning the
  :class:`OmniglotArrays` of the arrays folder (``tag`` ``"arrays"``) or of TFDS (``"tfds"``)."""
  arrays_dir = find_omniglot_dir(data_dir) if source != "tfds" else None
  if arrays_dir is None and (
    source == "arrays"
    or importlib.util.find_spec("tensorflow_datasets") is None
    and source == "auto"
  ):
    raise FileNotFoundError(
      "no Omniglot arrays folder found: run `amaml download omniglot` once (it needs the "
      "internet), or pass --data_dir (data_dir= in Python) or set $AMAML_OMNIGLOT_DIR "
      "to a folder holding images_background.npz and images_evaluation.npz"
    )
  if arrays_dir is not None:
    return "arrays", arrays_checksum(arrays_dir), lambda: read_omniglot_arrays(arrays_dir)
  from amaml.data import tfds_omniglot  # imports tensorflow_datasets: only when needed

  checksum = tfds_omniglot.prepared_checksum(tfds_data_dir)
  return "tfds", checksum, lambda: tfds_omniglot.read_tfds_omniglot(tfds_data_dir)


def _read_cache(path: Path) -> OmniglotCharacters | None:
  """The characters cached in ``path``, or ``None`` when it is missing, of another format
  or unreadable (a damaged cache is rebuilt, never trusted)."""
  if not path.is_file():
    return None
  try:
    with np.load(path) as z:
      if int(z["format"]) == _CACHE_FORMAT:
        return OmniglotCharacters(
          ClassImages(z["images"], tuple(str(n) for n in z["class_names"])),
          int(z["num_background"]),
        )
  except Exception as e:
    warnings.warn(f"ignoring unreadable Omniglot cache {path} ({e}); rebuilding it")
  return None


def _write_cache(path: Path, chars: OmniglotCharacters) -> None:
  """Caches ``chars`` in ``path``, atomically; warns (and carries on) when it cannot."""
  try:
    atomic_savez(
      path,
      images=chars.characters.images,
      num_background=chars.num_background,
      class_names=np.asarray(chars.characters.class_names),
      format=_CACHE_FORMAT,
    )
  except OSError as e:
    warnings.warn(
      f"could not write the Omniglot cache {path} ({e}); set ${CACHE_ENV_VAR} to a "
      "writable folder to skip pre-processing next time"
    )


@renamed_keywords(omniglot_dir="data_dir")
def load_omniglot_characters(
  image_size: int = 28,
  *,
  data_dir=None,
  cache_dir=None,
  source: str = "auto",
  tfds_data_dir=None,
) -> OmniglotCharacters:
  """All Omniglot characters, pre-processed and cached (see the module docstring).

  Args:
    image_size: the side of the resized images, in pixels.
    data_dir: the arrays folder (``--data_dir``; default: ``$AMAML_OMNIGLOT_DIR``, then
      the folders of :func:`amaml.data.omniglot_arrays.find_omniglot_dir`).
    cache_dir: where the pre-processed arrays are cached (default
      :func:`default_cache_dir`); ``False`` disables the cache.
    source: ``'auto'`` (the arrays folder if one is found, else TFDS), ``'arrays'`` or
      ``'tfds'``.
    tfds_data_dir: TFDS's folder, for ``source`` TFDS.
  """
  if not isinstance(image_size, (int, np.integer)) or image_size < 1:
    raise ValueError(f"image_size must be a positive int, got {image_size!r}")
  if source not in ("auto", "arrays", "tfds"):
    raise ValueError(f"source must be 'auto', 'arrays' or 'tfds', got {source!r}")
  tag, checksum, read = _source(data_dir, source, tfds_data_dir)
  if cache_dir is False:
    return _from_full_size(read(), image_size)
  cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
  path = cache / f"omniglot_{image_size}px_{tag}_{checksum[:16]}.npz"
  out = _read_cache(path)
  if out is None:
    out = _from_full_size(read(), image_size)
    _write_cache(path, out)
  return out


def omniglot_split_indices(
  num_characters: int,
  num_background: int,
  protocol: str = "maml",
  *,
  split_seed: int = MAML_SPLIT_SEED,
  num_train: int | None = None,
  num_val: int | None = None,
) -> dict[str, np.ndarray | None]:
  """Character rows (background first) of each split: ``{'train', 'val', 'test'}``.

  See the module docstring for the protocols. ``'maml'``: ``num_train`` (1,100)
  and ``num_val`` (100) of a seeded permutation of all characters, the rest test.
  ``'lake'``: background minus ``num_val`` (0) seeded held-out characters; test =
  evaluation. ``val`` is ``None`` when empty.

  >>> s = omniglot_split_indices(1623, 964, "maml")
  >>> [len(s[k]) for k in ("train", "val", "test")]
  [1100, 100, 423]
  >>> s = omniglot_split_indices(1623, 964, "lake")
  >>> len(s["train"]), s["val"], len(s["test"])
  (964, None, 659)
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown Omniglot protocol {protocol!r}; use one of {PROTOCOLS}")
  if not 0 < num_background < num_characters:
    raise ValueError(
      f"need 0 < num_background < num_characters, got {num_background}, {num_characters}"
    )
  rng = np.random.default_rng(split_seed)
  if protocol == "maml":
    num_train = MAML_NUM_TRAIN if num_train is None else num_train
    num_val = MAML_NUM_VAL if num_val is None else num_val
    if num_train < 1 or num_val < 0 or num_train + num_val >= num_characters:
      raise ValueError(
        f"'maml' split needs num_train >= 1, num_val >= 0 and num_train + num_val < "
        f"{num_characters} characters (to leave a test split), got {num_train} + {num_val}"
      )
    perm = rng.permutation(num_characters)
    train, val, test = (
      perm[:num_train],
      perm[num_train : num_train + num_val],
      perm[num_train + num_val :],
    )
  else:
    if num_train is not None:
      raise ValueError(
        "'lake' meta-trains on all background characters: num_train is not "
        "used; pass num_val to hold some out for validation"
      )
    num_val = 0 if num_val is None else num_val
    if not 0 <= num_val < num_background:
      raise ValueError(f"num_val must be in [0, {num_background}) for 'lake', got {num_val}")
    held = np.sort(rng.permutation(num_background)[:num_val])
    train = np.setdiff1d(np.arange(num_background), held)
    val, test = held, np.arange(num_background, num_characters)
  return {"train": train, "val": val if len(val) else None, "test": test}


def rotate_classes(
  source: ClassImages, rotations: Sequence[int] = (0, 90, 180, 270)
) -> ClassImages:
  """Each class once per rotation (degrees, multiples of 90, counter-clockwise), as
  distinct classes: class ``c * len(rotations) + r`` is class ``c`` rotated by
  ``rotations[r]``; names get a ``/rot<deg>`` suffix.

  >>> import numpy as np
  >>> images = np.arange(2 * 2 * 4, dtype=np.uint8).reshape(1, 2, 2, 2, 2)[..., :1]
  >>> src = ClassImages.from_arrays(images)
  >>> r = rotate_classes(src)
  >>> r.num_classes, bool((r.images[1] == np.rot90(src.images[0], 1, axes=(1, 2))).all())
  (4, True)
  """
  degrees = [int(d) for d in rotations]
  if not degrees or any(d % 90 for d in degrees):
    raise ValueError(
      f"rotations must be a non-empty list of multiples of 90 degrees, got {rotations}"
    )
  x = source.images
  if len({d % 360 for d in degrees}) > 1 and x.shape[2] != x.shape[3]:
    raise ValueError(f"rotating by 90 degrees needs square images, got {x.shape[2:4]}")
  out = np.stack([np.rot90(x, (d // 90) % 4, axes=(2, 3)) for d in degrees], axis=1)
  out = out.reshape(-1, *x.shape[1:])
  names = None
  if source.class_names is not None:
    names = tuple(f"{n}/rot{d}" for n in source.class_names for d in degrees)
  return ClassImages(np.ascontiguousarray(out), names)


@renamed_keywords(omniglot_dir="data_dir")
def load_omniglot(
  protocol: str = "maml",
  *,
  image_size: int = 28,
  data_dir=None,
  cache_dir=None,
  split_seed: int = MAML_SPLIT_SEED,
  num_train: int | None = None,
  num_val: int | None = None,
  rotations: Sequence[int] | None = None,
  source: str = "auto",
  tfds_data_dir=None,
) -> OmniglotSplits:
  """Omniglot split by ``protocol`` (``'maml'`` or ``'lake'``) into :class:`ClassImages`.

  ``rotations`` defaults to ``(0, 90, 180, 270)`` for ``'maml'`` and ``(0,)`` for
  ``'lake'``. Other arguments: see :func:`load_omniglot_characters`,
  :func:`omniglot_split_indices` and the module docstring.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown Omniglot protocol {protocol!r}; use one of {PROTOCOLS}")
  chars = load_omniglot_characters(
    image_size,
    data_dir=data_dir,
    cache_dir=cache_dir,
    source=source,
    tfds_data_dir=tfds_data_dir,
  )
  idx = omniglot_split_indices(
    chars.characters.num_classes,
    chars.num_background,
    protocol,
    split_seed=split_seed,
    num_train=num_train,
    num_val=num_val,
  )
  if rotations is None:
    rotations = (0, 90, 180, 270) if protocol == "maml" else (0,)
  split = lambda i: None if i is None else rotate_classes(chars.characters.subset(i), rotations)
  return OmniglotSplits(split(idx["train"]), split(idx["val"]), split(idx["test"]))
