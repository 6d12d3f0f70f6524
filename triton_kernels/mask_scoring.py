"""Mask-perturbation scoring in Triton: mask_grad_sq_norm, mask_ascent_ and
mask_score_grad (the math and the why: sparsesam.reference).

Multi-tensor ops, launched like the fused SAM step (multi_tensor.py): one
int64 table of tensor rows and chunks, one program per chunk, one launch per
group of tensors with the same element types. Every elementwise kernel reads
a row

    [grad, weight (0: grads[i] is dM itself), mask or scores, out, numel, layer]

and works on the mask gradient dM = G*W in float64, rounding its result once
the way torch's ``.to`` does (16-bit floats via float32), so it matches the
reference bit for bit. Kernels that write are compiled with
``enable_fp_fusion=False``: a fused multiply-add would round once where the
reference rounds twice.

* ``mask_grad_sq_norm`` is the SAM norm's kernel (multi_tensor.py) with
  s = w where a weight is given: deterministic, no atomics.
* ``mask_score_grad`` stores one float64 partial of sum(dM) per chunk at the
  chunk's index; one program per layer then adds its chunks' partials in a
  fixed order, so the rate gradients do not depend on scheduling.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .multi_tensor import (
    _BLOCK, _CHUNK, _NUM_WARPS, _Groups, _check_lengths, _chunk, _elem, _ptr, _same_dtype, _same_shape,
    _sum_of_squares, _upload, _written,
)

Tensor = torch.Tensor

# Where the layer index sits in a row of the elementwise kernels (see the
# module docstring; the kernels pass the row size 6 and numel's place 4 to
# _chunk as literals).
_LAYER_AT = 5
# Per-layer partial sums: one program per layer adds its chunk partials.
_SEGMENT_BLOCK = 256


# ---------------------------------------------------------------------------
# Kernels


@triton.jit
def _pointers(row, G_DTYPE: tl.constexpr, W_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
              ALIGN: tl.constexpr):
    g_ptr = tl.multiple_of(tl.load(row).to(tl.pointer_type(G_DTYPE)), ALIGN)
    w_ptr = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(W_DTYPE)), ALIGN)
    x_ptr = tl.multiple_of(tl.load(row + 2).to(tl.pointer_type(X_DTYPE)), ALIGN)
    out_ptr = tl.multiple_of(tl.load(row + 3).to(tl.pointer_type(OUT_DTYPE)), ALIGN)
    return g_ptr, w_ptr, x_ptr, out_ptr


@triton.jit
def _mask_grad(g_ptr, w_ptr, offs, inb, zero, HAS_WEIGHTS: tl.constexpr):
    """dM = g*w in float64 (exact for 16/32-bit inputs), or g."""
    dm = tl.load(g_ptr + offs, mask=inb, other=zero).to(tl.float64)
    if HAS_WEIGHTS:
        dm = dm * tl.load(w_ptr + offs, mask=inb, other=zero).to(tl.float64)
    return dm


@triton.jit
def _rounded(v, OUT_DTYPE: tl.constexpr):
    """float64 -> OUT_DTYPE as torch's .to() rounds: 16-bit floats through float32."""
    if OUT_DTYPE.primitive_bitwidth < 32:
        v = v.to(tl.float32)
    return v.to(OUT_DTYPE)


@triton.jit
def _ascent_block(out_ptr, g_ptr, w_ptr, m_ptr, coef, lo, end, HAS_WEIGHTS: tl.constexpr, TAIL: tl.constexpr,
                  BLOCK: tl.constexpr):
    offs = tl.multiple_of(lo, BLOCK) + tl.arange(0, BLOCK)
    inb = offs < end if TAIL else None
    zero = 0.0 if TAIL else None
    dm = _mask_grad(g_ptr, w_ptr, offs, inb, zero, HAS_WEIGHTS)
    v = tl.load(m_ptr + offs, mask=inb, other=zero).to(tl.float64) + coef * dm
    # The reference's clip: v <= 0 -> +0.0, v >= 1 -> 1; NaN fails both tests and comes through.
    v = tl.where(v <= 0.0, 0.0, v)
    v = tl.where(v >= 1.0, 1.0, v)
    tl.store(out_ptr + offs, _rounded(v, out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _mask_ascent_kernel(table_ptr, chunk_ptr, hyper_ptr, sq_norm_ptr, G_DTYPE: tl.constexpr, W_DTYPE: tl.constexpr,
                        HAS_WEIGHTS: tl.constexpr, ALIGN: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row, start, full_end, end = _chunk(table_ptr, chunk_ptr, 6, 4, CHUNK, BLOCK)
    # Masks and out have the gradients' dtype.
    g_ptr, w_ptr, m_ptr, out_ptr = _pointers(row, G_DTYPE, W_DTYPE, G_DTYPE, G_DTYPE, ALIGN)
    # The reference's float64 coefficient rho * (1 / (sqrt(sq_norm) + eps)),
    # read on the device: the host never waits for the norm.
    scale = 1.0 / (tl.sqrt(tl.load(sq_norm_ptr).to(tl.float64)) + tl.load(hyper_ptr + 1))
    coef = tl.load(hyper_ptr) * scale
    for lo in range(start, full_end, BLOCK):
        _ascent_block(out_ptr, g_ptr, w_ptr, m_ptr, coef, lo, end, HAS_WEIGHTS, False, BLOCK)
    if full_end < end:
        _ascent_block(out_ptr, g_ptr, w_ptr, m_ptr, coef, full_end, end, HAS_WEIGHTS, True, BLOCK)


@triton.jit
def _score_grad_block(acc, out_ptr, g_ptr, w_ptr, s_ptr, lo, end, HAS_WEIGHTS: tl.constexpr, TAIL: tl.constexpr,
                      BLOCK: tl.constexpr):
    offs = tl.multiple_of(lo, BLOCK) + tl.arange(0, BLOCK)
    inb = offs < end if TAIL else None
    zero = 0.0 if TAIL else None
    dm = _mask_grad(g_ptr, w_ptr, offs, inb, zero, HAS_WEIGHTS)  # 0 past the end: adds nothing
    s = tl.load(s_ptr + offs, mask=inb, other=zero).to(tl.float64)
    # torch.sign: +0.0 for +-0 and NaN.
    sign = tl.where(s > 0.0, 1.0, tl.where(s < 0.0, -1.0, 0.0)).to(tl.float64)
    tl.store(out_ptr + offs, _rounded(sign * dm, out_ptr.dtype.element_ty), mask=inb)
    return acc + dm


@triton.jit
def _mask_score_grad_kernel(table_ptr, chunk_ptr, partial_ptr, G_DTYPE: tl.constexpr, W_DTYPE: tl.constexpr,
                            HAS_WEIGHTS: tl.constexpr, ALIGN: tl.constexpr, CHUNK: tl.constexpr,
                            BLOCK: tl.constexpr):
    row, start, full_end, end = _chunk(table_ptr, chunk_ptr, 6, 4, CHUNK, BLOCK)
    # Scores and their gradients have the gradients' dtype.
    g_ptr, w_ptr, s_ptr, out_ptr = _pointers(row, G_DTYPE, W_DTYPE, G_DTYPE, G_DTYPE, ALIGN)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for lo in range(start, full_end, BLOCK):
        acc = _score_grad_block(acc, out_ptr, g_ptr, w_ptr, s_ptr, lo, end, HAS_WEIGHTS, False, BLOCK)
    if full_end < end:
        acc = _score_grad_block(acc, out_ptr, g_ptr, w_ptr, s_ptr, full_end, end, HAS_WEIGHTS, True, BLOCK)
    # One partial per chunk at the chunk's own index: no atomics.
    tl.store(partial_ptr + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit
def _segment_sums_kernel(partial_ptr, segment_ptr, out_ptr, BLOCK: tl.constexpr):
    # Program t adds partials [start, start + count) of layer t: lane i takes
    # i, i + BLOCK, ... in order, then a fixed-shape tree.
    t = tl.program_id(0)
    start = tl.load(segment_ptr + 2 * t)
    count = tl.load(segment_ptr + 2 * t + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for lo in range(0, count, BLOCK):
        offs = lo + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + start + offs, mask=offs < count, other=0.0)
    tl.store(out_ptr + t, tl.sum(acc, axis=0))


# ---------------------------------------------------------------------------
# Host side


def _device_of(grads: Sequence[Tensor]) -> torch.device:
    return grads[0].device if len(grads) else torch.device("cpu")


def _weight_elem(i: int, weights: Sequence[Optional[Tensor]], g: Tensor, device: torch.device):
    """The weight's element type, or None where grads[i] is dM itself."""
    w = weights[i]
    if w is None:
        return None
    dtype = _elem(f"weights[{i}]", w, device)
    _same_shape(f"weights[{i}]", w, f"grads[{i}]", g)
    _same_dtype(f"weights[{i}]", w, f"grads[{i}]", g)
    return dtype


def _partner_elem(name: str, t: Tensor, i: int, g: Tensor, device: torch.device):
    dtype = _elem(name, t, device)
    _same_shape(name, t, f"grads[{i}]", g)
    _same_dtype(name, t, f"grads[{i}]", g)
    return dtype


class _Layers:
    """Rows of the elementwise kernels, grouped by element types; keeps the contiguous copies alive."""

    def __init__(self) -> None:
        self.groups = _Groups()
        self.hold: List[Optional[Tensor]] = []

    def add(self, i: int, dtypes: tuple, g: Tensor, w: Optional[Tensor], x: Tensor, out: Tensor) -> None:
        n = g.numel()
        if n == 0:
            return
        gc, xc = g.contiguous(), x.contiguous()
        wc = w.contiguous() if w is not None else None
        self.hold += [gc, wc, xc]
        ptrs = [_ptr(gc), _ptr(wc), _ptr(xc), _ptr(out)]  # row layout: see the module docstring
        self.groups.add(dtypes, None, ptrs + [n, i], n, ptrs)


def mask_grad_sq_norm(grads: Sequence[Tensor], weights: Sequence[Optional[Tensor]]) -> Tensor:
    """sum over all layers of dM^2 (dM = g*w, or g where the weight is None); a float64 0-d tensor."""
    _check_lengths(grads=grads, weights=weights)
    device = _device_of(grads)
    groups = _Groups()
    hold = []
    for i, g in enumerate(grads):
        g_dtype = _elem(f"grads[{i}]", g, device)
        w_dtype = _weight_elem(i, weights, g, device)
        n = g.numel()
        if n == 0:
            continue
        gc = g.contiguous()
        wc = weights[i].contiguous() if w_dtype is not None else None
        hold += [gc, wc]
        ptrs = [_ptr(gc), _ptr(wc), 0]  # row layout: multi_tensor._sq_norm_partials_kernel (no pruning mask)
        groups.add((g_dtype, w_dtype), None, ptrs + [n], n, ptrs[:2])
    return _sum_of_squares(groups.finish(), device)


def mask_ascent_(out: Sequence[Tensor], grads: Sequence[Tensor], weights: Sequence[Optional[Tensor]],
                 masks: Sequence[Tensor], sq_norm: Tensor, rho: float, eps: float) -> None:
    """out_i = clip(M_i + rho * dM_i / (sqrt(sq_norm) + eps), 0, 1), computed in float64, rounded once."""
    if _check_lengths(grads=grads, out=out, weights=weights, masks=masks) == 0:
        return
    device = grads[0].device
    _elem("sq_norm", sq_norm, device)
    if sq_norm.numel() != 1:
        raise ValueError(f"sq_norm must have one element, got shape {tuple(sq_norm.shape)}")
    layers = _Layers()
    writebacks: List[Tuple[Tensor, Tensor]] = []
    for i, g in enumerate(grads):
        g_dtype = _elem(f"grads[{i}]", g, device)
        w_dtype = _weight_elem(i, weights, g, device)
        _partner_elem(f"masks[{i}]", masks[i], i, g, device)
        _partner_elem(f"out[{i}]", out[i], i, g, device)
        if g.numel() == 0:
            continue
        oc = _written(out[i], writebacks, overwritten=True)
        layers.add(i, (g_dtype, w_dtype), g, weights[i], masks[i], oc)
    groups = layers.groups.finish()
    if groups:
        hyper, spans = _upload(groups, (rho, eps), device)
        sq = sq_norm.contiguous()
        for group, (rows, chunks) in zip(groups, spans):
            g_dtype, w_dtype = group.dtypes
            _mask_ascent_kernel[(group.n_chunks,)](
                rows, chunks, hyper, sq,
                G_DTYPE=g_dtype, W_DTYPE=w_dtype or g_dtype, HAS_WEIGHTS=w_dtype is not None,
                ALIGN=group.align, CHUNK=_CHUNK, BLOCK=_BLOCK, num_warps=_NUM_WARPS, enable_fp_fusion=False,
            )
    for dst, src in writebacks:
        dst.copy_(src)


def mask_score_grad(grads: Sequence[Tensor], weights: Sequence[Optional[Tensor]],
                    scores: Sequence[Tensor]) -> Tuple[List[Tensor], Tensor]:
    """HARP's straight-through gradients: (sign(s_i) * dM_i per layer, sum(dM_i) per layer in float64)."""
    n = _check_lengths(grads=grads, weights=weights, scores=scores)
    device = _device_of(grads)
    layers = _Layers()
    score_grads = []
    for i, g in enumerate(grads):
        g_dtype = _elem(f"grads[{i}]", g, device)
        w_dtype = _weight_elem(i, weights, g, device)
        _partner_elem(f"scores[{i}]", scores[i], i, g, device)
        out = torch.empty(g.shape, dtype=g.dtype, device=device)
        score_grads.append(out)
        layers.add(i, (g_dtype, w_dtype), g, weights[i], scores[i], out)
    rates = torch.zeros(n, dtype=torch.float64, device=device)
    groups = layers.groups.finish()
    if not groups:
        return score_grads, rates
    _, spans = _upload(groups, (), device)
    partials = torch.empty(sum(group.n_chunks for group in groups), dtype=torch.float64, device=device)
    # segments[layer] = (first partial, count): partials run group after
    # group, chunk after chunk, in row order.
    segments = [[0, 0] for _ in range(n)]
    base = 0
    for group, (rows, chunks) in zip(groups, spans):
        g_dtype, w_dtype = group.dtypes
        _mask_score_grad_kernel[(group.n_chunks,)](
            rows, chunks, partials[base:],
            G_DTYPE=g_dtype, W_DTYPE=w_dtype or g_dtype, HAS_WEIGHTS=w_dtype is not None,
            ALIGN=group.align, CHUNK=_CHUNK, BLOCK=_BLOCK, num_warps=_NUM_WARPS, enable_fp_fusion=False,
        )
        for row, numel in zip(group.rows, group.numels):
            count = triton.cdiv(numel, _CHUNK)
            segments[row[_LAYER_AT]] = [base, count]
            base += count
    segment_table = torch.tensor(segments, dtype=torch.int64).flatten().to(device)
    _segment_sums_kernel[(n,)](partials, segment_table, rates, BLOCK=_SEGMENT_BLOCK, num_warps=_NUM_WARPS)
    return score_grads, rates
