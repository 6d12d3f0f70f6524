"""Batched image operations on (N, C, H, W) tensors that the corruptions and
the semantic transforms are built from.

Each one re-creates, in PyTorch, the operation of the library Hendrycks'
``make_cifar_c.py`` called (scipy.ndimage, skimage, OpenCV, ImageMagick, PIL),
so that corruptions need none of those packages. Boundary handling follows the
original where it matters: ``"reflect"`` is scipy's half-sample symmetric
reflection (d c b a | a b c d), ``"nearest"`` repeats the edge pixel.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# --------------------------------------------------------------------------- padding
def _pad_index(n: int, pad: int, mode: str, device) -> Tensor:
    """Source indices of a length ``n`` axis padded by ``pad`` on both sides.

    Works for any ``pad`` (F.pad's reflection needs pad < n; the wide Gaussian
    kernels of the elastic transform exceed that on 28-pixel images).
    """
    i = torch.arange(-pad, n + pad, device=device)
    if mode == "nearest":
        return i.clamp(0, n - 1)
    if mode == "reflect":  # half-sample symmetric, period 2n
        i = i.remainder(2 * n)
        return torch.where(i >= n, 2 * n - 1 - i, i)
    raise ValueError(f"unknown padding mode {mode!r}")


def pad(x: Tensor, pad_h: int, pad_w: int, mode: str) -> Tensor:
    """Pad the last two dimensions of ``x``."""
    if pad_h:
        x = x.index_select(-2, _pad_index(x.shape[-2], pad_h, mode, x.device))
    if pad_w:
        x = x.index_select(-1, _pad_index(x.shape[-1], pad_w, mode, x.device))
    return x


# --------------------------------------------------------------------------- Gaussian filter
def gaussian_kernel1d(sigma: Union[float, Tensor], radius: int, dtype=torch.float32, device=None) -> Tensor:
    """Normalised ``exp(-k^2 / (2 sigma^2))`` for k in [-radius, radius]; one row per sigma.

    A sigma of 0 gives the identity kernel (a one at the centre).
    """
    sigma = torch.as_tensor(sigma, dtype=dtype, device=device).reshape(-1, 1)
    k = torch.arange(-radius, radius + 1, dtype=dtype, device=device).reshape(1, -1)
    safe = sigma.clamp_min(1e-12)
    weights = torch.exp(-0.5 * (k / safe) ** 2)
    weights = torch.where(sigma > 0, weights, (k == 0).to(dtype))
    return weights / weights.sum(dim=1, keepdim=True)


def gaussian_filter(x: Tensor, sigma: Union[float, Tensor], *, truncate: float = 4.0, mode: str = "nearest") -> Tensor:
    """scipy.ndimage.gaussian_filter over H and W of every channel.

    sigma: one float for the batch, or a tensor of N per-image values (the
    kernel radius is then the largest one's; smaller sigmas get zeros there).
    """
    n, c, h, w = x.shape
    per_image = isinstance(sigma, Tensor) and sigma.dim() > 0
    sigma_max = float(sigma.max()) if per_image else float(sigma)
    radius = int(truncate * sigma_max + 0.5)
    if radius == 0:
        return x.clone()
    kernel = gaussian_kernel1d(sigma, radius, dtype=x.dtype, device=x.device)  # (N or 1, K)
    kernel = kernel.expand(n, -1).repeat_interleave(c, dim=0)  # (N*C, K)
    y = pad(x, radius, radius, mode).reshape(1, n * c, h + 2 * radius, w + 2 * radius)
    y = F.conv2d(y, kernel.reshape(n * c, 1, -1, 1), groups=n * c)
    y = F.conv2d(y, kernel.reshape(n * c, 1, 1, -1), groups=n * c)
    return y.reshape(n, c, h, w)


def filter2d_reflect101(x: Tensor, kernel: Tensor) -> Tensor:
    """cv2.filter2D (correlation, centred anchor, BORDER_REFLECT_101) with one 2-D kernel."""
    kh, kw = kernel.shape
    n, c, h, w = x.shape
    y = F.pad(x.reshape(n * c, 1, h, w), (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")
    return F.conv2d(y, kernel.to(x.dtype).reshape(1, 1, kh, kw)).reshape(n, c, h, w)


# --------------------------------------------------------------------------- resampling
def box_resize_matrix(size_in: int, size_out: int, dtype=torch.float32, device=None) -> Tensor:
    """(size_out, size_in) weights of PIL's ``Image.BOX`` resampling along one axis.

    PIL's box filter (``precompute_coeffs`` in libImaging/Resample.c): output
    pixel j, centred at ``c = (j + 0.5) s`` in input coordinates (s = in / out),
    averages with equal weights the input pixels whose centres lie in
    ``(c - S/2, c + S/2]``, S = max(s, 1). Downscaling by a non-integer factor
    is therefore not an exact area average, and upscaling repeats pixels.
    """
    scale = size_in / size_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    weights = torch.zeros(size_out, size_in, dtype=torch.float64)
    for j in range(size_out):
        centre = (j + 0.5) * scale
        first = max(int(centre - support + 0.5), 0)
        last = min(int(centre + support + 0.5), size_in)
        for i in range(first, last):
            u = (i - centre + 0.5) / filterscale
            if -0.5 < u <= 0.5:
                weights[j, i] = 1.0
        total = weights[j].sum()
        if total > 0:
            weights[j] /= total
    return weights.to(dtype=dtype, device=device)


def box_resize(x: Tensor, height: int, width: int) -> Tensor:
    """Resize the last two dimensions like PIL's ``Image.resize(..., Image.BOX)``."""
    a_h = box_resize_matrix(x.shape[-2], height, x.dtype, x.device)
    a_w = box_resize_matrix(x.shape[-1], width, x.dtype, x.device)
    return torch.einsum("oh,nchw,pw->ncop", a_h, x, a_w)


def normalized_grid(theta: Tensor, h: int, w: int) -> Tensor:
    """affine_grid for (N, 2, 3) matrices acting on pixel-centre coordinates in [-1, 1]."""
    return F.affine_grid(theta, [theta.shape[0], 1, h, w], align_corners=False)


def _clipped_zoom_coords(n: int, factor: float) -> Tensor:
    """Source coordinate of each output pixel of make_cifar_c.py's ``clipped_zoom`` along one axis.

    It crops ``ch = ceil(n / factor)`` pixels from ``top = (n - ch) // 2``,
    zooms them with scipy.ndimage.zoom (output ``round(ch * factor)`` pixels,
    corner-aligned: output j samples input ``j (ch - 1) / (out - 1)``), then
    keeps ``n`` outputs from ``trim = (out - n) // 2``. The integer divisions
    leave the zoom slightly off-centre; kept, since CIFAR-10-C has it.
    """
    ch = math.ceil(n / factor)
    top = (n - ch) // 2
    out = round(ch * factor)
    trim = (out - n) // 2
    step = (ch - 1) / (out - 1) if out > 1 else 0.0
    return top + (torch.arange(n, dtype=torch.float64) + trim) * step


def clipped_zoom(x: Tensor, factor: float) -> Tensor:
    """make_cifar_c.py's ``clipped_zoom`` (crop the centre, scipy zoom with linear
    interpolation, trim to the original size) for a factor >= 1, on every image."""
    n, _, h, w = x.shape
    rows = _clipped_zoom_coords(h, factor).reshape(h, 1).expand(h, w)
    cols = _clipped_zoom_coords(w, factor).reshape(1, w).expand(h, w)
    rows, cols = rows.expand(n, h, w).to(x.device), cols.expand(n, h, w).to(x.device)
    return sample_pixels(x, rows, cols, padding_mode="border")


def reflect101_index(i: Tensor, n: int) -> Tensor:
    """OpenCV's BORDER_REFLECT_101 (``borderInterpolate``): whole-sample reflection
    about the edge pixels, ``gfedcb|abcdefgh|gfedcba``, for any integer index (period 2n - 2)."""
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * n - 2
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)


def warp_affine_source(inverse: Tensor, h: int, w: int) -> Tuple[Tensor, Tensor]:
    """(rows, cols), each (N, H, W): where cv2.warpAffine (INTER_LINEAR) samples the
    source for every output pixel, given the (N, 2, 3) output -> source matrices.

    OpenCV's ``WarpAffineInvoker`` works in fixed point: ``adelta = round(M0 x 1024)``,
    ``X0 = round((M1 y + M2) 1024) + 16``, ``X = (X0 + adelta) >> 5``, so the source
    position is X / 32: rounded to 1/32 of a pixel (INTER_BITS = 5), as here.
    """
    m = inverse.to(torch.float64)
    xs = torch.arange(w, dtype=torch.float64).reshape(1, 1, w)
    ys = torch.arange(h, dtype=torch.float64).reshape(1, h, 1)

    def fixed(row: int) -> Tensor:
        a = torch.round(m[:, row, 0].reshape(-1, 1, 1) * xs * 1024)
        b = torch.round((m[:, row, 1].reshape(-1, 1, 1) * ys + m[:, row, 2].reshape(-1, 1, 1)) * 1024) + 16
        return torch.floor((a + b) / 32) / 32   # arithmetic >> 5, then the 1/32-pixel grid

    return fixed(1), fixed(0)


def sample_pixels_reflect101(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Bilinear samples of x at (N, H, W) pixel coordinates, the four neighbours
    of a point outside the image taken by BORDER_REFLECT_101, as cv2.warpAffine
    with ``borderMode=cv2.BORDER_REFLECT_101`` does (every tap reflected on its own)."""
    n, c, h, w = x.shape
    r0, c0 = torch.floor(rows), torch.floor(cols)
    fr, fc = (rows - r0).to(x.dtype), (cols - c0).to(x.dtype)
    r0, c0 = r0.to(torch.long), c0.to(torch.long)
    batch = torch.arange(n, device=x.device).reshape(n, 1, 1)
    out = x.new_zeros(n, c, *rows.shape[1:])
    for dr, wr in ((0, 1 - fr), (1, fr)):
        rr = reflect101_index(r0 + dr, h)
        for dc, wc in ((0, 1 - fc), (1, fc)):
            cc = reflect101_index(c0 + dc, w)
            out += (wr * wc).unsqueeze(1) * x[batch, :, rr, cc].permute(0, 3, 1, 2)
    return out


def sample_pixels(x: Tensor, rows: Tensor, cols: Tensor, padding_mode: str) -> Tensor:
    """Bilinear samples of x at per-image pixel coordinates ``rows``/``cols`` of shape (N, H, W).

    ``padding_mode="reflection"`` is scipy's half-sample ``reflect`` (what
    map_coordinates(mode="reflect") does), ``"border"`` repeats the edge pixel.
    """
    h, w = x.shape[-2:]
    grid = torch.stack(((2 * cols + 1) / w - 1, (2 * rows + 1) / h - 1), dim=-1)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode=padding_mode, align_corners=False)


# --------------------------------------------------------------------------- motion blur
def motion_blur(x: Tensor, radius: int, sigma: float, angle_deg: Tensor) -> Tensor:
    """ImageMagick's MotionBlurImage (what make_cifar_c.py calls through Wand).

    A one-sided Gaussian kernel ``k_i ~ exp(-i^2 / (2 sigma^2))``, i = 0..2 radius,
    averages the pixels ``(y + round(i sin a), x + round(i cos a))`` (ImageMagick's
    ``ceil(v - 0.5)`` rounding; edge pixels repeat past the border). ``angle_deg``
    has one angle per image.
    """
    n, c, h, w = x.shape
    width = 2 * radius + 1
    weights = torch.exp(-torch.arange(width, dtype=torch.float64) ** 2 / (2 * sigma ** 2))
    weights = (weights / weights.sum()).tolist()
    angle = torch.deg2rad(angle_deg.to(torch.float64))
    sin, cos = torch.sin(angle), torch.cos(angle)
    batch = torch.arange(n, device=x.device).reshape(n, 1, 1)
    rows0 = torch.arange(h, device=x.device).reshape(1, h)
    cols0 = torch.arange(w, device=x.device).reshape(1, w)
    out = torch.zeros_like(x)
    for i, weight in enumerate(weights):
        dy = torch.ceil(i * sin - 0.5).to(torch.long).to(x.device).reshape(n, 1)
        dx = torch.ceil(i * cos - 0.5).to(torch.long).to(x.device).reshape(n, 1)
        if bool((dy.abs() >= h).any() or (dx.abs() >= w).any()):
            break  # the motion left the image: stop, as the imagecorruptions port of this blur does
        rows = (rows0 + dy).clamp(0, h - 1)  # (N, H)
        cols = (cols0 + dx).clamp(0, w - 1)  # (N, W)
        shifted = x[batch, :, rows.unsqueeze(2), cols.unsqueeze(1)]  # (N, H, W, C)
        out += weight * shifted.permute(0, 3, 1, 2)
    return out


# --------------------------------------------------------------------------- plasma fractal
def plasma_fractal(n: int, mapsize: int, wibbledecay: float, generator: torch.Generator,
                   dtype=torch.float64) -> Tensor:
    """(n, mapsize, mapsize) diamond-square height maps in [0, 1] (make_cifar_c.py's ``plasma_fractal``).

    mapsize must be a power of two. Same recursion and random scaling
    (``wibble * U(-wibble, wibble)``, wibble /= wibbledecay per level) as the original.
    """
    if mapsize < 2 or mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two >= 2, got {mapsize}")
    maps = torch.zeros(n, mapsize, mapsize, dtype=dtype)
    step, wibble = mapsize, 100.0

    def wibbled_mean(a: Tensor) -> Tensor:
        noise = torch.rand(a.shape, generator=generator, dtype=dtype) * (2 * wibble) - wibble
        return a / 4 + wibble * noise

    while step >= 2:
        half = step // 2
        # squares: centre of each square = mean of its corners + noise
        corners = maps[:, 0::step, 0::step]
        acc = corners + torch.roll(corners, -1, dims=1)
        acc = acc + torch.roll(acc, -1, dims=2)
        maps[:, half::step, half::step] = wibbled_mean(acc)
        # diamonds: edge midpoints = mean of the 4 neighbours + noise
        centres = maps[:, half::step, half::step]
        corners = maps[:, 0::step, 0::step]
        lt = centres + torch.roll(centres, 1, dims=1) + corners + torch.roll(corners, -1, dims=2)
        maps[:, 0::step, half::step] = wibbled_mean(lt)
        tt = centres + torch.roll(centres, 1, dims=2) + corners + torch.roll(corners, -1, dims=1)
        maps[:, half::step, 0::step] = wibbled_mean(tt)
        step //= 2
        wibble /= wibbledecay
    flat = maps.reshape(n, -1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    flat = flat / flat.max(dim=1, keepdim=True).values.clamp_min(1e-12)
    return flat.reshape(n, mapsize, mapsize)


def next_power_of_two(n: int) -> int:
    return 1 << max(1, math.ceil(math.log2(n)))


# --------------------------------------------------------------------------- colour
def luminance(x: Tensor) -> Tensor:
    """(N, 1, H, W) grey level: OpenCV's RGB2GRAY weights for 3 channels, the image itself for 1."""
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def quantize_uint8(x: Tensor, *, floor: bool = False) -> Tensor:
    """Round-trip through 8 bits the way the original pipeline stored intermediate images."""
    scaled = x.clamp(0, 1) * 255
    return (torch.floor(scaled) if floor else torch.round(scaled)) / 255


def uniform(shape, low: float, high: float, generator: torch.Generator, dtype=torch.float64) -> Tensor:
    return torch.rand(shape, generator=generator, dtype=dtype) * (high - low) + low


def seeded(seed: Optional[int]) -> torch.Generator:
    """A CPU generator: random numbers are drawn on the CPU and moved, so a seed
    gives the same corruption on every device."""
    generator = torch.Generator()
    generator.manual_seed(0 if seed is None else int(seed))
    return generator
