"""masked_linear in Triton: ``y = x (W*M)^T + b`` with the mask applied while
weight tiles are loaded, so no W*M tensor is ever materialised.

Two kernels, one shared inner loop:

* ``_masked_matmul_kernel``: C = A @ (B . Mb) (+ bias). The forward pass reads
  the weight transposed through its strides (A = x, B = W^T); the input
  gradient reads it as stored (A = dy, B = W).
* ``_weight_grad_matmul_kernel``: G = dy^T @ x, whose store epilogue writes
  ``dW = G*M`` and ``dM = G*W`` straight from the float32 accumulator, so G
  never reaches memory and is rounded only once.

Accumulation is float32 (float64 for float64 inputs, so that dtype keeps its
precision); results are stored in the input dtype.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .masked_weight import compute_dtype

Tensor = torch.Tensor

# The interpreter cannot time anything, so autotuning is off there and fixed
# blocks are used. It simulates programs one after another, each op costing
# about the same whatever the tile size, so tiles are large (64: three times
# faster than 32 on the tests), yet small enough that a dimension of 129 still
# spans several tiles with a partial last one. GROUP_M=2 so that small grids
# still exercise the grouped tile order.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_INTERPRET_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=2)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M row-tiles are swept together, so the B tiles they
    # share are still in L2 when the next row-tile needs them.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_pid_m = (pid // group_size) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m
    return pid_m, pid_n


@triton.jit
def _masked_dot(
    a_ptr, b_ptr, bm_ptr,
    M, N, K,
    pid_m, pid_n,
    stride_am, stride_ak, stride_bk, stride_bn, stride_bmk, stride_bmn,
    MASK_B: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of A @ B, or of A @ (B . Mb) when MASK_B."""
    # Rows past M and columns past N wrap onto valid ones (their results are
    # never stored), so only the K edge needs a load mask. int64 because
    # row * stride can pass 2**31 for large activations.
    rows = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    cols = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    a_rows = a_ptr + rows[:, None] * stride_am
    b_cols = b_ptr + cols[None, :] * stride_bn
    bm_cols = bm_ptr + cols[None, :] * stride_bmn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        kk = k * BLOCK_K + offs_k
        k_in = kk < K
        a = tl.load(a_rows + kk[None, :] * stride_ak, mask=k_in[None, :], other=0.0)
        b = tl.load(b_cols + kk[:, None] * stride_bk, mask=k_in[:, None], other=0.0)
        if MASK_B:
            # The mask is applied to the tile in registers: this is the only
            # place W*M ever exists.
            keep = tl.load(bm_cols + kk[:, None] * stride_bmk, mask=k_in[:, None], other=0)
            if MASK_IS_BOOL:
                # Select, not multiply: a pruned inf/nan weight must give 0.
                b = tl.where(keep, b, tl.zeros_like(b))
            else:
                b = (b.to(ACC_DTYPE) * keep.to(ACC_DTYPE)).to(b.dtype)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _masked_matmul_kernel(
    a_ptr, b_ptr, bm_ptr, bias_ptr, c_ptr,
    M, N, K,
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_bmk, stride_bmn,
    stride_bias,
    stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _masked_dot(
        a_ptr, b_ptr, bm_ptr, M, N, K, pid_m, pid_n,
        stride_am, stride_ak, stride_bk, stride_bn, stride_bmk, stride_bmn,
        True, MASK_IS_BOOL, ACC_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        # Added to the accumulator before the one rounding to the output dtype.
        bias = tl.load(bias_ptr + offs_n.to(tl.int64) * stride_bias, mask=offs_n < N, other=0.0)
        acc += bias.to(ACC_DTYPE)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _weight_grad_matmul_kernel(
    a_ptr, b_ptr, w_ptr, m_ptr, dw_ptr, dm_ptr,
    M, N, K,
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_wm, stride_wn,
    stride_mm, stride_mn,
    stride_om, stride_on,
    MASK_IS_BOOL: tl.constexpr,
    WANT_DW: tl.constexpr,
    WANT_DM: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # G tile = A @ B with A = dy^T; the mask arguments are unused here.
    g = _masked_dot(
        a_ptr, b_ptr, b_ptr, M, N, K, pid_m, pid_n,
        stride_am, stride_ak, stride_bk, stride_bn, stride_bk, stride_bn,
        False, MASK_IS_BOOL, ACC_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)[:, None]
    cols = offs_n.to(tl.int64)[None, :]
    inb = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    # The epilogue of masked_weight.py, fed from registers: W and M are read
    # only by the output that needs them (dW <- M, dM <- W), so a placeholder
    # passed for the other is never touched.
    if WANT_DW:
        keep = tl.load(m_ptr + rows * stride_mm + cols * stride_mn, mask=inb, other=0)
        if MASK_IS_BOOL:
            dw = tl.where(keep, g, tl.zeros_like(g))
        else:
            dw = g * keep.to(ACC_DTYPE)
        tl.store(dw_ptr + rows * stride_om + cols * stride_on, dw.to(dw_ptr.dtype.element_ty), mask=inb)
    if WANT_DM:
        w = tl.load(w_ptr + rows * stride_wm + cols * stride_wn, mask=inb, other=0.0)
        dm = g * w.to(ACC_DTYPE)
        # For a bool mask Triton's cast is `!= 0`, like torch's `.to(torch.bool)`.
        tl.store(dm_ptr + rows * stride_om + cols * stride_on, dm.to(dm_ptr.dtype.element_ty), mask=inb)


def _gpu_configs():
    # The Triton matmul tutorial's search space. Configs that do not fit a
    # GPU (large float64 tiles, say) fail to compile and are skipped by the
    # autotuner.
    cfg = lambda bm, bn, bk, stages, warps: triton.Config(
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_stages=stages, num_warps=warps
    )
    return [
        cfg(128, 256, 64, 3, 8),
        cfg(64, 256, 32, 4, 4),
        cfg(128, 128, 32, 4, 4),
        cfg(128, 64, 32, 4, 4),
        cfg(64, 128, 32, 4, 4),
        cfg(128, 32, 32, 4, 4),
        cfg(64, 32, 32, 5, 2),
        cfg(32, 64, 32, 5, 2),
    ]


def _autotuned(kernel):
    """The kernel autotuned over ``_gpu_configs`` on a GPU; as is under the interpreter."""
    if _INTERPRET:
        return kernel
    # The unit strides are in the key because the same shapes with a
    # transposed operand (forward vs dx) want different tiles.
    return triton.autotune(configs=_gpu_configs(), key=["M", "N", "K", "stride_ak", "stride_bk"])(kernel)


_masked_matmul = _autotuned(_masked_matmul_kernel)
_weight_grad_matmul = _autotuned(_weight_grad_matmul_kernel)


def _input_precision(dtype: torch.dtype) -> str:
    # tl.dot rounds float32 operands to TF32 by default; torch's F.linear on
    # CUDA does so only when the user allowed it, so follow torch's setting.
    # (fp32_precision reflects both the legacy allow_tf32 /
    # set_float32_matmul_precision switches and the new API, and unlike
    # get_float32_matmul_precision it never raises when they are mixed.)
    if dtype == torch.float32 and torch.backends.cuda.matmul.fp32_precision == "tf32":
        return "tf32"
    return "ieee"


def _launch(kernel, M: int, N: int, *args, **constexprs) -> None:
    """Launch a matmul kernel over a (M, N) output; the caller skips empty outputs."""
    if _INTERPRET:
        grid = (triton.cdiv(M, _INTERPRET_BLOCKS["BLOCK_M"]) * triton.cdiv(N, _INTERPRET_BLOCKS["BLOCK_N"]),)
        kernel[grid](*args, **constexprs, **_INTERPRET_BLOCKS)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        kernel[grid](*args, **constexprs)


def _matmul_masked_b(a: Tensor, b: Tensor, b_mask: Tensor, bias: Optional[Tensor], out: Tensor) -> None:
    """out = a @ (b . b_mask) + bias, for 2-D views with any strides (nothing is copied)."""
    M, K = a.shape
    N = b.shape[1]
    _launch(
        _masked_matmul, M, N,
        a, b, b_mask, bias, out,
        M, N, K,
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1),
        b_mask.stride(0), b_mask.stride(1),
        bias.stride(0) if bias is not None else 0,
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None,
        MASK_IS_BOOL=b_mask.dtype == torch.bool,
        ACC_DTYPE=compute_dtype(a.dtype),
        INPUT_PRECISION=_input_precision(a.dtype),
    )


def masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = x (W*M)^T + b over the last dimension of x (any leading dimensions)."""
    out_features, in_features = weight.shape
    lead = x.shape[:-1]
    # math.prod, not -1: reshape(-1, 0) is ambiguous when in_features is 0.
    x2 = x.reshape(math.prod(lead), in_features)
    y = torch.empty((x2.shape[0], out_features), dtype=x.dtype, device=x.device)
    if y.numel() > 0:
        # B = W^T and its mask are transposed views: the strides do the work.
        _matmul_masked_b(x2, weight.t(), mask.t(), bias, y)
    return y.view(*lead, out_features)


def masked_linear_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, mask: Tensor, output_mask: Sequence[bool]
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dW, dM) of :func:`masked_linear` for output_mask = (dx, dW, dM).

    An output not asked for comes back as ``new_empty((0,))``, and the input
    it alone would read (x for dW/dM, the weight for dM) may be a zero-stride
    placeholder: it is never read.
    """
    want_dx, want_dw, want_dm = (bool(v) for v in output_mask)
    out_features, in_features = mask.shape
    batch = math.prod(grad_out.shape[:-1])
    dy = grad_out.reshape(batch, out_features)

    dx = x.new_empty((0,))
    if want_dx:
        dx = torch.empty(x.shape, dtype=grad_out.dtype, device=grad_out.device)
        if dx.numel() > 0:
            _matmul_masked_b(dy, weight, mask, None, dx.view(batch, in_features))

    dw = dm = weight.new_empty((0,))
    if want_dw or want_dm:
        x2 = x.reshape(batch, in_features)
        if want_dw:
            dw = torch.empty(mask.shape, dtype=grad_out.dtype, device=grad_out.device)
        if want_dm:
            dm = torch.empty(mask.shape, dtype=mask.dtype, device=grad_out.device)
        out = dw if want_dw else dm  # both are contiguous with one shape: one pair of strides
        if out.numel() > 0:
            # G = dy^T @ x: a transposed view of dy, reduced over the batch.
            # A batch of 0 still launches (the grid covers the weight): G = 0
            # then, and the epilogue writes 0*M and 0*W as the reference does.
            a = dy.t()
            _launch(
                _weight_grad_matmul, out_features, in_features,
                a, x2, weight, mask,
                # An output not asked for is never stored to: hand over the other.
                dw if want_dw else dm, dm if want_dm else dw,
                out_features, in_features, batch,
                a.stride(0), a.stride(1),
                x2.stride(0), x2.stride(1),
                weight.stride(0), weight.stride(1),
                mask.stride(0), mask.stride(1),
                out.stride(0), out.stride(1),
                MASK_IS_BOOL=mask.dtype == torch.bool,
                WANT_DW=want_dw,
                WANT_DM=want_dm,
                ACC_DTYPE=compute_dtype(grad_out.dtype),
                INPUT_PRECISION=_input_precision(grad_out.dtype),
            )
    return dx, dw, dm
