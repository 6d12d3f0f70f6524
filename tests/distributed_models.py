"""The small masked CNN (masked convs, BatchNorm, a masked linear head) and the training the distributed tests share.

Data parallelism over W ranks, each with its part of a global batch, computes
the gradient of the mean of the W per-part losses (DDP averages the
gradients; FSDP2's reduce-scatter too), each part normalised by BatchNorm with
its own batch statistics (SyncBatchNorm needs a GPU), and rank 0's running
statistics are updated by rank 0's part only. ``train(..., parts=W)`` in one
process computes exactly that, so it is the reference every rank must equal.
"""
import torch
from torch import nn
import torch.nn.functional as F

from sparsesam.nn import MaskedConv2d, MaskedLinear, masked_layers
from sparsesam.optim import SAM
from sparsesam.optim.batchnorm import restore_bn_stats, snapshot_bn_stats

GLOBAL_BATCH = 16
CLASSES = 5


def masked_cnn(bn_momentum: float = 0.1) -> nn.Sequential:
    """Masked convs with BatchNorm and a 5-way masked head (5 rows: an uneven split over 2 ranks); about half
    of every weight pruned, the same on every rank (seeded)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        MaskedConv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=bn_momentum), nn.ReLU(),
        MaskedConv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6, momentum=bn_momentum), nn.ReLU(),
        nn.Flatten(), MaskedLinear(6 * 6 * 6, CLASSES))
    for _, layer in masked_layers(model):
        layer.set_mask(torch.rand(layer.weight.shape) < 0.5)
    return model


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 1, 6, 6, generator=g), torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g)


def part_of(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    size = GLOBAL_BATCH // world_size
    return tensor[rank * size:(rank + 1) * size]


def make_sam(params, model, base: str = "sgd", adaptive: bool = False) -> SAM:
    if base == "sgd":
        return SAM(params, torch.optim.SGD, rho=0.1, adaptive=adaptive, lr=0.1, momentum=0.9, weight_decay=1e-3,
                   model=model)
    return SAM(params, torch.optim.Adam, rho=0.1, adaptive=adaptive, lr=1e-2, weight_decay=1e-3, model=model)


def _backward_mean_part_loss(model, x, y, parts: int) -> None:
    """Backward of the mean of the per-part losses; only the first part's forward leaves its BatchNorm update.

    The other parts' updates are undone after backward (BatchNorm's autograd
    saved the running statistics: an in-place restore before would break it).
    """
    total, snapshot = 0, None
    for rank in range(parts):
        if rank == 1:
            snapshot = snapshot_bn_stats(model)
        total = total + F.cross_entropy(model(part_of(x, rank, parts)), part_of(y, rank, parts))
    (total / parts).backward()
    if snapshot is not None:
        restore_bn_stats(snapshot)


def train(model, optimizer: SAM, steps: int, *, rank: int = 0, world_size: int = 1, parts: int = 1) -> None:
    """``steps`` SAM steps. Distributed: this rank's part of each global batch. One process: ``parts`` parts."""
    for step in range(steps):
        x, y = batch(step)

        def backward():
            if world_size > 1:
                F.cross_entropy(model(part_of(x, rank, world_size)), part_of(y, rank, world_size)).backward()
            else:
                _backward_mean_part_loss(model, x, y, parts)

        backward()
        optimizer.first_step(zero_grad=True)
        backward()
        optimizer.second_step(zero_grad=True)
