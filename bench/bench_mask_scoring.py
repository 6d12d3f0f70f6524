"""Mask-perturbation scoring over the masked (conv / linear) weights of
ResNet-18 (11.2 M fp32 entries in 21 tensors): sparsesam's fused ops vs the
obvious PyTorch code with the same semantics (torch._foreach_ where there is
one, else a loop over layers), same run.

Run: ``.venv/bin/python -m pytest bench/bench_mask_scoring.py --benchmark-enable``.
"""
from __future__ import annotations

import pytest
import torch

from algorithm_baselines import GetSubnet  # HARP's / HYDRA's sort-based GetSubnet
from sparsesam.models import ResNet18
from sparsesam.ops import mask_ascent_, mask_grad_sq_norm, mask_score_grad

ROUNDS = 10
RHO = 0.05


@pytest.fixture(scope="module")
def layers():
    """(G, W, soft mask, scores) per masked weight of ResNet-18."""
    torch.manual_seed(0)
    weights = [p.detach() for p in ResNet18(width=64).parameters() if p.dim() > 1]
    grads = [torch.randn_like(w) for w in weights]
    soft = [torch.rand_like(w) for w in weights]
    scores = [w.abs() for w in weights]
    return grads, weights, soft, scores


def _group(benchmark, name, layers):
    n = sum(w.numel() for w in layers[1])
    benchmark.group = f"{name}, ResNet-18 masked weights ({n / 1e6:.1f} M fp32)"


# --- PyTorch baselines (same semantics as sparsesam.reference) -----------------


def torch_sq_norm(grads, weights):
    dm = torch._foreach_mul(grads, weights)
    return torch.stack(torch._foreach_norm(dm)).double().square().sum()


def torch_ascent(out, grads, weights, masks, sq_norm, rho):
    dm = torch._foreach_mul(grads, weights)
    torch._foreach_mul_(dm, rho / (sq_norm.sqrt().item() + 1e-12))
    torch._foreach_add_(dm, masks)
    torch._foreach_clamp_min_(dm, 0.0)
    torch._foreach_clamp_max_(dm, 1.0)
    for o, d in zip(out, dm):
        o.copy_(d)


def torch_score_grad(grads, weights, scores):
    dm = torch._foreach_mul(grads, weights)
    return [torch.sign(s) * d for s, d in zip(scores, dm)], torch.stack([d.sum(dtype=torch.float64) for d in dm])


# --- benchmarks ----------------------------------------------------------------


@pytest.mark.parametrize("impl", ["sparsesam", "torch"])
def test_mask_grad_sq_norm(benchmark, layers, impl):
    grads, weights = layers[0], layers[1]
    fn = mask_grad_sq_norm if impl == "sparsesam" else torch_sq_norm
    _group(benchmark, "mask_grad_sq_norm", layers)
    benchmark.pedantic(fn, (grads, weights), rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["sparsesam", "torch"])
def test_mask_ascent(benchmark, layers, impl):
    grads, weights, soft, _ = layers
    out = [torch.empty_like(m) for m in soft]
    sq = mask_grad_sq_norm(grads, weights)
    fn = mask_ascent_ if impl == "sparsesam" else torch_ascent
    _group(benchmark, "mask_ascent_ (norm given)", layers)
    benchmark.pedantic(fn, (out, grads, weights, soft, sq, RHO), rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["sparsesam", "torch"])
def test_mask_score_grad(benchmark, layers, impl):
    grads, weights, _, scores = layers
    fn = mask_score_grad if impl == "sparsesam" else torch_score_grad
    _group(benchmark, "mask_score_grad (HARP)", layers)
    benchmark.pedantic(fn, (grads, weights, scores), rounds=ROUNDS, warmup_rounds=1)


# --- the score-to-mask step of HARP / HYDRA (forward + straight-through backward) ----


def _score_to_mask_step(layers, impl):
    from sparsesam.pruning import score_mask

    grads, _, _, scores = layers
    leaves = [s.clone().requires_grad_() for s in scores]
    rates = [torch.tensor(0.1, requires_grad=True) for _ in scores]

    def step():
        for s, r, dm in zip(leaves, rates, grads):
            mask = score_mask(s, r) if impl == "sparsesam" else GetSubnet.apply(s.abs(), r)
            mask.backward(dm)  # dM as the masked layer's backward hands it over
    return step


@pytest.mark.parametrize("impl", ["sparsesam", "torch"])
def test_score_to_mask(benchmark, layers, impl):
    _group(benchmark, "score-to-mask fwd+bwd at 10% kept (HARP / HYDRA search)", layers)
    benchmark.pedantic(_score_to_mask_step(layers, impl), rounds=ROUNDS, warmup_rounds=1)
