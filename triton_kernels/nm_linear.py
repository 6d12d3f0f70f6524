"""nm_linear in Triton: ``y = x W^T + b`` with W kept as ``values``
(out_features, K = in_features * n / m) at an N:M pattern (uint8 position of
each entry in its group of m inputs; sparsesam/sparse/nm.py), never densified
beyond one block of one group.

* ``_nm_rows_kernel`` (forward): a program is (one output row, one batch
  block). It walks the row's K entries BLOCK_E at a time; an entry's column
  is ``(e // n) * m + index`` (no offsets, no column array), gathers the
  [BLOCK_B, BLOCK_E] block of x those columns name and reduces it against
  the values.
* ``_nm_grad_input_kernel`` (dx): a program is (one input group, one batch
  block): it owns that group's m columns of dx (so no atomics) and walks all
  output rows BLOCK_R at a time, expanding the rows' n entries of the group
  into a [BLOCK_R, m] block and reducing grad_out's [BLOCK_B, BLOCK_R] block
  against it.
* ``_nm_grad_values_kernel`` (dW): a program is one output row: the dot
  products of that row of grad_out with its entries' columns of x over the
  batch, BLOCK_B rows at a time: the weight gradient at kept entries only.

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

_BLOCK_B = 64
_BLOCK_E = 32
_BLOCK_R = 16
_NUM_WARPS = 4


@triton.jit
def _nm_rows_kernel(
    x_ptr, idx_ptr, val_ptr, bias_ptr, out_ptr,
    B, K, N, M,
    stride_xb, stride_xk,
    stride_ob, stride_or,
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_in = offs_b < B
    # int64: batch * stride can pass 2**31 for large activations.
    x_rows = x_ptr + offs_b.to(tl.int64)[:, None] * stride_xb
    row_base = row.to(tl.int64) * K
    acc = tl.zeros((BLOCK_B,), dtype=ACC_DTYPE)
    for e0 in range(0, K, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_in = offs_e < K
        pos = tl.load(idx_ptr + row_base + offs_e, mask=e_in, other=0).to(tl.int64)
        cols = (offs_e // N).to(tl.int64) * M + pos
        v = tl.load(val_ptr + row_base + offs_e, mask=e_in, other=0.0)
        xg = tl.load(x_rows + cols[None, :] * stride_xk, mask=b_in[:, None] & e_in[None, :], other=0.0)
        acc += tl.sum(xg.to(ACC_DTYPE) * v.to(ACC_DTYPE)[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + row).to(ACC_DTYPE)
    out = out_ptr + offs_b.to(tl.int64) * stride_ob + row.to(tl.int64) * stride_or
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=b_in)


@triton.jit
def _nm_grad_input_kernel(
    g_ptr, idx_ptr, val_ptr, dx_ptr,
    B, R, K, N, M,
    stride_gb, stride_gr,
    stride_db, stride_dk,
    ACC_DTYPE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    N_PAD: tl.constexpr,
    M_PAD: tl.constexpr,
):
    group = tl.program_id(0)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_in = offs_b < B
    rows_b = offs_b.to(tl.int64)
    offs_s = tl.arange(0, N_PAD)
    s_in = offs_s < N
    offs_p = tl.arange(0, M_PAD)
    acc = tl.zeros((BLOCK_B, M_PAD), dtype=ACC_DTYPE)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_in = offs_r < R
        entry = offs_r.to(tl.int64)[:, None] * K + group.to(tl.int64) * N + offs_s[None, :]
        e_in = r_in[:, None] & s_in[None, :]
        pos = tl.load(idx_ptr + entry, mask=e_in, other=0).to(tl.int32)
        v = tl.load(val_ptr + entry, mask=e_in, other=0.0).to(ACC_DTYPE)
        # The rows' weights on this group's m columns: [BLOCK_R, M_PAD].
        w = tl.sum(tl.where(pos[:, :, None] == offs_p[None, None, :], v[:, :, None], 0.0), axis=1)
        g = tl.load(g_ptr + rows_b[:, None] * stride_gb + offs_r.to(tl.int64)[None, :] * stride_gr,
                    mask=b_in[:, None] & r_in[None, :], other=0.0).to(ACC_DTYPE)
        acc += tl.sum(g[:, :, None] * w[None, :, :], axis=1)
    cols = group.to(tl.int64) * M + offs_p
    out = dx_ptr + rows_b[:, None] * stride_db + cols[None, :] * stride_dk
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=b_in[:, None] & (offs_p < M)[None, :])


@triton.jit
def _nm_grad_values_kernel(
    g_ptr, x_ptr, idx_ptr, out_ptr,
    B, K, N, M,
    stride_gb, stride_gr,
    stride_xb, stride_xk,
    ACC_DTYPE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0)
    g_col = g_ptr + row.to(tl.int64) * stride_gr
    row_base = row.to(tl.int64) * K
    for e0 in range(0, K, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_in = offs_e < K
        pos = tl.load(idx_ptr + row_base + offs_e, mask=e_in, other=0).to(tl.int64)
        cols = (offs_e // N).to(tl.int64) * M + pos
        acc = tl.zeros((BLOCK_E,), dtype=ACC_DTYPE)
        for b0 in range(0, B, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            b_in = offs_b < B
            rows_b = offs_b.to(tl.int64)
            g = tl.load(g_col + rows_b * stride_gb, mask=b_in, other=0.0)
            xg = tl.load(x_ptr + rows_b[:, None] * stride_xb + cols[None, :] * stride_xk,
                         mask=b_in[:, None] & e_in[None, :], other=0.0)
            acc += tl.sum(g.to(ACC_DTYPE)[:, None] * xg.to(ACC_DTYPE), axis=0)
        tl.store(out_ptr + row_base + offs_e, acc.to(out_ptr.dtype.element_ty), mask=e_in)


def _batch_block(batch: int) -> int:
    return max(16, min(_BLOCK_B, triton.next_power_of_2(max(batch, 1))))


def nm_linear(x: Tensor, values: Tensor, indices: Tensor, n: int, m: int, bias: Optional[Tensor] = None) -> Tensor:
    """y = x W^T + b over the last dimension of x (any leading dimensions)."""
    out_features, K = values.shape
    in_features = K // n * m
    lead = x.shape[:-1]
    # math.prod, not -1: reshape(-1, 0) is ambiguous when in_features is 0.
    x2 = x.reshape(math.prod(lead), in_features)
    y = torch.empty((x2.shape[0], out_features), dtype=x.dtype, device=x.device)
    if y.numel() > 0:
        values = values.contiguous()
        block_b = _batch_block(x2.shape[0])
        _nm_rows_kernel[(out_features, triton.cdiv(x2.shape[0], block_b))](
            x2, indices, values, bias if bias is not None else values, y,
            x2.shape[0], K, n, m,
            x2.stride(0), x2.stride(1),
            y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None,
            ACC_DTYPE=compute_dtype(y.dtype),
            BLOCK_B=block_b,
            BLOCK_E=_BLOCK_E,
            num_warps=_NUM_WARPS,
        )
    return y.view(*lead, out_features)


def nm_linear_backward(grad_out: Tensor, x: Tensor, values: Tensor, indices: Tensor, n: int, m: int,
                       output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor]:
    """(dx, dvalues) of :func:`nm_linear` for output_mask = (dx, dvalues).

    An output not asked for comes back as ``new_empty((0,))``, and the input
    only it reads (values for dx, x for dvalues) may be a zero-stride
    placeholder: it is never read.
    """
    want_dx, want_dvalues = (bool(v) for v in output_mask)
    out_features, K = values.shape
    groups = K // n
    in_features = groups * m
    batch = math.prod(grad_out.shape[:-1])
    g2 = grad_out.reshape(batch, out_features)
    dx = x.new_empty((0,))
    if want_dx:
        dx = torch.empty(x.shape, dtype=grad_out.dtype, device=grad_out.device)
        d2 = dx.view(batch, in_features)
        if d2.numel() > 0:
            # The [BLOCK_B, BLOCK_R, m] product block stays small: at most 32 batch rows.
            block_b = min(_batch_block(batch), 32)
            _nm_grad_input_kernel[(groups, triton.cdiv(batch, block_b))](
                g2, indices, values.contiguous(), d2,
                batch, out_features, K, n, m,
                g2.stride(0), g2.stride(1),
                d2.stride(0), d2.stride(1),
                ACC_DTYPE=compute_dtype(grad_out.dtype),
                BLOCK_B=block_b,
                BLOCK_R=_BLOCK_R,
                N_PAD=triton.next_power_of_2(n),
                M_PAD=triton.next_power_of_2(m),
                num_warps=_NUM_WARPS,
            )
    dvalues = values.new_empty((0,))
    if want_dvalues:
        dvalues = torch.empty((out_features, K), dtype=grad_out.dtype, device=grad_out.device)
        if dvalues.numel() > 0:
            x2 = x.reshape(batch, in_features)
            # A batch of 0 still launches: the dot products are then 0.
            _nm_grad_values_kernel[(out_features,)](
                g2, x2, indices, dvalues,
                batch, K, n, m,
                g2.stride(0), g2.stride(1),
                x2.stride(0), x2.stride(1),
                ACC_DTYPE=compute_dtype(grad_out.dtype),
                BLOCK_B=_batch_block(batch),
                BLOCK_E=_BLOCK_E,
                num_warps=_NUM_WARPS,
            )
    return dx, dvalues
