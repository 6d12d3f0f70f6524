"""Shared test inputs for the masked-layer ops: masks of every kind and a
runner that returns the output and every input gradient of a function."""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch


def make_mask(shape, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """kind: bool (random keep), float (soft, in [0,1]), zeros, ones (bool)."""
    if kind == "bool":
        return torch.rand(shape) > 0.5
    if kind == "float":
        return torch.rand(shape).to(dtype)
    if kind == "zeros":
        return torch.zeros(shape, dtype=torch.bool)
    if kind == "ones":
        return torch.ones(shape, dtype=torch.bool)
    raise ValueError(kind)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values, laid out so that ``t`` is not contiguous (a transposed copy's view)."""
    if t.dim() < 2 or t.numel() == 0:
        return t
    out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not out.is_contiguous() or t.shape[-1] == 1 or t.shape[-2] == 1
    return out


def outputs_and_grads(fn: Callable, inputs: Dict[str, torch.Tensor], grad_out_seed: int = 1):
    """Run ``fn(**inputs)`` and backpropagate a fixed random cotangent; returns (out, {name: grad})."""
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) if v is not None else None for k, v in inputs.items()}
    out = fn(**leaves)
    gen = torch.Generator().manual_seed(grad_out_seed)
    cot = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    needs = [v for v in leaves.values() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(out, needs, cot, allow_unused=True) if needs else []
    named = {}
    i = 0
    for k, v in leaves.items():
        if v is not None and v.requires_grad:
            g = grads[i]
            named[k] = g if g is not None else torch.zeros_like(v)
            i += 1
    return out, named


def to64(inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in inputs.items()}


DTYPES: Sequence[torch.dtype] = (torch.float32, torch.float64, torch.bfloat16)
MASK_KINDS = ("bool", "float", "zeros", "ones")
