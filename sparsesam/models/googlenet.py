"""CIFAR-style GoogLeNet (Inception v1 with a 3x3 stem and no early pooling) with a width multiplier.

The layout of the CIFAR GoogLeNet used by the pruning papers (kuangliu's
pytorch-cifar): a 3x3 stem of 192 channels, Inception blocks 3a-3b, max-pool,
4a-4e, max-pool, 5a-5b, global average pooling, one linear layer; the 5x5
branch is two 3x3 convolutions. About 6.2 M parameters at width 1.0.
Global average pooling makes it work for any input of at least 4x4 pixels
(28x28 gives 7x7 maps in stage 5, 32x32 gives 8x8).
"""
from __future__ import annotations

import torch
from torch import nn

from ._width import check_width, scaled


def _conv_bn_relu(cin: int, cout: int, kernel_size: int) -> list:
    return [nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Inception(nn.Module):
    """Four parallel branches concatenated on channels: 1x1 | 1x1-3x3 | 1x1-3x3-3x3 | maxpool-1x1."""

    def __init__(self, in_planes: int, n1x1: int, n3x3red: int, n3x3: int, n5x5red: int, n5x5: int, pool_planes: int) -> None:
        super().__init__()
        self.b1 = nn.Sequential(*_conv_bn_relu(in_planes, n1x1, 1))
        self.b2 = nn.Sequential(*_conv_bn_relu(in_planes, n3x3red, 1), *_conv_bn_relu(n3x3red, n3x3, 3))
        self.b3 = nn.Sequential(*_conv_bn_relu(in_planes, n5x5red, 1), *_conv_bn_relu(n5x5red, n5x5, 3),
                                *_conv_bn_relu(n5x5, n5x5, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), *_conv_bn_relu(in_planes, pool_planes, 1))
        self.out_planes = n1x1 + n3x3 + n5x5 + pool_planes

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


# (n1x1, n3x3red, n3x3, n5x5red, n5x5, pool_planes) of each Inception block; "M" is a 3x3/2 max-pool.
_CONFIG = (
    (64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), "M",
    (192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64),
    (112, 144, 288, 32, 64, 64), (256, 160, 320, 32, 128, 128), "M",
    (256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128),
)


class GoogLeNet(nn.Module):
    """GoogLeNet for small images; ``width`` multiplies every layer's channels (1.0 = the paper's)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        width = check_width(width)
        stem = scaled(192, width)
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, stem, 3))
        blocks, planes = [], stem
        for spec in _CONFIG:
            if spec == "M":
                blocks.append(nn.MaxPool2d(3, stride=2, padding=1))
                continue
            block = Inception(planes, *(scaled(c, width) for c in spec))
            blocks.append(block)
            planes = block.out_planes
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x):
        out = self.pool(self.blocks(self.stem(x))).flatten(1)
        return self.fc(out)
