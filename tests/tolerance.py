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
