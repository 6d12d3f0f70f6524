"""The installed ``sparsesam`` console script (a run killed with SIGKILL mid-write: test_cli_sigkill.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import train_argv

ROOT = Path(__file__).resolve().parents[2]


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
