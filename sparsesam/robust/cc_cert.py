r"""CC-Cert: probabilistic certification against random semantic transforms
(Pautov, Tursynbek, Munkhoeva, Muravev, Petiushko & Oseledets, "CC-Cert: A
Probabilistic Approach to Certify General Robustness of Neural Networks",
AAAI 2022), as used by C-SAM to report certified robustness.

The method, for a classifier with probability vector p(x) and a transform
T_theta with theta drawn from a distribution (here uniform on a range):

1. *From discrepancy to prediction.* Let p1 >= p2 be the two largest entries
   of p(x), the margin ``d(x) = (p1 - p2) / 2`` and the discrepancy
   ``Z(x; T) = ||p(x) - p(T(x))||_inf``. If Z < d the predicted class cannot
   change: the top class loses less than d and every other class gains less
   than d, and p1 - d = p2 + d. So

       P_theta(argmax p(T_theta x) != argmax p(x)) <= P_theta(Z >= d).

2. *Chernoff-Cramer bound on the tail.* For every t > 0, Markov's inequality
   applied to e^{tZ} gives

       P(Z >= d) <= inf_{t > 0} E[e^{tZ}] e^{-td}.

3. *Estimating the moment generating function.* E[e^{tZ}] is estimated from
   N transforms theta_1..theta_N drawn independently:
   ``M_N(t) = (1/N) sum_i e^{t Z_i}``. The CC-Cert paper and its code plug
   this sample mean in (``estimator="plugin"``, the default here) and
   minimise ``M_N(t) e^{-td}`` over t; the result estimates the bound
   consistently but is not itself guaranteed.

   With ``delta`` given, sparsesam makes the statement hold with probability
   >= 1 - delta over the draw of the thetas (``estimator="kl"``): since
   Z is in [0, 1], ``Y = (e^{tZ} - 1) / (e^t - 1)`` is in [0, 1], and the
   Chernoff-Hoeffding bound ``P(Ybar <= mu - eps) <= exp(-N KL(mu - eps || mu))``
   (Hoeffding 1963, Thm. 1) gives the upper confidence bound
   ``mu_up = max{mu : KL(Ybar || mu) <= log(K / delta) / N}`` on E[Y]; a union
   bound over the K values of the t grid covers the minimisation. Then
   ``E[e^{tZ}] <= 1 + (e^t - 1) mu_up`` for every t on the grid simultaneously.
   This is an addition to the paper, which does not quantify the error of
   the plug-in estimate; it needs many more samples to certify small
   failure probabilities.

4. *Certificate.* x is certified at confidence 1 - eps for the transform if
   the prediction is correct and the bound is <= eps: then the prediction
   stays correct for a fraction >= 1 - eps of the transforms. Certified
   accuracy is the fraction of test points certified.

The t grid is a log-spaced grid (default 0.1 .. 100, 64 points); t is chosen
per example by minimising the bound on it.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import _checks
from .model_state import eval_mode
from .semantic_transforms import apply_transform, check_range, sample_parameters

Tensor = torch.Tensor

# Examples per step of the bound: keeps the (rows, len(t_grid), n_samples)
# float64 intermediate at ~8 MB for 1000 samples.
_ROWS_PER_CHUNK = 16

def default_t_grid() -> Tensor:
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


def chernoff_cramer_bound(z: Tensor, d: Tensor, *, t_grid: Optional[Tensor] = None,
                          delta: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """Bound on ``P(Z >= d)`` from samples: (bound, minimising t), one of each per row.

    z: (N, M) samples of Z in [0, 1] per example; d: (N,) margins.
    delta None: the paper's plug-in ``min_t mean_i exp(t (Z_i - d))``.
    delta in (0, 1): holds with probability >= 1 - delta (see the module docstring).
    Bounds are capped at 1.
    """
    if z.dim() != 2 or d.shape != z.shape[:1]:
        raise ValueError(f"z must be (N, M) and d (N,), got {tuple(z.shape)} and {tuple(d.shape)}")
    if z.shape[1] == 0:
        raise ValueError("z has no samples (M = 0)")
    t = (default_t_grid() if t_grid is None else torch.as_tensor(t_grid, dtype=torch.float64)).to(z.device)
    if t.dim() != 1 or t.numel() == 0 or not bool((t > 0).all()):
        raise ValueError("t_grid must be a non-empty 1-D sequence of positive numbers")
    if delta is not None:
        delta = _checks.probability("delta", delta)
    bounds, ts = [], []
    for start in range(0, z.shape[0], _ROWS_PER_CHUNK):  # (rows, T, M) float64 stays small
        bound, t_best = _bound_rows(z[start:start + _ROWS_PER_CHUNK], d[start:start + _ROWS_PER_CHUNK], t, delta)
        bounds.append(bound)
        ts.append(t_best)
    return torch.cat(bounds), torch.cat(ts)


def _bound_rows(z: Tensor, d: Tensor, t: Tensor, delta: Optional[float]) -> Tuple[Tensor, Tensor]:
    z = z.to(torch.float64).clamp(0, 1)
    d = d.to(torch.float64)
    m = z.shape[1]
    tz = t.reshape(1, -1, 1) * z.unsqueeze(1)                          # (N, T, M)
    if delta is None:
        # log( mean_i e^{t Z_i} ) - t d, in log space so large t cannot overflow.
        log_bound = torch.logsumexp(tz, dim=2) - math.log(m) - t.reshape(1, -1) * d.reshape(-1, 1)
    else:
        # Y = (e^{tZ} - 1) / (e^t - 1) in [0, 1]; expm1 keeps small t accurate.
        y_mean = (torch.expm1(tz) / torch.expm1(t).reshape(1, -1, 1)).mean(dim=2)
        mu_up = kl_upper_confidence(y_mean, m, math.log(t.numel() / delta))
        mgf_up = 1 + torch.expm1(t).reshape(1, -1) * mu_up
        log_bound = torch.log(mgf_up) - t.reshape(1, -1) * d.reshape(-1, 1)
    best, index = log_bound.min(dim=1)
    return best.exp().clamp(max=1.0), t[index]


@torch.no_grad()
def cc_cert_batch(model: nn.Module, x: Tensor, y: Tensor, *, transform: str, value_range,
                  n_samples: int = 1000, t_grid: Optional[Tensor] = None, delta: Optional[float] = None,
                  seed: int = 0, batch_size: int = 1000) -> dict:
    """CC-Cert bounds for a batch: tensors ``prediction``, ``correct``, ``margin``, ``bound``,
    ``t``, ``z_max`` and ``stable`` (no sampled transform changed the prediction), one per image.

    The model runs in eval mode (restored after); p is the softmax of its output.
    """
    _checks.images("x", x)
    _checks.labels("y", y, x.shape[0])
    value_range = check_range(transform, value_range)
    _checks.positive_int("n_samples", n_samples)
    _checks.positive_int("batch_size", batch_size)
    n = x.shape[0]
    generator = torch.Generator().manual_seed(int(seed))
    params = sample_parameters(transform, value_range, n * n_samples, generator)   # image-major
    with eval_mode(model):
        probs = F.softmax(model(x).float(), dim=1)
        chunks = []
        for start in range(0, n * n_samples, batch_size):
            stop = min(start + batch_size, n * n_samples)
            images = x[torch.arange(start, stop, device=x.device) // n_samples]
            xt = apply_transform(images, transform, params[start:stop])
            chunks.append(F.softmax(model(xt).float(), dim=1))
    transformed = torch.cat(chunks).reshape(n, n_samples, -1)
    z = prediction_discrepancy(probs, transformed)
    margin = top2_margin(probs)
    bound, t_best = chernoff_cramer_bound(z, margin, t_grid=t_grid, delta=delta)
    prediction = probs.argmax(dim=1)
    stable = (transformed.argmax(dim=2) == prediction.unsqueeze(1)).all(dim=1)
    return {"prediction": prediction, "correct": prediction == y.to(prediction.device), "margin": margin,
            "bound": bound, "t": t_best, "z_max": z.amax(dim=1), "stable": stable}


def cc_cert_dataset(model: nn.Module, batches: Iterable[Tuple[Tensor, Tensor]], *,
                    transforms: Mapping[str, Sequence[float]], epsilons: Sequence[float] = (0.01, 0.05, 0.1),
                    n_samples: int = 1000, t_grid: Optional[Tensor] = None, delta: Optional[float] = None,
                    seed: int = 0, batch_size: int = 1000, device: Optional[torch.device] = None,
                    model_name: Optional[str] = None, progress: bool = False) -> dict:
    """Certified accuracy per transform and per failure probability eps (confidence 1 - eps).

    transforms: {name: (low, high)} parameter ranges (see semantic_transforms).
    Returns a JSON-ready dict; per transform: its range, ``certified_accuracy``
    (aligned with ``epsilons``), ``empirically_stable_accuracy`` (correct and
    unchanged on every sampled transform: an upper reference for the
    certificate), ``mean_bound`` and the per-example ``bounds``.
    """
    if not transforms:
        raise ValueError("transforms is empty")
    ranges = {name: check_range(name, r) for name, r in transforms.items()}
    epsilons = [_checks.probability("epsilons", e, open_high=False) for e in epsilons]
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    per = {name: {"correct": [], "bound": [], "stable": []} for name in ranges}
    total = 0
    for b, (x, y) in enumerate(tqdm(batches, desc="CC-Cert", disable=not progress, leave=False)):
        x, y = x.to(device), y.to(device)
        total += len(y)
        for k, (name, value_range) in enumerate(ranges.items()):
            batch_seed = int(np.random.SeedSequence([seed, b, k]).generate_state(1)[0])
            out = cc_cert_batch(model, x, y, transform=name, value_range=value_range, n_samples=n_samples,
                                t_grid=t_grid, delta=delta, seed=batch_seed, batch_size=batch_size)
            per[name]["correct"].append(out["correct"].cpu())
            per[name]["bound"].append(out["bound"].cpu())
            per[name]["stable"].append(out["stable"].cpu())
    if total == 0:
        raise ValueError("batches is empty: nothing to certify")
    results = {}
    for name, acc in per.items():
        correct = torch.cat(acc["correct"])
        bound = torch.cat(acc["bound"])
        stable = torch.cat(acc["stable"])
        results[name] = {
            "range": list(ranges[name]),
            "clean_accuracy": correct.double().mean().item(),
            "certified_accuracy": [(correct & (bound <= e)).double().mean().item() for e in epsilons],
            "empirically_stable_accuracy": (correct & stable).double().mean().item(),
            "mean_bound": bound.mean().item(),
            "bounds": bound.tolist(),
        }
    return {"model": model_name or type(model).__name__, "estimator": "plugin" if delta is None else "kl",
            "delta": delta, "n_samples": n_samples, "seed": seed, "examples": total,
            "epsilons": epsilons, "transforms": results}
