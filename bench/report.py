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
SUITES = ["bench_masked.py", "bench_sam.py"]


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


def _by_group(results: dict, prefix: str) -> dict:
    groups = defaultdict(dict)
    for b in results["benchmarks"]:
        if b["name"].startswith(prefix):
            groups[b["group"]][(b["params"] or {}).get("impl", b["name"])] = b
    return groups


def sam_table(results: dict) -> str:
    """Ratios of the SAM optimizer step (flush-free per-round times) and its bandwidth use."""
    impls = next(iter(_by_group(results, "test_sam_optimizer_step").values()), {})
    triad = next(iter(_by_group(results, "test_stream_triad").values()), {})
    if not impls or not triad:
        return "(not run)"
    triad_b = next(iter(triad.values()))
    triad_gbs = triad_b["extra_info"]["bytes"] / triad_b["stats"]["min"] / 1e9
    numel = impls["sparsesam"]["extra_info"]["numel"]
    # Parameter-sized DRAM streams of each fused variant: the norm reads g
    # (1; done by the hooks on in-cache gradients in sparsesam-hooks);
    # perturb reads w, g and writes the ascent buffer (3); SGD reads w, g,
    # buf and writes w, buf (5).
    streams = {"sparsesam": 9, "sparsesam-hooks": 8}
    med = lambda t: sorted(t)[len(t) // 2]
    seconds = {name: impls[name]["extra_info"]["optimizer_seconds"] for name in impls}
    rows = ["| implementation | median (ms) | min (ms) | loop / this, medians | loop / this, minima | "
            "foreach / this, medians | foreach / this, minima | parameter-sized state (MB) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("sparsesam-hooks", "sparsesam", "foreach", "loop"):
        if name not in seconds:
            continue
        t = seconds[name]
        rows.append(f"| {name} | {med(t) * 1e3:.1f} | {min(t) * 1e3:.1f} | "
                    f"{med(seconds['loop']) / med(t):.2f}x | {min(seconds['loop']) / min(t):.2f}x | "
                    f"{med(seconds['foreach']) / med(t):.2f}x | {min(seconds['foreach']) / min(t):.2f}x | "
                    f"{impls[name]['extra_info']['state_bytes'] / 2**20:.1f} |")
    rows.append("")
    rows.append(f"STREAM triad (same run): {triad_gbs:.1f} GB/s.")
    for name, n_streams in streams.items():
        if name in seconds:
            moved = n_streams * 4 * numel
            bw = moved / min(seconds[name]) / 1e9
            rows.append(f"{name} moves {n_streams} parameter-sized streams ({moved / 1e6:.0f} MB) per step: "
                        f"{bw:.1f} GB/s at its best round, {100 * bw / triad_gbs:.0f}% of the triad.")
    step = _by_group(results, "test_training_step")
    if step:
        g = next(iter(step.values()))
        if "sgd" in g:
            rows.append("")
            sgd = g["sgd"]["stats"]["median"]
            rows.append(f"Whole training step, ResNet-18 width 16, batch 64, 32x32 (medians; 2x SGD is the floor: "
                        f"two forward/backward passes): SGD {sgd * 1e3:.0f} ms")
            for name in ("sparsesam", "sparsesam-hooks"):
                if name in g:
                    t = g[name]["stats"]["median"]
                    rows.append(f"- {name}: {t * 1e3:.0f} ms, {t / sgd:.2f}x an SGD step")
    return "\n".join(rows)


def table(results: dict) -> str:
    groups = _by_group(results, "test_masked_")
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

## SAM optimizer step (`bench/bench_sam.py`)

The optimizer part of a SAM step (ascent + descent; no forward/backward) on
the 11.2 M float32 parameters of ResNet-18, SGD with momentum 0.9, nesterov,
weight decay. `loop`: the widely used per-parameter SAM code (davda54/sam,
first_step / second_step around torch.optim.SGD); `foreach`: the same with
`torch._foreach_*` ops and a foreach SGD (`bench/sam_baselines.py`);
`sparsesam`: `SAM(...)`; `sparsesam-hooks`: `SAM(..., norm_in_backward=True)`,
whose gradient norm is taken by hooks during backward while each gradient is
in cache: the bench writes each gradient as backward would and counts the
hooks' time in the step. A 128 MB buffer is rewritten before the ascent and
between ascent and descent (the forward/backward in between would evict the
parameters); only ascent, descent (and the hooks) are timed.

{sam_table(results)}
"""
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
