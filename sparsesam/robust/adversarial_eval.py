"""Robust accuracy of a model under an attack, over a list of epsilons.

The result is a JSON-ready dict that sparsesam.robust.plots can draw:

    {"model": "...", "attack": "pgd", "norm": "linf", "steps": 10, "restarts": 1,
     "examples": 1000, "seed": 0, "clean_accuracy": 0.91,
     "epsilons": [0.0, 0.01, ...], "accuracy": [0.91, 0.72, ...]}
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import _checks
from .attacks import fgsm, pgd
from .attacks_torchattacks import TORCHATTACKS, torchattacks_attack
from .model_state import eval_mode
from .predictions import check_logits, correct as correct_predictions

# Built in, then torchattacks' (AutoAttack's standard ensemble and its attacks, the [attacks] extra).
ATTACKS = ("pgd", "fgsm") + TORCHATTACKS


@torch.no_grad()
def adversarial_accuracy(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], *,
                         epsilons: Sequence[float], attack: str = "pgd", norm: str = "linf", steps: int = 10,
                         restarts: int = 1, step_size_factor: float = 2.5, seed: int = 0,
                         device: Optional[torch.device] = None, model_name: Optional[str] = None,
                         progress: bool = False) -> dict:
    """Accuracy on adversarial examples of ``attack`` at every eps of ``epsilons``.

    PGD's step size is ``step_size_factor * eps / steps`` at each eps. For
    torchattacks' attacks (TORCHATTACKS), ``steps`` is the iterations of
    APGD / APGD-T / FAB-T (the literature's setting is 100,
    attacks_torchattacks.ITERATIONS) and the number of classes is read from
    the model's logits. Every
    batch gets its own attack seed (derived from ``seed``), the same at every eps.
    An example on which the model's logits are not finite is never counted
    correct (sparsesam.robust.predictions).
    """
    _checks.choice("attack", attack, ATTACKS)
    step_size_factor = _checks.non_negative("step_size_factor", step_size_factor)
    epsilons = [_checks.non_negative("epsilons", e) for e in epsilons]
    if not epsilons:
        raise ValueError("epsilons is empty")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct = np.zeros(len(epsilons), dtype=np.int64)
    clean_correct = total = 0
    with eval_mode(model):
        for b, (x, y) in enumerate(tqdm(batches, desc=f"{attack} attack", disable=not progress, leave=False)):
            x, y = x.to(device), y.to(device)
            _checks.images("images", x)
            _checks.labels("labels", y, x.shape[0])
            clean_logits = model(x)
            check_logits(clean_logits, x.shape[0])
            clean_correct += correct_predictions(clean_logits, y).sum().item()
            total += len(y)
            batch_seed = int(np.random.SeedSequence([seed, b]).generate_state(1)[0])
            for i, eps in enumerate(epsilons):
                if attack == "pgd":
                    x_adv = pgd(model, x, y, eps=eps, norm=norm, steps=steps, restarts=restarts,
                                step_size=step_size_factor * eps / steps, seed=batch_seed)
                elif attack == "fgsm":
                    x_adv = fgsm(model, x, y, eps=eps, norm=norm)
                else:
                    x_adv = torchattacks_attack(model, x, y, attack=attack, eps=eps, norm=norm, steps=steps,
                                                seed=batch_seed, n_classes=int(clean_logits.shape[1]))
                correct[i] += correct_predictions(model(x_adv), y).sum().item()
    if total == 0:
        raise ValueError("batches is empty: nothing to evaluate")
    return {
        "model": model_name or type(model).__name__,
        "attack": attack,
        "norm": norm,
        "steps": 1 if attack == "fgsm" else (None if attack == "square" else steps),
        "restarts": restarts if attack == "pgd" else None,
        "examples": total,
        "seed": seed,
        "clean_accuracy": clean_correct / total,
        "epsilons": epsilons,
        "accuracy": (correct / total).tolist(),
    }
