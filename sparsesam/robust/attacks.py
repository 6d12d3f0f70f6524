"""Batched white-box attacks: PGD (L-inf and L2, random start, restarts) and
FGSM; AutoAttack / APGD through torchattacks, an optional import
(sparsesam.robust.attacks_torchattacks).

Images are in [0, 1] and the model receives [0, 1] images (put any
normalisation inside the model). Adversarial examples stay in the eps-ball
around ``x`` and in [0, 1]. An attack runs the model in eval mode (or train
mode with ``model_mode="train"``) with parameter gradients off; every
module's mode and every parameter's ``requires_grad`` are restored after, so
training losses (sparsesam.robust.adversarial_losses) can call an attack in
the middle of a training step.

Non-finite logits (sparsesam.robust.predictions): an input on which the
model outputs NaN or inf is misclassified (it predicts no class), so the
attack keeps it as a success; where the objective's gradient is not finite
the example takes no step (a NaN step would leave the eps-ball and [0, 1]).
eps, step_size and init_std must be finite.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
import torch.nn.functional as F

from . import _checks
from .model_state import attack_mode
from .predictions import NO_CLASS, check_logits, predicted_classes

Tensor = torch.Tensor
Objective = Callable[[Tensor, Tensor], Tensor]

NORMS = ("linf", "l2")
STARTS = ("uniform", "normal", "zero")
MODEL_MODES = ("eval", "train")


def cross_entropy_objective(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy: PGD-AT's and MART's inner maximisation."""
    return F.cross_entropy(logits, y, reduction="none")


def _flat_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).reshape(-1, *([1] * (t.dim() - 1)))


def _project(delta: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Into the eps-ball, then into [0, 1] (clamping each coordinate towards x
    can only shrink |delta|, so the result is in both sets)."""
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * torch.clamp(eps / _flat_norm(delta).clamp_min(1e-12), max=1.0)
    return (x + delta).clamp(0, 1) - x


def _random_start(x: Tensor, eps: float, norm: str, start: str, init_std: float,
                  generator: torch.Generator) -> Tensor:
    if start == "zero":
        return torch.zeros_like(x)
    # Drawn on the CPU so a seed gives the same start on every device.
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
    if start == "normal":  # TRADES' start: x + 0.001 N(0, I)
        return init_std * noise
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
        return (2 * u - 1) * eps
    # Uniform in the L2 ball: a uniform direction, radius eps * U^(1/d).
    d = x[0].numel()
    r = torch.rand(x.shape[0], generator=generator, dtype=torch.float64) ** (1.0 / d)
    r = r.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return eps * r * noise / _flat_norm(noise).clamp_min(1e-12)


def _check_attack_args(model, x, y, eps, norm, steps, restarts, start, model_mode):
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(f"model must be an nn.Module or callable, got {type(model).__name__}")
    _checks.images("x", x)
    _checks.labels("y", y, x.shape[0])
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}")
    _checks.non_negative("eps", eps)
    _checks.choice("norm", norm, NORMS)
    _checks.positive_int("steps", steps)
    _checks.positive_int("restarts", restarts)
    _checks.choice("start", start, STARTS)
    _checks.choice("model_mode", model_mode, MODEL_MODES)


def pgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf", steps: int = 10,
        step_size: Optional[float] = None, start: str = "uniform", restarts: int = 1,
        objective: Objective = cross_entropy_objective, init_std: float = 0.001, seed: int = 0,
        model_mode: str = "eval") -> Tensor:
    """Projected gradient ascent on ``objective(model(x + delta), y)`` within ``||delta||_norm <= eps``.

    step_size: defaults to 2.5 eps / steps (Madry et al.); L-inf steps follow
    the gradient's sign, L2 steps its unit direction.
    start: "uniform" in the eps-ball (Madry), "normal" (``init_std`` N(0, I),
    TRADES) or "zero".
    restarts: independent starts; per example the worst one is kept:
    misclassified before correctly classified, then the larger objective.
    Returns the adversarial images (x's shape and dtype, detached).
    """
    _check_attack_args(model, x, y, eps, norm, steps, restarts, start, model_mode)
    if step_size is None:
        step_size = 2.5 * eps / steps
    step_size = _checks.non_negative("step_size", step_size)
    init_std = _checks.non_negative("init_std", init_std)
    if eps == 0 or x.numel() == 0:
        return x.detach().clone()
    generator = torch.Generator().manual_seed(int(seed))
    x = x.detach()
    best = x.clone()
    best_wrong = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    best_loss = torch.full((x.shape[0],), -float("inf"), device=x.device)
    with attack_mode(model, training=model_mode == "train"):
        for _ in range(restarts):
            delta = _project(_random_start(x, eps, norm, start, init_std, generator), x, eps, norm)
            for _ in range(steps):
                delta.requires_grad_(True)
                with torch.enable_grad():
                    loss = objective(model(x + delta), y)
                    grad, = torch.autograd.grad(loss.sum(), delta)
                with torch.no_grad():
                    if norm == "linf":
                        step = grad.sign()
                    else:
                        step = grad / _flat_norm(grad).clamp_min(1e-12)
                    # No step where the gradient is not finite (the model's output was not).
                    finite = torch.isfinite(grad).flatten(1).all(dim=1).reshape(-1, *([1] * (x.dim() - 1)))
                    step = torch.where(finite, step, torch.zeros_like(step))
                    delta = _project(delta + step_size * step, x, eps, norm)
            with torch.no_grad():
                x_adv = x + delta
                logits = model(x_adv)
                check_logits(logits, x.shape[0])
                prediction = predicted_classes(logits)
                no_class = prediction == NO_CLASS
                # A non-finite output is the strongest success: misclassified, largest loss.
                loss = torch.where(no_class, torch.full_like(best_loss, float("inf")),
                                   objective(logits, y).float())
                wrong = no_class | (prediction != y)
                better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
                best = torch.where(better.reshape(-1, *([1] * (x.dim() - 1))), x_adv, best)
                best_wrong = best_wrong | wrong
                best_loss = torch.where(better, loss, best_loss)
    return best.detach()


def fgsm(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf",
         objective: Objective = cross_entropy_objective, model_mode: str = "eval") -> Tensor:
    """Fast gradient (sign) method: one step of size eps from x (Goodfellow et al. 2015);
    with ``norm="l2"`` the step follows the L2-normalised gradient."""
    return pgd(model, x, y, eps=eps, norm=norm, steps=1, step_size=eps, start="zero", restarts=1,
               objective=objective, model_mode=model_mode)


def autoattack(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf",
               version: str = "standard", batch_size: int = 500, seed: int = 0, verbose: bool = False) -> Tensor:
    """Adversarial images from AutoAttack's standard ensemble (Croce & Hein 2020): APGD-CE, APGD-T, FAB-T
    and Square at the official settings, through torchattacks (``pip install 'sparsesam[attacks]'``);
    see :mod:`sparsesam.robust.attacks_torchattacks`. The built-in ``pgd`` and ``fgsm`` need nothing extra.

    version: "standard" only (the version papers report). verbose: kept for the signature of the
    official package's AutoAttack; torchattacks' ensemble prints nothing.
    """
    _check_attack_args(model, x, y, eps, norm, 1, 1, "zero", "eval")
    if version != "standard":
        raise ValueError(f"version must be 'standard' (AutoAttack's, as papers report it), got {version!r}")
    from .attacks_torchattacks import torchattacks_attack
    return torchattacks_attack(model, x, y, attack="autoattack", eps=eps, norm=norm, seed=seed,
                               batch_size=batch_size)
