"""A deterministic synthetic image-classification dataset: noisy, shifted copies of class patterns.

Each class owns a smooth random pattern (uniform noise on a 4x4 grid per
channel, upsampled bilinearly), mixed with one pattern shared by all
classes: ``separation`` in (0, 1] is the class-specific share. An example
of class k is that pattern, circularly shifted by up to ``max_shift``
pixels each way, with its contrast scaled by a factor in [0.6, 1] and its
brightness moved by up to +-0.1, plus Gaussian noise of std ``noise``,
clipped to [0, 1]. ``separation``, ``noise`` and ``max_shift`` set the
difficulty; with the defaults (0.25, 0.2, 2) a nearest-class-mean
classifier reaches 79-88% test accuracy (seeds 0-4), so a CNN has
something to learn.
Classes are balanced (label i % K, then shuffled).

Everything follows from ``seed``: the patterns (shared by both splits),
then the train and test examples from independent streams, so a seed gives
the same tensors on every run and machine (CPU generator). Normalisation
statistics are estimated from 512 extra examples of a third stream, so they
do not depend on the split sizes.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .dataset import DatasetInfo, ImageDataset, channel_stats, check_limit

_STREAMS = {"patterns": 0, "train": 1, "test": 2, "stats": 3}
_STATS_EXAMPLES = 512


def _generator(seed: int, stream: str) -> torch.Generator:
    # SeedSequence mixes (seed, stream) into well-separated seeds, unlike seed + small offsets.
    state = np.random.SeedSequence([seed, _STREAMS[stream]]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def class_patterns(num_classes: int, in_channels: int, image_size: int, seed: int, separation: float = 1.0) -> torch.Tensor:
    """The (num_classes, in_channels, image_size, image_size) patterns, values in [0, 1].

    Each is ``(1 - separation) * shared + separation * own``: one pattern all
    classes share plus the class's own, so ``separation`` sets how far apart
    the classes are.
    """
    coarse = torch.rand(num_classes + 1, in_channels, 4, 4, generator=_generator(seed, "patterns"))
    coarse = (1.0 - separation) * coarse[:1] + separation * coarse[1:]
    return F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)


def _examples(patterns: torch.Tensor, count: int, noise: float, max_shift: int, gen: torch.Generator):
    num_classes, channels, size, _ = patterns.shape
    labels = (torch.arange(count) % num_classes)[torch.randperm(count, generator=gen)]
    shifts = torch.randint(-max_shift, max_shift + 1, (2, count), generator=gen)
    contrast = torch.empty(count, 1, 1, 1).uniform_(0.6, 1.0, generator=gen)
    brightness = torch.empty(count, 1, 1, 1).uniform_(-0.1, 0.1, generator=gen)
    grid = torch.arange(size)
    rows = (grid - shifts[0, :, None]) % size  # (count, size): circular shift by indexing
    cols = (grid - shifts[1, :, None]) % size
    images = patterns[labels[:, None, None, None], torch.arange(channels)[None, :, None, None],
                      rows[:, None, :, None], cols[:, None, None, :]]
    images = 0.5 + contrast * (images - 0.5) + brightness
    images = images + noise * torch.randn(images.shape, generator=gen)
    return images.clamp_(0.0, 1.0), labels


def _check_positive(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def make_synthetic(train: bool = True, *, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                   train_size: int = 5000, test_size: int = 1000, noise: float = 0.2, max_shift: int = 2,
                   separation: float = 0.25, seed: int = 0, limit: Optional[int] = None) -> ImageDataset:
    """Images as float32 in [0, 1], shape (N, in_channels, image_size, image_size), with int64 labels."""
    _check_positive("num_classes", num_classes, 2)
    _check_positive("in_channels", in_channels)
    _check_positive("image_size", image_size, 4)
    _check_positive("train_size", train_size)
    _check_positive("test_size", test_size)
    _check_positive("max_shift", max_shift, 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not (isinstance(noise, (int, float)) and noise >= 0 and np.isfinite(noise)):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    if not (isinstance(separation, (int, float)) and 0 < separation <= 1):
        raise ValueError(f"separation must be in (0, 1], got {separation!r}")
    check_limit(limit)
    patterns = class_patterns(num_classes, in_channels, image_size, seed, separation)
    stats_images, _ = _examples(patterns, _STATS_EXAMPLES, noise, max_shift, _generator(seed, "stats"))
    mean, std = channel_stats(stats_images)
    info = DatasetInfo("synthetic", in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                       mean=mean, std=std, classes=tuple(f"class {k}" for k in range(num_classes)))
    split = "train" if train else "test"
    count = train_size if train else test_size
    images, labels = _examples(patterns, count, noise, max_shift, _generator(seed, split))
    return ImageDataset(images[:limit].contiguous(), labels[:limit].contiguous(), info)
