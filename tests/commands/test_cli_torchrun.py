"""``sparsesam train|prune`` under torchrun with 2 gloo processes on the CPU.

What is claimed and checked:
* rank 0 alone writes: the folder holds exactly the files of a finished run (no checkpoint, no temporary or
  duplicate file), one result line is printed, and config.json records the world size;
* the test numbers in train.json are exact: those of the saved model on the whole test set in one process;
* a torchrun job killed with SIGKILL (the agent and both workers) in the middle of a checkpoint write, then
  resumed under torchrun, ends with the same model file, bit for bit, and the same history as a job that was
  never interrupted;
* prune --algorithm magnitude runs under torchrun (DDP through the fixed-mask fine-tuning), writes one
  model folder at the target sparsity, and resumes after a SIGKILL to the same model, bit for bit;
* prune --algorithm harp (a paper algorithm: learnt scores and rates, an adversarial loss) runs under torchrun
  and writes one model folder whose test numbers are exact. (An algorithm that cannot run data-parallel is
  refused by name: tests/test_distributed_algorithms.py, with a registry's algorithm, as every built-in can.)
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparsesam.checkpoint import WRITE_DELAY_ENV, read_checkpoint
from sparsesam.model_files import load_model_folder
from sparsesam.run_setup import load_data
from sparsesam.training import evaluate

from cli_helpers import assert_same_weights, read_weights, run
from distributed_helpers import needs_gloo

pytestmark = needs_gloo

ROOT = Path(__file__).resolve().parents[2]
DATA = ["--dataset", "synthetic", "--limit", "48", "--batch-size", "8", "--no-progress"]
MODEL = ["--model", "smallcnn", "--width", "0.25"]
FINISHED_TRAIN = {"config.json", "model.json", "model.safetensors", "sparsity.json", "train.json"}
# Long enough for the poll below to see the held temporary file, short enough to keep the test quick.
DELAY_SECONDS = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_argv(*argv) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}", "-m", "sparsesam", *map(str, argv)]


def _env(delay=None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    env.pop(WRITE_DELAY_ENV, None)
    if delay is not None:
        env[WRITE_DELAY_ENV] = str(delay)
    return env


def torchrun(*argv) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun_argv(*argv), env=_env(), capture_output=True, text=True, timeout=300)


def train_argv(out, epochs, *extra):
    return ["train", *MODEL, *DATA, "--epochs", epochs, "--lr", "0.05", "--sam-rho", "0.05", "--out", out, *extra]


def _history(folder: Path, name: str):
    # Everything but the wall-clock seconds, which no two runs share.
    return [{k: v for k, v in entry.items() if k != "seconds"}
            for entry in json.loads((folder / name).read_text())["history"]]


def test_train_under_torchrun_writes_once_and_reports_exact_test_numbers(tmp_path):
    out = tmp_path / "run"
    done = torchrun(*train_argv(out, 2))
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == FINISHED_TRAIN  # no checkpoint, no temporary, no second copy
    assert done.stdout.count("train: test accuracy") == 1  # rank 0 alone prints
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["batch_size"] == 8
    result = json.loads((out / "train.json").read_text())
    assert [entry["epoch"] for entry in result["history"]] == [1, 2]
    # Rank 0 evaluated the whole test set: one process gets the same numbers from the saved model.
    model, _ = load_model_folder(str(out))
    _, test = load_data("synthetic", None, 48)
    torch.set_num_threads(1)  # as the ranks ran (conftest restores the session's count)
    here = evaluate(model, torch.utils.data.DataLoader(test, batch_size=512), progress=False)
    assert result["test_accuracy"] == here["accuracy"]
    assert result["test_loss"] == pytest.approx(here["loss"], rel=1e-6, abs=1e-7)
    assert result["history"][-1]["test_loss"] == result["test_loss"]


def _temporaries(folder: Path):
    return sorted(folder.glob(".checkpoint.pt.*.tmp"))


def _children(pid: int):
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def _kill_job(agent: subprocess.Popen) -> None:
    """SIGKILL torchrun's agent and its workers (each in its own session: killing the agent alone orphans them),
    as a scheduler ending the job would."""
    workers = _children(agent.pid)
    agent.send_signal(signal.SIGKILL)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait(timeout=60)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in workers):
        assert time.monotonic() < deadline, "a killed worker is still running"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "gone zombie"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers through /proc")
def test_a_torchrun_job_killed_mid_checkpoint_resumes_to_the_uninterrupted_result(tmp_path, capsys):
    full, split = tmp_path / "full", tmp_path / "split"
    epochs = 2
    victim = subprocess.Popen(_torchrun_argv(*train_argv(split, epochs)), env=_env(delay=DELAY_SECONDS),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = split / "checkpoint.pt"
    try:
        # The second save is under way once a temporary file sits next to the first checkpoint: rank 0 holds
        # the complete temporary file for DELAY_SECONDS (rank 1 waits for it) and is killed there.
        deadline = time.monotonic() + 180
        while not (checkpoint.exists() and _temporaries(split)):
            assert victim.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "no second checkpoint write began within 180 s"
            time.sleep(0.005)
        time.sleep(DELAY_SECONDS / 2)
    finally:
        _kill_job(victim)  # also when the test failed: no process is left behind
    assert not (split / "model.safetensors").exists()
    assert read_checkpoint(str(checkpoint))["epoch"] == 1

    # Resuming in one process would split the data otherwise: refused, naming the world size, nothing touched.
    assert run(train_argv(split, epochs, "--resume")) == 2
    assert "world_size (2 -> None)" in capsys.readouterr().err
    assert read_checkpoint(str(checkpoint))["epoch"] == 1

    resumed = torchrun(*train_argv(split, epochs, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = torchrun(*train_argv(full, epochs))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert (split / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    assert_same_weights(read_weights(full), read_weights(split))
    assert _history(split, "train.json") == _history(full, "train.json")
    assert {p.name for p in split.iterdir()} == FINISHED_TRAIN  # the stranded temporary went with the next save


PRUNE = ["prune", "--algorithm", "magnitude", "--sparsity", "0.8", "--set", "finetune_epochs=2", *MODEL, *DATA,
         "--epochs", "1", "--execution", "dense"]  # dense: "auto" times layers, and two runs may choose otherwise


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers through /proc")
def test_prune_magnitude_under_torchrun_writes_once_and_resumes_after_sigkill(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    done = torchrun(*PRUNE, "--out", full)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in full.iterdir()} == {"config.json", "model.json", "model.safetensors", "sparsity.json",
                                                "prune.json"}
    assert done.stdout.count("prune magnitude:") == 1
    report = json.loads((full / "prune.json").read_text())
    assert report["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert [(entry["phase"], entry["epoch"]) for entry in report["history"]] == [("finetune", 0), ("finetune", 1)]
    assert report["pretrain"]["epochs"] == 1 and len(report["pretrain"]["history"]) == 1
    assert json.loads((full / "config.json").read_text())["world_size"] == 2

    # Killed while rank 0 writes the second fine-tuning checkpoint, then resumed: the same model and history.
    victim = subprocess.Popen(_torchrun_argv(*PRUNE, "--out", split), env=_env(delay=DELAY_SECONDS),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = split / "prune_checkpoint.pt"
    try:
        deadline = time.monotonic() + 180
        while not (checkpoint.exists() and list(split.glob(".prune_checkpoint.pt.*.tmp"))):
            assert victim.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "no second fine-tuning checkpoint write began within 180 s"
            time.sleep(0.005)
        time.sleep(DELAY_SECONDS / 2)
    finally:
        _kill_job(victim)
    assert read_checkpoint(str(checkpoint))["epoch"] == 0 and not (split / "prune.json").exists()
    resumed = torchrun(*PRUNE, "--out", split, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (split / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    assert json.loads((split / "prune.json").read_text())["history"] == report["history"]
    assert {p.name for p in split.iterdir()} == {p.name for p in full.iterdir()}


def test_prune_harp_under_torchrun_writes_once_with_exact_test_numbers(tmp_path):
    """A paper algorithm (HARP: scores and rates learnt through DDP, PGD-AT's attack backward through it too)."""
    out = tmp_path / "harp"
    done = torchrun("prune", "--algorithm", "harp", "--sparsity", "0.8", "--set", "search_epochs=1", "--set",
                    "finetune_epochs=1", "--set", "attack_steps=2", "--set", "gamma=1.0", *MODEL, *DATA,
                    "--epochs", "1", "--execution", "dense", "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"config.json", "model.json", "model.safetensors", "sparsity.json",
                                               "prune.json"}
    assert done.stdout.count("prune harp:") == 1
    report = json.loads((out / "prune.json").read_text())
    assert [(entry["phase"], entry["epoch"]) for entry in report["history"]] == [("search", 0), ("finetune", 0)]
    assert report["history"][0]["hw_loss"] > 0 and report["config"]["loss"] == "pgd_at"
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    model, _ = load_model_folder(str(out))
    _, test = load_data("synthetic", None, 48)
    torch.set_num_threads(1)  # as the ranks ran (conftest restores the session's count)
    here = evaluate(model, torch.utils.data.DataLoader(test, batch_size=512), progress=False)
    assert report["test_accuracy"] == here["accuracy"]
    assert report["test_loss"] == pytest.approx(here["loss"], rel=1e-6, abs=1e-7)
