"""csr_linear in Triton: ``y = x W^T + b`` with W kept as ``values`` at the
entries of a fixed CSR pattern (sparsesam/sparse/csr.py), never densified.

The weight is processed in blocks of BLOCK_E entries of one sparse row, every
operation vectorised over a block of BLOCK_B batch rows:

* ``_spmm_rows_kernel``: a program is (one sparse row, one batch block). It
  walks the row's entries BLOCK_E at a time, gathers the [BLOCK_B, BLOCK_E]
  block of the dense operand's columns they name and reduces it against their
  values. The forward runs it over the CSR (rows = outputs, operand x); dx
  runs it over the transposed index (rows = inputs, operand grad_out), reading
  each value through ``csr_positions``: no transposed copy of the values and,
  since every dx entry is summed by one program, no atomics.
* ``_sddmm_rows_kernel``: a program is one CSR row. For each block of its
  entries it forms the dot products of that row of grad_out with the entries'
  columns of x over the batch, BLOCK_B rows at a time: the weight gradient
  only at kept entries.

Accumulation is float32 (float64 for float64); results are stored in the
input dtype, rounded once. Operands are read through their strides.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .masked_weight import compute_dtype

Tensor = torch.Tensor

# A [64, 32] gathered block per step: 2048 products, enough work per
# iteration on a GPU and few (sequentially simulated) programs under the
# interpreter. The batch block shrinks to the batch for small batches.
_BLOCK_B = 64
_BLOCK_E = 32
_NUM_WARPS = 4


@triton.jit
def _spmm_rows_kernel(
    x_ptr, ptr_ptr, idx_ptr, val_ptr, pos_ptr, bias_ptr, out_ptr,
    B,
    stride_xb, stride_xk,
    stride_ob, stride_or,
    HAS_BIAS: tl.constexpr,
    VALUES_THROUGH_POS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_in = offs_b < B
    # int64: batch * stride can pass 2**31 for large activations.
    x_rows = x_ptr + offs_b.to(tl.int64)[:, None] * stride_xb
    start = tl.load(ptr_ptr + row)
    end = tl.load(ptr_ptr + row + 1)
    acc = tl.zeros((BLOCK_B,), dtype=ACC_DTYPE)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_in = offs_e < end
        cols = tl.load(idx_ptr + offs_e, mask=e_in, other=0).to(tl.int64)
        if VALUES_THROUGH_POS:
            where = tl.load(pos_ptr + offs_e, mask=e_in, other=0).to(tl.int64)
            v = tl.load(val_ptr + where, mask=e_in, other=0.0)
        else:
            v = tl.load(val_ptr + offs_e, mask=e_in, other=0.0)
        xg = tl.load(x_rows + cols[None, :] * stride_xk, mask=b_in[:, None] & e_in[None, :], other=0.0)
        acc += tl.sum(xg.to(ACC_DTYPE) * v.to(ACC_DTYPE)[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + row).to(ACC_DTYPE)
    out = out_ptr + offs_b.to(tl.int64) * stride_ob + row.to(tl.int64) * stride_or
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=b_in)


@triton.jit
def _sddmm_rows_kernel(
    g_ptr, x_ptr, ptr_ptr, idx_ptr, out_ptr,
    B,
    stride_gb, stride_gr,
    stride_xb, stride_xk,
    ACC_DTYPE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0)
    g_col = g_ptr + row.to(tl.int64) * stride_gr
    start = tl.load(ptr_ptr + row)
    end = tl.load(ptr_ptr + row + 1)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_in = offs_e < end
        cols = tl.load(idx_ptr + offs_e, mask=e_in, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_E,), dtype=ACC_DTYPE)
        for b0 in range(0, B, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            b_in = offs_b < B
            rows_b = offs_b.to(tl.int64)
            g = tl.load(g_col + rows_b * stride_gb, mask=b_in, other=0.0)
            xg = tl.load(x_ptr + rows_b[:, None] * stride_xb + cols[None, :] * stride_xk,
                         mask=b_in[:, None] & e_in[None, :], other=0.0)
            acc += tl.sum(g.to(ACC_DTYPE)[:, None] * xg.to(ACC_DTYPE), axis=0)
        tl.store(out_ptr + offs_e, acc.to(out_ptr.dtype.element_ty), mask=e_in)


def _batch_block(batch: int) -> int:
    return max(16, min(_BLOCK_B, triton.next_power_of_2(max(batch, 1))))


def _spmm_rows(operand: Tensor, ptr: Tensor, idx: Tensor, values: Tensor, pos: Optional[Tensor],
               bias: Optional[Tensor], out: Tensor) -> None:
    """out[b, r] = bias[r] + sum over row r's entries j of value_j * operand[b, idx_j]."""
    batch, rows = out.shape
    block_b = _batch_block(batch)
    grid = (rows, triton.cdiv(batch, block_b))
    _spmm_rows_kernel[grid](
        operand, ptr, idx, values, pos if pos is not None else idx, bias if bias is not None else values, out,
        batch,
        operand.stride(0), operand.stride(1),
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None,
        VALUES_THROUGH_POS=pos is not None,
        ACC_DTYPE=compute_dtype(out.dtype),
        BLOCK_B=block_b,
        BLOCK_E=_BLOCK_E,
        num_warps=_NUM_WARPS,
    )


def csr_linear(x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, ccol_indices: Tensor,
                  row_indices: Tensor, csr_positions: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = x W^T + b over the last dimension of x (any leading dimensions)."""
    out_features, in_features = crow_indices.numel() - 1, ccol_indices.numel() - 1
    lead = x.shape[:-1]
    # math.prod, not -1: reshape(-1, 0) is ambiguous when in_features is 0.
    x2 = x.reshape(math.prod(lead), in_features)
    y = torch.empty((x2.shape[0], out_features), dtype=x.dtype, device=x.device)
    if y.numel() > 0:
        _spmm_rows(x2, crow_indices, col_indices, values, None, bias, y)
    return y.view(*lead, out_features)


def csr_linear_backward(grad_out: Tensor, x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor,
                           ccol_indices: Tensor, row_indices: Tensor, csr_positions: Tensor,
                           output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor]:
    """(dx, dvalues) of :func:`csr_linear` for output_mask = (dx, dvalues).

    An output not asked for comes back as ``new_empty((0,))``, and the input
    only it reads (values for dx, x for dvalues) may be a zero-stride
    placeholder: it is never read.
    """
    want_dx, want_dvalues = (bool(v) for v in output_mask)
    out_features, in_features = crow_indices.numel() - 1, ccol_indices.numel() - 1
    batch = math.prod(grad_out.shape[:-1])
    g2 = grad_out.reshape(batch, out_features)
    dx = x.new_empty((0,))
    if want_dx:
        dx = torch.empty(x.shape, dtype=grad_out.dtype, device=grad_out.device)
        if dx.numel() > 0:
            # W^T's rows are the transposed index; values through csr_positions.
            _spmm_rows(g2, ccol_indices, row_indices, values, csr_positions, None, dx.view(batch, in_features))
    dvalues = values.new_empty((0,))
    if want_dvalues:
        nnz = col_indices.numel()
        dvalues = torch.empty((nnz,), dtype=grad_out.dtype, device=grad_out.device)
        if nnz > 0:
            x2 = x.reshape(batch, in_features)
            # A batch of 0 still launches: the dot products are then 0.
            _sddmm_rows_kernel[(out_features,)](
                g2, x2, crow_indices, col_indices, dvalues,
                batch,
                g2.stride(0), g2.stride(1),
                x2.stride(0), x2.stride(1),
                ACC_DTYPE=compute_dtype(grad_out.dtype),
                BLOCK_B=_batch_block(batch),
                BLOCK_E=_BLOCK_E,
                num_warps=_NUM_WARPS,
            )
    return dx, dvalues
