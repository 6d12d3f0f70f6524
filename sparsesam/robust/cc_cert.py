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
   applied to e^{tZ} gives ``P(Z >= d) <= inf_{t > 0} E[e^{tZ}] e^{-td}``.

3. *Estimating it from sampled transforms* (sparsesam.robust.cc_cert_bounds):
   by default exactly as the official code (github.com/mikhailpautov/cccert,
   ``estimates/code/bounds.py::get_bounds`` with the arguments of
   ``estimates/script.py``): ``n_bounds = 10`` groups of ``n_samples = 100``
   transforms per image, per group the plug-in ``min_t mean(e^{tZ}) e^{-td}``
   over t on ``linspace(1e-4, 1e4, 500)``, the maximum over the groups,
   divided by ``delta = 0.9``, capped at 1 (``estimator="official"``).
   ``estimator="plugin"`` is the single pooled plug-in estimate over all
   ``n_bounds * n_samples`` draws (no groups, no division), and
   ``estimator="kl"`` a finite-sample guarantee added by sparsesam.

4. *Certificate.* x is certified at failure probability eps if the prediction
   is correct and the bound is < eps (strictly, as script.py's ``b < th``):
   then the prediction stays correct for a fraction >= 1 - eps of the
   transforms. Certified accuracy is the fraction of test points certified.

The transforms come from a seeded generator (one stream per batch and
transform), so results are reproducible; the official code draws them from the
global RNG through kornia.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import _checks
from .cc_cert_bounds import (ESTIMATORS, OFFICIAL_DELTA, OFFICIAL_N_BOUNDS, OFFICIAL_N_SAMPLES,  # noqa: F401
                             chernoff_cramer_bound, default_t_grid, kl_upper_confidence, official_bound,
                             prediction_discrepancy, top2_margin)
from .model_state import eval_mode
from .semantic_transforms import apply_transform, check_range, sample_parameters

Tensor = torch.Tensor


def _check_estimator(estimator: str, delta: Optional[float]) -> Optional[float]:
    """The delta each estimator uses: the official divisor (default 0.9), the KL confidence, or none."""
    _checks.choice("estimator", estimator, ESTIMATORS)
    if estimator == "official":
        return _checks.probability("delta", OFFICIAL_DELTA if delta is None else delta, open_high=False)
    if estimator == "kl":
        if delta is None:
            raise ValueError('estimator="kl" needs delta, the probability that its bound may fail')
        return _checks.probability("delta", delta)
    if delta is not None:
        raise ValueError(f'estimator="plugin" takes no delta, got delta={delta}')
    return None


def estimate_bound(z: Tensor, d: Tensor, *, estimator: str = "official", n_bounds: int = OFFICIAL_N_BOUNDS,
                   delta: Optional[float] = None, t_grid: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(bound, t) per row of z (N, n_bounds * n_samples) with the named estimator.

    delta: "official": the divisor (None = 0.9); "kl": the failure probability
    of the bound (required); "plugin": must be None.
    """
    delta = _check_estimator(estimator, delta)
    if estimator == "official":
        return official_bound(z, d, n_bounds=n_bounds, delta=delta, t_grid=t_grid)
    return chernoff_cramer_bound(z, d, t_grid=t_grid, delta=delta)


@torch.no_grad()
def cc_cert_batch(model: nn.Module, x: Tensor, y: Tensor, *, transform: str, value_range,
                  n_samples: int = OFFICIAL_N_SAMPLES, n_bounds: int = OFFICIAL_N_BOUNDS,
                  estimator: str = "official", t_grid: Optional[Tensor] = None, delta: Optional[float] = None,
                  seed: int = 0, batch_size: int = 1000) -> dict:
    """CC-Cert bounds for a batch: tensors ``prediction``, ``correct``, ``margin``, ``bound``,
    ``t``, ``z_max`` and ``stable`` (no sampled transform changed the prediction), one per image.

    Each image gets ``n_bounds * n_samples`` transforms (the official code's
    ``nbounds * nsamples``); n_samples is the size of one group. See
    ``estimate_bound`` for ``estimator`` and ``delta``. The model runs in eval
    mode (restored after); p is the softmax of its output.
    """
    _checks.images("x", x)
    _checks.labels("y", y, x.shape[0])
    value_range = check_range(transform, value_range)
    _checks.positive_int("n_samples", n_samples)
    _checks.positive_int("n_bounds", n_bounds)
    _checks.positive_int("batch_size", batch_size)
    delta = _check_estimator(estimator, delta)
    n, draws = x.shape[0], n_bounds * n_samples
    generator = torch.Generator().manual_seed(int(seed))
    params = sample_parameters(transform, value_range, n * draws, generator)   # image-major
    with eval_mode(model):
        probs = F.softmax(model(x).float(), dim=1)
        chunks = []
        for start in range(0, n * draws, batch_size):
            stop = min(start + batch_size, n * draws)
            images = x[torch.arange(start, stop, device=x.device) // draws]
            xt = apply_transform(images, transform, params[start:stop])
            chunks.append(F.softmax(model(xt).float(), dim=1))
    transformed = torch.cat(chunks).reshape(n, draws, -1)
    z = prediction_discrepancy(probs, transformed)     # groups = consecutive blocks of n_samples
    margin = top2_margin(probs)
    bound, t_best = estimate_bound(z, margin, estimator=estimator, n_bounds=n_bounds, delta=delta, t_grid=t_grid)
    prediction = probs.argmax(dim=1)
    stable = (transformed.argmax(dim=2) == prediction.unsqueeze(1)).all(dim=1)
    return {"prediction": prediction, "correct": prediction == y.to(prediction.device), "margin": margin,
            "bound": bound, "t": t_best, "z_max": z.amax(dim=1), "stable": stable}


def certified_fraction(correct: Tensor, bound: Tensor, epsilon: float) -> float:
    """Fraction of examples that are correct with bound < epsilon (script.py's ``b < th and correct``)."""
    return (correct & (bound < epsilon)).double().mean().item()


def cc_cert_dataset(model: nn.Module, batches: Iterable[Tuple[Tensor, Tensor]], *,
                    transforms: Mapping[str, Sequence[float]], epsilons: Sequence[float] = (0.01, 0.05, 0.1),
                    n_samples: int = OFFICIAL_N_SAMPLES, n_bounds: int = OFFICIAL_N_BOUNDS,
                    estimator: str = "official", t_grid: Optional[Tensor] = None, delta: Optional[float] = None,
                    seed: int = 0, batch_size: int = 1000, device: Optional[torch.device] = None,
                    model_name: Optional[str] = None, progress: bool = False) -> dict:
    """Certified accuracy per transform and per failure probability eps (confidence 1 - eps).

    transforms: {name: (low, high)} parameter ranges (see semantic_transforms).
    ``n_bounds * n_samples`` transforms per image and transform; ``estimator``
    and ``delta`` as in ``estimate_bound`` (default: the official bound).
    Returns a JSON-ready dict; per transform: its range, ``certified_accuracy``
    (aligned with ``epsilons``), ``empirically_stable_accuracy`` (correct and
    unchanged on every sampled transform: an upper reference for the
    certificate), ``mean_bound`` and the per-example ``bounds``.
    """
    if not transforms:
        raise ValueError("transforms is empty")
    ranges = {name: check_range(name, r) for name, r in transforms.items()}
    epsilons = [_checks.probability("epsilons", e, open_high=False) for e in epsilons]
    delta = _check_estimator(estimator, delta)
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
                                n_bounds=n_bounds, estimator=estimator, t_grid=t_grid, delta=delta,
                                seed=batch_seed, batch_size=batch_size)
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
            "certified_accuracy": [certified_fraction(correct, bound, e) for e in epsilons],
            "empirically_stable_accuracy": (correct & stable).double().mean().item(),
            "mean_bound": bound.mean().item(),
            "bounds": bound.tolist(),
        }
    grid = default_t_grid() if t_grid is None else torch.as_tensor(t_grid, dtype=torch.float64)
    return {"model": model_name or type(model).__name__, "estimator": estimator, "delta": delta,
            "n_samples": n_samples, "n_bounds": n_bounds, "transforms_per_image": n_samples * n_bounds,
            "t_grid": {"min": float(grid.min()), "max": float(grid.max()), "points": int(grid.numel())},
            "seed": seed, "examples": total, "epsilons": epsilons, "transforms": results}
