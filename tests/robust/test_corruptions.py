"""sparsesam.robust.corruptions: contract (shape, dtype, range, determinism),
strength growing with severity, the building blocks against scipy / PIL /
colorsys, and bad input."""
import colorsys
import os

import numpy as np
import pytest
import torch

from sparsesam.robust import CORRUPTIONS, corrupt
from sparsesam.robust import _image_ops as ops
from sparsesam.robust.corruptions import CORRUPTION_GROUPS, DEFOCUS_BLUR, ZOOM_BLUR_FACTORS, _disk_kernel, glass_jitter
from sparsesam.robust.frost import crop_statistics, frost_texture, spectrum_slope

from robust_data import natural_images

# Corruptions without randomness: the seed must not matter.
DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"}
SHAPES = [(3, 32), (1, 28)]


def test_fifteen_corruptions_in_four_groups():
    assert len(CORRUPTIONS) == 15 and len(set(CORRUPTIONS)) == 15
    assert {k: len(v) for k, v in CORRUPTION_GROUPS.items()} == {"noise": 3, "blur": 4, "weather": 3, "digital": 5}


@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_dtype_range_and_determinism(name, channels, size):
    x = natural_images(3, channels, size, seed=1)
    y = corrupt(x, name, 3, seed=7)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
    assert not torch.equal(y, x), f"{name} left the images unchanged"
    assert torch.equal(corrupt(x, name, 3, seed=7), y), "same seed must give the same corruption"
    other = corrupt(x, name, 3, seed=8)
    if name in DETERMINISTIC:
        assert torch.equal(other, y)
    else:
        assert not torch.equal(other, y), f"{name} ignores its seed"
    assert torch.equal(x, natural_images(3, channels, size, seed=1)), "the input must not be modified"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("name", ["gaussian_noise", "glass_blur", "fog", "elastic_transform", "jpeg_compression"])
def test_other_dtypes_keep_their_dtype(name, dtype):
    x = natural_images(2, 3, 32, seed=2).to(dtype)
    y = corrupt(x, name, 2, seed=0)
    assert y.dtype == dtype and y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    # Same result as float32 up to the dtype's resolution (float16 only stores ~3 digits).
    reference = corrupt(x.float(), name, 2, seed=0)
    tol = 1e-5 if dtype == torch.float64 else 2e-2
    if name == "jpeg_compression":
        tol = max(tol, 1.5 / 255)  # rounding to bytes may flip where the float16 input was rounded
    assert (y.float() - reference).abs().mean() < tol


def test_empty_batch():
    x = torch.rand(0, 3, 32, 32)
    assert corrupt(x, "snow", 5).shape == (0, 3, 32, 32)


# ----------------------------------------------------------------------------- strength vs severity
def _ssim(a, b):
    """Mean windowed SSIM (Gaussian window sigma 1.5) of two batches in [0, 1]."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2

    def blur(t):
        return ops.gaussian_filter(t.double(), 1.5, truncate=3.5, mode="reflect")

    a, b = a.double(), b.double()
    ma, mb = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ma ** 2, blur(b * b) - mb ** 2, blur(a * b) - ma * mb
    return (((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))).mean().item()


def _dissimilarity(x, y):
    return 1.0 - _ssim(x, y)


def _rms(x, y):
    return (x - y).pow(2).mean().sqrt().item()


def _decorrelation(x, y):
    """Mean over images of 1 - Pearson correlation of x and y: how much of y is not x."""
    a = x.double().flatten(1) - x.double().flatten(1).mean(1, keepdim=True)
    b = y.double().flatten(1) - y.double().flatten(1).mean(1, keepdim=True)
    return (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean().item()


def _ramp_residual(size, channels, severity):
    """RMS of the best affine-in-(row, col) fit to an elastically warped linear ramp, inside an
    8-pixel border (where reflected edges do not reach): a global affine warp keeps a ramp a
    ramp, local elastic warps do not."""
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    ramp = (0.05 + 0.9 * (0.3 * ys + 0.6 * xs) / (0.9 * (size - 1))).clamp(0, 1)
    y = corrupt(ramp.expand(16, channels, size, size).contiguous(), "elastic_transform", severity, seed=3)
    b = 8
    design = torch.stack([torch.ones_like(ys), ys, xs], -1)[b:-b, b:-b].reshape(-1, 3).double()
    values = y[:, :, b:-b, b:-b].reshape(-1, design.shape[0]).T.double()
    fit = design @ torch.linalg.lstsq(design, values).solution
    return (fit - values).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_strength_grows_with_severity(name, channels, size):
    """Each corruption gets the measure its severity constants move. Hendrycks'
    constants are not ordered by one pixel distance for every corruption:
    elastic's severity 1 is a large *global* affine jitter while higher ones
    add *local* elastic warps (measured on a ramp); glass blur's severities
    trade blur against pixel jitter (checked pairwise); motion blur's
    severities 3 and 4 differ only in the far tail of the kernel (equal within 1e-6);
    frost's severities 3 -> 4 lower the image weight (0.9 -> 0.85) at the same frost
    weight, which darkens about as much as it obscures, so SSIM's luminance term
    cannot rank them: its constants order the frost-to-image weight ratio
    (0.2, 0.3, 0.44, 0.47, 0.6), i.e. the decorrelation of x and the result."""
    if name == "elastic_transform":
        residual = [_ramp_residual(size, channels, s) for s in range(1, 6)]
        # OpenCV's warpAffine rounds source positions to 1/32 pixel: on the ramp (slope <= 0.02 per
        # pixel) that leaves an RMS residual of about 0.02 / (64 sqrt(3)) ~ 2e-4 around the affine fit.
        assert residual[0] < 4e-4, "severity 1 is a pure affine warp (alpha = 0)"
        assert all(a < b for a, b in zip(residual, residual[1:])), residual
        return
    x = natural_images(32, channels, size, seed=0)
    ys = {s: corrupt(x, name, s, seed=1) for s in range(1, 6)}
    if name == "glass_blur":
        d = {s: _dissimilarity(x, y) for s, y in ys.items()}
        # (sigma, swap passes): 1 (0.05, 1) <= 2 (0.25, 1); 4 (0.25, 2) > 2; 5 (0.4, 2) > 3 (0.4, 1).
        assert d[2] >= d[1] - 1e-3 and d[4] > d[2] and d[5] > d[3], d
        return
    measure = _rms if name == "snow" else _decorrelation if name == "frost" else _dissimilarity
    strength = [measure(x, ys[s]) for s in range(1, 6)]
    if name == "motion_blur":
        assert strength[3] >= strength[2] - 1e-6 and all(strength[i] < strength[i + 1] for i in (0, 1, 3)), strength
        return
    assert all(a < b for a, b in zip(strength, strength[1:])), strength


# ----------------------------------------------------------------------------- building blocks
@pytest.mark.parametrize("mode", ["nearest", "reflect"])
@pytest.mark.parametrize("sigma,truncate", [(0.4, 4.0), (1.5, 3.0), (6.4, 3.0)])
def test_gaussian_filter_matches_scipy(mode, sigma, truncate):
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.rand(2, 3, 11, 13, dtype=torch.float64)
    ours = ops.gaussian_filter(x, sigma, truncate=truncate, mode=mode)
    theirs = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), truncate=truncate, mode=mode)
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=1e-12)


def test_gaussian_filter_per_image_sigma():
    x = torch.rand(3, 1, 9, 9, dtype=torch.float64)
    sigma = torch.tensor([0.0, 0.7, 1.3], dtype=torch.float64)
    ours = ops.gaussian_filter(x, sigma, truncate=3.0, mode="reflect")
    torch.testing.assert_close(ours[0], x[0], rtol=0, atol=0)
    for i in (1, 2):
        expect = ops.gaussian_filter(x[i:i + 1], float(sigma[i]), truncate=3.0 * 1.3 / float(sigma[i]), mode="reflect")
        torch.testing.assert_close(ours[i:i + 1], expect, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size_in,size_out", [(32, 30), (32, 20), (20, 32), (28, 24), (24, 28), (13, 5)])
def test_box_resize_matches_pil_box(size_in, size_out):
    Image = pytest.importorskip("PIL.Image")
    x = np.random.default_rng(0).random((size_in, size_in + 3)).astype(np.float32)
    theirs = np.asarray(Image.fromarray(x).resize((size_out + 1, size_out), Image.BOX))
    ours = ops.box_resize(torch.from_numpy(x).reshape(1, 1, size_in, size_in + 3), size_out, size_out + 1)[0, 0]
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=1e-5)


def test_brightness_matches_hsv_value_shift():
    x = natural_images(2, 3, 8, seed=4).double()
    x[0, :, 0, 0] = 0.0  # a black pixel: HSV saturation 0, becomes grey
    y = corrupt(x, "brightness", 4)
    for n, i, j in [(0, 0, 0), (0, 3, 5), (1, 7, 2), (1, 4, 4)]:
        h, s, v = colorsys.rgb_to_hsv(*x[n, :, i, j].tolist())
        expect = colorsys.hsv_to_rgb(h, s, min(v + 0.2, 1.0))
        np.testing.assert_allclose(y[n, :, i, j].numpy(), expect, atol=1e-12)


def test_contrast_scales_around_channel_means():
    x = natural_images(2, 3, 16, seed=5).double()
    y = corrupt(x, "contrast", 2)
    mean = x.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(y, ((x - mean) * 0.5 + mean).clamp(0, 1))


def test_motion_blur_horizontal_is_a_one_sided_gaussian_smear():
    x = torch.rand(1, 1, 6, 12, dtype=torch.float64)
    radius, sigma = 2, 1.0
    y = ops.motion_blur(x, radius, sigma, torch.tensor([0.0]))
    k = np.exp(-np.arange(2 * radius + 1) ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    expect = np.zeros((6, 12))
    for i, weight in enumerate(k):
        expect += weight * x[0, 0].numpy()[:, np.minimum(np.arange(12) + i, 11)]
    np.testing.assert_allclose(y[0, 0].numpy(), expect, atol=1e-12)


@pytest.mark.parametrize("size", [32, 28])
@pytest.mark.parametrize("factor", [1.01, 1.05, 1.13, 1.25, 1.75, 2.25])
def test_clipped_zoom_matches_make_cifar_c(size, factor):
    scipy_zoom = pytest.importorskip("scipy.ndimage").zoom

    def clipped_zoom(img, zoom_factor):  # make_cifar_c.py, verbatim
        h = img.shape[0]
        ch = int(np.ceil(h / zoom_factor))
        top = (h - ch) // 2
        img = scipy_zoom(img[top:top + ch, top:top + ch], (zoom_factor, zoom_factor, 1), order=1)
        trim_top = (img.shape[0] - h) // 2
        return img[trim_top:trim_top + h, trim_top:trim_top + h]

    x = torch.rand(2, 3, size, size, dtype=torch.float64)
    ours = ops.clipped_zoom(x, factor)
    for n in range(2):
        expect = clipped_zoom(x[n].permute(1, 2, 0).numpy(), factor)
        np.testing.assert_allclose(ours[n].permute(1, 2, 0).numpy(), expect, rtol=0, atol=1e-12)


def test_zoom_blur_factors_are_make_cifar_c_aranges():
    # make_cifar_c.py: c = [np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), ..., np.arange(1, 1.26, 0.01)].
    # numpy's arange fills start + k * delta with delta = (start + step) - start = 0.010000000000000009.
    delta = (1 + 0.01) - 1
    assert delta == 0.010000000000000009
    counts = [7, 12, 16, 21, 26]
    assert [len(c) for c in ZOOM_BLUR_FACTORS] == counts
    for c, count in zip(ZOOM_BLUR_FACTORS, counts):
        assert list(c) == [1 + k * delta for k in range(count)]
    assert ZOOM_BLUR_FACTORS[0][-1] == 1.06 and ZOOM_BLUR_FACTORS[4][-1] == 1.2500000000000002
    # The tie: scipy.ndimage.zoom makes round(26 * factor) pixels of the 26-pixel crop of a 32-pixel
    # image; round(32.5) = 32 for 1.25 but 33 for 1.2500000000000002, so the crop is sampled at
    # top + j * (ch - 1) / (out - 1) = 3 + j * 25 / 32, not 3 + j * 25 / 31.
    coords = ops._clipped_zoom_coords(32, ZOOM_BLUR_FACTORS[4][-1])
    torch.testing.assert_close(coords, 3 + torch.arange(32, dtype=torch.float64) * 25 / 32, rtol=0, atol=1e-12)
    coords_125 = ops._clipped_zoom_coords(32, 1.25)
    torch.testing.assert_close(coords_125, 3 + torch.arange(32, dtype=torch.float64) * 25 / 31, rtol=0, atol=1e-12)


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_zoom_blur_matches_make_cifar_c(severity):
    scipy_zoom = pytest.importorskip("scipy.ndimage").zoom

    def clipped_zoom(img, zoom_factor):  # make_cifar_c.py, verbatim
        h = img.shape[0]
        ch = int(np.ceil(h / zoom_factor))
        top = (h - ch) // 2
        img = scipy_zoom(img[top:top + ch, top:top + ch], (zoom_factor, zoom_factor, 1), order=1)
        trim_top = (img.shape[0] - h) // 2
        return img[trim_top:trim_top + h, trim_top:trim_top + h]

    def zoom_blur(x, severity=1):  # make_cifar_c.py, verbatim but for the uint8 scaling (x is in [0, 1])
        c = [np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
             np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)][severity - 1]
        out = np.zeros_like(x)
        for zoom_factor in c:
            out += clipped_zoom(x, zoom_factor)
        x = (x + out) / (len(c) + 1)
        return np.clip(x, 0, 1)

    x = natural_images(2, 3, 32, seed=9).double()
    ours = corrupt(x, "zoom_blur", severity)
    for n in range(2):
        expect = zoom_blur(x[n].permute(1, 2, 0).numpy(), severity)
        np.testing.assert_allclose(ours[n].permute(1, 2, 0).numpy(), expect, rtol=0, atol=1e-12)


def test_reflect101_index_map():
    # OpenCV borderInterpolate(BORDER_REFLECT_101) on a length-4 axis: gfedcb|abcdefgh|gfedcba.
    i = torch.arange(-7, 11)
    #        -7 -6 -5 -4 -3 -2 -1  0  1  2  3  4  5  6  7  8  9 10
    expect = [1, 0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2]
    assert ops.reflect101_index(i, 4).tolist() == expect
    assert ops.reflect101_index(torch.tensor([-2, 0, 3]), 1).tolist() == [0, 0, 0]


def test_reflect101_bilinear_samples():
    x = torch.arange(1.0, 6.0, dtype=torch.float64).reshape(1, 1, 1, 5)        # row [1 2 3 4 5]
    cols = torch.tensor([[[-1.0, -0.5, 0.25, 4.5, 5.0, 6.0]]], dtype=torch.float64)
    rows = torch.zeros_like(cols)
    # -1 -> x[1] = 2; -0.5 -> (x[1] + x[0]) / 2 = 1.5; 4.5 -> (x[4] + x[3]) / 2 = 4.5; 5 -> x[3] = 4; 6 -> x[2] = 3.
    expect = torch.tensor([2.0, 1.5, 1.25, 4.5, 4.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(ops.sample_pixels_reflect101(x, rows, cols)[0, 0, 0], expect)
    # The half-sample "reflection" of map_coordinates: -1 -> x[0], 5 -> x[4] (d c b a | a b c d).
    half = ops.sample_pixels(x, rows, cols, padding_mode="reflection")[0, 0, 0]
    torch.testing.assert_close(half[[0, 4]], torch.tensor([1.0, 5.0], dtype=torch.float64))


def test_half_sample_reflection_matches_map_coordinates():
    ndimage = pytest.importorskip("scipy.ndimage")
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, 6, 7, generator=g, dtype=torch.float64)
    rows = torch.rand(1, 6, 7, generator=g, dtype=torch.float64) * 10 - 2
    cols = torch.rand(1, 6, 7, generator=g, dtype=torch.float64) * 11 - 2
    ours = ops.sample_pixels(x, rows, cols, padding_mode="reflection")[0, 0]
    expect = ndimage.map_coordinates(x[0, 0].numpy(), [rows[0].numpy(), cols[0].numpy()], order=1, mode="reflect")
    np.testing.assert_allclose(ours.numpy(), expect, rtol=0, atol=1e-12)


def test_warp_affine_source_is_opencv_fixed_point():
    # Output -> source matrix [[1, 0, 0.3], [0, 1, -0.7]]: OpenCV rounds to 1/32 pixel:
    # X = (round(0.3 * 1024) + 16 + 1024 x) >> 5 = 32 x + 10; Y = (round(-0.7 * 1024) + 16 + 1024 y) >> 5 = 32 y - 22.
    m = torch.tensor([[[1.0, 0.0, 0.3], [0.0, 1.0, -0.7]]], dtype=torch.float64)
    rows, cols = ops.warp_affine_source(m, 3, 4)
    torch.testing.assert_close(cols[0], (torch.arange(4.0, dtype=torch.float64) + 10 / 32).expand(3, 4))
    torch.testing.assert_close(rows[0], (torch.arange(3.0, dtype=torch.float64) - 22 / 32).reshape(3, 1).expand(3, 4))


def test_elastic_severity_1_is_a_reflect101_affine_warp():
    # Severity 1 has alpha = 0: only the affine warp, whose border must be whole-sample reflection.
    x = natural_images(3, 3, 32, seed=10).double()
    y = corrupt(x, "elastic_transform", 1, seed=4)
    g = ops.seeded(4)
    jitter = 0.08 * 32
    src = torch.tensor([[16 + 10, 16 + 10], [16 + 10, 16 - 10], [16 - 10, 16 - 10]], dtype=torch.float64)
    dst = src + ops.uniform((3, 3, 2), -jitter, jitter, g)
    for n in range(3):
        # cv2.getAffineTransform (src -> dst), inverted as warpAffine does, fixed point, reflect-101 taps.
        a = torch.cat([src, torch.ones(3, 1, dtype=torch.float64)], dim=1)
        forward = torch.linalg.solve(a, dst[n]).T
        inv = torch.linalg.inv(forward[:, :2])
        m = torch.cat([inv, -(inv @ forward[:, 2:])], dim=1).unsqueeze(0)
        rows, cols = ops.warp_affine_source(m, 32, 32)
        r0, c0 = torch.floor(rows[0]).long(), torch.floor(cols[0]).long()
        fr, fc = rows[0] - r0, cols[0] - c0

        def tap(r, c):
            return x[n][:, ops.reflect101_index(r, 32), ops.reflect101_index(c, 32)]
        expect = ((1 - fr) * (1 - fc) * tap(r0, c0) + (1 - fr) * fc * tap(r0, c0 + 1)
                  + fr * (1 - fc) * tap(r0 + 1, c0) + fr * fc * tap(r0 + 1, c0 + 1))
        torch.testing.assert_close(y[n], expect.clamp(0, 1), rtol=0, atol=1e-12)
        assert (r0 < 0).any() or (c0 < 0).any() or (r0 >= 31).any() or (c0 >= 31).any(), "border exercised"


def test_glass_jitter_is_what_hendrycks_sweep_does_on_numpy():
    # Run the original statement on numpy arrays with the same offsets: its
    # "swap" of two views copies one pixel and leaves the other.
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 256, (2, 3, 9, 11), generator=g).double() / 255
    offsets = torch.randint(-1, 1, (2, 2, 7, 9), generator=g)
    ours = glass_jitter(y, offsets)
    for n in range(2):
        x = y[n].permute(1, 2, 0).numpy().copy()  # H, W, C as in make_cifar_c.py
        for h in range(9 - 1, 1, -1):
            for w in range(11 - 1, 1, -1):
                dy, dx = int(offsets[n, 0, h - 2, w - 2]), int(offsets[n, 1, h - 2, w - 2])
                h_prime, w_prime = h + dy, w + dx
                x[h, w], x[h_prime, w_prime] = x[h_prime, w_prime], x[h, w]
        np.testing.assert_array_equal(ours[n].permute(1, 2, 0).numpy(), x)
    with pytest.raises(ValueError, match="offsets"):
        glass_jitter(y, offsets + 1)


def test_disk_kernels_are_normalised_symmetric_and_widen_with_severity():
    spread = []
    for radius, alias in DEFOCUS_BLUR:
        k = _disk_kernel(radius, alias, torch.float64)
        torch.testing.assert_close(k.sum(), torch.tensor(1.0, dtype=torch.float64))
        torch.testing.assert_close(k, k.flip(0))
        torch.testing.assert_close(k, k.T)
        r = torch.arange(k.shape[0], dtype=torch.float64) - k.shape[0] // 2
        spread.append(float((k * (r[:, None] ** 2 + r[None, :] ** 2)).sum()))
    assert all(a < b for a, b in zip(spread, spread[1:])), spread
    # Radius 1.5 with almost no alias blur: the 3x3 block of the aliased disk.
    torch.testing.assert_close(_disk_kernel(1.5, 1e-3, torch.float64), torch.full((3, 3), 1 / 9, dtype=torch.float64))


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_is_a_pil_round_trip_at_hendrycks_quality(channels):
    Image = pytest.importorskip("PIL.Image")
    import io

    x = natural_images(2, channels, 32, seed=6)
    y = corrupt(x, "jpeg_compression", 5)  # quality 40
    for n in range(2):
        array = (x[n].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array[..., 0] if channels == 1 else array).save(buffer, "JPEG", quality=40)
        expect = np.asarray(Image.open(buffer)).astype(np.float32).reshape(array.shape) / 255
        np.testing.assert_array_equal(y[n].permute(1, 2, 0).numpy(), expect)


def test_plasma_fractal_and_frost_texture():
    g = torch.Generator().manual_seed(0)
    maps = ops.plasma_fractal(4, 32, 2.0, g)
    assert maps.shape == (4, 32, 32)
    assert torch.allclose(maps.amin(dim=(1, 2)), torch.zeros(4, dtype=maps.dtype))
    assert torch.allclose(maps.amax(dim=(1, 2)), torch.ones(4, dtype=maps.dtype))
    with pytest.raises(ValueError, match="mapsize"):
        ops.plasma_fractal(1, 24, 2.0, g)
    t1 = frost_texture(8, 3, 32, 32, torch.Generator().manual_seed(1))
    t2 = frost_texture(8, 3, 32, 32, torch.Generator().manual_seed(1))
    assert torch.equal(t1, t2) and t1.min() >= 0 and t1.max() <= 1
    assert (t1[:, 2] >= t1[:, 0]).all(), "frost is blue-white: blue >= red"
    assert frost_texture(2, 1, 28, 28, torch.Generator().manual_seed(1)).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="channels"):
        frost_texture(2, 2, 8, 8, torch.Generator())


# Crops of the frost photographs (frost1..5, shrunk by cv2.resize(fx=0.2), 32x32 at random
# corners, as make_cifar_c.py takes them), measured with frost.crop_statistics on 3000 crops
# per photo: see sparsesam/robust/frost.py. The old uncalibrated texture had mean 0.46, std 0.13.
REAL_FROST = {"mean": 0.636, "std": 0.193, "within_std": 0.113, "between_std": 0.152,
              "rgb_ratio": [0.811, 0.9325, 1.0], "spectrum_slope": -1.18}


def test_frost_texture_matches_the_photographs_statistics():
    t = frost_texture(1000, 3, 32, 32, torch.Generator().manual_seed(0), dtype=torch.float64)
    got = crop_statistics(t.permute(0, 2, 3, 1).numpy())
    assert got["mean"] == pytest.approx(REAL_FROST["mean"], abs=0.015)
    assert got["std"] == pytest.approx(REAL_FROST["std"], abs=0.012)
    assert got["within_std"] == pytest.approx(REAL_FROST["within_std"], abs=0.01)
    assert got["between_std"] == pytest.approx(REAL_FROST["between_std"], abs=0.015)
    np.testing.assert_allclose(got["rgb_ratio"], REAL_FROST["rgb_ratio"], atol=0.02)
    assert got["spectrum_slope"] == pytest.approx(REAL_FROST["spectrum_slope"], abs=0.1)


def test_spectrum_slope_of_known_spectra():
    # Gaussian noise with power ~ f^s has slope s; white noise 0.
    g = np.random.default_rng(0)
    size = 32
    f = np.fft.fftfreq(size) * size
    r = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    r[0, 0] = 1
    for s in (0.0, -1.0, -2.0):
        spectrum = np.fft.fft2(g.standard_normal((400, size, size))) * r ** (s / 2)
        noise = np.fft.ifft2(spectrum).real
        assert spectrum_slope(noise) == pytest.approx(s, abs=0.1)


@pytest.mark.skipif(not os.environ.get("SPARSESAM_FROST_PHOTOS"),
                    reason="set SPARSESAM_FROST_PHOTOS to a folder with frost1.png .. frost5.jpg of "
                           "hendrycks/robustness ImageNet-C/create_c to re-measure the calibration")
def test_frost_calibration_against_the_photographs():
    Image = pytest.importorskip("PIL.Image")
    folder = os.environ["SPARSESAM_FROST_PHOTOS"]
    rng = np.random.default_rng(0)
    small = []
    for name in ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg"):
        photo = np.asarray(Image.open(os.path.join(folder, name)).convert("RGB")).astype(np.float64) / 255
        h, w = photo.shape[:2]
        small.append(photo[2::5, 2::5][:int(round(h * 0.2)), :int(round(w * 0.2))])  # cv2.resize fx=fy=0.2
    crops = []
    for _ in range(4000):
        s = small[rng.integers(5)]                                            # idx = np.random.randint(5)
        x0, y0 = rng.integers(0, s.shape[0] - 32), rng.integers(0, s.shape[1] - 32)
        crops.append(s[x0:x0 + 32, y0:y0 + 32])
    real = crop_statistics(np.stack(crops))
    for key in ("mean", "std", "within_std", "between_std"):
        assert real[key] == pytest.approx(REAL_FROST[key], abs=0.01), key
    assert real["spectrum_slope"] == pytest.approx(REAL_FROST["spectrum_slope"], abs=0.05)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    x = natural_images(2, 3, 32)
    with pytest.raises(ValueError, match="corruption"):
        corrupt(x, "speckle_noise", 1)
    for bad in (0, 6, 2.0, True, "3"):
        with pytest.raises(ValueError, match="severity"):
            corrupt(x, "fog", bad)
    with pytest.raises(ValueError, match=r"x must hold values in \[0, 1\]"):
        corrupt(x * 2, "fog", 1)
    with pytest.raises(ValueError, match=r"x must hold values in \[0, 1\]"):
        corrupt(x - 0.5, "fog", 1)
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x must hold values"):
        corrupt(nan, "fog", 1)
    with pytest.raises(ValueError, match="rank 4"):
        corrupt(x[0], "fog", 1)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        corrupt(torch.rand(2, 2, 32, 32), "fog", 1)
    with pytest.raises(TypeError, match="floating"):
        corrupt((x * 255).to(torch.uint8), "fog", 1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        corrupt(x.numpy(), "fog", 1)
