"""Procedural frost textures, replacing the six frost photographs of ImageNet-C.

Hendrycks' ``frost`` corruption blends the image with a random crop of one of
six photographs of frost on glass (``frost1.png`` .. ``frost6.jpg``, shipped
beside make_cifar_c.py, downscaled by 5 for CIFAR). sparsesam does not ship
those files; it draws a texture with the same ingredients instead,
deterministically from a seed:

* a cloudy low-frequency layer: the diamond-square plasma fractal that the
  ``fog`` corruption also uses (frost films are uneven in thickness);
* ice needles: sparse random seeds smeared into thin streaks along three
  random directions with the motion-blur kernel (the dendritic crystals that
  give frost photographs their high-frequency structure);
* a pale blue-white tint, as in the photographs (blue > green > red).

The result has a mean brightness of about 0.5 with local contrast, like a
32-pixel crop of the downscaled photographs. It is a stand-in, not a copy:
absolute frost accuracies are comparable across models evaluated here, not
with numbers measured on the released CIFAR-10-C files.
"""
from __future__ import annotations

import torch

from . import _image_ops as ops

Tensor = torch.Tensor

# Blue-white tint of frost photographs (relative R, G, B gains).
_TINT = (0.86, 0.94, 1.0)
_NEEDLE_DENSITY = 0.06
_NEEDLE_DIRECTIONS = 3


def frost_texture(n: int, channels: int, height: int, width: int, generator: torch.Generator,
                  dtype=torch.float32) -> Tensor:
    """(n, channels, height, width) frost textures in [0, 1]; channels is 1 or 3."""
    size = ops.next_power_of_two(max(height, width))
    clouds = ops.plasma_fractal(n, size, wibbledecay=2.0, generator=generator)[:, :height, :width]
    clouds = clouds.unsqueeze(1)

    # Needles: a sparse field of seeds of random brightness, streaked along a
    # random direction per layer; longer streaks on bigger images.
    radius = max(2, round(height / 8))
    needles = torch.zeros(n, 1, height, width, dtype=torch.float64)
    for _ in range(_NEEDLE_DIRECTIONS):
        seeds = (torch.rand(n, 1, height, width, generator=generator, dtype=torch.float64) < _NEEDLE_DENSITY)
        seeds = seeds * torch.rand(n, 1, height, width, generator=generator, dtype=torch.float64)
        angles = ops.uniform((n,), 0.0, 360.0, generator)
        # The motion kernel spreads a seed over ~radius pixels; multiply back so
        # a streak keeps about the seed's brightness.
        needles += ops.motion_blur(seeds, radius, radius / 2, angles) * radius
    needles = needles / needles.reshape(n, -1).amax(dim=1).clamp_min(1e-12).reshape(n, 1, 1, 1)

    texture = (0.15 + 0.55 * clouds + 0.6 * needles).clamp(0, 1)
    if channels == 3:
        tint = torch.tensor(_TINT, dtype=torch.float64).reshape(1, 3, 1, 1)
        texture = texture * tint
    elif channels == 1:
        texture = texture * (sum(g * w for g, w in zip(_TINT, (0.299, 0.587, 0.114))))
    else:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return texture.to(dtype)
