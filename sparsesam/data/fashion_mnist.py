"""Fashion-MNIST from local IDX files (never downloaded at run time).

The default folder is where Debian's ``dataset-fashion-mnist`` package puts
it; ``root`` (the CLI's ``--data-dir``) points anywhere else with the four
standard files.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch.utils.data import TensorDataset

from .idx import find_idx, read_idx

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def load_fashion_mnist(train: bool = True, root: Optional[str] = None, limit: Optional[int] = None) -> TensorDataset:
    """Images as float32 in [0, 1], shape (N, 1, 28, 28), with int64 labels.

    limit: keep only the first ``limit`` examples (quick runs and tests).
    """
    root = root or os.environ.get("SPARSESAM_FASHION_MNIST", DEBIAN_DIR)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Fashion-MNIST folder {root} does not exist: install Debian's dataset-fashion-mnist "
            f"(apt-get install dataset-fashion-mnist) or pass the folder holding the IDX files"
        )
    split = "train" if train else "t10k"
    images = read_idx(find_idx(root, f"{split}-images-idx3-ubyte"))
    labels = read_idx(find_idx(root, f"{split}-labels-idx1-ubyte"))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255.0)
    y = torch.from_numpy(labels.astype("int64"))
    return TensorDataset(x, y)
