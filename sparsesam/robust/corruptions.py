"""CIFAR-10-C-style common corruptions on (N, C, H, W) tensors in [0, 1].

The 15 corruptions of Hendrycks & Dietterich (ICLR 2019) at 5 severities,
re-implemented in PyTorch (the public corruption packages no longer install
on current numpy / scikit-image). The severity constants are those of
``ImageNet-C/create_c/make_cifar_c.py`` in github.com/hendrycks/robustness,
the script that produced CIFAR-10-C; each table below says which of its
numbers are lengths in pixels. Those lengths were chosen for 32x32 images; on
other sizes the continuous ones (blur sigmas, motion-blur radii, elastic and
affine displacements) are scaled by ``min(H, W) / 32`` (so 28x28
Fashion-MNIST gets 7/8 of them), while ratios (zoom factors, pixelate
factors, JPEG quality, noise levels) are kept, and so are lengths on the
integer pixel lattice (defocus disk radius, glass-blur jitter distance).

The original's quirks are kept where CIFAR-10-C has them: glass blur's pixel
"swap" on numpy views is a copy (see ``glass_jitter``), ``clipped_zoom``
zooms slightly off-centre, zoom blur uses the exact ``np.arange`` factors,
elastic's affine warp samples like cv2.warpAffine (source positions rounded
to 1/32 pixel, BORDER_REFLECT_101: whole-sample reflection) and its
displacement step like map_coordinates(mode="reflect") (half-sample),
pixelate uses PIL's BOX filter, JPEG uses Pillow.
Deliberate differences:

* ``frost`` uses a procedural texture calibrated to the frost photographs'
  crop statistics (mean, std, colour, spectrum) instead of the photographs
  themselves, which sparsesam does not ship (see sparsesam/robust/frost.py);
* ``motion_blur`` and ``snow`` use a PyTorch port of ImageMagick's motion blur
  instead of calling ImageMagick through Wand;
* outputs stay floating point (CIFAR-10-C stored them as uint8, truncated).

Grey (1-channel) images go through the same formulas: brightness adds to the
value directly, snow's greying step uses the image itself.

Randomness comes from a CPU ``torch.Generator`` seeded by ``seed``: the same
seed and batch give the same corruption on every device and dtype.
"""
from __future__ import annotations

import io
from typing import Callable, Dict, Tuple

import numpy as np
import torch

from .._extras import require
from . import _checks
from . import _image_ops as ops
from .frost import frost_texture

Tensor = torch.Tensor

CORRUPTION_GROUPS: Dict[str, Tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog"),
    "digital": ("brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
CORRUPTIONS: Tuple[str, ...] = tuple(name for group in CORRUPTION_GROUPS.values() for name in group)

# ----------------------------------------------------------------------------
# Severity constants of make_cifar_c.py (index = severity - 1).
# ----------------------------------------------------------------------------
GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)            # noise std
SHOT_NOISE = (500, 250, 100, 75, 50)                        # photons per unit intensity
IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)              # fraction of values replaced
DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))  # disk radius [px], alias blur [px]
GLASS_BLUR = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))  # sigma [px], max delta [px], iterations
MOTION_BLUR = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))  # radius [px], sigma [px]
# make_cifar_c.py's zoom factors, built by the same np.arange calls: numpy fills
# ``start + k * (start + step - start)``, so the factors are 1 + k * 0.010000000000000009
# (7, 12, 16, 21, 26 of them), and severity 5's last one is 1.2500000000000002,
# whose zoomed crop of a 32-pixel image rounds to 33 pixels where 1.25 gives 32.
ZOOM_BLUR_FACTORS = tuple(tuple(float(f) for f in np.arange(1, stop, 0.01))
                          for stop in (1.06, 1.11, 1.16, 1.21, 1.26))
SNOW = ((0.1, 0.2, 1, 0.6, 8, 3, 0.95),                     # loc, scale, zoom, threshold,
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),                     # motion radius [px], motion sigma [px],
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),                # image weight
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8))
FROST = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))  # image weight, frost weight
FOG = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))         # fog strength, plasma wibble decay
BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)                    # added to HSV value
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)                      # contrast factor
ELASTIC = ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))  # x image size: alpha, sigma, affine jitter
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)                    # downscale factor
JPEG_QUALITY = (80, 65, 58, 50, 40)


# Random numbers are always drawn in float64 on the CPU, then cast and moved:
# the same seed gives the same corruption for every dtype and device.
def _noise_like(x: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=torch.float64).to(device=x.device, dtype=x.dtype)


def _rand_like(x: Tensor, generator: torch.Generator) -> Tensor:
    return torch.rand(x.shape, generator=generator, dtype=torch.float64).to(device=x.device, dtype=x.dtype)


# ---------------------------------------------------------------------------- noise
def gaussian_noise(x: Tensor, severity: int, scale: float, generator: torch.Generator) -> Tensor:
    return x + GAUSSIAN_NOISE[severity - 1] * _noise_like(x, generator)


def shot_noise(x: Tensor, severity: int, scale: float, generator: torch.Generator) -> Tensor:
    c = SHOT_NOISE[severity - 1]
    return torch.poisson(x.cpu().double() * c, generator=generator).to(x.device, x.dtype) / c


def impulse_noise(x: Tensor, severity: int, scale: float, generator: torch.Generator) -> Tensor:
    # skimage.util.random_noise(mode="s&p", amount=c): each value is replaced
    # with probability c, by 1 or 0 with equal odds.
    flipped = _rand_like(x, generator) < IMPULSE_NOISE[severity - 1]
    salt = (_rand_like(x, generator) < 0.5).to(x.dtype)
    return torch.where(flipped, salt, x)


# ---------------------------------------------------------------------------- blur
def _disk_kernel(radius: float, alias_blur: float, dtype) -> Tensor:
    """make_cifar_c.py's ``disk``: an aliased disk on a 17x17 grid (radius <= 8),
    normalised, smoothed by a 3x3 Gaussian (cv2.GaussianBlur), cropped to its support."""
    half = 8 if radius <= 8 else int(radius)
    coords = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((coords.reshape(-1, 1) ** 2 + coords.reshape(1, -1) ** 2) <= radius ** 2).to(torch.float64)
    disk /= disk.sum()
    ksize = 3 if radius <= 8 else 5
    g = ops.gaussian_kernel1d(alias_blur, ksize // 2, dtype=torch.float64)[0]
    padded = torch.nn.functional.pad(disk.reshape(1, 1, *disk.shape), (ksize // 2,) * 4, mode="reflect")
    smooth = torch.nn.functional.conv2d(padded, g.reshape(1, 1, -1, 1))
    smooth = torch.nn.functional.conv2d(smooth, g.reshape(1, 1, 1, -1))[0, 0]
    support = (smooth.abs() > 0).any(dim=0).nonzero()
    r = int(max(half - support.min(), support.max() - half))  # symmetric crop keeps the centre
    return smooth[half - r: half + r + 1, half - r: half + r + 1].to(dtype)


def defocus_blur(x: Tensor, severity: int, scale: float, generator: torch.Generator) -> Tensor:
    # Not scaled with the image size: the disk lives on the integer pixel
    # lattice, where 7/8 of radius 1 (28-pixel images) would drop the whole
    # 4-neighbour ring and leave the identity.
    radius, alias_blur = DEFOCUS_BLUR[severity - 1]
    kernel = _disk_kernel(radius, alias_blur, x.dtype).to(x.device)
    return ops.filter2d_reflect101(x, kernel)


def glass_blur(x: Tensor, severity: int, scale: float, generator: torch.Generator) -> Tensor:
    sigma, max_delta, iterations = GLASS_BLUR[severity - 1]
    sigma *= scale
    # Blur, store as uint8 (truncating), jitter pixels, blur again.
    y = ops.quantize_uint8(ops.gaussian_filter(x, sigma, mode="nearest"), floor=True)
    n, _, h, w = y.shape
    for _ in range(iterations):
        # np.random.randint(-d, d) draws from [-d, d): {-1, 0} for d = 1.
        offsets = torch.randint(-max_delta, max_delta, (n, 2, h - max_delta - 1, w - max_delta - 1),
                                generator=generator)
        y = glass_jitter(y, offsets.to(y.device))
    return ops.gaussian_filter(y, sigma, mode="nearest")


def glass_jitter(y: Tensor, offsets: Tensor) -> Tensor:
    """One pass of make_cifar_c.py's "local pixel shuffling", as it actually behaves.

    The original sweeps h, w from the bottom-right corner down to ``max_delta + 1``
    and runs ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` with
    ``(h', w') = (h, w) + randint(-max_delta, max_delta)``. On numpy arrays the
    right-hand side holds *views*, so this copies x[h', w'] into x[h, w] and
    leaves x[h', w'] as it was: a copy, not a swap. With max_delta = 1 (every
    CIFAR severity) the offsets are in {-1, 0}, the sources lie up-left and are
    visited later in the sweep, so every visited pixel takes the *original* value
    of a random neighbour in {(0,0), (-1,0), (0,-1), (-1,-1)}: one gather here.

    offsets: (N, 2, H - 2, W - 2) row / column offsets in {-1, 0} for the
    visited pixels (rows and columns 2 .. size-1).
    """
    n, _, h, w = y.shape
    first = 2
    if tuple(offsets.shape) != (n, 2, h - first, w - first):
        raise ValueError(f"offsets must have shape {(n, 2, h - first, w - first)}, got {tuple(offsets.shape)}")
    if bool(((offsets < -1) | (offsets > 0)).any()):
        raise ValueError("offsets must be -1 or 0 (the CIFAR sweep's max_delta = 1)")
    rows = torch.arange(first, h, device=y.device)
    cols = torch.arange(first, w, device=y.device)
    src_rows = rows.reshape(1, -1, 1) + offsets[:, 0]
    src_cols = cols.reshape(1, 1, -1) + offsets[:, 1]
    batch = torch.arange(n, device=y.device).reshape(n, 1, 1)
    out = y.clone()
    out[:, :, first:, first:] = y[batch, :, src_rows, src_cols].permute(0, 3, 1, 2)
    return out


def motion_blur(x: Tensor, severity: int, scale: float, generator: torch.Generator) -> Tensor:
    radius, sigma = MOTION_BLUR[severity - 1]
    angles = ops.uniform((x.shape[0],), -45.0, 45.0, generator)
    return ops.motion_blur(x, max(1, round(radius * scale)), sigma * scale, angles)


def zoom_blur(x: Tensor, severity: int, scale: float, generator: torch.Generator) -> Tensor:
    # (x + sum of the zooms) / (len(c) + 1), the factor 1.0 included in the sum.
    factors = ZOOM_BLUR_FACTORS[severity - 1]
    out = torch.zeros_like(x)
    for factor in factors:
        out += ops.clipped_zoom(x, factor)
    return (x + out) / (len(factors) + 1)


# ---------------------------------------------------------------------------- weather
def snow(x: Tensor, severity: int, scale: float, generator: torch.Generator) -> Tensor:
    loc, std, zoom, threshold, radius, sigma, keep = SNOW[severity - 1]
    n, _, h, w = x.shape
    layer = (torch.randn(n, 1, h, w, generator=generator, dtype=torch.float64) * std + loc).to(x.device, x.dtype)
    layer = ops.clipped_zoom(layer, zoom)
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer)
    layer = ops.quantize_uint8(layer, floor=True)  # stored as an 8-bit PNG for ImageMagick
    angles = ops.uniform((n,), -135.0, -45.0, generator)
    layer = ops.quantize_uint8(ops.motion_blur(layer, max(1, round(radius * scale)), sigma * scale, angles))
    x = keep * x + (1 - keep) * torch.maximum(x, ops.luminance(x) * 1.5 + 0.5)
    return x + layer + torch.flip(layer, dims=(-2, -1))  # np.rot90(layer, k=2)


def frost(x: Tensor, severity: int, scale: float, generator: torch.Generator) -> Tensor:
    keep, amount = FROST[severity - 1]
    n, c, h, w = x.shape
    texture = frost_texture(n, c, h, w, generator, dtype=x.dtype).to(x.device)
    return keep * x + amount * texture


def fog(x: Tensor, severity: int, scale: float, generator: torch.Generator) -> Tensor:
    strength, decay = FOG[severity - 1]
    n, _, h, w = x.shape
    size = ops.next_power_of_two(max(h, w))
    layer = ops.plasma_fractal(n, size, decay, generator)[:, :h, :w].unsqueeze(1).to(x.dtype).to(x.device)
    max_val = x.reshape(n, -1).amax(dim=1).reshape(n, 1, 1, 1)
    return (x + strength * layer) * max_val / (max_val + strength)


# ---------------------------------------------------------------------------- digital
def brightness(x: Tensor, severity: int, scale: float, generator: torch.Generator) -> Tensor:
    # HSV value += c. Hue and saturation fixed make RGB proportional to the
    # value, so RGB scales by V'/V; black pixels (V = 0, S = 0) become grey V'.
    c = BRIGHTNESS[severity - 1]
    value = x.amax(dim=1, keepdim=True)
    new_value = (value + c).clamp(0, 1)
    ratio = new_value / value.clamp_min(torch.finfo(x.dtype).tiny)
    return torch.where(value > 0, x * ratio, new_value.expand_as(x))


def contrast(x: Tensor, severity: int, scale: float, generator: torch.Generator) -> Tensor:
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * CONTRAST[severity - 1] + means


def elastic_transform(x: Tensor, severity: int, scale: float, generator: torch.Generator) -> Tensor:
    n, _, h, w = x.shape
    size = min(h, w)
    alpha, sigma, jitter = (v * size for v in ELASTIC[severity - 1])
    # Random affine: three points around the centre each moved by U(-jitter, jitter).
    cx, cy, sq = w // 2, h // 2, size // 3
    src_pts = torch.tensor([[cx + sq, cy + sq], [cx + sq, cy - sq], [cx - sq, cy - sq]], dtype=torch.float64)
    dst_pts = src_pts + ops.uniform((n, 3, 2), -jitter, jitter, generator)
    design = torch.cat([src_pts, torch.ones(3, 1, dtype=torch.float64)], dim=1).expand(n, 3, 3)
    forward = torch.linalg.solve(design, dst_pts).transpose(1, 2)   # (N, 2, 3): src -> dst
    linear_inv = torch.linalg.inv(forward[:, :, :2])                  # cv2.warpAffine samples src(M^-1 p)
    inverse = torch.cat([linear_inv, -(linear_inv @ forward[:, :, 2:])], dim=2)
    rows, cols = ops.warp_affine_source(inverse, h, w)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    # cv2.warpAffine(..., borderMode=cv2.BORDER_REFLECT_101): whole-sample reflection.
    y = ops.sample_pixels_reflect101(x, rows.to(x.device), cols.to(x.device))
    if alpha == 0:
        return y
    # Smooth random displacement field (skimage gaussian, truncate=3, reflect).
    field = ops.uniform((n, 2, h, w), -1.0, 1.0, generator)
    field = ops.gaussian_filter(field, sigma, truncate=3.0, mode="reflect") * alpha
    dx, dy = field[:, 0], field[:, 1]
    # map_coordinates(..., order=1, mode='reflect'): scipy's half-sample reflection.
    return ops.sample_pixels(y, (ys + dy).to(x.device), (xs + dx).to(x.device), padding_mode="reflection")


def pixelate(x: Tensor, severity: int, scale: float, generator: torch.Generator) -> Tensor:
    c = PIXELATE[severity - 1]
    h, w = x.shape[-2:]
    small = ops.box_resize(x, max(1, int(h * c)), max(1, int(w * c)))
    return ops.box_resize(small, h, w)


def jpeg_compression(x: Tensor, severity: int, scale: float, generator: torch.Generator) -> Tensor:
    # PIL's encoder, as make_cifar_c.py (torchvision.io's JPEG codec is deprecated since 0.29).
    Image = require("PIL.Image", extra="robust", purpose="the jpeg_compression corruption")
    quality = JPEG_QUALITY[severity - 1]
    as_bytes = torch.round(x.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for image in as_bytes:
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "JPEG", quality=quality)
        buffer.seek(0)
        decoded = np.asarray(Image.open(buffer))
        out.append(decoded.reshape(image.shape))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype) / 255


_FUNCTIONS: Dict[str, Callable[[Tensor, int, float, torch.Generator], Tensor]] = {
    name: globals()[name] for name in CORRUPTIONS
}


def corrupt(x: Tensor, corruption: str, severity: int, *, seed: int = 0) -> Tensor:
    """``x`` (N, C, H, W) in [0, 1], C = 1 or 3, corrupted by ``corruption`` at ``severity`` (1..5).

    Returns a new tensor of the same shape, dtype and device, in [0, 1].
    Deterministic: the same ``seed`` and batch give the same output.
    """
    _checks.choice("corruption", corruption, CORRUPTIONS)
    _checks.severity(severity)
    _checks.images("x", x, channels=(1, 3))
    if x.numel() == 0:
        return x.clone()
    work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = min(x.shape[-2:]) / 32.0
    out = _FUNCTIONS[corruption](x.to(work_dtype), severity, scale, ops.seeded(seed))
    return out.clamp(0, 1).to(x.dtype)
