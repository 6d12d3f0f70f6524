"""C-SAM: Compression-aware ShArpness Minimization (arXiv 2601.20301), sharpness in *mask* space.

Every masked layer gets a learnable soft mask C in [0, 1], initialised from
the weights' magnitude scaled by their tau-quantile,

    C = clip(|w| / q_tau(|w|), 0, 1)        (per layer),

so the weights above the quantile start fully on. The objective is

    L(C) = CE(C) + lambda_z * mean Z(x; T) - lambda_margin * margin(C)

with Z(x; T) = ||p(x) - p(T(x))||_inf the prediction discrepancy under a
semantic transform T sampled per batch (sparsesam.robust), and the margin
the top-2 margin d(x) = (p1 - p2)/2 averaged over the *correctly
classified* examples only (Z < d certifies a correct prediction; the
normaliser is the number of correct examples, see ``objective``). Each
step is SAM's, in mask space:

1. the gradient of the whole L at C (x and T(x) forward; only the clean
   pass updates BatchNorm's running statistics);
2. the ascent point C' = clip(C + rho * dL/dC / ||dL/dC||, 0, 1), the
   norm global over all layers (fused ops mask_grad_sq_norm /
   mask_ascent_, which write C' straight into persistent buffers);
3. L again at C' -- the masks' storage swapped for those buffers
   (optim.PerturbedPoint, the mechanism SAM uses for its weights: no copy
   of the masks) and swapped back after the backward pass;
4. plus the rate term R(C) = lambda_rate * N * (kept(C) - k_target)^2 at C
   (kept = mean of C over the N entries of all masks): a constraint on the
   mask's size, kept out of the max as SAM keeps weight decay out of its
   ascent; its factor N gives every entry the gradient
   2 * lambda_rate * (kept - k_target) whatever the model's size;
5. Adam's step from the gradient of L at C' and of R at C, and C clipped
   back into [0, 1]. Weights train alongside (weight_lr; 0 freezes them).

Why the soft mask reaches the target now (it moved 0.46 -> 0.41 against
0.10 in the demo before): the rate term was the square of the *mean*, so
its gradient per entry was N times smaller than the one above (about
1e-5 on a small CNN, under the task gradient's 1e-3); and Adam moves an
entry by at most about mask_lr per step, so with mask_lr = 0.01 the
tau-initialised mask (mean about 0.46 at 90% sparsity) needs at least 36
steps of the mask phase to reach 0.10 even when nothing opposes it. Hence
the per-entry scaling and mask_lr = 0.05.

At the end of the mask phase C is binarised: the top ``1 - target_sparsity``
of all entries (ties broken by |w|) are kept -- exactly the target. The
weights are left as they are (the soft values are not folded into them).
Then the weights are fine-tuned with the binary mask fixed.

Under torchrun (``fit(..., parallel=wrap_ddp)``) the soft masks are
parameters of the module DDP wraps, so both backward passes leave the
rank-averaged dL/dC on every rank: the ascent's norm is that of the
global gradient, and C' and Adam's step are the same everywhere. The rate
term depends on C alone (equal on every rank) and its backward, after
DDP's reduction, adds the same gradient on every rank. Two things would
still depend on how the global batch is split, and are made not to, so
that W ranks of B images compute what one process computes on the W*B:
the transform parameters (each rank takes its images' share of one draw
for the global batch, in the DistributedSampler's interleaved order) and
the margin's normaliser (the number of correctly classified images in the
global batch, one all-reduce per pass).

Sources: the paper's abstract and problem statement (CC-Cert's Z and d,
mask perturbation instead of weight perturbation). No official
implementation was found (searched by name and title, January 2026 paper),
so the choices above -- the rate term's form, the margin's normaliser, BN
statistics from the clean pass only -- are ours, named here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..distributed import world
from ..nn import masked_layers, sparsify
from ..ops.mask_scoring import mask_ascent_, mask_grad_sq_norm
from ..optim import PerturbedPoint, frozen_bn_stats
from ..pruning import global_sparsity
from ..robust import DEFAULT_RANGES, TRANSFORMS, apply_transform
from ..robust.semantic_transforms import sample_parameters
from ..robust.cc_cert import prediction_discrepancy, top2_margin
from . import _config
from ..training import cross_entropy_loss
from ._steps import EpochMeter, plain_step
from .base import Algorithm


@dataclass
class CSAMConfig(_config.TrainingConfig):
    mask_epochs: int = 20            # learning the soft mask (and the weights)
    finetune_epochs: int = 10        # binary mask fixed
    mask_lr: float = 0.05            # Adam on the soft masks: steps of at most about mask_lr per entry (see below)
    weight_lr: float = 1e-3          # Adam on the weights during the mask phase (0: frozen)
    finetune_lr: float = 0.01        # SGD with momentum in fine-tuning
    rho: float = 0.5                 # L2 radius of the mask perturbation (over all layers together)
    tau: Optional[float] = None      # quantile of the initial scaling; None: target_sparsity
    lambda_z: float = 1.0            # prediction discrepancy under transforms
    lambda_margin: float = 0.1       # top-2 margin reward
    lambda_rate: float = 0.05        # N * (kept - k_target)^2: a per-entry gradient 2 * lambda_rate * (kept - k)
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

    # The soft masks are parameters DDP averages; the transform draw and the margin's normaliser are made
    # independent of the split (see the module docstring).
    data_parallel = True

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self._point = PerturbedPoint()  # C' lives here; swapped with the masks' storage for the second pass

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
        self._point.clear()  # the ascent buffers are the mask phase's: free them
        layers = [layer for _, layer in masked_layers(model)]
        total = sum(layer.weight.numel() for layer in layers)
        binary = binarize_top_k([layer.weight_mask for layer in layers], [layer.weight for layer in layers],
                                round(self.keep_target * total))
        with torch.no_grad():
            for layer, mask in zip(layers, binary):
                # The weights stay as they are: the binary mask selects them, the soft values are dropped.
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

    def _transform(self, x: torch.Tensor, step: int, parallel: bool = False) -> torch.Tensor:
        """T(x) for a transform and parameters drawn from a generator seeded by the step (resumable).

        parallel (a DDP step): the parameters are drawn for the global batch
        (world size x this rank's images) and this rank takes every
        world-size-th from its rank on -- the images the DistributedSampler
        gave it -- so the ranks together transform as one process would.
        """
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        which = self.config.transforms[int(torch.randint(len(self.config.transforms), (1,), generator=generator))]
        rank, size, _ = world() if parallel else (0, 1, 0)
        params = sample_parameters(which, DEFAULT_RANGES[which], size * x.shape[0], generator)[rank::size]
        return apply_transform(x, which, params).to(x.dtype)

    def rate_penalty(self, masks: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(``lambda_rate * N * (kept(C) - k_target)^2``, kept(C)) over the N entries of all masks.

        The factor N makes the gradient on every entry ``2 lambda_rate (kept - k_target)``
        whatever the model's size -- the scale of the task gradient dL/dC_i that
        it competes with in Adam's per-entry step. Without it (the mean's square
        alone) that gradient is N times smaller, about 1e-5 per entry on a
        small CNN, and the soft mask barely moves toward the target.
        """
        kept = self.kept_fraction(masks)
        total = sum(m.numel() for m in masks)
        return self.config.lambda_rate * total * (kept - self.keep_target) ** 2, kept

    def objective(self, logits: torch.Tensor, logits_t: torch.Tensor, y: torch.Tensor, parallel: bool = False
                  ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``L = CE + lambda_z * mean Z(x; T) - lambda_margin * margin`` from the logits of x and of T(x).

        The margin d(x) = (p1 - p2)/2 counts only where the prediction is
        correct (there Z < d certifies it; rewarding the margin of a wrong
        prediction would make the error more confident): its masked mean is
        ``sum(d * correct) / max(1, #correct)``, so its weight does not shrink
        with the batch's error rate, and it is 0 when nothing is correct.

        parallel (a DDP step, whose gradients are averaged over the W ranks):
        the normaliser is the global batch's count (all-reduced) and the
        rank's sum is scaled by W, so the average over the ranks is the
        global masked mean (the values logged, all-reduced by fit, too).
        """
        c = self.config
        task = F.cross_entropy(logits, y)
        probs = F.softmax(logits, dim=1)
        discrepancy = prediction_discrepancy(probs, F.softmax(logits_t, dim=1).unsqueeze(1)).squeeze(1).mean()
        correct = (logits.argmax(dim=1) == y).to(probs.dtype)
        count, scale = correct.sum(), 1.0
        if parallel and world().size > 1:
            count = count.detach().clone()
            dist.all_reduce(count)
            scale = float(world().size)
        margin = scale * (top2_margin(probs) * correct).sum() / count.clamp(min=1.0)
        total = task + c.lambda_z * discrepancy - c.lambda_margin * margin
        return total, {"task": task, "discrepancy": discrepancy, "margin": margin}

    def _objective_backward(self, model, x, x_t, y) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
        """The objective at the masks as they are now, and its backward; (L, its parts, the logits of x).

        Only the forward pass of x may update BatchNorm's running statistics;
        the pass of T(x) leaves them as they were (restored after backward,
        which needs them unchanged).
        """
        logits = model(x)
        with frozen_bn_stats(model):
            total, parts = self.objective(logits, model(x_t), y, isinstance(model, DistributedDataParallel))
            total.backward()
        return total, parts, logits

    def _mask_step(self, model, x, y, optimizer) -> Dict[str, float]:
        c = self.config
        masks = self._soft_masks(model)
        x_t = self._transform(x, self.step, isinstance(model, DistributedDataParallel))

        # 1. dL/dC of the whole objective at C (BatchNorm statistics: this clean forward only); the ascent
        #    point C' = clip(C + rho dL/dC / ||dL/dC||, 0, 1) written by the fused op straight into the
        #    persistent buffers.
        optimizer.zero_grad(set_to_none=True)
        objective, parts, logits = self._objective_backward(model, x, x_t, y)
        grads = [m.grad if m.grad is not None else torch.zeros_like(m) for m in masks]
        with torch.no_grad():
            sq_norm = mask_grad_sq_norm(grads)
            mask_ascent_(self._point.buffers(masks), grads, None, [m.detach() for m in masks], sq_norm, c.rho)
        optimizer.zero_grad(set_to_none=True)

        # 2. The same objective at C': the masks' storage swapped for the buffers, swapped back after.
        self._point.swap_in(masks)
        try:
            with frozen_bn_stats(model):
                perturbed, perturbed_parts, _ = self._objective_backward(model, x, x_t, y)
        finally:
            self._point.restore()

        # 3. The rate term at C (a constraint on the mask's size, outside the max as SAM keeps weight decay
        #    out of its ascent); the step; C back into [0, 1].
        rate, kept = self.rate_penalty(masks)
        rate.backward()
        optimizer.step()
        with torch.no_grad():
            for m in masks:
                m.clamp_(0, 1)
        return {"loss": parts["task"].item(), "logits": logits.detach(), "objective": objective.item(),
                "perturbed_objective": perturbed.item(), "perturbed_loss": perturbed_parts["task"].item(),
                "discrepancy": perturbed_parts["discrepancy"].item(), "margin": perturbed_parts["margin"].item(),
                "kept": kept.item()}

    def _train_epoch(self, phase, epoch, model, loader, optimizer, bar):
        meter = EpochMeter(bar)
        for x, y in bar:
            if phase == "mask":
                values = self._mask_step(model, x, y, optimizer)
                logits = values.pop("logits")
            else:
                loss, logits, _ = plain_step(model, x, y, optimizer, cross_entropy_loss, self.step)
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
