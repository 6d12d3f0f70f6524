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


_DIGITS_CACHE = {}


def digits(n_train: int = 1200):
    """sklearn's 8x8 digits as (N, 1, 8, 8) float32 in [0, 1]: (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images).float().div(16.0).unsqueeze(1)
    y = torch.from_numpy(data.target).long()
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.net(x)


def trained_digits_mlp() -> nn.Module:
    """An undefended MLP trained for 100 full-batch Adam steps (~0.4 s on one core; ~93% test accuracy).

    Cached: tests that change it must deep-copy it first.
    """
    if "mlp" not in _DIGITS_CACHE:
        torch.manual_seed(0)
        model = DigitsMLP()
        x, y, _, _ = digits()
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
        for _ in range(100):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        _DIGITS_CACHE["mlp"] = model.eval()
    return _DIGITS_CACHE["mlp"]


class ConstantClassifier(nn.Module):
    """Always the same logits, whatever the input: perfectly invariant."""

    def __init__(self, logits) -> None:
        super().__init__()
        self.register_buffer("logits", torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


class NoiseClassifier(nn.Module):
    """Fresh random logits on every call (seeded): no relation to the input at all."""

    def __init__(self, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x):
        return 3.0 * torch.randn(x.shape[0], self.num_classes, generator=self.generator)


class SignClassifier(nn.Module):
    """Class 0 if the sum of (x - centre) is positive, else class 1: Gaussian noise
    around ``centre`` splits the two classes 50/50 (a tie for randomized smoothing)."""

    def __init__(self, centre: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("centre", centre)

    def forward(self, x):
        s = (x - self.centre).flatten(1).sum(dim=1)
        return torch.stack([s, -s], dim=1)
