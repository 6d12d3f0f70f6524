"""Checkpointer: atomic writes, RNG capture / restore, and exact resumption of train and prune runs."""
from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from sparsesam.checkpoint import Checkpointer, capture_rng_state, restore_rng_state

from cli_helpers import (DATA, MODEL, Interrupted, assert_same_weights, interrupt_after_saves, read_weights, run,
                         train_argv)


class Unpicklable:
    def __reduce__(self):
        raise pickle.PicklingError("this object refuses to be saved")


def test_save_then_load_round_trip(tmp_path):
    ckpt = Checkpointer(tmp_path / "run" / "ckpt.pt")
    assert ckpt.load() is None
    ckpt.save({"epoch": 3, "weights": torch.arange(5.0)})
    state = ckpt.load()
    assert state["epoch"] == 3 and torch.equal(state["weights"], torch.arange(5.0))
    assert ckpt.saves == 1


def test_failed_save_keeps_previous_checkpoint_and_leaves_no_partial_file(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt.pt")
    ckpt.save({"epoch": 1, "weights": torch.ones(1000)})
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(pickle.PicklingError):
        ckpt.save({"epoch": 2, "weights": torch.zeros(1000), "bad": Unpicklable()})
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert ckpt.load()["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # the temporary file is gone


def test_first_save_failing_leaves_nothing(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt.pt")
    with pytest.raises(pickle.PicklingError):
        ckpt.save({"bad": Unpicklable()})
    assert os.listdir(tmp_path) == [] and ckpt.load() is None


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="path"):
        Checkpointer(3)
    with pytest.raises(ValueError, match="path"):
        Checkpointer(tmp_path)
    with pytest.raises(TypeError, match="state"):
        Checkpointer(tmp_path / "c.pt").save([1, 2])
    with pytest.raises(ValueError, match="'torch'"):
        restore_rng_state({})


def _draws(generator):
    loader = DataLoader(TensorDataset(torch.arange(20)), batch_size=20, shuffle=True, generator=generator)
    order = next(iter(loader))[0].tolist()
    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist(), order


def test_rng_capture_restores_every_stream(tmp_path):
    generator = torch.Generator().manual_seed(7)
    _draws(generator)  # move every stream away from its seed
    ckpt = Checkpointer(tmp_path / "rng.pt")
    ckpt.save({"rng": capture_rng_state(generator)})
    first = _draws(generator)
    second = _draws(generator)
    assert first != second
    restore_rng_state(ckpt.load()["rng"], generator)
    assert _draws(generator) == first


def _interrupt_then_resume(monkeypatch, argv_of, tmp_path, interrupt_at: int):
    full, split = tmp_path / "full", tmp_path / "split"
    assert run(argv_of(full)) == 0
    with monkeypatch.context() as patch:
        interrupt_after_saves(patch, interrupt_at)
        with pytest.raises(Interrupted):
            run(argv_of(split))
    return full, split


@pytest.mark.parametrize("optimizer", [[], ["--sam-rho", "0.05"], ["--sam-rho", "0.5", "--adaptive"]],
                         ids=["sgd", "sam", "asam"])
def test_train_interrupted_and_resumed_equals_uninterrupted(monkeypatch, tmp_path, optimizer):
    argv_of = lambda out, *extra: train_argv(out, 3, *optimizer, *extra)
    full, split = _interrupt_then_resume(monkeypatch, argv_of, tmp_path, interrupt_at=1)
    assert (split / "checkpoint.pt").exists() and not (split / "model.safetensors").exists()
    config = (split / "config.json").read_text()
    assert run(argv_of(split, "--lr", "0.3")) == 2  # an unfinished run is not overwritten without --resume
    assert (split / "config.json").read_text() == config
    assert run(argv_of(split, "--resume")) == 0
    assert_same_weights(read_weights(full), read_weights(split))
    assert not (split / "checkpoint.pt").exists()  # removed once the run is complete
    import json
    h_full = json.loads((full / "train.json").read_text())["history"]
    h_split = json.loads((split / "train.json").read_text())["history"]
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]
    assert strip(h_full) == strip(h_split) and len(h_full) == 3


def test_prune_interrupted_in_finetuning_and_resumed_equals_uninterrupted(monkeypatch, tmp_path):
    source = tmp_path / "dense"
    assert run(train_argv(source, 1)) == 0

    def argv_of(out, *extra):
        return ["prune", "--algorithm", "magnitude", "--sparsity", "0.7", "--from", source, *DATA,
                "--set", "finetune_epochs=3", "--out", out, *extra]

    full, split = _interrupt_then_resume(monkeypatch, argv_of, tmp_path, interrupt_at=2)
    assert (split / "prune_checkpoint.pt").exists()
    assert run(argv_of(split, "--resume")) == 0
    assert_same_weights(read_weights(full), read_weights(split))


def test_prune_with_pretraining_interrupted_in_pretraining(monkeypatch, tmp_path):
    def argv_of(out, *extra):
        return ["prune", "--algorithm", "magnitude", "--sparsity", "0.5", *MODEL, *DATA, "--epochs", "2",
                "--set", "finetune_epochs=1", "--out", out, *extra]

    full, split = _interrupt_then_resume(monkeypatch, argv_of, tmp_path, interrupt_at=1)
    assert (split / "pretrain_checkpoint.pt").exists()
    assert run(argv_of(split, "--resume")) == 0
    assert_same_weights(read_weights(full), read_weights(split))
    assert not (split / "pretrain_checkpoint.pt").exists()


def test_temporary_file_of_a_killed_save_is_removed_by_the_next_save(tmp_path):
    (tmp_path / ".ckpt.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    ckpt = Checkpointer(tmp_path / "ckpt.pt")
    assert ckpt.load() is None  # the stray temporary file is never read
    ckpt.save({"epoch": 1})
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_resume_with_different_settings_is_refused(monkeypatch, tmp_path, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_after_saves(patch, 1)
        with pytest.raises(Interrupted):
            run(train_argv(out, 2))
    assert run(train_argv(out, 2, "--lr", "0.2", "--resume")) == 2
    err = capsys.readouterr().err
    assert "differ from the interrupted run" in err and "lr (0.1 -> 0.2)" in err


def test_demo_interrupted_in_a_method_and_resumed_equals_uninterrupted(monkeypatch, tmp_path):
    pytest.importorskip("torch_pruning", reason="AdaSAP's channel groups and compaction need torch-pruning")

    def argv_of(out, *extra):
        return ["demo", "--out", out, "--dataset", "digits", "--image-size", "8", "--limit", "64",
                "--test-limit", "16", "--width", "0.25", "--epochs", "1", "--algo-epochs", "2", "--sparsity", "0.5",
                "--methods", "magnitude,adasap", "--execution", "dense", "--no-progress", "--no-smoothing",
                "--no-cc-cert", "--no-pgd", "--no-corruptions", "--latency-repeats", "1", *extra]

    # Saves: 1 the dense model's epoch, 2-3 magnitude's fine-tuning, 4-5 AdaSAP's phase 1 (ASAM with
    # per-channel radii), 6 the first epoch of AdaSAP's compacted fine-tuning -- the real algorithm, interrupted
    # with its compacted model in the checkpoint.
    full, split = _interrupt_then_resume(monkeypatch, argv_of, tmp_path, interrupt_at=6)
    state = torch.load(split / "adasap" / "prune_checkpoint.pt", weights_only=True)
    assert state["algorithm"] == "adasap" and state["phase"] == "finetune" and state["compaction"] is not None
    assert run(argv_of(split)) == 2
    assert run(argv_of(split, "--resume")) == 0
    for method in ("dense", "magnitude", "adasap"):
        assert_same_weights(read_weights(full / method), read_weights(split / method))
    assert (split / "adasap" / "model_compact.safetensors").read_bytes() == \
        (full / "adasap" / "model_compact.safetensors").read_bytes()


class Payload:
    """Any class: a checkpoint holding it is refused, since unpickling could run code."""


def test_load_refuses_arbitrary_objects(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt.pt")
    ckpt.save({"epoch": 1, "object": Payload()})
    with pytest.raises(ValueError, match="not loaded"):
        ckpt.load()


@pytest.mark.parametrize("content", [b"", os.urandom(4096), b"PK\x03\x04 truncated"], ids=["empty", "random", "truncated"])
def test_resume_from_a_bad_checkpoint_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys, content):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_after_saves(patch, 1)
        with pytest.raises(Interrupted):
            run(train_argv(out, 2))
    (out / "checkpoint.pt").write_bytes(content)
    assert run(train_argv(out, 2, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint.pt" in err[0], err
