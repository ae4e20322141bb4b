"""The few-shot image benchmarks from local folders: every named config builds and takes
a finite meta step on a small synthetic folder of its layout; the split-file layout reads
the same images as the folder layout; a missing folder says where to get the data."""

import csv

import jax
import numpy as np
import pytest

from conftest import slow_except
from PIL import Image

from amaml import cli, configs, train
from amaml.data import image_folders

# one config in the default run, the rest with -m slow (a Conv4 step compiles in ~40 s)
IMAGE_CONFIGS = slow_except(
  [n for n, c in configs.CONFIGS.items() if c.task == "image_folder"], {"cifar-fs-5w5s"}
)
CLASSES, EXAMPLES = 6, 20  # enough for 5 ways and 5 shots + 15 queries


def _image(rng):
  return Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))


def write_folders(root, seed=0):
  """``root/{train,val,test}/<class>/<i>.png``."""
  rng = np.random.default_rng(seed)
  for split in image_folders.SPLITS:
    for c in range(CLASSES):
      d = root / split / f"{split}_n{c:03d}"
      d.mkdir(parents=True)
      for i in range(EXAMPLES):
        _image(rng).save(d / f"{i:03d}.png")
  return root


def write_split_files(root, seed=0):
  """Ravi & Larochelle's layout: ``root/images/*`` and ``root/{train,val,test}.csv``."""
  rng = np.random.default_rng(seed)
  (root / "images").mkdir(parents=True)
  for split in image_folders.SPLITS:
    with open(root / f"{split}.csv", "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["filename", "label"])
      for c in range(CLASSES):
        for i in range(EXAMPLES):
          name = f"{split}_n{c:03d}_{i:03d}.png"
          _image(rng).save(root / "images" / name)
          w.writerow([name, f"{split}_n{c:03d}"])
  return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  return write_folders(tmp_path_factory.mktemp("bench"))


@pytest.mark.parametrize("name", IMAGE_CONFIGS)
def test_every_image_config_takes_a_finite_step(name, folders, tmp_path, monkeypatch):
  monkeypatch.setenv("AMAML_CACHE_DIR", str(tmp_path / "cache"))
  cfg = configs.get_config(
    name, data_dir=str(folders), image_size=16, hidden=4, queries=2, inner_steps=1, eval_batch=2
  )
  exp = train.build(cfg)
  assert exp.data["train"].shape == (CLASSES, EXAMPLES, 16, 16, 3)
  state = exp.learner.init(exp.params)
  batch = exp.sample(jax.random.key(0), exp.data["train"], cfg.meta_batch)
  assert batch.support_x.shape == (cfg.meta_batch, 5 * cfg.shots, 16, 16, 3)
  _, m = exp.learner.step(state, batch)
  assert np.isfinite(float(m["loss"])) and not bool(m["nonfinite"])


def test_split_files_read_the_same_images_as_folders(tmp_path):
  a = image_folders.load_image_benchmark(
    "miniimagenet", write_folders(tmp_path / "a", seed=3), image_size=12, cache_dir=False
  )
  b = image_folders.load_image_benchmark(
    "miniimagenet", write_split_files(tmp_path / "b", seed=3), image_size=12, cache_dir=False
  )
  for split in image_folders.SPLITS:
    np.testing.assert_array_equal(a[split].images, b[split].images)
    assert a[split].class_names == b[split].class_names


def test_the_cache_is_used_on_the_second_load(folders, tmp_path, monkeypatch):
  first = image_folders.load_image_benchmark("cifar-fs", folders, image_size=8, cache_dir=tmp_path)
  assert len(list(tmp_path.glob("cifar-fs_*_8px_*.npz"))) == 3

  def refuse(*a, **k):
    raise AssertionError("read the images again instead of the cache")

  monkeypatch.setattr(image_folders.ClassImages, "from_files", refuse)
  again = image_folders.load_image_benchmark("cifar-fs", folders, image_size=8, cache_dir=tmp_path)
  np.testing.assert_array_equal(first["val"].images, again["val"].images)


def test_a_missing_folder_says_where_to_get_the_data(tmp_path, monkeypatch, capsys):
  monkeypatch.delenv("AMAML_MINIIMAGENET_DIR", raising=False)
  with pytest.raises(
    FileNotFoundError,
    match=r"miniImageNet not found .*twitter/meta-learning-lstm"
    r".*train.csv.*AMAML_MINIIMAGENET_DIR",
  ):
    image_folders.load_image_benchmark("miniimagenet")
  (tmp_path / "empty").mkdir()
  rc = cli.main(
    [
      "train",
      "--config",
      "fc100-5w1s",
      "--data_dir",
      str(tmp_path / "empty"),
      "--out",
      str(tmp_path / "run"),
      "--no_progress",
    ]
  )
  err = capsys.readouterr().err
  assert rc == 2 and len(err.strip().splitlines()) == 1
  assert "FC100 not found" in err and "ElementAI/TADAM" in err and "AMAML_FC100_DIR" in err


def test_a_split_file_naming_a_missing_image_is_refused(tmp_path):
  root = write_split_files(tmp_path / "m")
  next((root / "images").glob("val_*")).unlink()
  with pytest.raises(FileNotFoundError, match="named in .*val.csv are missing"):
    image_folders.load_image_benchmark("miniimagenet", root, cache_dir=False)


def test_image_folder_needs_a_dataset_and_only_it_takes_one():
  with pytest.raises(ValueError, match="task image_folder needs a dataset"):
    configs.get_config("sinusoid", task="image_folder")
  with pytest.raises(ValueError, match="task image_folder needs a dataset"):
    configs.get_config("omniglot-5w1s", dataset="fc100")
