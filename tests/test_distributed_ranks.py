"""Rank helpers: world(), is_main_process(), distributed_sampler(), all_reduce_mean(), in one process and in two."""
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset

from sparsesam.distributed import (World, all_reduce_mean, any_rank, distributed_sampler, is_main_process, sync_masks,
                                   world)
from distributed_helpers import needs_gloo, run_ranks
from distributed_models import masked_cnn


def test_a_world_of_one_without_a_process_group():
    assert world() == World(rank=0, size=1, local_rank=0)
    assert is_main_process()
    assert distributed_sampler(TensorDataset(torch.arange(10))) is None
    assert all_reduce_mean({"loss": torch.tensor(0.5), "accuracy": 1}) == {"accuracy": 1.0, "loss": 0.5}
    assert sync_masks(masked_cnn()) == 0
    assert any_rank(True) and not any_rank(False) and any_rank(torch.tensor(True))
    with pytest.raises(TypeError, match="flag"):
        any_rank("yes")


@pytest.mark.parametrize("metrics, weight, error, match", [
    ([("loss", 1.0)], 1.0, TypeError, "metrics must be a mapping"),
    ({1: 1.0}, 1.0, TypeError, "names must be strings"),
    ({"loss": "1"}, 1.0, TypeError, r"metrics\['loss'\] must be a number"),
    ({"loss": True}, 1.0, TypeError, r"metrics\['loss'\]"),
    ({"loss": torch.ones(2)}, 1.0, TypeError, r"metrics\['loss'\]"),
    ({"loss": 1.0}, -1.0, ValueError, "weight"),
    ({"loss": 1.0}, float("nan"), ValueError, "weight"),
    ({"loss": 1.0}, 0.0, ValueError, "weight must be > 0"),
])
def test_all_reduce_mean_rejects_bad_input(metrics, weight, error, match):
    with pytest.raises(error, match=match):
        all_reduce_mean(metrics, weight)


def test_bad_sampler_and_sync_arguments():
    with pytest.raises(TypeError, match="dataset"):
        distributed_sampler(iter([1, 2]))
    with pytest.raises(TypeError, match="seed"):
        distributed_sampler(TensorDataset(torch.arange(4)), seed=1.5)
    with pytest.raises(ValueError, match="src"):
        sync_masks(masked_cnn(), src=-1)


def _ranks(rank, world_size):
    assert world() == World(rank, world_size, 0)
    assert is_main_process() == (rank == 0)

    # The sampler: disjoint parts covering the dataset, reshuffled by set_epoch, the same order on every run.
    dataset = TensorDataset(torch.arange(10))
    sampler = distributed_sampler(dataset, shuffle=True, seed=3)
    parts = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        mine = torch.tensor(list(sampler))
        assert len(mine) == 5
        gathered = [torch.empty_like(mine) for _ in range(world_size)]
        dist.all_gather(gathered, mine)
        assert sorted(torch.cat(gathered).tolist()) == list(range(10))
        parts.append(mine)
    assert not torch.equal(parts[0], parts[1]), "set_epoch did not reshuffle"
    odd = distributed_sampler(TensorDataset(torch.arange(7)), shuffle=False, drop_last=True)
    assert list(odd) == ([0, 2, 4] if rank == 0 else [1, 3, 5])

    # Means: plain, and weighted by each rank's sample count.
    metrics = {"loss": 1.0 + rank, "accuracy": torch.tensor(0.5 * rank)}
    assert all_reduce_mean(metrics) == pytest.approx({"loss": 1.5, "accuracy": 0.25})
    assert all_reduce_mean(metrics, weight=3 if rank == 0 else 1) == pytest.approx({"loss": 1.25, "accuracy": 0.125})
    with pytest.raises(ValueError, match="weight must be > 0"):
        all_reduce_mean(metrics, weight=0)

    # any_rank: one rank's flag decides for all.
    assert any_rank(rank == 1) and any_rank(rank == 0) and not any_rank(False) and any_rank(True)

    # sync_masks gives every rank the chosen rank's masks.
    model = masked_cnn()
    if rank == 1:
        for layer in (model[0], model[3], model[7]):
            layer.weight_mask.logical_not_()
    expected = [m.clone() for m in (model[0].weight_mask, model[3].weight_mask, model[7].weight_mask)]
    assert sync_masks(model, src=1) == 3
    if rank == 0:
        expected = [~m for m in expected]
    assert all(torch.equal(m, e) for m, e in zip((model[0].weight_mask, model[3].weight_mask, model[7].weight_mask),
                                                  expected))
    with pytest.raises(ValueError, match="world size"):
        sync_masks(model, src=2)


@needs_gloo
def test_rank_helpers_in_two_processes():
    run_ranks(_ranks)
