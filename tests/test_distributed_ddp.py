"""DDP with masked layers, BatchNorm and SAM(model=ddp), in 2 gloo processes on CPU.

Every rank ends with the same parameters, equal to one process training on
both halves of each batch (tests/distributed_models.py says why that
reference, and not the concatenated batch: BatchNorm normalises each rank's
part by its own statistics); pruned weights never move; and wrap_ddp keeps
the masks out of DDP's per-forward buffer broadcast while the BatchNorm
statistics are still broadcast."""
import pytest
import torch
import torch.distributed as dist
from torch import nn
import torch.nn.functional as F

from sparsesam.distributed import fixed_mask_buffer_names, ignore_masks_in_ddp, wrap_ddp
from sparsesam.nn import MaskedLinear, masked_layers
from distributed_helpers import needs_gloo, run_ranks
from distributed_models import batch, make_sam, masked_cnn, part_of, train

STEPS = 3


def _flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _train_ddp(rank, world_size, out_path):
    model = masked_cnn()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ddp = wrap_ddp(model)
    optimizer = make_sam(ddp.parameters(), ddp)
    train(ddp, optimizer, STEPS, rank=rank, world_size=world_size)
    flat = _flat_params(model)
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], t) for t in gathered), "ranks hold different parameters"
    for _, layer in masked_layers(model):
        name = next(n for n, p in model.named_parameters() if p is layer.weight)
        pruned = ~layer.weight_mask
        assert torch.equal(layer.weight[pruned], before[name][pruned]), f"{name}: a pruned weight moved"
        assert not torch.equal(layer.weight, before[name]), f"{name}: no weight moved at all"
    if rank == 0:
        torch.save(model.state_dict(), out_path)


@needs_gloo
def test_ddp_sam_with_masks_and_batchnorm_matches_one_process(tmp_path):
    out = tmp_path / "rank0.pt"
    run_ranks(_train_ddp, str(out))
    torch.set_num_threads(1)  # as each rank (distributed_helpers._entry): the same float32 sum orders
    reference = masked_cnn()
    train(reference, make_sam(reference.parameters(), reference), STEPS, parts=2)
    got = torch.load(out)
    assert set(got) == set(reference.state_dict())
    for name, expected in reference.state_dict().items():  # parameters, masks and BatchNorm statistics
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _broadcasts(rank, world_size):
    # momentum=0: a forward leaves the running statistics as they are, so after
    # one forward they are exactly what the broadcast (or its absence) left.
    model = masked_cnn(bn_momentum=0.0)
    conv = model[0]
    if rank == 1:
        conv.weight_mask.logical_not_()        # a different mask: wrap_ddp must replace it by rank 0's
    ddp = wrap_ddp(model)
    rank0_mask = conv.weight_mask.clone()  # every rank holds rank 0's now (checked below)
    masks = set(fixed_mask_buffer_names(model))
    assert masks == {"0.weight_mask", "3.weight_mask", "7.weight_mask"}
    assert masks.isdisjoint(ddp.named_module_buffers), "masks are in DDP's broadcast set"
    assert {"1.running_mean", "1.running_var", "4.running_mean"} <= set(ddp.named_module_buffers)
    gathered = [torch.empty_like(conv.weight_mask, dtype=torch.uint8) for _ in range(world_size)]
    dist.all_gather(gathered, conv.weight_mask.to(torch.uint8))
    assert torch.equal(gathered[0], gathered[1]), "wrap_ddp did not give every rank rank 0's masks"
    if rank == 1:
        # Diverge on purpose after wrapping: the next forward must overwrite the statistics, not the mask.
        conv.weight_mask.logical_not_()
        model[1].running_mean.fill_(7.0)
    x, y = batch(0)
    F.cross_entropy(ddp(part_of(x, rank, world_size)), part_of(y, rank, world_size)).backward()
    assert torch.equal(model[1].running_mean, torch.zeros(4)), "BatchNorm statistics were not broadcast"
    expected_mask = rank0_mask if rank == 0 else ~rank0_mask
    assert torch.equal(conv.weight_mask, expected_mask), "the mask was broadcast"

    # The control: a plain DDP broadcasts the masks before every forward.
    plain_model = masked_cnn(bn_momentum=0.0)
    plain = nn.parallel.DistributedDataParallel(plain_model)
    if rank == 1:
        plain_model[0].weight_mask.logical_not_()
    plain(part_of(x, rank, world_size))
    assert torch.equal(plain_model[0].weight_mask, masked_cnn()[0].weight_mask)


def _ascent_without_sync(rank, world_size):
    # The SAM paper's m-sharpness: each rank perturbs by its own gradient (the ascent backward inside
    # no_sync), the descent gradient is averaged. Ranks must still end identical, pruned weights unmoved.
    model = masked_cnn()
    before = [layer.weight.detach().clone() for _, layer in masked_layers(model)]
    ddp = wrap_ddp(model)
    optimizer = make_sam(ddp.parameters(), ddp)
    for step in range(STEPS):
        x, y = batch(step)
        x, y = part_of(x, rank, world_size), part_of(y, rank, world_size)
        with ddp.no_sync():
            F.cross_entropy(ddp(x), y).backward()
        local_grad = model[0].weight.grad.clone()
        optimizer.first_step(zero_grad=True)
        F.cross_entropy(ddp(x), y).backward()
        optimizer.second_step(zero_grad=True)
    gathered = [torch.empty_like(local_grad) for _ in range(world_size)]
    dist.all_gather(gathered, local_grad)
    assert not torch.equal(gathered[0], gathered[1]), "the ascent gradients were averaged after all"
    flat = _flat_params(model)
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), "ranks hold different parameters"
    for (_, layer), start in zip(masked_layers(model), before):
        assert torch.equal(layer.weight[~layer.weight_mask], start[~layer.weight_mask])


@needs_gloo
def test_ascent_pass_under_no_sync_keeps_ranks_identical():
    run_ranks(_ascent_without_sync)


@needs_gloo
def test_wrap_ddp_keeps_masks_out_of_the_buffer_broadcast():
    run_ranks(_broadcasts)


def test_mask_names_are_fixed_masks_only():
    model = nn.Sequential(masked_cnn(), MaskedLinear(5, 3, mask_mode="trainable"))
    # A trainable mask is a parameter: DDP must average its gradient, so it is not ignored.
    assert fixed_mask_buffer_names(model) == ["0.0.weight_mask", "0.3.weight_mask", "0.7.weight_mask"]
    assert fixed_mask_buffer_names(nn.Linear(2, 2)) == []


def test_ignore_masks_keeps_names_already_ignored_and_refuses_a_wrapped_model():
    model = masked_cnn()
    model._ddp_params_and_buffers_to_ignore = ["1.running_mean"]
    ignore_masks_in_ddp(model)
    ignore_masks_in_ddp(model)  # twice: no duplicates
    assert model._ddp_params_and_buffers_to_ignore == ["1.running_mean", "0.weight_mask", "3.weight_mask",
                                                       "7.weight_mask"]
    with pytest.raises(TypeError, match="model"):
        fixed_mask_buffer_names("model")
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        wrap_ddp(nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel))


def test_wrap_ddp_needs_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        wrap_ddp(masked_cnn())
