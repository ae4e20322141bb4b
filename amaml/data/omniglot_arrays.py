"""The Omniglot arrays folder: find it, check it, read it, write one.

The folder (e.g. ``shared/data/omniglot`` next to the repository) holds::

  images_background.npz   images bool[964, 20, 105, 105] (30 "background" alphabets)
  images_evaluation.npz   images bool[659, 20, 105, 105] (20 "evaluation" alphabets)
  alphabets.tsv           split, alphabet, first_character_id, last_character_id (optional)
  SHA256SUMS              sha256sum-style checksums of the two .npz files (optional)

Pixels are ``True`` for background paper and ``False`` for ink, as in the original
PNG files. Character ids are 1-based and global: row ``c`` of the background
arrays is character ``1 + c``, row ``c`` of the evaluation arrays is character
``n_background + 1 + c``; ``images[c, d]`` is drawer ``d + 1``.

The folder is looked for, in this order, at: the ``data_dir`` argument (``--data_dir`` on
the command line), the ``AMAML_OMNIGLOT_DIR`` environment variable (the default of
``data_dir``), ``shared/data/omniglot`` in the parent of the repository root and in the
current directory and its parents, then where ``amaml download omniglot`` writes it
(:func:`default_download_dir`).

>>> import tempfile, numpy as np
>>> d = tempfile.mkdtemp()
>>> bg = np.ones((3, 4, 105, 105), bool); ev = np.ones((2, 4, 105, 105), bool)
>>> _ = write_omniglot_arrays(d, bg, ev)
>>> arr = read_omniglot_arrays(d)
>>> arr.background.shape, arr.evaluation.shape, arr.character_names()[3]
((3, 4, 105, 105), (2, 4, 105, 105), 'evaluation/character0004')
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from amaml._renamed import renamed_keywords

ENV_VAR = "AMAML_OMNIGLOT_DIR"
FILES = {"background": "images_background.npz", "evaluation": "images_evaluation.npz"}
SPLITS = ("background", "evaluation")
_REPO_ROOT = Path(__file__).resolve().parents[2]
_SHARED_SUBDIR = Path("shared") / "data" / "omniglot"


class Alphabet(NamedTuple):
  """One row of ``alphabets.tsv``: the alphabet's global character ids, inclusive."""

  split: str
  name: str
  first_id: int
  last_id: int


@renamed_keywords(omniglot_dir="data_dir")
def find_omniglot_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
  """The Omniglot arrays folder, or ``None`` when none is found.

  An explicit ``data_dir`` (or ``$AMAML_OMNIGLOT_DIR``) is returned as given,
  even if it does not exist, so that reading it fails with a clear message
  rather than silently falling back to another source.
  """
  if data_dir is not None:
    return Path(data_dir).expanduser()
  if os.environ.get(ENV_VAR):
    return Path(os.environ[ENV_VAR]).expanduser()
  cwd = Path.cwd().resolve()
  for base in (_REPO_ROOT.parent, cwd, *cwd.parents):
    cand = base / _SHARED_SUBDIR
    if (cand / FILES["background"]).is_file():
      return cand
  if (default_download_dir() / FILES["background"]).is_file():
    return default_download_dir()
  return None


#: The environment variable of amaml's cache root (:func:`default_cache_dir`).
CACHE_ENV_VAR = "AMAML_CACHE_DIR"


def default_cache_dir() -> Path:
  """amaml's one cache root: ``$AMAML_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/amaml``,
  else ``~/.cache/amaml``. Resized images and downloaded Omniglot arrays live under it."""
  if os.environ.get(CACHE_ENV_VAR):
    return Path(os.environ[CACHE_ENV_VAR]).expanduser()
  return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "amaml"


def default_download_dir() -> Path:
  """Where ``amaml download omniglot`` writes the arrays: ``omniglot`` under
  :func:`default_cache_dir`."""
  return default_cache_dir() / "omniglot"


def sha256(path: str | os.PathLike) -> str:
  """The SHA-256 hex digest of a file (read in blocks)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _read_sums(path: Path) -> dict[str, str]:
  sums = {}
  for line in path.read_text().splitlines():
    parts = line.split()
    if len(parts) == 2:
      sums[parts[1].lstrip("*")] = parts[0].lower()
  return sums


@renamed_keywords(omniglot_dir="data_dir")
def arrays_checksum(data_dir: str | os.PathLike) -> str:
  """SHA-256 (hex) identifying the two ``.npz`` files of ``data_dir``.

  Checks the files against ``SHA256SUMS`` when the folder has one; raises
  ``FileNotFoundError`` for a missing file and ``ValueError`` for a mismatch.
  """
  d = Path(data_dir)
  fix = (
    f"run `amaml download omniglot` once, or point --data_dir (data_dir= in Python, "
    f"or ${ENV_VAR}) at a folder holding {FILES['background']} and {FILES['evaluation']}, "
    "e.g. a copy of shared/data/omniglot"
  )
  if not d.is_dir():
    raise FileNotFoundError(f"Omniglot arrays folder {d} does not exist: {fix}")
  sums = _read_sums(d / "SHA256SUMS") if (d / "SHA256SUMS").is_file() else {}
  digests = []
  for fname in FILES.values():
    p = d / fname
    if not p.is_file():
      raise FileNotFoundError(f"missing Omniglot file {p}: {fix}")
    digest = sha256(p)
    if fname in sums and sums[fname] != digest:
      raise ValueError(
        f"{p} is corrupt: its SHA-256 is {digest} but {d / 'SHA256SUMS'} says {sums[fname]}; "
        "copy the file again from the original data folder"
      )
    digests.append(digest)
  return hashlib.sha256("".join(digests).encode()).hexdigest()


def _read_alphabets(path: Path) -> tuple[Alphabet, ...]:
  rows = []
  for i, line in enumerate(path.read_text().splitlines()):
    parts = line.rstrip("\n").split("\t")
    if i == 0 and parts[0] == "split":
      continue
    if not line.strip():
      continue
    if len(parts) != 4:
      raise ValueError(
        f"{path}, line {i + 1}: expected 4 tab-separated fields "
        "(split, alphabet, first_character_id, last_character_id)"
      )
    rows.append(Alphabet(parts[0], parts[1], int(parts[2]), int(parts[3])))
  return tuple(rows)


@dataclasses.dataclass(frozen=True, eq=False)
class OmniglotArrays:
  """Both Omniglot splits at full size, as bool ``[characters, drawers, 105, 105]``.

  ``True`` is background paper. ``checksum`` identifies the source (for caches);
  ``alphabets`` comes from ``alphabets.tsv`` when the folder has one.
  """

  background: np.ndarray
  evaluation: np.ndarray
  alphabets: tuple[Alphabet, ...] | None = None
  checksum: str = ""

  @property
  def num_background(self) -> int:
    return int(self.background.shape[0])

  def first_ids(self) -> dict[str, int]:
    """Global id of row 0 of each split."""
    first = {"background": 1, "evaluation": self.num_background + 1}
    if self.alphabets:
      for split in SPLITS:
        ids = [a.first_id for a in self.alphabets if a.split == split]
        if ids:
          first[split] = min(ids)
    return first

  def character_info(self, split: str, row: int) -> tuple[str | None, int | None, int]:
    """``(alphabet, 0-based index within the alphabet, global id)`` of a row of a split."""
    gid = self.first_ids()[split] + row
    for a in self.alphabets or ():
      if a.first_id <= gid <= a.last_id:
        return a.name, gid - a.first_id, gid
    return None, None, gid

  def character_names(self) -> list[str]:
    """One name per character, background then evaluation: ``Alphabet/characterNN``
    (as in the original folders) or ``split/characterIIII`` without ``alphabets.tsv``."""
    names = []
    for split in SPLITS:
      for row in range(getattr(self, split).shape[0]):
        alphabet, k, gid = self.character_info(split, row)
        names.append(
          f"{split}/character{gid:04d}" if alphabet is None else f"{alphabet}/character{k + 1:02d}"
        )
    return names


def _load_npz_images(path: Path) -> np.ndarray:
  try:
    with np.load(path) as z:
      files = z.files
      x = z["images"] if "images" in files else None
  except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
    raise ValueError(
      f"{path} is corrupt or not an .npz file ({e}); copy it again from the original data folder"
    ) from e
  if x is None:
    raise ValueError(
      f"{path} has no 'images' array (it has {files}); it is not an Omniglot arrays file"
    )
  if x.ndim != 4 or x.dtype != np.bool_:
    raise ValueError(
      f"{path}: 'images' must be bool [characters, drawers, H, W], got {x.dtype}{list(x.shape)}"
    )
  return x


@renamed_keywords(omniglot_dir="data_dir")
def read_omniglot_arrays(data_dir: str | os.PathLike) -> OmniglotArrays:
  """Reads and checks an Omniglot arrays folder (see the module docstring)."""
  d = Path(data_dir)
  checksum = arrays_checksum(d)
  bg = _load_npz_images(d / FILES["background"])
  ev = _load_npz_images(d / FILES["evaluation"])
  if bg.shape[1:] != ev.shape[1:]:
    raise ValueError(
      f"background {bg.shape} and evaluation {ev.shape} arrays disagree on drawers or image size"
    )
  alphabets = _read_alphabets(d / "alphabets.tsv") if (d / "alphabets.tsv").is_file() else None
  return OmniglotArrays(bg, ev, alphabets, checksum)


@renamed_keywords(omniglot_dir="data_dir")
def write_omniglot_arrays(
  data_dir: str | os.PathLike,
  background: np.ndarray,
  evaluation: np.ndarray,
  alphabets: Sequence[Alphabet] | None = None,
) -> Path:
  """Writes an arrays folder (``.npz`` files, ``SHA256SUMS``, ``alphabets.tsv`` if given).

  Handy for small fixtures and for exporting Omniglot read from another source.
  """
  d = Path(data_dir)
  d.mkdir(parents=True, exist_ok=True)
  lines = []
  for split, x in (("background", background), ("evaluation", evaluation)):
    x = np.asarray(x, bool)
    labels = np.broadcast_to(np.arange(x.shape[0])[:, None], x.shape[:2])
    np.savez_compressed(d / FILES[split], images=x, labels=labels)
    lines.append(f"{sha256(d / FILES[split])}  {FILES[split]}")
  (d / "SHA256SUMS").write_text("\n".join(lines) + "\n")
  if alphabets is not None:
    rows = ["split\talphabet\tfirst_character_id\tlast_character_id"]
    rows += [f"{a.split}\t{a.name}\t{a.first_id}\t{a.last_id}" for a in alphabets]
    (d / "alphabets.tsv").write_text("\n".join(rows) + "\n")
  return d
