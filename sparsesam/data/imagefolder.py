"""Your own images: a folder in torchvision's ImageFolder layout, one sub-folder per class and split.

Layout (as ImageNet's ``train`` / ``val`` are shipped)::

    PATH/train/<class>/<image>.png      PATH/test/<class>/<image>.png   (or PATH/val/...)

Images are read by ``torchvision.datasets.ImageFolder`` (the ``[vision]``
extra), converted to RGB, and, when ``image_size`` is given, resized so the
shorter side is ``image_size`` and centre-cropped to a square (torchvision's
evaluation transform). Without ``image_size`` every image must already be
square and of one size. Like every loader of sparsesam.data the split is
held in memory as float32 in [0, 1] (4 x 3 x size^2 bytes per image:
CIFAR-sized folders fit, ImageNet does not).

``limit`` keeps the first ``limit`` images taking the classes in turn
(ImageFolder lists a whole class before the next, so a plain prefix would
hold one class only). The normalisation mean / std are those of the
training split (read for it when only the test split is asked for), so
both splits share one ``info``. An unreadable image is a
BadDatasetFileError naming the file.
"""
from __future__ import annotations

import functools
import os
from typing import List, Optional, Tuple

import torch

from .._extras import require
from ..file_errors import BadDatasetFileError, describe
from .dataset import DatasetInfo, ImageDataset, channel_stats, check_limit

PREFIX = "imagefolder:"
TRAIN_FOLDER = "train"
TEST_FOLDERS = ("test", "val")  # the first present is the test split


def split_folder(root: str, train: bool) -> str:
    """``root/train``, or ``root/test`` (else ``root/val``); FileNotFoundError naming what is missing."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    names = (TRAIN_FOLDER,) if train else TEST_FOLDERS
    for name in names:
        folder = os.path.join(root, name)
        if os.path.isdir(folder):
            return folder
    raise FileNotFoundError(f"image folder {root} has no {' or '.join(names)} sub-folder: the layout is "
                            f"{root}/{TRAIN_FOLDER}/<class>/<image> and {root}/test/<class>/<image>")


def _round_robin(samples: List[Tuple[str, int]], limit: Optional[int]) -> List[Tuple[str, int]]:
    """The first ``limit`` samples taking the classes in turn (all of them when ``limit`` is None)."""
    if limit is None or limit >= len(samples):
        return list(samples)
    rank = {}
    keyed = []
    for index, (path, label) in enumerate(samples):
        keyed.append((rank.get(label, 0), label, index))
        rank[label] = rank.get(label, 0) + 1
    return [samples[index] for _, _, index in sorted(keyed)[:limit]]


def _read_split(folder: str, image_size: Optional[int], limit: Optional[int]):
    datasets = require("torchvision.datasets", extra="vision", purpose="image folders")
    transforms = require("torchvision.transforms", extra="vision", purpose="image folders")
    steps = [] if image_size is None else [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    try:
        found = datasets.ImageFolder(folder, transform=transforms.Compose(steps + [transforms.ToTensor()]))
    except (FileNotFoundError, RuntimeError) as error:  # no class folder, or no image in them
        raise FileNotFoundError(f"image folder {folder}: {describe(error)}") from error
    images, labels = [], []
    for path, label in _round_robin(found.samples, limit):
        try:
            image = found.transform(found.loader(path))
        except (OSError, ValueError, SyntaxError) as error:  # PIL's errors for truncated or foreign files
            raise BadDatasetFileError(path, f"not a readable image: {describe(error)}") from error
        size = tuple(image.shape[1:])
        expected = tuple(images[0].shape[1:]) if images else None
        if (expected is None and size[0] != size[1]) or (expected is not None and size != expected):
            raise BadDatasetFileError(path, f"image of size {size} where {expected or 'a square'} was expected: "
                                            f"pass an image size to resize and centre-crop every image")
        images.append(image)
        labels.append(label)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), tuple(found.classes)


@functools.lru_cache(maxsize=4)
def _training_stats(root: str, image_size: Optional[int], limit: Optional[int], modified: int):
    # Cached: load_dataset reads the test split after the training one, and the test split's
    # info needs the training split's statistics. ``modified`` (the training folder's mtime)
    # keys the cache, so a folder rewritten in place is read again.
    images, _, classes = _read_split(split_folder(root, True), image_size, limit)
    mean, std = channel_stats(images)
    return mean, std, classes, images.shape[-1]


def load_imagefolder(root: str, train: bool = True, image_size: Optional[int] = None,
                     limit: Optional[int] = None) -> ImageDataset:
    """One split of the image folder ``root`` as float32 RGB images in [0, 1] with int64 labels."""
    if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
        raise TypeError(f"root must be a folder path, got {root!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be None or a positive int, got {image_size!r}")
    check_limit(limit)
    root = os.path.abspath(os.fspath(root))
    folder = split_folder(root, train)
    modified = os.stat(split_folder(root, True)).st_mtime_ns
    mean, std, classes, size = _training_stats(root, image_size, limit, modified)
    images, labels, split_classes = _read_split(folder, image_size, limit)
    if split_classes != classes:
        raise ValueError(f"image folder {root}: the test split's classes {list(split_classes)} differ from the "
                         f"training split's {list(classes)}")
    if images.shape[-1] != size:
        raise BadDatasetFileError(folder, f"images of size {images.shape[-1]} but the training split's are {size}: "
                                          f"pass an image size to resize both")
    info = DatasetInfo(PREFIX + root, in_channels=3, num_classes=len(classes), image_size=size, mean=mean, std=std,
                       classes=classes)
    return ImageDataset(images, labels, info)


__all__ = ["PREFIX", "load_imagefolder", "split_folder"]
