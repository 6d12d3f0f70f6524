"""End to end: one training step of each algorithm phase, sparsesam against the PyTorch code a user would write.

ResNet-18 with a CIFAR stem (3x3, no max-pool), full width (11.2M parameters),
3x32x32 inputs, 10 classes, batch 32 (what two cores step through in about a
second), cross-entropy. Each case times the algorithm's own step on the model its
phase runs on (the sparsesam side enters the phase as ``fit()`` does:
``Algorithm.begin_phase``), and the straightforward implementation of the same
step from ``algorithm_baselines.py``:

* ``adasap_adaptive``: AdaSAP's phase 1 (ASAM, one radius per channel group) vs
  davda54-style ASAM with per-channel rho; also two bare forward+backward passes,
  so the report can give the time *beyond* them.
* ``harp_search``: HARP's score/rate search step (fused score-to-mask, threshold
  selection, ``mask_score_grad`` backward) vs HYDRA/HARP subnet layers (full sort per
  forward, autograd straight-through), with HARP's hardware loss.
* ``harp_finetune`` / ``magnitude_finetune`` at 90% and 99%: a fixed-mask step in the
  forms ``execution="auto"`` settles on vs ``torch.nn.utils.prune`` masks.
* ``csam_mask``: C-SAM's mask step (mask ascent in persistent buffers, storage swap)
  vs plain autograd with copies of the masks.

The loss is the clean cross-entropy in every case (HARP's default is PGD-AT: its ten
attack passes are forward+backward passes of the same model, so they scale like the
step measured here and would only make the run longer).

Run: ``.venv/bin/python bench/report.py --suite algorithms`` (tables in RESULTS.md),
or ``.venv/bin/python -m pytest bench/bench_algorithms.py --benchmark-enable``.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import algorithm_baselines as base
from timing import interleaved
from sparsesam.algorithms import (AdaSAP, AdaSAPConfig, CSAM, CSAMConfig, HARP, HARPConfig, Magnitude,
                                  MagnitudeConfig)
from sparsesam.algorithms._steps import sam_step
from sparsesam.training import cross_entropy_loss
from sparsesam.models import build_model
from sparsesam.nn import execution_summary, masked_layers, set_execution

BATCH, CHANNELS, SIZE, CLASSES = 32, 3, 32, 10
KERNEL = "algorithms"  # report.py groups and tabulates by this
ROUNDS = 5


class _Batches:
    """What ``Algorithm._train_epoch`` iterates over: fixed batches, and a progress bar's set_postfix."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def set_postfix(self, *args, **kwargs):
        pass


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def data(batches: int = 1, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batches * BATCH, CHANNELS, SIZE, SIZE, generator=gen)
    y = torch.randint(0, CLASSES, (batches * BATCH,), generator=gen)
    loader = torch.utils.data.DataLoader(_Dataset(x, y), batch_size=BATCH, shuffle=False)
    return loader, list(zip(x.split(BATCH), y.split(BATCH)))


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", CHANNELS, CLASSES).train()


# ----------------------------------------------------------------------- the two sides of each case
# Each ``*_sides`` returns (sparsesam model, its step), (baseline model, its step) for one phase, both from
# the same weights, masks, radii and rates, so tests/test_bench_algorithms.py can check they compute the same.

def dense_masks(model: nn.Module) -> dict:
    """{layer name: (weight, mask)} of every masked layer, whatever form it runs in."""
    dense = set_execution(copy.deepcopy(model), "dense")
    return {name: (layer.weight.detach().clone(), layer.weight_mask.detach().clone())
            for name, layer in masked_layers(dense)}


def adasap_sides(build=resnet18, batches=None, loader=None, sparsity: float = 0.5):
    if batches is None:
        loader, batches = data()
    config = AdaSAPConfig(target_sparsity=sparsity, adaptive_epochs=1, finetune_epochs=1)
    algorithm = AdaSAP(config)
    model = build()
    plain = copy.deepcopy(model)
    optimizer, _ = algorithm.begin_phase("adaptive", model, loader)
    algorithm._refresh_radii(model, loader, optimizer)  # what every adaptive epoch starts with
    x, y = batches[0]
    step = iter(range(10**9))

    def ours():
        sam_step(model, x, y, optimizer, cross_entropy_loss, next(step))

    reference = base.ChannelRhoASAM(plain.parameters(), torch.optim.SGD, rho=config.rho_min, adaptive=True,
                                    eps=optimizer.eps, lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    ours_params = dict(model.named_parameters())
    for name, p in plain.named_parameters():
        rho = optimizer.state.get(ours_params[name], {}).get("channel_rho")
        if rho is not None:
            reference.set_channel_rho(p, rho)

    def theirs():
        base.asam_step(plain, x, y, reference)

    def passes_of(net):
        def passes():
            """The two forward+backward passes every SAM step makes, alone (the gradients discarded)."""
            for _ in range(2):
                F.cross_entropy(net(x), y).backward()
            net.zero_grad(set_to_none=True)
        return passes

    return (model, ours), (plain, theirs), {"two_passes": passes_of(plain), "two_passes_sparsesam": passes_of(model)}


def harp_search_sides(sparsity: float, build=resnet18, batches=None, loader=None):
    if batches is None:
        loader, batches = data()
    algorithm = HARP(HARPConfig(target_sparsity=sparsity, loss="clean", search_epochs=1, finetune_epochs=1))
    model = build()
    plain = copy.deepcopy(model)
    optimizer, _ = algorithm.begin_phase("search", model, loader)
    bar = _Batches(batches[:1])

    def ours():
        algorithm._train_epoch("search", 0, model, loader, optimizer, bar)

    # The official subnet layers on the same layers, rates and scores (HYDRA's scaled init of both).
    base.subnet_model(plain, 0.5, algorithm.k_min, names=list(algorithm.rates))
    for name, rate in algorithm.rates.items():
        # HARP's rate scores are float32 whatever the model's dtype (the official k_score's default dtype).
        plain.get_submodule(name).k_score = nn.Parameter(rate.p.detach().clone())
    # One SGD over every trainable tensor: scores, rates and BatchNorm (the weights are frozen), as train.py.
    c = algorithm.config
    reference = torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=c.score_lr,
                                momentum=c.momentum, weight_decay=c.weight_decay)
    x, y = batches[0]
    gamma = algorithm.gamma(0)

    def theirs():
        base.harp_search_step(plain, x, y, reference, gamma, algorithm.target_rate())

    return (model, ours), (plain, theirs), algorithm


def finetune_sides(algorithm_name: str, sparsity: float, build=resnet18, batches=None, loader=None,
                   execution: str = "auto"):
    if batches is None:
        loader, batches = data()
    model = build()
    if algorithm_name == "harp":
        # No search step is taken here, so the rates start at the target keep rate: the fine-tuning then
        # runs at the sparsity it is measured at (a search reaches it through the hardware loss).
        algorithm = HARP(HARPConfig(target_sparsity=sparsity, loss="clean", search_epochs=1, finetune_epochs=1,
                                    execution=execution, initial_keep=1.0 - sparsity))
        algorithm.begin_phase("search", model, loader)
        optimizer, lrs = algorithm.begin_phase("finetune", model, loader)
    else:
        algorithm = Magnitude(MagnitudeConfig(target_sparsity=sparsity, execution=execution))
        optimizer, lrs = algorithm.begin_phase("finetune", model, loader)
    bar = _Batches(batches[:1])

    def ours():
        algorithm._train_epoch("finetune", 0, model, loader, optimizer, bar)

    plain = build()
    masks = {}
    with torch.no_grad():
        for name, (weight, mask) in dense_masks(model).items():
            plain.get_submodule(name).weight.copy_(weight)
            masks[name] = mask
        ours_state = dict(model.named_parameters())
        for name, p in plain.named_parameters():  # biases, BatchNorm (HARP's search trained it)
            if name in ours_state and ours_state[name].shape == p.shape:
                p.copy_(ours_state[name])
        for name, b in plain.named_buffers():
            theirs_buffer = dict(model.named_buffers()).get(name)
            if theirs_buffer is not None and theirs_buffer.shape == b.shape:
                b.copy_(theirs_buffer)
    base.prune_with_mask(plain, masks)
    c = algorithm.config
    reference = torch.optim.SGD(plain.parameters(), lr=lrs[0], momentum=c.momentum, weight_decay=c.weight_decay)
    x, y = batches[0]

    def theirs():
        base.finetune_step(plain, x, y, reference)

    return (model, ours), (plain, theirs), algorithm


def csam_sides(sparsity: float = 0.9, build=resnet18, batches=None, loader=None):
    if batches is None:
        loader, batches = data()
    algorithm = CSAM(CSAMConfig(target_sparsity=sparsity, mask_epochs=1, finetune_epochs=1))
    model = build()
    plain = copy.deepcopy(model)
    optimizer, _ = algorithm.begin_phase("mask", model, loader)
    bar = _Batches(batches[:1])

    def ours():
        algorithm._train_epoch("mask", 0, model, loader, optimizer, bar)

    base.soft_mask_model(plain, {name: layer.weight_mask for name, layer in masked_layers(model)})
    c = algorithm.config
    masks = base.soft_masks(plain)
    mask_ids = {id(m) for m in masks}
    groups = [{"params": masks, "lr": c.mask_lr, "weight_decay": 0.0}]
    if c.weight_lr > 0:
        groups.append({"params": [p for p in plain.parameters() if id(p) not in mask_ids], "lr": c.weight_lr,
                       "weight_decay": 0.0})
    reference = torch.optim.Adam(groups, lr=c.mask_lr)
    x, y = batches[0]
    step = iter(range(10**9))

    def theirs():
        x_t = algorithm._transform(x, next(step))  # the same transform C-SAM draws at that step
        base.csam_mask_step_autograd(plain, x, x_t, y, reference, algorithm.objective, algorithm.rate_penalty,
                                     c.rho)

    return (model, ours), (plain, theirs), algorithm


# ----------------------------------------------------------------------- the suite
def _record(benchmark, case: str, impl: str, model: nn.Module, **extra) -> None:
    forms = execution_summary(model, formats=True)
    benchmark.group = f"{case} ResNet-18 B={BATCH} {CHANNELS}x{SIZE}x{SIZE}"
    benchmark.extra_info.update(kernel=KERNEL, case=case, impl=impl,
                                sparse_layers=sum(f not in ("dense",) for f in forms.values()), layers=len(forms),
                                **extra)


def _time(benchmark, step) -> None:
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["sparsesam", "baseline", "two_passes"])
def test_adasap_adaptive_step(benchmark, impl):
    """AdaSAP's target is on the time *beyond* the step's two forward+backward passes, a difference of
    large numbers: the three are timed in turns in one loop (``interleaved`` in extra_info) besides the
    usual rounds of the one this case is named after."""
    (model, ours), (plain, theirs), passes = adasap_sides()
    steps = {"sparsesam": ours, "baseline": theirs, **passes}
    chosen = {"sparsesam": model, "baseline": plain, "two_passes": plain}[impl]
    _record(benchmark, "adasap_adaptive", impl, chosen)
    if impl == "sparsesam":
        benchmark.extra_info["interleaved"] = interleaved(steps, 2 * ROUNDS)
    _time(benchmark, steps[impl])


@pytest.mark.parametrize("impl", ["sparsesam", "baseline"])
@pytest.mark.parametrize("sparsity", [0.9, 0.99])
def test_harp_search_step(benchmark, impl, sparsity):
    (model, ours), (plain, theirs), _ = harp_search_sides(sparsity)
    chosen = (model, ours) if impl == "sparsesam" else (plain, theirs)
    _record(benchmark, f"harp_search sparsity={sparsity}", impl, chosen[0], sparsity=sparsity)
    _time(benchmark, chosen[1])


@pytest.mark.parametrize("impl", ["sparsesam", "sparsesam_dense", "baseline"])
@pytest.mark.parametrize("sparsity", [0.9, 0.99])
@pytest.mark.parametrize("algorithm", ["harp", "magnitude"])
def test_finetune_step(benchmark, algorithm, sparsity, impl):
    execution = "dense" if impl == "sparsesam_dense" else "auto"
    (model, ours), (plain, theirs), _ = finetune_sides(algorithm, sparsity, execution=execution)
    chosen = (plain, theirs) if impl == "baseline" else (model, ours)
    _record(benchmark, f"{algorithm}_finetune sparsity={sparsity}", impl, chosen[0], sparsity=sparsity)
    _time(benchmark, chosen[1])


@pytest.mark.parametrize("impl", ["sparsesam", "baseline"])
def test_csam_mask_step(benchmark, impl):
    (model, ours), (plain, theirs), _ = csam_sides()
    chosen = (model, ours) if impl == "sparsesam" else (plain, theirs)
    _record(benchmark, "csam_mask", impl, chosen[0])
    _time(benchmark, chosen[1])


# ----------------------------------------------------------------------- the whole CLI run
# `sparsesam prune --algorithm harp --sparsity 0.99` as a user runs it, once per execution form: HARP's
# search (dense: its masks change every step), its fine-tuning (the fixed mask: `--execution`) and the
# final evaluation. PGD-AT as configured by default; ResNet-18 at the demo's width on 512 Fashion-MNIST
# images, one search epoch and five fine-tuning epochs (the official 20 : 100 ratio). HARP's rates start
# at twice the target keep rate with gamma0 = 2 so that one short search epoch reaches the target: the
# official gamma0 = 0.01 needs CIFAR's hundreds of steps per epoch.
PRUNE_RUN = ["prune", "--algorithm", "harp", "--sparsity", "0.99", "--model", "resnet18", "--width", "0.5",
             "--dataset", "fashion_mnist", "--limit", "512", "--epochs", "0", "--no-progress",
             "--set", "search_epochs=1", "--set", "finetune_epochs=5", "--set", "initial_keep=0.02",
             "--set", "gamma=2.0"]


@pytest.mark.parametrize("impl", ["dense", "auto"])
def test_prune_run(benchmark, impl, tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / impl
    command = [sys.executable, "-m", "sparsesam.cli", *PRUNE_RUN, "--out", str(out), "--execution", impl]

    def run():
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)

    benchmark.group = "sparsesam prune --algorithm harp --sparsity 0.99 (whole run)"
    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    report = json.loads((out / "prune.json").read_text())
    benchmark.extra_info.update(kernel="prune_run", impl=impl, sparsity=report["sparsity"],
                                test_accuracy=report["test_accuracy"], fit_seconds=report["fit_seconds"])


# ----------------------------------------------------------------------- where the time goes
def op_profile(step, top: int = 8) -> list:
    """[(op, self CPU ms)] of one ``step`` under torch.profiler (after a warm-up step), most expensive first."""
    from collections import defaultdict
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    per_op = defaultdict(float)
    for event in prof.key_averages():
        per_op[event.key] += event.self_cpu_time_total / 1e3
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])
    return ranked[:top] + [("all ops", sum(per_op.values()))]


def profile_tables() -> str:
    """The missed cases' steps, op by op (self CPU time), sparsesam beside its baseline."""
    cases = {
        "adasap_adaptive": lambda: adasap_sides()[:2],
        "harp_finetune sparsity=0.9": lambda: finetune_sides("harp", 0.9)[:2],
        "harp_finetune sparsity=0.99": lambda: finetune_sides("harp", 0.99)[:2],
        "csam_mask": lambda: csam_sides()[:2],
    }
    out = []
    for case, make in cases.items():
        (model, ours), (_, theirs) = make()
        columns = {"sparsesam": dict(op_profile(ours)), "baseline": dict(op_profile(theirs))}
        ops = list(dict.fromkeys([*columns["sparsesam"], *columns["baseline"]]))
        forms = execution_summary(model, formats=True)
        out += [f"{case} (sparsesam's forms: {sum(f != 'dense' for f in forms.values())}/{len(forms)} layers sparse)",
                "", "| op (self CPU time) | sparsesam (ms) | baseline (ms) |", "|---|---:|---:|"]
        for op in [o for o in ops if o != "all ops"] + ["all ops"]:
            out.append(f"| `{op}` | {columns['sparsesam'].get(op, 0.0):.1f} | {columns['baseline'].get(op, 0.0):.1f} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    import sys
    if sys.argv[1:] != ["profile"]:
        sys.exit("usage: python bench/bench_algorithms.py profile   (the benchmarks run under pytest)")
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print(profile_tables())
