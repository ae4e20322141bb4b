"""ClassImages: validation with clear errors, from arrays and from a folder of images."""

import numpy as np
import pytest
from PIL import Image

from amaml.data import ClassImages


def test_from_arrays_adds_channel_and_keeps_names():
  x = np.arange(3 * 2 * 4 * 5, dtype=np.uint8).reshape(3, 2, 4, 5)
  src = ClassImages.from_arrays(x, ["a", "b", "c"])
  assert src.images.shape == (3, 2, 4, 5, 1)
  assert (src.num_classes, src.examples_per_class, src.image_shape) == (3, 2, (4, 5, 1))
  assert src.class_names == ("a", "b", "c")
  sub = src.subset([2, 0])
  assert sub.class_names == ("c", "a")
  np.testing.assert_array_equal(sub.images[0], src.images[2])


@pytest.mark.parametrize(
  "images, error, match",
  [
    (np.zeros((2, 3, 4), np.uint8), ValueError, "5-D"),
    (np.zeros((2, 3, 4, 4), np.uint8), ValueError, "add a channel axis"),
    (np.zeros((2, 3, 4, 4, 1), np.float32), TypeError, "must be uint8"),
    (np.zeros((0, 3, 4, 4, 1), np.uint8), ValueError, "empty"),
    (np.zeros((2, 1, 4, 4, 1), np.uint8), ValueError, "at least 2 examples per class"),
    ([[1, 2]], TypeError, "must be an array"),
  ],
)
def test_bad_arrays_are_rejected_with_a_fix(images, error, match):
  with pytest.raises(error, match=match):
    ClassImages(images)


def test_wrong_number_of_names():
  with pytest.raises(ValueError, match="2 class names for 3 classes"):
    ClassImages(np.zeros((3, 2, 2, 2, 1), np.uint8), ("a", "b"))


def test_subset_out_of_range():
  with pytest.raises(IndexError):
    ClassImages(np.zeros((3, 2, 2, 2, 1), np.uint8)).subset([3])


def _write_tree(root, counts, size=(9, 7)):
  for c, n in counts.items():
    (root / c).mkdir(parents=True)
    for i in range(n):
      arr = np.full((size[0], size[1], 3), (10 * i, 50, 200), np.uint8)
      Image.fromarray(arr).save(root / c / f"img{i:02d}.png")
  (root / "notes.txt").write_text("not a class")


def test_from_directory_resizes_sorts_and_names(tmp_path):
  _write_tree(tmp_path, {"zebra": 3, "ant": 3})
  src = ClassImages.from_directory(tmp_path, (4, 6))
  assert src.images.shape == (2, 3, 4, 6, 3)
  assert src.class_names == ("ant", "zebra")
  # sorted by file name: example i has red channel 10 * i
  np.testing.assert_array_equal(src.images[0, :, 0, 0, 0], [0, 10, 20])
  grey = ClassImages.from_directory(tmp_path, 5, channels=1)
  assert grey.images.shape == (2, 3, 5, 5, 1)


def test_from_directory_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no directory"):
    ClassImages.from_directory(tmp_path / "missing", 8)
  with pytest.raises(ValueError, match="no class sub-folders"):
    ClassImages.from_directory(tmp_path, 8)
  _write_tree(tmp_path, {"a": 3, "b": 5})
  with pytest.raises(ValueError, match="examples_per_class"):
    ClassImages.from_directory(tmp_path, 8)
  assert ClassImages.from_directory(tmp_path, 8, examples_per_class=3).examples_per_class == 3
  with pytest.raises(ValueError, match="fewer than 4 images"):
    ClassImages.from_directory(tmp_path, 8, examples_per_class=4)
  with pytest.raises(ValueError, match="resample"):
    ClassImages.from_directory(tmp_path, 8, examples_per_class=3, resample="fancy")


def test_from_directory_single_image_classes_fail(tmp_path):
  _write_tree(tmp_path, {"a": 1, "b": 1})
  with pytest.raises(ValueError, match="at least 2 examples per class"):
    ClassImages.from_directory(tmp_path, 8)
