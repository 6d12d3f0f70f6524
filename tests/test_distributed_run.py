"""What a command needs under torchrun: process_group, on_main_process, rank-0 checkpoints, agreed divergence
checks, per-epoch reseeding, and fit_dense in DDP (ranks identical, metrics all-reduced, one checkpoint)."""
import argparse
import os
import pickle
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset

from sparsesam._validate import ConfigError
from sparsesam.checkpoint import Checkpointer
from sparsesam.distributed import (World, launched_world_size, on_main_process, process_group, rank_device,
                                   reseed_for_epoch, unwrap, wrap_ddp)
from sparsesam.divergence import StepCheck, TrainingDiverged, check_state
from sparsesam.file_errors import BadCheckpointError
from sparsesam.run_setup import make_loaders
from sparsesam.training import fit_dense
from distributed_helpers import needs_gloo, run_ranks
from distributed_models import masked_cnn


# --- In one process: every helper is the plain call --------------------------------------------------------


def test_without_torchrun_nothing_is_set_up(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_world_size() == 1
    with process_group("cpu") as here:
        assert here == World(0, 1, 0)
        assert not dist.is_initialized()
    assert on_main_process(lambda a, b=0: a + b, 1, b=2) == 3
    with pytest.raises(KeyError):  # the exception itself, unchanged
        on_main_process({}.__getitem__, "missing")
    assert rank_device(torch.device("cuda", 3)) == torch.device("cuda", 3)  # left alone in one process
    model = torch.nn.Linear(2, 2)
    assert unwrap(model) is model


def test_reseed_for_epoch_does_nothing_in_one_process():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    reseed_for_epoch(0, 4)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("value", ["two", "0", "-1"])
def test_a_bad_world_size_is_a_config_error(monkeypatch, value):
    monkeypatch.setenv("WORLD_SIZE", value)
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        launched_world_size()


@pytest.mark.parametrize("call, error, match", [
    (lambda: on_main_process("not callable"), TypeError, "fn must be callable"),
    (lambda: reseed_for_epoch(1.5, 0), TypeError, "seed"),
    (lambda: reseed_for_epoch(0, -1), ValueError, "epoch"),
    (lambda: rank_device("cuda"), TypeError, "device"),
    (lambda: process_group(0).__enter__(), TypeError, "device"),
])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_bad_file_error_survives_pickling():
    # rank 0 sends it to the other ranks; the default pickling would call cls(message) and fail
    error = BadCheckpointError("/x/checkpoint.pt", "the checkpoint is empty (0 bytes)")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is BadCheckpointError and str(copy) == str(error) and copy.path == error.path


# --- In two gloo processes --------------------------------------------------------------------------------


class _Unpicklable(RuntimeError):
    def __reduce__(self):
        raise TypeError("not picklable")


def _main_process_ranks(rank, world_size, folder):
    # The result reaches every rank; only rank 0 ran the function.
    assert on_main_process(lambda: rank * 10 + 7) == 7
    # Rank 0's exception is raised on every rank, with its kind and message.
    for error in (ConfigError("--out x exists and is not a folder"),
                  BadCheckpointError(os.path.join(folder, "c.pt"), "it is empty"),
                  TrainingDiverged("the loss is nan", epoch=2, step=3)):
        def fail(error=error):
            raise error
        with pytest.raises(type(error)) as caught:
            on_main_process(fail)
        assert str(caught.value) == str(error)
    # One that does not pickle still stops every rank (a RuntimeError naming it elsewhere).
    def unpicklable():
        raise _Unpicklable("boom")
    with pytest.raises(RuntimeError, match="boom"):
        on_main_process(unpicklable)

    # Checkpoints: rank 0 writes, every rank reads rank 0's state (even one only rank 0 could see).
    checkpointer = Checkpointer(os.path.join(folder, "checkpoint.pt"))
    assert not checkpointer.exists() and checkpointer.load() is None
    checkpointer.save({"rank": rank, "w": torch.full((2,), float(rank))})
    assert sorted(os.listdir(folder)) == ["checkpoint.pt"]  # no temporary file left by a second writer
    assert checkpointer.exists()
    state = checkpointer.load(required=("rank",))
    assert state["rank"] == 0 and torch.equal(state["w"], torch.zeros(2))
    with pytest.raises(BadCheckpointError, match="lacks"):
        checkpointer.load(required=("missing",))
    checkpointer.remove()
    assert not checkpointer.exists()


@needs_gloo
def test_on_main_process_and_checkpoints_in_two_ranks(tmp_path):
    run_ranks(_main_process_ranks, str(tmp_path))


def _agreed_checks(rank, world_size):
    # A NaN seen by rank 1 alone stops both ranks at the same step (no rank left in a collective).
    check = StepCheck()
    check.step(loss=1.0)
    with pytest.raises(TrainingDiverged) as caught:
        check.step(loss=float("nan") if rank == 1 else 0.5)
    assert caught.value.step == 2
    assert ("the loss is nan" if rank == 1 else "another rank") in str(caught.value)
    # So does a BatchNorm statistic that overflowed on rank 0 only.
    model = torch.nn.BatchNorm1d(2)
    if rank == 0:
        model.running_var.fill_(float("inf"))
    with pytest.raises(TrainingDiverged, match="running_var" if rank == 0 else "another rank"):
        check_state(model)
    check_state(torch.nn.BatchNorm1d(2))  # finite everywhere: no error on any rank
    # Reseeding: the same (seed, epoch) gives each rank its own streams, and the same streams again.
    reseed_for_epoch(3, 1)
    drawn = (torch.rand(4), random.random(), np.random.rand())
    reseed_for_epoch(3, 1)
    assert torch.equal(torch.rand(4), drawn[0]) and random.random() == drawn[1] and np.random.rand() == drawn[2]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, drawn[0])
    assert not torch.equal(gathered[0], gathered[1])


@needs_gloo
def test_divergence_checks_are_agreed_and_reseeding_is_per_rank():
    run_ranks(_agreed_checks)


def _dense_args(epochs):
    return argparse.Namespace(epochs=epochs, lr=0.05, momentum=0.9, weight_decay=5e-4, sam_rho=0.05, adaptive=False,
                              progress=False, seed=4)


def _fit_dense_ranks(rank, world_size, folder):
    # 20 samples: each rank gets 10 per epoch, in batches of 4, 4 and 2 (the last one smaller).
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(20, 1, 6, 6), torch.randint(0, 5, (20,)))
    train_loader, test_loader, generator = make_loaders(data, data, 4, seed=4)
    assert len(train_loader) == 3
    model = masked_cnn()  # masked convs and BatchNorm
    ddp = wrap_ddp(model)
    checkpointer = Checkpointer(os.path.join(folder, "checkpoint.pt"))
    history = fit_dense(ddp, train_loader, test_loader, generator, _dense_args(2), checkpointer)
    # The ranks hold the same weights (DDP) and report the same, all-reduced, metrics and test numbers.
    states = [None] * world_size
    dist.all_gather_object(states, {k: v for k, v in model.state_dict().items() if "running" not in k})
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
    histories = [None] * world_size
    dist.all_gather_object(histories, [{k: v for k, v in h.items() if k != "seconds"} for h in history])
    assert histories[0] == histories[1]
    # The one checkpoint is rank 0's module state (no "module." prefix) and loads into the plain model.
    saved = checkpointer.load()
    assert saved["epoch"] == 2 and not any(k.startswith("module.") for k in saved["model"])
    if rank == 0:
        for key, value in model.state_dict().items():
            assert torch.equal(saved["model"][key], value), key
    # Resuming from epoch 1's checkpoint (every rank loads rank 0's) reproduces epoch 2 exactly.
    _one_epoch_then_resume_equals_straight(folder, data)


def _one_epoch_then_resume_equals_straight(folder, data):
    results = {}
    for name, epochs_before in (("straight", None), ("resumed", 1)):
        train_loader, test_loader, generator = make_loaders(data, data, 4, seed=4)
        model = masked_cnn()
        checkpointer = Checkpointer(os.path.join(folder, f"{name}.pt"))
        if epochs_before is not None:
            fit_dense(wrap_ddp(model), train_loader, test_loader, generator, _dense_args(epochs_before),
                      checkpointer)
            torch.manual_seed(99)  # as in a fresh process: the global streams are elsewhere
            model = masked_cnn()
            with torch.no_grad():  # and weights the checkpoint must replace (else the run would differ)
                for parameter in model.parameters():
                    parameter.mul_(0.5)
            train_loader, test_loader, generator = make_loaders(data, data, 4, seed=4)
        history = fit_dense(wrap_ddp(model), train_loader, test_loader, generator, _dense_args(3), checkpointer)
        assert [entry["epoch"] for entry in history] == [1, 2, 3]
        results[name] = model.state_dict()
    for key, value in results["straight"].items():
        assert torch.equal(value, results["resumed"][key]), key


@needs_gloo
def test_fit_dense_in_ddp_keeps_ranks_identical_and_resumes_exactly(tmp_path):
    run_ranks(_fit_dense_ranks, str(tmp_path))


@pytest.mark.parametrize("argv", [["demo", "--out", "never"], ["eval", "somewhere"]])
def test_commands_other_than_train_and_prune_refuse_torchrun(monkeypatch, tmp_path, capsys, argv):
    from sparsesam.cli import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(argv) == 2
    assert f"sparsesam {argv[0]} runs in one process: start it without torchrun" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was written


# --- Algorithm.fit(parallel=) --------------------------------------------------------------------------


def _small_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))


def test_an_algorithm_that_is_not_data_parallel_refuses_parallel():
    from sparsesam.algorithms import Hydra, HydraConfig
    from sparsesam.distributed import data_parallel

    class RankLocal(Hydra):  # an algorithm (a user's, say) that does not declare data_parallel
        name = "rank_local"
        data_parallel = False

    data = TensorDataset(torch.randn(8, 1, 6, 6), torch.randint(0, 5, (8,)))
    with pytest.raises(ValueError, match="'rank_local' cannot train data-parallel"):
        RankLocal(HydraConfig()).fit(_small_cnn(), torch.utils.data.DataLoader(data, batch_size=4),
                                     parallel=data_parallel)
    with pytest.raises(TypeError, match="parallel must be callable"):
        Hydra(HydraConfig()).fit(_small_cnn(), torch.utils.data.DataLoader(data, batch_size=4), parallel=1)


def _magnitude_ranks(rank, world_size, folder):
    from sparsesam.algorithms import Magnitude, MagnitudeConfig
    from sparsesam.distributed import data_parallel
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(20, 1, 6, 6), torch.randint(0, 5, (20,)))
    train_loader, test_loader, _ = make_loaders(data, data, 4, seed=2)
    model = _small_cnn()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = MagnitudeConfig(target_sparsity=0.5, finetune_epochs=2, execution="auto")
    result = Magnitude(config).fit(model, train_loader, val_loader=test_loader, parallel=data_parallel,
                                   progress=False, checkpoint=Checkpointer(os.path.join(folder, "prune.pt")))
    assert [entry["epoch"] for entry in result.history] == [0, 1]
    # Trained (the weights moved), with the same weights, masks and all-reduced history on both ranks.
    assert not torch.equal(dict(model.named_parameters())["1.weight"], before["1.weight"])
    mine = {k: v for k, v in model.state_dict().items() if "running" not in k}
    gathered = [None] * world_size
    dist.all_gather_object(gathered, (mine, result.history))
    for key, value in gathered[0][0].items():
        assert torch.equal(value, gathered[1][0][key]), key
    assert gathered[0][1] == gathered[1][1]
    assert result.summary["sparsity"] == pytest.approx(0.5, abs=0.01)


@needs_gloo
def test_magnitude_fits_data_parallel_with_identical_ranks(tmp_path):
    run_ranks(_magnitude_ranks, str(tmp_path))
