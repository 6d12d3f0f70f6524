"""N:M sparse execution: sparsesam's ``nm_linear`` vs its CSR ``csr_linear`` on the
same mask and vs the dense masked baseline ``F.linear(x, w*m, b)``, all with
autograd, forward + backward, measured in the same run.

B=256, 4096x4096 linear at 2:4 (sparsity 0.5), 1:4 (0.75), 1:8 (0.875) and
1:16 (0.9375); the N:M of each sparsity is in ``NM`` (and in each result's
extra_info). The dense baseline's time does not depend on the sparsity; both
sparse ones scale with nnz. N:M differs from CSR in its index (one byte per
entry instead of twelve, no offsets) and its regular loops.

Timings only: ``.venv/bin/python -m pytest bench/bench_nm_linear.py --benchmark-enable``
Timings and the ratio table (medians and minima, each ratio from one run):
``.venv/bin/python bench/bench_nm_linear.py [pytest -k expression]``
Same-process interleaved ratios (A/B on a noisy machine; rounds rotate the
implementations): ``.venv/bin/python bench/bench_nm_linear.py --interleaved [rounds]``
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import torch.nn.functional as F

from sparsesam.ops import csr_linear, nm_linear
from sparsesam.pruning.nm import nm_mask
from sparsesam.sparse import CSRPattern, NMPattern

from memory import saved_bytes

BATCH = 256
FEATURES = 4096
NM = {0.5: (2, 4), 0.75: (1, 4), 0.875: (1, 8), 0.9375: (1, 16)}
SPARSITIES = list(NM)
IMPLS = ["nm", "csr", "dense_masked"]


def _bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _case(impl, sparsity):
    """(step inputs, forward fn, bytes of weight storage) for one implementation."""
    n, m = NM[sparsity]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, FEATURES, generator=gen, requires_grad=True)
    w = torch.randn(FEATURES, FEATURES, generator=gen)
    mask = nm_mask(torch.rand(FEATURES, FEATURES, generator=gen), n, m)
    b = torch.randn(FEATURES, generator=gen, requires_grad=True)
    if impl == "nm":
        pattern = NMPattern.from_mask(mask, n, m)
        values = pattern.gather(w).requires_grad_()
        return (x, values, b), lambda x, v, b: nm_linear(x, v, pattern, b), _bytes(values, pattern.indices)
    if impl == "csr":
        pattern = CSRPattern.from_mask(mask)
        values = pattern.gather(w).requires_grad_()
        return (x, values, b), lambda x, v, b: csr_linear(x, v, pattern, b), _bytes(values, *pattern)
    w.requires_grad_()
    return (x, w, b), lambda x, w, b: F.linear(x, w * mask, b), _bytes(w, mask)


def _fwd_bwd(fn, inputs, grad):
    def step():
        fn(*inputs).backward(grad)
        for t in inputs:
            t.grad = None
    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_nm_linear_fwd_bwd(benchmark, impl, sparsity):
    inputs, fn, weight_bytes = _case(impl, sparsity)
    grad = torch.randn(BATCH, FEATURES)
    n, m = NM[sparsity]
    benchmark.group = f"linear B={BATCH} {FEATURES}x{FEATURES} {n}:{m} (sparsity={sparsity})"
    benchmark.extra_info["nm"] = f"{n}:{m}"
    benchmark.extra_info["weight_bytes"] = weight_bytes
    benchmark.extra_info["saved_bytes"] = saved_bytes(lambda: fn(*inputs), inputs)
    benchmark.pedantic(_fwd_bwd(fn, inputs, grad), rounds=5, warmup_rounds=1)


def ratio_table(results: dict) -> str:
    groups = {}
    for b in results["benchmarks"]:
        groups.setdefault(b["group"], {})[b["params"]["impl"]] = b
    rows = ["| case | N:M median / min (ms) | CSR median / min (ms) | dense masked median / min (ms) "
            "| N:M speedup vs CSR, medians / minima | N:M speedup vs dense masked, medians / minima "
            "| weight storage: N:M / CSR / dense masked (MB) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for group, impls in groups.items():
        if set(impls) != set(IMPLS):
            continue
        st = {k: (v["stats"]["median"] * 1e3, v["stats"]["min"] * 1e3) for k, v in impls.items()}
        ours = st["nm"]
        mb = lambda k: impls[k]["extra_info"]["weight_bytes"] / 2**20  # noqa: E731
        rows.append(
            f"| {group} | {ours[0]:.1f} / {ours[1]:.1f} | {st['csr'][0]:.1f} / {st['csr'][1]:.1f} "
            f"| {st['dense_masked'][0]:.1f} / {st['dense_masked'][1]:.1f} "
            f"| {st['csr'][0] / ours[0]:.2f}x / {st['csr'][1] / ours[1]:.2f}x "
            f"| {st['dense_masked'][0] / ours[0]:.2f}x / {st['dense_masked'][1] / ours[1]:.2f}x "
            f"| {mb('nm'):.1f} / {mb('csr'):.1f} / {mb('dense_masked'):.1f} |"
        )
    return "\n".join(rows)


def interleaved(rounds: int) -> str:
    """Median time of each implementation with the implementations taking turns
    round by round in this one process, and the median of the per-round ratios
    (what survives load from other processes best)."""
    rows = ["| case | N:M (ms) | CSR (ms) | dense masked (ms) | CSR / N:M | dense / N:M |", "|---|---:|---:|---:|---:|---:|"]
    grad = torch.randn(BATCH, FEATURES)
    for sparsity in SPARSITIES:
        steps = {}
        for impl in IMPLS:
            inputs, fn, _ = _case(impl, sparsity)
            steps[impl] = _fwd_bwd(fn, inputs, grad)
            steps[impl]()  # warm-up
        times = {impl: [] for impl in IMPLS}
        for r in range(rounds):
            order = IMPLS[r % len(IMPLS):] + IMPLS[:r % len(IMPLS)]
            for impl in order:
                start = time.perf_counter()
                steps[impl]()
                times[impl].append(time.perf_counter() - start)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        ratio = lambda k: statistics.median(a / b for a, b in zip(times[k], times["nm"]))  # noqa: E731
        n, m = NM[sparsity]
        rows.append(f"| {n}:{m} ({sparsity}) | {med['nm']:.1f} | {med['csr']:.1f} | {med['dense_masked']:.1f} "
                    f"| {ratio('csr'):.2f}x | {ratio('dense_masked'):.2f}x |")
    return "\n".join(rows)


def main() -> None:
    header = f"\n{torch.get_num_threads()} threads, torch {torch.__version__}, B={BATCH}, {FEATURES}x{FEATURES}\n"
    if len(sys.argv) > 1 and sys.argv[1] == "--interleaved":
        table = interleaved(int(sys.argv[2]) if len(sys.argv) > 2 else 5)
        print(header)
        print(table)
        return
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [sys.executable, "-m", "pytest", os.path.join(here, "bench_nm_linear.py"), "-q", "-p",
               "no:cacheprovider", "--benchmark-enable", f"--benchmark-json={out}", "-o", "addopts="]
        if len(sys.argv) > 1:
            cmd += ["-k", sys.argv[1]]
        subprocess.run(cmd, check=True)
        with open(out) as f:
            results = json.load(f)
    print(header)
    print(ratio_table(results))


if __name__ == "__main__":
    main()
