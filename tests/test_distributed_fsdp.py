"""FSDP2 (``fully_shard``) with masked layers and the fused SAM, in 2 gloo processes on CPU.

FSDP2 runs on CPU with gloo in torch 2.14. Each masked layer and the root are
sharded (the 5-row head splits 3 + 2: an uneven cut); SAM works on the local
shards with the masks cut like their weights and the squared norm summed over
the ranks. The gathered weights equal one process training on both halves of
each batch (tests/distributed_models.py), and pruned weights never move."""
import pytest
import torch

from sparsesam.nn import masked_layers
from sparsesam.optim import FusedMaskedSGD, param_masks
from distributed_helpers import needs_gloo, run_ranks
from distributed_models import batch, make_sam, masked_cnn, part_of, train

STEPS = 3


def _full_state(model):
    """The whole state_dict, each sharded parameter gathered (every rank takes part)."""
    return {name: (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone()
            for name, value in model.state_dict().items()}


def _sam(model, base, adaptive):
    """make_sam, plus (SGD case) per-channel radii on the head: 5 radii that the shards must split 3 + 2."""
    optimizer = make_sam(model.parameters(), model, base, adaptive)
    if base == "sgd":
        optimizer.set_channel_rho(model[7].weight, torch.tensor([0.02, 0.05, 0.1, 0.2, 0.4]))
    return optimizer


def _train_fsdp(rank, world_size, base, adaptive, out_path):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = masked_cnn()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _, layer in masked_layers(model):
        fully_shard(layer)
    fully_shard(model)
    head = model[7]
    assert isinstance(head.weight, DTensor) and head.weight.to_local().shape[0] == (3 if rank == 0 else 2)
    optimizer = _sam(model, base, adaptive)
    train(model, optimizer, STEPS, rank=rank, world_size=world_size)
    state = _full_state(model)
    for name, layer in masked_layers(model):
        weight, pruned = state[f"{name}.weight"], ~layer.weight_mask
        assert torch.equal(weight[pruned], before[f"{name}.weight"][pruned]), f"{name}: a pruned weight moved"
        assert not torch.equal(weight, before[f"{name}.weight"]), f"{name}: no weight moved at all"
    if rank == 0:
        torch.save(state, out_path)


@needs_gloo
@pytest.mark.parametrize("base, adaptive", [("sgd", False), ("adam", True)],
                         ids=["sam-fused-sgd-channel-rho", "asam-adam"])
def test_fsdp2_sam_with_masks_matches_one_process(tmp_path, base, adaptive):
    out = tmp_path / "rank0.pt"
    run_ranks(_train_fsdp, base, adaptive, str(out))
    torch.set_num_threads(1)  # as each rank (distributed_helpers._entry): the same float32 sum orders
    reference = masked_cnn()
    train(reference, _sam(reference, base, adaptive), STEPS, parts=2)
    got = torch.load(out)
    assert set(got) == set(reference.state_dict())
    for name, expected in reference.state_dict().items():
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _sgd_steps(model, optimizer, steps, *, rank=0, world_size=1):
    """Plain (not SAM) steps; one process takes the whole batch (BatchNorm in eval mode: no per-part statistics)."""
    for step in range(steps):
        x, y = batch(step)
        if world_size > 1:
            x, y = part_of(x, rank, world_size), part_of(y, rank, world_size)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()


def _fused_sgd_alone(rank, world_size, out_path):
    from torch.distributed.fsdp import fully_shard

    model = masked_cnn().eval()
    whole = param_masks(model)  # whole masks, keyed by the parameters fully_shard is about to replace
    masks = {name: whole[p] for name, p in model.named_parameters() if p in whole}
    for _, layer in masked_layers(model):
        fully_shard(layer)
    fully_shard(model)
    by_id = {id(p): masks[name] for name, p in model.named_parameters() if name in masks}
    optimizer = FusedMaskedSGD(model.parameters(), masks_of=lambda ps: [by_id.get(id(p)) for p in ps], lr=0.1,
                               momentum=0.9)
    _sgd_steps(model, optimizer, STEPS, rank=rank, world_size=world_size)
    state = _full_state(model)
    if rank == 0:
        torch.save(state, out_path)


@needs_gloo
def test_fsdp2_fused_sgd_alone_cuts_whole_masks(tmp_path):
    out = tmp_path / "rank0.pt"
    run_ranks(_fused_sgd_alone, str(out))
    torch.set_num_threads(1)  # as each rank (distributed_helpers._entry): the same float32 sum orders
    reference = masked_cnn().eval()
    masks = param_masks(reference)
    optimizer = FusedMaskedSGD(reference.parameters(), masks_of=lambda ps: [masks.get(p) for p in ps], lr=0.1,
                               momentum=0.9)
    _sgd_steps(reference, optimizer, STEPS)
    got = torch.load(out)
    for name, expected in reference.state_dict().items():
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
