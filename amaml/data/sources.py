"""Images grouped by class: the one data source every episode sampler reads.

A :class:`ClassImages` is a uint8 array ``[classes, examples, H, W, C]`` (the same
number of examples in every class, so that a sampler can index it as one dense
array, on the host or on a device) plus optional class names.

>>> import numpy as np
>>> src = ClassImages.from_arrays(np.zeros((3, 4, 8, 8), np.uint8))  # channel axis added
>>> src.num_classes, src.examples_per_class, src.image_shape
(3, 4, (8, 8, 1))
>>> src.subset([2, 0]).num_classes
2
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclasses.dataclass(frozen=True, eq=False)
class ClassImages:
  """Images grouped by class: ``images`` uint8 ``[classes, examples, H, W, C]``.

  Attributes:
    images: uint8 array ``[classes, examples, height, width, channels]``; at least
      1 class and 2 examples per class (a task needs a support and a query example).
    class_names: optional, one name per class.

  Build one with :meth:`from_arrays` or :meth:`from_directory`; the constructor
  only validates (raising ``ValueError``/``TypeError`` that say what to change).

  >>> import numpy as np
  >>> ClassImages(np.zeros((2, 1, 4, 4, 1), np.uint8))
  Traceback (most recent call last):
  ...
  ValueError: ClassImages needs at least 2 examples per class (one for the support set, one for the query set), got 1; drop such classes or gather more images
  """

  images: np.ndarray
  class_names: tuple[str, ...] | None = None

  def __post_init__(self):
    x = self.images
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(
        f"ClassImages.images must be an array, got {type(x).__name__}; "
        "pass np.asarray(images, np.uint8)"
      )
    if x.ndim != 5:
      hint = (
        " (add a channel axis: images[..., None], or use ClassImages.from_arrays)"
        if x.ndim == 4
        else ""
      )
      raise ValueError(
        f"ClassImages.images must be 5-D [classes, examples, H, W, C], got shape "
        f"{tuple(x.shape)}{hint}"
      )
    if x.dtype != np.uint8:
      raise TypeError(
        f"ClassImages.images must be uint8 (0..255), got {x.dtype}; convert floats in [0, 1] "
        "with (x * 255).round().astype(np.uint8) and bools with x.astype(np.uint8) * 255"
      )
    if x.shape[0] < 1:
      raise ValueError("ClassImages is empty (0 classes); check the source path or the split")
    if x.shape[1] < 2:
      raise ValueError(
        f"ClassImages needs at least 2 examples per class (one for the support set, one for "
        f"the query set), got {x.shape[1]}; drop such classes or gather more images"
      )
    if min(x.shape[2:]) < 1:
      raise ValueError(f"ClassImages.images has an empty image axis: shape {tuple(x.shape)}")
    if self.class_names is not None:
      names = tuple(str(n) for n in self.class_names)
      if len(names) != x.shape[0]:
        raise ValueError(
          f"got {len(names)} class names for {x.shape[0]} classes; pass one name "
          "per class or class_names=None"
        )
      object.__setattr__(self, "class_names", names)

  @property
  def num_classes(self) -> int:
    return int(self.images.shape[0])

  @property
  def examples_per_class(self) -> int:
    return int(self.images.shape[1])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(height, width, channels)``."""
    return tuple(int(d) for d in self.images.shape[2:])

  def __len__(self) -> int:
    return self.num_classes

  def __repr__(self) -> str:
    names = "" if self.class_names is None else f", e.g. {self.class_names[0]!r}"
    return (
      f"ClassImages({self.num_classes} classes x {self.examples_per_class} examples of "
      f"{self.image_shape}{names})"
    )

  def subset(self, class_indices: Sequence[int]) -> ClassImages:
    """The classes ``class_indices`` (in that order), as a new :class:`ClassImages`."""
    idx = np.asarray(class_indices, np.int64).reshape(-1)
    if idx.size and (idx.min() < -self.num_classes or idx.max() >= self.num_classes):
      raise IndexError(f"class index out of range for {self.num_classes} classes")
    names = None if self.class_names is None else tuple(self.class_names[i] for i in idx)
    return ClassImages(np.ascontiguousarray(self.images[idx]), names)

  @classmethod
  def from_arrays(cls, images, class_names: Sequence[str] | None = None) -> ClassImages:
    """From a uint8 array ``[classes, examples, H, W]`` or ``[classes, examples, H, W, C]``.

    A 4-D array is taken as single-channel (a channel axis is appended).

    >>> import numpy as np
    >>> ClassImages.from_arrays(np.zeros((2, 5, 3, 3), np.float32))
    Traceback (most recent call last):
    ...
    TypeError: ClassImages.images must be uint8 (0..255), got float32; convert floats in [0, 1] with (x * 255).round().astype(np.uint8) and bools with x.astype(np.uint8) * 255
    """
    x = np.asarray(images)
    if x.ndim == 4:
      x = x[..., None]
    return cls(x, None if class_names is None else tuple(class_names))

  @classmethod
  def from_directory(
    cls,
    root: str | os.PathLike,
    image_size: int | tuple[int, int],
    *,
    channels: int = 3,
    examples_per_class: int | None = None,
    resample: str = "bilinear",
  ) -> ClassImages:
    """From a folder with one sub-folder of image files per class (e.g. miniImageNet).

    Class names are the sub-folder names, sorted; examples are a class's image files
    sorted by name, each converted to ``channels`` (1: grey, 3: RGB) and resized with
    Pillow to ``image_size`` (``int`` for square, or ``(height, width)``).
    Every class must have the same number of images unless ``examples_per_class``
    is given, which keeps the first that many (sorted by file name).
    ``resample`` is a Pillow filter name: ``nearest``, ``box``, ``bilinear``,
    ``hamming``, ``bicubic`` or ``lanczos``.

    >>> import tempfile, pathlib, numpy as np
    >>> from PIL import Image
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for c in ("cat", "dog"):
    ...   (root / c).mkdir()
    ...   for i in range(3):
    ...     Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    >>> src = ClassImages.from_directory(root, 6)
    >>> src.images.shape, src.class_names
    ((2, 3, 6, 6, 3), ('cat', 'dog'))
    """
    root = Path(root)
    if not root.is_dir():
      raise FileNotFoundError(
        f"no directory {root}: pass a folder holding one sub-folder of images per class"
      )
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
      raise ValueError(
        f"{root} has no class sub-folders: put each class's images in its own "
        "sub-folder, e.g. root/n01532829/*.jpg"
      )
    files = {
      d.name: sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
      for d in class_dirs
    }
    return cls.from_files(
      files, image_size, channels=channels, examples_per_class=examples_per_class, resample=resample
    )

  @classmethod
  def from_files(
    cls,
    files: Mapping[str, Sequence[str | os.PathLike]],
    image_size: int | tuple[int, int],
    *,
    channels: int = 3,
    examples_per_class: int | None = None,
    resample: str = "bilinear",
  ) -> ClassImages:
    """From image files listed per class, ``{class name: [file, ...]}`` (classes in the
    mapping's order, examples in the list's order); read and resized as in
    :meth:`from_directory`. For layouts other than a folder per class, such as split
    files that list ``filename,label``."""
    from PIL import Image

    if channels not in (1, 3):
      raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if h < 1 or w < 1:
      raise ValueError(f"image_size must be positive, got {image_size}")
    filters = {
      "nearest": Image.NEAREST,
      "box": Image.BOX,
      "bilinear": Image.BILINEAR,
      "hamming": Image.HAMMING,
      "bicubic": Image.BICUBIC,
      "lanczos": Image.LANCZOS,
    }
    if resample not in filters:
      raise ValueError(f"unknown resample filter {resample!r}; use one of {sorted(filters)}")
    if not files:
      raise ValueError("no classes given: pass at least one class with its image files")
    counts = {name: len(f) for name, f in files.items()}
    if examples_per_class is None:
      if len(set(counts.values())) > 1:
        lo = min(counts, key=counts.get)
        raise ValueError(
          f"classes have different numbers of images ({min(counts.values())} in {lo!r} up to "
          f"{max(counts.values())}); pass examples_per_class=N to keep the first N of each"
        )
      examples_per_class = next(iter(counts.values()))
    short = {n: c for n, c in counts.items() if c < examples_per_class}
    if short:
      raise ValueError(
        f"{len(short)} class folder(s) have fewer than {examples_per_class} images, "
        f"e.g. {next(iter(short.items()))}; lower examples_per_class or remove them"
      )
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(files), examples_per_class, h, w, channels), np.uint8)
    for c, name in enumerate(files):
      for e, f in enumerate(list(files[name])[:examples_per_class]):
        with Image.open(f) as im:
          im = im.convert(mode)
          if im.size != (w, h):
            im = im.resize((w, h), filters[resample])
          out[c, e] = np.asarray(im, np.uint8).reshape(h, w, channels)
    return cls(out, tuple(files))
