"""The model zoo: shapes for every model x channels x image size, paper sizes, sparsify,
torch-pruning channel pruning to a physically smaller model, the registry's errors."""
import copy

import pytest
import torch
from torch import nn

import sparsesam
from sparsesam.models import MODELS, Normalize, ResNet18, SmallCNN, build_model, output_layer, with_normalization
from sparsesam.nn import masked_layers
from sparsesam.pruning import global_sparsity, magnitude_prune

NAMES = sorted(MODELS)
# Narrow enough that every test runs in seconds on two cores.
TEST_WIDTH = 0.25


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_has_every_documented_model():
    assert set(MODELS) == {"resnet18", "googlenet", "mobilenetv2", "vgg16bn", "smallcnn"}


@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_gradients(name, in_channels, size):
    model = build_model(name, in_channels, 10, width=TEST_WIDTH, image_size=size).train()
    x = torch.rand(3, in_channels, size, size)
    out = model(x)
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    assert model(x).shape == (3, 10)


@pytest.mark.parametrize("name", NAMES)
def test_any_number_of_classes(name):
    model = build_model(name, 2, 7, width=TEST_WIDTH, image_size=32).eval()
    assert model(torch.rand(2, 2, 32, 32)).shape == (2, 7)
    assert output_layer(model).out_features == 7


# Parameter counts of the CIFAR-style nets with 3 input channels and 10 classes, as the pruning
# papers report them (ResNet-18 11.2 M, GoogLeNet 6.2 M, MobileNet-V2 2.2 M, VGG-16-bn 14.7 M).
@pytest.mark.parametrize("name,millions", [("resnet18", 11.2), ("googlenet", 6.2), ("mobilenetv2", 2.2),
                                           ("vgg16bn", 14.7)])
def test_width_one_is_the_papers_model(name, millions):
    n = _n_params(build_model(name, 3, 10))
    assert abs(n / 1e6 - millions) < 0.05 * millions, n


@pytest.mark.parametrize("name", NAMES)
def test_width_scales_the_model(name):
    sizes = [_n_params(build_model(name, 3, 10, width=w)) for w in (0.125, 0.25, 0.5)]
    assert sizes[0] < sizes[1] < sizes[2]


def test_resnet18_width_keeps_its_channel_meaning():
    # ResNet18(width=...) counts stem channels (existing API); build_model's width multiplies 64.
    assert _n_params(build_model("resnet18", 3, 10, width=0.25)) == _n_params(ResNet18(3, 10, width=16))
    assert _n_params(build_model("resnet18", 3, 10, width=0.25, blocks=(1, 1, 1, 1))) == \
        _n_params(ResNet18(3, 10, width=16, blocks=(1, 1, 1, 1)))
    assert _n_params(build_model("smallcnn", 1, 10, width=0.5, image_size=28)) == \
        _n_params(SmallCNN(1, 10, width=16, image_size=28))


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_weights(name):
    torch.manual_seed(3)
    a = build_model(name, 3, 10, width=TEST_WIDTH).state_dict()
    torch.manual_seed(3)
    b = build_model(name, 3, 10, width=TEST_WIDTH).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", NAMES)
def test_sparsify_masks_every_layer_and_ones_change_nothing(name):
    model = build_model(name, 3, 10, width=TEST_WIDTH).eval()
    dense = copy.deepcopy(model)
    n_layers = sum(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())
    sparsesam.sparsify(model)
    assert len(list(masked_layers(model))) == n_layers
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)

    magnitude_prune(model, 0.5, scope="layer")
    assert abs(global_sparsity(model) - 0.5) < 0.01
    model.train()
    out = model(x)
    out.square().sum().backward()
    assert torch.isfinite(out).all()
    for _, layer in masked_layers(model):
        # pruned weights get no gradient
        assert not layer.weight.grad[~layer.weight_mask].any()


def _channel_prune(model: nn.Module, example: torch.Tensor, ratio: float = 0.5) -> None:
    tp = pytest.importorskip("torch_pruning")  # in requirements-dev.txt, not a dependency of the package
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[output_layer(model)])
    pruner.step()


@pytest.mark.parametrize("name,in_channels,size", [("resnet18", 3, 32), ("googlenet", 1, 28), ("mobilenetv2", 3, 28),
                                                   ("vgg16bn", 1, 28), ("smallcnn", 3, 32)])
def test_torch_pruning_makes_a_smaller_model_that_still_runs(name, in_channels, size):
    model = build_model(name, in_channels, 10, width=TEST_WIDTH, image_size=size).eval()
    x = torch.rand(2, in_channels, size, size)
    before = _n_params(model)
    _channel_prune(model, x)
    after = _n_params(model)
    # Half of every layer's channels: about a quarter of the parameters remain.
    assert after < 0.4 * before, (before, after)
    assert output_layer(model).out_features == 10
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == in_channels
    model.train()
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    # and the pruned model can still be sparsified
    sparsesam.sparsify(model.eval())
    assert model(x).shape == (2, 10)


def test_normalization_wrapper_takes_unit_range_images():
    mean, std = (0.2, 0.4, 0.6), (0.1, 0.2, 0.3)
    net = build_model("vgg16bn", 3, 10, width=TEST_WIDTH).eval()
    wrapped = with_normalization(net, mean, std).eval()
    x = torch.rand(2, 3, 32, 32)
    normalized = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(wrapped(x), net(normalized))
    assert set(wrapped.state_dict()) >= {"normalize.mean", "normalize.std"}
    # the same wrapper from the registry, and channel pruning through it
    model = build_model("resnet18", 3, 10, width=TEST_WIDTH, normalization=(mean, std)).eval()
    assert isinstance(model.normalize, Normalize)
    before = _n_params(model)
    _channel_prune(model, x)
    assert _n_params(model) < 0.4 * before and model(x).shape == (2, 10)
    # input gradients (what attacks need) flow through the normalisation
    x.requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown model 'resnet50'.*googlenet.*mobilenetv2.*resnet18.*smallcnn.*vgg16bn"):
        build_model("resnet50", 3, 10)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(width=64), r"width is a multiplier"),
    (dict(width=16), r"width is a multiplier"),
    (dict(width=0), r"width must be a positive number"),
    (dict(width=-0.5), r"width must be a positive number"),
    (dict(width="1"), r"width must be a positive number"),
    (dict(in_channels=0), r"in_channels must be a positive int"),
    (dict(num_classes=1.5), r"num_classes must be a positive int"),
    (dict(image_size=0), r"image_size must be a positive int"),
    (dict(normalization=((0.5,), (0.5,))), r"normalization has 1 channel means but in_channels=3"),
])
def test_bad_arguments_are_named(kwargs, pattern):
    args = dict(in_channels=3, num_classes=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        build_model("googlenet", **args)


@pytest.mark.parametrize("mean,std,pattern", [
    ((0.5,), (0.0,), "std must be positive"),
    ((0.5, 0.5), (0.5,), "same length"),
    ((), (), "non-empty"),
    ((float("nan"),), (1.0,), "finite"),
])
def test_normalize_rejects_bad_statistics(mean, std, pattern):
    with pytest.raises(ValueError, match=pattern):
        Normalize(mean, std)


def test_normalize_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"x must be \(N, 3, H, W\)"):
        Normalize((0.5,) * 3, (0.5,) * 3)(torch.rand(2, 1, 8, 8))


def test_output_layer_needs_a_linear():
    with pytest.raises(ValueError, match="no nn.Linear"):
        output_layer(nn.Conv2d(1, 1, 1))
