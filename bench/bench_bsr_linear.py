"""Block-sparse execution of a fixed block-structured mask: sparsesam's ``bsr_linear`` vs its CSR
``csr_linear`` on the same mask and vs the dense masked baseline ``F.linear(x, w*m, b)``, all with
autograd, forward + backward, measured in the same run.

B=256, 4096x4096 linear; block masks from ``bsr_magnitude_mask`` (whole
blocks kept) at block sparsity 0.5 to 0.99, with 16x16 blocks (and 4x4, a
finer grain that still reuses each activation load 4 times). The CSR op runs
the very same mask entry by entry, so the CSR/BSR ratio is what the block
structure buys.

Timings only: ``.venv/bin/python -m pytest bench/bench_bsr_linear.py --benchmark-enable``
Timings and the ratio table (medians and minima, each ratio from one run):
``.venv/bin/python bench/bench_bsr_linear.py [pytest -k expression]``
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F

from sparsesam.ops import bsr_linear, csr_linear
from sparsesam.pruning import bsr_magnitude_mask
from sparsesam.sparse import BSRPattern, CSRPattern

from memory import saved_bytes

BATCH = 256
FEATURES = 4096
SPARSITIES = [0.5, 0.9, 0.95, 0.99]
BLOCKS = [(16, 16), (4, 4)]
IMPLS = ["bsr", "csr", "dense_masked"]


def _bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _case(impl, sparsity, block):
    """(step inputs, forward fn, bytes of weight storage) for one implementation."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, FEATURES, generator=gen, requires_grad=True)
    w = torch.randn(FEATURES, FEATURES, generator=gen)
    m = bsr_magnitude_mask(w, sparsity, blocksize=block)
    b = torch.randn(FEATURES, generator=gen, requires_grad=True)
    if impl == "bsr":
        pattern = BSRPattern.from_mask(m, block)
        values = pattern.gather(w).requires_grad_()
        return (x, values, b), lambda x, v, b: bsr_linear(x, v, pattern, b), _bytes(values, *pattern.index)
    if impl == "csr":
        pattern = CSRPattern.from_mask(m)
        values = pattern.gather(w).requires_grad_()
        return (x, values, b), lambda x, v, b: csr_linear(x, v, pattern, b), _bytes(values, *pattern)
    w.requires_grad_()
    return (x, w, b), lambda x, w, b: F.linear(x, w * m, b), _bytes(w, m)


def _fwd_bwd(fn, inputs, grad):
    def step():
        fn(*inputs).backward(grad)
        for t in inputs:
            t.grad = None
    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
def test_bsr_linear_fwd_bwd(benchmark, impl, sparsity, block):
    inputs, fn, weight_bytes = _case(impl, sparsity, block)
    grad = torch.randn(BATCH, FEATURES)
    benchmark.group = f"linear B={BATCH} {FEATURES}x{FEATURES} block={block[0]}x{block[1]} sparsity={sparsity}"
    benchmark.extra_info["weight_bytes"] = weight_bytes
    benchmark.extra_info["saved_bytes"] = saved_bytes(lambda: fn(*inputs), inputs)
    # Slow cases (dense-ish sparse products) get fewer rounds.
    slow = impl != "dense_masked" and sparsity < 0.9
    benchmark.pedantic(_fwd_bwd(fn, inputs, grad), rounds=3 if slow else 11, warmup_rounds=1 if slow else 3)


def ratio_table(results: dict) -> str:
    groups = {}
    for b in results["benchmarks"]:
        groups.setdefault(b["group"], {})[b["params"]["impl"]] = b
    rows = ["| case | bsr median / min (ms) | csr median / min (ms) | dense masked median / min (ms) "
            "| bsr speedup vs csr, medians / minima | bsr speedup vs dense masked, medians / minima "
            "| weight storage: bsr / csr / dense masked (MB) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for group, impls in groups.items():
        if set(impls) != set(IMPLS):
            continue
        st = {k: (v["stats"]["median"] * 1e3, v["stats"]["min"] * 1e3) for k, v in impls.items()}
        ours = st["bsr"]
        mb = lambda k: impls[k]["extra_info"]["weight_bytes"] / 2**20  # noqa: E731
        rows.append(
            f"| {group} | {ours[0]:.1f} / {ours[1]:.1f} | {st['csr'][0]:.1f} / {st['csr'][1]:.1f} "
            f"| {st['dense_masked'][0]:.1f} / {st['dense_masked'][1]:.1f} "
            f"| {st['csr'][0] / ours[0]:.1f}x / {st['csr'][1] / ours[1]:.1f}x "
            f"| {st['dense_masked'][0] / ours[0]:.1f}x / {st['dense_masked'][1] / ours[1]:.1f}x "
            f"| {mb('bsr'):.1f} / {mb('csr'):.1f} / {mb('dense_masked'):.1f} |"
        )
    return "\n".join(rows)


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [sys.executable, "-m", "pytest", os.path.join(here, "bench_bsr_linear.py"), "-q", "-p",
               "no:cacheprovider", "--benchmark-enable", f"--benchmark-json={out}", "-o", "addopts="]
        if len(sys.argv) > 1:
            cmd += ["-k", sys.argv[1]]
        subprocess.run(cmd, check=True)
        with open(out) as f:
            results = json.load(f)
    print(f"\n{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print(ratio_table(results))


if __name__ == "__main__":
    main()
