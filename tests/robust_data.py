"""Deterministic test images and small models for the sparsesam.robust tests."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from sparsesam.robust import _image_ops as ops


def natural_images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, channels, size, size) images in [0, 1] with natural-image statistics:
    a 1/f-like plasma background per channel plus two flat-coloured ellipses (edges)."""
    g = torch.Generator().manual_seed(seed)
    mapsize = ops.next_power_of_two(size)
    background = ops.plasma_fractal(n * channels, mapsize, 2.0, g)[:, :size, :size].reshape(n, channels, size, size)
    x = 0.2 + 0.5 * background.float()
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    for _ in range(2):
        centre = torch.rand(n, 2, generator=g) * size * 0.6 + size * 0.2
        axes = torch.rand(n, 2, generator=g) * size * 0.25 + size * 0.1
        colour = torch.rand(n, channels, generator=g)
        inside = (((ys - centre[:, 0, None, None]) / axes[:, 0, None, None]) ** 2
                  + ((xs - centre[:, 1, None, None]) / axes[:, 1, None, None]) ** 2) <= 1
        x = torch.where(inside.unsqueeze(1), colour[:, :, None, None], x)
    return x.clamp(0, 1)
