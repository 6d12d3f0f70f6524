"""A whole training step (forward, cross-entropy, backward, SGD with momentum) of a
99%-sparse MLP: fixed-mask layers run dense masked (``sparsify()``'s MaskedLinear) vs
sparse (``set_execution(model, "sparse")``: CSRLinear), and what ``"auto"`` picks.

MLP 1024 -> 4096 -> 4096 -> 4096 -> 10, ReLU, B=256; the three hidden layers are pruned to
the sparsity by random fixed masks, the 10-way head stays dense. Both models hold the
same weights. Rounds alternate the models (noise hits both); prints medians, minima and
the median of per-round ratios.

In the report (pytest-benchmark, each model timed in its own rounds):
``.venv/bin/python bench/report.py --suite mlp_step``
Interleaved ratio table: ``.venv/bin/python bench/bench_sparse_mlp_step.py [sparsity] [rounds]``
"""
from __future__ import annotations

import copy
import statistics
import sys
import time

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import sparsesam
from sparsesam.nn import execution_summary, resolve_execution, set_execution

BATCH, WIDTH, IN, CLASSES = 256, 4096, 1024, 10
KERNEL = "mlp_step"  # report.py groups and tabulates by this
SUITE_SPARSITIES = [0.99]
EXECUTIONS = {"dense_masked": "dense", "sparse": "sparse", "auto": "auto"}  # impl -> set_execution()


def build(sparsity: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(),
                          nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, CLASSES))
    sparsesam.sparsify(model, exclude="6")
    for i in (0, 2, 4):
        model[i].set_mask(torch.rand_like(model[i].weight) >= sparsity)
    return model


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)  # built after the forms are settled

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, IN, generator=gen), torch.randint(0, CLASSES, (BATCH,), generator=gen)


@pytest.mark.parametrize("impl", list(EXECUTIONS))
@pytest.mark.parametrize("sparsity", SUITE_SPARSITIES)
def test_sparse_mlp_step(benchmark, impl, sparsity):
    x, y = _batch()
    model = set_execution(build(sparsity), EXECUTIONS[impl])
    resolve_execution(model, x)  # "auto" layers decide here (forward+backward); a no-op choice for the others
    benchmark.group = f"MLP step {IN}-{WIDTH}x3-{CLASSES} B={BATCH} sparsity={sparsity}"
    forms = execution_summary(model, formats=True)
    benchmark.extra_info.update(kernel=KERNEL, sparsity=sparsity, forms=forms,
                                sparse_layers=sum(f != "dense" for f in forms.values()), layers=len(forms))
    slow = impl == "dense_masked"
    benchmark.pedantic(step_fn(model, x, y), rounds=5 if slow else 11, warmup_rounds=1 if slow else 3)


def main(sparsity: float = 0.99, rounds: int = 7) -> None:
    x, y = _batch()
    dense = build(sparsity)
    sparse = set_execution(copy.deepcopy(dense), "sparse")
    auto = set_execution(copy.deepcopy(dense), "auto")
    resolve_execution(auto, x)  # times both forms per layer shape (fwd+bwd), once
    steps = {"dense masked": step_fn(dense, x, y), "sparse": step_fn(sparse, x, y), "auto": step_fn(auto, x, y)}
    for step in steps.values():
        step()  # warm-up (and momentum buffers)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, sparsity {sparsity}, {rounds} rounds")
    print(f"auto chose: {execution_summary(auto)}\n")
    print("| model | step median / min (ms) | speedup vs dense masked: medians / minima / median of per-round ratios |")
    print("|---|---:|---:|")
    base = times["dense masked"]
    for name, t in times.items():
        per_round = statistics.median(b / o for b, o in zip(base, t))
        print(f"| {name} | {statistics.median(t) * 1e3:.1f} / {min(t) * 1e3:.1f} "
              f"| {statistics.median(base) / statistics.median(t):.1f}x / {min(base) / min(t):.1f}x / {per_round:.1f}x |")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 0.99, int(sys.argv[2]) if len(sys.argv) > 2 else 7)
