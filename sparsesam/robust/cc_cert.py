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

Non-finite logits (sparsesam.robust.predictions): an image whose clean
logits are not all finite predicts no class, so it is neither correct nor
certified (bound 1, margin 0); a transform on which the logits are not all
finite counts as the worst discrepancy, ``Z = 1 >= d``, i.e. as a change of
prediction, which keeps the bound an upper bound. Neither can certify.

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
from .predictions import NO_CLASS, check_logits, finite_rows, predicted_classes
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
    ``prediction`` is NO_CLASS (-1) where the clean logits are not finite.

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
        logits = model(x)
        check_logits(logits, n)
        prediction = predicted_classes(logits)                  # NO_CLASS where not finite
        probs = F.softmax(logits.float(), dim=1)
        chunks, finite = [], []
        for start in range(0, n * draws, batch_size):
            stop = min(start + batch_size, n * draws)
            images = x[torch.arange(start, stop, device=x.device) // draws]
            xt = apply_transform(images, transform, params[start:stop])
            out = model(xt)
            check_logits(out, stop - start)
            chunks.append(F.softmax(out.float(), dim=1))
            finite.append(finite_rows(out))
    transformed = torch.cat(chunks).reshape(n, draws, -1)
    transformed_finite = torch.cat(finite).reshape(n, draws)
    clean_finite = prediction != NO_CLASS
    # A non-finite output on either side is the worst discrepancy (see the module docstring).
    z = prediction_discrepancy(probs, transformed)     # groups = consecutive blocks of n_samples
    z = torch.where(transformed_finite & clean_finite.unsqueeze(1), z, torch.ones_like(z))
    margin = torch.where(clean_finite, top2_margin(probs), torch.zeros_like(probs[:, 0]))
    bound, t_best = estimate_bound(z, margin, estimator=estimator, n_bounds=n_bounds, delta=delta, t_grid=t_grid)
    bound = torch.where(clean_finite, bound, torch.ones_like(bound))
    stable = (transformed_finite & (transformed.argmax(dim=2) == prediction.unsqueeze(1))).all(dim=1) & clean_finite
    correct = clean_finite & (prediction == y.to(prediction.device))
    return {"prediction": prediction, "correct": correct, "margin": margin,
            "bound": bound, "t": t_best, "z_max": z.amax(dim=1), "stable": stable}


def certified_fraction(correct: Tensor, bound: Tensor, epsilon: float) -> float:
    """Fraction of examples that are correct with bound < epsilon (script.py's ``b < th and correct``)."""
    epsilon = _checks.probability("epsilon", epsilon, open_low=False, open_high=False)
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
