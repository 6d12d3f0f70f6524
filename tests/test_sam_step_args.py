"""The fused SAM step ops refuse settings that would silently poison the weights:
non-finite or negative lr / momentum / weight decay, non-finite dampening,
eps that is not finite and >= 0, rho that is negative or not finite. Both the
Python face (sparsesam.ops) and the CPU kernel (raw torch.ops.sparsesam calls)
check, and every message names the argument."""
import pytest
import torch

from sparsesam import ops

NAN, INF = float("nan"), float("inf")


def _lists():
    w, g = torch.randn(5, 3), torch.randn(5, 3)
    return [w], [g], [None]


def _sgd_args(**change):
    args = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-4)
    args.update(change)
    return args


@pytest.mark.parametrize("name, value", [("lr", NAN), ("lr", INF), ("lr", -0.1), ("momentum", NAN),
                                         ("momentum", -0.5), ("weight_decay", INF), ("dampening", NAN)])
def test_sgd_step_refuses_non_finite_or_negative_settings(name, value):
    params, grads, masks = _lists()
    before = params[0].clone()
    with pytest.raises(ValueError, match=f"^{name} must be finite"):
        ops.sgd_step_(params, grads, [torch.zeros(5, 3)], masks, **_sgd_args(**{name: value}))
    assert torch.equal(params[0], before)   # refused before anything was written


def test_sgd_step_refuses_a_string_lr():
    params, grads, masks = _lists()
    with pytest.raises(TypeError, match="lr must be a real number"):
        ops.sgd_step_(params, grads, [], masks, lr="0.1")


@pytest.mark.parametrize("name, value", [("lr", NAN), ("lr", -1.0), ("momentum", INF), ("weight_decay", NAN),
                                         ("dampening", INF)])
def test_sgd_step_kernel_refuses_them_too(name, value):
    params, grads, masks = _lists()
    args = _sgd_args(**{name: value})
    with pytest.raises(ValueError, match=f"sgd_step_: {name} must be finite"):
        torch.ops.sparsesam.sgd_step_.default(params, grads, [torch.zeros(5, 3)], masks, args["lr"],
                                              args["momentum"], args["dampening"], args["weight_decay"],
                                              False, False, False)


def _perturb(rho, eps=1e-12, raw=False):
    params, grads, masks = _lists()
    out = [torch.empty_like(params[0])]
    sq_norm = ops.sam_grad_sq_norm(grads, [], masks)
    if raw:
        torch.ops.sparsesam.sam_perturb_.default(out, params, grads, masks, [rho], sq_norm, False, eps)
    else:
        ops.sam_perturb_(out, params, grads, masks, [rho], sq_norm, eps=eps)
    return out[0]


@pytest.mark.parametrize("raw", [False, True], ids=["face", "kernel"])
@pytest.mark.parametrize("rho", [torch.tensor(-1.0), torch.tensor(NAN), torch.tensor(INF),
                                 torch.tensor([0.1, 0.1, -0.1, 0.1, 0.1])], ids=["-1", "nan", "inf", "channel"])
def test_sam_perturb_refuses_a_negative_or_non_finite_rho(rho, raw):
    with pytest.raises(ValueError, match=r"rhos\[0\] must be finite and >= 0"):
        _perturb(rho, raw=raw)


@pytest.mark.parametrize("raw", [False, True], ids=["face", "kernel"])
@pytest.mark.parametrize("eps", [NAN, INF, -1e-12])
def test_sam_perturb_refuses_eps_that_is_not_finite_and_non_negative(eps, raw):
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        _perturb(torch.tensor(0.05), eps=eps, raw=raw)


def test_valid_settings_still_step():
    out = _perturb(torch.tensor(0.0))
    assert torch.isfinite(out).all()
    params, grads, masks = _lists()
    before = params[0].clone()
    ops.sgd_step_(params, grads, [], masks, lr=0.5, dampening=-0.5)   # torch.optim.SGD allows any dampening
    torch.testing.assert_close(params[0], before - 0.5 * grads[0])


@pytest.mark.skipif(not (torch.cuda.is_available() and ops.cuda_cpp_available()),
                    reason="needs a GPU and a build with the CUDA C++ kernels")
def test_cuda_kernel_refuses_non_finite_scalars():
    w, g = torch.randn(5, 3, device="cuda"), torch.randn(5, 3, device="cuda")
    with pytest.raises(ValueError, match=r"sgd_step_ \(CUDA\): lr must be finite and >= 0"):
        torch.ops.sparsesam_cuda.sgd_step_([w], [g], [], [None], NAN, 0.0, 0.0, 0.0, False, False, False)
    sq_norm = torch.ones((), device="cuda")
    with pytest.raises(ValueError, match=r"sam_perturb_ \(CUDA\): eps must be finite and >= 0"):
        torch.ops.sparsesam_cuda.sam_perturb_([torch.empty_like(w)], [w], [g], [None], [torch.tensor(0.05, device="cuda")],
                                              sq_norm, False, INF)
