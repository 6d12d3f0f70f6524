"""Shared test inputs for the ops' tests: masks of every kind (``make_mask`` on CPU, ``pruned_mask`` on a
device), values drawn once in float64 and rounded to the dtype under test, float64 copies, the zero-stride
placeholder autograd passes for an input it did not save, and a runner that returns the output and every
input gradient of a function."""
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


def rounded_randn(*shape, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal values drawn in float64 and rounded once to ``dtype``, so every dtype sees the same values."""
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def tensors_to64(*tensors):
    """The same tensors in float64 (a bool mask, an integer index or None stays as it is)."""
    return [t.double() if t is not None and t.is_floating_point() else t for t in tensors]


def placeholder(like: torch.Tensor, shape) -> torch.Tensor:
    """What the ops' autograd passes for an input it did not save: zero strides, no memory."""
    return like.new_zeros(()).expand(shape)


def pruned_mask(shape, kind: str, dtype: torch.dtype, device="cuda") -> torch.Tensor:
    """A mask as pruning leaves it, on ``device``: ``bool`` keeps about 60%; ``float`` is soft, with exact zeros
    where it prunes."""
    keep = torch.rand(shape, device=device) > 0.4
    if kind == "bool":
        return keep
    return torch.where(keep, torch.rand(shape, device=device), 0.0).to(dtype)
