"""HARP: learnable rates, the hardware loss and its schedule, the three granularities, resume."""

import pytest
import torch

from algorithm_problems import (CHANCE, assert_history_finite, assert_resume_identical, eval_loader, pretrained_model,
                                train_loader)
from sparsesam.algorithms import HARP, HARPConfig, LearnableRate, rescale_rates
from sparsesam.nn import masked_layers
from sparsesam.pruning import is_nm_sparse
from sparsesam.pruning._common import output_layer_name

pytest.importorskip("sklearn", reason="the digits problem ships with scikit-learn")


def cheap(**overrides) -> HARPConfig:
    base = dict(target_sparsity=0.8, search_epochs=2, finetune_epochs=1, loss="pgd_at", eps=0.03, attack_steps=1)
    base.update(overrides)
    return HARPConfig(**base)


def test_learnable_rate_formula_and_bounds():
    rate = LearnableRate(0.3, r_min=0.05)
    assert rate().item() == pytest.approx(0.3)
    with torch.no_grad():
        rate.p.fill_(-50.0)
    assert rate().item() == pytest.approx(0.05)  # r_min
    with torch.no_grad():
        rate.p.fill_(0.0)
    assert rate().item() == pytest.approx(0.5 * 0.95 + 0.05)  # sigmoid(p) (1 - r_min) + r_min


def test_rescale_rates_hits_the_target_exactly():
    rates = {"a": 0.5, "b": 0.1, "c": 0.9}
    costs = {"a": 100.0, "b": 1000.0, "c": 10.0}
    out = rescale_rates(rates, costs, keep=0.2, r_min=0.02)
    kept = sum(out[n] * costs[n] for n in out) / sum(costs.values())
    assert kept == pytest.approx(0.2, abs=1e-9)
    assert all(0.02 <= r <= 1.0 for r in out.values())
    # One common factor where nothing is clipped: the learnt proportions survive.
    assert out["a"] / out["b"] == pytest.approx(rates["a"] / rates["b"])


def test_hardware_loss_pushes_rates_down_only_above_target():
    algorithm = HARP(cheap(target_sparsity=0.75))
    algorithm._restructure("search", pretrained_model(), train_loader())
    assert algorithm.kept_fraction().item() == pytest.approx(0.25)  # rates start at k_target
    assert algorithm._regulariser(epoch=0).item() == 0.0
    for rate in algorithm.rates.values():
        rate.set_rate(0.5)
    loss = algorithm._regulariser(epoch=1)  # gamma = 1.0 in the middle stage
    assert loss.item() == pytest.approx(0.5 / 0.25 - 1.0)
    loss.backward()
    for rate in algorithm.rates.values():
        assert rate.p.grad > 0  # gradient descent lowers every rate
    assert min(r.r_min for r in algorithm.rates.values()) == pytest.approx(0.1 * 0.25)


def test_gamma_grows_stepwise_over_the_search():
    algorithm = HARP(cheap(search_epochs=6, gamma_steps=(0.1, 1.0, 10.0)))
    assert [algorithm.gamma(e) for e in range(6)] == [0.1, 0.1, 1.0, 1.0, 10.0, 10.0]
    with pytest.raises(ValueError, match="gamma_steps"):
        HARPConfig(gamma_steps=(1.0, 0.1))


@pytest.mark.parametrize("loss", ["pgd_at", "trades", "mart"])
def test_harp_unstructured_reaches_target(loss):
    result = HARP(cheap(loss=loss)).fit(pretrained_model(), train_loader(), val_loader=eval_loader(), progress=False)
    assert abs(result.summary["sparsity"] - 0.8) < 0.01
    assert result.summary["val_accuracy"] > CHANCE + 0.3
    assert_history_finite(result.history, 3)
    search = [r for r in result.history if r["phase"] == "search"]
    assert [r["gamma"] for r in search] == [0.1, 1.0]  # 2 epochs over 3 stages
    assert all("kept" in r and "hw_loss" in r for r in search)
    assert set(result.summary["learnt_keep_rates"]) == set(result.summary["layer_sparsity"])
    for _, layer in masked_layers(result.model):  # the mask is fixed for fine-tuning
        assert layer.mask_mode == "fixed"


def test_harp_weights_stay_frozen_during_the_search():
    model = pretrained_model()
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight") or k.endswith("bias")}
    HARP(cheap(search_epochs=1, finetune_epochs=0)).fit(model, train_loader(), progress=False)
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_harp_flops_cost_counts_output_positions():
    algorithm = HARP(cheap(hardware_cost="flops"))
    model = pretrained_model()
    algorithm._restructure("search", model, train_loader())
    layers = dict(masked_layers(model))
    # features.0 is a 3x3 conv on 8x8 with padding 1: 8*8 output positions per weight.
    assert algorithm.costs["features.0"] == layers["features.0"].weight.numel() * 64
    assert algorithm.costs["classifier.3"] == layers["classifier.3"].weight.numel()


def test_harp_channel_granularity_prunes_whole_channels():
    result = HARP(cheap(granularity="channel", target_sparsity=0.5, loss="clean")).fit(
        pretrained_model(), train_loader(), val_loader=eval_loader(), progress=False)
    assert abs(result.summary["sparsity"] - 0.5) < 0.01
    assert result.summary["val_accuracy"] > CHANCE + 0.3
    classifier = output_layer_name(result.model)
    for name, layer in masked_layers(result.model):
        mask = layer.weight_mask.reshape(layer.weight.shape[0], -1)
        if name == classifier:
            assert mask.all()  # classes are never removed
        else:
            assert (mask.all(dim=1) | ~mask.any(dim=1)).all(), name


def test_harp_nm_granularity_is_exactly_n_of_m():
    result = HARP(cheap(granularity="nm", n=2, m=4, target_sparsity=0.5)).fit(
        pretrained_model(), train_loader(), val_loader=eval_loader(), progress=False)
    assert abs(result.summary["sparsity"] - 0.5) < 0.01
    assert result.summary["val_accuracy"] > CHANCE + 0.3
    layers = dict(masked_layers(result.model))
    assert set(result.summary["layer_sparsity"]) == {n for n, l in layers.items() if l.weight.shape[1] % 4 == 0}
    for name in result.summary["layer_sparsity"]:
        assert is_nm_sparse(layers[name].weight_mask, 2, 4, exact=True), name
    assert layers["features.0"].weight_mask.all()  # 1 input channel: not a multiple of m, left dense
    assert "kept" not in result.history[0]  # the rate is n/m: nothing to learn


@pytest.mark.parametrize("stop_after", [1, 2])
def test_harp_resume_is_bitwise_identical(stop_after):
    # 1: inside the search (scores, rates and their momentum restored); 2: at the boundary (rescale, freeze).
    assert_resume_identical(lambda: HARP(cheap(target_sparsity=0.7)), stop_after)


def test_harp_search_learns_which_and_how_many():
    def run(search_epochs):
        config = cheap(target_sparsity=0.8, search_epochs=search_epochs, finetune_epochs=0, loss="clean")
        return HARP(config).fit(pretrained_model(), train_loader(), progress=False)

    start, searched = run(0), run(2)  # no search: the masks are the magnitude masks of the init
    changed = sum(int((layer.weight_mask != dict(masked_layers(start.model))[name].weight_mask).sum())
                  for name, layer in masked_layers(searched.model))
    assert changed > 0
    rates = searched.summary["learnt_keep_rates"].values()
    assert max(rates) - min(rates) > 0.05  # per-layer rates, not one uniform rate
    assert abs(searched.summary["sparsity"] - 0.8) < 0.01  # rescaled to the target all the same
