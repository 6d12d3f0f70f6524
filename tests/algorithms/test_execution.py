"""What runs where: fixed-mask phases in the config's execution form, channel-pruned fine-tuning on the
compacted model, and resuming either bit for bit."""
import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from algorithm_problems import assert_resume_identical, pretrained_model, train_loader
from sparsesam.algorithms import (AdaSAP, AdaSAPConfig, CSAM, CSAMConfig, HARP, HARPConfig, Hydra, HydraConfig,
                                  Magnitude, MagnitudeConfig, SamPrune, SamPruneConfig, _compacted)
from sparsesam.algorithms._execution import example_batch, settle_execution
from sparsesam.nn import execution_summary, masked_layers, sparsify
from sparsesam.pruning import channel_prune, coupled_channel_groups, gate_pruned_channels, magnitude_prune
from tolerance import assert_within_torch_error

pytest.importorskip("sklearn", reason="the digits problem ships with scikit-learn")

QUICK = {
    "magnitude": lambda **kw: Magnitude(MagnitudeConfig(target_sparsity=0.8, finetune_epochs=1, **kw)),
    "hydra": lambda **kw: Hydra(HydraConfig(target_sparsity=0.8, search_epochs=1, finetune_epochs=1, loss="clean",
                                            **kw)),
    "harp": lambda **kw: HARP(HARPConfig(target_sparsity=0.8, search_epochs=1, finetune_epochs=1, loss="clean",
                                         **kw)),
    "csam": lambda **kw: CSAM(CSAMConfig(target_sparsity=0.8, mask_epochs=1, finetune_epochs=1, **kw)),
    "sam_prune": lambda **kw: SamPrune(SamPruneConfig(target_sparsity=0.8, sam_epochs=1, finetune_epochs=1, **kw)),
}


def _record_forms(algorithm):
    """Wrap the algorithm's epoch so that it notes the layers' forms and parameter count while training."""
    seen = []
    train_epoch = algorithm._train_epoch

    def spy(phase, epoch, model, loader, optimizer, bar):
        seen.append((phase, execution_summary(model, formats=True), sum(p.numel() for p in model.parameters())))
        return train_epoch(phase, epoch, model, loader, optimizer, bar)

    algorithm._train_epoch = spy
    return seen


@pytest.mark.parametrize("name", sorted(QUICK))
def test_every_fixed_mask_phase_runs_sparse_when_asked(name):
    algorithm = QUICK[name](execution="sparse")
    seen = _record_forms(algorithm)
    result = algorithm.fit(pretrained_model(), train_loader(size=128), progress=False)
    finetune = [forms for phase, forms, _ in seen if phase == "finetune"]
    assert finetune, "the fine-tuning phase did not run"
    assert all(form != "dense" for form in finetune[0].values()), finetune[0]
    assert result.summary["execution"]["finetune"] == finetune[0]
    # The other phases change their masks at every step: dense.
    for phase, forms, _ in seen:
        if phase != "finetune":
            assert all(form == "dense" for form in forms.values()), (phase, forms)
    # The result is the masked model in dense form (what exports and summaries read).
    assert set(execution_summary(result.model).values()) == {"dense"}
    assert abs(result.summary["sparsity"] - result.history[-1]["sparsity"]) < 1e-12


def test_dense_execution_keeps_every_layer_dense():
    algorithm = QUICK["magnitude"](execution="dense")
    seen = _record_forms(algorithm)
    algorithm.fit(pretrained_model(), train_loader(size=128), progress=False)
    assert all(form == "dense" for form in seen[0][1].values())


@pytest.mark.parametrize("name", ["magnitude", "hydra", "sam_prune"])
@pytest.mark.parametrize("execution", ["sparse", "auto"])
def test_resume_in_sparse_form_is_bitwise_identical(name, execution):
    # magnitude: interrupted inside fine-tuning; hydra / sam_prune: at the boundary (the resumed run converts).
    stop_after = {"magnitude": 1, "hydra": 1, "sam_prune": 1}[name]
    if name == "magnitude":
        make = lambda: Magnitude(MagnitudeConfig(target_sparsity=0.8, finetune_epochs=2, execution=execution))
    elif name == "hydra":
        make = lambda: Hydra(HydraConfig(target_sparsity=0.8, search_epochs=1, finetune_epochs=2, loss="clean",
                                         execution=execution))
    else:
        make = lambda: SamPrune(SamPruneConfig(target_sparsity=0.8, sam_epochs=1, finetune_epochs=2,
                                               execution=execution))
    assert_resume_identical(make, stop_after)


def test_resume_mid_finetune_in_sparse_form_restores_the_forms():
    make = lambda: Hydra(HydraConfig(target_sparsity=0.8, search_epochs=1, finetune_epochs=3, loss="clean",
                                     execution="sparse"))
    assert_resume_identical(make, 2)


def _pruned_small_cnn():
    model = pretrained_model()
    sparsify(model)
    magnitude_prune(model, 0.9, scope="global")
    return model


def _values_grad_as_dense(layer, dense_layer):
    """The sparse layer's values gradient, placed in its dense weight (row-major CSR order)."""
    mask = dense_layer.weight_mask.detach().reshape(dense_layer.weight.shape[0], -1) != 0
    out = torch.zeros_like(dense_layer.weight).reshape(mask.shape)
    out[mask] = layer.values.grad
    return out.reshape(dense_layer.weight.shape)


@pytest.mark.parametrize("execution", ["auto", "sparse"])
def test_automatic_execution_gives_dense_outputs_and_gradients(execution):
    dense = _pruned_small_cnn().train()
    converted = copy.deepcopy(dense)
    x, y = example_batch(train_loader())[:32], torch.arange(32) % 10
    forms = settle_execution(converted, execution, x)
    if execution == "sparse":
        assert all(form != "dense" for form in forms.values()), forms
    reference = copy.deepcopy(dense).double()
    outputs = {}
    for key, model in (("dense", dense), ("converted", converted), ("float64", reference)):
        inp = x.clone().to(next(model.parameters()).dtype).requires_grad_(True)
        loss = F.cross_entropy(model(inp), y)
        loss.backward()
        outputs[key] = (model(inp.detach()).detach(), inp.grad)
    for what, index in (("logits", 0), ("input gradient", 1)):
        assert_within_torch_error(what, outputs["converted"][index], outputs["dense"][index],
                                  outputs["float64"][index], reduction_size=288)
    dense_layers = dict(masked_layers(dense))
    reference_layers = dict(masked_layers(reference))
    modules = dict(converted.named_modules())
    for name, layer in dense_layers.items():
        mask = layer.weight_mask.detach()
        ours = modules[name]
        grad = ours.weight.grad * ours.weight_mask if forms[name] == "dense" else _values_grad_as_dense(ours, layer)
        assert_within_torch_error(f"{name} weight gradient", grad, layer.weight.grad * mask,
                                  reference_layers[name].weight.grad * mask.double(), reduction_size=512)
        if layer.bias is not None:
            assert_within_torch_error(f"{name} bias gradient", ours.bias.grad, layer.bias.grad,
                                      reference_layers[name].bias.grad, reduction_size=512)


def test_bad_execution_is_named():
    with pytest.raises(ValueError, match="execution"):
        MagnitudeConfig(execution="fast")


# --------------------------------------------------------------- channel pruning: the compacted model trains
needs_torch_pruning = pytest.mark.skipif(importlib.util.find_spec("torch_pruning") is None,
                                         reason="compaction needs torch-pruning")


def _channel_pruned(fraction=0.5):
    model = pretrained_model()
    sparsify(model)
    example = example_batch(train_loader())[:1]
    channel_prune(model, fraction, criterion="l2", scope="layer", coupled=coupled_channel_groups(model, example))
    gate_pruned_channels(model, example)
    return model, example


@needs_torch_pruning
@pytest.mark.parametrize("make", [
    lambda: AdaSAP(AdaSAPConfig(target_sparsity=0.5, adaptive_epochs=1, finetune_epochs=1)),
    lambda: Magnitude(MagnitudeConfig(target_sparsity=0.5, finetune_epochs=1, granularity="channel")),
    lambda: SamPrune(SamPruneConfig(target_sparsity=0.5, sam_epochs=1, finetune_epochs=1, granularity="channel")),
], ids=["adasap", "magnitude", "sam_prune"])
def test_channel_pruned_finetuning_trains_the_compacted_model(make):
    algorithm = make()
    seen = _record_forms(algorithm)
    dense_params = sum(p.numel() for p in pretrained_model().parameters())
    result = algorithm.fit(pretrained_model(), train_loader(size=128), progress=False)
    finetune_params = [count for phase, _, count in seen if phase == "finetune"]
    assert finetune_params and finetune_params[0] == result.summary["trained_compacted"]["params_after"]
    assert finetune_params[0] < 0.5 * dense_params
    # Expanded back: the original architecture, and the same function as the reported compact model.
    assert sum(p.numel() for p in result.model.parameters() if p.dim() > 0) >= dense_params
    assert result.summary["params_compact"] == result.summary["trained_compacted"]["params_after"]
    x = example_batch(train_loader())
    result.model.eval(), result.compact_model.eval()
    with torch.no_grad():
        assert torch.allclose(result.model(x), result.compact_model(x), atol=1e-5, rtol=1e-5)


@needs_torch_pruning
def test_compacted_step_equals_the_masked_gated_step():
    """One SGD step (momentum, weight decay) on the compacted model = the step on the masked gated model."""
    masked, example = _channel_pruned()
    compact = copy.deepcopy(masked)
    record = _compacted.compact_in_place(compact, example)
    assert sum(p.numel() for p in compact.parameters()) == record["params_after"] < record["params_before"]
    x, y = example_batch(train_loader()), torch.arange(64) % 10
    for model in (masked, compact):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        for _ in range(2):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    _compacted.expand_in_place(compact, record, example)
    masked.eval(), compact.eval()
    with torch.no_grad():
        assert torch.allclose(masked(x), compact(x), atol=1e-5, rtol=1e-4)
    layers = dict(masked_layers(compact))
    for name, layer in masked_layers(masked):
        keep = layer.weight_mask.reshape(layer.weight.shape[0], -1).any(dim=1)
        assert torch.equal(keep, layers[name].weight_mask.reshape(keep.shape[0], -1).any(dim=1)), name
        # Input channels compaction removed multiply a zero input: only the kept ones are compared.
        columns = record["kept"].get(name, {}).get("1", list(range(layer.weight.shape[1])))
        ours, theirs = layer.weight[keep][:, columns], layers[name].weight[keep][:, columns]
        assert torch.allclose(ours, theirs, atol=1e-6), name


@needs_torch_pruning
def test_rebuilt_compact_structure_loads_the_compacted_state():
    model, example = _channel_pruned()
    fresh = copy.deepcopy(model)
    record = _compacted.compact_in_place(model, example)
    _compacted.rebuild_compact(fresh, record, example)
    fresh.load_state_dict(model.state_dict())  # strict: same keys, same shapes
    x = example_batch(train_loader())
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


@needs_torch_pruning
def test_channel_pruned_resume_rebuilds_the_compacted_model():
    assert_resume_identical(lambda: AdaSAP(AdaSAPConfig(target_sparsity=0.5, adaptive_epochs=1, finetune_epochs=2)),
                            2)


@needs_torch_pruning
def test_a_dead_channel_compaction_keeps_stays_masked_and_dead():
    """A layer pruned entirely keeps one channel in the compacted model (so it does not vanish): that channel
    stays masked and gated there, so training cannot revive it, and expanding gives back the original masks."""
    model, example = _channel_pruned()
    dict(masked_layers(model))["features.7"].weight_mask.zero_()
    compact = copy.deepcopy(model)
    record = _compacted.compact_in_place(compact, example)
    assert record["still_masked"] == ["features.7"]
    x, y = example_batch(train_loader()), torch.arange(64) % 10
    for m in (model, compact):
        m.train()
        optimizer = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(m(x), y).backward()
            optimizer.step()
    _compacted.expand_in_place(compact, record, example)
    masks = {name: layer.weight_mask for name, layer in masked_layers(compact)}
    for name, layer in masked_layers(model):
        assert torch.equal(layer.weight_mask, masks[name]), name
    model.eval(), compact.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), compact(x), atol=1e-5, rtol=1e-4)
