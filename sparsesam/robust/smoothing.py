"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019).

The smoothed classifier ``g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c)`` is
certified by Monte Carlo, as in the paper's CERTIFY / PREDICT:

* CERTIFY: n0 noisy copies choose the top class cA; n more count how often
  f returns cA; with probability >= 1 - alpha, ``pA >= pA_lower``, the
  one-sided Clopper-Pearson bound. If pA_lower > 1/2, g returns cA within
  the L2 radius ``sigma * Phi^-1(pA_lower)``; otherwise it abstains.
* PREDICT: the top two counts of n samples; abstain unless a two-sided
  binomial test rejects "both equally likely" at level alpha.

Noise is added to the [0, 1] image and not clipped (clipping would break the
Gaussian assumption); the model sees those noisy images. Noise is drawn in
batches from a generator seeded per call, so results are reproducible.

Non-finite logits: a noisy copy on which the model outputs NaN or inf votes
for no class (sparsesam.robust.predictions). The base classifier is then f
with one more output, "no class", which is never cA, so the certificate
stays sound: such draws only lower pA's bound. When no draw names a class,
PREDICT and CERTIFY abstain (Cohen's code would count the argmax of NaN,
class 0, as a vote and could certify it).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._extras import require
from . import _checks
from .model_state import eval_mode
from .predictions import NO_CLASS, check_logits, predicted_classes

ABSTAIN = -1


def _stats():
    return require("scipy.stats", extra="robust", purpose="randomized smoothing")


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion.

    ``Beta.ppf(alpha, k, n - k + 1)`` (0 when k = 0): the bound
    ``proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]`` of Cohen's code.
    """
    if not 0 <= successes <= trials or trials < 1:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got successes={successes}, trials={trials}")
    _checks.probability("alpha", alpha)
    if successes == 0:
        return 0.0
    return float(_stats().beta.ppf(alpha, successes, trials - successes + 1))


def certified_radius(p_lower: float, sigma: float) -> float:
    """``sigma * Phi^-1(p_lower)``: the L2 radius certified when pA >= p_lower > 1/2."""
    _checks.positive("sigma", sigma)
    _checks.probability("p_lower", p_lower)  # 1 would give an infinite radius
    return float(sigma * _stats().norm.ppf(p_lower))


def largest_certified_radius(n: int, alpha: float, sigma: float) -> float:
    """The largest radius ``certify`` can return with ``n`` samples: every sample votes for the top class.

    Then the Clopper-Pearson bound is ``alpha ** (1 / n)``, so the radius is
    ``sigma * Phi^-1(alpha ** (1 / n))`` (0.80 at sigma 0.25, n = 10,000, alpha = 0.001). Certified
    accuracy at any larger radius is 0 by construction, whatever the model.
    """
    _checks.positive_int("n", n)
    return certified_radius(clopper_pearson_lower(n, n, alpha), sigma)


def _check_common(model, x, sigma, n, alpha, batch_size):
    if not callable(model):
        raise TypeError(f"model must be an nn.Module or callable, got {type(model).__name__}")
    _checks.image("x", x)
    _checks.positive("sigma", sigma)
    _checks.positive_int("n", n)
    _checks.probability("alpha", alpha)
    _checks.positive_int("batch_size", batch_size)


@torch.no_grad()
def sample_counts(model: nn.Module, x: torch.Tensor, sigma: float, num: int, batch_size: int,
                  generator: torch.Generator) -> np.ndarray:
    """How often ``model(x + sigma * noise)`` predicts each class, over ``num`` noise draws.

    Draws whose logits are not all finite predict no class and are in no
    count, so the counts may sum to less than ``num``.
    """
    counts: Optional[np.ndarray] = None
    remaining = num
    while remaining > 0:
        this = min(batch_size, remaining)
        batch = x.unsqueeze(0).expand(this, *x.shape)
        noise = torch.randn(batch.shape, generator=generator, device=x.device, dtype=x.dtype)
        logits = model(batch + sigma * noise)
        check_logits(logits, this)
        if counts is None:
            counts = np.zeros(logits.shape[1], dtype=np.int64)
        classes = predicted_classes(logits).cpu().numpy()
        counts += np.bincount(classes[classes != NO_CLASS], minlength=len(counts))[:len(counts)]
        remaining -= this
    return counts


def _generator(x: torch.Tensor, seed: int) -> torch.Generator:
    return torch.Generator(device=x.device).manual_seed(int(seed))


def predict(model: nn.Module, x: torch.Tensor, sigma: float, n: int, alpha: float, batch_size: int, *,
            seed: int = 0) -> int:
    """The smoothed prediction for one (C, H, W) image, or ABSTAIN (-1).

    Abstains when the two-sided binomial test of the top two counts
    (``binomtest(n1, n1 + n2, 0.5)``) has a p-value above alpha, so a wrong
    answer has probability at most alpha; also when no draw predicts a class
    (the model's logits were never finite).
    """
    _check_common(model, x, sigma, n, alpha, batch_size)
    with eval_mode(model):
        counts = sample_counts(model, x, sigma, n, batch_size, _generator(x, seed))
    order = np.argsort(-counts, kind="stable")
    n1 = int(counts[order[0]])
    n2 = int(counts[order[1]]) if len(counts) > 1 else 0
    if n1 == 0:
        return ABSTAIN
    if _stats().binomtest(n1, n1 + n2, 0.5).pvalue > alpha:
        return ABSTAIN
    return int(order[0])


def certify(model: nn.Module, x: torch.Tensor, sigma: float, n0: int, n: int, alpha: float, batch_size: int, *,
            seed: int = 0) -> Tuple[int, float]:
    """(prediction, L2 radius) of the smoothed classifier at one (C, H, W) image, or (ABSTAIN, 0.0).

    Selection and estimation use separate noise draws (both from ``seed``).
    Abstains when no selection draw predicts a class (non-finite logits).
    """
    _check_common(model, x, sigma, n, alpha, batch_size)
    _checks.positive_int("n0", n0)
    if n0 > n:
        raise ValueError(f"n0 (selection samples, {n0}) must not exceed n (estimation samples, {n})")
    generator = _generator(x, seed)
    with eval_mode(model):
        selection = sample_counts(model, x, sigma, n0, batch_size, generator)
        if selection.max() == 0:
            return ABSTAIN, 0.0
        top = int(np.argmax(selection))
        estimation = sample_counts(model, x, sigma, n, batch_size, generator)
    p_lower = clopper_pearson_lower(int(estimation[top]), n, alpha)
    if p_lower < 0.5:
        return ABSTAIN, 0.0
    return top, certified_radius(p_lower, sigma)


def certify_dataset(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], *, sigma: float,
                    n0: int = 100, n: int = 100_000, alpha: float = 0.001, batch_size: int = 1000, seed: int = 0,
                    skip: int = 1, max_index: Optional[int] = None, device: Optional[torch.device] = None,
                    model_name: Optional[str] = None, progress: bool = False) -> dict:
    """``certify`` the examples of ``batches`` that Cohen's ``code/certify.py`` certifies.

    certify.py runs ``for i in range(len(dataset)): if i % args.skip != 0:
    continue; if i == args.max: break``: ``skip`` certifies every skip-th
    example (indices 0, skip, 2 skip, ...) and ``max_index`` (its ``--max``,
    default -1 = no limit, here None) stops at dataset index ``max_index``, so
    the certified indices are ``range(0, max_index, skip)``. With skip = 1,
    max_index is the number of examples certified.

    Deviation, on purpose: certify.py only stops when ``max`` is itself a
    multiple of ``skip`` (the ``break`` sits after the ``continue``); otherwise
    it certifies the whole dataset. Here indices >= max_index are never
    certified, whatever skip.

    Example i uses seed ``seed + i``. Returns the settings and one record per
    certified example: ``{"index", "label", "prediction", "radius", "correct"}``.
    """
    # Checked here too, so bad settings fail before the data is read.
    if not callable(model):
        raise TypeError(f"model must be an nn.Module or callable, got {type(model).__name__}")
    _checks.positive("sigma", sigma)
    _checks.positive_int("n0", n0)
    _checks.positive_int("n", n)
    _checks.probability("alpha", alpha)
    _checks.positive_int("batch_size", batch_size)
    _checks.positive_int("skip", skip)
    if max_index is not None:
        _checks.positive_int("max_index", max_index)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    records = []
    index = 0
    expected = None if max_index is None else len(range(0, max_index, skip))
    bar = tqdm(total=expected, desc=f"certify sigma={sigma}", disable=not progress, leave=False)
    for x_batch, y_batch in batches:
        _checks.labels("labels", y_batch, x_batch.shape[0])
        for x, y in zip(x_batch, y_batch):
            if max_index is not None and index >= max_index:
                break
            if index % skip == 0:
                prediction, radius = certify(model, x.to(device), sigma, n0, n, alpha, batch_size, seed=seed + index)
                records.append({"index": index, "label": int(y), "prediction": prediction, "radius": radius,
                                "correct": prediction == int(y)})
                bar.update(1)
            index += 1
        if max_index is not None and index >= max_index:
            break
    bar.close()
    if not records:
        raise ValueError("batches is empty: nothing to certify")
    return {"model": model_name or type(model).__name__, "sigma": sigma, "n0": n0, "n": n, "alpha": alpha,
            "seed": seed, "skip": skip, "max_index": max_index, "examples": len(records), "records": records}


def certified_accuracy(result: dict, radii: Sequence[float]) -> dict:
    """Fraction of examples certified correct at L2 radius >= r, for every r in ``radii``.

    Abstentions and wrong predictions count as failures at every radius.
    """
    records = result["records"]
    radii = [_checks.non_negative("radii", r) for r in radii]
    ok = np.array([r["correct"] for r in records], dtype=bool)
    radius = np.array([r["radius"] for r in records], dtype=np.float64)
    accuracy = [float(np.mean(ok & (radius >= r))) for r in radii]
    return {"model": result.get("model"), "sigma": result.get("sigma"), "radii": radii,
            "certified_accuracy": accuracy}
