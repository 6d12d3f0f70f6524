"""CIFAR-10-C (Hendrycks & Dietterich 2019) from the user's copy of its ``.npy`` files; never downloaded.

The release's layout (``CIFAR-10-C.tar`` from Zenodo, record 2535967)::

    CIFAR-10-C/<corruption>.npy   uint8, (50000, 32, 32, 3): severities 1..5, 10000 images each, in that order
    CIFAR-10-C/labels.npy         (50000,): the CIFAR-10 test labels, repeated for each severity

Image ``i`` of a severity is CIFAR-10's test image ``i`` corrupted, so the
first ``limit`` images of every severity match the first ``limit`` clean
test images. Files are memory-mapped (a corruption is 150 MB) and checked:
a file that is truncated, not a ``.npy`` array, or of the wrong shape or
dtype is a BadDatasetFileError naming it. Any number of images per
severity is accepted (the same in every file), so small copies work too.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np
import torch

from ..file_errors import BadDatasetFileError, describe
from .cifar10 import INFO
from .dataset import ImageDataset, check_limit

FOLDER = "CIFAR-10-C"
LABELS = "labels.npy"
SEVERITIES = 5
# The 15 corruptions of the benchmark, then the 4 held-out ones the release also ships.
BENCHMARK = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
             "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
             "jpeg_compression")
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
CORRUPTIONS = BENCHMARK + EXTRA


def find_cifar10c(root: str) -> str:
    """The folder holding ``labels.npy``: ``root`` itself or ``root/CIFAR-10-C``; FileNotFoundError if neither."""
    if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
        raise TypeError(f"root must be a folder path, got {root!r}")
    root = os.fspath(root)
    for folder in (root, os.path.join(root, FOLDER)):
        if os.path.isfile(os.path.join(folder, LABELS)):
            return folder
    raise FileNotFoundError(f"CIFAR-10-C not found: neither {root} nor {os.path.join(root, FOLDER)} holds {LABELS} "
                            f"(sparsesam never downloads: extract CIFAR-10-C.tar from Zenodo record 2535967 there)")


def available_corruptions(root: str) -> Tuple[str, ...]:
    """The corruptions of CORRUPTIONS whose ``.npy`` file is in the CIFAR-10-C folder under ``root``."""
    folder = find_cifar10c(root)
    return tuple(name for name in CORRUPTIONS if os.path.isfile(os.path.join(folder, f"{name}.npy")))


def _open(path: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:  # bad magic / header, pickled data, file shorter than its header says
        raise BadDatasetFileError(path, f"not a readable .npy array (truncated, corrupt or another kind of file): "
                                        f"{describe(error)}") from error


def _labels(folder: str) -> np.ndarray:
    path = os.path.join(folder, LABELS)
    labels = _open(path)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.shape[0] == 0 or labels.shape[0] % SEVERITIES:
        raise BadDatasetFileError(path, f"labels must be integers of shape ({SEVERITIES} x N,), "
                                        f"got {labels.dtype} {labels.shape}")
    return labels


def load_cifar10c(root: str, corruption: str, severity: int, limit: Optional[int] = None) -> ImageDataset:
    """The images of ``corruption`` at ``severity`` (1..5) as float32 (N, 3, 32, 32) in [0, 1], with labels.

    limit: keep only the first ``limit`` images (the first ``limit`` CIFAR-10 test images, corrupted).
    The result's ``info`` is CIFAR-10's (a CIFAR-10 model takes them as they are).
    """
    if corruption not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of CIFAR-10-C's {list(CORRUPTIONS)}, got {corruption!r}")
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= SEVERITIES:
        raise ValueError(f"severity must be an int in 1..{SEVERITIES}, got {severity!r}")
    check_limit(limit)
    folder = find_cifar10c(root)
    path = os.path.join(folder, f"{corruption}.npy")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CIFAR-10-C file {path} is missing")
    labels = _labels(folder)
    images = _open(path)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise BadDatasetFileError(path, f"images must be uint8 of shape (N, 32, 32, 3), got {images.dtype} "
                                        f"{images.shape}")
    if images.shape[0] != labels.shape[0]:
        raise BadDatasetFileError(path, f"{images.shape[0]} images but {labels.shape[0]} labels in {LABELS}")
    per_severity = images.shape[0] // SEVERITIES
    count = per_severity if limit is None else min(limit, per_severity)
    rows = slice((severity - 1) * per_severity, (severity - 1) * per_severity + count)
    targets = np.asarray(labels[rows], dtype=np.int64)
    if targets.size and (targets.min() < 0 or targets.max() >= INFO.num_classes):
        raise BadDatasetFileError(os.path.join(folder, LABELS),
                                  f"labels must be in [0, {INFO.num_classes}), got [{targets.min()}, {targets.max()}]")
    # HWC bytes -> CHW floats; np.array copies the memory-mapped rows (only those are read).
    batch = torch.from_numpy(np.array(images[rows])).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    return ImageDataset(batch, torch.from_numpy(targets), INFO)


__all__ = ["CORRUPTIONS", "BENCHMARK", "EXTRA", "find_cifar10c", "available_corruptions", "load_cifar10c"]
