"""Parametrised semantic transforms T_theta for CC-Cert, batched with one theta per image.

Parameters and their meaning (theta drawn uniformly from a (low, high) range):

=============  ===============================================================
rotation       angle in degrees, about the image centre
translation    shift as a fraction of the image size; x and y drawn independently
scaling        zoom factors about the centre (> 1 magnifies), x and y drawn independently
brightness     added to every pixel
contrast       multiplies every pixel (kornia's ``adjust_contrast``, used by the CC-Cert code)
blur           Gaussian blur sigma in pixels (>= 0)
gamma          exponent of the gamma correction ``x ** gamma`` (> 0)
=============  ===============================================================

Geometric transforms resample bilinearly and fill uncovered pixels with 0
(the CC-Cert code's kornia default). Every output is clipped to [0, 1].

Scaling follows the official CC-Cert code (``random_augment`` in
``estimates/code/aug_aug.py``): it draws one factor per axis,
``s = (U(min_1, max_1), U(min_2, max_2))``, as two independent ``torch.rand``
calls, and passes the (N, 2) tensor of (x, y) factors to ``kornia.scale``
(about the image centre). sparsesam draws both factors from the same range;
``apply_transform`` also takes one factor per image, applied to both axes.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from . import _checks
from . import _image_ops as ops

Tensor = torch.Tensor

TRANSFORMS = ("rotation", "translation", "scaling", "brightness", "contrast", "blur", "gamma")

# Transforms with two parameters per image: (x, y).
_PER_AXIS = ("translation", "scaling")

# Smallest legal parameter of each transform (None: any real number).
_LOWER_BOUNDS: Dict[str, float] = {"scaling": 1e-6, "contrast": 0.0, "blur": 0.0, "gamma": 1e-6}

# Ranges of the C-SAM / CC-Cert experiments' magnitude, as a starting point.
DEFAULT_RANGES: Dict[str, Tuple[float, float]] = {
    "rotation": (-10.0, 10.0),
    "translation": (-0.1, 0.1),
    "scaling": (0.9, 1.1),
    "brightness": (-0.2, 0.2),
    "contrast": (0.8, 1.2),
    "blur": (0.0, 1.0),
    "gamma": (0.8, 1.25),
}


def check_range(transform: str, value_range) -> Tuple[float, float]:
    _checks.choice("transform", transform, TRANSFORMS)
    return _checks.value_range(f"range of {transform}", value_range, low_bound=_LOWER_BOUNDS.get(transform))


def sample_parameters(transform: str, value_range, n: int, generator: torch.Generator) -> Tensor:
    """n parameters ((n, 2) for translation and scaling: x, y independently) drawn
    uniformly from ``value_range``, float64 on the CPU."""
    low, high = check_range(transform, value_range)
    shape = (n, 2) if transform in _PER_AXIS else (n,)
    return ops.uniform(shape, low, high, generator)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    grid = ops.normalized_grid(theta.to(x.dtype), *x.shape[-2:])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def apply_transform(x: Tensor, transform: str, params: Tensor) -> Tensor:
    """T_theta(x) for a (N, C, H, W) batch in [0, 1], with params[i] for image i.

    params: (N,), or (N, 2) = (x, y) for translation; scaling takes (N, 2)
    (one factor per axis) or (N,) (the same factor on both axes).
    """
    _checks.choice("transform", transform, TRANSFORMS)
    if not isinstance(params, torch.Tensor):
        raise TypeError(f"params must be a torch.Tensor, got {type(params).__name__}")
    n, _, h, w = x.shape
    want = [(n, 2)] if transform == "translation" else [(n, 2), (n,)] if transform == "scaling" else [(n,)]
    if tuple(params.shape) not in want:
        shapes = " or ".join(str(s) for s in want)
        raise ValueError(f"params for {transform} must have shape {shapes}, got {tuple(params.shape)}")
    p = params.to(device=x.device, dtype=torch.float64)
    if transform == "scaling" and p.dim() == 1:
        p = p.unsqueeze(1).expand(n, 2)
    if transform in ("rotation", "translation", "scaling"):
        theta = torch.zeros(n, 2, 3, dtype=torch.float64, device=x.device)
        if transform == "rotation":
            # Output pixel -> source pixel: rotate back by the angle. In
            # normalised coordinates x spans w and y spans h, hence the aspect terms.
            a = torch.deg2rad(p)
            theta[:, 0, 0] = torch.cos(a)
            theta[:, 0, 1] = -torch.sin(a) * h / w
            theta[:, 1, 0] = torch.sin(a) * w / h
            theta[:, 1, 1] = torch.cos(a)
        elif transform == "translation":
            theta[:, 0, 0] = theta[:, 1, 1] = 1.0
            theta[:, 0, 2] = -2.0 * p[:, 0]  # shift by a fraction f of the size = 2 f in [-1, 1] units
            theta[:, 1, 2] = -2.0 * p[:, 1]
        else:
            # Output pixel -> source pixel: divide by the factor of each axis.
            theta[:, 0, 0] = 1.0 / p[:, 0]
            theta[:, 1, 1] = 1.0 / p[:, 1]
        out = _affine(x, theta)
    elif transform == "brightness":
        out = x + p.to(x.dtype).reshape(n, 1, 1, 1)
    elif transform == "contrast":
        out = x * p.to(x.dtype).reshape(n, 1, 1, 1)
    elif transform == "blur":
        out = ops.gaussian_filter(x, p.to(x.dtype), truncate=3.0, mode="reflect")
    else:  # gamma
        out = x.clamp_min(0) ** p.to(x.dtype).reshape(n, 1, 1, 1)
    return out.clamp(0, 1)


def random_transform(x: Tensor, transform: str, value_range, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """(T_theta(x), theta) with theta drawn independently per image."""
    params = sample_parameters(transform, value_range, x.shape[0], generator)
    return apply_transform(x, transform, params), params

