"""Gaussian noise augmentation of training batches, as Cohen et al. train the classifiers they certify."""
from __future__ import annotations

import math

import torch
from torch.utils.data import default_collate


class GaussianNoiseCollate:
    """A DataLoader ``collate_fn``: the default collation, then ``x + sigma * N(0, I)`` on the images.

    locuslab/smoothing ``code/train.py`` adds ``torch.randn_like(inputs) *
    noise_sd`` to every training batch; this is the same, in the input
    space the models take (pixels in [0, 1], normalisation inside the model).
    The noise comes from torch's global generator, which sparsesam's
    checkpoints capture, so a resumed run draws the same noise. With
    ``num_workers > 0`` the draws happen in the workers instead (not
    reproducible across worker counts): the study uses ``num_workers=0``.
    """

    def __init__(self, sigma: float) -> None:
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        self.sigma = float(sigma)

    def __call__(self, batch):
        x, y = default_collate(batch)
        return x + torch.randn_like(x) * self.sigma, y

    def __repr__(self) -> str:
        return f"GaussianNoiseCollate(sigma={self.sigma:g})"
