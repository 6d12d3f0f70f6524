"""APGD and AutoAttack (Croce & Hein 2020) through torchattacks, from the package index (the ``[attacks]`` extra).

The robustness numbers of the literature are AutoAttack's "standard"
ensemble: APGD-CE, then APGD-T (targeted, DLR loss), FAB-T and Square, each
run on the examples the previous ones left correctly classified. It is
built here from torchattacks' ports with the official settings
(fra31/auto-attack, ``AutoAttack.__init__`` and ``set_version("standard")``):

* APGD-CE: 100 iterations, 1 restart, rho 0.75, 1 EOT iteration;
* APGD-T: 100 iterations, 1 restart, 9 target classes;
* FAB-T: 100 iterations, 1 restart, 9 target classes;
* Square: 5000 queries, p_init 0.8, 1 restart, no rescaled schedule.

Deviations, each for a reason:

* torchattacks' own ``AutoAttack`` gives APGD, APGD-T and FAB its default
  of 10 iterations and targets every other class; the ensemble is therefore
  assembled here (with ``torchattacks.MultiAttack``) rather than taken from it;
* with fewer than 10 classes the targeted attacks target the
  ``n_classes - 1`` other classes (the official code indexes a 10th class
  that does not exist and fails). The DLR losses read the 3rd (APGD-DLR)
  and 4th (APGD-T, so AutoAttack) largest logits, so those attacks need
  3 and 4 classes at least: fewer is a ValueError;
* torchattacks seeds the global RNG inside APGD / FAB / Square: the attacks
  run inside ``torch.random.fork_rng`` so the caller's random state is left
  as it was.

The single attacks ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square") are
also available on their own. Images are in [0, 1] and the model takes them
(normalisation inside the model), as everywhere in sparsesam.robust.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._extras import require
from . import _checks
from .model_state import attack_mode

Tensor = torch.Tensor

# Attack name -> the official setting's iterations / queries (AutoAttack "standard").
TORCHATTACKS = ("autoattack", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
ITERATIONS = 100
SQUARE_QUERIES = 5000
TARGET_CLASSES = 9
_NORMS = {"linf": "Linf", "l2": "L2"}
# The DLR losses' denominators read the 3rd (untargeted) and 4th (targeted) largest logits.
_MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4, "autoattack": 4}


def _torchattacks():
    return require("torchattacks", extra="attacks", purpose="APGD / AutoAttack")


def _targets(n_classes: int) -> int:
    return min(TARGET_CLASSES, n_classes - 1)


def build_attack(model: nn.Module, attack: str, *, eps: float, norm: str = "linf", n_classes: int,
                 steps: int = ITERATIONS, seed: int = 0):
    """The torchattacks object for ``attack`` (one of TORCHATTACKS) at the official settings (module doc).

    steps: the iterations of APGD / APGD-T / FAB-T (official: 100); Square's queries stay 5000.
    """
    _checks.choice("attack", attack, TORCHATTACKS)
    _checks.choice("norm", norm, tuple(_NORMS))
    _checks.positive_int("steps", steps)
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
    needed = _MIN_CLASSES.get(attack, 2)
    if n_classes < needed:
        raise ValueError(f"attack {attack!r} needs a model of {needed} classes at least (its DLR loss reads the "
                         f"{needed}th largest logit), got n_classes={n_classes}")
    ta = _torchattacks()
    common = dict(norm=_NORMS[norm], eps=float(eps), seed=int(seed), verbose=False)

    def apgd(loss: str):
        return ta.APGD(model, steps=steps, n_restarts=1, loss=loss, eot_iter=1, rho=0.75, **common)

    def apgd_t():
        made = ta.APGDT(model, steps=steps, n_restarts=1, eot_iter=1, rho=0.75, n_classes=n_classes, **common)
        made.n_target_classes = _targets(n_classes)
        return made

    def fab_t():
        made = ta.FAB(model, steps=steps, n_restarts=1, multi_targeted=True, n_classes=n_classes, **common)
        made.n_target_classes = _targets(n_classes)
        return made

    def square():
        return ta.Square(model, n_queries=SQUARE_QUERIES, n_restarts=1, p_init=0.8, loss="margin",
                         resc_schedule=False, **common)

    if attack == "autoattack":
        return ta.MultiAttack([apgd("ce"), apgd_t(), fab_t(), square()])
    return {"apgd-ce": lambda: apgd("ce"), "apgd-dlr": lambda: apgd("dlr"), "apgd-t": apgd_t, "fab-t": fab_t,
            "square": square}[attack]()


def torchattacks_attack(model: nn.Module, x: Tensor, y: Tensor, *, attack: str = "autoattack", eps: float,
                        norm: str = "linf", steps: int = ITERATIONS, seed: int = 0, n_classes: Optional[int] = None,
                        batch_size: int = 500) -> Tensor:
    """Adversarial images of ``attack`` (AutoAttack's standard ensemble or one of its attacks) for ``x, y``.

    n_classes: the model's output count (default: read from ``model(x[:1])``).
    The model runs in eval mode with parameter gradients off; modes, flags
    and the global RNG state are restored after. eps = 0 returns ``x``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (torchattacks reads its device), got {type(model).__name__}")
    _checks.images("x", x)
    _checks.labels("y", y, x.shape[0])
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}")
    eps = _checks.non_negative("eps", eps)
    _checks.positive_int("batch_size", batch_size)
    _checks.choice("attack", attack, TORCHATTACKS)
    if eps == 0 or x.shape[0] == 0:
        return x.detach().clone()
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with attack_mode(model, training=False), torch.random.fork_rng(devices=devices), torch.enable_grad():
        if n_classes is None:
            with torch.no_grad():
                n_classes = int(model(x[:1]).shape[1])
        adversary = build_attack(model, attack, eps=eps, norm=norm, n_classes=n_classes, steps=steps, seed=seed)
        chunks = [adversary(x[i:i + batch_size].detach(), y[i:i + batch_size])
                  for i in range(0, x.shape[0], batch_size)]
    return torch.cat(chunks).detach()


__all__ = ["TORCHATTACKS", "ITERATIONS", "build_attack", "torchattacks_attack"]
