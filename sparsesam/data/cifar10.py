"""CIFAR-10 from a local copy in torchvision's format (``cifar-10-batches-py``); never downloaded.

``root`` may be the folder holding ``cifar-10-batches-py`` (torchvision's
``root``) or that folder itself. Default: the ``SPARSESAM_CIFAR10``
environment variable, else ``./data``. The batches are pickles; they are
read with an unpickler that only accepts the few numpy globals the format
needs, so a foreign pickle cannot run code. A batch that is truncated,
corrupt, a pickle of something else or of the wrong shapes is a one-line
BadDatasetFileError (a ValueError) naming the file.
"""
from __future__ import annotations

import os
import pickle
from typing import Optional

import numpy as np
import torch

from ..file_errors import BadDatasetFileError, describe
from .dataset import DatasetInfo, ImageDataset, check_limit

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel mean and population std of the 50,000 training images in [0, 1].
INFO = DatasetInfo("cifar10", in_channels=3, num_classes=10, image_size=32, mean=(0.4914, 0.4822, 0.4465),
                   std=(0.2470, 0.2435, 0.2616), classes=CLASSES)

# Everything a CIFAR batch pickle refers to: numpy arrays (numpy 1 and 2 module names) and, in
# pickles written by Python 3 with protocol 2, bytes via _codecs.encode.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"a CIFAR-10 batch may not refer to {module}.{name}")
        return super().find_class(module, name)


# What unpickling untrusted bytes raises: a cut stream (EOFError, "pickle data was truncated"), an
# unknown opcode or a refused global (UnpicklingError), and numpy's reconstruction of an array from
# wrong arguments (ValueError, TypeError, ...).
_UNPICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                    ImportError, OverflowError, UnicodeDecodeError)


def _load_pickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            # latin1: the official batches were pickled by Python 2 (byte strings become str keys).
            batch = _ArrayUnpickler(f, encoding="latin1").load()
    except _UNPICKLE_ERRORS as error:
        raise BadDatasetFileError(path, f"not a readable CIFAR-10 batch (truncated, corrupt or another kind of "
                                        f"file): {describe(error)}") from error
    if not isinstance(batch, dict):
        raise BadDatasetFileError(path, f"not a CIFAR-10 batch (a pickled dict), got {type(batch).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}


def find_cifar10(root: Optional[str] = None) -> str:
    """The ``cifar-10-batches-py`` folder under (or at) ``root``; FileNotFoundError naming the path if absent."""
    root = root or os.environ.get("SPARSESAM_CIFAR10", "data")
    for folder in (os.path.join(root, FOLDER), root):
        if os.path.isfile(os.path.join(folder, TEST_BATCHES[0])) or os.path.isfile(os.path.join(folder, TRAIN_BATCHES[0])):
            return folder
    raise FileNotFoundError(
        f"CIFAR-10 not found: {os.path.abspath(os.path.join(root, FOLDER))} does not exist or holds no batches. "
        f"sparsesam never downloads; put torchvision's {FOLDER} folder there (e.g. fetched elsewhere with "
        f"torchvision.datasets.CIFAR10(root, download=True)) or pass its parent as data_dir / --data-dir / SPARSESAM_CIFAR10"
    )


def _read_batch(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CIFAR-10 batch {path} is missing")
    batch = _load_pickle(path)
    if "data" not in batch or "labels" not in batch:
        raise BadDatasetFileError(path, f"a CIFAR-10 batch needs 'data' and 'labels', found {sorted(map(str, batch))}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise BadDatasetFileError(path, f"'data' must be uint8 of shape (N, 3072), got {got}")
    try:
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as error:
        raise BadDatasetFileError(path, f"'labels' must be integers, got {describe(error)}") from error
    if labels.shape != (data.shape[0],):
        raise BadDatasetFileError(path, f"{data.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise BadDatasetFileError(path, f"labels must be in [0, {len(CLASSES)}), got [{labels.min()}, {labels.max()}]")
    return data, labels


def load_cifar10(train: bool = True, root: Optional[str] = None, limit: Optional[int] = None) -> ImageDataset:
    """Images as float32 in [0, 1], shape (N, 3, 32, 32), with int64 labels.

    limit: keep only the first ``limit`` examples (later batch files are then not read).
    """
    check_limit(limit)
    folder = find_cifar10(root)
    data, labels = [], []
    for name in TRAIN_BATCHES if train else TEST_BATCHES:
        if limit is not None and sum(len(y) for y in labels) >= limit:
            break
        x, y = _read_batch(os.path.join(folder, name))
        data.append(x)
        labels.append(y)
    images = np.concatenate(data)[:limit].reshape(-1, 3, 32, 32)  # rows are R, G, B planes of 32x32
    targets = np.concatenate(labels)[:limit]
    return ImageDataset(torch.from_numpy(images).float().div_(255.0), torch.from_numpy(targets), INFO)
