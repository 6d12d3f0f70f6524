"""CLI resume with a real structured algorithm (AdaSAP), and checkpoints of another run refused in one line."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from cli_helpers import DATA, MODEL, Interrupted, interrupt_after_saves, run, train_argv

pytest.importorskip("torch_pruning", reason="AdaSAP's channel groups and compaction need torch-pruning")


def _prune_argv(source, out, *extra):
    # AdaSAP as the paper runs it, in miniature: one epoch of ASAM with per-channel radii (phase 1), channel
    # pruning, two epochs of uniform-ASAM fine-tuning of the compacted model. --execution dense: "auto" picks
    # layer forms by timing, which two runs need not agree on.
    return ["prune", "--algorithm", "adasap", "--sparsity", "0.5", "--from", source, *DATA,
            "--set", "adaptive_epochs=1", "--set", "finetune_epochs=2", "--execution", "dense", "--out", out, *extra]


@pytest.fixture(scope="module")
def adasap_runs(tmp_path_factory):
    """A dense source model and one uninterrupted AdaSAP run from it."""
    root = tmp_path_factory.mktemp("resume")
    source, full = root / "dense", root / "full"
    assert run(train_argv(source, 1)) == 0
    assert run(_prune_argv(source, full)) == 0
    return source, full


def _history(folder):
    report = json.loads((folder / "prune.json").read_text())
    return report["history"], report


# save 1: the end of phase 1 (resume prunes and compacts); save 2: the first fine-tuning epoch of the compacted
# model (resume rebuilds the compacted model from the checkpoint's record).
@pytest.mark.parametrize("interrupt_at", [1, 2], ids=["after-phase-1", "mid-finetuning"])
def test_adasap_prune_interrupted_and_resumed_equals_uninterrupted(monkeypatch, tmp_path, adasap_runs,
                                                                    interrupt_at):
    source, full = adasap_runs
    split = tmp_path / "split"
    with monkeypatch.context() as patch:
        interrupt_after_saves(patch, interrupt_at)
        with pytest.raises(Interrupted):
            run(_prune_argv(source, split))
    state = torch.load(split / "prune_checkpoint.pt", weights_only=True)
    assert state["algorithm"] == "adasap" and state["phase"] == ("adaptive" if interrupt_at == 1 else "finetune")
    assert (state["compaction"] is None) == (interrupt_at == 1)
    assert not (split / "model.safetensors").exists()
    assert run(_prune_argv(source, split, "--resume")) == 0
    for name in ("model.safetensors", "model_compact.safetensors", "sparsity.json", "model.json"):
        assert (split / name).read_bytes() == (full / name).read_bytes(), name
    (h_split, report), (h_full, _) = _history(split), _history(full)
    assert h_split == h_full and len(h_full) == 3
    assert report["algorithm"] == "adasap" and report["compacted_parameters"] < report["summary"]["params_dense"]
    assert not (split / "prune_checkpoint.pt").exists()


def _interrupted_train(out, *extra):
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after_saves(patch, 1)
        with pytest.raises(Interrupted):
            run(train_argv(out, 2, *extra))


def _one_error_line(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_train_resume_with_a_checkpoint_of_another_width_is_refused(tmp_path, capsys):
    narrow, wide = tmp_path / "narrow", tmp_path / "wide"
    _interrupted_train(narrow)
    _interrupted_train(wide, "--width", "0.5")
    shutil.copy(narrow / "checkpoint.pt", wide / "checkpoint.pt")
    capsys.readouterr()
    assert run(train_argv(wide, 2, "--width", "0.5", "--resume")) == 2
    line = _one_error_line(capsys)
    assert str(wide / "checkpoint.pt") in line and "'model' state does not fit" in line, line


def test_train_resume_with_an_algorithm_checkpoint_is_refused(tmp_path, capsys, monkeypatch):
    algorithm_run, out = tmp_path / "magnitude", tmp_path / "train"
    with monkeypatch.context() as patch:
        interrupt_after_saves(patch, 1)
        with pytest.raises(Interrupted):
            run(["prune", "--algorithm", "magnitude", "--sparsity", "0.5", *MODEL, *DATA, "--epochs", "0",
                 "--set", "finetune_epochs=2", "--out", algorithm_run])
    _interrupted_train(out)
    shutil.copy(algorithm_run / "prune_checkpoint.pt", out / "checkpoint.pt")
    capsys.readouterr()
    assert run(train_argv(out, 2, "--resume")) == 2
    line = _one_error_line(capsys)
    assert str(out / "checkpoint.pt") in line and "lacks ['kind', 'label']" in line, line


def test_prune_resume_with_a_checkpoint_of_another_algorithm_is_refused(tmp_path, capsys, monkeypatch, adasap_runs):
    source, _ = adasap_runs
    adasap, magnitude = tmp_path / "adasap", tmp_path / "magnitude"
    argv = ["prune", "--algorithm", "magnitude", "--sparsity", "0.5", "--from", source, *DATA,
            "--set", "finetune_epochs=2", "--out", magnitude]
    for argv_of_run in (_prune_argv(source, adasap), argv):
        with monkeypatch.context() as patch:  # each run's saves counted from 0
            interrupt_after_saves(patch, 1)
            with pytest.raises(Interrupted):
                run(argv_of_run)
    shutil.copy(adasap / "prune_checkpoint.pt", magnitude / "prune_checkpoint.pt")
    capsys.readouterr()
    assert run([*argv, "--resume"]) == 2
    line = _one_error_line(capsys)
    assert str(magnitude / "prune_checkpoint.pt") in line and "from algorithm 'adasap'" in line, line


def test_pretraining_resume_with_a_train_checkpoint_is_refused(tmp_path, capsys, monkeypatch):
    train_run, out = tmp_path / "train", tmp_path / "prune"
    argv = ["prune", "--algorithm", "magnitude", "--sparsity", "0.5", *MODEL, *DATA, "--epochs", "2", "--lr", "0.1",
            "--set", "finetune_epochs=1", "--out", out]
    _interrupted_train(train_run)
    with monkeypatch.context() as patch:
        interrupt_after_saves(patch, 1)
        with pytest.raises(Interrupted):
            run(argv)
    shutil.copy(train_run / "checkpoint.pt", out / "pretrain_checkpoint.pt")
    capsys.readouterr()
    assert run([*argv, "--resume"]) == 2
    line = _one_error_line(capsys)
    assert "pretrain_checkpoint.pt" in line and "label='train', this run has label='pretrain'" in line, line
