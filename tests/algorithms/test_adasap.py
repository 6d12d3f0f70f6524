"""AdaSAP: per-channel radii, structured pruning to the target, exact compaction, resume."""
import pytest
import torch

from algorithm_problems import (CHANCE, assert_history_finite, assert_resume_identical, eval_loader, pretrained_model,
                                train_loader)
from sparsesam.algorithms import AdaSAP, AdaSAPConfig, AsamPrune, AsamPruneConfig, channel_radii
from sparsesam.models import build_model
from sparsesam.nn import masked_layers
from sparsesam.pruning import channel_sparsity, coupled_channel_groups
from sparsesam.pruning._common import output_channels, prunable_layers

pytest.importorskip("sklearn", reason="the digits problem ships with scikit-learn")
pytest.importorskip("torch_pruning", reason="channel groups, gates and compaction need torch-pruning")


def test_channel_radii_follow_the_formula():
    scores = {"a": torch.tensor([1.0, 3.0, 2.0]), "b": torch.tensor([5.0, 5.0])}
    radii = channel_radii(scores, rho_min=0.01, rho_max=2.0, scope="layer")
    # rho_i = rho_max - (s_i - s_min)/(s_max - s_min) * (rho_max - rho_min), per layer
    assert torch.allclose(radii["a"], torch.tensor([2.0, 0.01, 1.005], dtype=torch.float64))
    assert torch.allclose(radii["b"], torch.tensor([0.01, 0.01], dtype=torch.float64))  # no channel singled out
    radii = channel_radii(scores, rho_min=0.0, rho_max=1.0, scope="global")  # s over [1, 5]
    assert torch.allclose(radii["a"], torch.tensor([1.0, 0.5, 0.75], dtype=torch.float64))
    assert torch.allclose(radii["b"], torch.tensor([0.0, 0.0], dtype=torch.float64))


def test_adaptive_phase_sets_per_channel_radii_from_scores():
    algorithm = AdaSAP(AdaSAPConfig(target_sparsity=0.5, adaptive_epochs=1, finetune_epochs=0))
    seen = {}
    original = algorithm._train_epoch

    def spy(phase, epoch, model, loader, optimizer, bar):
        stats = original(phase, epoch, model, loader, optimizer, bar)
        for name, layer in prunable_layers(model):
            seen[name] = optimizer.state[layer.weight]["channel_rho"].clone()
        return stats

    algorithm._train_epoch = spy
    result = algorithm.fit(pretrained_model(), train_loader(), progress=False)
    assert seen, "no channel radii were set"
    for rho in seen.values():
        assert torch.isclose(rho.min(), torch.tensor(0.01, dtype=torch.float64))
        assert torch.isclose(rho.max(), torch.tensor(2.0, dtype=torch.float64))
    assert result.history[0]["rho_spread"] == pytest.approx(1.99)


@pytest.mark.parametrize("criterion, scope", [("l2", "layer"), ("taylor", "global")])
def test_adasap_prunes_whole_channels_and_compacts_exactly(criterion, scope):
    config = AdaSAPConfig(target_sparsity=0.5, adaptive_epochs=1, finetune_epochs=2, criterion=criterion, scope=scope,
                          taylor_batches=2)
    result = AdaSAP(config).fit(pretrained_model(), train_loader(), val_loader=eval_loader(), progress=False)
    model = result.model
    assert abs(channel_sparsity(model) - 0.5) < 0.01
    assert abs(result.summary["sparsity"] - 0.5) < 0.01
    assert result.summary["val_accuracy"] > CHANCE + 0.4
    assert_history_finite(result.history, 3)
    for name, layer in prunable_layers(model):  # structured: a channel is all kept or all pruned
        mask = layer.weight_mask.reshape(layer.weight.shape[0], -1)
        assert (mask.all(dim=1) | ~mask.any(dim=1)).all(), name

    compact = result.compact_model
    assert compact is not None
    dense_params = sum(p.numel() for p in pretrained_model().parameters())
    assert result.summary["params_compact"] == sum(p.numel() for p in compact.parameters()) < dense_params
    assert result.summary["macs_compact"] < result.summary["macs_dense"]
    assert not list(masked_layers(compact))
    # The gated masked model and the compacted one compute the same function.
    x = next(iter(eval_loader()))[0][:64]
    model.eval(), compact.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), compact(x), atol=1e-5, rtol=1e-5)
    kept_channels = {name: int(output_channels(layer.weight_mask).sum()) for name, layer in prunable_layers(model)}
    compact_modules = dict(compact.named_modules())
    for name, kept in kept_channels.items():
        assert compact_modules[name].weight.shape[0] == kept


@pytest.mark.parametrize("stop_after, criterion", [(1, "l2"), (3, "l2"), (1, "taylor")])
def test_adasap_resume_is_bitwise_identical(stop_after, criterion):
    # 1: inside the adaptive phase (radii recomputed; Taylor scores draw batches from the loader);
    # 3: inside fine-tuning (gates rebuilt on the fresh model).
    config = AdaSAPConfig(target_sparsity=0.5, adaptive_epochs=2, finetune_epochs=2, criterion=criterion,
                          taylor_batches=2)
    assert_resume_identical(lambda: AdaSAP(config), stop_after)


def test_adasap_prunes_residual_coupled_channels_together():
    torch.manual_seed(0)
    model = build_model("resnet18", in_channels=1, num_classes=10, width=0.125)
    loader = train_loader(size=128)
    result = AdaSAP(AdaSAPConfig(target_sparsity=0.5, adaptive_epochs=1, finetune_epochs=0)).fit(
        model, loader, progress=False)
    x = next(iter(loader))[0]
    layers = dict(masked_layers(result.model))
    groups = coupled_channel_groups(result.model, x[:1])
    assert groups, "ResNet-18 has residual sums: some channels must be tied"
    for group in groups:
        kept = [output_channels(layers[name].weight_mask) for name in group]
        assert all(torch.equal(k, kept[0]) for k in kept), group
    # Tied channels pruned together are what lets compaction remove them: a quarter of the parameters remain.
    assert result.summary["param_ratio"] < 0.35
    result.model.eval(), result.compact_model.eval()
    with torch.no_grad():
        assert torch.allclose(result.model(x), result.compact_model(x), atol=1e-5, rtol=1e-5)


def test_channel_radii_of_a_coupled_group_come_from_the_group_score():
    scores = {"a": torch.tensor([1.0, 3.0, 2.0]), "b": torch.tensor([3.0, 1.0, 2.0]), "c": torch.tensor([0.0, 4.0])}
    radii = channel_radii(scores, rho_min=0.0, rho_max=1.0, scope="layer", coupled=[["a", "b"]])
    # the group's score is the members' mean, [2, 2, 2]: nothing singles a channel out
    assert torch.equal(radii["a"], radii["b"])
    assert torch.allclose(radii["a"], torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(radii["c"], torch.tensor([1.0, 0.0], dtype=torch.float64))
    radii = channel_radii(scores, rho_min=0.0, rho_max=1.0, scope="global", coupled=[["a", "b"]])
    assert torch.allclose(radii["a"], torch.full((3,), 0.5, dtype=torch.float64))  # 2 on the global scale [0, 4]
    with pytest.raises(ValueError, match="different output channels"):
        channel_radii(scores, 0.0, 1.0, "layer", coupled=[["a", "c"]])
    with pytest.raises(ValueError, match="scope"):
        channel_radii(scores, 0.0, 1.0, "everywhere")


def test_adasap_coupled_channels_share_a_radius():
    torch.manual_seed(0)
    model = build_model("resnet18", in_channels=1, num_classes=10, width=0.125)
    loader = train_loader(size=128)
    algorithm = AdaSAP(AdaSAPConfig(target_sparsity=0.5, adaptive_epochs=1, finetune_epochs=0))
    seen = {}
    original = algorithm._train_epoch

    def spy(phase, epoch, model, loader, optimizer, bar):
        stats = original(phase, epoch, model, loader, optimizer, bar)
        for name, layer in prunable_layers(model):
            seen[name] = optimizer.state[layer.weight]["channel_rho"].clone()
        seen["groups"] = coupled_channel_groups(model, next(iter(loader))[0][:1])
        return stats

    algorithm._train_epoch = spy
    algorithm.fit(model, loader, progress=False)
    groups = seen["groups"]
    assert groups, "ResNet-18 has residual sums: some channels must be tied"
    for group in groups:
        radii = [seen[name] for name in group]
        assert all(torch.equal(r, radii[0]) for r in radii), group
        # not a constant: the group's scores single out some channels
        assert radii[0].max() > radii[0].min()


def _asam_prune(**overrides) -> AsamPruneConfig:
    base = dict(target_sparsity=0.5, adaptive_epochs=1, finetune_epochs=1, rho=0.3)
    base.update(overrides)
    return AsamPruneConfig(**base)


def test_asam_prune_is_adasap_with_one_radius():
    # AdaSAP with rho_min = rho_max = rho gives every channel (and every other parameter) the radius rho:
    # exactly asam_prune's uniform ASAM, so the two runs must agree to the bit -- the only difference
    # between the methods is the adaptive radii.
    control = AsamPrune(_asam_prune()).fit(pretrained_model(), train_loader(), progress=False)
    adasap = AdaSAP(AdaSAPConfig(target_sparsity=0.5, adaptive_epochs=1, finetune_epochs=1, rho_min=0.3,
                                 rho_max=0.3)).fit(pretrained_model(), train_loader(), progress=False)
    control_state, adasap_state = control.model.state_dict(), adasap.model.state_dict()
    assert control_state.keys() == adasap_state.keys()
    for key in control_state:
        assert torch.equal(control_state[key], adasap_state[key]), key
    assert [r["phase"] for r in control.history] == ["adaptive", "finetune"]
    assert "rho_spread" not in control.history[0]


def test_asam_prune_uses_one_radius_and_prunes_as_adasap():
    algorithm = AsamPrune(_asam_prune(rho=0.7))
    seen = {}
    original = algorithm._train_epoch

    def spy(phase, epoch, model, loader, optimizer, bar):
        if phase == "adaptive":
            seen["channel_rho"] = [optimizer.state[p].get("channel_rho") for p in model.parameters()]
            seen["rho"] = {group["rho"] for group in optimizer.param_groups}
        return original(phase, epoch, model, loader, optimizer, bar)

    algorithm._train_epoch = spy
    result = algorithm.fit(pretrained_model(), train_loader(), val_loader=eval_loader(), progress=False)
    assert seen["rho"] == {0.7} and all(rho is None for rho in seen["channel_rho"])
    assert abs(channel_sparsity(result.model) - 0.5) < 0.01
    assert result.summary["val_accuracy"] > CHANCE + 0.4
    assert result.compact_model is not None and result.summary["params_compact"] < result.summary["params_dense"]
    for name, layer in prunable_layers(result.model):
        mask = layer.weight_mask.reshape(layer.weight.shape[0], -1)
        assert (mask.all(dim=1) | ~mask.any(dim=1)).all(), name


def test_asam_prune_resume_is_bitwise_identical():
    assert_resume_identical(lambda: AsamPrune(_asam_prune(adaptive_epochs=2)), 1)


def test_asam_prune_is_the_studys_adasap_control():
    from sparsesam.algorithms.registry import KNOWN
    from sparsesam.study.plan import BUDGETS, COMPARISONS, method_config
    from sparsesam.algorithms import ALGORITHMS
    assert ALGORITHMS["asam_prune"] is AsamPrune and "asam_prune" in KNOWN
    comparison = COMPARISONS["adasap"]
    assert comparison.labels == ("adasap", "asam_prune", "magnitude")
    assert [(a.method, a.control) for a in comparison.ablations] == [("adasap", "asam_prune")]
    budgets = {name: values[0] for name, values in BUDGETS.items()}
    config = method_config(comparison, comparison.method("asam_prune"), 0.7, AsamPrune, 1, budgets)
    assert config.adaptive_epochs == config.finetune_epochs == budgets["algo_epochs"]
    assert (config.target_sparsity, config.seed, config.adaptive) == (0.7, 1, True)
