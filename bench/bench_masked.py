"""Masked linear / conv2d forward+backward: sparsesam's fused op vs the PyTorch
baseline ``F.linear(x, w*m)`` / ``F.conv2d(x, w*m)`` with autograd, same run.

Run (and write bench/RESULTS.md): ``.venv/bin/python bench/report.py``
Or just the timings: ``.venv/bin/python -m pytest bench/bench_masked.py --benchmark-enable``
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsesam.ops import masked_conv2d, masked_linear

from memory import saved_bytes

LINEAR_SIZES = [1024, 4096]
SPARSITIES = [0.5, 0.9, 0.99]
BATCH = 256


def _linear_inputs(n, sparsity):
    x = torch.randn(BATCH, n, requires_grad=True)
    w = torch.randn(n, n, requires_grad=True)
    m = torch.rand(n, n) >= sparsity
    b = torch.randn(n, requires_grad=True)
    return x, w, m, b


def _conv_inputs(sparsity):
    # A ResNet stage-1 3x3 layer on CIFAR-sized maps.
    x = torch.randn(64, 64, 32, 32, requires_grad=True)
    w = torch.randn(64, 64, 3, 3, requires_grad=True)
    m = torch.rand(64, 64, 3, 3) >= sparsity
    return x, w, m


IMPLS_LINEAR = {
    "sparsesam": lambda x, w, m, b: masked_linear(x, w, m, b),
    "torch": lambda x, w, m, b: F.linear(x, w * m, b),
}
IMPLS_CONV = {
    "sparsesam": lambda x, w, m: masked_conv2d(x, w, m, None, 1, 1),
    "torch": lambda x, w, m: F.conv2d(x, w * m, None, 1, 1),
}


def _fwd_bwd(fn, inputs, grad):
    def step():
        out = fn(*inputs)
        out.backward(grad)
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.grad is not None:
                t.grad = None
    return step


@pytest.mark.parametrize("impl", list(IMPLS_LINEAR))
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("n", LINEAR_SIZES)
def test_masked_linear_fwd_bwd(benchmark, impl, sparsity, n):
    inputs = _linear_inputs(n, sparsity)
    grad = torch.randn(BATCH, n)
    fn = IMPLS_LINEAR[impl]
    benchmark.group = f"linear B={BATCH} {n}x{n} sparsity={sparsity}"
    benchmark.extra_info["saved_bytes"] = saved_bytes(lambda: fn(*inputs), inputs)
    benchmark.pedantic(_fwd_bwd(fn, inputs, grad), rounds=9 if n == 4096 else 40, warmup_rounds=3)


@pytest.mark.parametrize("impl", list(IMPLS_CONV))
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_masked_conv2d_fwd_bwd(benchmark, impl, sparsity):
    inputs = _conv_inputs(sparsity)
    grad = torch.randn(64, 64, 32, 32)
    fn = IMPLS_CONV[impl]
    benchmark.group = f"conv3x3 B=64 C=64 32x32 sparsity={sparsity}"
    benchmark.extra_info["saved_bytes"] = saved_bytes(lambda: fn(*inputs), inputs)
    benchmark.pedantic(_fwd_bwd(fn, inputs, grad), rounds=15, warmup_rounds=3)
