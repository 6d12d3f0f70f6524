"""SAM(norm_in_backward=True): each gradient's squared norm is taken by a hook
during backward, and first_step uses it only while that gradient is unchanged."""
import gc

import pytest
import torch
import torch.nn.functional as F

from sparsesam.optim import SAM, frozen_bn_stats

from test_sam import (SGD_KWARGS, VARIANTS, _data, _model, _train, assert_float32_run_within_loop_error,  # noqa: F401
                      smooth_resnet)


@pytest.fixture(autouse=True)
def hook_every_parameter(monkeypatch):
    # The test model's tensors are all below the production size threshold.
    monkeypatch.setattr(SAM, "_HOOK_MIN_NUMEL", 1)


def _with_hooks(variant, sparse):
    def make(model):
        opts = dict(VARIANTS[variant])
        channel = opts.pop("channel", False)
        opt = SAM(model.parameters(), torch.optim.SGD, model=model if sparse else None, norm_in_backward=True,
                  **opts, **SGD_KWARGS)
        if channel:
            from test_sam import _channel_rho
            for p, rho in _channel_rho(model).items():
                opt.set_channel_rho(p, rho)
        return opt
    return make


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_twenty_steps_as_close_to_float64_as_the_per_parameter_loop(variant, sparse, smooth_resnet):
    # smooth_resnet (test_sam.py): the rule and why the model is smooth for it.
    trajectory = []
    _train(_with_hooks(variant, sparse), sparse=sparse, train_mode=False, trajectory=trajectory)
    assert_float32_run_within_loop_error(trajectory, variant, sparse)


def test_the_hooks_values_are_used_and_the_second_backward_takes_none():
    model = _model(sparse=True)
    optimizer = _with_hooks("asam", True)(model)
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    with_grads = [p for p in model.parameters() if p.grad is not None]
    assert len(optimizer._hook_norms) == len(with_grads)
    expected = torch.ops.sparsesam.sam_grad_sq_norm.default(
        [p.grad for p in with_grads], with_grads, optimizer._masks_of(with_grads), True)
    assert sum(entry[-1] for entry in optimizer._hook_norms.values()) == pytest.approx(expected.item(), rel=1e-12)
    optimizer.first_step(zero_grad=True)
    assert not optimizer._hook_norms
    with frozen_bn_stats(model):
        F.cross_entropy(model(x), y).backward()
    assert not optimizer._hook_norms
    optimizer.second_step(zero_grad=True)


def _one_step(norm_in_backward, between):
    model = _model()
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, norm_in_backward=norm_in_backward, **SGD_KWARGS)
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    between(model)
    optimizer.first_step(zero_grad=True)
    with frozen_bn_stats(model):
        F.cross_entropy(model(x), y).backward()
    optimizer.second_step(zero_grad=True)
    return model


def _clip(model):
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)


def _replace_grads(model):
    for p in model.parameters():
        p.grad = p.grad * 3.0


@pytest.mark.parametrize("between", [_clip, _replace_grads], ids=["clip_grad_norm_", "new grad tensors"])
def test_gradients_changed_after_backward_are_measured_again(between):
    # Every hook value is stale, so first_step makes the very call it makes
    # without hooks: the results agree to the bit.
    hooked = _one_step(True, between)
    plain = _one_step(False, between)
    for (name, a), (_, b) in zip(hooked.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name


def test_the_hooks_do_not_keep_the_optimizer_alive():
    model = _model()
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, norm_in_backward=True, **SGD_KWARGS)
    del optimizer
    gc.collect()
    x, y = _data()
    F.cross_entropy(model(x), y).backward()  # the orphaned hooks do nothing
    assert all(p.grad is not None for p in model.parameters())
