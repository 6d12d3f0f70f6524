"""The adversarial training losses HARP trains with: PGD-AT, TRADES and MART.

Each takes a clean batch, builds its adversarial examples with
sparsesam.robust.attacks.pgd (eval mode, parameters frozen, both restored),
then evaluates the loss with the model in whatever mode the caller set
(train, in a training step) and returns a differentiable scalar.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from . import _checks
from .attacks import cross_entropy_objective, pgd
from .model_state import eval_mode

Tensor = torch.Tensor


def pgd_at_loss(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf", steps: int = 10,
                step_size: Optional[float] = None, seed: int = 0) -> Tensor:
    """Madry et al. (2018): cross-entropy on PGD examples (uniform random start)."""
    x_adv = pgd(model, x, y, eps=eps, norm=norm, steps=steps, step_size=step_size, start="uniform", seed=seed)
    return F.cross_entropy(model(x_adv), y)


def trades_loss(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, beta: float = 6.0, norm: str = "linf",
                steps: int = 10, step_size: Optional[float] = None, seed: int = 0) -> Tensor:
    """Zhang et al. (2019): ``CE(f(x), y) + beta * KL(p(x) || p(x_adv))``.

    x_adv maximises the KL to the clean prediction, starting from
    ``x + 0.001 N(0, I)`` as in the reference code (which takes the clean
    target in eval mode, like the attack). The KL is summed over classes and
    averaged over the batch ("batchmean").
    """
    _checks.non_negative("beta", beta)
    with torch.no_grad(), eval_mode(model):
        p_clean = F.softmax(model(x), dim=1)

    def kl_to_clean(logits: Tensor, _: Tensor) -> Tensor:
        return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="none").sum(dim=1)

    x_adv = pgd(model, x, y, eps=eps, norm=norm, steps=steps, step_size=step_size, start="normal",
                objective=kl_to_clean, seed=seed)
    logits = model(x)
    logits_adv = model(x_adv)
    natural = F.cross_entropy(logits, y)
    robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="batchmean")
    return natural + beta * robust


def mart_loss(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, beta: float = 6.0, norm: str = "linf",
              steps: int = 10, step_size: Optional[float] = None, seed: int = 0) -> Tensor:
    """Wang et al. (2020), Misclassification-Aware adveRsarial Training.

    ``BCE(p(x_adv), y) + beta * mean_i KL(p(x_i) || p(x_adv_i)) (1 - p_y(x_i))`` where the
    boosted CE is ``CE(f(x_adv), y) - log(1 - max_{k != y} p_k(x_adv))``: it also pushes
    down the strongest wrong class, and the KL term weighs misclassified
    (low p_y) examples more. Constants (1.0001, 1e-12, 1.0000001) as in the
    reference code; x_adv maximises CE from ``x + 0.001 N(0, I)`` as there.
    """
    _checks.non_negative("beta", beta)
    x_adv = pgd(model, x, y, eps=eps, norm=norm, steps=steps, step_size=step_size, start="normal",
                objective=cross_entropy_objective, seed=seed)
    logits = model(x)
    logits_adv = model(x_adv)
    adv_probs = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    strongest_wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    boosted_ce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), strongest_wrong)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = nat_probs.gather(1, y.unsqueeze(1)).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(dim=1)
    robust = (kl * (1.0000001 - true_probs)).mean()
    return boosted_ce + beta * robust
