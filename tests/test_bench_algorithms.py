"""bench/bench_algorithms.py times sparsesam's algorithm phases against plain PyTorch code: both must compute the same.

Small ResNet-18s (width 1/8, 16x16 inputs, batch 8) take three steps on each side from the
same weights, masks, radii and rates. In float64 the two sides agree to rounding (the
straight-through, ascent and descent steps are the same arithmetic, whichever the kernels);
in float32 a step of AdaSAP's radii (up to 2) amplifies last-bit differences chaotically
after a few steps, so float32 is checked after one step.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import bench_algorithms as bench  # noqa: E402
from sparsesam.models import build_model  # noqa: E402
from sparsesam.nn import execution_summary, masked_layers  # noqa: E402

BATCH, SIZE = 8, 16


@pytest.fixture(autouse=True)
def _small(monkeypatch):
    monkeypatch.setattr(bench, "BATCH", BATCH)
    monkeypatch.setattr(bench, "SIZE", SIZE)


def problem(dtype):
    def build():
        torch.manual_seed(0)
        return build_model("resnet18", 3, 10, width=0.125).to(dtype).train()

    gen = torch.Generator().manual_seed(1)
    x = torch.rand(BATCH, 3, SIZE, SIZE, generator=gen, dtype=dtype)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    loader = torch.utils.data.DataLoader(bench._Dataset(x, y), batch_size=BATCH)
    return build, [(x, y)], loader


def run(sides, steps):
    (ours_model, ours), (theirs_model, theirs) = sides[0], sides[1]
    for _ in range(steps):
        ours()
        theirs()
    return ours_model, theirs_model


def max_param_diff(ours, theirs) -> float:
    mine = dict(ours.named_parameters())
    worst = 0.0
    for name, p in theirs.named_parameters():
        assert name in mine, name
        worst = max(worst, float((mine[name].detach() - p.detach()).abs().max()))
    return worst


@pytest.mark.parametrize("dtype,steps,tol", [(torch.float64, 3, 1e-12), (torch.float32, 1, 1e-5)])
def test_adasap_step_matches_channel_rho_asam(dtype, steps, tol):
    build, batches, loader = problem(dtype)
    sides = bench.adasap_sides(build=build, batches=batches, loader=loader)
    start = {n: p.detach().clone() for n, p in sides[1][0].named_parameters()}
    ours, theirs = run(sides, steps)
    assert max(float((p.detach() - start[n]).abs().max()) for n, p in theirs.named_parameters()) > 1e-3  # it moved
    assert max_param_diff(ours, theirs) <= tol


@pytest.mark.parametrize("sparsity", [0.9, 0.99])
def test_harp_search_step_matches_subnet_layers(sparsity):
    build, batches, loader = problem(torch.float64)
    sides = bench.harp_search_sides(sparsity, build=build, batches=batches, loader=loader)
    algorithm = sides[2]
    rates_before = {n: float(r.p.detach()) for n, r in algorithm.rates.items()}
    ours, theirs = run(sides, 3)
    for name, layer in masked_layers(ours):
        sub = theirs.get_submodule(name)
        reference_mask = bench.base.GetSubnet.apply(sub.popup_scores.abs(),
                                                    bench.base.rate_act_func(sub.k_score, sub.k_min))
        assert torch.equal(layer.weight_mask.detach(), reference_mask.detach()), name
        scores = layer.parametrizations.weight_mask.original
        assert torch.allclose(scores, sub.popup_scores, rtol=0, atol=1e-12), name
        assert abs(float(algorithm.rates[name].p.detach()) - float(sub.k_score.detach())) <= 1e-6, name  # float32 rates
    assert any(float(r.p.detach()) != rates_before[n] for n, r in algorithm.rates.items())  # the rates learnt


@pytest.mark.parametrize("algorithm", ["harp", "magnitude"])
@pytest.mark.parametrize("execution", ["sparse", "dense"])
def test_finetune_step_matches_torch_prune(algorithm, execution):
    build, batches, loader = problem(torch.float64)
    sides = bench.finetune_sides(algorithm, 0.9, build=build, batches=batches, loader=loader, execution=execution)
    ours, theirs = run(sides, 3)
    forms = execution_summary(ours, formats=True)
    assert any(f != "dense" for f in forms.values()) == (execution == "sparse")
    for name, (weight, mask) in bench.dense_masks(ours).items():
        sub = theirs.get_submodule(name)
        assert torch.equal(mask.bool(), sub.weight_mask.bool()), name
        assert torch.allclose(weight * mask, sub.weight_orig * sub.weight_mask, rtol=0, atol=1e-12), name


def test_csam_mask_step_matches_autograd_with_copies():
    build, batches, loader = problem(torch.float64)
    sides = bench.csam_sides(0.9, build=build, batches=batches, loader=loader)
    start = {name: layer.weight_mask.detach().clone() for name, layer in masked_layers(sides[0][0])}
    ours, theirs = run(sides, 3)
    moved = 0.0
    for name, layer in masked_layers(ours):
        reference = theirs.get_submodule(name)
        assert torch.allclose(layer.weight_mask, reference.mask, rtol=0, atol=1e-12), name
        assert torch.allclose(layer.weight, reference.layer.weight, rtol=0, atol=1e-12), name
        moved = max(moved, float((layer.weight_mask.detach() - start[name]).abs().max()))
    assert moved > 1e-3
