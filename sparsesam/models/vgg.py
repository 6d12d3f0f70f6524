"""CIFAR-style VGG-16 with batch normalisation and a width multiplier.

Thirteen 3x3 conv-bn-relu layers in five stages separated by 2x2 max-pools,
then global average pooling and one linear layer (the CIFAR variant: the
ImageNet net's 4096-wide classifier is dropped). About 14.7 M parameters at
width 1.0. The pools round up (``ceil_mode``), so 28x28 inputs go
28-14-7-4-2-1 where flooring would reach zero; 32x32 is unchanged (32-...-1).
"""
from __future__ import annotations

from torch import nn

from ._width import check_width, scaled

# Output channels of each conv layer; "M" is a 2x2 max-pool.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16BN(nn.Module):
    """VGG-16-bn for small images; ``width`` multiplies every layer's channels (1.0 = the paper's)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        width = check_width(width)
        layers, planes = [], in_channels
        for spec in _VGG16:
            if spec == "M":
                layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
                continue
            out_planes = scaled(spec, width)
            layers += [nn.Conv2d(planes, out_planes, 3, padding=1, bias=False), nn.BatchNorm2d(out_planes),
                       nn.ReLU(inplace=True)]
            planes = out_planes
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))
