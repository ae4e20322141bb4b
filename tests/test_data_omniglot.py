"""Omniglot: arrays folder checks, pre-processing and cache, protocol splits, rotations.

Uses a tiny generated arrays folder (10 characters); one test family reads the real
arrays in ../shared/data/omniglot (next to the repository), skipped where absent.
"""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_fake_omniglot

from amaml.data import load_omniglot, omniglot_split_indices, rotate_classes
from amaml.data import omniglot as omniglot_mod
from amaml.data.omniglot import ink_to_uint8, load_omniglot_characters
from amaml.data.omniglot_arrays import (
  Alphabet,
  arrays_checksum,
  find_omniglot_dir,
  read_omniglot_arrays,
)

REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
ALPHABETS = [
  Alphabet("background", "Alpha", 1, 4),
  Alphabet("background", "Beta", 5, 6),
  Alphabet("evaluation", "Gamma", 7, 9),
  Alphabet("evaluation", "Delta", 10, 10),
]


def make_arrays(path, seed=0, n_bg=6, n_ev=4, drawers=20):
  return write_fake_omniglot(
    path,
    n_bg,
    n_ev,
    drawers=drawers,
    seed=seed,
    alphabets=ALPHABETS if (n_bg, n_ev) == (6, 4) else None,
  )


@pytest.fixture(scope="module")
def arrays_dir(tmp_path_factory):
  return make_arrays(tmp_path_factory.mktemp("omniglot"))


@pytest.fixture
def cache(tmp_path):
  return tmp_path / "cache"


def test_read_arrays_and_names(arrays_dir):
  arr = read_omniglot_arrays(arrays_dir)
  assert arr.background.shape == (6, 20, 105, 105) and arr.evaluation.dtype == bool
  names = arr.character_names()
  assert names[:2] == ["Alpha/character01", "Alpha/character02"]
  assert names[4] == "Beta/character01" and names[9] == "Delta/character01"
  assert arr.character_info("evaluation", 0) == ("Gamma", 0, 7)


def test_ink_to_uint8_matches_pillow_per_image(arrays_dir):
  paper = read_omniglot_arrays(arrays_dir).background[:2, :5]
  got = ink_to_uint8(paper, 28)
  assert got.shape == (2, 5, 28, 28) and got.dtype == np.uint8
  for c in range(2):
    for d in range(5):
      ink = (~paper[c, d]).astype(np.float32)
      ref = np.asarray(Image.fromarray(ink).resize((28, 28), Image.BOX))
      assert np.abs(got[c, d].astype(np.float64) - ref * 255).max() <= 0.51


def test_ink_is_high():
  paper = np.ones((1, 105, 105), bool)
  paper[0, 50:60, 50:60] = False
  small = ink_to_uint8(paper, 28)[0]
  assert small.max() == 255 and small[0, 0] == 0


def test_cache_is_written_once_and_reused(arrays_dir, cache, monkeypatch):
  first = load_omniglot_characters(28, data_dir=arrays_dir, cache_dir=cache)
  files = list(cache.iterdir())
  assert len(files) == 1 and files[0].name.startswith("omniglot_28px_arrays_")
  assert first.characters.images.shape == (10, 20, 28, 28, 1) and first.num_background == 6
  monkeypatch.setattr(
    omniglot_mod, "read_omniglot_arrays", lambda d: pytest.fail("the cache was not used")
  )
  again = load_omniglot_characters(28, data_dir=arrays_dir, cache_dir=cache)
  np.testing.assert_array_equal(first.characters.images, again.characters.images)
  assert first.characters.class_names == again.characters.class_names
  assert not [f for f in cache.iterdir() if f.suffix == ".tmp"]


def test_cache_keyed_by_size_and_source(arrays_dir, cache, tmp_path):
  load_omniglot_characters(28, data_dir=arrays_dir, cache_dir=cache)
  load_omniglot_characters(14, data_dir=arrays_dir, cache_dir=cache)
  other = make_arrays(tmp_path / "other", seed=1)
  load_omniglot_characters(28, data_dir=other, cache_dir=cache)
  assert len(list(cache.iterdir())) == 3


def test_damaged_cache_is_rebuilt(arrays_dir, cache):
  good = load_omniglot_characters(28, data_dir=arrays_dir, cache_dir=cache)
  (path,) = cache.iterdir()
  path.write_bytes(b"garbage")
  with pytest.warns(UserWarning, match="unreadable Omniglot cache"):
    again = load_omniglot_characters(28, data_dir=arrays_dir, cache_dir=cache)
  np.testing.assert_array_equal(good.characters.images, again.characters.images)


def test_cache_dir_from_env(arrays_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("AMAML_CACHE_DIR", str(tmp_path / "envcache"))
  load_omniglot_characters(28, data_dir=arrays_dir)
  assert len(list((tmp_path / "envcache").iterdir())) == 1


def test_omniglot_dir_from_env(arrays_dir, cache, monkeypatch):
  monkeypatch.setenv("AMAML_OMNIGLOT_DIR", str(arrays_dir))
  assert find_omniglot_dir() == Path(arrays_dir)
  assert load_omniglot("lake", cache_dir=cache).train.num_classes == 6


def test_old_keyword_names_the_new_one(arrays_dir, cache):
  with pytest.raises(TypeError, match=r"load_omniglot\(\): omniglot_dir= was renamed data_dir="):
    load_omniglot(omniglot_dir=arrays_dir, cache_dir=cache)


def test_missing_file_error(arrays_dir, tmp_path, cache):
  d = make_arrays(tmp_path / "partial")
  (d / "images_evaluation.npz").unlink()
  with pytest.raises(FileNotFoundError, match="missing Omniglot file .*images_evaluation.npz"):
    load_omniglot(data_dir=d, cache_dir=cache)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_omniglot(data_dir=tmp_path / "nowhere", cache_dir=cache)


def test_corrupt_file_errors(tmp_path, cache):
  d = make_arrays(tmp_path / "corrupt")
  data = bytearray((d / "images_background.npz").read_bytes())
  data[len(data) // 2] ^= 0xFF
  (d / "images_background.npz").write_bytes(bytes(data))
  with pytest.raises(ValueError, match="corrupt.*SHA256SUMS"):
    load_omniglot(data_dir=d, cache_dir=cache)
  # without SHA256SUMS the damage is still caught, when reading
  (d / "SHA256SUMS").unlink()
  (d / "images_background.npz").write_bytes(b"not a zip file at all")
  with pytest.raises(ValueError, match="corrupt or not an .npz"):
    load_omniglot(data_dir=d, cache_dir=cache)


def test_source_arrays_requires_a_folder(monkeypatch, tmp_path, cache):
  monkeypatch.delenv("AMAML_OMNIGLOT_DIR", raising=False)
  monkeypatch.setattr("amaml.data.omniglot.find_omniglot_dir", lambda d=None: None)
  with pytest.raises(FileNotFoundError, match="AMAML_OMNIGLOT_DIR"):
    load_omniglot(source="arrays", cache_dir=cache)


def test_maml_split_of_the_real_sizes():
  s = omniglot_split_indices(1623, 964, "maml")
  assert [len(s[k]) for k in ("train", "val", "test")] == [1100, 100, 423]
  allidx = np.concatenate([s["train"], s["val"], s["test"]])
  np.testing.assert_array_equal(np.sort(allidx), np.arange(1623))
  # fixed seed: the same split every time; another seed, another split
  np.testing.assert_array_equal(s["train"], omniglot_split_indices(1623, 964)["train"])
  assert not np.array_equal(s["train"], omniglot_split_indices(1623, 964, split_seed=2)["train"])
  # it mixes background and evaluation characters
  assert (s["test"] < 964).any() and (s["test"] >= 964).any()


def test_lake_split_of_the_real_sizes():
  s = omniglot_split_indices(1623, 964, "lake")
  np.testing.assert_array_equal(s["train"], np.arange(964))
  np.testing.assert_array_equal(s["test"], np.arange(964, 1623))
  assert s["val"] is None
  v = omniglot_split_indices(1623, 964, "lake", num_val=64)
  assert len(v["train"]) == 900 and len(v["val"]) == 64 and v["val"].max() < 964
  assert not set(v["train"]) & set(v["val"])


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(protocol="vinyals"), "unknown Omniglot protocol"),
    (dict(protocol="maml", num_train=1600, num_val=100), "leave a test split"),
    (dict(protocol="lake", num_val=964), "num_val must be in"),
    (dict(protocol="lake", num_train=10), "num_train is not used"),
  ],
)
def test_bad_split_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    omniglot_split_indices(1623, 964, **kwargs)


def _base_names(ci):
  return {n.rsplit("/rot", 1)[0] for n in ci.class_names}


def test_maml_protocol_characters_disjoint_and_rotated(arrays_dir, cache):
  s = load_omniglot("maml", data_dir=arrays_dir, cache_dir=cache, num_train=5, num_val=2)
  assert (s.train.num_classes, s.val.num_classes, s.test.num_classes) == (20, 8, 12)
  tr, va, te = _base_names(s.train), _base_names(s.val), _base_names(s.test)
  assert (len(tr), len(va), len(te)) == (5, 2, 3)
  assert not (tr & va or tr & te or va & te)
  assert len(tr | va | te) == 10
  x = s.train.images
  for c in range(0, s.train.num_classes, 4):
    assert s.train.class_names[c].endswith("/rot0")
    for r in range(1, 4):
      np.testing.assert_array_equal(x[c + r], np.rot90(x[c], r, axes=(1, 2)))
      assert not np.array_equal(x[c + r], x[c])  # really rotated: distinct classes
    assert len({x[c + r].tobytes() for r in range(4)}) == 4


def test_lake_protocol(arrays_dir, cache):
  s = load_omniglot("lake", data_dir=arrays_dir, cache_dir=cache)
  chars = load_omniglot_characters(28, data_dir=arrays_dir, cache_dir=cache).characters
  assert s.val is None
  np.testing.assert_array_equal(s.train.images, chars.images[:6])
  np.testing.assert_array_equal(s.test.images, chars.images[6:])
  assert _base_names(s.test) == {
    "Gamma/character01",
    "Gamma/character02",
    "Gamma/character03",
    "Delta/character01",
  }
  v = load_omniglot("lake", data_dir=arrays_dir, cache_dir=cache, num_val=2)
  assert (v.train.num_classes, v.val.num_classes) == (4, 2)
  assert not _base_names(v.train) & _base_names(v.val)


def test_rotate_classes_rejects_bad_angles():
  from amaml.data import ClassImages

  with pytest.raises(ValueError, match="multiples of 90"):
    rotate_classes(ClassImages(np.zeros((1, 2, 3, 3, 1), np.uint8)), (0, 45))


def test_without_alphabets_tsv_names_by_id(tmp_path, cache):
  d = make_arrays(tmp_path / "plain", n_bg=3, n_ev=2)
  s = load_omniglot("lake", data_dir=d, cache_dir=cache)
  assert s.test.class_names[0] == "evaluation/character0004/rot0"


# --- the real data (../shared/data/omniglot), skipped where absent -------------------------

real = pytest.mark.skipif(
  not (REAL_DIR / "images_background.npz").is_file(),
  reason=f"no real Omniglot arrays at {REAL_DIR}",
)


@real
def test_real_arrays_match_their_checksums():
  arrays_checksum(REAL_DIR)  # raises on a mismatch with SHA256SUMS


@real
@pytest.mark.slow
def test_real_omniglot_maml_and_lake(tmp_path):
  s = load_omniglot("maml", data_dir=REAL_DIR, cache_dir=tmp_path)
  assert s.train.images.shape == (4400, 20, 28, 28, 1)
  assert (s.val.num_classes, s.test.num_classes) == (400, 1692)
  tr, va, te = _base_names(s.train), _base_names(s.val), _base_names(s.test)
  assert (len(tr), len(va), len(te)) == (1100, 100, 423)
  assert not (tr & va or tr & te or va & te)
  lake = load_omniglot("lake", data_dir=REAL_DIR, cache_dir=tmp_path)
  assert (lake.train.num_classes, lake.val, lake.test.num_classes) == (964, None, 659)
  assert lake.train.class_names[0] == "Arcadian/character01/rot0"
  # ink is high and sparse: most of a 28x28 character is paper (0)
  assert 0.05 < (lake.train.images > 127).mean() < 0.3
  assert len(os.listdir(tmp_path)) == 1
