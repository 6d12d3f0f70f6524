"""sparsify / export / masked layers on real models: identity at masks of
ones, state_dict compatibility (dense, ours, torch.nn.utils.prune), export,
torch.compile."""
import pytest
import torch
from torch import nn
import torch.nn.utils.prune as prune

import sparsesam
from sparsesam.models import SmallCNN
from sparsesam.nn import MaskedConv2d, MaskedLinear, masked_layers

torchvision = pytest.importorskip("torchvision")


def _models():
    return {
        "small_cnn": (lambda: SmallCNN(in_channels=1, num_classes=10, width=8), (4, 1, 28, 28)),
        "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64)),
    }


def _outputs_and_grads(model, x):
    out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_mask_of_ones_is_the_original_model(name):
    make, shape = _models()[name]
    model = make().train()
    x = torch.randn(shape)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    ref_out, ref_grads = _outputs_and_grads(model, x)
    model.load_state_dict(dense_state)  # undo the BatchNorm running-stat update

    n_dense = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())
    assert sparsesam.sparsify(model) is model
    assert len(list(masked_layers(model))) == n_dense
    out, grads = _outputs_and_grads(model, x)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()  # same parameter names, no new parameters
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_state_dict_round_trip_and_export(name):
    make, shape = _models()[name]
    model = sparsesam.sparsify(make()).eval()
    for _, layer in masked_layers(model):
        layer.set_mask(torch.rand_like(layer.weight) > 0.7)
    x = torch.randn(shape)
    out = model(x)

    # Our own state_dict: weights and masks round-trip.
    clone = sparsesam.sparsify(make()).eval()
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone(x), out)

    # export: plain layers, W*M baked in, same outputs.
    plain = sparsesam.export(model)
    assert not list(masked_layers(plain))
    assert not any("mask" in k for k in plain.state_dict())
    assert set(plain.state_dict()) == set(make().state_dict())
    torch.testing.assert_close(plain.eval()(x), out, rtol=1e-5, atol=1e-5)
    assert list(masked_layers(model)), "export must not change the model it copies"


def test_dense_checkpoint_loads_into_sparsified_model_and_keeps_mask():
    dense = SmallCNN(width=8)
    model = sparsesam.sparsify(SmallCNN(width=8))
    layer = model.classifier[1]
    layer.set_mask(torch.rand_like(layer.weight) > 0.5)
    kept = layer.weight_mask.clone()
    result = model.load_state_dict(dense.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(layer.weight, dense.classifier[1].weight)
    assert torch.equal(layer.weight_mask, kept)


def test_torch_prune_checkpoint_and_live_model_load():
    pruned = SmallCNN(width=8).eval()
    for module in pruned.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            prune.l1_unstructured(module, "weight", amount=0.6)
    x = torch.randn(2, 1, 28, 28)
    expected = pruned(x)

    model = sparsesam.sparsify(SmallCNN(width=8)).eval()
    result = model.load_state_dict(pruned.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(model(x), expected)
    assert model.classifier[1].sparsity == pytest.approx(0.6, abs=0.01)

    # A live pruned model (forward pre-hooks, weight_orig) converts too.
    live = sparsesam.sparsify(pruned)
    assert not any(hasattr(m, "weight_orig") for m in live.modules())
    torch.testing.assert_close(live(x), expected)


def test_include_exclude_and_untouched_subclasses():
    model = SmallCNN(width=8)
    sparsesam.sparsify(model, include="features.*", exclude=["features.0"])
    names = [n for n, _ in masked_layers(model)]
    assert names == ["features.3", "features.7", "features.10"]

    attn = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16)
    with pytest.warns(UserWarning, match=r"left 1 layer\(s\) dense: self_attn.out_proj"):
        sparsesam.sparsify(attn)
    assert type(attn.self_attn.out_proj) is not MaskedLinear  # read directly by MHA: must stay dense
    assert isinstance(attn.linear1, MaskedLinear)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sparsesam.sparsify("resnet")


def test_trainable_mask_receives_gradient_and_fixed_mask_blocks_it():
    layer = MaskedLinear(6, 4, mask_mode="trainable")
    layer(torch.randn(3, 6)).sum().backward()
    assert layer.weight_mask.grad is not None and layer.weight_mask.grad.abs().sum() > 0

    fixed = MaskedLinear(6, 4)
    fixed.set_mask(torch.arange(24).reshape(4, 6) % 2)
    fixed(torch.randn(3, 6)).sum().backward()
    assert torch.count_nonzero(fixed.weight.grad[~fixed.weight_mask]) == 0
    assert fixed.sparsity == 0.5


@pytest.mark.parametrize("padding, padding_mode", [("same", "zeros"), ("valid", "zeros"), (1, "reflect"), (2, "circular")])
def test_conv_padding_variants_match_nn_conv2d(padding, padding_mode):
    dense = nn.Conv2d(3, 5, 3, padding=padding, padding_mode=padding_mode, dilation=2 if padding == "same" else 1)
    masked = sparsesam.sparsify(nn.Sequential(dense))[0]
    x = torch.randn(2, 3, 9, 9)
    expected = nn.functional.conv2d(
        nn.functional.pad(x, dense._reversed_padding_repeated_twice, mode="constant" if padding_mode == "zeros" else padding_mode),
        dense.weight, dense.bias, dense.stride, 0, dense.dilation,
    )
    torch.testing.assert_close(masked(x), expected)


def test_bad_mask_arguments():
    layer = MaskedConv2d(3, 4, 3)
    with pytest.raises(ValueError, match="mask has shape"):
        layer.set_mask(torch.ones(4, 3, 3))
    with pytest.raises(ValueError, match="mask contains NaN"):
        layer.set_mask(torch.full((4, 3, 3, 3), float("nan")))
    with pytest.raises(ValueError, match="mask_mode must be one of"):
        MaskedLinear(2, 2, mask_mode="soft")


@pytest.mark.parametrize("mask_mode", ["fixed", "trainable"])
@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
def test_masks_must_be_finite(mask_mode, value):
    layer = MaskedLinear(3, 2, mask_mode=mask_mode)
    before = layer.weight_mask.detach().clone()
    bad = torch.ones(2, 3)
    bad[1, 2] = value
    with pytest.raises(ValueError, match="mask contains NaN or inf .*: a mask must be finite"):
        layer.set_mask(bad)
    assert torch.equal(layer.weight_mask.detach(), before)
    # A checkpoint holding such a mask is refused too (fixed masks would keep NaN/inf entries as "kept").
    state = {"weight": torch.randn(2, 3), "bias": torch.zeros(2), "weight_mask": bad}
    with pytest.raises(RuntimeError, match="weight_mask contains NaN or inf"):
        layer.load_state_dict(state)


def test_sparsify_refuses_a_non_finite_torch_prune_mask_and_leaves_the_model_alone():
    model = SmallCNN(width=8)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            prune.l1_unstructured(module, "weight", amount=0.5)
    last = model.classifier[1]
    last.weight_mask[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"classifier\.1\.weight_mask \(torch.nn.utils.prune\) contains NaN or inf"):
        sparsesam.sparsify(model)
    assert not list(masked_layers(model))                       # nothing was swapped
    assert all(hasattr(m, "weight_orig") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


@pytest.mark.parametrize("argument", ["include", "exclude"])
@pytest.mark.parametrize("selector, words", [(123, "must be a glob pattern"), (b"features.*", "must be a glob pattern"),
                                             (["features.*", 7], "must hold glob patterns")])
def test_sparsify_selectors_of_the_wrong_type_name_the_argument(argument, selector, words):
    model = SmallCNN(width=8)
    with pytest.raises(TypeError, match=f"{argument} {words}"):
        sparsesam.sparsify(model, **{argument: selector})
    assert not list(masked_layers(model))


def test_sparsify_reads_a_generator_of_patterns_for_every_layer():
    model = SmallCNN(width=8)
    sparsesam.sparsify(model, include=(p for p in ["features.0", "features.3"]))
    assert [n for n, _ in masked_layers(model)] == ["features.0", "features.3"]


def test_sparsify_refuses_an_unknown_mask_mode_before_changing_anything():
    model = SmallCNN(width=8)
    with pytest.raises(ValueError, match="mask_mode must be one of"):
        sparsesam.sparsify(model, mask_mode="soft")
    assert not list(masked_layers(model))


def test_torch_compile_matches_eager():
    model = sparsesam.sparsify(SmallCNN(width=8)).eval()
    for _, layer in masked_layers(model):
        layer.set_mask(torch.rand_like(layer.weight) > 0.5)
    x = torch.randn(3, 1, 28, 28, requires_grad=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    eager_out = model(x)
    compiled_out = compiled(x)
    torch.testing.assert_close(compiled_out, eager_out)
    (g_eager,) = torch.autograd.grad(eager_out.sum(), x)
    (g_compiled,) = torch.autograd.grad(compiled(x).sum(), x)
    torch.testing.assert_close(g_compiled, g_eager)
