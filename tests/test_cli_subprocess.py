"""The installed ``sparsesam`` console script, and a run killed with SIGKILL then resumed."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import assert_same_weights, read_weights, train_argv

ROOT = Path(__file__).resolve().parents[1]


def _env():
    # The worktree's sparsesam first, whichever copy the console script was installed from.
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _script():
    script = Path(sys.executable).with_name("sparsesam")
    if not script.exists():
        script = shutil.which("sparsesam")
        if script is None:
            pytest.skip("the sparsesam console script is not installed")
    return str(script)


def test_console_script_runs_train_and_refuses_bad_config(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([_script(), *map(str, train_argv(out, 1))], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "test accuracy" in done.stdout and (out / "model.safetensors").is_file()
    bad = subprocess.run([_script(), "prune", "--algorithm", "magnitude", "--sparsity", "1.5", "--out", str(tmp_path)],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "sparsesam prune: error: --sparsity must be in [0, 1), got 1.5"


def _train(out, *extra, wait=True):
    argv = [sys.executable, "-m", "sparsesam.cli", *map(str, train_argv(out, 4, *extra))]
    process = subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if wait:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    return process


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    """Kill the process the moment its first checkpoint appears (mid-run, possibly mid-save of the next)."""
    full, split = tmp_path / "full", tmp_path / "split"
    _train(full)
    process = _train(split, wait=False)
    checkpoint = split / "checkpoint.pt"
    deadline = time.time() + 600
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if process.returncode != -signal.SIGKILL or (split / "model.safetensors").exists():
        pytest.skip("the run finished before it could be killed")
    _train(split, "--resume")
    assert_same_weights(read_weights(full), read_weights(split))
    assert not [p.name for p in split.iterdir() if p.name.endswith(".tmp")]  # a killed save's file is cleaned up
