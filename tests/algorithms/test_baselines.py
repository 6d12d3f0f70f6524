"""The baselines: global magnitude pruning, SAM-then-prune, HYDRA; and the shared fit() contract."""
import dataclasses

import pytest
import torch

from algorithm_problems import (CHANCE, MemoryCheckpoint, assert_history_finite, assert_resume_identical, eval_loader,
                                pretrained_model, train_loader)
from sparsesam.algorithms import (ALGORITHMS, AdaSAPConfig, AsamPruneConfig, CSAMConfig, FitResult, HARPConfig, Hydra,
                                  HydraConfig, Magnitude, MagnitudeConfig, SamPrune, SamPruneConfig)
from sparsesam.nn import masked_layers
from sparsesam.pruning import global_sparsity

pytest.importorskip("sklearn", reason="the digits problem ships with scikit-learn")


def test_registry_names_every_algorithm():
    assert set(ALGORITHMS) == {"adasap", "harp", "csam", "magnitude", "hydra", "sam_prune", "asam_prune"}
    for name, cls in ALGORITHMS.items():
        assert cls.name == name
        cls(cls.config_type())  # paper defaults are a valid config


def test_magnitude_reaches_target_and_keeps_accuracy():
    result = Magnitude(MagnitudeConfig(target_sparsity=0.8, finetune_epochs=2, lr=0.02)).fit(
        pretrained_model(), train_loader(), val_loader=eval_loader(), progress=False)
    assert isinstance(result, FitResult)
    assert abs(global_sparsity(result.model) - 0.8) < 0.01
    assert abs(result.summary["sparsity"] - 0.8) < 0.01
    assert result.summary["val_accuracy"] > CHANCE + 0.5
    assert_history_finite(result.history, 2)
    assert [r["phase"] for r in result.history] == ["finetune", "finetune"]


def test_magnitude_prunes_the_smallest_weights_globally():
    model = pretrained_model()
    algorithm = Magnitude(MagnitudeConfig(target_sparsity=0.7, finetune_epochs=0))
    weights = torch.cat([p.detach().abs().flatten() for n, p in model.named_parameters()
                         if n.endswith("weight") and p.dim() > 1])
    threshold = weights.kthvalue(round(0.7 * weights.numel())).values
    result = algorithm.fit(model, train_loader(), progress=False)
    for _, layer in masked_layers(result.model):
        assert (layer.weight[~layer.weight_mask].abs() <= threshold).all()
        assert (layer.weight[layer.weight_mask].abs() >= threshold).all()


def test_sam_prune_trains_dense_then_prunes():
    result = SamPrune(SamPruneConfig(target_sparsity=0.75, sam_epochs=1, finetune_epochs=1)).fit(
        pretrained_model(), train_loader(), val_loader=eval_loader(), progress=False)
    phases = [r["phase"] for r in result.history]
    assert phases == ["sam", "finetune"]
    assert result.history[0]["sparsity"] == 0.0
    assert abs(result.history[1]["sparsity"] - 0.75) < 0.01
    assert result.summary["val_accuracy"] > CHANCE + 0.5
    assert_history_finite(result.history, 2)


@pytest.mark.parametrize("loss", ["clean", "pgd_at"])
def test_hydra_uniform_rates(loss):
    config = HydraConfig(target_sparsity=0.8, search_epochs=1, finetune_epochs=1, loss=loss, eps=0.03,
                         attack_steps=1)
    result = Hydra(config).fit(pretrained_model(), train_loader(), val_loader=eval_loader(), progress=False)
    assert abs(result.summary["sparsity"] - 0.8) < 0.01
    for rate in result.summary["layer_sparsity"].values():  # uniform: every layer at the target
        assert abs(rate - 0.8) < 0.02
    assert result.summary["val_accuracy"] > CHANCE + 0.3
    assert_history_finite(result.history, 2)


@pytest.mark.parametrize("stop_after", [1, 2])
def test_magnitude_resume_is_bitwise_identical(stop_after):
    assert_resume_identical(lambda: Magnitude(MagnitudeConfig(target_sparsity=0.6, finetune_epochs=3)), stop_after)


@pytest.mark.parametrize("stop_after", [1, 2])
def test_sam_prune_resume_is_bitwise_identical(stop_after):
    # stop_after=1 ends exactly at the phase boundary: the resumed run prunes.
    assert_resume_identical(lambda: SamPrune(SamPruneConfig(target_sparsity=0.6, sam_epochs=1, finetune_epochs=2)),
                            stop_after)


def test_hydra_resume_is_bitwise_identical():
    assert_resume_identical(lambda: Hydra(HydraConfig(target_sparsity=0.7, search_epochs=2, finetune_epochs=1,
                                                      loss="pgd_at", eps=0.03, attack_steps=1)), 1)


@pytest.mark.parametrize("config_type, field, value", [
    (MagnitudeConfig, "target_sparsity", 1.0),
    (MagnitudeConfig, "target_sparsity", -0.1),
    (SamPruneConfig, "target_sparsity", 1.5),
    (HydraConfig, "granularity", "blocks"),
    (HARPConfig, "granularity", "kernel"),
    (HARPConfig, "loss", "fgsm"),
    (HARPConfig, "hardware_cost", "latency"),
    (AdaSAPConfig, "criterion", "random"),
    (AdaSAPConfig, "rho_min", -1.0),
    (CSAMConfig, "transforms", ("rotation", "elastic")),
    (CSAMConfig, "tau", 1.0),
    (CSAMConfig, "lambda_rate", -0.5),
    (AsamPruneConfig, "rho", -0.1),
    (AsamPruneConfig, "scope", "model"),
    (MagnitudeConfig, "finetune_epochs", -1),
])
def test_bad_config_names_the_field(config_type, field, value):
    with pytest.raises(ValueError, match=field):
        config_type(**{field: value})
    # A config changed after construction is checked again by the algorithm.
    config = config_type()
    setattr(config, field, value)
    algorithm_type = next(cls for cls in ALGORITHMS.values() if cls.config_type is config_type)
    with pytest.raises(ValueError, match=field):
        algorithm_type(config)


def test_nm_target_must_match_n_over_m():
    with pytest.raises(ValueError, match="target_sparsity"):
        HARPConfig(granularity="nm", n=2, m=4, target_sparsity=0.9)


def test_wrong_config_type_and_checkpoint_are_refused():
    with pytest.raises(TypeError, match="config"):
        Magnitude(HydraConfig())
    with pytest.raises(TypeError, match="checkpoint"):
        Magnitude(MagnitudeConfig(finetune_epochs=0)).fit(pretrained_model(), train_loader(), checkpoint=object())


def test_checkpoint_of_another_run_is_refused():
    checkpoint = MemoryCheckpoint()
    Magnitude(MagnitudeConfig(target_sparsity=0.5, finetune_epochs=1)).fit(pretrained_model(), train_loader(),
                                                                           progress=False, checkpoint=checkpoint)
    with pytest.raises(ValueError, match="config"):
        Magnitude(MagnitudeConfig(target_sparsity=0.6, finetune_epochs=1)).fit(
            pretrained_model(), train_loader(), progress=False, checkpoint=checkpoint)
    with pytest.raises(ValueError, match="magnitude"):
        SamPrune(SamPruneConfig()).fit(pretrained_model(), train_loader(), progress=False, checkpoint=checkpoint)


def test_same_seed_same_result():
    config = MagnitudeConfig(target_sparsity=0.5, finetune_epochs=1)
    a = Magnitude(config).fit(pretrained_model(), train_loader(), progress=False)
    b = Magnitude(dataclasses.replace(config)).fit(pretrained_model(), train_loader(), progress=False)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_progress_bar_names_the_phase(capsys):
    Magnitude(MagnitudeConfig(target_sparsity=0.5, finetune_epochs=1)).fit(pretrained_model(), train_loader(),
                                                                           progress=True)
    assert "magnitude finetune 1/1" in capsys.readouterr().err
