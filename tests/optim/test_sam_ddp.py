"""SAM under DistributedDataParallel: 2 CPU processes (gloo) on halves of a
global batch end with the weights of one process on the whole batch.

DDP averages gradients in both backward passes, so every rank sees the same
gradient, takes the same norm and perturbs identically."""
import torch
import torch.distributed as dist
from torch import nn
import torch.nn.functional as F

from sparsesam.optim import SAM

from distributed_helpers import needs_gloo, run_ranks

STEPS = 4
GLOBAL_BATCH = 16


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(GLOBAL_BATCH, 1, 6, 6, generator=g), torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)


def _train(model, x_of, y_of, opt_model):
    optimizer = SAM(opt_model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, weight_decay=1e-3)
    for step in range(STEPS):
        x, y = x_of(step), y_of(step)
        F.cross_entropy(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.second_step(zero_grad=True)


def _worker(rank, world, out_path):
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    half = GLOBAL_BATCH // world
    part = slice(rank * half, (rank + 1) * half)
    _train(ddp, lambda s: _batch(s)[0][part], lambda s: _batch(s)[1][part], ddp)
    if rank == 0:
        torch.save(model.state_dict(), out_path)
    # Every rank must hold the same weights.
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], t) for t in gathered)


@needs_gloo
def test_two_process_ddp_matches_one_process(tmp_path):
    out = tmp_path / "rank0.pt"
    run_ranks(_worker, str(out))
    single = _model()
    _train(single, lambda s: _batch(s)[0], lambda s: _batch(s)[1], single)
    for (name, a), (_, b) in zip(torch.load(out).items(), single.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
