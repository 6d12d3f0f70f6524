r"""The tail bounds of CC-Cert (Pautov et al., AAAI 2022) computed from samples of the
discrepancy ``Z = ||p(x) - p(T(x))||_inf`` and the margin ``d = (p1 - p2) / 2``.

Every estimator starts from the Chernoff-Cramer inequality
``P(Z >= d) <= inf_{t > 0} E[e^{tZ}] e^{-td}`` and differs in how it estimates
``E[e^{tZ}]`` from the sampled Z:

``"official"`` (the default of sparsesam.robust.cc_cert)
    ``get_bounds`` of the official code (github.com/mikhailpautov/cccert,
    ``estimates/code/bounds.py``, called by ``estimates/script.py``): the
    ``n_bounds * n_samples`` samples of an image are split into ``n_bounds``
    consecutive groups of ``n_samples``; per group ``R(t) = mean(e^{tZ}) / e^{td}``
    is minimised over t on ``linspace(1e-4, 1e4, 500)``; the bound is the
    *maximum* over the groups divided by ``delta`` (0.9 in script.py), capped
    at 1. script.py's defaults are ``--nsamples 100 --nbounds 10 --delta 0.9``.
``"plugin"``
    The plug-in estimate with all samples in one group and no division:
    ``min_t mean_i e^{t (Z_i - d)}``. It estimates the Chernoff-Cramer bound
    consistently but is not itself guaranteed; the official code does *not*
    use it (it takes the maximum over groups and divides by delta).
``"kl"``
    An addition of sparsesam, not in the paper or its code: a bound that holds
    with probability >= 1 - delta over the draw of the transforms. Since Z is
    in [0, 1], ``Y = (e^{tZ} - 1) / (e^t - 1)`` is in [0, 1], and the
    Chernoff-Hoeffding bound ``P(Ybar <= mu - eps) <= exp(-N KL(mu - eps || mu))``
    (Hoeffding 1963, Thm. 1) gives the upper confidence bound
    ``mu_up = max{mu : KL(Ybar || mu) <= log(K / delta) / N}`` on E[Y]; a union
    bound over the K values of the t grid covers the minimisation, and
    ``E[e^{tZ}] <= 1 + (e^t - 1) mu_up``. It needs many more samples than the
    others to certify small failure probabilities.

Kept deviation from the official code, on purpose: the official code evaluates
``mean(exp(tZ)) / exp(td)`` in float32, where ``exp`` overflows for ``tZ > 88``
(most of the grid up to t = 1e4) and the ratio becomes inf / inf = NaN (which
``topk`` skips) or finite / inf = 0. sparsesam evaluates the same ratio as
``logsumexp(tZ) - log(m) - td`` in float64, the exact value of the official
formula at every grid point. Where the official float32 value is finite the two
agree to float32 rounding; where it is 0 or NaN the exact bound is below
~e^-88 or not the minimum, so certificates at any practical eps are unchanged.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import _checks

Tensor = torch.Tensor

ESTIMATORS = ("official", "plugin", "kl")

# estimates/script.py: get_bounds(..., tmin=1e-4, tmax=1e4, tsteps=500), delta 0.9, 10 bounds of 100 samples.
OFFICIAL_T_MIN, OFFICIAL_T_MAX, OFFICIAL_T_STEPS = 1e-4, 1e4, 500
OFFICIAL_DELTA = 0.9
OFFICIAL_N_BOUNDS = 10
OFFICIAL_N_SAMPLES = 100

# Examples per step of a bound: keeps the (rows, len(t_grid), samples) float64
# intermediate at 16 MB for the official 500-point grid and 1000 samples.
_ROWS_PER_CHUNK = 4


def default_t_grid() -> Tensor:
    """The official t grid, ``linspace(1e-4, 1e4, 500)`` (in float64)."""
    return torch.linspace(OFFICIAL_T_MIN, OFFICIAL_T_MAX, OFFICIAL_T_STEPS, dtype=torch.float64)


def kl_t_grid() -> Tensor:
    """The default t grid of the "kl" estimator: 64 log-spaced points in [0.1, 100].

    Its union bound costs log(K / delta), so it wants few points where the
    minimum lies; the official grid (step 20 from 1e-4) has none in (0, 20),
    where the KL bound's minimum usually is.
    """
    return torch.logspace(-1, 2, 64, dtype=torch.float64)


def top2_margin(probs: Tensor) -> Tensor:
    """``d(x) = (p1 - p2) / 2`` of each row of a (N, K) probability matrix."""
    top = probs.topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]) / 2


def prediction_discrepancy(probs: Tensor, transformed_probs: Tensor) -> Tensor:
    """``Z = ||p(x) - p(T(x))||_inf``: (N, K) and (N, M, K) -> (N, M)."""
    return (probs.unsqueeze(1) - transformed_probs).abs().amax(dim=-1)


def _kl_bernoulli(p: Tensor, q: Tensor) -> Tensor:
    p = p.clamp(0, 1)
    q = q.clamp(1e-300, 1 - 1e-16)
    first = torch.where(p > 0, p * torch.log(p.clamp_min(1e-300) / q), torch.zeros_like(p))
    second = torch.where(p < 1, (1 - p) * torch.log((1 - p).clamp_min(1e-300) / (1 - q)), torch.zeros_like(p))
    return first + second


def kl_upper_confidence(mean: Tensor, n: int, log_term: float, iterations: int = 60) -> Tensor:
    """``max{mu in [mean, 1] : KL(mean || mu) <= log_term / n}`` by bisection (elementwise)."""
    target = log_term / n
    low, high = mean.clone(), torch.ones_like(mean)
    for _ in range(iterations):
        mid = (low + high) / 2
        inside = _kl_bernoulli(mean, mid) <= target
        low = torch.where(inside, mid, low)
        high = torch.where(inside, high, mid)
    return low


def _check_samples(z: Tensor, d: Tensor, t_grid, default=default_t_grid) -> Tensor:
    if not isinstance(z, Tensor) or not isinstance(d, Tensor):
        raise TypeError(f"z and d must be torch.Tensors, got {type(z).__name__} and {type(d).__name__}")
    if z.dim() != 2 or d.shape != z.shape[:1]:
        raise ValueError(f"z must be (N, M) and d (N,), got {tuple(z.shape)} and {tuple(d.shape)}")
    if z.shape[1] == 0:
        raise ValueError("z has no samples (M = 0)")
    # A NaN sample would make the bound NaN, which compares as "not certified"
    # silently; cc_cert_batch maps non-finite model outputs to Z = 1 first.
    if not bool(torch.isfinite(z).all()):
        raise ValueError("z must be finite (a discrepancy in [0, 1])")
    if not bool(torch.isfinite(d).all()):
        raise ValueError("d must be finite (a margin in [0, 1/2])")
    t = (default() if t_grid is None else torch.as_tensor(t_grid, dtype=torch.float64)).to(z.device)
    if t.dim() != 1 or t.numel() == 0 or not bool(((t > 0) & torch.isfinite(t)).all()):
        raise ValueError("t_grid must be a non-empty 1-D sequence of finite positive numbers")
    return t


def _log_plugin(z: Tensor, d: Tensor, t: Tensor) -> Tensor:
    """``log(mean_i e^{t Z_i}) - t d`` over the last axis of z: (..., M), (...,) -> (..., T).

    In log space so that t up to 1e4 cannot overflow.
    """
    tz = t.reshape(*([1] * (z.dim() - 1)), -1, 1) * z.unsqueeze(-2)     # (..., T, M)
    return torch.logsumexp(tz, dim=-1) - math.log(z.shape[-1]) - t * d.unsqueeze(-1)


def official_bound(z: Tensor, d: Tensor, *, n_bounds: int = OFFICIAL_N_BOUNDS, delta: float = OFFICIAL_DELTA,
                   t_grid: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The official CC-Cert bound on ``P(Z >= d)``: (bound, t), one of each per row.

    z: (N, n_bounds * n_samples) samples per example, grouped as the official
    ``Y.view(-1, nbounds, nsamples)`` (consecutive blocks of n_samples);
    d: (N,) margins. Per group ``min_t mean(e^{tZ}) / e^{td}``; the maximum over
    the groups, divided by ``delta``, capped at 1. ``t`` is the minimiser of the
    group that gave the maximum.
    """
    t = _check_samples(z, d, t_grid)
    n_bounds = _checks.positive_int("n_bounds", n_bounds)
    delta = _checks.probability("delta", delta, open_high=False)
    if z.shape[1] % n_bounds:
        raise ValueError(f"z has {z.shape[1]} samples per row, not a multiple of n_bounds={n_bounds}")
    bounds, ts = [], []
    for start in range(0, z.shape[0], _ROWS_PER_CHUNK):
        zc = z[start:start + _ROWS_PER_CHUNK].to(torch.float64).clamp(0, 1)
        dc = d[start:start + _ROWS_PER_CHUNK].to(torch.float64)
        groups = zc.reshape(zc.shape[0], n_bounds, -1)                           # (rows, G, m)
        log_r = _log_plugin(groups, dc.reshape(-1, 1).expand(-1, n_bounds), t)  # (rows, G, T)
        per_group, index = log_r.min(dim=2)                                     # min over t
        worst, group = per_group.max(dim=1)                                     # max over groups
        bounds.append((worst.exp() / delta).clamp(max=1.0))
        ts.append(t[index.gather(1, group.unsqueeze(1)).squeeze(1)])
    return torch.cat(bounds), torch.cat(ts)


def chernoff_cramer_bound(z: Tensor, d: Tensor, *, t_grid: Optional[Tensor] = None,
                          delta: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """The pooled bound on ``P(Z >= d)``: (bound, minimising t), one of each per row.

    z: (N, M) samples of Z in [0, 1] per example; d: (N,) margins.
    delta None: the plug-in ``min_t mean_i exp(t (Z_i - d))`` (estimator "plugin").
    delta in (0, 1): the KL bound, which holds with probability >= 1 - delta
    (estimator "kl", see the module docstring). Bounds are capped at 1.
    t_grid None: the official grid for the plug-in, ``kl_t_grid()`` for the KL bound.
    """
    t = _check_samples(z, d, t_grid, default_t_grid if delta is None else kl_t_grid)
    if delta is not None:
        delta = _checks.probability("delta", delta)
    bounds, ts = [], []
    for start in range(0, z.shape[0], _ROWS_PER_CHUNK):  # (rows, T, M) float64 stays small
        bound, t_best = _pooled_rows(z[start:start + _ROWS_PER_CHUNK], d[start:start + _ROWS_PER_CHUNK], t, delta)
        bounds.append(bound)
        ts.append(t_best)
    return torch.cat(bounds), torch.cat(ts)


def _pooled_rows(z: Tensor, d: Tensor, t: Tensor, delta: Optional[float]) -> Tuple[Tensor, Tensor]:
    z = z.to(torch.float64).clamp(0, 1)
    d = d.to(torch.float64)
    m = z.shape[1]
    if delta is None:
        log_bound = _log_plugin(z, d, t)
    else:
        tz = t.reshape(1, -1, 1) * z.unsqueeze(1)                          # (N, T, M)
        tt = t.reshape(1, -1, 1)
        # Y = (e^{tZ} - 1) / (e^t - 1) in [0, 1], written as
        # e^{t(Z - 1)} (1 - e^{-tZ}) / (1 - e^{-t}) so that t up to 1e4 cannot
        # overflow; expm1 keeps small t accurate.
        y = torch.exp(tz - tt) * torch.expm1(-tz) / torch.expm1(-tt)
        mu_up = kl_upper_confidence(y.mean(dim=2), m, math.log(t.numel() / delta))
        # log(1 + (e^t - 1) mu_up) = log((1 - mu_up) + e^t mu_up), without forming e^t.
        log_mgf = torch.logaddexp(torch.log1p(-mu_up), t.reshape(1, -1) + torch.log(mu_up))
        log_bound = log_mgf - t.reshape(1, -1) * d.reshape(-1, 1)
    best, index = log_bound.min(dim=1)
    return best.exp().clamp(max=1.0), t[index]
