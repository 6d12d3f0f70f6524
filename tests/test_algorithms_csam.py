"""C-SAM: soft-mask init, mask-space ascent through the fused ops, binarisation to the exact target, resume."""
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


def test_soft_masks_stay_in_unit_interval_and_move_toward_the_target():
    algorithm = CSAM(cheap(mask_epochs=2, finetune_epochs=0, lambda_rate=50.0))
    model = pretrained_model()
    seen = []
    original = algorithm._train_epoch

    def spy(phase, epoch, model, loader, optimizer, bar):
        stats = original(phase, epoch, model, loader, optimizer, bar)
        masks = [layer.weight_mask.detach() for _, layer in masked_layers(model)]
        assert all(((m >= 0) & (m <= 1)).all() for m in masks)
        seen.append(float(torch.cat([m.flatten() for m in masks]).mean()))
        return stats

    algorithm._train_epoch = spy
    algorithm.fit(model, train_loader(), progress=False)
    start = CSAM(cheap())
    init_model = pretrained_model()
    start._enter("mask", init_model, train_loader())
    initial = float(torch.cat([l.weight_mask.detach().flatten() for _, l in masked_layers(init_model)]).mean())
    assert abs(seen[-1] - 0.2) < abs(initial - 0.2)


def test_binarisation_folds_the_soft_values_into_the_weights():
    algorithm = CSAM(cheap(mask_epochs=1, finetune_epochs=0))
    model = pretrained_model()
    loader = train_loader()
    algorithm._enter("mask", model, loader)
    soft = {name: (layer.weight.detach() * layer.weight_mask.detach()).clone() for name, layer in masked_layers(model)}
    algorithm._enter("finetune", model, loader)
    assert abs(global_sparsity(model) - 0.8) < 1e-3
    for name, layer in masked_layers(model):
        assert layer.mask_mode == "fixed"
        kept = layer.weight_mask
        assert torch.equal(layer.weight.detach()[kept], soft[name][kept])


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
