"""Argument checks shared by the op faces: a clear TypeError / ValueError that
names the argument, instead of a crash or silent garbage inside a kernel."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _validate

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, value, *, rank: Optional[Sequence[int]] = None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor ({', '.join(map(str, FLOAT_DTYPES))}), got {value.dtype}")
    if rank is not None and value.dim() not in rank:
        want = " or ".join(str(r) for r in rank)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(value.shape)}")


def same_device(**tensors: Optional[torch.Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{name} is on {device} but {first_name} is on {first}: all must be on one device")


def mask(weight: torch.Tensor, value, name: str = "mask") -> None:
    """A mask is bool, or floating with the weight's dtype, shaped like the weight, and free of NaN and inf
    (NaN != 0 would keep an entry, and inf * w is inf or NaN)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != torch.bool and value.dtype != weight.dtype:
        raise TypeError(f"{name} must be bool or have the weight's dtype {weight.dtype}, got {value.dtype}")
    if value.shape != weight.shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)} but weight has shape {tuple(weight.shape)}")
    if value.device != weight.device:
        raise ValueError(f"{name} is on {value.device} but weight is on {weight.device}")
    # A data-dependent check, so only where it is cheap: on CPU (one read of
    # the mask, no device sync) and not while torch.compile traces (it would
    # break the graph). On accelerators it would cost a host sync per layer
    # per step; there MaskedLinear/MaskedConv2d.set_mask checks instead.
    if value.dtype != torch.bool and value.device.type == "cpu" and not torch.compiler.is_compiling():
        _validate.finite_tensor(name, value)


def bias(weight: torch.Tensor, value: Optional[torch.Tensor]) -> None:
    if value is None:
        return
    tensor("bias", value, rank=(1,))
    if value.shape[0] != weight.shape[0]:
        raise ValueError(f"bias has {value.shape[0]} entries but weight has {weight.shape[0]} outputs")
    if value.dtype != weight.dtype:
        raise TypeError(f"bias dtype {value.dtype} differs from weight dtype {weight.dtype}")


def same_dtype(**tensors: torch.Tensor) -> None:
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from {first_name} dtype {first.dtype}")


def pair(name: str, value) -> tuple:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return value


def output_mask(name: str, value, length: int) -> list:
    value = [bool(v) for v in value]
    if len(value) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(value)}")
    return value
