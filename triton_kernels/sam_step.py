"""The fused SAM step in Triton: sam_grad_sq_norm, sam_perturb_ and sgd_step_.

All three are multi-tensor ops (one call covers every parameter) and launch
apex-style: the host writes one int64 table holding

* a row per tensor: its data pointers (``data_ptr()``), its length and, for
  ``sam_perturb_``, the run length of one output channel;
* a row per chunk of ``_CHUNK`` elements: (tensor row, first element);
* the float hyper-parameters (lr, momentum, ..., eps) as float64 bit
  patterns, so float64 parameters see them without a float32 detour;

copies it to the device in one transfer (pinned, non-blocking) and launches
one program per chunk. A program loads its row, turns the stored integers
back into typed pointers (``int64 -> pointer``, which the interpreter also
supports for CPU tensors) and walks its chunk in blocks of ``_BLOCK``. That
machinery, and the norm's kernels, live in multi_tensor.py (shared with
mask_scoring.py).

Element types are compile-time constants, so tensors are grouped by their
dtypes and mask kind, one launch per group. A dense parameter (mask None)
joins a masked group of the same dtypes with a null mask pointer, which the
kernel never dereferences, so the usual model -- masked weights, dense biases
and norms, one dtype -- is a single launch per op.

Semantics are those of ``sparsesam.reference``: a mask entry that is zero
(False) marks a pruned weight, which does not count in the norm, whose
output entry is the parameter itself, and whose parameter and momentum-buffer
entries keep their bits. (Full blocks store those bits back unchanged, so
that their stores need no lane mask and can be vectorised; the tail block,
and a momentum buffer's first step, skip pruned entries with a masked store.)

* ``sam_grad_sq_norm`` is deterministic without atomics: each chunk is summed
  in float32 (float64 for float64 inputs) into one partial stored at the
  chunk's fixed index, and a second, single-program kernel adds the partials
  in float64 in a fixed order.
* ``sam_perturb_`` computes in float64 like the reference and rounds the way
  torch's ``.to(dtype)`` does (16-bit floats via float32), so it matches the
  reference bit for bit; it reads ``sq_norm`` on the device (no host sync).
* ``sgd_step_`` rounds to the parameter dtype after every operation, exactly
  like the reference's sequence of tensor ops, so it matches it bit for bit.

Both writing kernels are compiled with ``enable_fp_fusion=False``: a fused
multiply-add would round once where the reference rounds twice.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

# The table, groups, chunk walk and the norm kernels: multi_tensor.py.
from .multi_tensor import (
    _BLOCK, _CHUNK, _NUM_WARPS, _Groups, _check_lengths, _chunk, _elem, _mask_elem, _ptr, _same_dtype, _same_shape,
    _sum_of_squares, _upload, _written,
)

Tensor = torch.Tensor


# ---------------------------------------------------------------------------
# Kernels (conventions: multi_tensor.py)


@triton.jit
def _sam_perturb_block(out_ptr, w_ptr, g_ptr, m_ptr, has_mask, rho_ptr, run, rho_scale, scale, lo, end,
                       ADAPTIVE: tl.constexpr, HAS_MASKS: tl.constexpr, PER_CHANNEL: tl.constexpr,
                       TAIL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.multiple_of(lo, BLOCK) + tl.arange(0, BLOCK)
    inb = offs < end if TAIL else None
    zero = 0.0 if TAIL else None
    OUT_DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    w_raw = tl.load(w_ptr + offs, mask=inb, other=zero)
    w = w_raw.to(tl.float64)
    g = tl.load(g_ptr + offs, mask=inb, other=zero).to(tl.float64)
    if PER_CHANNEL:
        e = tl.load(rho_ptr + offs // run, mask=inb, other=zero).to(tl.float64) * scale
    else:
        e = rho_scale
    # The reference's order: ((rho * scale) * g) * w^2, then w + e.
    e = e * g
    if ADAPTIVE:
        e = e * (w * w)
    new = w + e
    # float64 -> out dtype as torch's .to() does it: a 16-bit float via
    # float32 (c10::Half and c10::BFloat16 are built from a float; going
    # direct differs where the first rounding lands on a tie).
    if OUT_DTYPE.primitive_bitwidth < 32:
        new = new.to(tl.float32)
    new = new.to(OUT_DTYPE)
    if HAS_MASKS:
        m = tl.load(m_ptr + offs, mask=inb & has_mask if TAIL else has_mask, other=1)
        # A pruned entry is the parameter itself, copied bit for bit.
        new = tl.where(m != 0, new, w_raw.to(OUT_DTYPE))
    tl.store(out_ptr + offs, new, mask=inb)


@triton.jit
def _sam_perturb_kernel(
    table_ptr,
    chunk_ptr,
    hyper_ptr,
    sq_norm_ptr,
    OUT_DTYPE: tl.constexpr,
    W_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    RHO_DTYPE: tl.constexpr,
    HAS_MASKS: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    ALIGN: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Row: out, param, grad, mask (0 if dense), rho, numel, channel run length.
    row, start, full_end, end = _chunk(table_ptr, chunk_ptr, 7, 5, CHUNK, BLOCK)
    out_ptr = tl.multiple_of(tl.load(row).to(tl.pointer_type(OUT_DTYPE)), ALIGN)
    w_ptr = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(W_DTYPE)), ALIGN)
    g_ptr = tl.multiple_of(tl.load(row + 2).to(tl.pointer_type(G_DTYPE)), ALIGN)
    m_ptr = tl.multiple_of(tl.load(row + 3).to(tl.pointer_type(M_DTYPE)), ALIGN)
    has_mask = tl.load(row + 3) != 0
    rho_ptr = tl.load(row + 4).to(tl.pointer_type(RHO_DTYPE))
    # A 0-d rho in a group with per-channel ones has run length numel: every
    # element reads rho[0].
    run = tl.load(row + 6)
    # The reference's float64 scale 1 / (sqrt(sq_norm) + eps): sqrt and
    # division are correctly rounded in float64, so the bits agree. Read on
    # the device, so the host never waits for the norm.
    scale = 1.0 / (tl.sqrt(tl.load(sq_norm_ptr).to(tl.float64)) + tl.load(hyper_ptr))
    rho_scale = scale
    if not PER_CHANNEL:
        rho_scale = tl.load(rho_ptr).to(tl.float64) * scale
    for lo in range(start, full_end, BLOCK):
        _sam_perturb_block(out_ptr, w_ptr, g_ptr, m_ptr, has_mask, rho_ptr, run, rho_scale, scale, lo, end,
                           ADAPTIVE, HAS_MASKS, PER_CHANNEL, False, BLOCK)
    if full_end < end:
        _sam_perturb_block(out_ptr, w_ptr, g_ptr, m_ptr, has_mask, rho_ptr, run, rho_scale, scale, full_end, end,
                           ADAPTIVE, HAS_MASKS, PER_CHANNEL, True, BLOCK)


@triton.jit
def _sgd_block(w_ptr, g_ptr, buf_ptr, m_ptr, has_mask, lr, momentum, one_minus_dampening, weight_decay, lo, end,
               HAS_MASKS: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
               NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, FIRST_STEP: tl.constexpr, TAIL: tl.constexpr,
               BLOCK: tl.constexpr):
    # Every result is rounded to the parameter dtype W and widened back to
    # the compute dtype C (lr's): exactly one tensor op of the reference each.
    offs = tl.multiple_of(lo, BLOCK) + tl.arange(0, BLOCK)
    inb = offs < end if TAIL else None
    zero = 0.0 if TAIL else None
    W: tl.constexpr = w_ptr.dtype.element_ty
    C: tl.constexpr = lr.dtype
    w_raw = tl.load(w_ptr + offs, mask=inb, other=zero)
    w = w_raw.to(C)
    d = tl.load(g_ptr + offs, mask=inb, other=zero).to(C)
    if HAS_MASKS:
        keep = tl.load(m_ptr + offs, mask=inb & has_mask if TAIL else has_mask, other=1) != 0
    if MAXIMIZE:
        d = -d
    if HAS_WEIGHT_DECAY:
        d = (d + (weight_decay * w).to(W).to(C)).to(W).to(C)
    if HAS_MOMENTUM:
        if FIRST_STEP:
            # torch starts the buffer as a copy of the (decayed) gradient. A
            # pruned entry may hold anything and is not read, so it is
            # skipped with a predicated store.
            buf = d
            if HAS_MASKS:
                tl.store(buf_ptr + offs, buf.to(W), mask=keep & inb if TAIL else keep)
            else:
                tl.store(buf_ptr + offs, buf.to(W), mask=inb)
        else:
            buf_raw = tl.load(buf_ptr + offs, mask=inb, other=zero)
            buf = ((buf_raw.to(C) * momentum).to(W).to(C) + (one_minus_dampening * d).to(W).to(C)).to(W).to(C)
            new_buf = buf.to(W)
            if HAS_MASKS:
                # A pruned entry gets its own bits back: an unconditional
                # (vectorisable) store that changes nothing there.
                new_buf = tl.where(keep, new_buf, buf_raw)
            tl.store(buf_ptr + offs, new_buf, mask=inb)
        if NESTEROV:
            d = (d + (momentum * buf).to(W).to(C)).to(W).to(C)
        else:
            d = buf
    new = (w - (lr * d).to(W).to(C)).to(W)
    if HAS_MASKS:
        # Pruned entries keep their bits, as above.
        new = tl.where(keep, new, w_raw)
    tl.store(w_ptr + offs, new, mask=inb)


@triton.jit
def _sgd_step_kernel(
    table_ptr,
    chunk_ptr,
    hyper_ptr,
    W_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    HAS_MASKS: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    ALIGN: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Row: param, grad, momentum buffer (0 without momentum), mask (0 if dense), numel.
    row, start, full_end, end = _chunk(table_ptr, chunk_ptr, 5, 4, CHUNK, BLOCK)
    # Gradient and momentum buffer have the parameter's dtype (the launcher
    # checks): the reference rounds every op to that one dtype.
    w_ptr = tl.multiple_of(tl.load(row).to(tl.pointer_type(W_DTYPE)), ALIGN)
    g_ptr = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(W_DTYPE)), ALIGN)
    buf_ptr = tl.multiple_of(tl.load(row + 2).to(tl.pointer_type(W_DTYPE)), ALIGN)
    m_ptr = tl.multiple_of(tl.load(row + 3).to(tl.pointer_type(M_DTYPE)), ALIGN)
    has_mask = tl.load(row + 3) != 0
    # float64 hyper-parameters converted as torch converts a Python scalar
    # for a tensor op (to float32 for 16/32-bit tensors).
    lr = tl.load(hyper_ptr).to(COMPUTE_DTYPE)
    momentum = tl.load(hyper_ptr + 1).to(COMPUTE_DTYPE)
    one_minus_dampening = tl.load(hyper_ptr + 2).to(COMPUTE_DTYPE)
    weight_decay = tl.load(hyper_ptr + 3).to(COMPUTE_DTYPE)
    for lo in range(start, full_end, BLOCK):
        _sgd_block(w_ptr, g_ptr, buf_ptr, m_ptr, has_mask, lr, momentum, one_minus_dampening, weight_decay, lo, end,
                   HAS_MASKS, HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV, MAXIMIZE, FIRST_STEP, False, BLOCK)
    if full_end < end:
        _sgd_block(w_ptr, g_ptr, buf_ptr, m_ptr, has_mask, lr, momentum, one_minus_dampening, weight_decay,
                   full_end, end, HAS_MASKS, HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV, MAXIMIZE, FIRST_STEP,
                   True, BLOCK)



def sam_grad_sq_norm(
    grads: Sequence[Tensor], weights: Sequence[Tensor], masks: Sequence[Optional[Tensor]], adaptive: bool
) -> Tensor:
    """sum over all tensors of (s*g)^2 at kept entries, s = |w| if adaptive else 1; a float64 0-d tensor.

    Deterministic: fixed chunks, one partial each at a fixed index, the
    partials added in float64 in a fixed order. ``weights`` is read only when
    adaptive.
    """
    adaptive = bool(adaptive)
    _check_lengths(grads=grads, masks=masks)
    if adaptive:
        _check_lengths(grads=grads, weights=weights)
    device = grads[0].device if len(grads) else torch.device("cpu")
    groups = _Groups()
    hold = []  # contiguous copies live until their kernels are queued
    for i, g in enumerate(grads):
        g_dtype = _elem(f"grads[{i}]", g, device)
        w_dtype = None
        if adaptive:
            w_dtype = _elem(f"weights[{i}]", weights[i], device)
            _same_shape(f"weights[{i}]", weights[i], f"grads[{i}]", g)
        m_dtype = _mask_elem(f"masks[{i}]", masks[i], f"grads[{i}]", g)
        n = g.numel()
        if n == 0:
            continue
        gc = g.contiguous()
        wc = weights[i].contiguous() if adaptive else None
        mc = masks[i].contiguous() if masks[i] is not None else None
        hold += [gc, wc, mc]
        ptrs = [_ptr(gc), _ptr(wc), _ptr(mc)]  # row layout: _sq_norm_partials_kernel
        groups.add((g_dtype, w_dtype), m_dtype, ptrs + [n], n, ptrs)
    return _sum_of_squares(groups.finish(), device)


def sam_perturb_(
    out: Sequence[Tensor],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    masks: Sequence[Optional[Tensor]],
    rhos: Sequence[Tensor],
    sq_norm: Tensor,
    adaptive: bool,
    eps: float,
) -> None:
    """out_i = w_i + rho_i * s^2 * g_i / (sqrt(sq_norm) + eps) at kept entries, w_i elsewhere (s = |w| or 1).

    rho_i is 0-d (or one element) or has one value per output channel (dim
    0). Computed in float64 and rounded to the parameter dtype as torch's
    ``.to`` rounds; sq_norm is read on the device (no host sync).
    """
    adaptive = bool(adaptive)
    if _check_lengths(params=params, out=out, grads=grads, masks=masks, rhos=rhos) == 0:
        return
    device = params[0].device
    _elem("sq_norm", sq_norm, device)
    if sq_norm.numel() != 1:
        raise ValueError(f"sq_norm must have one element, got shape {tuple(sq_norm.shape)}")
    groups = _Groups()
    writebacks: List[Tuple[Tensor, Tensor]] = []
    hold = []
    for i, w in enumerate(params):
        w_dtype = _elem(f"params[{i}]", w, device)
        o_dtype = _elem(f"out[{i}]", out[i], device)
        g_dtype = _elem(f"grads[{i}]", grads[i], device)
        rho_dtype = _elem(f"rhos[{i}]", rhos[i], device)
        _same_shape(f"out[{i}]", out[i], f"params[{i}]", w)
        _same_dtype(f"out[{i}]", out[i], f"params[{i}]", w)
        _same_shape(f"grads[{i}]", grads[i], f"params[{i}]", w)
        m_dtype = _mask_elem(f"masks[{i}]", masks[i], f"params[{i}]", w)
        rho = rhos[i]
        per_channel = rho.numel() != 1
        if per_channel and (w.dim() == 0 or rho.dim() != 1 or rho.numel() != w.shape[0]):
            channels = w.shape[0] if w.dim() else 1
            raise ValueError(
                f"rhos[{i}] must be 0-d or hold one value per output channel ({channels}), got shape {tuple(rho.shape)}"
            )
        n = w.numel()
        if n == 0:
            continue
        oc = _written(out[i], writebacks, overwritten=True)
        wc, gc, rc = w.contiguous(), grads[i].contiguous(), rho.contiguous()
        mc = masks[i].contiguous() if masks[i] is not None else None
        hold += [wc, gc, rc, mc]
        run = n // w.shape[0] if per_channel else n
        ptrs = [_ptr(oc), _ptr(wc), _ptr(gc), _ptr(mc)]  # row layout: _sam_perturb_kernel
        # rho is read as a scalar or gathered: its alignment does not matter.
        groups.add((o_dtype, w_dtype, g_dtype, rho_dtype), m_dtype, ptrs + [_ptr(rc), n, run], n, ptrs, per_channel)
    groups = groups.finish()
    if groups:
        hyper, spans = _upload(groups, (eps,), device)
        sq = sq_norm.contiguous()
        for group, (rows, chunks) in zip(groups, spans):
            o_dtype, w_dtype, g_dtype, rho_dtype = group.dtypes
            _sam_perturb_kernel[(group.n_chunks,)](
                rows, chunks, hyper, sq,
                OUT_DTYPE=o_dtype,
                W_DTYPE=w_dtype,
                G_DTYPE=g_dtype,
                M_DTYPE=group.mask_or_placeholder,
                RHO_DTYPE=rho_dtype,
                HAS_MASKS=group.has_masks,
                PER_CHANNEL=group.per_channel,
                ADAPTIVE=adaptive,
                ALIGN=group.align,
                CHUNK=_CHUNK,
                BLOCK=_BLOCK,
                num_warps=_NUM_WARPS,
                enable_fp_fusion=False,
            )
    for dst, src in writebacks:
        dst.copy_(src)


def sgd_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    masks: Sequence[Optional[Tensor]],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
) -> None:
    """torch.optim.SGD's update in place, one pass per element; pruned entries of w and buf untouched.

    ``momentum_buffers`` is empty when momentum == 0. Grads and buffers must
    have the parameter's dtype (the reference's rounding is defined per op in
    that dtype).
    """
    has_momentum = momentum != 0
    if _check_lengths(params=params, grads=grads, masks=masks) == 0:
        return
    if has_momentum:
        _check_lengths(params=params, momentum_buffers=momentum_buffers)
    device = params[0].device
    groups = _Groups()
    writebacks: List[Tuple[Tensor, Tensor]] = []
    hold = []
    for i, w in enumerate(params):
        w_dtype = _elem(f"params[{i}]", w, device)
        _elem(f"grads[{i}]", grads[i], device)
        _same_shape(f"grads[{i}]", grads[i], f"params[{i}]", w)
        _same_dtype(f"grads[{i}]", grads[i], f"params[{i}]", w)
        buf = momentum_buffers[i] if has_momentum else None
        if has_momentum:
            _elem(f"momentum_buffers[{i}]", buf, device)
            _same_shape(f"momentum_buffers[{i}]", buf, f"params[{i}]", w)
            _same_dtype(f"momentum_buffers[{i}]", buf, f"params[{i}]", w)
        m_dtype = _mask_elem(f"masks[{i}]", masks[i], f"params[{i}]", w)
        n = w.numel()
        if n == 0:
            continue
        wc = _written(w, writebacks)
        bc = _written(buf, writebacks) if has_momentum else None
        gc = grads[i].contiguous()
        mc = masks[i].contiguous() if masks[i] is not None else None
        hold += [gc, mc]
        ptrs = [_ptr(wc), _ptr(gc), _ptr(bc), _ptr(mc)]  # row layout: _sgd_step_kernel
        groups.add((w_dtype,), m_dtype, ptrs + [n], n, ptrs)
    groups = groups.finish()
    if groups:
        # (1 - dampening) in Python double, like the reference's scalar.
        hyper, spans = _upload(groups, (lr, momentum, 1 - dampening, weight_decay), device)
        for group, (rows, chunks) in zip(groups, spans):
            (w_dtype,) = group.dtypes
            _sgd_step_kernel[(group.n_chunks,)](
                rows, chunks, hyper,
                W_DTYPE=w_dtype,
                M_DTYPE=group.mask_or_placeholder,
                COMPUTE_DTYPE=tl.float64 if w_dtype == tl.float64 else tl.float32,
                HAS_MASKS=group.has_masks,
                HAS_WEIGHT_DECAY=weight_decay != 0,
                HAS_MOMENTUM=has_momentum,
                NESTEROV=bool(nesterov),
                MAXIMIZE=bool(maximize),
                FIRST_STEP=bool(first_step),
                ALIGN=group.align,
                CHUNK=_CHUNK,
                BLOCK=_BLOCK,
                num_warps=_NUM_WARPS,
                enable_fp_fusion=False,
            )
    for dst, src in writebacks:
        dst.copy_(src)
