"""A small CNN for 28x28 / 32x32 images: the demo's and the tests' model."""
from __future__ import annotations

from torch import nn


class SmallCNN(nn.Module):
    """conv-bn-relu x2 -> pool -> conv-bn-relu x2 -> pool -> linear-relu -> linear.

    ``width`` scales every layer; any input channels and number of classes.
    About 0.4 M parameters at width 32 for 28x28 inputs.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, image_size: int = 28) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {image_size}")

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
        )
        feature_size = 2 * width * (image_size // 4) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(feature_size, 4 * width), nn.ReLU(inplace=True), nn.Linear(4 * width, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))
