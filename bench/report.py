"""Run the benchmark suites and write bench/RESULTS.md: per case, the time of
sparsesam's op and of the PyTorch baseline measured in the same run, their
ratio, and the bytes each keeps alive for backward; for sparse execution also
the targets (met / missed), weight storage, and plots of speedup vs sparsity
(bench/plots/*.png).

    .venv/bin/python bench/report.py                      # everything (RESULTS.md + plots)
    .venv/bin/python bench/report.py -k "sparsity=0.99"   # a pytest -k selection
    .venv/bin/python bench/report.py --suite csr_linear --suite memory --output /tmp/r.md --plots /tmp/plots

Suites: see SUITES; any other bench/bench_*.py (but NOT_IN_REPORT) is run too (its
benchmarks are tabulated and plotted by bench/sparse_report.py, generically: those
parametrised by ``impl`` and ``sparsity`` with a ``dense_masked`` baseline).

Run it on a quiet machine, from the repository root; the whole report took 6.5 minutes
on two quiet cores (the sparse-linear suite's 0% / 50% cases, where "auto" times the slow
CSR form and the CSR form itself is 2x dense, are the most expensive; torch.sparse runs
only from 90%).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections import defaultdict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The bench modules import each other by plain name, as under pytest; and the tree's own
# sparsesam (the one the pytest subprocess, run from ROOT, measures) comes before any install.
sys.path[:0] = [HERE, ROOT]

import algorithms_report  # noqa: E402
import sparse_report  # noqa: E402

# name -> pytest file ("memory" is measured here, not timed).
SUITES = {
    "masked": "bench_masked.py",
    "sam": "bench_sam.py",
    "csr_linear": "bench_csr_linear.py",
    "sparse_conv2d": "bench_sparse_conv2d.py",
    "mlp_step": "bench_sparse_mlp_step.py",
    "resnet_step": "bench_sparse_resnet_step.py",
    "compact_inference": "bench_compact_inference.py",
    "memory": None,
}


# Benchmarks of their own topic, run on their own (pytest bench/<file> --benchmark-enable).
NOT_IN_REPORT = {"bench_mask_scoring.py"}


def all_suites() -> dict:
    """SUITES plus every other bench/bench_*.py (new kernels or formats, e.g. bench_bsr_linear.py,
    appear in the report and its plots without an edit here)."""
    suites = dict(SUITES)
    known = set(SUITES.values()) | NOT_IN_REPORT
    for path in sorted(glob.glob(os.path.join(HERE, "bench_*.py"))):
        name = os.path.basename(path)
        if name not in known:
            suites[name[len("bench_"):-len(".py")]] = name
    return suites


def run(files: list, selection: str | None) -> dict:
    if not files:
        return {"benchmarks": []}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [sys.executable, "-m", "pytest", *[os.path.join(HERE, s) for s in files], "-q", "-p", "no:cacheprovider",
               "--benchmark-enable", f"--benchmark-json={out}", "-o", "addopts="]
        if selection:
            cmd += ["-k", selection]
        subprocess.run(cmd, check=True, cwd=ROOT)
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
    return "\n".join(rows) if len(rows) > 2 else "(not run)"


# Kernels with their own section below (any other kernel gets a generic one).
KERNEL_SECTIONS = {
    "csr_linear": ("CSR linear, forward + backward (`bench/bench_csr_linear.py`)", """\
B=256, 4096x4096, fp32, autograd. `dense_masked`: `F.linear(x, w*m, b)`; `sparsesam`:
`sparsesam.ops.csr_linear` on the CSR pattern of the fixed mask (time in proportion to
nnz); `torch_sparse_csr`: `torch.sparse.mm` on a CSR weight; `auto`: a `MaskedLinear` under
`set_execution(layer, "auto", example=x)` on this batch (the dispatcher times dense and every
sparse format the mask allows, once, and keeps the fastest; column "computes" says which)."""),
    "sparse_conv2d": ("Sparse conv2d, forward + backward (`bench/bench_sparse_conv2d.py`)", """\
ResNet-style 3x3 layer, B=128, 64 -> 64 channels, 32x32, stride 1, padding 1, fp32, autograd.
`dense_masked`: `F.conv2d(x, w*m, b)` (oneDNN); `sparsesam`: `sparsesam.ops.sparse_conv2d`
(direct convolution over the CSR pattern); `auto`: `MaskedConv2d` under `set_execution(layer, "auto", example=x)`."""),
    "mlp_step": ("Training step of a 99%-sparse MLP (`bench/bench_sparse_mlp_step.py`)", """\
Forward, cross-entropy, backward, SGD with momentum; MLP 1024 -> 4096 -> 4096 -> 4096 -> 10,
ReLU, B=256; the three hidden layers masked (random fixed masks), the head dense.
`dense_masked`: `sparsify()`'s MaskedLinear; `sparse`: `set_execution(model, "sparse")`;
`auto`: `set_execution(model, "auto")` resolved on the batch."""),
    "resnet18_step": ("Training step of a 99%-sparse ResNet-18 (`bench/bench_sparse_resnet_step.py`)", """\
Forward, cross-entropy, backward, SGD with momentum. ResNet-18 (CIFAR-style) at the demo's
width 0.5, 1x28x28 inputs (Fashion-MNIST), 10 classes, batch 128 (the demo's training batch).
Random fixed 99% masks on every block conv and shortcut (19 layers); the stem conv (288
weights) and the classifier stay dense (0.1% of the weights). BatchNorm, ReLU, adds and
pooling run dense in every variant."""),
    "compact_inference": ("Inference of a 50%-channel compacted ResNet-18 (`bench/bench_compact_inference.py`)", """\
ResNet-18 at the demo's width 0.5, 1x28x28: the dense unpruned model vs the model after
`channel_prune(0.5, coupled=...)` + `gate_pruned_channels` + `compact_channels` (a plain,
physically smaller model computing the pruned model's function). Eval mode, `torch.no_grad()`,
batch 1 and the demo's evaluation batch 512."""),
}


def certificates_section() -> str:
    """The certificate form's rate against the masked model's (bench_certificates.rates: CPU time, one thread)."""
    import os
    import bench_certificates as c
    rows = "\n".join(f"| SmallCNN width {w / 32:g} ({w} channels) | {r['masked']:,.0f} img/CPU-s | "
                     f"{r['certificate']:,.0f} img/CPU-s | {r['certificate'] / r['masked']:.1f}x |"
                     for w, r in c.rates().items())
    return f"""## Certificates: the form they run (`bench/bench_certificates.py`)

Randomized smoothing and CC-Cert run a fixed model millions of times (the study: N = 10,000
noisy copies of each of 500 images). `evaluation.certificate_form` runs the plain model
(masks baked in, `nn.Linear` / `nn.Conv2d`), with eval-mode BatchNorm folded into the conv
before it (`torch.nn.utils.fusion.fuse_conv_bn_eval`) and channels_last. SmallCNN 1x28x28,
90% magnitude-pruned, batch {c.BATCH}, no grad, one thread, forms in turns, process CPU time
(the rate one core gives; load average {os.getloadavg()[0]:.1f} when measured):

| model | masked layers | certificate form | ratio |
|---|---|---|---|
{rows}

The forms compute the same function up to float rounding (logits within 1e-5,
`tests/test_evaluation.py`). `pytest bench/bench_certificates.py` times the same two
forms in wall time.
"""


def algorithms_section(kernels) -> str:
    import bench_algorithms as b
    return f"""### The algorithms' phases, end to end (`bench/bench_algorithms.py`)

One training step of each phase as the algorithm runs it (entered with `Algorithm.begin_phase`,
stepped with its own epoch loop), against the plain PyTorch code of `bench/algorithm_baselines.py`
for the same step: davda54-style ASAM with per-channel rho (AdaSAP), the official HYDRA/HARP subnet
layers with a sort per forward and an autograd straight-through estimator plus HARP's hardware loss
(HARP search), `torch.nn.utils.prune` masks (fine-tuning, sparsesam in the forms `execution="auto"`
settles on), autograd with copies of the masks (C-SAM). ResNet-18 (CIFAR stem), full width,
{b.CHANNELS}x{b.SIZE}x{b.SIZE}, batch {b.BATCH}, clean cross-entropy; {b.ROUNDS} rounds each.
`tests/test_bench_algorithms.py` checks that both sides compute the same masks and weights.

{algorithms_report.algorithms_table(kernels.get("algorithms", {}))}

The whole run, `sparsesam {' '.join(b.PRUNE_RUN)} --execution FORM` (one round each, same run):

{algorithms_report.prune_run_table(next(iter(kernels.get("prune_run", {}).values()), {}))}
"""


def _section(kernels, kernel: str, title: str, intro: str, plots: dict, output: str) -> str:
    cases = kernels.get(kernel)
    body = sparse_report.kernel_table(cases) if cases else "(not run)"
    text = f"### {title}\n\n{intro}\n\n{body}\n"
    if kernel in plots:
        text += f"\n![{kernel}: speedup vs sparsity]({os.path.relpath(plots[kernel], os.path.dirname(output))})\n"
    return text


def compact_sizes(kernels) -> str:
    cases = kernels.get("compact_inference")
    if not cases:
        return ""
    impls = next(iter(cases.values()))
    info = {name: b["extra_info"] for name, b in impls.items()}
    if not {"dense", "compact"} <= set(info):
        return ""
    d, c = info["dense"], info["compact"]
    return (f"\nParameters: dense {d['params']:,}, compacted {c['params']:,} ({c['params'] / d['params']:.2f}x); "
            f"MACs per image: dense {d['macs_per_image'] / 1e6:.1f} M, compacted {c['macs_per_image'] / 1e6:.1f} M "
            f"({c['macs_per_image'] / d['macs_per_image']:.2f}x); channel sparsity reached "
            f"{c['channel_sparsity']:.2f} (torch-pruning's counter).\n")


def memory_section() -> str:
    import weight_storage
    return f"""### Weight storage of a sparse layer (`bench/weight_storage.py`)

A 4096x4096 linear layer with a random fixed mask, measured from the tensors: every
parameter and buffer each form holds in memory, and its `state_dict` serialised by
`torch.save`. MaskedLinear: fp32 weight + bool mask + bias, whatever the sparsity.
CSRLinear: fp32 values + int32 CSR index, plus in memory the transposed index and
value permutation its backward uses (rebuilt on load, not saved): 16 bytes per kept
weight in memory, 8 in the state_dict, so it is smaller from about 31% density
(memory) / 62% density (state_dict) down.

{weight_storage.table(weight_storage.measure())}
"""


def resnet_profile() -> str:
    import bench_sparse_resnet_step as resnet
    return f"""Where the time goes (`.venv/bin/python bench/bench_sparse_resnet_step.py profile`, same
machine, a separate measurement): every masked layer alone, forward + backward on the input it
gets in the model, dense masked vs sparse; then torch.profiler's self CPU time per op over one
step of each.

{resnet.layer_table()}

{resnet.op_table()}
"""


def main() -> None:
    suites = all_suites()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("legacy_k", nargs="?", help="a pytest -k expression (same as -k)")
    parser.add_argument("-k", dest="selection", help="pytest -k expression over the selected suites")
    parser.add_argument("--suite", action="append", choices=sorted(suites),
                        help="run only these suites (repeatable; default: all)")
    parser.add_argument("--output", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--plots", default=os.path.join(HERE, "plots"), help="folder of the PNG plots")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="leave out the ResNet-18 per-layer / per-op profile (about a minute)")
    args = parser.parse_args()
    selection = args.selection or args.legacy_k
    chosen = args.suite or list(suites)
    results = run([suites[name] for name in chosen if suites[name]], selection)
    kernels = sparse_report.by_kernel(results)
    plots = sparse_report.plot_kernels(kernels, args.plots)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    sections = {kernel: _section(kernels, kernel, title, intro, plots, args.output)
                for kernel, (title, intro) in KERNEL_SECTIONS.items()}
    sections["compact_inference"] += compact_sizes(kernels)
    if "resnet18_step" in kernels and args.profile:
        sections["resnet18_step"] += "\n" + resnet_profile()
    if "algorithms" in kernels or "prune_run" in kernels:
        sections["algorithms"] = algorithms_section(kernels)
    for kernel in kernels:
        if kernel not in KERNEL_SECTIONS and kernel not in ("algorithms", "prune_run"):
            sections[kernel] = _section(kernels, kernel, f"{kernel} (found in the benchmark results)",
                                        "Compared with the case's `dense_masked` (else `dense`) implementation.",
                                        plots, args.output)
    if "memory" in chosen:
        sections["memory"] = memory_section()
    sparse_text = "\n".join(sections.values())
    command = "`.venv/bin/python bench/report.py`" + (f" (this run: {' '.join(sys.argv[1:])})" if sys.argv[1:] else "")
    text = f"""# Benchmark results

Produced by {command} ({machine}); it rewrites this file and the plots in
`bench/plots/` (a subset: `--suite NAME` / `-k EXPR`, with `--output` / `--plots` elsewhere).
Speedup = baseline time / sparsesam time, from the medians and from the
minima of the pytest-benchmark rounds (the minimum is the less noisy
estimate of what each can do); each ratio compares two implementations
measured in the same run (timings on these shared machines are noisy:
trust ratios, not absolute times). "Saved for backward" counts the distinct
storages autograd keeps between forward and backward beyond the inputs
themselves (which are alive anyway): the memory each implementation adds.

{certificates_section()}
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

## True sparse execution

Targets (issue 5), each a ratio of medians measured in this run; "missed" rows carry what
the evidence says about why.

{sparse_report.targets_table(kernels)}

Per kernel, every implementation, with the speedup over the case's baseline; the plots show
speedup vs sparsity (medians) per implementation, the targets as black bars.

{sparse_text}"""
    with open(args.output, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
