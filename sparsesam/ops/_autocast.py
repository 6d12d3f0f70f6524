"""Autocast for the masked layers' ops.

Custom ops are not on autocast's lists, so the op faces do what autocast
does for ``F.linear`` / ``F.conv2d``: cast floating inputs (a float mask
included) to the autocast dtype of the device.
"""
from __future__ import annotations

import torch


def cast_inputs(device_type: str, *tensors):
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype else t
        for t in tensors
    )
