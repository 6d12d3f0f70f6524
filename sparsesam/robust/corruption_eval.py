"""Accuracy under common corruptions, and Hendrycks' mCE against a baseline model.

Results are plain dicts (JSON-ready; severities as lists indexed by
``severities``) so the CLI can write them, reload them and plot them:

    {"model": "ResNet18 (90% sparse)", "examples": 10000, "seed": 0,
     "clean_accuracy": 0.93, "severities": [1, 2, 3, 4, 5],
     "accuracy": {"gaussian_noise": [0.71, 0.60, ...], ...},
     "mean_corruption_accuracy": 0.74}
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import _checks
from .corruptions import CORRUPTIONS, corrupt
from .model_state import eval_mode
from .predictions import check_logits, correct as correct_predictions


def _batch_seed(seed: int, corruption_index: int, severity: int, batch_index: int) -> int:
    # Independent, reproducible streams per (corruption, severity, batch).
    return int(np.random.SeedSequence([seed, corruption_index, severity, batch_index]).generate_state(1)[0])


@torch.no_grad()
def evaluate_corruptions(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], *,
                         corruptions: Sequence[str] = CORRUPTIONS, severities: Sequence[int] = (1, 2, 3, 4, 5),
                         seed: int = 0, device: Optional[torch.device] = None, model_name: Optional[str] = None,
                         progress: bool = False) -> dict:
    """Accuracy of ``model`` on every (corruption, severity) of the images in ``batches``.

    batches: an iterable of (images in [0, 1], labels), e.g. a DataLoader; it
    is iterated once and kept in memory on the CPU (test sets of 10k small
    images fit easily), so every corruption sees the same images.
    The model runs in eval mode; its mode is restored afterwards. An image on
    which the model's logits are not finite is never counted correct.
    """
    for name in corruptions:
        _checks.choice("corruption", name, CORRUPTIONS)
    severities = [_checks.severity(s) for s in severities]
    cached = []
    for x, y in batches:
        _checks.images("images", x, channels=(1, 3))
        _checks.labels("labels", y, x.shape[0])
        cached.append((x.cpu(), y.cpu()))
    if not cached:
        raise ValueError("batches is empty: nothing to evaluate")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    total = sum(len(y) for _, y in cached)

    def accuracy(transform) -> float:
        correct = 0
        for b, (x, y) in enumerate(cached):
            x = transform(x.to(device), b)
            logits = model(x)
            check_logits(logits, x.shape[0])
            correct += correct_predictions(logits, y).sum().item()
        return correct / total

    with eval_mode(model):
        clean = accuracy(lambda x, b: x)
        table: Dict[str, list] = {}
        todo = [(name, s) for name in corruptions for s in severities]
        for name, s in tqdm(todo, desc="corruptions", disable=not progress, leave=False):
            index = CORRUPTIONS.index(name)
            acc = accuracy(lambda x, b: corrupt(x, name, s, seed=_batch_seed(seed, index, s, b)))
            table.setdefault(name, []).append(acc)
    return {
        "model": model_name or type(model).__name__,
        "examples": total,
        "seed": seed,
        "clean_accuracy": clean,
        "severities": list(severities),
        "accuracy": table,
        "mean_corruption_accuracy": mean_corruption_accuracy({"accuracy": table}),
    }


def mean_corruption_accuracy(result: Mapping) -> float:
    """Mean accuracy over every corruption and severity of ``result['accuracy']``."""
    values = [a for accs in result["accuracy"].values() for a in accs]
    if not values:
        raise ValueError("result has no corruption accuracies")
    return float(np.mean(values))


def mce(result: Mapping, baseline: Mapping, *, baseline_name: Optional[str] = None, relative: bool = False) -> dict:
    """Mean Corruption Error of ``result`` normalised by ``baseline`` (Hendrycks & Dietterich 2019).

    ``CE_c = sum_s E_{s,c}(model) / sum_s E_{s,c}(baseline)`` with E = 1 - accuracy,
    and mCE is the mean of CE_c over the corruptions both results hold (the
    paper normalises by AlexNet on ImageNet; name here whichever baseline you
    used). ``relative=True`` gives the relative mCE: the errors minus each
    model's clean error, ``sum_s (E_{s,c} - E_clean) / sum_s (E^base_{s,c} - E^base_clean)``.
    Values are fractions (multiply by 100 for the paper's percentages).
    """
    if list(result["severities"]) != list(baseline["severities"]):
        raise ValueError(f"result and baseline were measured at different severities: "
                         f"{result['severities']} vs {baseline['severities']}")
    common = [c for c in result["accuracy"] if c in baseline["accuracy"]]
    if not common:
        raise ValueError("result and baseline share no corruption")
    per_corruption = {}
    for c in common:
        err = 1.0 - np.asarray(result["accuracy"][c], dtype=np.float64)
        base = 1.0 - np.asarray(baseline["accuracy"][c], dtype=np.float64)
        if relative:
            err = err - (1.0 - result["clean_accuracy"])
            base = base - (1.0 - baseline["clean_accuracy"])
        if base.sum() <= 0:
            raise ValueError(f"baseline's summed {'relative ' if relative else ''}error on {c} is "
                             f"{base.sum():.4g}: cannot normalise by it")
        per_corruption[c] = float(err.sum() / base.sum())
    return {
        "relative_mCE" if relative else "mCE": float(np.mean(list(per_corruption.values()))),
        "CE": per_corruption,
        "baseline": baseline_name or baseline.get("model", "baseline"),
    }
