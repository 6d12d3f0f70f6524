"""Two identical CLI runs write identical bytes: every file, except the reports' wall-clock times."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cli_helpers import DATA, run, train_argv

pytest.importorskip("torch_pruning", reason="the structured run (compacted model file) needs torch-pruning")

# The only files that legitimately differ: they report how long the run took ("seconds" of every training epoch,
# "fit_seconds", the summary's "phase_seconds"). They are compared without those fields; the model files hold no times at all.
TIMED = {"dense/train.json": ("seconds",), "adasap/prune.json": ("fit_seconds", "phase_seconds")}
EXPECTED = {"dense/config.json", "dense/model.json", "dense/model.safetensors", "dense/sparsity.json",
            "dense/train.json", "adasap/config.json", "adasap/model.json", "adasap/model.safetensors",
            "adasap/model_compact.safetensors", "adasap/sparsity.json", "adasap/prune.json"}


def _runs(root: Path, monkeypatch) -> dict:
    """Train, then prune with AdaSAP (structured: a compacted model too), from folder ``root`` (relative paths,
    so the recorded command lines agree); returns ``{relative path: bytes}`` of every file written."""
    root.mkdir()
    monkeypatch.chdir(root)
    assert run(train_argv("dense", 2)) == 0
    assert run(["prune", "--algorithm", "adasap", "--sparsity", "0.5", "--from", "dense", *DATA,
                "--set", "adaptive_epochs=1", "--set", "finetune_epochs=1", "--execution", "dense",
                "--out", "adasap"]) == 0
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*"))
            if path.is_file()}


def _without(value, keys):
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value


def _contains_key(value, keys) -> bool:
    if isinstance(value, dict):
        return any(k in keys or _contains_key(v, keys) for k, v in value.items())
    if isinstance(value, list):
        return any(_contains_key(v, keys) for v in value)
    return False


def test_identical_runs_write_identical_files(tmp_path, monkeypatch):
    first = _runs(tmp_path / "first", monkeypatch)
    second = _runs(tmp_path / "second", monkeypatch)
    assert set(first) == set(second) == EXPECTED
    differing = []
    for name in sorted(first):
        if name in TIMED:
            a, b = (_without(json.loads(files[name]), TIMED[name]) for files in (first, second))
            if a != b:
                differing.append(name)
        elif hashlib.sha256(first[name]).digest() != hashlib.sha256(second[name]).digest():
            differing.append(name)
    assert not differing, differing
    time_keys = {key for keys in TIMED.values() for key in keys}
    for name, data in first.items():
        if name.endswith(".json") and name not in TIMED:
            assert not _contains_key(json.loads(data), time_keys), name
    # The model files' JSON is written with sorted keys.
    info = json.loads(first["adasap/model.json"])
    assert list(info) == sorted(info) and list(info["spec"]) == sorted(info["spec"])
