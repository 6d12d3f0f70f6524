"""What a forward keeps alive for backward, measured with saved-tensor hooks."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def saved_bytes(forward: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor]) -> int:
    """Bytes of distinct storages autograd saves for backward during ``forward()``,
    not counting the storages of ``inputs`` (alive anyway): the memory an
    implementation adds and keeps between forward and backward (e.g. ``w*m``).
    """
    input_storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    storages = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in input_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values())
