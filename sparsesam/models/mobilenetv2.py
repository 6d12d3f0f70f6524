"""CIFAR-style MobileNetV2 (stride-1 stem and first stages) with a width multiplier.

The paper's inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1 linear
projection, ReLU6, a residual when the block keeps shape), adapted to small
images as in the pruning papers' CIFAR code: the stem and the 24-channel
stage keep the resolution (two strides of the ImageNet net dropped), so
32x32 inputs reach the head at 4x4 (28x28 at 4x4 too, with global average
pooling). About 2.2 M parameters at width 1.0 with 10 classes.
"""
from __future__ import annotations

from torch import nn

from ._width import check_width, scaled

# (expansion, out_channels, blocks, stride of the first block) per stage.
_CONFIG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise (stride) -> 1x1 project, plus the input when shapes match."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = in_planes * expansion
        layers = []
        if expansion != 1:
            layers += [nn.Conv2d(in_planes, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and in_planes == out_planes

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images; ``width`` multiplies every layer's channels (1.0 = the paper's).

    The 1280-channel head scales with ``width`` only above 1.0, as in the paper.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        width = check_width(width)
        planes = scaled(32, width)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes),
                                  nn.ReLU6(inplace=True))
        blocks = []
        for expansion, channels, n, stride in _CONFIG:
            out_planes = scaled(channels, width)
            for i in range(n):
                blocks.append(InvertedResidual(planes, out_planes, expansion, stride if i == 0 else 1))
                planes = out_planes
        self.blocks = nn.Sequential(*blocks)
        head = scaled(1280, max(1.0, width))
        self.head = nn.Sequential(nn.Conv2d(planes, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU6(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x):
        out = self.pool(self.head(self.blocks(self.stem(x)))).flatten(1)
        return self.fc(out)
