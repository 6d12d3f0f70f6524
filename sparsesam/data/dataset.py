"""ImageDataset: images in [0, 1] with labels, and the DatasetInfo a model needs to match them.

Every loader of sparsesam.data returns images as float32 in [0, 1], shape
(N, C, H, W), and int64 labels. Normalisation is left out of the data on
purpose: the robustness suite perturbs and clips images in [0, 1], so the
per-channel ``info.mean`` / ``info.std`` go into the model instead
(``build_model(..., normalization=info.normalization)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch.utils.data import TensorDataset

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: input shape, classes, normalisation."""

    name: str
    in_channels: int
    num_classes: int
    image_size: int  # images are image_size x image_size
    mean: Tuple[float, ...]  # per channel, of the training images in [0, 1]
    std: Tuple[float, ...]
    classes: Tuple[str, ...]

    @property
    def normalization(self) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """``(mean, std)``, as ``build_model(normalization=...)`` takes it."""
        return self.mean, self.std


class ImageDataset(TensorDataset):
    """A TensorDataset of ``(image, label)`` pairs that also carries its ``info``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo) -> None:
        if images.dim() != 4 or images.dtype != torch.float32:
            raise ValueError(f"images must be float32 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be int64 of shape ({images.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")
        if images.shape[1] != info.in_channels or images.shape[2:] != (info.image_size, info.image_size):
            raise ValueError(f"images of shape {tuple(images.shape[1:])} do not match {info.name}'s "
                             f"{info.in_channels}x{info.image_size}x{info.image_size}")
        super().__init__(images, labels)
        self.info = info

    @property
    def images(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors[1]


def check_split(split: str) -> bool:
    """True for "train", False for "test"; a ValueError naming ``split`` otherwise."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split == "train"


def check_limit(limit) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or a positive int, got {limit!r}")


def channel_stats(images: torch.Tensor) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of (N, C, H, W) images, in double."""
    flat = images.transpose(0, 1).reshape(images.shape[1], -1).double()
    return tuple(flat.mean(1).tolist()), tuple(flat.std(1, unbiased=False).tolist())
