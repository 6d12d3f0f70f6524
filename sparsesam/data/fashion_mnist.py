"""Fashion-MNIST from local IDX files (never downloaded at run time).

The default folder is where Debian's ``dataset-fashion-mnist`` package puts
it; ``root`` (the CLI's ``--data-dir``, or the ``SPARSESAM_FASHION_MNIST``
environment variable) points anywhere else holding the four standard files,
gzipped or not.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .dataset import DatasetInfo, ImageDataset, check_limit
from .idx import find_idx, read_idx

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Mean and population std of the 60,000 training images in [0, 1].
INFO = DatasetInfo("fashion_mnist", in_channels=1, num_classes=10, image_size=28, mean=(0.2860,), std=(0.3530,),
                   classes=CLASSES)


def load_fashion_mnist(train: bool = True, root: Optional[str] = None, limit: Optional[int] = None) -> ImageDataset:
    """Images as float32 in [0, 1], shape (N, 1, 28, 28), with int64 labels.

    limit: keep only the first ``limit`` examples (quick runs and tests).
    """
    check_limit(limit)
    root = root or os.environ.get("SPARSESAM_FASHION_MNIST", DEBIAN_DIR)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Fashion-MNIST folder {root} does not exist: install Debian's dataset-fashion-mnist "
            f"(apt-get install dataset-fashion-mnist) or pass the folder holding the IDX files"
        )
    split = "train" if train else "t10k"
    images = read_idx(find_idx(root, f"{split}-images-idx3-ubyte"))
    labels = read_idx(find_idx(root, f"{split}-labels-idx1-ubyte"))
    if images.dtype != "uint8":
        raise ValueError(f"{root}: images must be uint8 pixels, the IDX file holds {images.dtype}")
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1:
        raise ValueError(f"{root}: expected (N, 28, 28) images and (N,) labels, got {images.shape} and {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise ValueError(f"{root}: labels must be in [0, {len(CLASSES)}), got [{labels.min()}, {labels.max()}]")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255.0)
    y = torch.from_numpy(labels.astype("int64"))
    return ImageDataset(x, y, INFO)
