"""set_execution / resolve_execution / sparsify(execution=...): dense <-> sparse conversion by module
swaps, and the "auto" crossover dispatch. Timings are injected through DispatchCache's timer seam, so
every decision here is deterministic; no test asserts anything about real speed."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import sparsesam
from sparsesam.nn import (BlockSparseLinear, DispatchCache, MaskedConv2d, MaskedLinear, NMSparseLinear, SparseConv2d,
                          CSRLinear, dispatch_cache, execution_summary, resolve_execution, set_dispatch_cache,
                          set_execution)
from sparsesam.nn.dispatch import dispatch_key, time_forms
from sparsesam.nn.execution import _PENDING_AUTO


class FakeTimer:
    """Says which form is faster, and counts the calls."""

    def __init__(self, dense_s: float, sparse_s: float) -> None:
        self.times, self.calls = (dense_s, sparse_s), []

    def __call__(self, forms, x, backward):
        assert list(forms)[0] == "dense" and type(forms["dense"]) in (MaskedLinear, MaskedConv2d)
        assert all(type(m) in (CSRLinear, SparseConv2d) for f, m in forms.items() if f != "dense")
        self.calls.append((type(forms["dense"]).__name__, tuple(x.shape), backward, x.requires_grad))
        return {f: self.times[0] if f == "dense" else self.times[1] for f in forms}


@pytest.fixture
def timer(request):
    """A fresh process-wide cache whose timer says sparse is faster (param: (dense_s, sparse_s))."""
    fake = FakeTimer(*getattr(request, "param", (2.0, 1.0)))
    old = set_dispatch_cache(DispatchCache(timer=fake))
    yield fake
    set_dispatch_cache(old)


def _mlp(mask_mode="fixed", density=0.1, execution="dense", example=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 5)).double()
    sparsesam.sparsify(model, mask_mode=mask_mode, exclude="4")
    for layer in (model[0], model[2]):
        layer.set_mask((torch.rand_like(layer.weight) < density).to(layer.weight_mask.dtype))
    if execution != "dense":
        model = set_execution(model, execution, example=example)
    return model


def _cnn():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2, padding=1),
                          nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2)).double()
    sparsesam.sparsify(model)
    for i in (0, 2, 4):
        model[i].set_mask(torch.rand_like(model[i].weight) < 0.2)
    return model


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _x(batch=7):
    return torch.randn(batch, 20, dtype=torch.float64)


def test_auto_picks_sparse_where_timed_faster(timer):
    model = _mlp()
    x = _x()
    reference = sparsesam.export(model)(x)
    assert set_execution(model, "auto", example=x) is model
    assert execution_summary(model) == {"0": "sparse", "2": "sparse"}  # "4" was left an nn.Linear
    y = model(x)
    assert isinstance(model[0], CSRLinear) and type(model[4]) is nn.Linear
    torch.testing.assert_close(y, reference)
    # fixed-mask layers 0 and 2 (other shapes: two keys) were timed, forward+backward as grad is on
    assert [c[2] for c in timer.calls] == [True, True]


@pytest.mark.parametrize("timer", [(1.0, 2.0)], indirect=True)
def test_auto_picks_dense_where_timed_faster(timer):
    model = _mlp(execution="auto", example=_x())
    assert set(execution_summary(model).values()) == {"dense"}
    assert type(model[0]) is MaskedLinear and not hasattr(model[0], _PENDING_AUTO)  # settled: nothing waits
    assert len(timer.calls) == 2


def test_cache_hit_times_once_per_key(timer):
    x = _x(60)
    _mlp(execution="auto", example=x)
    assert len(timer.calls) == 2 and dispatch_cache().timings_run == 2
    second = _mlp(execution="auto", example=_x(50))  # same batch bucket (33..64): no timing
    assert len(timer.calls) == 2 and execution_summary(second)["0"] == "sparse"
    set_execution(_mlp().eval(), "auto", example=x)  # eval mode times forward only: another situation
    assert len(timer.calls) == 4 and timer.calls[-1][2] is False


def test_key_buckets():
    layer = _mlp()[0]
    x = torch.randn(65, 20)
    key = dispatch_key(layer, x, True)
    assert "linear:30x20" in key and "batch<=128" in key and "float32" in key and "fwd+bwd" in key
    assert dispatch_key(layer, torch.randn(128, 20), True) == key
    assert dispatch_key(layer, torch.randn(129, 20), True) != key
    assert dispatch_key(layer, x, False) != key


def test_cache_persists_to_the_env_file(tmp_path, monkeypatch):
    path = tmp_path / "dispatch.json"
    monkeypatch.setenv("SPARSESAM_DISPATCH_CACHE", str(path))
    old = set_dispatch_cache(None)
    try:
        fake = FakeTimer(2.0, 1.0)
        dispatch_cache().timer = fake
        _mlp(execution="auto", example=_x(4))
        saved = json.loads(path.read_text())
        assert saved["version"] == DispatchCache.VERSION and len(saved["entries"]) == 2
        assert {e["choice"] for e in saved["entries"].values()} == {"csr"}
        set_dispatch_cache(None)  # a "new process": loads the file, times nothing
        again = FakeTimer(1.0, 2.0)
        dispatch_cache().timer = again
        model = _mlp(execution="auto", example=_x(4))
        assert again.calls == [] and execution_summary(model)["0"] == "sparse"
    finally:
        set_dispatch_cache(old)


def test_corrupt_cache_file_is_refused(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"version": DispatchCache.VERSION, "entries": {"k": {"choice": "fast"}}}))
    with pytest.raises(ValueError, match="no valid choice"):
        DispatchCache(str(path))
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="not a sparsesam dispatch cache"):
        DispatchCache(str(path))


def test_cache_of_an_older_version_is_ignored_with_a_warning(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"version": 1, "entries": {"k": {"choice": "sparse", "dense_s": 1, "sparse_s": 0.5}}}))
    with pytest.warns(UserWarning, match="older sparsesam"):
        cache = DispatchCache(str(path))
    assert cache.entries == {}


def test_some_layers_by_module_or_name(timer):
    model = _mlp(execution="auto", example=_x(5))
    x = _x(5)
    y = model(x)
    assert execution_summary(model)["0"] == "sparse"
    set_execution(model, "dense", layers=["0"])
    assert type(model[0]) is MaskedLinear and isinstance(model[2], CSRLinear)
    torch.testing.assert_close(model(x), y)
    set_execution(model, "sparse", layers=[model[0]])
    torch.testing.assert_close(model(x), y)
    assert execution_summary(model) == {"0": "sparse", "2": "sparse"} and len(timer.calls) == 2
    with pytest.raises(ValueError, match="layers names 'nope'"):
        set_execution(model, "dense", layers=["nope"])
    with pytest.raises(TypeError, match="layers must"):
        set_execution(model, "dense", layers=model[0])


def test_dense_sparse_dense_round_trip_is_exact():
    model = _mlp()
    with torch.no_grad():  # the sparse form keeps no pruned weights: they come back as zeros
        for layer in (model[0], model[2]):
            layer.weight.mul_(layer.weight_mask)
    x = torch.randn(9, 20, dtype=torch.float64)
    state, y = {k: v.clone() for k, v in model.state_dict().items()}, model(x)
    classes = [type(m) for m in model]
    rng = torch.get_rng_state()
    assert set_execution(model, "sparse") is model
    assert torch.equal(torch.get_rng_state(), rng)  # the new forms' initialisers left no trace
    assert isinstance(model[0], CSRLinear) and isinstance(model[2], CSRLinear)
    assert "0.values" in model.state_dict() and "0.weight" not in model.state_dict()
    torch.testing.assert_close(model(x), y)
    set_execution(model, "dense")
    assert [type(m) for m in model] == classes  # plain MaskedLinear again, as sparsify makes
    assert _same_state(model.state_dict(), state)
    assert torch.equal(model(x), y)


def test_round_trip_zeroes_pruned_weights_only():
    model = _mlp()
    effective = model[0].effective_weight().detach().clone()
    set_execution(set_execution(model, "sparse"), "dense")
    assert torch.equal(model[0].weight, effective) and torch.equal(model[0].effective_weight(), effective)


def test_conversion_keeps_hooks_bias_and_training_mode():
    model = _mlp()
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(("pre", type(m).__name__)))
    handle = model[0].register_forward_hook(lambda m, args, out: seen.append(("post", type(m).__name__)))
    model[0].register_full_backward_hook(lambda m, gin, gout: seen.append(("backward", type(m).__name__)))
    bias = model[0].bias
    model.eval()
    set_execution(model, "sparse")
    model(_x(2).requires_grad_()).sum().backward()
    assert seen == [("pre", "CSRLinear"), ("post", "CSRLinear"), ("backward", "CSRLinear")]
    assert model[0].bias is bias and not model[0].training and model.training is False
    handle.remove()  # the handle still reaches the hook on the new module
    seen.clear()
    set_execution(model, "dense")
    model(_x(2))
    assert seen == [("pre", "MaskedLinear")]


def test_training_through_sparse_layers():
    model = _mlp(execution="sparse")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built after converting
    before = model[0].values.detach().clone()
    loss = model(torch.randn(8, 20, dtype=torch.float64)).square().mean()
    loss.backward()
    opt.step()
    assert model[0].values.grad is not None and not torch.equal(model[0].values, before)


def test_trainable_masks_stay_dense_until_fixed(timer):
    model = _mlp(mask_mode="trainable", execution="sparse")
    x = _x(4)
    assert set(execution_summary(model).values()) == {"dense"}
    set_execution(model, "auto", example=x)
    assert set(execution_summary(model).values()) == {"dense"} and timer.calls == []
    # Freeze layer 0's mask (what freeze_scores does), then ask again: it follows "auto" now.
    layer = model[0]
    mask = layer.weight_mask.detach().clone()
    del layer.weight_mask
    layer._init_mask("fixed", mask)
    model(x)
    assert execution_summary(model) == {"0": "dense", "2": "dense"}  # nothing converts inside a forward
    set_execution(model, "auto", example=x)
    assert execution_summary(model) == {"0": "sparse", "2": "dense"} and len(timer.calls) == 1


def test_parametrized_layers_are_left_alone():
    model = _mlp(mask_mode="trainable")

    class Identity(nn.Module):
        def forward(self, m):
            return m

    torch.nn.utils.parametrize.register_parametrization(model[0], "weight_mask", Identity())
    set_execution(model, "sparse")
    set_execution(model, "auto")
    assert "Parametrized" in type(model[0]).__name__ and not hasattr(model[0], _PENDING_AUTO)
    assert execution_summary(model) == {"0": "dense", "2": "dense"}


def test_sparsify_execution_keyword(timer):
    torch.manual_seed(2)
    plain = sparsesam.sparsify(nn.Sequential(nn.Linear(4, 3)))
    assert type(plain[0]) is MaskedLinear  # the default keeps today's layers
    model = sparsesam.sparsify(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), exclude="1", execution="sparse")
    assert isinstance(model[0], CSRLinear) and type(model[1]) is nn.Linear
    auto = sparsesam.sparsify(nn.Sequential(nn.Linear(4, 3)), execution="auto")  # no example: waits, dense
    assert type(auto[0]) is MaskedLinear and getattr(auto[0], _PENDING_AUTO)
    auto[0].set_mask(torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]]))
    resolve_execution(auto, torch.randn(2, 4))
    assert isinstance(auto[0], CSRLinear) and not hasattr(auto[0], _PENDING_AUTO)
    layer = sparsesam.sparsify(nn.Linear(4, 3), execution="sparse")  # the root itself converts: the new one returns
    assert type(layer) is CSRLinear
    with pytest.raises(ValueError, match="execution"):
        sparsesam.sparsify(nn.Sequential(nn.Linear(4, 3)), execution="fast")


def test_convolutions_join_the_dispatch(timer):
    model = _cnn()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    y = model(x)
    set_execution(model, "auto", example=x)
    torch.testing.assert_close(model(x), y)
    # the grouped conv cannot run sparse: dense, and never timed
    assert execution_summary(model) == {"0": "sparse", "2": "dense", "4": "sparse"}
    assert isinstance(model[0], SparseConv2d) and isinstance(model[2], MaskedConv2d) and len(timer.calls) == 2
    exported = sparsesam.export(model)
    assert type(exported[0]) is nn.Conv2d
    torch.testing.assert_close(exported(x), y)
    set_execution(model, "dense")
    assert all(type(model[i]) is MaskedConv2d for i in (0, 2, 4))


def test_resolve_execution_settles_forms_before_the_optimizer(timer):
    model = _mlp(execution="auto")  # no example: layers wait, dense
    assert execution_summary(model) == {"0": "dense", "2": "dense"} and timer.calls == []
    x = _x(3)
    model(x)  # a forward converts nothing
    assert execution_summary(model) == {"0": "dense", "2": "dense"} and timer.calls == []
    with pytest.raises(ValueError, match="example"):
        resolve_execution(model, None)
    assert resolve_execution(model, x) is model
    assert execution_summary(model)["0"] == "sparse" and timer.calls[0][2] is True
    assert all(p.grad is None for p in model.parameters())
    params = list(model.parameters())
    model(x).sum().backward()  # forms settled at return: the optimizer may be built before any forward
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert resolve_execution(model, x) is model and len(timer.calls) == 2  # nothing waits: no-op


def test_auto_example_run_leaves_no_trace(timer):
    """The example forward that takes each layer's input restores BatchNorm statistics and the RNG."""
    torch.manual_seed(5)
    model = sparsesam.sparsify(nn.Sequential(nn.Linear(20, 30), nn.BatchNorm1d(30), nn.Dropout(0.5),
                                             nn.Linear(30, 4))).double()
    for i in (0, 3):
        model[i].set_mask(torch.rand_like(model[i].weight) < 0.2)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "batches" in k}
    x = _x(8)
    rng = torch.get_rng_state()
    set_execution(model, "auto", example=x)
    assert execution_summary(model) == {"0": "sparse", "3": "sparse"}
    assert torch.equal(torch.get_rng_state(), rng)
    assert _same_state({k: v for k, v in model.state_dict().items() if k in buffers}, buffers)
    # training mode: forward+backward; the first layer's input is data, the second's needs dL/dx
    assert [(c[2], c[3]) for c in timer.calls] == [(True, False), (True, True)]


def test_real_timer_measures_both_forms():
    layer = _mlp()[0]
    x = torch.randn(16, 20, dtype=torch.float64)
    seconds = time_forms({"dense": layer, "csr": CSRLinear.from_masked(layer)}, x, backward=True, repeats=1)
    assert list(seconds) == ["dense", "csr"] and all(0 < s < 60 for s in seconds.values())
    assert layer.weight.grad is None


def test_set_execution_rejects_bad_arguments(timer):
    with pytest.raises(TypeError, match="model"):
        set_execution("model", "auto")
    with pytest.raises(ValueError, match="execution"):
        set_execution(nn.Linear(2, 2), "fastest")
    with pytest.raises(ValueError, match="execution"):
        set_execution(nn.Linear(2, 2), 3)
    with pytest.raises(TypeError, match="example must be"):
        set_execution(_mlp(), "auto", example=object())
    with pytest.raises(TypeError, match="model"):
        resolve_execution([], _x())


def test_formats_by_preference_by_name_and_timed(monkeypatch):
    """A structured format registered before CSR: "sparse" takes it where the mask allows,
    a format's name forces it, and "auto" times every candidate form."""
    from sparsesam.nn import dispatch

    class EvenSparseLinear(CSRLinear):  # stands in for a structured format (BSR, N:M)
        pass

    even = dispatch.SparseFormat("even", MaskedLinear, EvenSparseLinear,
                                 lambda m: None if int(m.weight_mask.sum()) % 2 == 0 else "an odd number of kept weights")
    monkeypatch.setattr(dispatch, "SPARSE_FORMATS", [even, *dispatch.SPARSE_FORMATS])
    model = _mlp()
    model[0].set_mask(torch.arange(600).view(30, 20) % 3 == 0)  # 200 kept: even
    model[2].set_mask(torch.arange(900).view(30, 30) % 7 == 0)  # 129 kept: odd
    x = torch.randn(6, 20, dtype=torch.float64)
    y = model(x)
    assert "even" in sparsesam.nn.dispatch.executions()
    set_execution(model, "sparse")
    assert execution_summary(model, formats=True) == {"0": "even", "2": "csr"}
    assert execution_summary(model) == {"0": "sparse", "2": "sparse"}
    torch.testing.assert_close(model(x), y)
    set_execution(model, "csr")
    assert execution_summary(model, formats=True) == {"0": "csr", "2": "csr"}
    set_execution(model, "even")  # where the mask does not allow it: as "sparse"
    assert execution_summary(model, formats=True) == {"0": "even", "2": "csr"}

    calls = []

    def timer(forms, x, backward):
        calls.append(list(forms))
        return {form: {"dense": 3.0, "even": 1.0, "csr": 2.0}[form] for form in forms}
    old = set_dispatch_cache(DispatchCache(timer=timer))
    try:
        set_execution(model, "dense")
        set_execution(model, "auto", example=x)
        torch.testing.assert_close(model(x), y)
        assert calls == [["dense", "even", "csr"], ["dense", "csr"]]
        assert execution_summary(model, formats=True) == {"0": "even", "2": "csr"}
        assert all("forms=dense,even,csr" in k or "forms=dense,csr" in k for k in dispatch_cache().entries)
    finally:
        set_dispatch_cache(old)


def test_block_structured_masks_run_block_sparse():
    """BSR is registered before CSR: "sparse" takes it for a block-structured mask, CSR for the others."""
    from sparsesam.pruning import bsr_magnitude_mask
    torch.manual_seed(3)
    model = sparsesam.sparsify(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))).double()
    model[0].set_mask(bsr_magnitude_mask(model[0].weight, 0.75, blocksize=(8, 8)))
    model[2].set_mask(torch.rand_like(model[2].weight) < 0.3)
    x = torch.randn(5, 32, dtype=torch.float64)
    y = model(x)
    set_execution(model, "sparse")
    assert execution_summary(model, formats=True) == {"0": "bsr", "2": "csr"}
    assert type(model[0]) is BlockSparseLinear and model[0].blocksize == (8, 8)
    torch.testing.assert_close(model(x), y)
    set_execution(model, "dense")
    assert torch.equal(model(x), y)


def test_nm_masks_run_nm_and_auto_times_every_allowed_format():
    from sparsesam.pruning import nm_mask
    torch.manual_seed(4)
    model = sparsesam.sparsify(nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8))).double()
    model[0].set_mask(nm_mask(model[0].weight, 2, 4))
    model[2].set_mask(torch.rand_like(model[2].weight) < 0.3)
    x = torch.randn(5, 32, dtype=torch.float64)
    y = model(x)
    set_execution(model, "sparse")
    assert execution_summary(model, formats=True) == {"0": "nm", "2": "csr"} and type(model[0]) is NMSparseLinear
    torch.testing.assert_close(model(x), y)
    calls = []

    def timer(forms, x, backward):
        calls.append(list(forms))
        return {form: {"dense": 1.0, "nm": 3.0, "csr": 2.0}[form] for form in forms}
    old = set_dispatch_cache(DispatchCache(timer=timer))
    try:
        set_execution(model, "auto")
        # without an example "auto" keeps the current forms, and waits for resolve_execution
        assert execution_summary(model, formats=True) == {"0": "nm", "2": "csr"} and calls == []
        resolve_execution(model, x)
        # layer 0 was nm: "auto" times every form its mask allows
        assert calls[0] == ["dense", "nm", "csr"] and execution_summary(model, formats=True) == {"0": "dense", "2": "dense"}
        assert all(p.grad is None for p in model.parameters())
    finally:
        set_dispatch_cache(old)


class Nested(nn.Module):
    """Layers at every kind of path: attribute, Sequential index, ModuleList index, ModuleDict key."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8 * 5 * 5, 16), nn.ReLU()), nn.Linear(16, 16)])
        self.heads = nn.ModuleDict({"logits": nn.Linear(16, 5)})

    def forward(self, x):
        h = self.stem(x).flatten(1)
        for block in self.blocks:
            h = block(h)
        return self.heads["logits"](h)


NESTED = ("stem.0", "blocks.0.0", "blocks.1", "heads.logits")


def _nested() -> nn.Module:
    torch.manual_seed(6)
    model = sparsesam.sparsify(Nested()).double()
    for name in NESTED:
        layer = model.get_submodule(name)
        layer.set_mask(torch.rand_like(layer.weight) < 0.2)
    return model


def _dense_grad(layer: nn.Module) -> torch.Tensor:
    """The weight gradient of a layer in any form, as the dense masked layer's (zeros where pruned)."""
    if isinstance(layer, (MaskedLinear, MaskedConv2d)):
        return layer.weight.grad
    return layer.pattern.scatter(layer.values.grad).view(layer.weight_shape)


def test_swap_by_path_keeps_outputs_and_gradients():
    dense = _nested()
    model = set_execution(copy.deepcopy(dense), "sparse")
    assert execution_summary(model) == {name: "sparse" for name in NESTED}
    assert isinstance(model.stem[0], SparseConv2d) and isinstance(model.blocks[0][0], CSRLinear)
    assert isinstance(model.blocks[1], CSRLinear) and isinstance(model.heads["logits"], CSRLinear)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    y_dense, y = dense(x), model(x)
    torch.testing.assert_close(y, y_dense)
    y_dense.square().sum().backward()
    y.square().sum().backward()
    for name in NESTED:
        ours, reference = model.get_submodule(name), dense.get_submodule(name)
        torch.testing.assert_close(_dense_grad(ours), _dense_grad(reference))
        torch.testing.assert_close(ours.bias.grad, reference.bias.grad)
    back = set_execution(model, "dense")
    assert all(type(back.get_submodule(n)) in (MaskedLinear, MaskedConv2d) for n in NESTED)
    assert torch.equal(back(x), dense(x))  # the masked layers again: bit for bit


def test_a_shared_layer_is_swapped_at_every_path():
    torch.manual_seed(7)
    shared = nn.Linear(10, 10)
    model = sparsesam.sparsify(nn.Sequential(shared, nn.ReLU(), shared)).double()
    model[0].set_mask(torch.rand(10, 10) < 0.3)
    x = torch.randn(3, 10, dtype=torch.float64)
    y = model(x)
    set_execution(model, "sparse")
    assert isinstance(model[0], CSRLinear) and model[0] is model[2]
    torch.testing.assert_close(model(x), y)
    assert execution_summary(model) == {"0": "sparse"}  # named once, as named_modules() does


def test_a_single_layer_model_returns_its_new_form():
    layer = _mlp()[0]
    sparse = set_execution(layer, "sparse")
    assert type(sparse) is CSRLinear and type(layer) is MaskedLinear  # the old module is untouched
    assert type(set_execution(sparse, "dense")) is MaskedLinear


def test_mapping_restores_exact_forms():
    """{name: form} as execution_summary(formats=True) reports it: a resume loads the checkpoint into
    the dense model (any form loads) and then restores the saved forms."""
    from sparsesam.pruning import bsr_magnitude_mask, nm_mask
    torch.manual_seed(8)
    model = sparsesam.sparsify(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                                             nn.Linear(32, 8))).double()
    model[0].set_mask(bsr_magnitude_mask(model[0].weight, 0.75, blocksize=(8, 8)))
    model[2].set_mask(nm_mask(model[2].weight.abs(), 2, 4))
    model[4].set_mask(torch.rand_like(model[4].weight) < 0.3)
    set_execution(model, {"0": "bsr", "2": "csr"})  # layers not named keep their form
    forms = execution_summary(model, formats=True)
    assert forms == {"0": "bsr", "2": "csr", "4": "dense"}
    resumed = sparsesam.sparsify(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                                               nn.Linear(32, 8))).double()
    resumed.load_state_dict(model.state_dict(), strict=True)
    assert set_execution(resumed, forms) is resumed
    assert execution_summary(resumed, formats=True) == forms
    assert _same_state(resumed.state_dict(), model.state_dict())
    set_execution(resumed, {"2": "nm"})
    assert execution_summary(resumed, formats=True) == {"0": "bsr", "2": "nm", "4": "dense"}
    with pytest.raises(ValueError, match="asks '4' to run as 'nm', but its mask allows"):
        set_execution(resumed, {"4": "nm"})
    with pytest.raises(ValueError, match="names '1', which is not a fixed-mask layer"):
        set_execution(resumed, {"1": "csr"})
    with pytest.raises(ValueError, match="layers cannot be given"):
        set_execution(resumed, {"0": "dense"}, layers=["0"])
    assert execution_summary(resumed, formats=True) == {"0": "bsr", "2": "nm", "4": "dense"}  # refused: untouched


class Branches(nn.Module):
    """A layer the example does not reach (``use_extra`` off) is not timed: it keeps waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.main, self.extra = nn.Linear(20, 20), nn.Linear(20, 20)

    def forward(self, x, use_extra=False):
        return self.extra(self.main(x)) if use_extra else self.main(x)


def test_auto_times_only_the_layers_the_example_reaches(timer):
    torch.manual_seed(9)
    model = sparsesam.sparsify(Branches()).double()
    for layer in (model.main, model.extra):
        layer.set_mask(torch.rand_like(layer.weight) < 0.2)
    set_execution(model, "auto", example=(_x(4),))  # a tuple of arguments
    assert execution_summary(model) == {"main": "sparse", "extra": "dense"} and len(timer.calls) == 1
    assert getattr(model.extra, _PENDING_AUTO) and not hasattr(model.main, _PENDING_AUTO)
    resolve_execution(model, {"x": _x(4), "use_extra": True})  # keyword arguments: a Mapping example
    assert execution_summary(model) == {"main": "sparse", "extra": "sparse"} and len(timer.calls) == 2
    resolve_execution(model, (_x(4), True))  # nothing waits: a no-op
    assert len(timer.calls) == 2


def test_sparse_linear_is_the_old_name_of_csr_linear():
    """CSR pieces are named csr_*; the class's former name stays an alias (the same class, not a copy)."""
    import sparsesam
    from sparsesam.nn import SparseLinear
    assert SparseLinear is CSRLinear and sparsesam.SparseLinear is sparsesam.CSRLinear is CSRLinear
