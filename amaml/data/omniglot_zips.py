"""The official Omniglot zips: fetch them, check their SHA-256, turn them into arrays.

No TensorFlow Datasets needed. ``amaml download omniglot`` (or :func:`download_omniglot`)
fetches ``images_background.zip`` and ``images_evaluation.zip`` from the data set's
repository (brendenlake/omniglot), checks each against the size and SHA-256 that TFDS
registers for its stock ``omniglot`` builder, and writes the arrays folder that
:func:`amaml.data.load_omniglot` reads (:mod:`amaml.data.omniglot_arrays`), by default
into :func:`default_download_dir`, where the loader looks last.

A zip holds ``<top>/<alphabet>/characterNN/XXXX_YY.png``: ``XXXX`` is the character's
global id (1-964 background, 965-1623 evaluation) and ``YY`` its drawer (1-20). Row
``c`` of a split's arrays is the split's ``c``-th smallest id and column ``d`` is drawer
``d + 1``; pixels are ``True`` for paper, as in the PNGs.

>>> import io, tempfile, zipfile, numpy as np
>>> from PIL import Image
>>> def png(paper):
...   buf = io.BytesIO(); Image.fromarray(paper).convert("1").save(buf, "PNG")
...   return buf.getvalue()
>>> path = tempfile.mkdtemp() + "/images_background.zip"
>>> with zipfile.ZipFile(path, "w") as z:
...   for gid, d in [(1, 1), (1, 2), (2, 1), (2, 2)]:
...     z.writestr(f"images_background/Latin/character{gid:02d}/{gid:04d}_{d:02d}.png",
...                png(np.full((105, 105), gid == 1)))
>>> images, alphabets = arrays_from_zip(path, "background")
>>> images.shape, bool(images[0].all()), bool(images[1].any()), alphabets
((2, 2, 105, 105), True, False, [Alphabet(split='background', name='Latin', first_id=1, last_id=2)])
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from amaml._renamed import renamed_keywords
from amaml.data.omniglot_arrays import (
  FILES,
  Alphabet,
  default_download_dir,
  sha256,
  write_omniglot_arrays,
)

DOWNLOAD_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
ZIPS = {
  "train": "images_background.zip",
  "test": "images_evaluation.zip",
  "small1": "images_background_small1.zip",
  "small2": "images_background_small2.zip",
}
# Size and SHA-256 of the official zips, as registered in tensorflow_datasets for `omniglot`.
ZIP_SUMS = {
  "images_background.zip": (
    9464212,
    "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640",
  ),
  "images_evaluation.zip": (
    6462886,
    "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee",
  ),
  "images_background_small1.zip": (
    1319022,
    "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
  ),
  "images_background_small2.zip": (
    1580917,
    "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
  ),
}
_SPLIT_ZIPS = {"background": "images_background.zip", "evaluation": "images_evaluation.zip"}
_PNG_RE = re.compile(r"^[^/]+/([^/]+)/character(\d+)/((\d+)_(\d+)\.png)$")


def walk_zip(path: str | os.PathLike) -> Iterator[tuple[str, int, str, bytes]]:
  """``(alphabet, character index in the alphabet (0-based), file name, png bytes)``."""
  with zipfile.ZipFile(path) as z:
    for info in z.infolist():
      m = _PNG_RE.match(info.filename)
      if m:
        yield m.group(1), int(m.group(2)) - 1, m.group(3), z.read(info)


def check_zip(path: Path, sums: Mapping[str, tuple[int, str]] | None = None) -> None:
  """Raises ``ValueError`` unless ``path`` has the registered size and SHA-256."""
  size, expected = (ZIP_SUMS if sums is None else sums)[path.name]
  digest = sha256(path)
  if path.stat().st_size != size or digest != expected:
    raise ValueError(
      f"{path} is not the official Omniglot zip (SHA-256 {digest}, expected "
      f"{expected}): download it again from {DOWNLOAD_URL}{path.name}"
    )


def arrays_from_zip(path: str | os.PathLike, split: str) -> tuple[np.ndarray, list[Alphabet]]:
  """One official zip -> ``images`` bool[characters, drawers, 105, 105] and its alphabets."""
  from PIL import Image

  pngs: dict[int, dict[int, bytes]] = {}
  ids: dict[str, list[int]] = {}
  try:
    for alphabet, _, fname, png in walk_zip(path):
      gid, drawer = (int(x) for x in fname[:-4].split("_"))
      pngs.setdefault(gid, {})[drawer] = png
      ids.setdefault(alphabet, []).append(gid)
  except zipfile.BadZipFile as e:
    raise ValueError(f"{path} is corrupt or not a zip file ({e}): download it again") from None
  if not pngs:
    raise ValueError(f"{path} holds no Omniglot PNGs (<top>/<alphabet>/characterNN/XXXX_YY.png)")
  order = sorted(pngs)
  drawers = sorted({d for per in pngs.values() for d in per})
  images = np.ones((len(order), len(drawers), 105, 105), bool)
  for row, gid in enumerate(order):
    for col, d in enumerate(drawers):
      if d not in pngs[gid]:
        raise ValueError(f"{path}: character {gid} has no drawing {d:02d}: download it again")
      images[row, col] = np.asarray(Image.open(io.BytesIO(pngs[gid][d])).convert("1"), bool)
  alphabets = sorted(
    (Alphabet(split, name, min(g), max(g)) for name, g in ids.items()), key=lambda a: a.first_id
  )
  return images, alphabets


def _fetch(url: str, dest: Path, progress: bool) -> None:
  """Streams ``url`` into ``dest`` (via a ``.part`` file, renamed when complete)."""
  from tqdm.auto import tqdm

  part = dest.with_name(dest.name + ".part")
  try:
    with urllib.request.urlopen(url) as r, open(part, "wb") as f:
      total = int(r.headers.get("Content-Length") or 0) or None
      with tqdm(
        total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress
      ) as bar:
        for block in iter(lambda: r.read(1 << 20), b""):
          f.write(block)
          bar.update(len(block))
  except OSError as e:  # URLError is an OSError
    part.unlink(missing_ok=True)
    raise ConnectionError(
      f"could not download {url} ({e}): check the connection, or copy "
      f"the zip into {dest.parent} and run again"
    ) from None
  part.replace(dest)


@renamed_keywords(dest="data_dir")
def download_omniglot(
  data_dir: str | os.PathLike | None = None,
  *,
  url: str = DOWNLOAD_URL,
  zips_dir: str | os.PathLike | None = None,
  sums: Mapping[str, tuple[int, str]] | None = None,
  progress: bool = True,
) -> Path:
  """Fetches the two official zips, checks them and writes the arrays folder ``data_dir``.

  Args:
    data_dir: the arrays folder to write (``amaml download omniglot --data_dir``; default
      :func:`default_download_dir`), the folder that ``data_dir`` of
      :func:`amaml.data.load_omniglot` reads. Written atomically: a folder that exists is
      complete.
    url: where the zips are (any URL ``urllib`` opens, ``file://`` too).
    zips_dir: where the zips are kept (default ``<data_dir>.zips``); a zip already there with
      the right SHA-256 is not fetched again.
    sums: ``{zip name: (size, SHA-256)}`` (default :data:`ZIP_SUMS`, the registered sums
      of the official zips).
    progress: show a download bar.

  Returns:
    ``data_dir``. Raises ``ValueError`` for a zip whose size or SHA-256 is wrong (it is
    deleted, and nothing is written) and ``ConnectionError`` when a zip cannot be fetched.
  """
  dest = Path(data_dir).expanduser() if data_dir is not None else default_download_dir()
  sums = ZIP_SUMS if sums is None else sums
  if all((dest / f).is_file() for f in FILES.values()):
    return dest
  if dest.exists() and any(dest.iterdir()):
    raise FileExistsError(
      f"{dest} exists but holds no complete Omniglot arrays: remove it, "
      "or pass another --data_dir (data_dir= in Python)"
    )
  zips = Path(zips_dir) if zips_dir is not None else dest.with_name(dest.name + ".zips")
  zips.mkdir(parents=True, exist_ok=True)
  arrays, alphabets = {}, []
  for split, name in _SPLIT_ZIPS.items():
    path = zips / name
    if not path.is_file():
      _fetch(url.rstrip("/") + "/" + name, path, progress)
    try:
      check_zip(path, sums)
    except ValueError:
      path.unlink()
      raise
    arrays[split], found = arrays_from_zip(path, split)
    alphabets += found
  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
  try:
    write_omniglot_arrays(tmp, arrays["background"], arrays["evaluation"], alphabets)
    tmp.replace(dest)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return dest
