"""C-SAM: Compression-aware ShArpness Minimization (arXiv 2601.20301), sharpness in *mask* space.

Every masked layer gets a learnable soft mask C in [0, 1], initialised from
the weights' magnitude scaled by their tau-quantile,

    C = clip(|w| / q_tau(|w|), 0, 1)        (per layer),

so the weights above the quantile start fully on. Each step minimises

    L_task(C') + lambda_z * mean Z(x; T) - lambda_margin * mean d(x)
               + lambda_rate * (kept(C) - k_target)^2

where C' = clip(C + rho * dL/dC / ||dL/dC||, 0, 1) is the ascent point in
mask space (SAM's argument applied to the mask: the fused ops
mask_grad_sq_norm / mask_ascent_, global norm over all layers), the loss
terms after L_task are evaluated at C' too, Z(x; T) = ||p(x) - p(T(x))||_inf
is the prediction discrepancy under a semantic transform T sampled per
batch (sparsesam.robust), d(x) = (p1 - p2)/2 the top-2 margin (Z < d makes
the prediction stable under T), and kept(C) = mean of C over all masks
pulls the soft mask's size to the target. The gradient is applied at C,
which is then clipped back to [0, 1]. Weights train alongside (weight_lr;
0 freezes them).

At the end of the mask phase C is binarised: the top ``1 - target_sparsity``
of all entries (ties broken by |w|) are kept -- exactly the target -- and
the soft values of the kept entries are folded into the weights (W <- W*C),
so the binary model starts from the function the soft one learnt. Then the
weights are fine-tuned with the binary mask fixed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import masked_layers, sparsify
from ..ops.mask_scoring import mask_ascent_, mask_grad_sq_norm
from ..optim import frozen_bn_stats
from ..pruning import global_sparsity
from ..robust import DEFAULT_RANGES, TRANSFORMS, random_transform
from ..robust.cc_cert import prediction_discrepancy, top2_margin
from . import _config
from ._steps import EpochMeter, clean_loss, plain_step
from .base import Algorithm


@dataclass
class CSAMConfig(_config.TrainingConfig):
    mask_epochs: int = 20            # learning the soft mask (and the weights)
    finetune_epochs: int = 10        # binary mask fixed
    mask_lr: float = 0.01            # Adam on the soft masks: steps of about mask_lr per entry, whatever the layer
    weight_lr: float = 1e-3          # Adam on the weights during the mask phase (0: frozen)
    finetune_lr: float = 0.01        # SGD with momentum in fine-tuning
    rho: float = 0.5                 # L2 radius of the mask perturbation (over all layers together)
    tau: Optional[float] = None      # quantile of the initial scaling; None: target_sparsity
    lambda_z: float = 1.0            # prediction discrepancy under transforms
    lambda_margin: float = 0.1       # top-2 margin reward
    lambda_rate: float = 10.0        # (kept - k_target)^2
    transforms: Tuple[str, ...] = TRANSFORMS

    def check(self) -> None:
        super().check()
        _config.count("mask_epochs", self.mask_epochs)
        _config.count("finetune_epochs", self.finetune_epochs)
        _config.non_negative("mask_lr", self.mask_lr, positive=True)
        _config.non_negative("weight_lr", self.weight_lr)
        _config.non_negative("finetune_lr", self.finetune_lr, positive=True)
        _config.non_negative("rho", self.rho)
        if self.tau is not None:
            _config.fraction("tau", self.tau)
        for name in ("lambda_z", "lambda_margin", "lambda_rate"):
            _config.non_negative(name, getattr(self, name))
        if not isinstance(self.transforms, (tuple, list)) or not self.transforms:
            raise ValueError(f"transforms must be a non-empty sequence of {TRANSFORMS}, got {self.transforms!r}")
        for name in self.transforms:
            _config.choice("transforms", name, TRANSFORMS)


def magnitude_soft_mask(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """``clip(|w| / q_tau(|w|), 0, 1)``: C-SAM's initial soft mask (q by kthvalue: exact, any size)."""
    magnitude = weight.detach().abs().reshape(-1)
    k = min(magnitude.numel(), max(1, math.ceil(tau * magnitude.numel())))
    q = magnitude.kthvalue(k).values
    if q <= 0:  # the quantile is an exact zero: every non-zero weight starts on
        return (weight.detach() != 0).to(weight.dtype)
    return (weight.detach().abs() / q).clamp(0, 1)


@torch.no_grad()
def binarize_top_k(soft: List[torch.Tensor], weights: List[torch.Tensor], keep: int) -> List[torch.Tensor]:
    """Bool masks keeping the ``keep`` largest soft-mask entries over all layers; ties go to larger |w|."""
    values = torch.cat([c.reshape(-1).double().cpu() for c in soft])
    magnitude = torch.cat([w.reshape(-1).abs().double().cpu() for w in weights])
    by_magnitude = torch.sort(magnitude, descending=True, stable=True).indices
    order = by_magnitude[torch.sort(values[by_magnitude], descending=True, stable=True).indices]
    kept = torch.zeros(values.numel(), dtype=torch.bool)
    kept[order[:keep]] = True
    out, offset = [], 0
    for c in soft:
        out.append(kept[offset: offset + c.numel()].view_as(c).to(c.device))
        offset += c.numel()
    return out


class CSAM(Algorithm):
    """Mask-space SAM with transform-consistency and margin terms, then binarisation and fine-tuning."""

    config_type = CSAMConfig
    name = "csam"

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self._ascent: List[torch.Tensor] = []
        self._backup: List[torch.Tensor] = []

    def phases(self):
        return [("mask", self.config.mask_epochs), ("finetune", self.config.finetune_epochs)]

    @property
    def keep_target(self) -> float:
        return 1.0 - self.config.target_sparsity

    # ----------------------------------------------------------- structure
    def _restructure(self, phase, model, loader):
        sparsify(model, mask_mode="trainable" if phase == "mask" else "fixed")

    def _enter(self, phase, model, loader):
        if phase == "mask":
            sparsify(model, mask_mode="trainable")
            tau = self.config.target_sparsity if self.config.tau is None else self.config.tau
            for _, layer in masked_layers(model):
                layer.set_mask(magnitude_soft_mask(layer.weight, tau))
            return
        layers = [layer for _, layer in masked_layers(model)]
        total = sum(layer.weight.numel() for layer in layers)
        binary = binarize_top_k([layer.weight_mask for layer in layers], [layer.weight for layer in layers],
                                round(self.keep_target * total))
        with torch.no_grad():
            for layer, mask in zip(layers, binary):
                layer.weight.mul_(layer.weight_mask.detach())  # fold the soft values into the weights
                del layer.weight_mask
                layer._init_mask("fixed", mask)

    # ------------------------------------------------------------ training
    def _optimizer(self, phase, model):
        c = self.config
        if phase == "mask":
            masks = [layer.weight_mask for _, layer in masked_layers(model)]
            mask_ids = {id(m) for m in masks}
            others = [p for p in model.parameters() if id(p) not in mask_ids]
            for p in others:
                p.requires_grad_(c.weight_lr > 0)
            groups = [{"params": masks, "lr": c.mask_lr, "weight_decay": 0.0}]
            if c.weight_lr > 0:
                groups.append({"params": others, "lr": c.weight_lr, "weight_decay": 0.0})
            optimizer = torch.optim.Adam(groups, lr=c.mask_lr)
            return optimizer, [g["lr"] for g in groups]
        for p in model.parameters():
            p.requires_grad_(True)
        optimizer = torch.optim.SGD(model.parameters(), lr=c.finetune_lr, momentum=c.momentum,
                                    weight_decay=c.weight_decay)
        return optimizer, [c.finetune_lr]

    def _soft_masks(self, model: nn.Module) -> List[nn.Parameter]:
        return [layer.weight_mask for _, layer in masked_layers(model)]

    def kept_fraction(self, masks: List[torch.Tensor]) -> torch.Tensor:
        """The soft mask's size: mean of C over all entries of all layers (differentiable)."""
        total = sum(m.numel() for m in masks)
        return sum(m.sum() for m in masks) / total

    def _transform(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """T(x) for a transform and parameters drawn from a generator seeded by the step (resumable)."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        which = self.config.transforms[int(torch.randint(len(self.config.transforms), (1,), generator=generator))]
        return random_transform(x, which, DEFAULT_RANGES[which], generator)[0].to(x.dtype)

    def _mask_step(self, model, x, y, optimizer) -> Dict[str, float]:
        c = self.config
        masks = self._soft_masks(model)
        if len(self._ascent) != len(masks) or any(a.shape != m.shape for a, m in zip(self._ascent, masks)):
            self._ascent = [torch.empty_like(m, memory_format=torch.contiguous_format) for m in masks]
            self._backup = [torch.empty_like(m, memory_format=torch.contiguous_format) for m in masks]

        # 1. dL/dC at C; ascent point C' (fused: global norm over all layers, clip to [0, 1]).
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [m.grad if m.grad is not None else torch.zeros_like(m) for m in masks]
        with torch.no_grad():
            sq_norm = mask_grad_sq_norm(grads)
            mask_ascent_(self._ascent, grads, None, [m.detach() for m in masks], sq_norm, c.rho)
            for m, saved, ascent in zip(masks, self._backup, self._ascent):
                saved.copy_(m)
                m.copy_(ascent)
        optimizer.zero_grad(set_to_none=True)

        # 2. The objective at C' (BatchNorm statistics were updated by the first pass only).
        with frozen_bn_stats(model):
            logits_perturbed = model(x)
            task = F.cross_entropy(logits_perturbed, y)
            probs = F.softmax(logits_perturbed, dim=1)
            probs_t = F.softmax(model(self._transform(x, self.step)), dim=1)
            discrepancy = prediction_discrepancy(probs, probs_t.unsqueeze(1)).squeeze(1).mean()
            margin = top2_margin(probs).mean()
            (task + c.lambda_z * discrepancy - c.lambda_margin * margin).backward()

        # 3. Back to C; the rate term's gradient at C; the step; C back into [0, 1].
        with torch.no_grad():
            for m, saved in zip(masks, self._backup):
                m.copy_(saved)
        kept = self.kept_fraction(masks)
        (c.lambda_rate * (kept - self.keep_target) ** 2).backward()
        optimizer.step()
        with torch.no_grad():
            for m in masks:
                m.clamp_(0, 1)
        return {"loss": loss.item(), "logits": logits.detach(), "perturbed_loss": task.item(),
                "discrepancy": discrepancy.item(), "margin": margin.item(), "kept": kept.item()}

    def _train_epoch(self, phase, epoch, model, loader, optimizer, bar):
        meter = EpochMeter(bar)
        for x, y in bar:
            if phase == "mask":
                values = self._mask_step(model, x, y, optimizer)
                logits = values.pop("logits")
            else:
                loss, logits, _ = plain_step(model, x, y, optimizer, clean_loss, self.step)
                values = {"loss": loss}
            self.step += 1
            meter.add(len(y), logits, y, **values)
        return meter.means()

    def _sparsity(self, model):
        layers = [layer for _, layer in masked_layers(model)]
        if layers and layers[0].mask_mode == "trainable":
            # Soft mask: the fraction not kept, 1 - mean(C).
            with torch.no_grad():
                return 1.0 - float(self.kept_fraction([layer.weight_mask for layer in layers]))
        return global_sparsity(model)
