"""The paper algorithms trained data-parallel (2 gloo ranks): every parameter, score, rate, mask, the
algorithm's own state and the history bitwise equal on both ranks, and -- where nothing depends on BatchNorm
or on the sampler's order -- 2 ranks x batch B equal to one process on the concatenated 2B batches."""
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from sparsesam.distributed import data_parallel
from distributed_helpers import needs_gloo, run_ranks

BATCH = 4   # per rank; one process takes 2 * BATCH
SAMPLES = 16


def _data():
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.rand(SAMPLES, 1, 6, 6, generator=g), torch.randint(0, 5, (SAMPLES,), generator=g))


def _model(batch_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    norm = [nn.BatchNorm2d(4)] if batch_norm else []
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), *norm, nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _fit(algorithm_type, config, batch_norm, parallel):
    """fit() on the data in a fixed order: under a process group, each rank's DistributedSampler share (rank r
    takes samples r, r + 2, ...; together a step's two batches are one process's batch of 2B, in order)."""
    data = _data()
    sampler = DistributedSampler(data, shuffle=False) if parallel else None
    loader = DataLoader(data, batch_size=BATCH if parallel else 2 * BATCH, shuffle=False, sampler=sampler)
    model = _model(batch_norm)
    algorithm = algorithm_type(config)
    result = algorithm.fit(model, loader, progress=False, parallel=data_parallel if parallel else None)
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "algorithm_state": algorithm._state(), "history": result.history, "summary_sparsity":
            result.summary["sparsity"]}


def _ranks(rank, world_size, algorithm_type, config, batch_norm, out):
    mine = _fit(algorithm_type, config, batch_norm, parallel=True)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        torch.save(gathered, out)


def _assert_ranks_identical(gathered):
    first, second = gathered
    assert first["state"].keys() == second["state"].keys()
    for key, value in first["state"].items():
        if "running_" in key:
            # DDP broadcasts rank 0's BatchNorm statistics before every forward; the last forward's update is
            # each rank's own (rank 0's is the one saved), as in any DDP training.
            continue
        assert torch.equal(value, second["state"][key]), f"{key} differs across ranks"
    assert first["algorithm_state"] == second["algorithm_state"]
    assert first["history"] == second["history"]


def run_data_parallel(tmp_path, algorithm_type, config, *, batch_norm, compare_one_process, rtol=1e-4, atol=1e-5):
    out = os.path.join(tmp_path, f"{algorithm_type.name}.pt")
    run_ranks(_ranks, algorithm_type, config, batch_norm, out)
    gathered = torch.load(out, weights_only=True)
    _assert_ranks_identical(gathered)
    if compare_one_process:
        torch.set_num_threads(1)  # as each rank computes (conftest restores the session's count)
        one = _fit(algorithm_type, config, batch_norm, parallel=False)
        got = gathered[0]
        assert len(got["history"]) == len(one["history"])
        for key, value in one["state"].items():
            if not value.is_floating_point():  # fixed masks: the same choice, exactly
                assert torch.equal(got["state"][key], value), key
            else:
                torch.testing.assert_close(got["state"][key], value, rtol=rtol, atol=atol, msg=key)
        for mine, theirs in zip(got["history"], one["history"]):
            for column, value in theirs.items():
                if isinstance(value, float):
                    assert mine[column] == pytest.approx(value, rel=rtol, abs=atol), column
    return gathered[0]


# --- HYDRA and HARP: scores and rates learnt by gradient, all-reduced by DDP ---------------------------------

def _score_config(config_type, **extra):
    return config_type(target_sparsity=0.5, search_epochs=2, finetune_epochs=1, loss="clean", execution="dense",
                       **extra)


@needs_gloo
def test_hydra_ranks_agree_and_equal_one_process(tmp_path):
    from sparsesam.algorithms import Hydra, HydraConfig
    run_data_parallel(tmp_path, Hydra, _score_config(HydraConfig), batch_norm=False, compare_one_process=True)


@needs_gloo
def test_harp_ranks_agree_and_equal_one_process(tmp_path):
    from sparsesam.algorithms import HARP, HARPConfig
    config = _score_config(HARPConfig, gamma=1.0)
    result = run_data_parallel(tmp_path, HARP, config, batch_norm=False, compare_one_process=True)
    # The hardware loss took part (so the one-process match shows it is not counted twice) and the rates moved.
    assert result["history"][0]["hw_loss"] > 0
    initial = HARP(config).initial_keep
    assert all(abs(rate - initial) > 1e-4 for rate in result["algorithm_state"]["learnt_rates"].values())


@needs_gloo
def test_harp_channel_under_an_attack_with_batch_norm_keeps_ranks_identical(tmp_path):
    """The default adversarial loss (PGD-AT: the attack's backward runs through DDP) and BatchNorm, whose affine
    parameters HARP's search trains: ranks identical (one process differs by BatchNorm's per-part statistics)."""
    from sparsesam.algorithms import HARP, HARPConfig
    config = _score_config(HARPConfig, gamma=1.0, granularity="channel")
    config.loss, config.attack_steps = "pgd_at", 2
    result = run_data_parallel(tmp_path, HARP, config, batch_norm=True, compare_one_process=False)
    assert result["history"][-1]["phase"] == "finetune"


# --- C-SAM: SAM in mask space, its ascent norm over the averaged gradient ---------------------------------

def _csam_config(**extra):
    from sparsesam.algorithms import CSAMConfig
    return CSAMConfig(target_sparsity=0.5, mask_epochs=2, finetune_epochs=1, execution="dense", **extra)


@needs_gloo
def test_csam_ranks_agree_and_equal_one_process(tmp_path):
    """The margin's normaliser and the transforms' draws span the global batch, so 2 ranks x B equal 1 x 2B."""
    from sparsesam.algorithms import CSAM
    result = run_data_parallel(tmp_path, CSAM, _csam_config(lambda_margin=1.0), batch_norm=False,
                               compare_one_process=True)
    mask_epochs = [entry for entry in result["history"] if entry["phase"] == "mask"]
    assert mask_epochs[0]["margin"] > 0 and mask_epochs[0]["discrepancy"] > 0


@needs_gloo
def test_csam_with_batch_norm_keeps_ranks_identical(tmp_path):
    from sparsesam.algorithms import CSAM
    run_data_parallel(tmp_path, CSAM, _csam_config(), batch_norm=True, compare_one_process=False)


# --- AdaSAP and its control asam_prune: per-channel radii from scores every rank agrees on ---------------

def _adasap_config(config_type, **extra):
    return config_type(target_sparsity=0.5, adaptive_epochs=2, finetune_epochs=1, execution="dense", **extra)


@needs_gloo
def test_adasap_l2_ranks_agree_and_equal_one_process(tmp_path):
    from sparsesam.algorithms import AdaSAP, AdaSAPConfig
    result = run_data_parallel(tmp_path, AdaSAP, _adasap_config(AdaSAPConfig), batch_norm=False,
                               compare_one_process=True)
    assert result["history"][0]["rho_spread"] > 0  # the radii are per channel
    assert result["summary_sparsity"] == pytest.approx(0.5)


@needs_gloo
def test_adasap_taylor_with_batch_norm_keeps_ranks_identical(tmp_path):
    """Taylor scores come from each rank's own batches: averaged over the ranks, they set the same radii and
    prune the same channels everywhere (else the compacted fine-tuning would not even build one DDP)."""
    from sparsesam.algorithms import AdaSAP, AdaSAPConfig
    result = run_data_parallel(tmp_path, AdaSAP, _adasap_config(AdaSAPConfig, criterion="taylor", taylor_batches=2),
                               batch_norm=True, compare_one_process=False)
    assert result["history"][-1]["phase"] == "finetune"


@needs_gloo
def test_asam_prune_taylor_ranks_agree(tmp_path):
    from sparsesam.algorithms import AsamPrune, AsamPruneConfig
    run_data_parallel(tmp_path, AsamPrune, _adasap_config(AsamPruneConfig, criterion="taylor", taylor_batches=2),
                      batch_norm=False, compare_one_process=False)


def _average_ranks(rank, world_size):
    from sparsesam.distributed import all_reduce_tensors_mean
    mine = {"a": torch.full((2, 3), float(rank + 1)), "b": torch.tensor([rank * 4.0], dtype=torch.float32)}
    # rank 0 counts 1 sample, rank 1 three: (1 * 1 + 3 * 2) / 4 and (1 * 0 + 3 * 4) / 4
    mean = all_reduce_tensors_mean(mine, weight=1 if rank == 0 else 3)
    assert torch.equal(mean["a"], torch.full((2, 3), 7 / 4)) and mean["a"].dtype == torch.float32
    assert torch.equal(mean["b"], torch.tensor([3.0]))


@needs_gloo
def test_all_reduce_tensors_mean_weights_the_ranks():
    run_ranks(_average_ranks)


def test_all_reduce_tensors_mean_in_one_process_and_bad_input():
    from sparsesam.distributed import all_reduce_tensors_mean
    x = torch.ones(3)
    assert all_reduce_tensors_mean({"x": x})["x"] is x
    with pytest.raises(TypeError, match="floating point"):
        all_reduce_tensors_mean({"x": torch.ones(3, dtype=torch.long)})
    with pytest.raises(ValueError, match="weight"):
        all_reduce_tensors_mean({"x": x}, weight=-1)
    with pytest.raises(TypeError, match="tensors must"):
        all_reduce_tensors_mean([x])


# --- Every built-in algorithm trains data-parallel; one that does not declare it is refused by name --------

def test_every_builtin_algorithm_is_data_parallel():
    from sparsesam.algorithms.registry import algorithm_registry
    assert sorted(name for name, cls in algorithm_registry().items() if not cls.data_parallel) == []


def test_an_algorithm_that_is_not_data_parallel_is_refused_by_name_under_torchrun(monkeypatch):
    from sparsesam import pruning_run
    from sparsesam._validate import ConfigError
    from sparsesam.algorithms import Hydra
    from sparsesam.algorithms.registry import algorithm_registry
    from sparsesam.distributed import World

    class RankLocal(Hydra):
        name = "rank_local"
        data_parallel = False

    registry = {**algorithm_registry(), "rank_local": RankLocal}
    pruning_run.check_data_parallel("rank_local", registry)  # one process: anything runs
    monkeypatch.setattr(pruning_run, "world", lambda: World(0, 2, 0))
    pruning_run.check_data_parallel("hydra", registry)
    with pytest.raises(ConfigError, match=r"--algorithm rank_local cannot run under torchrun \(world size 2\)"
                                          r".*'magnitude'"):
        pruning_run.check_data_parallel("rank_local", registry)
