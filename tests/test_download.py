"""``amaml download omniglot`` offline: official-layout zips that the test builds, served
from a local folder through file:// URLs, become the arrays folder (pixel for pixel); a
corrupt zip is refused and nothing is written."""

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from amaml import cli
from amaml.data import download_omniglot, read_omniglot_arrays
from amaml.data.omniglot_arrays import Alphabet, find_omniglot_dir
from amaml.data.omniglot_zips import ZIP_SUMS, sha256

# (split, alphabet, number of characters); global ids run on across alphabets and splits
LAYOUT = [("background", "Alpha", 2), ("background", "Beta", 3), ("evaluation", "Gamma", 2)]
DRAWERS = 3


def _png(paper):
  buf = io.BytesIO()
  Image.fromarray(paper).convert("1").save(buf, format="PNG")
  return buf.getvalue()


@pytest.fixture
def served(tmp_path):
  """Zips in the official layout in ``tmp_path/server``; their images and sums."""
  rng = np.random.default_rng(0)
  server = tmp_path / "server"
  server.mkdir()
  images = {"background": [], "evaluation": []}
  zips = {
    "background": zipfile.ZipFile(server / "images_background.zip", "w"),
    "evaluation": zipfile.ZipFile(server / "images_evaluation.zip", "w"),
  }
  gid = 0
  for split, alphabet, n in LAYOUT:
    for k in range(1, n + 1):
      gid += 1
      drawings = rng.random((DRAWERS, 105, 105)) > 0.2
      images[split].append(drawings)
      top = zips[split].filename.split("/")[-1][:-4]
      for d in range(DRAWERS):  # written in a shuffled order: the reader must sort
        zips[split].writestr(
          f"{top}/{alphabet}/character{k:02d}/{gid:04d}_{d + 1:02d}.png", _png(drawings[d])
        )
  for z in zips.values():
    z.close()
  sums = {p.name: (p.stat().st_size, sha256(p)) for p in server.glob("*.zip")}
  return server, {k: np.stack(v) for k, v in images.items()}, sums


def test_download_writes_the_arrays_pixel_for_pixel(served, tmp_path):
  server, images, sums = served
  out = download_omniglot(tmp_path / "omniglot", url=server.as_uri(), sums=sums, progress=False)
  arr = read_omniglot_arrays(out)
  np.testing.assert_array_equal(arr.background, images["background"])
  np.testing.assert_array_equal(arr.evaluation, images["evaluation"])
  assert arr.alphabets == (
    Alphabet("background", "Alpha", 1, 2),
    Alphabet("background", "Beta", 3, 5),
    Alphabet("evaluation", "Gamma", 6, 7),
  )
  # a second call finds the folder complete and fetches nothing
  (server / "images_background.zip").unlink()
  assert download_omniglot(out, url=server.as_uri(), sums=sums, progress=False) == out


def test_a_corrupt_zip_is_refused_and_nothing_is_written(served, tmp_path):
  server, _, sums = served
  zip_path = server / "images_evaluation.zip"
  data = bytearray(zip_path.read_bytes())
  data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, another SHA-256
  zip_path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="not the official Omniglot zip.*download it again"):
    download_omniglot(tmp_path / "omniglot", url=server.as_uri(), sums=sums, progress=False)
  assert not (tmp_path / "omniglot").exists()
  assert not (tmp_path / "omniglot.zips" / "images_evaluation.zip").exists()  # deleted


def test_the_official_sums_refuse_other_zips(served, tmp_path):
  server, _, _ = served
  with pytest.raises(ValueError, match="not the official Omniglot zip"):
    download_omniglot(tmp_path / "o", url=server.as_uri(), sums=ZIP_SUMS, progress=False)


def test_cli_downloads_and_train_finds_the_default_folder(served, tmp_path, monkeypatch, capsys):
  server, images, sums = served
  monkeypatch.setattr("amaml.data.omniglot_zips.ZIP_SUMS", sums)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  monkeypatch.delenv("AMAML_CACHE_DIR", raising=False)  # the cache root: $XDG_CACHE_HOME/amaml
  monkeypatch.delenv("AMAML_OMNIGLOT_DIR", raising=False)
  monkeypatch.chdir(tmp_path)  # no shared/data/omniglot above the working directory
  monkeypatch.setattr("amaml.data.omniglot_arrays._REPO_ROOT", tmp_path / "nowhere" / "repo")
  assert find_omniglot_dir() is None
  assert cli.main(["download", "omniglot", "--url", server.as_uri(), "--no_progress"]) == 0
  assert "Omniglot arrays in" in capsys.readouterr().out
  found = find_omniglot_dir()
  assert found == tmp_path / "cache" / "amaml" / "omniglot"
  np.testing.assert_array_equal(read_omniglot_arrays(found).evaluation, images["evaluation"])


def test_cli_names_an_unreachable_url_in_one_line(tmp_path, capsys):
  rc = cli.main(
    [
      "download",
      "omniglot",
      "--data_dir",
      str(tmp_path / "o"),
      "--url",
      (tmp_path / "no-such-folder").as_uri(),
      "--no_progress",
    ]
  )
  err = capsys.readouterr().err
  assert rc == 2 and len(err.strip().splitlines()) == 1
  assert "could not download" in err and "copy the zip into" in err
