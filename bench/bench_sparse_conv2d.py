"""True sparse execution of a pruned convolution: sparsesam's ``sparse_conv2d`` (direct
sparse convolution over the CSR pattern of the fixed mask) vs the dense masked baseline
``F.conv2d(x, w*m, b)``, both with autograd, forward + backward (dx, dW, db).

ResNet-style layer: B=128, 64 -> 64 channels, 32x32, 3x3, stride 1, padding 1, at
sparsity 0.9 / 0.95 / 0.99. The dense baseline's time does not depend on the sparsity.

Timings only: ``.venv/bin/python -m pytest bench/bench_sparse_conv2d.py --benchmark-enable``
Ratio table (rounds alternate the two implementations, so machine noise hits both;
medians and minima of the times, and the median of the per-round ratios):
``.venv/bin/python bench/bench_sparse_conv2d.py [rounds]``
"""
from __future__ import annotations

import statistics
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from sparsesam.ops import sparse_conv2d
from sparsesam.sparse import CSRPattern

BATCH, CHANNELS, SIZE, KERNEL = 128, 64, 32, 3
SPARSITIES = [0.9, 0.95, 0.99]
IMPLS = ["sparsesam", "dense_masked"]


def _case(impl, sparsity):
    """(leaf inputs, forward fn) for one implementation; same data for both."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=gen, requires_grad=True)
    w = torch.randn(CHANNELS, CHANNELS, KERNEL, KERNEL, generator=gen)
    m = torch.rand(w.shape, generator=gen) >= sparsity
    b = torch.randn(CHANNELS, generator=gen, requires_grad=True)
    if impl == "sparsesam":
        pattern = CSRPattern.from_mask(m.flatten(1))
        values = pattern.gather(w.flatten(1)).requires_grad_()
        return (x, values, b), lambda x, v, b: sparse_conv2d(x, v, pattern, b, KERNEL, 1, 1)
    w.requires_grad_()
    return (x, w, b), lambda x, w, b: F.conv2d(x, w * m, b, 1, 1)


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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_sparse_conv2d_fwd_bwd(benchmark, impl, sparsity):
    inputs, fn = _case(impl, sparsity)
    grad = torch.randn(BATCH, CHANNELS, SIZE, SIZE)
    benchmark.group = f"conv2d B={BATCH} {CHANNELS}->{CHANNELS} {SIZE}x{SIZE} 3x3 sparsity={sparsity}"
    benchmark.pedantic(_fwd_bwd(fn, inputs, grad), rounds=5, warmup_rounds=1)


def _interleaved(steps: dict, rounds: int) -> dict:
    """Seconds per round of each step, the steps taking turns within every round."""
    for step in steps.values():
        step()  # warm-up
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def main(rounds: int = 7) -> None:
    grad = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, {rounds} rounds\n")
    print("| sparsity | pass | sparsesam median / min (ms) | dense masked median / min (ms) "
          "| speedup: medians / minima / median of per-round ratios |")
    print("|---:|---|---:|---:|---:|")
    for sparsity in SPARSITIES:
        cases = {impl: _case(impl, sparsity) for impl in IMPLS}
        for label, make in (("fwd+bwd", lambda fn, inp: _fwd_bwd(fn, inp, grad)), ("fwd", lambda fn, inp: _fwd(fn, inp))):
            times = _interleaved({impl: make(fn, inp) for impl, (inp, fn) in cases.items()}, rounds)
            ours, dense = times["sparsesam"], times["dense_masked"]
            per_round = statistics.median(d / o for d, o in zip(dense, ours))
            print(f"| {sparsity} | {label} | {statistics.median(ours) * 1e3:.1f} / {min(ours) * 1e3:.1f} "
                  f"| {statistics.median(dense) * 1e3:.1f} / {min(dense) * 1e3:.1f} "
                  f"| {statistics.median(dense) / statistics.median(ours):.1f}x / {min(dense) / min(ours):.1f}x "
                  f"/ {per_round:.1f}x |", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
