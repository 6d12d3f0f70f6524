"""Tiny settings and helpers shared by the CLI tests (digits at 8x8, a quarter-width SmallCNN)."""
from __future__ import annotations

import dataclasses
import os
from typing import List

import torch

from sparsesam.cli import main
from sparsesam.algorithms import ALGORITHMS, FitResult
from sparsesam.nn import sparsify
from sparsesam.pruning import magnitude_prune

DATA = ["--dataset", "digits", "--image-size", "8", "--limit", "96", "--batch-size", "32", "--no-progress"]
MODEL = ["--model", "smallcnn", "--width", "0.25"]
# The cheapest robustness settings that still run every measurement.
ROBUST = ["--corruptions", "gaussian_noise,contrast", "--severities", "1,5", "--corruption-examples", "24",
          "--pgd-eps", "0,0.05", "--pgd-steps", "2", "--pgd-examples", "24",
          "--smoothing-examples", "3", "--smoothing-n0", "8", "--smoothing-n", "32", "--radii", "0,0.25",
          "--cc-examples", "3", "--cc-samples", "8", "--cc-transforms", "brightness,rotation",
          "--latency-batch", "4", "--latency-repeats", "2"]


def run(argv: List[str]) -> int:
    return main([str(a) for a in argv])


def train_argv(out, epochs: int = 2, *extra) -> List[str]:
    return ["train", *MODEL, *DATA, "--epochs", str(epochs), "--lr", "0.1", "--out", str(out), *extra]


def read_weights(folder) -> dict:
    from safetensors.torch import load_file
    return load_file(os.path.join(str(folder), "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


class Interrupted(BaseException):
    """Stands for a kill (or Ctrl-C) right after a checkpoint was written: no handler may swallow it."""


def interrupt_after_saves(monkeypatch, count: int) -> None:
    """Make Checkpointer.save raise Interrupted once it has written ``count`` checkpoints in this run."""
    from sparsesam.checkpoint import Checkpointer
    original = Checkpointer.save
    calls = {"n": 0}

    def save(self, state):
        original(self, state)
        calls["n"] += 1
        if calls["n"] == count:
            raise Interrupted(f"interrupted after checkpoint {count}")

    monkeypatch.setattr(Checkpointer, "save", save)


# --- a fake algorithm registry (the real algorithms live in sparsesam.algorithms) -------------------


@dataclasses.dataclass
class FakeConfig:
    target_sparsity: float = 0.5
    finetune_epochs: int = 3
    lr: float = 0.05
    layerwise: bool = False


class FakeLayerwise:
    """Magnitude pruning (global or layer-wise) with no training: exercises config building and --set."""

    config_type = FakeConfig
    seen_configs: List[FakeConfig] = []

    def __init__(self, config: FakeConfig) -> None:
        assert isinstance(config, FakeConfig)
        FakeLayerwise.seen_configs.append(config)
        self.config = config

    def fit(self, model, train_loader, *, val_loader=None, progress=True, checkpoint=None):
        sparsify(model)
        magnitude_prune(model, self.config.target_sparsity, scope="layer" if self.config.layerwise else "global")
        if checkpoint is not None:
            checkpoint.save({"model": model.state_dict(), "epoch": 1})
        return FitResult(model, [{"phase": "prune", "epoch": 1, "loss": 0.0, "accuracy": 0.0}], {})


@dataclasses.dataclass
class FakeStructuredConfig:
    target_sparsity: float = 0.5


class FakeStructured:
    """Channel pruning (L2) with gates, reporting the compacted model in its summary, as structured algorithms do."""

    def __init__(self, config: FakeStructuredConfig) -> None:
        self.config = config

    def fit(self, model, train_loader, *, val_loader=None, progress=True, checkpoint=None):
        from sparsesam.pruning import channel_prune, compact_channels, gate_pruned_channels
        sparsify(model)
        example = next(iter(train_loader))[0][:2]
        channel_prune(model, self.config.target_sparsity)
        gate_pruned_channels(model, example)
        compacted, _ = compact_channels(model, example)
        if checkpoint is not None:
            checkpoint.save({"model": model.state_dict(), "epoch": 1})
        history = [{"phase": "prune", "epoch": 1, "loss": 0.0, "accuracy": 0.0}]
        return FitResult(model, history, {"compacted_model": compacted})


def fake_registry() -> dict:
    return {**ALGORITHMS, "fake": FakeLayerwise, "structured": FakeStructured}
