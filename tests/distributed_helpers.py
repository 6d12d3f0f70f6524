"""Start N CPU processes joined by a gloo process group, as torchrun would, and run one function in each.

The function must live at a module's top level (the spawned processes import
it by name) and take ``(rank, world_size, *args)``; an exception in any
process fails the caller (torch.multiprocessing.spawn raises it)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # as sparsesam.distributed.process_group: no rank destroys the group under another
    finally:
        dist.destroy_process_group()


def run_ranks(fn, *args, world_size: int = 2) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes and wait for all of them."""
    mp.spawn(_entry, args=(fn, world_size, _free_port(), args), nprocs=world_size, join=True)
