"""The SAM implementations sparsesam's fused optimizer is measured against.

* ``LoopSAM``: the widely used per-parameter code (davda54/sam's
  first_step / second_step around ``torch.optim.SGD``), verbatim in spirit.
* ``ForeachSAM``: the same algorithm with ``torch._foreach_*`` multi-tensor
  ops and a foreach SGD, the best one can do in plain PyTorch.
"""
from __future__ import annotations

import torch


class LoopSAM(torch.optim.Optimizer):
    """davda54/sam's SAM; ``set_channel_rho`` gives a parameter one radius per output channel (AdaSAP)."""

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, eps=1e-12, **kwargs):
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.eps = eps
        self.channel_rho = {}

    def set_channel_rho(self, param, rho):
        self.channel_rho[id(param)] = rho.detach().to(param.dtype).reshape(-1, *([1] * (param.dim() - 1)))

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                scale = self.channel_rho.get(id(p), group["rho"]) / (grad_norm + self.eps)
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _grad_norm(self):
        shared_device = self.param_groups[0]["params"][0].device
        return torch.norm(torch.stack([
            ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2).to(shared_device)
            for group in self.param_groups for p in group["params"] if p.grad is not None
        ]), p=2)


class ForeachSAM:
    """SAM with torch._foreach_* ops: persistent backup buffers, foreach SGD."""

    def __init__(self, params, rho=0.05, **sgd_kwargs):
        self.params = [p for p in params]
        self.rho = rho
        self.backup = [torch.empty_like(p) for p in self.params]
        self.base_optimizer = torch.optim.SGD(self.params, foreach=True, **sgd_kwargs)

    @torch.no_grad()
    def first_step(self):
        grads = [p.grad for p in self.params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        torch._foreach_copy_(self.backup, self.params)
        torch._foreach_add_(self.params, torch._foreach_mul(grads, self.rho / (norm + 1e-12)))

    @torch.no_grad()
    def second_step(self):
        torch._foreach_copy_(self.params, self.backup)
        self.base_optimizer.step()
