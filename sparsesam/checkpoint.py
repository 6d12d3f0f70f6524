"""Resumable runs: atomic checkpoint files and the random-number state a run must carry.

``Checkpointer(path)`` is the object the CLI hands to a training loop or to an
algorithm's ``fit(..., checkpoint=...)``: ``load()`` gives the state to resume
from (or None) and ``save(state)`` is called at the end of every epoch.

A save never leaves a half-written checkpoint: the state goes to a temporary
file in the same folder, is flushed and fsync'ed, then ``os.replace`` swaps it
in (atomic on POSIX), and the folder is fsync'ed so the rename survives a
crash. A run killed at any instant (SIGKILL included) therefore finds either
the previous complete checkpoint or the new one.

Exact resumption also needs every random stream where it was:
``capture_rng_state`` / ``restore_rng_state`` cover torch's CPU (and CUDA)
generators, Python's ``random``, NumPy's global generator and, optionally, a
DataLoader's own ``torch.Generator`` (its shuffling order and worker seeds are
drawn from it once per epoch).
"""
from __future__ import annotations

import os
import pickle
import random
import tempfile
from typing import Any, Dict, Optional

import numpy as np
import torch


class Checkpointer:
    """Atomic, single-file checkpoints at ``path`` (torch.save of a dict).

    A state may hold tensors, numbers, strings, None and (nested) lists,
    tuples and dicts -- what ``torch.load(weights_only=True)`` reads back, so
    loading a checkpoint never runs code from the file.
    """

    def __init__(self, path: str) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        self.path = os.fspath(path)
        if not self.path or os.path.isdir(self.path):
            raise ValueError(f"path must name a file, got {self.path!r}")
        self.saves = 0  # how many times save() succeeded in this process

    def exists(self) -> bool:
        return os.path.isfile(self.path)

    def load(self) -> Optional[Dict[str, Any]]:
        """The last saved state, or None when no checkpoint was written yet."""
        if not self.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(f"checkpoint {self.path} holds objects other than tensors, numbers, strings, lists "
                             f"and dicts, which are not loaded: {error}") from error
        if not isinstance(state, dict):
            raise ValueError(f"checkpoint {self.path} does not hold a dict (got {type(state).__name__})")
        return state

    def save(self, state: Dict[str, Any]) -> None:
        """Write ``state`` atomically: the previous checkpoint stays intact until the new one is complete."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            # Failed or interrupted mid-write: remove the partial temporary file, keep the old checkpoint.
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        _fsync_directory(directory)
        self._remove_stale_temporaries(directory)
        self.saves += 1

    def _remove_stale_temporaries(self, directory: str) -> None:
        # A process killed mid-save (SIGKILL, power loss) leaves its temporary file behind.
        prefix = f".{os.path.basename(self.path)}."
        for name in os.listdir(directory):
            if name.startswith(prefix) and name.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(directory, name))
                except FileNotFoundError:
                    pass

    def remove(self) -> None:
        """Delete the checkpoint (e.g. once a run has finished and exported its results)."""
        if self.exists():
            os.unlink(self.path)

    def __repr__(self) -> str:
        return f"Checkpointer({self.path!r})"


def _fsync_directory(directory: str) -> None:
    # Makes the rename durable; some filesystems refuse to open a directory, which is fine to skip.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _numpy_state() -> tuple:
    # As plain Python values (the key array as a list), so weights_only loading accepts it.
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return kind, key.tolist(), int(pos), int(has_gauss), float(cached)


def capture_rng_state(loader_generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
    """Every random stream a training run draws from, as a picklable dict."""
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    if loader_generator is not None:
        if not isinstance(loader_generator, torch.Generator):
            raise TypeError(f"loader_generator must be a torch.Generator, got {type(loader_generator).__name__}")
        state["loader"] = loader_generator.get_state()
    return state


def restore_rng_state(state: Dict[str, Any], loader_generator: Optional[torch.Generator] = None) -> None:
    """Put every stream back where ``capture_rng_state`` found it."""
    for key in ("torch", "python", "numpy"):
        if key not in state:
            raise ValueError(f"state has no {key!r} RNG state: was it made by capture_rng_state?")
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader_generator is not None:
        if "loader" not in state:
            raise ValueError("state holds no DataLoader generator state, but loader_generator was given")
        loader_generator.set_state(state["loader"])


__all__ = ["Checkpointer", "capture_rng_state", "restore_rng_state"]
