"""The structured baselines AdaSAP is compared with (magnitude / sam_prune with granularity="channel"),
and magnitude pruning with adversarial fine-tuning (the baseline of HARP and HYDRA)."""
import pytest
import torch

from algorithm_problems import (CHANCE, assert_history_finite, assert_resume_identical, eval_loader, pretrained_model,
                                train_loader)
from sparsesam.algorithms import AdaSAP, AdaSAPConfig, Magnitude, MagnitudeConfig, SamPrune, SamPruneConfig
from sparsesam.nn import masked_layers, sparsify
from sparsesam.pruning import channel_l2_norms, channel_sparsity, global_sparsity
from sparsesam.pruning._common import output_channels, prunable_layers

pytest.importorskip("sklearn", reason="the digits problem ships with scikit-learn")
pytest.importorskip("torch_pruning", reason="channel groups, gates and compaction need torch-pruning")


def _structured(model):
    for name, layer in prunable_layers(model):
        mask = layer.weight_mask.reshape(layer.weight.shape[0], -1)
        assert (mask.all(dim=1) | ~mask.any(dim=1)).all(), name


def _compact_matches(result):
    compact = result.compact_model
    assert compact is not None and not list(masked_layers(compact))
    assert result.summary["params_compact"] == sum(p.numel() for p in compact.parameters())
    assert result.summary["params_compact"] < result.summary["params_dense"]
    x = next(iter(eval_loader()))[0][:64]
    result.model.eval(), compact.eval()
    with torch.no_grad():
        assert torch.allclose(result.model(x), compact(x), atol=1e-5, rtol=1e-5)


def test_channel_magnitude_removes_the_smallest_l2_channels_of_each_layer():
    probe = pretrained_model()
    sparsify(probe)  # the same weights, in the masked layers prunable_layers lists
    norms = {name: channel_l2_norms(layer) for name, layer in prunable_layers(probe)}
    result = Magnitude(MagnitudeConfig(target_sparsity=0.5, finetune_epochs=0, granularity="channel")).fit(
        pretrained_model(), train_loader(), progress=False)
    _structured(result.model)
    assert abs(channel_sparsity(result.model) - 0.5) < 0.01
    assert abs(result.summary["sparsity"] - 0.5) < 0.01
    for name, layer in prunable_layers(result.model):
        kept = output_channels(layer.weight_mask)
        if (~kept).any():  # every pruned channel is no larger than every kept one (scope="layer")
            assert norms[name][~kept].max() <= norms[name][kept].min(), name
    _compact_matches(result)


def test_channel_magnitude_finetunes_and_equals_adasap_pruning_without_its_training():
    # Same criterion, same unit: with no training around it, AdaSAP's pruning and the baseline's pick the same channels.
    baseline = Magnitude(MagnitudeConfig(target_sparsity=0.5, finetune_epochs=0, granularity="channel")).fit(
        pretrained_model(), train_loader(), progress=False)
    adasap = AdaSAP(AdaSAPConfig(target_sparsity=0.5, adaptive_epochs=0, finetune_epochs=0)).fit(
        pretrained_model(), train_loader(), progress=False)
    for (name, a), (_, b) in zip(prunable_layers(baseline.model), prunable_layers(adasap.model)):
        assert torch.equal(a.weight_mask, b.weight_mask), name
    tuned = Magnitude(MagnitudeConfig(target_sparsity=0.5, finetune_epochs=2, lr=0.02, granularity="channel")).fit(
        pretrained_model(), train_loader(), val_loader=eval_loader(), progress=False)
    assert tuned.summary["val_accuracy"] > CHANCE + 0.4
    assert_history_finite(tuned.history, 2)
    _structured(tuned.model)
    _compact_matches(tuned)


def test_channel_sam_prune_trains_dense_then_removes_channels():
    result = SamPrune(SamPruneConfig(target_sparsity=0.5, sam_epochs=1, finetune_epochs=1, granularity="channel")).fit(
        pretrained_model(), train_loader(), val_loader=eval_loader(), progress=False)
    assert [r["phase"] for r in result.history] == ["sam", "finetune"]
    assert result.history[0]["sparsity"] == 0.0
    assert abs(result.history[1]["sparsity"] - 0.5) < 0.01
    assert result.summary["val_accuracy"] > CHANCE + 0.4
    assert result.summary["weight_sparsity"] > 0.3  # channels (and the next layer's inputs) are gone
    _structured(result.model)
    _compact_matches(result)


def test_unstructured_default_is_unchanged():
    result = Magnitude(MagnitudeConfig(target_sparsity=0.8, finetune_epochs=0)).fit(
        pretrained_model(), train_loader(), progress=False)
    assert abs(global_sparsity(result.model) - 0.8) < 0.01
    assert result.compact_model is None and "params_compact" not in result.summary


@pytest.mark.parametrize("stop_after", [1, 2])
def test_channel_magnitude_resume_is_bitwise_identical(stop_after):
    assert_resume_identical(lambda: Magnitude(MagnitudeConfig(target_sparsity=0.5, finetune_epochs=3,
                                                              granularity="channel")), stop_after)


@pytest.mark.parametrize("stop_after", [1, 2])
def test_channel_sam_prune_resume_is_bitwise_identical(stop_after):
    # stop_after=1 ends at the phase boundary (the resumed run prunes); 2 resumes inside the gated fine-tuning.
    assert_resume_identical(lambda: SamPrune(SamPruneConfig(target_sparsity=0.5, sam_epochs=1, finetune_epochs=2,
                                                            granularity="channel")), stop_after)


def test_adversarial_finetuning_changes_the_weights_and_resumes_exactly():
    clean = Magnitude(MagnitudeConfig(target_sparsity=0.7, finetune_epochs=1)).fit(
        pretrained_model(), train_loader(), progress=False)
    adversarial = Magnitude(MagnitudeConfig(target_sparsity=0.7, finetune_epochs=1, loss="pgd_at", eps=0.1,
                                            attack_steps=2)).fit(pretrained_model(), train_loader(),
                                                                 val_loader=eval_loader(), progress=False)
    assert adversarial.summary["val_accuracy"] > CHANCE + 0.3
    assert_history_finite(adversarial.history, 1)
    differs = [not torch.equal(a, b) for a, b in zip(clean.model.parameters(), adversarial.model.parameters())]
    assert any(differs)  # the attack is really in the loss
    assert_resume_identical(lambda: Magnitude(MagnitudeConfig(target_sparsity=0.7, finetune_epochs=2, loss="pgd_at",
                                                              eps=0.1, attack_steps=1)), 1)


@pytest.mark.parametrize("config_type, field, value", [
    (MagnitudeConfig, "granularity", "nm"),
    (MagnitudeConfig, "channel_scope", "block"),
    (MagnitudeConfig, "loss", "fgsm"),
    (MagnitudeConfig, "attack_steps", 0),
    (MagnitudeConfig, "eps", -0.1),
    (SamPruneConfig, "granularity", "kernel"),
    (SamPruneConfig, "channel_scope", "model"),
])
def test_bad_new_fields_are_named(config_type, field, value):
    with pytest.raises(ValueError, match=field):
        config_type(**{field: value})
