"""A CLI run killed with SIGKILL in the middle of a checkpoint write resumes and ends bit-identical."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from sparsesam.checkpoint import WRITE_DELAY_ENV, read_checkpoint

from cli_helpers import assert_same_weights, read_weights, run, train_argv

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 3
# Long enough for the poll below to see the held temporary file, short enough to keep the test quick.
DELAY_SECONDS = 2.0


def _train(out, *extra, delay=None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop(WRITE_DELAY_ENV, None)
    if delay is not None:
        env[WRITE_DELAY_ENV] = str(delay)
    argv = [sys.executable, "-m", "sparsesam.cli", *map(str, train_argv(out, EPOCHS, *extra))]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err


def _temporaries(folder: Path):
    return sorted(folder.glob(".checkpoint.pt.*.tmp"))


def test_sigkill_during_a_checkpoint_write_then_resume_equals_uninterrupted(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    victim = _train(split, delay=DELAY_SECONDS)
    checkpoint = split / "checkpoint.pt"
    # The second save is under way once a temporary file sits next to the first checkpoint: the writer holds
    # the complete temporary file for DELAY_SECONDS before os.replace, and is killed there.
    try:
        deadline = time.monotonic() + 120
        while not (checkpoint.exists() and _temporaries(split)):
            assert victim.poll() is None, f"the run ended before it could be killed: {victim.stderr.read()}"
            assert time.monotonic() < deadline, "no second checkpoint write began within 120 s"
            time.sleep(0.005)
        # The temporary file appears (empty) before torch.save writes it; half the hold later it is complete
        # and the writer is asleep before os.replace.
        time.sleep(DELAY_SECONDS / 2)
    finally:
        victim.send_signal(signal.SIGKILL)  # also when the test failed: no process is left behind
        victim.wait(timeout=60)
        victim.stderr.close()
    assert victim.returncode == -signal.SIGKILL
    assert not (split / "model.safetensors").exists()

    # The kill left the previous checkpoint whole and the new one stranded in its temporary file.
    assert read_checkpoint(str(checkpoint))["epoch"] == 1
    stranded = _temporaries(split)
    assert len(stranded) == 1 and read_checkpoint(str(stranded[0]))["epoch"] == 2

    resumed = _train(split, "--resume")
    try:
        # The uninterrupted reference runs here meanwhile, single-threaded like the subprocesses
        # (OMP_NUM_THREADS=1), so both do the same float operations in the same order.
        torch.set_num_threads(1)  # conftest puts the session's thread count back after the test
        assert run(train_argv(full, EPOCHS)) == 0
    finally:
        _finish(resumed)
    assert_same_weights(read_weights(full), read_weights(split))
    assert (split / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    assert not checkpoint.exists() and not _temporaries(split)  # the stranded file went with the next save
