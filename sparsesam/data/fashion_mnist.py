"""Fashion-MNIST from local IDX files (never downloaded at run time).

The default folder is where Debian's ``dataset-fashion-mnist`` package puts
it; ``root`` (the CLI's ``--data-dir``, or the ``SPARSESAM_FASHION_MNIST``
environment variable) points anywhere else holding the four standard files,
gzipped or not. A file that is truncated, corrupt or of another kind is a
BadDatasetFileError (a ValueError) naming it.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..file_errors import BadDatasetFileError
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
    images_path = find_idx(root, f"{split}-images-idx3-ubyte")
    labels_path = find_idx(root, f"{split}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != "uint8" or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise BadDatasetFileError(images_path, f"expected uint8 images of shape (N, 28, 28), the IDX file holds "
                                               f"{images.dtype} of shape {images.shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise BadDatasetFileError(labels_path, f"expected integer labels of shape (N,), the IDX file holds "
                                               f"{labels.dtype} of shape {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise BadDatasetFileError(labels_path, f"{images.shape[0]} images but {labels.shape[0]} labels "
                                               f"(the images are in {images_path})")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise BadDatasetFileError(labels_path, f"labels must be in [0, {len(CLASSES)}), got "
                                               f"[{labels.min()}, {labels.max()}]")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255.0)
    y = torch.from_numpy(labels.astype("int64"))
    return ImageDataset(x, y, INFO)
