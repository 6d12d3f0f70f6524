"""apply_mask and masked_weight_grad in Triton: the elementwise half of every masked layer.

``apply_mask(W, M) = W*M``; ``masked_weight_grad`` is the fused epilogue that
turns G = dL/d(W*M) into ``dW = G*M`` and ``dM = G*W`` in one pass over G, W
and M. Semantics are those of ``sparsesam.reference``: a bool mask *selects*
(a pruned entry is an exact zero even where the value is inf/nan), a floating
mask *multiplies*; an output not asked for comes back as ``new_empty((0,))``.
"""
from __future__ import annotations

import os
from typing import Sequence, Tuple

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

# Elementwise work is bandwidth-bound: 1024 elements x 4 warps keeps enough
# loads in flight on any GPU, and under the interpreter it keeps the number
# of (sequentially simulated) programs small.
_BLOCK = 1024
_NUM_WARPS = 4


@triton.jit
def _apply_mask_kernel(
    w_ptr,
    m_ptr,
    out_ptr,
    n_elements,
    MASK_IS_BOOL: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # int64 offsets: a weight can have more than 2**31 entries.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n_elements
    w = tl.load(w_ptr + offs, mask=inb, other=0.0)
    m = tl.load(m_ptr + offs, mask=inb, other=0)
    if MASK_IS_BOOL:
        # Select, not multiply: 0 * inf would be nan, a pruned entry must be 0.
        out = tl.where(m, w, tl.zeros_like(w))
    else:
        # The product of two 16-bit floats is exact in float32, so rounding it
        # once gives the same bits as torch's `w * m` in the input dtype.
        out = w.to(COMPUTE_DTYPE) * m.to(COMPUTE_DTYPE)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _masked_weight_grad_kernel(
    g_ptr,
    w_ptr,
    m_ptr,
    dw_ptr,
    dm_ptr,
    n_elements,
    MASK_IS_BOOL: tl.constexpr,
    WANT_DW: tl.constexpr,
    WANT_DM: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n_elements
    # One read of G feeds both outputs; W and M are read only by the output
    # that needs them (dW <- M, dM <- W), so a caller may pass a placeholder
    # for the other.
    g = tl.load(g_ptr + offs, mask=inb, other=0.0)
    if WANT_DW:
        m = tl.load(m_ptr + offs, mask=inb, other=0)
        if MASK_IS_BOOL:
            dw = tl.where(m, g, tl.zeros_like(g))
        else:
            dw = g.to(COMPUTE_DTYPE) * m.to(COMPUTE_DTYPE)
        tl.store(dw_ptr + offs, dw.to(dw_ptr.dtype.element_ty), mask=inb)
    if WANT_DM:
        w = tl.load(w_ptr + offs, mask=inb, other=0.0)
        dm = g.to(COMPUTE_DTYPE) * w.to(COMPUTE_DTYPE)
        # Casting to the mask's dtype; for a bool mask Triton's cast is `!= 0`,
        # which is what torch's `.to(torch.bool)` does.
        tl.store(dm_ptr + offs, dm.to(dm_ptr.dtype.element_ty), mask=inb)


def compute_dtype(dtype: torch.dtype):
    """The dtype products are formed in: float64 stays float64, everything else goes to float32.

    16-bit floats are widened because the product of two of them is exact in
    float32, so the one rounding on store gives the bits torch's own
    16-bit ``*`` gives.
    """
    return tl.float64 if dtype == torch.float64 else tl.float32


def _grid(n: int):
    return (triton.cdiv(n, _BLOCK),)


def apply_mask(weight: Tensor, mask: Tensor) -> Tensor:
    """W * M in the weight's dtype (a bool mask selects, a float mask multiplies)."""
    # The kernel walks flat memory; a non-contiguous weight or mask (a
    # transposed view, a channels_last conv weight) is copied once, and the
    # result is contiguous, as the op's fake impl promises.
    w, m = weight.contiguous(), mask.contiguous()
    out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    n = out.numel()
    if n == 0:
        return out
    _apply_mask_kernel[_grid(n)](
        w, m, out, n,
        MASK_IS_BOOL=mask.dtype == torch.bool,
        COMPUTE_DTYPE=compute_dtype(weight.dtype),
        BLOCK=_BLOCK,
        num_warps=_NUM_WARPS,
    )
    return out


def masked_weight_grad(
    grad_weight: Tensor, weight: Tensor, mask: Tensor, output_mask: Sequence[bool]
) -> Tuple[Tensor, Tensor]:
    """``(G*M, G*W)`` from G = dL/d(W*M) in one pass; an output not asked for is ``new_empty((0,))``."""
    want_dw, want_dm = (bool(v) for v in output_mask)
    empty = grad_weight.new_empty((0,))
    if not (want_dw or want_dm):
        return empty, empty
    g = grad_weight.contiguous()
    # Only the tensors the requested outputs read are made contiguous: the
    # op faces pass a zero-stride placeholder for the one they did not save,
    # and copying that would materialise a weight-sized tensor for nothing.
    m = mask.contiguous() if want_dw else mask
    w = weight.contiguous() if want_dm else weight
    shape, dev = grad_weight.shape, grad_weight.device
    dw = torch.empty(shape, dtype=grad_weight.dtype, device=dev) if want_dw else empty
    dm = torch.empty(shape, dtype=mask.dtype, device=dev) if want_dm else empty
    n = g.numel()
    if n > 0:
        _masked_weight_grad_kernel[_grid(n)](
            g, w, m,
            # A pointer that is never dereferenced (its WANT_ flag is off)
            # still needs a tensor argument: hand over G.
            dw if want_dw else g,
            dm if want_dm else g,
            n,
            MASK_IS_BOOL=mask.dtype == torch.bool,
            WANT_DW=want_dw,
            WANT_DM=want_dm,
            COMPUTE_DTYPE=compute_dtype(grad_weight.dtype),
            BLOCK=_BLOCK,
            num_warps=_NUM_WARPS,
        )
    return dw, dm
