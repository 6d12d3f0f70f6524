"""The optimizer part of a SAM step (ascent + descent, no forward/backward)
on the 11.2 M parameters of ResNet-18: sparsesam's fused SAM vs the
per-parameter loop and a torch._foreach_ version, same run; plus a STREAM
triad for the machine's bandwidth and the whole training step of SAM vs SGD.

`sparsesam-hooks` is SAM(norm_in_backward=True): the gradient norm is taken
by hooks during backward, while each gradient is in cache; the bench writes
each gradient, runs its hook and counts the hooks' time in the step.

Between ascent and descent a 128 MB buffer is rewritten, as the forward and
backward in between would evict the parameters from cache; the time of that
flush is not counted (each round times ascent and descent separately).

Run: ``.venv/bin/python bench/report.py`` (writes bench/RESULTS.md).
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from sparsesam.models import ResNet18
from sparsesam.optim import SAM

from sam_baselines import ForeachSAM, LoopSAM

SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
ROUNDS = 15
_flush_buffer = torch.empty(32 * 2**20)  # 128 MB of float32


def _flush_caches():
    _flush_buffer.add_(1.0)


def _resnet18_with_grads():
    torch.manual_seed(0)
    model = ResNet18(width=64)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def _make(impl, model):
    params = list(model.parameters())
    if impl == "sparsesam":
        return SAM(params, torch.optim.SGD, rho=0.05, **SGD)
    if impl == "sparsesam-hooks":
        return SAM(params, torch.optim.SGD, rho=0.05, norm_in_backward=True, **SGD)
    if impl == "loop":
        return LoopSAM(params, torch.optim.SGD, rho=0.05, **SGD)
    return ForeachSAM(params, rho=0.05, **SGD)


def _backward_with_norm_hooks(optimizer, grads):
    """What backward does for SAM(norm_in_backward=True): each gradient is
    written (here: copied from a saved one; not timed), then its hook takes
    the squared norm while it is in cache (timed). Returns the hooks' time."""
    seconds = 0.0
    for p, g in reversed(list(zip(optimizer.param_groups[0]["params"], grads))):
        p.grad.copy_(g)
        if p.numel() >= optimizer._HOOK_MIN_NUMEL:
            t0 = time.perf_counter()
            optimizer._norm_hook(p)
            seconds += time.perf_counter() - t0
    return seconds


def _timed_rounds(optimizer, rounds):
    hooks = getattr(optimizer, "_hook_handles", None)
    grads = [p.grad.clone() for p in optimizer.param_groups[0]["params"]] if hooks else None
    seconds = []
    for _ in range(rounds):
        in_backward = 0.0
        if hooks:
            _flush_caches()
            in_backward = _backward_with_norm_hooks(optimizer, grads)
        _flush_caches()
        t0 = time.perf_counter()
        optimizer.first_step()
        t1 = time.perf_counter()
        _flush_caches()
        t2 = time.perf_counter()
        optimizer.second_step()
        t3 = time.perf_counter()
        seconds.append(in_backward + (t1 - t0) + (t3 - t2))
    return seconds


@pytest.mark.parametrize("impl", ["sparsesam", "sparsesam-hooks", "foreach", "loop"])
def test_sam_optimizer_step(benchmark, impl):
    model = _resnet18_with_grads()
    optimizer = _make(impl, model)
    _timed_rounds(optimizer, 3)  # warm-up: buffers allocated, momentum initialised
    n = sum(p.numel() for p in model.parameters())
    benchmark.group = f"SAM optimizer step, ResNet-18 ({n / 1e6:.1f} M fp32 parameters)"
    benchmark.extra_info["numel"] = n
    benchmark.extra_info["state_bytes"] = _state_bytes(optimizer)
    # pytest-benchmark's own timer sees the flushes too; the report uses the
    # flush-free per-round times recorded here.
    times = []
    benchmark.pedantic(lambda: times.extend(_timed_rounds(optimizer, 1)), rounds=ROUNDS, warmup_rounds=0)
    benchmark.extra_info["optimizer_seconds"] = sorted(times)


def _state_bytes(optimizer) -> int:
    """Bytes of parameter-sized state the optimizer keeps (momentum, backups, ascent buffers)."""
    seen = {}
    def add(t):
        if isinstance(t, torch.Tensor):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    base = getattr(optimizer, "base_optimizer", None)
    for holder in (getattr(optimizer, "state", {}), base.state if base is not None else {}):
        for st in holder.values():
            for v in st.values():
                add(v)
    for t in list(getattr(optimizer, "_ascent_buffers", {}).values()) + list(getattr(optimizer, "backup", [])):
        add(t)
    return sum(seen.values())


def test_stream_triad(benchmark):
    """a = b + s*c over 11.2 M float32: the machine's attainable bandwidth (3 streams)."""
    n = 11_173_962
    a, b, c = torch.empty(n), torch.randn(n), torch.randn(n)
    benchmark.group = "STREAM triad"
    benchmark.extra_info["bytes"] = 3 * 4 * n
    benchmark.pedantic(lambda: torch.add(b, c, alpha=3.0, out=a), rounds=30, warmup_rounds=3)


@pytest.mark.parametrize("impl", ["sgd", "sparsesam", "sparsesam-hooks"])
def test_training_step(benchmark, impl):
    """One whole training step of a small ResNet (width 16, batch 64, 32x32): SAM costs two forward/backward passes."""
    torch.manual_seed(0)
    model = ResNet18(width=16)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    if impl == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), **SGD)

        def step():
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    else:
        optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model,
                        norm_in_backward=impl == "sparsesam-hooks", **SGD)

        def step():
            F.cross_entropy(model(x), y).backward()
            optimizer.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.second_step(zero_grad=True)
    benchmark.group = "training step, ResNet-18 width 16, batch 64"
    benchmark.pedantic(step, rounds=8, warmup_rounds=2)
