"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): DTensors, seen through their local shards.

Outside its forward and backward, FSDP2 holds each parameter as a DTensor
whose local tensor is this rank's shard (a view of FSDP2's own padded
storage, which its all-gather reads), and its gradient as a DTensor sharded
the same way (already averaged over the ranks by the reduce-scatter). The
masks stay whole: a fixed mask is a buffer, and FSDP2 shards parameters only
(the forward needs the whole mask next to the all-gathered weight). sparsesam's
fused ops take plain tensors, so the optimizers work on local shards:

* ``local(t)``: the local shard of a DTensor, ``t`` itself otherwise;
* ``local_mask(param, mask)``: the rows of ``mask`` that match ``param``'s
  local shard (a trainable mask is a parameter, so FSDP2 shards it already);
* ``sharded_sq_norm_sum``: a squared norm taken over local shards, summed
  over the mesh dimensions the parameters are sharded on (each entry counted
  once: replicated dimensions, as HSDP has, are not summed).
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

Tensor = torch.Tensor


def is_sharded(t: Optional[Tensor]) -> bool:
    """Whether ``t`` is a DTensor (a parameter, gradient or state of FSDP2).

    torch.distributed.tensor is not imported here (it adds most of a second to
    ``import sparsesam``): while nobody has imported it, nothing is a DTensor.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """This rank's shard of a DTensor (same storage: in-place writes reach the DTensor); anything else as it is."""
    return t.to_local() if is_sharded(t) else t


def local_mask(param: Tensor, mask: Optional[Tensor]) -> Optional[Tensor]:
    """``mask`` cut like ``param``: its local shard when ``param`` is a DTensor and ``mask`` is whole
    (a mask already shaped like the local shard is taken as that shard).

    The cut is DTensor's own (``distribute_tensor`` with ``src_data_rank=None``:
    every rank slices its own whole copy, no communication), so its rows are the
    ones FSDP2 gave the weight, uneven splits included.
    """
    if mask is None or not is_sharded(param):
        return mask
    if is_sharded(mask):
        if mask.placements != param.placements:
            raise ValueError(f"a sharded mask has placements {mask.placements} but its weight has {param.placements}")
        return mask.to_local()
    if mask.shape != param.shape:
        if mask.shape == param.to_local().shape:
            return mask  # already this rank's rows (SAM hands its base optimizer the masks cut)
        raise ValueError(f"mask has shape {tuple(mask.shape)} but its sharded weight has {tuple(param.shape)} "
                         f"(local shard {tuple(param.to_local().shape)})")
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(mask.detach(), param.device_mesh, param.placements, src_data_rank=None).to_local()


class LocalMasks:
    """``local_mask`` with the cut kept while the mask is the same tensor, unchanged (same version counter)."""

    def __init__(self) -> None:
        self._cuts: Dict[int, Tuple[Tensor, int, Tensor]] = {}

    def __call__(self, param: Tensor, mask: Optional[Tensor]) -> Optional[Tensor]:
        if mask is None or not is_sharded(param) or is_sharded(mask):
            return local_mask(param, mask)
        cached = self._cuts.get(id(param))
        if cached is not None and cached[0] is mask and cached[1] == mask._version:
            return cached[2]
        cut = local_mask(param, mask)
        self._cuts[id(param)] = (mask, mask._version, cut)
        return cut


def _sharded_dims(param: Tensor) -> Tuple[int, ...]:
    from torch.distributed.tensor import Shard
    return tuple(i for i, placement in enumerate(param.placements) if isinstance(placement, Shard))


def sharded_sq_norm_sum(parts: Sequence[Tuple[Tensor, Tensor]]) -> Optional[Tensor]:
    """Sum over ranks of squared norms taken over local shards.

    ``parts``: ``(a parameter, the squared norm over the local shards of a
    group of parameters sharded like it)``. Each part is all-reduced (sum)
    over every mesh dimension its parameter is sharded on. Returns the total,
    or None for no parts.
    """
    total = None
    for param, value in parts:
        value = value.detach().to(torch.float64).clone()
        for dim in _sharded_dims(param):
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=param.device_mesh.get_group(dim))
        total = value if total is None else total + value
    return total


def sharding_key(param: Tensor) -> Tuple:
    """Parameters with equal keys are sharded over the same mesh dimensions (one all-reduce serves them all)."""
    return (id(param.device_mesh), _sharded_dims(param))


class InPlacePoint:
    """The ascent point for DTensor parameters: written into the local shards, ``w`` kept in a copy.

    PerturbedPoint swaps a parameter's storage, which FSDP2 would not see
    (its all-gather reads its own padded storage, of which the local shard is
    a view). So here ``w`` is copied into a persistent buffer, the ascent
    point is written over the local shard, and ``restore`` copies ``w`` back:
    bitwise exact, one more pass over the sharded weights than the swap.
    """

    def __init__(self) -> None:
        self._saved: Dict[int, Tensor] = {}
        self._active: List[Tuple[Tensor, Tensor]] = []

    def save(self, params: Sequence[Tensor]) -> List[Tensor]:
        """Copy each local shard into its buffer; returns the buffers (``w``), to read the ascent point from."""
        copies = []
        for p in params:
            shard = local(p)
            buf = self._saved.get(id(p))
            if buf is None or buf.shape != shard.shape or buf.dtype != shard.dtype or buf.device != shard.device:
                buf = self._saved[id(p)] = torch.empty_like(shard, memory_format=torch.contiguous_format)
            buf.copy_(shard)
            self._active.append((shard, buf))
            copies.append(buf)
        return copies

    @torch.no_grad()
    def restore(self) -> None:
        for shard, buf in self._active:
            shard.copy_(buf)
        self._active.clear()




def local_channel_values(param: Tensor, values: Tensor) -> Tensor:
    """Per-output-channel ``values`` (shape ``(C,)``, C = ``param.shape[0]``) cut to ``param``'s local rows.

    A placement sharding ``param`` on dim 0 shards the channels the same way;
    one sharding another dim leaves every channel on every rank.
    """
    if not is_sharded(param):
        return values
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    placements = [placement if isinstance(placement, Shard) and placement.dim == 0 else Replicate()
                  for placement in param.placements]
    return distribute_tensor(values, param.device_mesh, placements, src_data_rank=None).to_local()


__all__ = ["InPlacePoint", "LocalMasks", "is_sharded", "local", "local_channel_values", "local_mask",
           "sharded_sq_norm_sum", "sharding_key"]
