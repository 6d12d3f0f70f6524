"""What a forward keeps alive for backward, measured with saved-tensor hooks."""
from __future__ import annotations

from typing import Callable

import torch


def saved_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct storages autograd saves for backward during ``forward()``.

    Storages of the inputs count too (they are alive anyway); what differs
    between implementations is the extra tensors they create and keep.
    """
    storages = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values())
