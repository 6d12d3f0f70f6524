"""bsr_linear in Triton: ``y = x W^T + b`` with W kept as ``values`` (nblocks, bh, bw) at the
blocks of a fixed BSR pattern (sparsesam/sparse/bsr.py), never densified.

Block-sparse kernels: every kept block is one small dense product.

* ``_block_spmm_kernel``: a program is (one block line, BLOCK_B batch rows).
  It walks the line's kept blocks; for each it loads the [BLOCK_B, red]
  slice of the dense operand the block multiplies and the block itself, and
  accumulates their product into a [BLOCK_B, out] tile (``tl.dot`` when the
  block is at least 16 x 16, else a broadcast product reduced over the
  block, since tl.dot needs 16-wide operands). The forward runs it over the
  BSR (lines = block rows, operand x); dx over the transposed block index
  (lines = block columns, operand grad_out, the block read transposed
  through ``bsr_positions``): every dx value is summed by one program, so no
  atomics and no transposed copy of the values.
* ``_block_sddmm_kernel``: a program is one kept block: the [bh, bw] product
  of its rows of grad_out and its columns of x over the batch, BLOCK_B rows
  at a time: the weight gradient only at kept blocks.

Accumulation is float32 (float64 for float64); results are stored in the
input dtype, rounded once. float32 ``tl.dot`` follows torch's TF32 setting, as
in masked_linear. Operands are read through their strides.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .masked_linear import _input_precision
from .masked_weight import compute_dtype

Tensor = torch.Tensor

_BLOCK_B = 64
_NUM_WARPS = 4


@triton.jit
def _block_spmm_kernel(
    in_ptr, ptr_ptr, idx_ptr, pos_ptr, val_ptr, bias_ptr, out_ptr,
    B, OUT_BLOCK, RED_BLOCK,
    stride_ib, stride_ik,
    stride_ob, stride_oc,
    W_OUT_STRIDE, W_RED_STRIDE,
    HAS_BIAS: tl.constexpr,
    VALUES_THROUGH_POS: tl.constexpr,
    USE_DOT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    OUT_P: tl.constexpr,
    RED_P: tl.constexpr,
):
    line = tl.program_id(0)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_in = offs_b < B
    offs_o = tl.arange(0, OUT_P)
    offs_r = tl.arange(0, RED_P)
    o_in = offs_o < OUT_BLOCK
    r_in = offs_r < RED_BLOCK
    # int64: batch * stride can pass 2**31 for large activations.
    in_rows = in_ptr + offs_b.to(tl.int64)[:, None] * stride_ib
    block_elems = OUT_BLOCK * RED_BLOCK
    # w[o, r] of a block, as [OUT_P, RED_P] offsets.
    w_offs = offs_o[:, None] * W_OUT_STRIDE + offs_r[None, :] * W_RED_STRIDE
    w_in = o_in[:, None] & r_in[None, :]
    start = tl.load(ptr_ptr + line)
    end = tl.load(ptr_ptr + line + 1)
    acc = tl.zeros((BLOCK_B, OUT_P), dtype=ACC_DTYPE)
    for j in range(start, end):
        other = tl.load(idx_ptr + j).to(tl.int64)
        if VALUES_THROUGH_POS:
            blk = tl.load(pos_ptr + j).to(tl.int64)
        else:
            blk = tl.cast(j, tl.int64)
        a = tl.load(in_rows + (other * RED_BLOCK + offs_r)[None, :] * stride_ik,
                    mask=b_in[:, None] & r_in[None, :], other=0.0)
        w = tl.load(val_ptr + blk * block_elems + w_offs, mask=w_in, other=0.0)
        if USE_DOT:
            acc = tl.dot(a, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        else:
            acc += tl.sum(a.to(ACC_DTYPE)[:, None, :] * w.to(ACC_DTYPE)[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + line * OUT_BLOCK + offs_o, mask=o_in, other=0.0).to(ACC_DTYPE)[None, :]
    out = (out_ptr + offs_b.to(tl.int64)[:, None] * stride_ob
           + (line.to(tl.int64) * OUT_BLOCK + offs_o)[None, :] * stride_oc)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=b_in[:, None] & o_in[None, :])


@triton.jit
def _block_sddmm_kernel(
    g_ptr, x_ptr, row_of_ptr, idx_ptr, out_ptr,
    B, BH, BW,
    stride_gb, stride_gr,
    stride_xb, stride_xk,
    USE_DOT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BH_P: tl.constexpr,
    BW_P: tl.constexpr,
):
    j = tl.program_id(0)
    row = tl.load(row_of_ptr + j).to(tl.int64)
    col = tl.load(idx_ptr + j).to(tl.int64)
    offs_i = tl.arange(0, BH_P)
    offs_c = tl.arange(0, BW_P)
    i_in = offs_i < BH
    c_in = offs_c < BW
    g_cols = g_ptr + (row * BH + offs_i)[None, :] * stride_gr
    x_cols = x_ptr + (col * BW + offs_c)[None, :] * stride_xk
    acc = tl.zeros((BH_P, BW_P), dtype=ACC_DTYPE)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        b_in = offs_b < B
        rows_b = offs_b.to(tl.int64)[:, None]
        g = tl.load(g_cols + rows_b * stride_gb, mask=b_in[:, None] & i_in[None, :], other=0.0)
        x = tl.load(x_cols + rows_b * stride_xb, mask=b_in[:, None] & c_in[None, :], other=0.0)
        if USE_DOT:
            acc = tl.dot(tl.trans(g), x, acc, input_precision=INPUT_PRECISION)
        else:
            acc += tl.sum(g.to(ACC_DTYPE)[:, :, None] * x.to(ACC_DTYPE)[:, None, :], axis=0)
    out = out_ptr + j.to(tl.int64) * BH * BW + offs_i[:, None] * BW + offs_c[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=i_in[:, None] & c_in[None, :])


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _batch_block(batch: int) -> int:
    return max(16, min(_BLOCK_B, _pow2(batch)))


def _use_dot(*padded: int) -> bool:
    # tl.dot needs every operand dimension >= 16; smaller blocks would be
    # padded with zeros (16x the work for 4x4), so they take the broadcast path.
    return all(p >= 16 for p in padded)


def _block_spmm(operand: Tensor, ptr: Tensor, idx: Tensor, values: Tensor, pos: Optional[Tensor],
                bias: Optional[Tensor], out: Tensor, out_block: int, red_block: int, w_out_stride: int,
                w_red_stride: int) -> None:
    """out[b, l*out_block + o] = bias + sum over line l's blocks of w[o, r] * operand[b, idx*red_block + r]."""
    batch = out.shape[0]
    lines = ptr.numel() - 1
    block_b = _batch_block(batch)
    out_p, red_p = max(_pow2(out_block), 1), max(_pow2(red_block), 1)
    use_dot = _use_dot(block_b, out_p, red_p)
    if use_dot:
        out_p, red_p = max(out_p, 16), max(red_p, 16)
    grid = (lines, triton.cdiv(batch, block_b))
    _block_spmm_kernel[grid](
        operand, ptr, idx, pos if pos is not None else idx, values, bias if bias is not None else values, out,
        batch, out_block, red_block,
        operand.stride(0), operand.stride(1),
        out.stride(0), out.stride(1),
        w_out_stride, w_red_stride,
        HAS_BIAS=bias is not None,
        VALUES_THROUGH_POS=pos is not None,
        USE_DOT=use_dot,
        ACC_DTYPE=compute_dtype(out.dtype),
        INPUT_PRECISION=_input_precision(out.dtype),
        BLOCK_B=block_b,
        OUT_P=out_p,
        RED_P=red_p,
        num_warps=_NUM_WARPS,
    )


def bsr_linear(x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, ccol_indices: Tensor,
               row_indices: Tensor, bsr_positions: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = x W^T + b over the last dimension of x (any leading dimensions)."""
    _, bh, bw = values.shape
    out_features, in_features = (crow_indices.numel() - 1) * bh, (ccol_indices.numel() - 1) * bw
    lead = x.shape[:-1]
    # math.prod, not -1: reshape(-1, 0) is ambiguous when in_features is 0.
    x2 = x.reshape(math.prod(lead), in_features)
    y = torch.empty((x2.shape[0], out_features), dtype=x.dtype, device=x.device)
    if y.numel() > 0:
        _block_spmm(x2, crow_indices, col_indices, values.contiguous(), None, bias, y, bh, bw, bw, 1)
    return y.view(*lead, out_features)


def bsr_linear_backward(grad_out: Tensor, x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor,
                        ccol_indices: Tensor, row_indices: Tensor, bsr_positions: Tensor,
                        output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor]:
    """(dx, dvalues) of :func:`bsr_linear` for output_mask = (dx, dvalues).

    An output not asked for comes back as ``new_empty((0,))``, and the input
    only it reads (values for dx, x for dvalues) may be a zero-stride
    placeholder: it is never read.
    """
    want_dx, want_dvalues = (bool(v) for v in output_mask)
    nblocks, bh, bw = values.shape
    block_rows = crow_indices.numel() - 1
    out_features, in_features = block_rows * bh, (ccol_indices.numel() - 1) * bw
    batch = math.prod(grad_out.shape[:-1])
    g2 = grad_out.reshape(batch, out_features)
    dx = x.new_empty((0,))
    if want_dx:
        dx = torch.empty(x.shape, dtype=grad_out.dtype, device=grad_out.device)
        if dx.numel() > 0:
            # W^T's block lines are the transposed index; blocks through bsr_positions, read transposed.
            _block_spmm(g2, ccol_indices, row_indices, values.contiguous(), bsr_positions, None,
                        dx.view(batch, in_features), bw, bh, 1, bw)
    dvalues = values.new_empty((0,))
    if want_dvalues:
        dvalues = torch.empty((nblocks, bh, bw), dtype=grad_out.dtype, device=grad_out.device)
        if nblocks > 0:
            x2 = x.reshape(batch, in_features)
            # The block row of each block (output_size: no device sync).
            row_of = torch.repeat_interleave(
                torch.arange(block_rows, device=crow_indices.device, dtype=torch.int32),
                crow_indices.diff(), output_size=nblocks)
            block_b = _batch_block(batch)
            bh_p, bw_p = _pow2(bh), _pow2(bw)
            use_dot = _use_dot(block_b, bh_p, bw_p)
            # A batch of 0 still launches: the products are then 0.
            _block_sddmm_kernel[(nblocks,)](
                g2, x2, row_of, col_indices, dvalues,
                batch, bh, bw,
                g2.stride(0), g2.stride(1),
                x2.stride(0), x2.stride(1),
                USE_DOT=use_dot,
                ACC_DTYPE=compute_dtype(grad_out.dtype),
                INPUT_PRECISION=_input_precision(grad_out.dtype),
                BLOCK_B=block_b,
                BH_P=bh_p,
                BW_P=bw_p,
                num_warps=_NUM_WARPS,
            )
    return dx, dvalues
