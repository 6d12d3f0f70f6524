"""HARP as intellisec/harp runs it: the rate parametrisation and its init, the hardware loss (positive at the
start, parameters or FLOPs), gamma = (epoch + 1) * gamma0 frozen where the loss reaches 0, the target reached
through the loss, BatchNorm training in the search, the three granularities, resume."""

import math

import pytest
import torch

from algorithm_problems import (CHANCE, assert_history_finite, assert_resume_identical, eval_loader, pretrained_model,
                                train_loader)
from sparsesam.algorithms import HARP, HARPConfig, LearnableRate, rate_init
from sparsesam.nn import masked_layers
from sparsesam.pruning import is_nm_sparse
from sparsesam.pruning._common import output_layer_name

pytest.importorskip("sklearn", reason="the digits problem ships with scikit-learn")


def cheap(**overrides) -> HARPConfig:
    # gamma0 and the start are the tiny problem's (10 steps an epoch, where CIFAR has 391): a few epochs reach
    # the target. The defaults (gamma0 = 0.01, start at min(1, 10 k)) are the official ones.
    base = dict(target_sparsity=0.8, search_epochs=3, finetune_epochs=1, loss="pgd_at", eps=0.03, attack_steps=1,
                gamma=0.5, initial_keep=0.5)
    base.update(overrides)
    return HARPConfig(**base)


def search_records(result):
    return [r for r in result.history if r["phase"] == "search"]


def test_defaults_are_the_official_cifar_ones():
    c = HARPConfig()
    assert (c.score_lr, c.finetune_lr, c.momentum, c.weight_decay, c.cosine) == (0.1, 0.1, 0.9, 5e-4, True)
    assert (c.gamma, c.alpha, c.search_epochs, c.finetune_epochs) == (0.01, 0.1, 20, 100)
    assert HARP(HARPConfig(target_sparsity=0.99)).initial_keep == pytest.approx(0.1)  # 010_uni for k = 0.01
    assert HARP(HARPConfig(target_sparsity=0.9)).initial_keep == pytest.approx(1.0)


def test_learnable_rate_is_rate_act_func_started_by_rate_init_func():
    rate = LearnableRate(0.3, k_min=0.05)
    assert rate.p.dtype == torch.float32  # the official k_score
    assert rate().item() == pytest.approx(0.3)
    with torch.no_grad():
        rate.p.fill_(0.0)
    assert rate().item() == pytest.approx(0.5 * 0.95 + 0.05)  # sigmoid(p) (1 - k_min) + k_min
    with torch.no_grad():
        rate.p.fill_(-50.0)
    assert rate().item() == pytest.approx(0.05)  # k_min
    # rate_init_func clips sigmoid's value to 1 - 1e-2: a start at 1 is 0.99 (1 - k_min) + k_min.
    assert rate_init(1.0, 0.01) == pytest.approx(math.log(0.99 / 0.01))
    assert LearnableRate(1.0, 0.01)().item() == pytest.approx(0.99 * 0.99 + 0.01)
    with pytest.raises(ValueError, match="rate must be > k_min"):
        rate_init(0.01, 0.05)
    with pytest.raises(ValueError, match="initial_keep must be > k_min"):
        HARPConfig(target_sparsity=0.8, initial_keep=0.01)
    with pytest.raises(ValueError, match="hardware_cost='flops' counts channels"):
        HARPConfig(hardware_cost="flops")


def test_hardware_loss_is_positive_at_the_start_and_pushes_rates_down():
    algorithm = HARP(cheap(target_sparsity=0.75, initial_keep=None))
    algorithm._restructure("search", pretrained_model(), train_loader())
    start = 0.99 * (1 - 0.025) + 0.025  # min(1, 10 * 0.25) = 1, clipped by rate_init_func; k_min = 0.1 * 0.25
    assert algorithm.current_rate().item() == pytest.approx(start, rel=1e-6)
    assert algorithm.target_rate() == 0.25
    loss = algorithm.hardware_loss()
    assert loss.item() == pytest.approx(start / 0.25 - 1.0, rel=1e-6) and loss.item() > 0
    (algorithm.gamma(0) * loss).backward()
    for rate in algorithm.rates.values():
        assert rate.p.grad > 0  # gradient descent lowers every rate
        assert rate.k_min == pytest.approx(0.1 * 0.25)
    for rate in algorithm.rates.values():
        rate.set_rate(0.2)
    assert algorithm.hardware_loss().item() == 0.0  # below the target: no pull either way


def test_gamma_grows_with_the_epoch_and_freezes_where_the_loss_reaches_zero():
    result = HARP(cheap(search_epochs=6, finetune_epochs=0, loss="clean", gamma=0.2)).fit(
        pretrained_model(), train_loader(), progress=False)
    search = search_records(result)
    assert search[0]["hw_loss"] > 0
    frozen_at = next(r["epoch"] for r in search if round(r["hw_loss"], 4) == 0.0)
    assert frozen_at >= 1, "the loss must take more than one epoch to reach 0 for the test to see gamma grow"
    for r in search:
        expected = 0.2 * (min(r["epoch"], frozen_at) + 1)  # (epoch + 1) gamma0, then the frozen value
        assert r["gamma"] == pytest.approx(expected)
    assert frozen_at < len(search) - 1, "the test must see epochs after the freeze"
    assert result.summary["frozen_gamma"] == pytest.approx(0.2 * (frozen_at + 1))
    # Frozen once: a later rise of the loss does not unfreeze it.
    algorithm = HARP(cheap())
    algorithm.frozen_gamma = 0.3
    assert algorithm.gamma(10) == 0.3


def test_the_target_is_reached_through_the_loss():
    def search(gamma):
        config = cheap(search_epochs=4, finetune_epochs=0, loss="clean", gamma=gamma)
        return HARP(config).fit(pretrained_model(), train_loader(), progress=False)

    pulled, free = search(0.5), search(1e-4)
    last = search_records(pulled)[-1]
    assert last["kept"] <= 0.2 * (1 + 1e-4)  # the rates got there by themselves: nothing rescales them
    assert pulled.summary["sparsity"] >= 0.8 - 0.01
    # Without the loss's pull the same search stays above the target, and nothing fixes it afterwards.
    assert search_records(free)[-1]["hw_loss"] > 0.5
    assert free.summary["sparsity"] < 0.6


@pytest.mark.parametrize("loss", ["pgd_at", "trades", "mart"])
def test_harp_unstructured_prunes_and_records_the_hardware_loss(loss):
    result = HARP(cheap(loss=loss)).fit(pretrained_model(), train_loader(), val_loader=eval_loader(), progress=False)
    assert result.summary["sparsity"] > 0.7
    assert result.summary["val_accuracy"] > CHANCE + 0.3
    assert_history_finite(result.history, 4)
    search = search_records(result)
    assert all({"gamma", "kept", "hw_loss", "target"} <= set(r) for r in search)
    assert search[0]["gamma"] == 0.5
    assert set(result.summary["learnt_keep_rates"]) == set(result.summary["layer_sparsity"])
    for _, layer in masked_layers(result.model):  # the mask is fixed for fine-tuning
        assert layer.mask_mode == "fixed"


def test_search_freezes_conv_and_linear_weights_and_trains_batchnorm():
    model = pretrained_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    HARP(cheap(search_epochs=1, finetune_epochs=0)).fit(model, train_loader(), progress=False)
    after = model.state_dict()
    layers = dict(masked_layers(model))
    for name in layers:
        for kind in ("weight", "bias"):
            if f"{name}.{kind}" in before:
                assert torch.equal(after[f"{name}.{kind}"], before[f"{name}.{kind}"]), name
    # freeze_vars leaves BatchNorm alone: its affine parameters learn, its statistics update.
    for key in ("features.1.weight", "features.1.bias", "features.1.running_mean"):
        assert not torch.equal(after[key], before[key]), key


def _count_flops_conv(h, w, cin, cout, k, stride=1, padding=1):
    # utils/hw.py count_flops_conv with bias and activation, written out.
    out = ((h - k + 2 * padding) / stride + 1) * ((w - k + 2 * padding) / stride + 1)
    return cout * out * (2 * k * k * cin - 1) + 2 * cout * out


def _count_flops_dense(cin, cout):
    return (2 * cin - 1) * cout + 2 * cout


def test_channel_flops_cost_is_the_official_formula():
    # SmallCNN(width=8) on 1x8x8 digits: conv 1->8, 8->8 at 8x8; pool; conv 8->16, 16->16 at 4x4; pool;
    # linear 64->32, 32->10 (the classifier: unscored, its classes whole).
    algorithm = HARP(cheap(granularity="channel", target_sparsity=0.5))
    algorithm._restructure("search", pretrained_model(), train_loader())
    rates = {"features.0": 0.9, "features.3": 0.6, "features.7": 0.75, "features.10": 0.3, "classifier.1": 0.45}
    for name, value in rates.items():
        algorithm.rates[name].set_rate(value)
    r = {name: algorithm.rates[name]().item() for name in rates}

    def network(r0, r3, r7, r10, r1, rounded=False):
        c = (lambda x: round(x)) if rounded else (lambda x: x)
        return (_count_flops_conv(8, 8, 1, c(8 * r0), 3) + _count_flops_conv(8, 8, c(8 * r0), c(8 * r3), 3)
                + _count_flops_conv(4, 4, c(8 * r3), c(16 * r7), 3) + _count_flops_conv(4, 4, c(16 * r7), c(16 * r10), 3)
                + _count_flops_dense(c(64 * r10), c(32 * r1)) + _count_flops_dense(c(32 * r1), 10))

    total = network(1, 1, 1, 1, 1)
    current = network(r["features.0"], r["features.3"], r["features.7"], r["features.10"], r["classifier.1"])
    assert algorithm.current_rate().item() == pytest.approx(current / total, rel=1e-6)
    assert algorithm.target_rate() == pytest.approx(network(0.5, 0.5, 0.5, 0.5, 0.5, rounded=True) / total)
    assert algorithm.hardware_loss().item() == pytest.approx(max(0.0, current / total / algorithm.target_rate() - 1),
                                                             rel=1e-6)


def test_harp_channel_granularity_prunes_whole_channels_by_flops():
    # Channel rates get the summed mask gradient of whole layers: a milder target than the unstructured tests'.
    result = HARP(cheap(granularity="channel", target_sparsity=0.3, loss="clean", initial_keep=0.8)).fit(
        pretrained_model(), train_loader(), val_loader=eval_loader(), progress=False)
    search = search_records(result)
    assert search[0]["hw_loss"] > 0
    assert search[-1]["kept"] <= search[-1]["target"] * (1 + 1e-4)  # the FLOPs fraction reaches the target
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


@pytest.mark.parametrize("stop_after", [1, 2, 3])
def test_harp_resume_is_bitwise_identical(stop_after):
    # 1, 2: inside the search (scores, rates, momentum and the frozen gamma restored); 3: at the boundary (freeze).
    assert_resume_identical(lambda: HARP(cheap(target_sparsity=0.7, loss="clean")), stop_after)


def test_harp_search_learns_which_and_how_many():
    def run(search_epochs):
        config = cheap(target_sparsity=0.8, search_epochs=search_epochs, finetune_epochs=0, loss="clean")
        return HARP(config).fit(pretrained_model(), train_loader(), progress=False)

    start, searched = run(0), run(3)  # no search: the magnitude masks of the init at the initial rate
    changed = sum(int((layer.weight_mask != dict(masked_layers(start.model))[name].weight_mask).sum())
                  for name, layer in masked_layers(searched.model))
    assert changed > 0
    rates = searched.summary["learnt_keep_rates"].values()
    assert max(rates) - min(rates) > 0.05  # per-layer rates, not one uniform rate


def test_harp_channel_resume_is_bitwise_identical():
    # Channel scores are [C, 1, 1, 1] tensors in the mask's place: they must load into a fresh model.
    assert_resume_identical(lambda: HARP(cheap(granularity="channel", target_sparsity=0.3, loss="clean",
                                               initial_keep=0.8)), 1)


class _Residual(torch.nn.Module):
    """conv a -> conv b, a + b -> conv c (stride 2) -> pool -> linear: a residual sum feeds c."""

    def __init__(self, data_dependent=False):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.c = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(6, 5)
        self.data_dependent = data_dependent

    def forward(self, x):
        a = torch.relu(self.a(x))
        h = a + self.b(a)
        if self.data_dependent and bool(h.sum() > 0):  # fx cannot trace this
            h = h * 1.0
        return self.fc(self.c(h).mean(dim=(2, 3)))


@pytest.mark.parametrize("data_dependent", [False, True])
def test_flops_cost_follows_the_traced_graph(data_dependent):
    from sparsesam import sparsify
    from sparsesam.algorithms._hardware_cost import HardwareCost, trace_layer_shapes

    model = sparsify(_Residual(data_dependent))
    shapes = trace_layer_shapes(model, torch.randn(2, 3, 8, 8), ["a", "b", "c", "fc"])
    assert (shapes["c"].height, shapes["c"].stride, shapes["fc"].kernel_size) == (8.0, 2, None)
    cost = HardwareCost("flops", shapes, ["a", "b", "c"])
    r = {"a": torch.tensor(0.5), "b": torch.tensor(0.25), "c": torch.tensor(0.5)}
    if data_dependent:
        # Untraceable: the producer is the previous layer in execution order (the official rule).
        assert [shapes[n].producers for n in ("a", "b", "c", "fc")] == [[], ["a"], ["b"], ["c"]]
        c_in = 4 * 0.25
    else:
        # Traced: c reads the sum a + b, so its input channels keep the producers' mean rate.
        assert sorted(shapes["c"].producers) == ["a", "b"] and shapes["fc"].producers == ["c"]
        c_in = 4 * (0.5 + 0.25) / 2
    expected = (_count_flops_conv(8, 8, 3, 4 * 0.5, 3) + _count_flops_conv(8, 8, 4 * 0.5, 4 * 0.25, 3)
                + _count_flops_conv(8, 8, c_in, 6 * 0.5, 3, stride=2) + _count_flops_dense(6 * 0.5, 5))
    dense = (_count_flops_conv(8, 8, 3, 4, 3) + _count_flops_conv(8, 8, 4, 4, 3)
             + _count_flops_conv(8, 8, 4, 6, 3, stride=2) + _count_flops_dense(6, 5))
    assert cost.kept(r).item() == pytest.approx(expected / dense, rel=1e-6)
