"""Procedural frost textures calibrated to the frost photographs of ImageNet-C / CIFAR-10-C.

Hendrycks' ``frost`` (``make_cifar_c.py``) blends the image with a random
32x32 crop of one of the frost photographs shipped beside the script: it draws
``idx = np.random.randint(5)`` (so frost1.png .. frost5.jpg; frost6.jpg is
never used), reads the photo with cv2.imread, shrinks it with
``cv2.resize(fx=0.2, fy=0.2)`` (bilinear at source position 5 i + 2, i.e. every
fifth pixel) and crops at a uniformly random corner. sparsesam does not ship
those photographs. It draws a stand-in texture, deterministically from a seed,
whose statistics are calibrated to crops of the real photographs.

Calibration (measured once on the photographs of github.com/hendrycks/robustness,
``ImageNet-C/create_c``, 3000 random crops per photo as make_cifar_c.py takes
them, values in [0, 1]; ``crop_statistics`` and ``spectrum_slope`` below are the
measuring code). For every photo, ``_PHOTO_PROFILES`` records its mean R, G, B,
the standard deviation of a crop's mean grey level between crops, the mean
within-crop standard deviation of the grey level, and the slope of the radially
averaged power spectrum of the grey crops (log power against log frequency,
1 to 15 cycles per 32 pixels). Pooled over the five photos, as the corruption
draws them, the crops have mean 0.636, standard deviation 0.193, within-crop
standard deviation 0.113 (over pixels and channels), crop means spread by
0.152, R : G : B = 0.81 : 0.93 : 1, and a spectrum slope of -1.18. The
textures here reproduce all of these (tests/robust/test_corruptions.py checks each
within a tolerance).

A texture is made the way the statistics are defined:

* a photo profile p, drawn uniformly from the five (as ``randint(5)``);
* a grey structure G with zero mean and unit standard deviation, a mix of a
  cloudy diamond-square plasma fractal (the ``fog`` corruption's, spectrum
  slope about -4: frost films are uneven) and ice needles (sparse random seeds
  smeared along three random directions with the motion-blur kernel, slope
  about -0.75: the dendritic crystals). The mixing weight sets the spectrum
  slope and is chosen per profile to give the photo's slope;
* the texture ``mean_rgb[p] + level_std[p] * N(0, 1) + within_std[p] * G``,
  clipped to [0, 1]; grey (1-channel) images get its OpenCV grey level.

It is a stand-in where the photographs cannot be had: its first and second
moments, colour and spectrum match the photographs' crops, but the crystal
shapes are not the photographed ones, so frost accuracies compare models
evaluated here, not numbers measured on the released CIFAR-10-C files.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from . import _image_ops as ops

Tensor = torch.Tensor

# Per photo (frost1.png, frost2.png, frost3.png, frost4.jpg, frost5.jpg):
# mean R, G, B of its crops; std of the crop grey mean; mean within-crop grey std;
# spectrum slope of its grey crops; plasma weight of G that gives that slope.
_PHOTO_PROFILES = (
    ((0.2997, 0.5802, 0.6455), 0.0427, 0.0564, -1.59, 0.48),
    ((0.7776, 0.7949, 0.8314), 0.0348, 0.0708, -1.19, 0.30),
    ((0.7777, 0.7951, 0.8316), 0.0351, 0.0708, -1.19, 0.30),
    ((0.5637, 0.6219, 0.6718), 0.0395, 0.1020, -0.91, 0.12),
    ((0.4036, 0.4481, 0.4943), 0.0630, 0.1342, -1.21, 0.30),
)
_NEEDLE_DENSITY = 0.06
_NEEDLE_DIRECTIONS = 3
_GREY = (0.299, 0.587, 0.114)   # cv2.COLOR_RGB2GRAY


def _standardize(x: Tensor) -> Tensor:
    """Zero mean, unit standard deviation over each image's pixels."""
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    return x / x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


def _grey_structure(n: int, height: int, width: int, cloud_weight: Tensor, generator: torch.Generator) -> Tensor:
    """(n, 1, H, W) zero-mean unit-std frost structure; cloud_weight (n,) sets the spectrum slope."""
    size = ops.next_power_of_two(max(height, width))
    clouds = ops.plasma_fractal(n, size, wibbledecay=2.0, generator=generator)[:, :height, :width].unsqueeze(1)
    # Needles: sparse seeds of random brightness, streaked along a random
    # direction per layer; longer streaks on bigger images.
    radius = max(2, round(height / 8))
    needles = torch.zeros(n, 1, height, width, dtype=torch.float64)
    for _ in range(_NEEDLE_DIRECTIONS):
        seeds = torch.rand(n, 1, height, width, generator=generator, dtype=torch.float64) < _NEEDLE_DENSITY
        seeds = seeds * torch.rand(n, 1, height, width, generator=generator, dtype=torch.float64)
        angles = ops.uniform((n,), 0.0, 360.0, generator)
        needles += ops.motion_blur(seeds, radius, radius / 2, angles)
    w = cloud_weight.reshape(n, 1, 1, 1)
    return _standardize(w * _standardize(clouds) + (1 - w) * _standardize(needles))


def frost_texture(n: int, channels: int, height: int, width: int, generator: torch.Generator,
                  dtype=torch.float32) -> Tensor:
    """(n, channels, height, width) frost textures in [0, 1]; channels is 1 or 3."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    profile = torch.randint(len(_PHOTO_PROFILES), (n,), generator=generator)
    table = torch.tensor([[*rgb, level, within, weight] for rgb, level, within, _, weight in _PHOTO_PROFILES],
                         dtype=torch.float64)[profile]                               # (n, 6)
    rgb, level_std, within_std, cloud_weight = table[:, :3], table[:, 3], table[:, 4], table[:, 5]
    structure = _grey_structure(n, height, width, cloud_weight, generator)           # (n, 1, H, W)
    level = level_std * torch.randn(n, generator=generator, dtype=torch.float64)
    texture = rgb.reshape(n, 3, 1, 1) + level.reshape(n, 1, 1, 1) + within_std.reshape(n, 1, 1, 1) * structure
    texture = texture.clamp(0, 1)
    if channels == 1:
        texture = sum(g * texture[:, c:c + 1] for c, g in enumerate(_GREY))
    return texture.to(dtype)


# ----------------------------------------------------------------------------- calibration measures
def spectrum_slope(grey: np.ndarray) -> float:
    """Slope of log(radially averaged power) against log(frequency) of (N, S, S) grey crops,
    frequencies 1 .. S/2 - 1 cycles per crop, each crop's mean removed."""
    grey = np.asarray(grey, dtype=np.float64)
    size = grey.shape[-1]
    f = np.fft.fftfreq(size) * size
    r = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    power = (np.abs(np.fft.fft2(grey - grey.mean(axis=(-2, -1), keepdims=True))) ** 2).mean(axis=0)
    bins = np.arange(1, size // 2)
    radial = np.array([power[(r >= b - 0.5) & (r < b + 0.5)].mean() for b in bins])
    return float(np.polyfit(np.log(bins), np.log(radial), 1)[0])


def crop_statistics(crops: np.ndarray) -> Dict[str, object]:
    """The calibration statistics of (N, S, S, 3) RGB crops in [0, 1]: pooled ``mean`` and
    ``std``, ``within_std`` (mean over crops of the std over pixels and channels),
    ``between_std`` (std of the crop means), ``rgb_ratio`` (channel means / blue mean)
    and the grey crops' ``spectrum_slope``."""
    crops = np.asarray(crops, dtype=np.float64)
    grey = crops @ np.array(_GREY)
    rgb = crops.mean(axis=(0, 1, 2))
    return {"mean": float(crops.mean()), "std": float(crops.std()),
            "within_std": float(crops.std(axis=(1, 2, 3)).mean()),
            "between_std": float(crops.mean(axis=(1, 2, 3)).std()),
            "rgb_ratio": [float(v) for v in rgb / rgb[2]], "spectrum_slope": spectrum_slope(grey)}
