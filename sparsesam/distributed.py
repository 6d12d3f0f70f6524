"""Data parallelism with masked layers on PyTorch's own engine (torchrun, DDP, FSDP2).

Under ``torchrun --nproc_per_node=N`` every process runs the same script on
its part of the data. This module holds what sparsesam adds to that:

* :func:`wrap_ddp`: ``DistributedDataParallel`` that leaves the fixed masks
  (and the index buffers of layers in a sparse execution form) out of its
  buffer broadcast. With DDP's default ``broadcast_buffers=True``
  rank 0 sends every buffer before every forward: the BatchNorm statistics,
  which must follow rank 0, but also the bool masks (11 MB for ResNet-18),
  which only change when a pruner changes them. The masks are made equal
  once, at wrapping, and again by :func:`sync_masks` whenever a pruner may
  have chosen differently on different ranks. Trainable masks are
  parameters: DDP averages their gradients like any other.
* FSDP2 (``fully_shard``) needs nothing from here: SAM and its fused SGD
  work on the local shards and cut each mask to match (see
  :mod:`sparsesam.optim.sam`).
* Rank helpers for the training loop: :func:`world`,
  :func:`is_main_process`, :func:`distributed_sampler`,
  :func:`set_sampler_epoch`, :func:`all_reduce_mean`, :func:`any_rank`,
  :func:`reseed_for_epoch`. Without an initialised process group they
  describe a world of one process, so the same code runs with and without
  torchrun.
* What a command needs around them: :func:`process_group` (the group
  torchrun's environment asks for, torn down at the end) and
  :func:`on_main_process` (rank 0 does something -- writes a file,
  evaluates -- and every rank gets its result or its exception).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import numbers
import pickle
import random
from typing import Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler

from ._validate import ConfigError
from .nn import masked_layers
from .nn.dispatch import form_of


class World(NamedTuple):
    """Where this process stands: its ``rank`` among ``size`` processes, and its ``local_rank`` on this machine."""

    rank: int
    size: int
    local_rank: int


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> World:
    """This process's rank, the number of processes and the local rank (``World(0, 1, 0)`` without a process group).

    The local rank is torchrun's ``LOCAL_RANK`` (0 when it is not set).
    """
    if not _initialized():
        return World(0, 1, 0)
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def is_main_process() -> bool:
    """Whether this process is rank 0 (the one that writes files and prints); True without a process group."""
    return world().rank == 0


def fixed_mask_buffer_names(model: nn.Module) -> List[str]:
    """The qualified buffer names (as ``model.named_buffers()`` gives them) of every fixed sparsity pattern in
    ``model``: the fixed masks of masked layers, and every buffer of a layer in a sparse execution form (the
    CSR / BSR / N:M indices, offsets and their transposes, which only a conversion changes)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    fixed = {id(layer._buffers["weight_mask"]) for _, layer in masked_layers(model)
             if layer._buffers.get("weight_mask") is not None}
    for module in model.modules():
        if form_of(module) != "dense":
            fixed.update(id(buffer) for buffer in module.buffers(recurse=False))
    return [name for name, buffer in model.named_buffers() if id(buffer) in fixed]


def ignore_masks_in_ddp(model: nn.Module) -> List[str]:
    """Tell a DDP built on ``model`` afterwards to leave its fixed masks (and sparse forms' index buffers,
    :func:`fixed_mask_buffer_names`) alone; returns their names.

    Sets ``model._ddp_params_and_buffers_to_ignore`` (through DDP's own
    setter, kept with any names already there), the list DDP reads at
    construction: ignored buffers are neither broadcast at construction nor
    before each forward. Masks must therefore be equal on every rank by other
    means (:func:`sync_masks`; :func:`wrap_ddp` does both).
    """
    if isinstance(model, DistributedDataParallel):
        raise TypeError("model must be the module to wrap, not a DistributedDataParallel (DDP reads the list only "
                        "when it is built)")
    names = fixed_mask_buffer_names(model)
    already = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, already + [name for name in names if name not in already])
    return names


@torch.no_grad()
def sync_masks(model: nn.Module, src: int = 0, group: Optional[dist.ProcessGroup] = None) -> int:
    """Give every rank rank ``src``'s fixed masks and sparse-form index buffers (one broadcast per tensor, in
    ``fixed_mask_buffer_names`` order); returns how many were sent.

    Call it after anything that may choose masks differently on different
    ranks (a pruner scoring rank-local data, a random mask): DDP built by
    :func:`wrap_ddp` no longer broadcasts them. A layer in a sparse form
    must hold as many kept weights on every rank (its values' shape): DDP's
    construction checks that, so :func:`wrap_ddp` calls this after it. A
    no-op without a process group.
    """
    if isinstance(model, DistributedDataParallel):
        model = model.module
    if not isinstance(src, numbers.Integral) or isinstance(src, bool) or src < 0:
        raise ValueError(f"src must be a rank (an integer >= 0), got {src!r}")
    buffers = dict(model.named_buffers())
    masks = [buffers[name] for name in fixed_mask_buffer_names(model)]
    if not _initialized():
        return 0
    if src >= dist.get_world_size(group):
        raise ValueError(f"src must be below the world size {dist.get_world_size(group)}, got {src}")
    for mask in masks:
        # As bytes: bool is not a dtype every backend reduces or broadcasts (gloo, NCCL take uint8).
        data = mask if mask.dtype != torch.bool else mask.view(torch.uint8)
        dist.broadcast(data, src=dist.get_global_rank(group, src) if group is not None else src, group=group)
    return len(masks)


def wrap_ddp(model: nn.Module, **ddp_kwargs) -> DistributedDataParallel:
    """``DistributedDataParallel(model, **ddp_kwargs)`` that does not broadcast the fixed masks at every forward.

    The masks (and sparse forms' index buffers) are left out of DDP's buffer
    broadcast (:func:`ignore_masks_in_ddp`), then made rank 0's once here
    (:func:`sync_masks`, after DDP has checked the parameters' shapes agree
    and broadcast rank 0's parameters); every other
    buffer (BatchNorm statistics) is still broadcast as ``broadcast_buffers``
    says. Pass the result to ``SAM(..., model=ddp)``.
    """
    if isinstance(model, DistributedDataParallel):
        raise TypeError("model is already a DistributedDataParallel: pass the module it wraps")
    if not _initialized():
        raise RuntimeError("wrap_ddp needs an initialised process group (torch.distributed.init_process_group, "
                           "or run the script under torchrun)")
    ignore_masks_in_ddp(model)
    ddp = DistributedDataParallel(model, **ddp_kwargs)
    sync_masks(model)
    return ddp


def distributed_sampler(dataset: Dataset, *, shuffle: bool = True, seed: int = 0,
                        drop_last: bool = False) -> Optional[DistributedSampler]:
    """A ``DistributedSampler`` giving this rank its part of ``dataset``, or None in a world of one process.

    Pass it as ``DataLoader(dataset, sampler=sampler, shuffle=shuffle and sampler is None)`` and call
    ``sampler.set_epoch(epoch)`` at the start of every epoch (or every epoch shuffles alike). Without
    ``drop_last`` the last ranks repeat a few samples so that every rank has as many.
    """
    if not hasattr(dataset, "__len__"):
        raise TypeError(f"dataset must be a map-style dataset with a length, got {type(dataset).__name__}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    rank, size, _ = world()
    if size == 1:
        return None
    return DistributedSampler(dataset, num_replicas=size, rank=rank, shuffle=bool(shuffle), seed=int(seed),
                              drop_last=bool(drop_last))


def _reduce_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo (and the rest) CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(metrics: Mapping[str, float], weight: float = 1.0) -> Dict[str, float]:
    """The mean of each metric over the ranks, each rank counting ``weight`` (e.g. its number of samples).

    One all-reduce for all the metrics. Every rank must pass the same names
    (in any order). In a world of one process, the metrics as floats.
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of names to numbers, got {type(metrics).__name__}")
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise TypeError(f"metrics names must be strings, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)) or (
                isinstance(value, torch.Tensor) and value.numel() != 1):
            raise TypeError(f"metrics[{name!r}] must be a number, got {value!r}")
    names = sorted(metrics)
    values = torch.tensor([float(metrics[name]) for name in names], dtype=torch.float64)
    return dict(zip(names, _weighted_mean_over_ranks(values, weight).tolist()))


def _weighted_mean_over_ranks(values: torch.Tensor, weight: float) -> torch.Tensor:
    """``sum_r weight_r * values_r / sum_r weight_r`` in float64 with one all-reduce (``values`` itself in a
    world of one process): the reduction behind :func:`all_reduce_mean` and :func:`all_reduce_tensors_mean`."""
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    if not _initialized() or dist.get_world_size() == 1:
        if weight == 0:
            raise ValueError("weight must be > 0 on at least one rank")
        return values
    device = _reduce_device()
    packed = torch.cat([values.to(device, torch.float64) * float(weight),
                        torch.tensor([float(weight)], dtype=torch.float64, device=device)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    total = float(packed[-1])
    if total == 0:
        raise ValueError("weight must be > 0 on at least one rank")
    return packed[:-1] / total


def all_reduce_tensors_mean(tensors: Mapping[str, torch.Tensor], weight: float = 1.0) -> Dict[str, torch.Tensor]:
    """The mean of each tensor over the ranks, each rank counting ``weight`` (e.g. the samples it scored).

    For a statistic every rank computes from its own share of the data
    (AdaSAP's Taylor channel scores) that every rank must then use alike.
    One all-reduce of the tensors flattened together, in float64 (so the
    result does not depend on the order of the ranks' sums beyond float64
    rounding, and is the same bits on every rank); each result keeps its
    tensor's dtype, shape and device. Every rank must pass the same names
    with the same shapes. In a world of one process, the tensors themselves.
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of names to tensors, got {type(tensors).__name__}")
    for name, value in tensors.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"tensors must map names (str) to tensors, got {name!r}: {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"tensors[{name!r}] must be floating point, got {value.dtype}")
    names = sorted(tensors)
    if not _initialized() or dist.get_world_size() == 1:
        _weighted_mean_over_ranks(torch.empty(0, dtype=torch.float64), weight)  # the weight's checks alone
        return dict(tensors)
    flat = torch.cat([tensors[name].detach().to(_reduce_device(), torch.float64).reshape(-1) for name in names])
    means = _weighted_mean_over_ranks(flat, weight)
    out, offset = {}, 0
    for name in names:
        value = tensors[name]
        out[name] = means[offset:offset + value.numel()].reshape(value.shape).to(value.device, value.dtype)
        offset += value.numel()
    return {name: out[name] for name in tensors}


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (one all-reduce); ``flag`` itself in a world of one process.

    For decisions every rank must take together: a rank that stops alone
    (a diverged loss it saw first, a signal) leaves the others waiting forever
    in their next collective.
    """
    if not isinstance(flag, (bool, torch.Tensor)) or (isinstance(flag, torch.Tensor) and flag.numel() != 1):
        raise TypeError(f"flag must be a bool, got {flag!r}")
    if not _initialized() or dist.get_world_size() == 1:
        return bool(flag)
    packed = torch.tensor([1 if bool(flag) else 0], dtype=torch.int32, device=_reduce_device())
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return bool(packed.item())


# --- What a command run under torchrun needs -------------------------------------------------------------

def launched_world_size() -> int:
    """The number of processes torchrun started (its ``WORLD_SIZE``; 1 when not run by torchrun)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(text)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE must be an integer (torchrun sets it), got {text!r}") from None
    if size < 1:
        raise ConfigError(f"WORLD_SIZE must be >= 1, got {size}")
    return size


@contextlib.contextmanager
def process_group(device: str = "cpu") -> Iterator[World]:
    """The process group torchrun's environment asks for, for the ``with`` block; yields :func:`world`.

    With ``WORLD_SIZE`` > 1 (torchrun sets it, with ``RANK``, ``LOCAL_RANK``,
    ``MASTER_ADDR`` and ``MASTER_PORT``): gloo for ``device`` "cpu", NCCL for
    "cuda" (this process then works on ``cuda:LOCAL_RANK``, see
    :func:`rank_device`); the group is destroyed when the block ends, however
    it ends. Without torchrun (or with one process) nothing is set up, and the
    block runs exactly as it would without this wrapper. An already
    initialised group (a script that made its own) is used and left alone.
    """
    if not isinstance(device, str):
        raise TypeError(f"device must be a str such as 'cpu' or 'cuda', got {type(device).__name__}")
    if launched_world_size() == 1 or _initialized():
        yield world()
        return
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 (torchrun) but this torch has no torch.distributed")
    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield world()
        # No rank tears the group down (rank 0: its TCPStore) while another still uses it: under load a
        # gloo rank whose peer had already destroyed the group aborted ("terminate called without an
        # active exception"). Skipped after an error, where the other ranks may never arrive.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` for "cuda" under torchrun, else ``device``.

    Under torchrun an explicit ``cuda:N`` is refused (every rank would take
    the same GPU): give "cuda" and let each rank take its local one.
    """
    if not isinstance(device, torch.device):
        raise TypeError(f"device must be a torch.device, got {type(device).__name__}")
    rank, size, local_rank = world()
    if size == 1 or device.type != "cuda":
        return device
    if device.index is not None and device.index != local_rank:
        raise ConfigError(f"--device {device} under torchrun: give --device cuda (rank {rank} takes "
                          f"cuda:LOCAL_RANK, here cuda:{local_rank})")
    return torch.device("cuda", local_rank)


def data_parallel(model: nn.Module) -> nn.Module:
    """Under torchrun, :func:`wrap_ddp` of ``model`` on its device (``device_ids`` for a CUDA model); in a world
    of one process, ``model`` itself. What the commands train through."""
    if world().size == 1:
        return model
    device = next(iter(model.parameters()), torch.empty(0)).device
    return wrap_ddp(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module a DistributedDataParallel wraps (``model`` itself otherwise): what is saved and evaluated."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _sendable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling unchanged in kind and message (ConfigError, the bad-file errors and
    TrainingDiverged do), else a ConfigError with its text for a ValueError (the CLI reports both with exit
    status 2), or a RuntimeError naming it."""
    try:
        pickle.dumps(error)
        # deepcopy rebuilds it through the same __reduce__ the receiving ranks' unpickling will call.
        rebuilt = copy.deepcopy(error)
        if type(rebuilt) is type(error) and str(rebuilt) == str(error):
            return error
    except Exception:  # noqa: BLE001 - any object that does not pickle is replaced below
        pass
    if isinstance(error, ValueError):
        return ConfigError(str(error))
    return RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}")


def on_main_process(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Run ``fn(*args, **kwargs)`` on rank 0 only; every rank returns its result (which must pickle: it
    travels by ``dist.broadcast_object_list``, which the other ranks unpickle -- data from rank 0 of the
    same job, never from a file).

    For what must happen once (write a file, make a folder, evaluate the
    test set, read a checkpoint) and whose outcome every rank needs: the
    others wait in the broadcast of the result, so it is also a barrier
    after the write. An exception on rank 0 is raised on every rank (the
    same kind and message where it pickles, see ``_sendable``), so all the
    ranks stop together instead of waiting forever. Every rank must call it
    (a collective). In a world of one process: ``fn(*args, **kwargs)``.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not _initialized() or dist.get_world_size() == 1:
        return fn(*args, **kwargs)
    failure: Optional[BaseException] = None
    payload: List[Any] = [None]
    if dist.get_rank() == 0:
        try:
            payload = [(True, fn(*args, **kwargs))]
        except Exception as error:  # noqa: BLE001 - sent to every rank, then raised here as it was
            failure = error
            payload = [(False, _sendable(error))]
    dist.broadcast_object_list(payload, src=0)
    ok, value = payload[0]
    if failure is not None:
        raise failure
    if not ok:
        raise value
    return value


def set_sampler_epoch(loader: Any, epoch: int) -> None:
    """``loader.sampler.set_epoch(epoch)`` when the loader draws through a DistributedSampler (else nothing):
    without it every epoch would visit the data in the same order."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def reseed_for_epoch(seed: int, epoch: int) -> None:
    """Under torchrun: seed torch's, Python's and NumPy's global generators from (seed, rank, epoch).

    The random-number policy of a multi-process run: every epoch starts
    from streams that depend only on the run's seed, this rank and the
    epoch, so a run resumed at any epoch boundary draws what the
    uninterrupted run drew (nothing per rank has to be checkpointed), and
    ranks draw different numbers (dropout, random augmentation) for their
    different samples. In a world of one process it does nothing: a
    single-process run keeps its checkpointed streams.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
        raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
    rank, size, _ = world()
    if size == 1:
        return
    state = np.random.SeedSequence([int(seed) % 2**63, rank, int(epoch)]).generate_state(2, dtype=np.uint32)
    mixed = int(state[0]) << 32 | int(state[1])
    random.seed(mixed)
    np.random.seed(int(state[0]))
    torch.manual_seed(mixed)


__all__ = ["World", "all_reduce_mean", "all_reduce_tensors_mean", "any_rank", "data_parallel", "distributed_sampler",
           "fixed_mask_buffer_names", "ignore_masks_in_ddp", "is_main_process", "launched_world_size", "on_main_process", "process_group",
           "rank_device", "reseed_for_epoch", "set_sampler_epoch", "sync_masks", "unwrap", "world", "wrap_ddp"]
