"""The TFDS path (no TensorFlow, never downloading): data prepared from an arrays folder
through TFDS and read back equals the arrays path; zips give the same examples; clear
errors when nothing is prepared."""

import io
import zipfile

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from amaml.data import load_omniglot, prepare_tfds_omniglot, write_omniglot_arrays  # noqa: E402
from amaml.data import tfds_omniglot  # noqa: E402
from conftest import write_fake_omniglot  # noqa: E402
from amaml.data.omniglot_arrays import Alphabet, read_omniglot_arrays  # noqa: E402

ALPHABETS = [
  Alphabet("background", "Alpha", 1, 3),
  Alphabet("background", "Beta", 4, 5),
  Alphabet("evaluation", "Gamma", 6, 7),
]


@pytest.fixture(autouse=True)
def never_download(monkeypatch):
  """Offline, a TFDS download retries for minutes: make any attempt fail at once."""

  def refuse(*a, **k):
    raise AssertionError("a test asked TFDS to download")

  monkeypatch.setattr(tfds.download.DownloadManager, "download", refuse)
  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", refuse)


@pytest.fixture(scope="module")
def arrays_dir(tmp_path_factory):
  return write_fake_omniglot(tmp_path_factory.mktemp("arrays"), 5, 2, ink=0.2, alphabets=ALPHABETS)


@pytest.fixture(scope="module")
def tfds_dir(arrays_dir, tmp_path_factory):
  return prepare_tfds_omniglot(tmp_path_factory.mktemp("tfds"), arrays_dir=arrays_dir)


def _sorted_drawers(x):
  """Each character's images in a canonical order (TFDS does not keep the drawer)."""
  flat = x.reshape(x.shape[0], x.shape[1], -1)
  out = np.empty_like(flat)
  for c in range(x.shape[0]):
    out[c] = flat[c][np.lexsort(flat[c].T[::-1])]
  return out


def test_prepared_as_array_record_with_the_stock_features(tfds_dir):
  path = tfds_dir / "amaml_omniglot" / "3.0.0"
  assert sorted(p.name for p in path.glob("*.array_record*")) == [
    "amaml_omniglot-test.array_record-00000-of-00001",
    "amaml_omniglot-train.array_record-00000-of-00001",
  ]
  source = tfds.data_source("amaml_omniglot", split="train", data_dir=str(tfds_dir), download=False)
  assert len(source) == 5 * 20
  ex = source[0]
  assert set(ex) == {"image", "alphabet", "alphabet_char_id", "label"}
  assert ex["image"].shape == (105, 105, 3) and ex["image"].dtype == np.uint8
  assert (
    len(tfds.data_source("amaml_omniglot", split="test", data_dir=str(tfds_dir), download=False))
    == 2 * 20
  )


def test_tfds_read_back_equals_arrays(arrays_dir, tfds_dir):
  a = read_omniglot_arrays(arrays_dir)
  b = tfds_omniglot.read_tfds_omniglot(tfds_dir)
  for part in ("background", "evaluation"):
    x, y = getattr(a, part), getattr(b, part)
    assert x.shape == y.shape and y.dtype == bool
    np.testing.assert_array_equal(_sorted_drawers(x), _sorted_drawers(y))
  assert [(r.split, r.first_id, r.last_id) for r in b.alphabets] == [
    (r.split, r.first_id, r.last_id) for r in ALPHABETS
  ]


def test_load_omniglot_from_tfds_equals_arrays(arrays_dir, tfds_dir, tmp_path):
  via_arrays = load_omniglot("lake", data_dir=arrays_dir, cache_dir=tmp_path)
  via_tfds = load_omniglot("lake", source="tfds", tfds_data_dir=tfds_dir, cache_dir=tmp_path)
  for split in ("train", "test"):
    np.testing.assert_array_equal(
      _sorted_drawers(getattr(via_arrays, split).images),
      _sorted_drawers(getattr(via_tfds, split).images),
    )
  assert any(p.name.startswith("omniglot_28px_tfds_") for p in tmp_path.iterdir())
  # the maml protocol splits the same characters whatever the source
  m1 = load_omniglot("maml", data_dir=arrays_dir, cache_dir=tmp_path, num_train=4, num_val=1)
  m2 = load_omniglot(
    "maml", source="tfds", tfds_data_dir=tfds_dir, cache_dir=tmp_path, num_train=4, num_val=1
  )
  np.testing.assert_array_equal(_sorted_drawers(m1.test.images), _sorted_drawers(m2.test.images))


def _fake_zip(arrays, part, path):
  """A zip laid out like the official ones: images_<part>/<alphabet>/characterNN/XXXX_YY.png."""
  images = getattr(arrays, part)
  with zipfile.ZipFile(path, "w") as z:
    for row in range(images.shape[0]):
      alphabet, k, gid = arrays.character_info(part, row)
      for d in range(images.shape[1]):
        name = f"images_{part}/{alphabet}/character{k + 1:02d}/{gid:04d}_{d + 1:02d}.png"
        z.writestr(name, tfds_omniglot._png_1bit(images[row, d]))
  return path


def test_zips_give_the_same_examples_as_arrays(arrays_dir, tmp_path):
  arrays = read_omniglot_arrays(arrays_dir)
  for split, part in (("train", "background"), ("test", "evaluation")):
    z = _fake_zip(arrays, part, tmp_path / f"{part}.zip")
    names, _ = tfds_omniglot._zip_names([z])
    from_zip = dict(tfds_omniglot.examples_from_zip(z, names))
    from_arrays = dict(tfds_omniglot.examples_from_arrays(arrays, split))
    assert from_zip.keys() == from_arrays.keys()
    assert "Alpha_0_0001_01.png" in from_zip or split == "test"
    for key, ex in from_arrays.items():
      zx = from_zip[key]
      assert (zx["alphabet_char_id"], zx["label"]) == (ex["alphabet_char_id"], ex["label"])
      assert zx["image"] == ex["image"]


def test_zips_with_wrong_checksums_are_rejected(arrays_dir, tmp_path):
  arrays = read_omniglot_arrays(arrays_dir)
  for name in tfds_omniglot.ZIPS.values():
    _fake_zip(arrays, "background", tmp_path / name)
  with pytest.raises(ValueError, match="not the official Omniglot zip"):
    prepare_tfds_omniglot(tmp_path / "out", zips_dir=tmp_path)


def test_nothing_prepared_and_no_download(tmp_path):
  with pytest.raises(FileNotFoundError, match="download=True"):
    prepare_tfds_omniglot(tmp_path)
  with pytest.raises(FileNotFoundError, match="prepare_tfds_omniglot"):
    tfds_omniglot.read_tfds_omniglot(tmp_path)
  with pytest.raises(FileNotFoundError, match="AMAML_OMNIGLOT_DIR"):
    load_omniglot(source="tfds", tfds_data_dir=tmp_path, cache_dir=tmp_path / "c")


def test_prepare_needs_alphabets(tmp_path):
  d = write_omniglot_arrays(
    tmp_path / "a", np.ones((2, 2, 105, 105), bool), np.ones((1, 2, 105, 105), bool)
  )
  with pytest.raises(FileNotFoundError, match="alphabets.tsv"):
    prepare_tfds_omniglot(tmp_path / "t", arrays_dir=d)


def test_png_is_one_bit_like_the_originals():
  from PIL import Image

  paper = np.ones((105, 105), bool)
  paper[10:20, 10:20] = False
  with Image.open(io.BytesIO(tfds_omniglot._png_1bit(paper))) as im:
    assert im.mode == "1"
    np.testing.assert_array_equal(np.asarray(im), paper)


REAL_DIR = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared/data/omniglot"


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_DIR / "alphabets.tsv").is_file(), reason="no real Omniglot arrays")
def test_real_arrays_through_tfds(tmp_path):
  a = read_omniglot_arrays(REAL_DIR)
  b = tfds_omniglot.read_tfds_omniglot(prepare_tfds_omniglot(tmp_path, arrays_dir=REAL_DIR))
  assert b.alphabets == a.alphabets and b.character_names() == a.character_names()
  for part in ("background", "evaluation"):
    np.testing.assert_array_equal(
      _sorted_drawers(getattr(a, part)), _sorted_drawers(getattr(b, part))
    )
  builder = tfds.builder("amaml_omniglot", data_dir=str(tmp_path))
  assert len(builder.info.features["alphabet"].names) == 50
  assert builder.info.features["label"].names[:2] == ["Arcadian_0", "Arcadian_1"]
