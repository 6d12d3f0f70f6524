"""scikit-learn's handwritten digits (1,797 8x8 images, 10 classes): offline, shipped with sklearn.

The images are upsampled (bilinear) to ``image_size`` x ``image_size``,
32 by default: the CIFAR-style models downsample four or five times, and the
semantic transforms of the robustness suite (rotation, blur, translation)
mean little on 64 pixels. ``image_size=8`` keeps the original pixels.
Bilinear interpolation is a convex combination, so values stay in [0, 1].

There is no official split: of each class, every fifth image in stored
order (the 1st, 6th, ...) is the test set (364 images), the rest train
(1,433), so both splits are balanced and the split needs no random seed.
Normalisation statistics are those of the training split at the chosen size.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .._extras import require
from .dataset import DatasetInfo, ImageDataset, channel_stats, check_limit

CLASSES = tuple(str(d) for d in range(10))
TEST_EVERY = 5


def _sklearn_digits():
    bunch = require("sklearn.datasets", extra="data", purpose="the digits data set").load_digits()
    return bunch.images, bunch.target


def load_digits(train: bool = True, image_size: int = 32, limit: Optional[int] = None) -> ImageDataset:
    """Images as float32 in [0, 1], shape (N, 1, image_size, image_size), with int64 labels."""
    check_limit(limit)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8 (the original size), got {image_size!r}")
    raw, target = _sklearn_digits()
    images = torch.from_numpy(raw.astype(np.float32) / 16.0).unsqueeze(1)  # pixel values are 0..16
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    labels = torch.from_numpy(target.astype(np.int64))
    # Rank of each image among those of its class, in stored order.
    rank = torch.empty_like(labels)
    for digit in range(10):
        members = (labels == digit).nonzero().flatten()
        rank[members] = torch.arange(len(members))
    is_test = rank % TEST_EVERY == 0
    mean, std = channel_stats(images[~is_test])
    info = DatasetInfo("digits", in_channels=1, num_classes=10, image_size=image_size, mean=mean, std=std,
                       classes=CLASSES)
    keep = ~is_test if train else is_test
    images, labels = images[keep][:limit], labels[keep][:limit]
    return ImageDataset(images.contiguous(), labels, info)
