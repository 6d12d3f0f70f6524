"""True sparse execution of a pruned convolution: sparsesam's ``sparse_conv2d`` (direct
sparse convolution over the CSR pattern of the fixed mask) vs the dense masked baseline
``F.conv2d(x, w*m, b)`` (oneDNN), both with autograd, forward + backward (dx, dW, db);
and ``auto``: a MaskedConv2d converted by ``set_execution(layer, "auto", example=x)`` on the batch.

ResNet-style layer: B=128, 64 -> 64 channels, 32x32, 3x3, stride 1, padding 1, at
sparsity 0 / 0.5 / 0.9 / 0.95 / 0.99 (the first two only in the pytest suite, to place
the crossover). The dense baseline's time does not depend on the sparsity.

In the report (ratios, targets, plot): ``.venv/bin/python bench/report.py --suite sparse_conv2d``
Timings only: ``.venv/bin/python -m pytest bench/bench_sparse_conv2d.py --benchmark-enable``
Ratio table (rounds alternate the two implementations, so machine noise hits both;
medians and minima of the times, and the median of the per-round ratios):
``.venv/bin/python bench/bench_sparse_conv2d.py [rounds]``
"""
from __future__ import annotations

import statistics
import sys

import pytest
import torch
import torch.nn.functional as F
from timing import interleaved

from sparsesam.nn import DispatchCache, MaskedConv2d, execution_summary, set_dispatch_cache, set_execution
from sparsesam.ops import sparse_conv2d
from sparsesam.sparse import CSRPattern

BATCH, CHANNELS, SIZE, KERNEL_SIZE = 128, 64, 32, 3
SPARSITIES = [0.9, 0.95, 0.99]  # the interleaved ratio table's
SUITE_SPARSITIES = [0.0, 0.5, *SPARSITIES]
IMPLS = ["sparsesam", "dense_masked"]
SUITE_IMPLS = [*IMPLS, "auto"]
KERNEL = "sparse_conv2d"  # report.py groups, tabulates and plots by this


def _case(impl, sparsity):
    """(leaf inputs, forward fn, "dense" or the sparse format it computes in); same data for all."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=gen, requires_grad=True)
    w = torch.randn(CHANNELS, CHANNELS, KERNEL_SIZE, KERNEL_SIZE, generator=gen)
    m = torch.rand(w.shape, generator=gen) >= sparsity
    b = torch.randn(CHANNELS, generator=gen, requires_grad=True)
    if impl == "sparsesam":
        pattern = CSRPattern.from_mask(m.flatten(1))
        values = pattern.gather(w.flatten(1)).requires_grad_()
        return (x, values, b), lambda x, v, b: sparse_conv2d(x, v, pattern, b, KERNEL_SIZE, 1, 1), "csr"
    if impl == "auto":
        layer = MaskedConv2d(CHANNELS, CHANNELS, KERNEL_SIZE, padding=1, mask=m)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        old = set_dispatch_cache(DispatchCache())  # decided here, on this batch; no earlier decision
        try:
            layer = set_execution(layer, "auto", example=x)  # training mode: forward+backward decides
        finally:
            set_dispatch_cache(old)
        return (x, *layer.parameters()), lambda x, *_: layer(x), execution_summary(layer, formats=True)[""]
    w.requires_grad_()
    return (x, w, b), lambda x, w, b: F.conv2d(x, w * m, b, 1, 1), "dense"


def _fwd_bwd(fn, inputs, grad):
    def step():
        fn(*inputs).backward(grad)
        for t in inputs:
            t.grad = None
    return step


def _fwd(fn, inputs):
    def step():
        with torch.no_grad():
            fn(*inputs)
    return step


@pytest.mark.parametrize("impl", SUITE_IMPLS)
@pytest.mark.parametrize("sparsity", SUITE_SPARSITIES)
def test_sparse_conv2d_fwd_bwd(benchmark, impl, sparsity):
    inputs, fn, form = _case(impl, sparsity)
    grad = torch.randn(BATCH, CHANNELS, SIZE, SIZE)
    benchmark.group = f"conv2d B={BATCH} {CHANNELS}->{CHANNELS} {SIZE}x{SIZE} 3x3 sparsity={sparsity}"
    benchmark.extra_info.update(kernel=KERNEL, sparsity=sparsity, form=form)
    slow = form != "dense" and sparsity < 0.9  # about 2x dense: fewer rounds
    benchmark.pedantic(_fwd_bwd(fn, inputs, grad), rounds=2 if slow else 5, warmup_rounds=1)


def main(rounds: int = 7) -> None:
    grad = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, {rounds} rounds\n")
    print("| sparsity | pass | sparsesam median / min (ms) | dense masked median / min (ms) "
          "| speedup: medians / minima / median of per-round ratios |")
    print("|---:|---|---:|---:|---:|")
    for sparsity in SPARSITIES:
        cases = {impl: _case(impl, sparsity) for impl in IMPLS}
        for label, make in (("fwd+bwd", lambda fn, inp: _fwd_bwd(fn, inp, grad)), ("fwd", lambda fn, inp: _fwd(fn, inp))):
            times = interleaved({impl: make(fn, inp) for impl, (inp, fn, _) in cases.items()}, rounds)
            ours, dense = times["sparsesam"], times["dense_masked"]
            per_round = statistics.median(d / o for d, o in zip(dense, ours))
            print(f"| {sparsity} | {label} | {statistics.median(ours) * 1e3:.1f} / {min(ours) * 1e3:.1f} "
                  f"| {statistics.median(dense) * 1e3:.1f} / {min(dense) * 1e3:.1f} "
                  f"| {statistics.median(dense) / statistics.median(ours):.1f}x / {min(dense) / min(ours):.1f}x "
                  f"/ {per_round:.1f}x |", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
