"""A whole training step (forward, cross-entropy, backward, SGD with momentum) of a
99%-sparse ResNet-18 at the demo's width and input: fixed-mask layers run dense masked
(``sparsify()``'s MaskedConv2d / MaskedLinear) vs ``set_execution(model, "sparse")``
(SparseConv2d) vs ``"auto"`` (each layer the form it measured faster on this batch).

ResNet-18 (CIFAR-style, 3x3 stem, no max-pool), width 0.5 (32 stem channels), one input
channel, 28x28 (Fashion-MNIST, as ``sparsesam demo``), 10 classes, batch 128 (the demo's
training ``--batch-size``). Every conv (the sixteen 3x3 block convs and the three 1x1
shortcuts) gets a random fixed mask at the sparsity; the stem conv (1 -> 32 channels,
288 weights) and the 256 -> 10 classifier stay dense, as usual: together 0.1% of the
weights. BatchNorm, ReLU, the residual adds and pooling are dense in every variant.

In the report: ``.venv/bin/python bench/report.py --suite resnet_step``
Where the time goes (per layer, dense vs sparse; and per op from torch.profiler):
``.venv/bin/python bench/bench_sparse_resnet_step.py profile``
"""
from __future__ import annotations

import copy
import sys
import time
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsesam
from sparsesam.models import build_model
from sparsesam.nn import execution_summary, masked_layers, resolve_execution, set_execution
from sparsesam.nn.dispatch import sparse_forms, time_forms

BATCH, IN_CHANNELS, SIZE, CLASSES, WIDTH = 128, 1, 28, 10, 0.5
DENSE_LAYERS = ["conv1", "fc"]  # the stem and the classifier
KERNEL = "resnet18_step"  # report.py groups and tabulates by this
SUITE_SPARSITIES = [0.99]
EXECUTIONS = {"dense_masked": "dense", "sparse": "sparse", "auto": "auto"}  # impl -> set_execution()


def build(sparsity: float) -> nn.Module:
    """The masked model; the masks are drawn from a fixed seed (same model for every variant)."""
    torch.manual_seed(0)
    model = build_model("resnet18", IN_CHANNELS, CLASSES, width=WIDTH)
    sparsesam.sparsify(model, exclude=DENSE_LAYERS)
    for _, layer in masked_layers(model):
        layer.set_mask(torch.rand_like(layer.weight) >= sparsity)
    return model


def batch():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(BATCH, IN_CHANNELS, SIZE, SIZE, generator=gen),
            torch.randint(0, CLASSES, (BATCH,), generator=gen))


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)  # built after the forms are settled

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def prepared(impl: str, sparsity: float, x: torch.Tensor) -> nn.Module:
    model = set_execution(build(sparsity), EXECUTIONS[impl]).train()
    resolve_execution(model, x)  # "auto" layers decide here (forward+backward); nothing to decide for the others
    return model


@pytest.mark.parametrize("impl", list(EXECUTIONS))
@pytest.mark.parametrize("sparsity", SUITE_SPARSITIES)
def test_sparse_resnet18_step(benchmark, impl, sparsity):
    x, y = batch()
    model = prepared(impl, sparsity, x)
    forms = execution_summary(model, formats=True)
    benchmark.group = f"ResNet-18 w{WIDTH} step B={BATCH} {IN_CHANNELS}x{SIZE}x{SIZE} sparsity={sparsity}"
    benchmark.extra_info.update(kernel=KERNEL, sparsity=sparsity, forms=forms,
                                sparse_layers=sum(f != "dense" for f in forms.values()), layers=len(forms))
    benchmark.pedantic(step_fn(model, x, y), rounds=5, warmup_rounds=1)


# --- Where the time goes ---------------------------------------------------------------


def layer_inputs(model: nn.Module, x: torch.Tensor) -> dict:
    """{name: the input each masked layer sees} on one forward of ``x``."""
    seen, handles = {}, []
    for name, layer in masked_layers(model):
        handles.append(layer.register_forward_hook(lambda m, inp, out, name=name: seen.__setitem__(name, inp[0].detach())))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def layer_table(sparsity: float = 0.99, repeats: int = 3) -> str:
    """Forward+backward of every masked layer alone, on the input it gets in the model, dense masked
    vs every sparse format its mask allows (the dispatcher's own timer: minimum of ``repeats``, the
    forms taking turns); and what these layers add up to against the whole step of each form."""
    x, y = batch()
    model = build(sparsity).train()
    inputs = layer_inputs(model, x)
    timed = {}
    for name, layer in masked_layers(model):
        forms = {"dense": copy.deepcopy(layer)}
        forms.update({fmt: set_execution(copy.deepcopy(layer), fmt) for fmt in sparse_forms(layer)})
        timed[name] = (layer, time_forms(forms, inputs[name].requires_grad_(), True, repeats))
    formats = list(dict.fromkeys(f for _, t in timed.values() for f in t if f != "dense"))
    rows = [f"| layer | weight shape | input | dense masked (ms) | {' | '.join(f'{f} (ms)' for f in formats)} "
            f"| dense / fastest sparse |", "|---|---|---|---:|" + "---:|" * len(formats) + "---:|"]
    totals = defaultdict(float)
    for name, (layer, t) in timed.items():
        for form, seconds in t.items():
            totals[form] += seconds
        best = min(t[f] for f in formats if f in t)
        totals["fastest sparse"] += best
        cells = " | ".join(f"{t[f] * 1e3:.1f}" if f in t else "-" for f in formats)
        rows.append(f"| {name} | {'x'.join(map(str, layer.weight.shape))} | {'x'.join(map(str, inputs[name].shape[1:]))} "
                    f"| {t['dense'] * 1e3:.1f} | {cells} | {t['dense'] / best:.1f}x |")
    rows.append(f"| all masked layers | | | {totals['dense'] * 1e3:.0f} | "
                + " | ".join(f"{totals[f] * 1e3:.0f}" for f in formats)
                + f" | {totals['dense'] / totals['fastest sparse']:.1f}x |")
    totals = [totals["dense"], totals["fastest sparse"]]
    steps = {impl: step_fn(prepared(impl, sparsity, x), x, y) for impl in ("dense_masked", "sparse")}
    whole = {impl: [] for impl in steps}
    for step in steps.values():
        step()
    for _ in range(repeats):
        for impl, step in steps.items():
            start = time.perf_counter()
            step()
            whole[impl].append(time.perf_counter() - start)
    d, s = min(whole["dense_masked"]), min(whole["sparse"])
    rows += ["", f"Whole step (minimum of {repeats}, interleaved): dense masked {d * 1e3:.0f} ms, sparse {s * 1e3:.0f} ms "
             f"({d / s:.2f}x). Outside the masked layers (stem, BatchNorm, ReLU, adds, pooling, classifier, loss, "
             f"SGD): about {max(d - totals[0], 0) * 1e3:.0f} ms dense / {max(s - totals[1], 0) * 1e3:.0f} ms sparse; "
             f"the masked layers are {100 * totals[0] / d:.0f}% of the dense step and {100 * totals[1] / s:.0f}% "
             f"of the sparse one."]
    return "\n".join(rows)


def op_table(sparsity: float = 0.99, top: int = 12) -> str:
    """torch.profiler's self CPU time per op over one step of each form (after a warm-up step)."""
    x, y = batch()
    columns = {}
    for impl in ("dense_masked", "sparse"):
        step = step_fn(prepared(impl, sparsity, x), x, y)
        step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        per_op = defaultdict(float)
        for event in prof.key_averages():
            per_op[event.key] += event.self_cpu_time_total / 1e3
        columns[impl] = per_op
    ops = sorted(set().union(*columns.values()), key=lambda k: -max(c.get(k, 0.0) for c in columns.values()))[:top]
    rows = ["| op (self CPU time) | dense masked (ms) | sparse (ms) |", "|---|---:|---:|"]
    for op in ops:
        rows.append(f"| `{op}` | {columns['dense_masked'].get(op, 0.0):.1f} | {columns['sparse'].get(op, 0.0):.1f} |")
    rows.append(f"| all ops | {sum(columns['dense_masked'].values()):.0f} | {sum(columns['sparse'].values()):.0f} |")
    return "\n".join(rows)


def main(argv) -> None:
    if argv[:1] != ["profile"]:
        sys.exit(__doc__)
    sparsity = float(argv[1]) if len(argv) > 1 else 0.99
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, sparsity {sparsity}\n")
    print(layer_table(sparsity), "\n", flush=True)
    print(op_table(sparsity))


if __name__ == "__main__":
    main(sys.argv[1:])
