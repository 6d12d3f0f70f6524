"""The flash-attention test rule: a kernel's error against a float64
reference may be at most about twice PyTorch's own error (same inputs, same
low precision) against that reference, plus a few ulps of slack."""
from __future__ import annotations

import torch


def max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    if value.numel() == 0:
        return 0.0
    return (value.double() - reference.double()).abs().max().item()


def assert_within_torch_error(
    name: str, ours: torch.Tensor, torch_own: torch.Tensor, reference64: torch.Tensor, factor: float = 2.0,
    reduction_size: int = 1,
) -> None:
    """reduction_size: length of the sums behind each output. A kernel that
    adds in another order than PyTorch may differ from it by about
    ``reduction_size`` float64 ulps even where PyTorch's own error is zero
    (float64 inputs), so that much slack is allowed on top."""
    assert ours.shape == reference64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(reference64.shape)}"
    assert ours.dtype == torch_own.dtype, f"{name}: dtype {ours.dtype} != torch's {torch_own.dtype}"
    scale = max(1.0, reference64.abs().max().item()) if reference64.numel() else 1.0
    slack = (8 * torch.finfo(ours.dtype).eps + max(1, reduction_size) * torch.finfo(torch.float64).eps) * scale
    ours_err = max_error(ours, reference64)
    torch_err = max_error(torch_own, reference64)
    assert ours_err <= factor * torch_err + slack, (
        f"{name}: error {ours_err:.3e} vs float64 exceeds {factor} x PyTorch's own {torch_err:.3e} (+{slack:.1e})"
    )


def assert_within_torch_error_or_same_pattern(name: str, ours: torch.Tensor, torch_own: torch.Tensor,
                                              reference64: torch.Tensor, reduce_len: int = 1) -> None:
    """The rule above for a masked-layer op's outputs; a bool output (dM of a bool mask is ``(G*W).to(bool)``,
    a pattern, not a number) must equal PyTorch's. A blocked Triton sum adds in another order than torch's
    GEMM, hence the reduction-length slack."""
    if ours.dtype == torch.bool:
        assert torch.equal(ours, torch_own), f"{name}: bool pattern differs from torch's"
        return
    assert_within_torch_error(name, ours, torch_own, reference64, reduction_size=reduce_len)


def assert_as_accurate_as_pytorch(out: torch.Tensor, ref_lowp: torch.Tensor, ref64: torch.Tensor) -> None:
    """The CUDA C++ kernels' form of the rule: the error versus float64 is at most twice PyTorch's own, plus
    one ulp of the output's scale; float64 outputs are compared with ``assert_close``."""
    assert out.shape == ref_lowp.shape and out.dtype == ref_lowp.dtype
    if out.numel() == 0:
        return
    if out.dtype == torch.float64:
        torch.testing.assert_close(out, ref64)
        return
    err = (out.double() - ref64).abs().max().item()
    ref_err = (ref_lowp.double() - ref64).abs().max().item()
    ulp = torch.finfo(out.dtype).eps * ref64.abs().max().item()
    assert err <= 2 * ref_err + ulp, f"error {err:.3g} vs PyTorch's {ref_err:.3g} ({out.dtype})"


def assert_outputs_as_accurate_as_pytorch(outs, refs_lowp, refs64, wanted) -> None:
    """``assert_as_accurate_as_pytorch`` for each output asked for; one not asked for comes back empty."""
    for out, ref_lowp, ref64, want in zip(outs, refs_lowp, refs64, wanted):
        if want:
            assert_as_accurate_as_pytorch(out, ref_lowp, ref64)
        else:
            assert out.shape == (0,), "an output not asked for comes back empty"
