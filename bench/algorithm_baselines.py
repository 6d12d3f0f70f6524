"""The straightforward PyTorch implementations bench_algorithms.py measures sparsesam's algorithm phases against.

Each is what a researcher writes by hand (or copies from the papers' code) for one
phase, with no sparsesam op in it:

* ``ChannelRhoASAM`` (``sam_baselines.LoopSAM``): davda54/sam's ASAM (``first_step`` / ``second_step``
  around ``torch.optim.SGD``, a clone of every weight kept for the restore) with one
  radius per output channel, as AdaSAP's adaptive phase needs:
  ``e = rho_c * w^2 * g / (|| |w| g || + eps)``.
* :class:`SubnetConv` / :class:`SubnetLinear` with :class:`GetSubnet`: HYDRA's and
  HARP's subnet layers (intellisec/harp ``models/layers.py``): the mask is rebuilt on
  every forward by a full sort of |scores|, and a Python straight-through estimator
  returns the mask's gradient to the scores and its sum to the layer's rate score
  ``k_score`` (``rate = sigmoid(k_score) * (1 - k_min) + k_min``, ``utils/utils.py``).
  The hardware loss is ``hw_loss`` of ``utils/hw.py``.
* :func:`prune_with_mask`: fixed-mask fine-tuning through ``torch.nn.utils.prune``
  (``weight = weight_orig * weight_mask`` recomputed before every forward).
* :func:`csam_mask_step_autograd`: C-SAM's mask step in plain autograd with copies of
  the soft masks (backup, ascent point) made every step.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from sam_baselines import LoopSAM


# --------------------------------------------------------------------------- ASAM
# davda54/sam's SAM with one radius per output channel where one is set (``set_channel_rho``).
ChannelRhoASAM = LoopSAM


def asam_step(model: nn.Module, x, y, optimizer: ChannelRhoASAM) -> float:
    """davda54's two passes: loss at w, ascent, loss at w + e, descent."""
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.second_step(zero_grad=True)
    return loss.item()


# --------------------------------------------------------------------------- HYDRA / HARP subnet layers
def rate_act_func(k_score: torch.Tensor, k_min: float) -> torch.Tensor:
    """intellisec/harp utils/utils.py."""
    return torch.sigmoid(k_score) * (1 - k_min) + k_min


class GetSubnet(torch.autograd.Function):
    """intellisec/harp models/layers.py (weight pruning): top-k of |scores| by a full sort; straight-through."""

    @staticmethod
    def forward(ctx, scores, k):
        out = scores.clone()
        _, idx = scores.flatten().sort()
        j = int((1 - k) * scores.numel())
        flat_out = out.flatten()
        flat_out[idx[:j]] = 0
        flat_out[idx[j:]] = 1
        return out

    @staticmethod
    def backward(ctx, g):
        return g, torch.sum(g)


class _Subnet:
    """Frozen weight, ``popup_scores`` of the weight's shape and a rate score ``k_score``."""

    def _init_subnet(self, k: float, k_min: float) -> None:
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        fan_in = self.weight[0].numel()
        # initialize_scaled_score (utils/model.py): close to Kaiming-uniform, ordered like |w|.
        self.popup_scores = nn.Parameter(math.sqrt(6 / fan_in) * self.weight.detach() / self.weight.detach().abs().max())
        self.k_min = k_min
        # rate_init_func: sigmoid^-1((k - k_min) / (1 - k_min)).
        u = (k - k_min) / (1 - k_min)
        self.k_score = nn.Parameter(torch.tensor(math.log(u / (1 - u)), dtype=self.weight.dtype))

    def subnet_weight(self) -> torch.Tensor:
        adj = GetSubnet.apply(self.popup_scores.abs(), rate_act_func(self.k_score, self.k_min))
        return self.weight * adj


class SubnetConv(_Subnet, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.subnet_weight(), self.bias)


class SubnetLinear(_Subnet, nn.Linear):
    def forward(self, x):
        return F.linear(x, self.subnet_weight(), self.bias)


def subnet_model(model: nn.Module, k: float, k_min: float, names: Optional[Iterable[str]] = None) -> nn.Module:
    """``model`` with the named (default: every) Conv2d / Linear swapped for subnet layers, weights copied."""
    wanted = None if names is None else set(names)
    for name, module in list(model.named_modules()):
        if type(module) not in (nn.Conv2d, nn.Linear) or (wanted is not None and name not in wanted):
            continue
        if isinstance(module, nn.Conv2d):
            new = SubnetConv(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                             module.padding, module.dilation, module.groups, module.bias is not None)
        else:
            new = SubnetLinear(module.in_features, module.out_features, module.bias is not None)
        new.to(module.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(module.weight)
            if module.bias is not None:
                new.bias.copy_(module.bias)
        new._init_subnet(k, k_min)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def hw_loss(model: nn.Module, target_rate: float) -> torch.Tensor:
    """utils/hw.py hw_loss: ``max(0, kept / target - 1)`` with kept the rates' share of the parameters."""
    total, kept = 0, 0
    for m in model.modules():
        if isinstance(m, _Subnet):
            total += m.weight.numel()
            kept = kept + m.weight.numel() * rate_act_func(m.k_score, m.k_min)
    return torch.clamp(kept / total / target_rate - 1.0, min=0.0)


def subnet_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, _Subnet) for p in (m.popup_scores, m.k_score)]


def harp_search_step(model: nn.Module, x, y, optimizer, gamma: float, target_rate: float) -> float:
    """trainer/adv.py's step with the clean loss: task loss + gamma * L_hw, one SGD step over scores and rates."""
    loss = F.cross_entropy(model(x), y)
    total = loss + gamma * hw_loss(model, target_rate)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return loss.item()


# --------------------------------------------------------------------------- fixed-mask fine-tuning
def prune_with_mask(model: nn.Module, masks: Dict[str, torch.Tensor]) -> nn.Module:
    """torch.nn.utils.prune.custom_from_mask on each named layer (``weight_orig * weight_mask`` per forward)."""
    for name, mask in masks.items():
        prune.custom_from_mask(model.get_submodule(name), "weight", mask)
    return model


def finetune_step(model: nn.Module, x, y, optimizer) -> float:
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


# --------------------------------------------------------------------------- C-SAM mask step with copies
class SoftMasked(nn.Module):
    """A Conv2d / Linear whose weight is multiplied by a learnable soft mask in plain autograd."""

    def __init__(self, layer: nn.Module, mask: torch.Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.mask = nn.Parameter(mask.detach().clone())

    def forward(self, x):
        weight = self.layer.weight * self.mask
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, weight, self.layer.bias)
        return F.linear(x, weight, self.layer.bias)


def soft_mask_model(model: nn.Module, masks: Dict[str, torch.Tensor]) -> nn.Module:
    """``model`` with each named layer wrapped in :class:`SoftMasked` starting from ``masks[name]``."""
    for name, mask in masks.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, SoftMasked(getattr(owner, child), mask))
    return model


def soft_masks(model: nn.Module) -> List[nn.Parameter]:
    return [m.mask for m in model.modules() if isinstance(m, SoftMasked)]


def _bn_statistics(model: nn.Module):
    return [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
            for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def _restore_bn(saved) -> None:
    for m, mean, var, count in saved:
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(count)


def csam_mask_step_autograd(model: nn.Module, x, x_t, y, optimizer, objective, rate_penalty, rho: float,
                            eps: float = 1e-12) -> float:
    """C-SAM's mask step as plain autograd: gradient of the objective at C, C' = clip(C + rho g / ||g||, 0, 1)
    written over C after a backup copy, the objective's gradient at C', C copied back, the rate term at C,
    the optimizer step, C clipped to [0, 1]. ``objective(logits, logits_t, y) -> (L, parts)`` and
    ``rate_penalty(masks) -> (term, kept)`` are the method's own definitions (sparsesam.algorithms.CSAM).
    BatchNorm's running statistics move with the first clean forward only, as in C-SAM."""
    masks = soft_masks(model)

    def objective_backward(keep_bn: bool):
        before = _bn_statistics(model)
        logits = model(x)
        after_clean = _bn_statistics(model)
        total, _ = objective(logits, model(x_t), y)
        total.backward()  # before restoring: BatchNorm's backward checks its statistics' version
        _restore_bn(after_clean if keep_bn else before)

    optimizer.zero_grad(set_to_none=True)
    objective_backward(keep_bn=True)
    with torch.no_grad():
        grads = [m.grad if m.grad is not None else torch.zeros_like(m) for m in masks]
        norm = torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)
        backup = [m.detach().clone() for m in masks]
        for m, g in zip(masks, grads):
            m.copy_((m + rho * g / (norm + eps)).clamp(0, 1))
    optimizer.zero_grad(set_to_none=True)
    objective_backward(keep_bn=False)
    with torch.no_grad():
        for m, b in zip(masks, backup):
            m.copy_(b)
    term, kept = rate_penalty(masks)
    term.backward()
    optimizer.step()
    with torch.no_grad():
        for m in masks:
            m.clamp_(0, 1)
    return float(kept.detach())
