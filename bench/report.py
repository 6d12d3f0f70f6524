"""Run the benchmark suites and write bench/RESULTS.md: per case, the time of
sparsesam's op and of the PyTorch baseline measured in the same run, their
ratio, and the bytes each keeps alive for backward.

    .venv/bin/python bench/report.py [pytest -k expression]
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from collections import defaultdict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SUITES = ["bench_masked.py"]


def run(selection: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [sys.executable, "-m", "pytest", *[os.path.join(HERE, s) for s in SUITES], "-q", "-p", "no:cacheprovider",
               "--benchmark-enable", f"--benchmark-json={out}", "-o", "addopts="]
        if selection:
            cmd += ["-k", selection]
        subprocess.run(cmd, check=True)
        with open(out) as f:
            return json.load(f)


def table(results: dict) -> str:
    groups = defaultdict(dict)
    for b in results["benchmarks"]:
        groups[b["group"]][b["params"]["impl"]] = b
    rows = ["| case | sparsesam median (ms) | torch median (ms) | speedup, medians | speedup, minima | extra saved for backward: sparsesam / torch (MB) |",
            "|---|---:|---:|---:|---:|---:|"]
    for group, impls in groups.items():
        ours, base = impls.get("sparsesam"), impls.get("torch")
        if not ours or not base:
            continue
        t_ours, t_base = ours["stats"]["median"] * 1e3, base["stats"]["median"] * 1e3
        min_ratio = base["stats"]["min"] / ours["stats"]["min"]
        mb = lambda b: b["extra_info"].get("saved_bytes", 0) / 2**20
        rows.append(f"| {group} | {t_ours:.2f} | {t_base:.2f} | {t_base / t_ours:.2f}x | {min_ratio:.2f}x | {mb(ours):.1f} / {mb(base):.1f} |")
    return "\n".join(rows)


def main() -> None:
    selection = sys.argv[1] if len(sys.argv) > 1 else None
    results = run(selection)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    text = f"""# Benchmark results

Produced by `.venv/bin/python bench/report.py` ({machine}).
Speedup = baseline time / sparsesam time, from the medians and from the
minima of the pytest-benchmark rounds (the minimum is the less noisy
estimate of what each can do); each ratio compares two implementations
measured in the same run (timings on these shared machines are noisy:
trust ratios, not absolute times). "Saved for backward" counts the distinct
storages autograd keeps between forward and backward beyond the inputs
themselves (which are alive anyway): the memory each implementation adds.

## Masked layers, forward + backward (`bench/bench_masked.py`)

Baseline: `F.linear(x, w*m, b)` / `F.conv2d(x, w*m)` with autograd. sparsesam:
`sparsesam.ops.masked_linear` / `masked_conv2d` (C++ CPU kernels around
ATen's GEMM / oneDNN convolution, bool mask).

{table(results)}
"""
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
