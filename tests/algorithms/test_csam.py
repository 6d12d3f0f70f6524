"""C-SAM: soft-mask init, mask-space ascent through the fused ops, binarisation to the exact target, resume."""
import copy

import pytest
import torch

from algorithm_problems import (CHANCE, assert_history_finite, assert_resume_identical, eval_loader, pretrained_model,
                                train_loader)
from sparsesam import reference
from sparsesam.algorithms import CSAM, CSAMConfig, binarize_top_k, magnitude_soft_mask
from sparsesam.algorithms import csam as csam_module
from sparsesam.nn import masked_layers
from sparsesam.pruning import global_sparsity

pytest.importorskip("sklearn", reason="the digits problem ships with scikit-learn")


def cheap(**overrides) -> CSAMConfig:
    base = dict(target_sparsity=0.8, mask_epochs=2, finetune_epochs=1, transforms=("rotation", "brightness"))
    base.update(overrides)
    return CSAMConfig(**base)


def test_soft_mask_init_is_magnitude_over_quantile():
    w = torch.tensor([[-4.0, 1.0, 2.0, 0.5], [3.0, -0.25, 0.0, 8.0]])
    # tau = 0.5: the 4th smallest |w| of 8 is 1.0
    expected = torch.tensor([[1.0, 1.0, 1.0, 0.5], [1.0, 0.25, 0.0, 1.0]])
    assert torch.equal(magnitude_soft_mask(w, 0.5), expected)
    assert torch.equal(magnitude_soft_mask(torch.zeros(2, 3), 0.5), torch.zeros(2, 3))


def test_binarize_keeps_exactly_k_and_breaks_ties_by_magnitude():
    soft = [torch.tensor([1.0, 0.2, 1.0]), torch.tensor([[0.5, 1.0]])]
    weights = [torch.tensor([0.1, 5.0, 3.0]), torch.tensor([[9.0, 0.2]])]
    masks = binarize_top_k(soft, weights, keep=2)
    # Three entries at C = 1: the two with the largest |w| (3.0, then 0.2 beats 0.1) win.
    assert masks[0].tolist() == [False, False, True]
    assert masks[1].tolist() == [[False, True]]
    assert sum(int(m.sum()) for m in masks) == 2


def test_mask_phase_uses_the_fused_ascent(monkeypatch):
    calls = []
    fused = csam_module.mask_ascent_

    def checked(out, grads, weights, masks, sq_norm, rho, eps=1e-12):
        fused(out, grads, weights, masks, sq_norm, rho, eps)
        expected = reference.mask_ascent(grads, weights, masks, sq_norm, rho, eps)
        assert all(torch.equal(o, e) for o, e in zip(out, expected))
        calls.append(rho)

    monkeypatch.setattr(csam_module, "mask_ascent_", checked)
    result = CSAM(cheap(mask_epochs=1, finetune_epochs=0, rho=0.3)).fit(pretrained_model(), train_loader(),
                                                                       progress=False)
    assert calls and all(rho == 0.3 for rho in calls)
    record = result.history[0]
    assert record["phase"] == "mask" and record["perturbed_loss"] >= 0 and 0 <= record["discrepancy"] <= 1
    assert 0 <= record["margin"] <= 0.5


def test_soft_masks_stay_in_unit_interval_and_reach_the_target():
    # The soft mask itself (not top-k binarisation) must reach the kept fraction: from about 0.5 at the tau
    # init to 0.2 +- 0.05 in 30 steps (the old mean-square rate term with mask_lr 0.01 ended at 0.38).
    algorithm = CSAM(cheap(mask_epochs=3, finetune_epochs=0))
    model = pretrained_model()
    soft = {}
    enter = algorithm._enter

    def spy(phase, model, loader):
        if phase == "finetune":  # the soft masks as the mask phase left them, before binarisation
            soft["masks"] = [layer.weight_mask.detach().clone() for _, layer in masked_layers(model)]
        enter(phase, model, loader)

    algorithm._enter = spy
    algorithm.fit(model, train_loader(), progress=False)
    masks = soft["masks"]
    assert all(((m >= 0) & (m <= 1)).all() for m in masks)
    kept = float(torch.cat([m.flatten() for m in masks]).mean())
    start = CSAM(cheap())
    init_model = pretrained_model()
    start._enter("mask", init_model, train_loader())
    initial = float(torch.cat([l.weight_mask.detach().flatten() for _, l in masked_layers(init_model)]).mean())
    assert initial > 0.4
    assert abs(kept - 0.2) < 0.05, kept


def test_rate_gradient_per_entry_does_not_shrink_with_the_model():
    algorithm = CSAM(cheap(lambda_rate=0.5))
    for n in (10, 10_000):
        mask = torch.full((n,), 0.6, requires_grad=True)
        rate, kept = algorithm.rate_penalty([mask])
        rate.backward()
        # 2 * lambda_rate * (kept - k_target) on every entry, whatever n
        assert torch.allclose(mask.grad, torch.full((n,), 2 * 0.5 * (0.6 - 0.2)))
        assert kept.item() == pytest.approx(0.6)


def test_margin_counts_only_correct_predictions():
    algorithm = CSAM(cheap(lambda_z=0.0, lambda_margin=1.0))
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 1])  # the third prediction (class 0) is wrong
    _, parts = algorithm.objective(logits, logits, y)
    probs = logits.softmax(1)
    top = probs.topk(2, dim=1).values
    d = (top[:, 0] - top[:, 1]) / 2
    assert parts["margin"].item() == pytest.approx(float(d[:2].mean()))  # masked mean over the 2 correct ones
    _, parts = algorithm.objective(logits, logits, torch.tensor([1, 0, 2]))  # none correct: no margin term
    assert parts["margin"].item() == 0.0


def _objective_at(algorithm, model, x, x_t, y):
    model.train()
    with torch.no_grad():
        return algorithm.objective(model(x), model(x_t), y)[0].item()


def test_ascent_follows_and_increases_the_full_objective(monkeypatch):
    # lambda_z and lambda_margin large, so that the gradient of the full objective differs from cross-entropy's.
    config = cheap(rho=1e-3, lambda_z=5.0, lambda_margin=2.0, weight_lr=0.0)
    algorithm = CSAM(config)
    model = pretrained_model()
    loader = train_loader()
    algorithm._enter("mask", model, loader)
    optimizer, _ = algorithm._optimizer("mask", model)
    x, y = next(iter(loader))
    x_t = algorithm._transform(x, algorithm.step)
    masks = [layer.weight_mask for _, layer in masked_layers(model)]

    # The gradient of the full objective at C, by plain autograd on a copy.
    twin = copy.deepcopy(model)
    twin_masks = [layer.weight_mask for _, layer in masked_layers(twin)]
    twin.train()
    algorithm.objective(twin(x), twin(x_t), y)[0].backward()
    full = [m.grad.clone() for m in twin_masks]
    ce_only = torch.autograd.grad(torch.nn.functional.cross_entropy(twin(x), y), twin_masks)

    seen = {}
    fused = csam_module.mask_ascent_

    def capture(out, grads, weights, masks_, sq_norm, rho, eps=1e-12):
        fused(out, grads, weights, masks_, sq_norm, rho, eps)
        seen["grads"] = [g.clone() for g in grads]
        seen["ascent"] = [o.clone() for o in out]

    monkeypatch.setattr(csam_module, "mask_ascent_", capture)
    before = [m.detach().clone() for m in masks]
    algorithm._mask_step(model, x, y, optimizer)
    for g, ref in zip(seen["grads"], full):
        assert torch.allclose(g, ref, rtol=1e-4, atol=1e-7)
    assert not all(torch.allclose(g, ce, rtol=1e-2, atol=1e-6) for g, ce in zip(seen["grads"], ce_only))

    # First order: L(C') - L(C) = dL/dC . (C' - C) > 0 (C' is clipped into [0, 1], so compare with its real step).
    base = _objective_at(algorithm, twin, x, x_t, y)
    with torch.no_grad():
        for m, a in zip(twin_masks, seen["ascent"]):
            m.copy_(a)
    perturbed = _objective_at(algorithm, twin, x, x_t, y)
    predicted = sum(float((g * (a - b)).sum()) for g, a, b in zip(full, seen["ascent"], before))
    assert predicted > 0
    assert perturbed - base == pytest.approx(predicted, rel=0.25)


def test_mask_step_swaps_storage_instead_of_copying():
    algorithm = CSAM(cheap(weight_lr=0.0))
    model = pretrained_model()
    loader = train_loader()
    algorithm._enter("mask", model, loader)
    optimizer, _ = algorithm._optimizer("mask", model)
    masks = [layer.weight_mask for _, layer in masked_layers(model)]
    own = [m.data_ptr() for m in masks]
    batches = iter(loader)
    buffers = None
    for _ in range(3):
        x, y = next(batches)
        algorithm._mask_step(model, x, y, optimizer)
        algorithm.step += 1
        # The masks hold their own storage after the step, and C' lives in one persistent buffer per mask.
        assert [m.data_ptr() for m in masks] == own
        now = sorted(algorithm._point.buffer_for(m).data_ptr() for m in masks)
        assert buffers is None or now == buffers
        buffers = now
    assert not algorithm._point.active


def test_binarisation_leaves_the_weights_unchanged():
    algorithm = CSAM(cheap(mask_epochs=1, finetune_epochs=0))
    model = pretrained_model()
    loader = train_loader()
    algorithm._enter("mask", model, loader)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # soft values away from 1, as the mask phase leaves them
        for _, layer in masked_layers(model):
            layer.weight_mask.copy_(torch.rand(layer.weight_mask.shape, generator=generator))
    weights = {name: layer.weight.detach().clone() for name, layer in masked_layers(model)}
    algorithm._enter("finetune", model, loader)
    assert abs(global_sparsity(model) - 0.8) < 1e-3
    for name, layer in masked_layers(model):
        assert layer.mask_mode == "fixed"
        assert torch.equal(layer.weight.detach(), weights[name])


def test_csam_reaches_target_and_beats_chance():
    result = CSAM(cheap()).fit(pretrained_model(), train_loader(), val_loader=eval_loader(), progress=False)
    assert abs(result.summary["sparsity"] - 0.8) < 0.01
    assert abs(global_sparsity(result.model) - 0.8) < 0.01
    assert result.summary["val_accuracy"] > CHANCE + 0.4
    assert_history_finite(result.history, 3)
    assert [r["phase"] for r in result.history] == ["mask", "mask", "finetune"]


@pytest.mark.parametrize("stop_after", [1, 2])
def test_csam_resume_is_bitwise_identical(stop_after):
    assert_resume_identical(lambda: CSAM(cheap(target_sparsity=0.6)), stop_after)
