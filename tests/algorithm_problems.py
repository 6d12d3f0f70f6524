"""A tiny problem for the algorithm tests: scikit-learn digits at 8x8 and an 8-channel SmallCNN.

The dense model is trained once per session (a second or so) and every test
starts from a copy of it, as the algorithms expect a dense trained model.
MemoryCheckpoint implements the checkpoint protocol in memory, serialising
the state with torch.save as a file would (so no live tensor is shared), and
can simulate an interruption after a number of saves.
"""
from __future__ import annotations

import functools
import io
import math
from typing import Optional

import torch
from torch.utils.data import DataLoader, Subset

from sparsesam.data import load_digits
from sparsesam.models import SmallCNN
from sparsesam.training import evaluate, train_epoch

NUM_CLASSES = 10
CHANCE = 1.0 / NUM_CLASSES
TRAIN_LIMIT = 640


@functools.lru_cache(maxsize=None)
def _datasets():
    return load_digits(True, image_size=8), load_digits(False, image_size=8), load_digits(True, image_size=8,
                                                                                           limit=TRAIN_LIMIT)


def train_loader(seed: int = 0, size: Optional[int] = None) -> DataLoader:
    """Shuffled batches of 64 from a 640-image subset (its first ``size`` images), drawn from a seeded generator."""
    data = _datasets()[2]
    if size is not None:
        data = Subset(data, range(size))
    return DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))


def eval_loader() -> DataLoader:
    return DataLoader(_datasets()[1], batch_size=512)


def fresh_model() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(in_channels=1, num_classes=NUM_CLASSES, width=8, image_size=8)


@functools.lru_cache(maxsize=None)
def _pretrained_state():
    model = fresh_model()
    train, _, _ = _datasets()
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        train_epoch(model, loader, optimizer, desc="train", progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


def pretrained_model() -> SmallCNN:
    """A dense SmallCNN trained for three epochs on digits (same weights every call)."""
    model = fresh_model()
    model.load_state_dict(_pretrained_state())
    return model


def dense_accuracy() -> float:
    return evaluate(pretrained_model(), eval_loader(), progress=False)["accuracy"]


class Interrupted(Exception):
    pass


class MemoryCheckpoint:
    """The checkpoint protocol in memory; ``stop_after=k`` raises Interrupted right after the k-th save."""

    def __init__(self, stop_after: Optional[int] = None, data: Optional[bytes] = None) -> None:
        self.stop_after = stop_after
        self.data = data
        self.saves = 0

    def load(self):
        if self.data is None:
            return None
        return torch.load(io.BytesIO(self.data), weights_only=True)

    def save(self, state: dict) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.data = buffer.getvalue()
        self.saves += 1
        if self.stop_after is not None and self.saves >= self.stop_after:
            raise Interrupted(f"stopped after {self.saves} epochs")


def assert_history_finite(history, epochs: int) -> None:
    assert len(history) == epochs
    for record in history:
        assert {"phase", "epoch", "loss", "accuracy", "sparsity", "lr"} <= set(record)
        for key, value in record.items():
            if isinstance(value, float):
                assert math.isfinite(value), (record, key)


def assert_resume_identical(make_algorithm, stop_after: int, model_factory=pretrained_model) -> None:
    """A fit interrupted after ``stop_after`` epochs and resumed equals, bit for bit, one that ran through."""
    reference = make_algorithm().fit(model_factory(), train_loader(), progress=False)

    checkpoint = MemoryCheckpoint(stop_after=stop_after)
    try:
        make_algorithm().fit(model_factory(), train_loader(), progress=False, checkpoint=checkpoint)
    except Interrupted:
        pass
    else:
        raise AssertionError("the run was not interrupted: stop_after is past the last epoch")
    # A new process: fresh model, fresh algorithm, a loader whose generator starts elsewhere.
    torch.manual_seed(12345)
    resumed_checkpoint = MemoryCheckpoint(data=checkpoint.data)
    resumed = make_algorithm().fit(model_factory(), train_loader(seed=999), progress=False,
                                   checkpoint=resumed_checkpoint)

    expected, actual = reference.model.state_dict(), resumed.model.state_dict()
    assert list(expected) == list(actual)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), f"{key} differs after resuming"
    assert resumed.history == reference.history
    assert resumed_checkpoint.saves == len(reference.history) - stop_after
