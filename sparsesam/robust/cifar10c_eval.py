"""Corruption accuracy on the released CIFAR-10-C files (Hendrycks & Dietterich 2019), when the user has them.

The same result as :func:`sparsesam.robust.evaluate_corruptions` (which
corrupts the test images on the fly with this package's re-implementation
of the corruptions), read from the benchmark's own images instead, so the
numbers compare with published ones. The clean accuracy is measured on the
clean test images given (``batches``); every corruption and severity is
scored on as many CIFAR-10-C images, which are the same test images
corrupted (the release keeps CIFAR-10's test order).
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.cifar10c import BENCHMARK, CORRUPTIONS, find_cifar10c, load_cifar10c
from . import _checks
from .corruption_eval import mean_corruption_accuracy
from .model_state import eval_mode
from .predictions import check_logits, correct as correct_predictions


@torch.no_grad()
def evaluate_cifar10c(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], root: str, *,
                      corruptions: Sequence[str] = BENCHMARK, severities: Sequence[int] = (1, 2, 3, 4, 5),
                      batch_size: int = 256, device: Optional[torch.device] = None,
                      model_name: Optional[str] = None, progress: bool = False) -> dict:
    """Accuracy of ``model`` on CIFAR-10-C (the folder ``root``) for every (corruption, severity).

    batches: the clean CIFAR-10 test images in their order (e.g. the first N
    of the test set); their count N is how many CIFAR-10-C images of each
    severity are scored, and their labels must be CIFAR-10-C's (else they
    are not the same images: ValueError). The model runs in eval mode; an
    image with non-finite logits is never counted correct.
    """
    for name in corruptions:
        _checks.choice("corruption", name, CORRUPTIONS)
    severities = [_checks.severity(s) for s in severities]
    _checks.positive_int("batch_size", batch_size)
    folder = find_cifar10c(root)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def score(loader) -> Tuple[int, int, torch.Tensor]:
        correct = total = 0
        labels = []
        for x, y in loader:
            _checks.images("images", x, channels=(3,))
            x, y = x.to(device), y.to(device)
            logits = model(x)
            check_logits(logits, x.shape[0])
            correct += correct_predictions(logits, y).sum().item()
            total += len(y)
            labels.append(y.cpu())
        if total == 0:
            raise ValueError("batches is empty: nothing to evaluate")
        return correct, total, torch.cat(labels)

    with eval_mode(model):
        clean_correct, count, clean_labels = score(batches)
        table = {}
        todo = [(name, s) for name in corruptions for s in severities]
        for name, s in tqdm(todo, desc="CIFAR-10-C", disable=not progress, leave=False):
            corrupted = load_cifar10c(folder, name, s, limit=count)
            if len(corrupted) != count or not torch.equal(corrupted.labels, clean_labels):
                raise ValueError(f"the {count} clean images given are not the first CIFAR-10 test images of "
                                 f"{os.path.join(folder, name + '.npy')} (severity {s}): their labels differ "
                                 f"or the file holds fewer")
            correct, _, _ = score(DataLoader(corrupted, batch_size=batch_size))
            table.setdefault(name, []).append(correct / count)
    return {
        "model": model_name or type(model).__name__,
        "source": f"CIFAR-10-C {os.path.abspath(folder)}",
        "examples": count,
        "seed": None,
        "clean_accuracy": clean_correct / count,
        "severities": list(severities),
        "accuracy": table,
        "mean_corruption_accuracy": mean_corruption_accuracy({"accuracy": table}),
    }


__all__ = ["evaluate_cifar10c"]
