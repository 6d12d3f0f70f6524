"""Mask-perturbation scoring in Triton: mask_grad_sq_norm, mask_ascent_,
mask_flip_scores, mask_flip_topk and mask_score_grad (the math and the why:
sparsesam.reference).

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
* ``mask_flip_topk`` scores with the flip kernel, then selects with one
  stable device sort per layer (ties by index, NaN last, as the reference
  defines the order). Checking k against the number of kept entries reads
  that count on the host: a sync per call, which an occasional pruning round
  can afford.
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

# A flip op's binary masks are read as bytes and tested with != 0.
_BINARY_MASKS = (torch.bool, torch.uint8, torch.int8)
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
    # clip to [0, 1] as selects: NaN fails both tests and comes through.
    v = tl.where(v < 0.0, 0.0, v)
    v = tl.where(v > 1.0, 1.0, v)
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
def _flip_scores_block(out_ptr, g_ptr, w_ptr, m_ptr, lo, end, HAS_WEIGHTS: tl.constexpr, SOFT: tl.constexpr,
                       TAIL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.multiple_of(lo, BLOCK) + tl.arange(0, BLOCK)
    inb = offs < end if TAIL else None
    zero = 0.0 if TAIL else None
    dm = _mask_grad(g_ptr, w_ptr, offs, inb, zero, HAS_WEIGHTS)
    m = tl.load(m_ptr + offs, mask=inb, other=0 if TAIL else None)
    # dM * (M' - M): M' = 0 for a kept entry, 1 for a pruned one.
    if SOFT:
        value = m.to(tl.float64)
        delta = tl.where(value != 0.0, 0.0, 1.0).to(tl.float64) - value
    else:
        delta = tl.where(m != 0, -1.0, 1.0).to(tl.float64)
    tl.store(out_ptr + offs, _rounded(dm * delta, out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _mask_flip_scores_kernel(table_ptr, chunk_ptr, G_DTYPE: tl.constexpr, W_DTYPE: tl.constexpr,
                             M_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                             SOFT: tl.constexpr, ALIGN: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row, start, full_end, end = _chunk(table_ptr, chunk_ptr, 6, 4, CHUNK, BLOCK)
    g_ptr, w_ptr, m_ptr, out_ptr = _pointers(row, G_DTYPE, W_DTYPE, M_DTYPE, OUT_DTYPE, ALIGN)
    for lo in range(start, full_end, BLOCK):
        _flip_scores_block(out_ptr, g_ptr, w_ptr, m_ptr, lo, end, HAS_WEIGHTS, SOFT, False, BLOCK)
    if full_end < end:
        _flip_scores_block(out_ptr, g_ptr, w_ptr, m_ptr, full_end, end, HAS_WEIGHTS, SOFT, True, BLOCK)


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


def _flip_mask_elem(i: int, m: Tensor, g: Tensor, device: torch.device):
    """(element type, soft?) of a flip op's mask: binary bytes, or the gradients' dtype."""
    if not isinstance(m, Tensor):
        raise TypeError(f"masks[{i}] must be a torch.Tensor, got {type(m).__name__}")
    if m.device != device:
        raise ValueError(f"masks[{i}] is on {m.device} but the first tensor is on {device}: all must be on one device")
    _same_shape(f"masks[{i}]", m, f"grads[{i}]", g)
    if m.dtype in _BINARY_MASKS:
        return tl.int8, False
    if m.dtype != g.dtype:
        raise TypeError(f"masks[{i}] must be bool, uint8, int8 or {g.dtype} (the gradients' dtype), got {m.dtype}")
    return _elem(f"masks[{i}]", m, device), True


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def mask_flip_scores(grads: Sequence[Tensor], weights: Sequence[Optional[Tensor]],
                     masks: Sequence[Tensor]) -> List[Tensor]:
    """dM * (M' - M) per entry, M' = 0 where kept and 1 where pruned; float32 (float64 for float64 grads)."""
    _check_lengths(grads=grads, weights=weights, masks=masks)
    device = _device_of(grads)
    layers = _Layers()
    scores = []
    for i, g in enumerate(grads):
        g_dtype = _elem(f"grads[{i}]", g, device)
        w_dtype = _weight_elem(i, weights, g, device)
        m_dtype, soft = _flip_mask_elem(i, masks[i], g, device)
        out = torch.empty(g.shape, dtype=_score_dtype(g.dtype), device=device)
        scores.append(out)
        layers.add(i, (g_dtype, w_dtype, m_dtype, soft, _elem("scores", out, device)), g, weights[i], masks[i], out)
    groups = layers.groups.finish()
    if groups:
        _, spans = _upload(groups, (), device)
        for group, (rows, chunks) in zip(groups, spans):
            g_dtype, w_dtype, m_dtype, soft, out_dtype = group.dtypes
            _mask_flip_scores_kernel[(group.n_chunks,)](
                rows, chunks,
                G_DTYPE=g_dtype, W_DTYPE=w_dtype or g_dtype, M_DTYPE=m_dtype, OUT_DTYPE=out_dtype,
                HAS_WEIGHTS=w_dtype is not None, SOFT=soft,
                ALIGN=group.align, CHUNK=_CHUNK, BLOCK=_BLOCK, num_warps=_NUM_WARPS, enable_fp_fusion=False,
            )
    return scores


def _k_list(name: str, values: Sequence[int], n: int) -> List[int]:
    values = [int(k) for k in values]
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but grads has {n}")
    for i, k in enumerate(values):
        if k < 0:
            raise ValueError(f"{name}[{i}] must be >= 0, got {k}")
    return values


def mask_flip_topk(grads: Sequence[Tensor], weights: Sequence[Optional[Tensor]], masks: Sequence[Tensor],
                   k_prune: Sequence[int], k_grow: Sequence[int]) -> Tuple[List[Tensor], List[Tensor]]:
    """Per layer, flat indices of the k_prune kept / k_grow pruned entries with the smallest flip scores,
    ordered by (score, index) with NaN last."""
    k_prune = _k_list("k_prune", k_prune, len(grads))
    k_grow = _k_list("k_grow", k_grow, len(grads))
    scores = mask_flip_scores(grads, weights, masks)
    prune, grow = [], []
    for i, (s, m) in enumerate(zip(scores, masks)):
        # One stable sort orders the whole layer by (score, index), NaN last;
        # splitting it by the mask keeps that order within each side.
        order = torch.sort(s.reshape(-1), stable=True).indices
        kept_in_order = (m.reshape(-1) != 0)[order]
        kept_side, pruned_side = order[kept_in_order], order[~kept_in_order]
        if k_prune[i] > kept_side.numel():
            raise ValueError(f"mask_flip_topk: k_prune[{i}] = {k_prune[i]} but masks[{i}] keeps only "
                             f"{kept_side.numel()} entries")
        if k_grow[i] > pruned_side.numel():
            raise ValueError(f"mask_flip_topk: k_grow[{i}] = {k_grow[i]} but masks[{i}] prunes only "
                             f"{pruned_side.numel()} entries")
        prune.append(kept_side[: k_prune[i]].clone())
        grow.append(pruned_side[: k_grow[i]].clone())
    return prune, grow


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
