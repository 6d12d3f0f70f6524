"""The per-parameter SAM loop everyone knows (davda54/sam, first_step /
second_step around torch.optim.SGD), extended with per-channel radii and
masks: the reference the fused optimizer is tested against."""
from __future__ import annotations

import torch


class LoopSAM(torch.optim.Optimizer):
    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, masks=None, channel_rho=None, **kwargs):
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.masks = masks or {}
        self.channel_rho = channel_rho or {}

    def _kept(self, p, t):
        m = self.masks.get(p)
        return t if m is None else t * (m != 0)

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = 1.0 / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                rho = self.channel_rho.get(p)
                rho = group["rho"] if rho is None else rho.reshape(-1, *([1] * (p.dim() - 1)))
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale * rho
                p.add_(self._kept(p, e_w))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        before = {p: p.detach().clone() for p in self.masks}
        self.base_optimizer.step()
        for p, m in self.masks.items():
            p.copy_(torch.where(m != 0, p, before[p]))
        if zero_grad:
            self.zero_grad()

    def _grad_norm(self):
        return torch.norm(torch.stack([
            self._kept(p, (torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2)
            for group in self.param_groups for p in group["params"] if p.grad is not None
        ]), p=2)
