"""SAM as a drop-in for the widely used code (davda54/sam): LR schedulers and
step hooks on ``optimizer.base_optimizer``, gradient accumulation over
micro-batches in both passes, and davda54's state_dict."""
import warnings

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import sparsesam
from sparsesam.optim import SAM, FusedMaskedSGD
from sparsesam.pruning import magnitude_prune


class Davda54SAM(torch.optim.Optimizer):
    """davda54/sam's SAM (sam.py at 3c3afdb, MIT licence), as it is: the code
    whose state_dict our SAM must load. Only ``_grad_norm`` is kept on one
    device (the tests run on the CPU)."""

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        assert rho >= 0.0, f"Invalid rho, should be non-negative: {rho}"
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super(Davda54SAM, self).__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _grad_norm(self):
        return torch.norm(torch.stack([
            ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2)
            for group in self.param_groups for p in group["params"] if p.grad is not None
        ]), p=2)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups


def _model(seed=0, sparse=False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    if sparse:
        sparsesam.sparsify(model)
        magnitude_prune(model, 0.6)
    return model.double()


def _batch(step, n=16):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def _step(model, optimizer, x, y):
    F.cross_entropy(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.second_step(zero_grad=True)


# ------------------------------------------------------ schedulers and hooks
BASES = {
    "sgd_fused": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "sgd_torch_path": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, fused=True)),   # torch's own (fused) step
    "adamw": (torch.optim.AdamW, dict(lr=0.01)),
}


@pytest.mark.parametrize("base", sorted(BASES))
def test_scheduler_on_base_optimizer_steps_without_warning(base):
    cls, kwargs = BASES[base]
    model = _model(sparse=True)
    optimizer = SAM(model.parameters(), cls, rho=0.05, model=model, **kwargs)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer.base_optimizer, T_max=4)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # the "lr_scheduler.step() before optimizer.step()" warning fails
        for step in range(3):
            _step(model, optimizer, *_batch(step))
            scheduler.step()
            lrs.append(optimizer.param_groups[0]["lr"])
    base_lr = kwargs["lr"]
    expected = [base_lr * (1 + torch.cos(torch.tensor(torch.pi * t / 4)).item()) / 2 for t in (1, 2, 3)]
    assert lrs == pytest.approx(expected)


@pytest.mark.parametrize("base", sorted(BASES))
def test_step_hooks_on_base_optimizer_fire_once_per_update(base):
    cls, kwargs = BASES[base]
    model = _model(sparse=True)
    optimizer = SAM(model.parameters(), cls, rho=0.05, model=model, **kwargs)
    first = model[0].weight
    seen = []
    optimizer.base_optimizer.register_step_pre_hook(lambda opt, args, kw: seen.append(("pre", first.detach().clone())))
    optimizer.base_optimizer.register_step_post_hook(lambda opt, args, kw: seen.append(("post", first.detach().clone())))
    before = first.detach().clone()
    _step(model, optimizer, *_batch(0))
    assert [kind for kind, _ in seen] == ["pre", "post"]
    # The pre hook sees w (back from the ascent point), the post hook the update.
    torch.testing.assert_close(seen[0][1], before, rtol=0, atol=0)
    assert not torch.equal(seen[1][1], before)
    torch.testing.assert_close(seen[1][1], first.detach(), rtol=0, atol=0)


def test_sam_with_sgd_builds_the_fused_sgd_as_its_base():
    model = _model()
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    assert isinstance(optimizer.base_optimizer, FusedMaskedSGD)
    assert isinstance(optimizer.base_optimizer, torch.optim.SGD)


@pytest.mark.parametrize("kwargs", [dict(lr=0.1), dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True),
                                    dict(lr=0.1, momentum=0.9, dampening=0.1, maximize=True)])
def test_fused_masked_sgd_alone_equals_torch_sgd(kwargs):
    """FusedMaskedSGD without masks is torch.optim.SGD."""
    fused_model, torch_model = _model(), _model()
    fused = FusedMaskedSGD(fused_model.parameters(), **kwargs)
    reference = torch.optim.SGD(torch_model.parameters(), **kwargs)
    for step in range(3):
        x, y = _batch(step)
        for model, optimizer in ((fused_model, fused), (torch_model, reference)):
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(fused_model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fused_masked_sgd_keeps_pruned_entries_on_torch_path():
    """A fused=True group goes through torch's step; its pruned entries stay put."""
    model = _model(sparse=True)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.1, momentum=0.9, fused=True)
    layers = [m for m in model.modules() if isinstance(m, sparsesam.nn.MaskedConv2d)]
    before = [layer.weight.detach().clone() for layer in layers]
    _step(model, optimizer, *_batch(0))
    for layer, old in zip(layers, before):
        pruned = layer.weight_mask == 0
        assert torch.equal(layer.weight[pruned], old[pruned])
        assert not torch.equal(layer.weight[~pruned], old[~pruned])


def test_fused_masked_sgd_rejects_bad_masks_of():
    with pytest.raises(TypeError, match="masks_of"):
        FusedMaskedSGD(_model().parameters(), masks_of=3, lr=0.1)


# ---------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("norm_in_backward", [False, True])
@pytest.mark.parametrize("adaptive", [False, True])
def test_gradient_accumulation_over_micro_batches_equals_full_batch(adaptive, norm_in_backward, monkeypatch):
    # Norm hooks on every gradient (this model's are below the default size threshold).
    monkeypatch.setattr(SAM, "_HOOK_MIN_NUMEL", 1)
    full_model, micro_model = _model(sparse=True), _model(sparse=True)
    kwargs = dict(rho=0.5 if adaptive else 0.05, adaptive=adaptive, lr=0.1, momentum=0.9, weight_decay=5e-4)
    full = SAM(full_model.parameters(), torch.optim.SGD, model=full_model, **kwargs)
    micro = SAM(micro_model.parameters(), torch.optim.SGD, model=micro_model, norm_in_backward=norm_in_backward,
                **kwargs)
    parts = 4
    for step in range(3):
        x, y = _batch(step)
        _step(full_model, full, x, y)
        for pass_ in (micro.first_step, micro.second_step):
            for xs, ys in zip(x.chunk(parts), y.chunk(parts)):
                (F.cross_entropy(micro_model(xs), ys) / parts).backward()
            pass_(zero_grad=True)
    for (name, a), b in zip(full_model.state_dict().items(), micro_model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    # It moved, and pruned entries did not.
    start = _model(sparse=True)[0]
    pruned = start.weight_mask == 0
    assert pruned.any() and not torch.equal(micro_model[0].weight, start.weight)
    assert torch.equal(micro_model[0].weight[pruned], start.weight[pruned])


def test_accumulation_without_dividing_is_a_larger_step():
    """The test above can fail: summing micro-batch losses without dividing by
    their count does not give the full-batch step."""
    full_model, micro_model = _model(), _model()
    full = SAM(full_model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    micro = SAM(micro_model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    x, y = _batch(0)
    _step(full_model, full, x, y)
    for pass_ in (micro.first_step, micro.second_step):
        for xs, ys in zip(x.chunk(4), y.chunk(4)):
            F.cross_entropy(micro_model(xs), ys).backward()
        pass_(zero_grad=True)
    assert not torch.allclose(full_model[0].weight, micro_model[0].weight, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------ davda54's state_dict
def _train_davda54(model, steps, scheduler_too=False, **kwargs):
    optimizer = Davda54SAM(model.parameters(), torch.optim.SGD, **kwargs)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer.base_optimizer, step_size=1, gamma=0.5) \
        if scheduler_too else None
    for step in range(steps):
        _step(model, optimizer, *_batch(step))
        if scheduler is not None:
            scheduler.step()
    return optimizer


@pytest.mark.parametrize("adaptive", [False, True])
def test_davda54_state_dict_loads_and_training_continues_identically(adaptive):
    """Without momentum davda54's state_dict holds the whole optimizer state:
    ours, loaded from it, continues exactly as davda54's own optimizer does."""
    kwargs = dict(rho=0.5 if adaptive else 0.05, adaptive=adaptive, lr=0.1, weight_decay=1e-3)
    theirs_model = _model()
    theirs = _train_davda54(theirs_model, 2, scheduler_too=True, **kwargs)
    saved = theirs.state_dict()
    assert set(saved) == {"state", "param_groups"} and all(set(s) == {"old_p"} for s in saved["state"].values())

    ours_model = _model()
    ours_model.load_state_dict(theirs_model.state_dict())
    # Built with other hyperparameters: the state_dict must bring them.
    ours = SAM(ours_model.parameters(), torch.optim.SGD, rho=0.9, lr=1.0, weight_decay=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # no momentum: nothing is lost, nothing to warn about
        ours.load_state_dict(saved)
    for group, saved_group in zip(ours.param_groups, saved["param_groups"]):
        for key in ("rho", "adaptive", "lr", "weight_decay", "momentum", "nesterov"):
            assert group[key] == saved_group[key], key
    assert ours.param_groups[0]["lr"] == pytest.approx(0.025)       # the scheduler's two halvings
    assert ours.base_optimizer.param_groups is ours.param_groups
    assert all("old_p" not in state for state in ours.state.values())
    assert all("old_p" not in state for state in ours.base_optimizer.state.values())

    for step in range(2, 5):
        x, y = _batch(step)
        _step(theirs_model, theirs, x, y)
        _step(ours_model, ours, x, y)
    for (name, a), b in zip(theirs_model.state_dict().items(), ours_model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_davda54_state_dict_with_momentum_warns_that_momentum_restarts():
    model = _model()
    theirs = _train_davda54(model, 1, rho=0.05, lr=0.1, momentum=0.9)
    ours = SAM(_model().parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match="momentum restarts"):
        ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["momentum"] == 0.9
    assert not ours.base_optimizer.state


def test_davda54_style_state_dict_with_base_state_keeps_it():
    """A fork that saved the base optimizer's state in the same dict: the momentum buffers are kept."""
    model = _model()
    theirs = _train_davda54(model, 1, rho=0.05, lr=0.1, momentum=0.9)
    saved = theirs.state_dict()
    base = theirs.base_optimizer.state_dict()["state"]
    for index, entry in base.items():
        saved["state"].setdefault(index, {}).update(entry)
    ours = SAM(_model().parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.load_state_dict(saved)
    params = [p for g in ours.param_groups for p in g["params"]]
    for index, entry in base.items():
        torch.testing.assert_close(ours.base_optimizer.state[params[index]]["momentum_buffer"],
                                   entry["momentum_buffer"], rtol=0, atol=0)


def test_our_state_dict_still_round_trips():
    model = _model(sparse=True)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.1, momentum=0.9)
    _step(model, optimizer, *_batch(0))
    saved = optimizer.state_dict()
    other = SAM(_model(sparse=True).parameters(), torch.optim.SGD, rho=0.2, lr=0.3, momentum=0.9)
    other.load_state_dict(saved)
    assert other.param_groups[0]["rho"] == 0.05 and other.param_groups[0]["lr"] == 0.1
    assert len(other.base_optimizer.state) == len(optimizer.base_optimizer.state)


@pytest.mark.parametrize("bad, error, match", [
    ({"state": {}}, ValueError, "not a SAM state_dict"),
    ({"state": {}, "param_groups": [{"params": [0], "lr": 0.1}]}, ValueError, "lack 'rho'"),
    ({"state": {}, "param_groups": "x"}, ValueError, "list of groups"),
    ([1, 2], TypeError, "mapping"),
])
def test_bad_state_dicts_are_refused(bad, error, match):
    optimizer = SAM(_model().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(error, match=match):
        optimizer.load_state_dict(bad)
