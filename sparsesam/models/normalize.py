"""Input normalisation as the model's first layer, so data (and attacks on it) stay in [0, 1].

sparsesam's datasets yield images in [0, 1]; the robustness suite perturbs
them there (an L-inf ball of 8/255 means pixels, clipping to [0, 1] means
valid images). Normalisation therefore lives inside the model, where
gradients flow through it, instead of in a data transform.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean and std are buffers (saved, moved with the model)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() == 0 or mean_t.shape != std_t.shape:
            raise ValueError(f"mean and std must be non-empty and of the same length, got {list(mean_t.shape)} and "
                             f"{list(std_t.shape)}")
        if not torch.isfinite(mean_t).all() or not torch.isfinite(std_t).all() or not (std_t > 0).all():
            raise ValueError(f"std must be positive and mean, std finite, got mean={mean_t.tolist()} std={std_t.tolist()}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"x must be (N, {self.mean.shape[1]}, H, W), got {tuple(x.shape)}")
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def with_normalization(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Sequential:
    """``nn.Sequential(normalize=Normalize(mean, std), net=model)``: takes [0, 1] images."""
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=model))
