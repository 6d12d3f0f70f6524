"""Resumable runs: atomic checkpoint files and the random-number state a run must carry.

``Checkpointer(path)`` is the object the CLI hands to a training loop or to an
algorithm's ``fit(..., checkpoint=...)``: ``load()`` gives the state to resume
from (or None) and ``save(state)`` is called at the end of every epoch.

A save never leaves a half-written checkpoint (:func:`sparsesam._files.atomic_file`):
the state goes to a temporary file in the same folder, is flushed and
fsync'ed, then ``os.replace`` swaps it in (atomic on POSIX), and the folder
is fsync'ed so the rename survives a crash. A run killed at any instant
(SIGKILL included) therefore finds either the previous complete checkpoint
or the new one. torch.save's bytes depend only on the state, so identical
runs write identical checkpoints.

Under torchrun (an initialised process group) every rank calls the same
methods and rank 0 alone touches the file: ``save`` and ``remove`` run on
rank 0 and the others wait for it; ``exists`` and ``load`` are rank 0's
answer, sent to every rank (sparsesam.distributed.on_main_process), so all
ranks resume from the same state, or all fail with the same error, even
when the output folder is not shared between machines.

Exact resumption also needs every random stream where it was:
``capture_rng_state`` / ``restore_rng_state`` cover torch's CPU (and CUDA)
generators, Python's ``random``, NumPy's global generator and, optionally, a
DataLoader's own ``torch.Generator`` (its shuffling order and worker seeds are
drawn from it once per epoch).

Reading is checked, so a bad file is a one-line
:class:`~sparsesam.file_errors.BadCheckpointError` (a ValueError) naming
it, never a traceback from deep inside torch: an empty file, one that is not
a zip archive (random bytes, text, another format), a truncated archive, a
member whose bytes fail the archive's CRC-32 (torch.load itself does not
check it, so a flipped bit would load silently), objects other than plain
data, keys a resume needs that are missing (``load(required=...)``), a
state written by another algorithm or version (``expect``), and a model or
optimizer state that does not fit the run's (``restore``: another model,
width or optimizer).
"""
from __future__ import annotations

import os
import pickle
import random
import time
import zipfile
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from ._files import atomic_file
from .distributed import on_main_process
from .file_errors import BadCheckpointError, describe

# Test hook: seconds Checkpointer.save waits between writing the temporary file and putting it in place
# (tests/commands/test_cli_sigkill.py kills a run there). Unset in normal use.
WRITE_DELAY_ENV = "SPARSESAM_TEST_CHECKPOINT_WRITE_DELAY"
# torch.save's format is a zip archive; its first local file header starts with these bytes.
_ZIP_MAGIC = b"PK\x03\x04"
# What torch.load and load_state_dict raise on bytes or states they cannot use (each seen on a bad file).
READ_ERRORS = (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError,
               zipfile.BadZipFile)


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
        return on_main_process(os.path.isfile, self.path)

    def load(self, required: Sequence[str] = ()) -> Optional[Dict[str, Any]]:
        """The last saved state, or None when no checkpoint was written yet.

        required: keys the caller's resume needs; one that is missing is a
        BadCheckpointError (a checkpoint of another command or version).
        Any unreadable file is a BadCheckpointError naming it (module docstring).
        """
        if isinstance(required, str) or not all(isinstance(key, str) for key in required):
            raise TypeError(f"required must be a sequence of str keys, got {required!r}")
        return on_main_process(self._load, tuple(required))

    def _load(self, required: Sequence[str]) -> Optional[Dict[str, Any]]:
        if not os.path.isfile(self.path):
            return None
        state = read_checkpoint(self.path)
        missing = [key for key in required if key not in state]
        if missing:
            raise BadCheckpointError(self.path, f"the checkpoint lacks {missing} (it holds {sorted(state)}): "
                                                f"it was written by another command or version")
        return state

    def expect(self, state: Dict[str, Any], **expected: Any) -> None:
        """Refuse a loaded ``state`` whose fields differ from ``expected`` (e.g. ``algorithm="adasap", version=2``)."""
        for key, value in expected.items():
            if state.get(key) != value:
                raise BadCheckpointError(self.path, f"the checkpoint was written with {key}={state.get(key)!r}, "
                                                    f"this run has {key}={value!r}")

    def restore(self, target: Any, state: Dict[str, Any], key: str) -> None:
        """``target.load_state_dict(state[key])`` (a module or an optimizer); a state that does not fit is a
        BadCheckpointError naming the file (a checkpoint of another model, width or optimizer)."""
        restore_state(target, state, key, source=self.path)

    def save(self, state: Dict[str, Any]) -> None:
        """Write ``state`` atomically: the previous checkpoint stays intact until the new one is complete."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        on_main_process(self._write, state)
        self.saves += 1

    def _write(self, state: Dict[str, Any]) -> None:
        delay = _test_write_delay()
        with atomic_file(self.path, "wb") as f:
            torch.save(state, f)
            if delay:
                # Test hook (WRITE_DELAY_ENV): hold the complete temporary file before it replaces the
                # checkpoint, so a test can kill the process in the middle of a checkpoint write.
                f.flush()
                time.sleep(delay)

    def remove(self) -> None:
        """Delete the checkpoint (e.g. once a run has finished and exported its results)."""
        on_main_process(_unlink_if_present, self.path)

    def __repr__(self) -> str:
        return f"Checkpointer({self.path!r})"


def _unlink_if_present(path: str) -> None:
    if os.path.isfile(path):
        os.unlink(path)


def checkpoint_source(checkpoint: Any) -> str:
    """What an error about ``checkpoint`` names: a Checkpointer's path, else the object's type (a
    duck-typed checkpoint handed to ``Algorithm.fit``)."""
    path = getattr(checkpoint, "path", None)
    return os.fspath(path) if isinstance(path, (str, os.PathLike)) else f"<{type(checkpoint).__name__}>"


def restore_state(target: Any, state: Dict[str, Any], key: str, *, source: str) -> None:
    """``target.load_state_dict(state[key])`` for a module or an optimizer; a state that does not fit (another
    model, width, optimizer or algorithm) is a BadCheckpointError naming ``source`` (the checkpoint's path)."""
    if not callable(getattr(target, "load_state_dict", None)):
        raise TypeError(f"target must have a load_state_dict method, got {type(target).__name__}")
    if key not in state:
        raise BadCheckpointError(source, f"the checkpoint has no {key!r} state (it holds {sorted(state)})")
    problem = f"its {key!r} state does not fit this run's {type(target).__name__} (a checkpoint of another " \
              f"model, width, optimizer or algorithm?)"
    try:
        target.load_state_dict(state[key])
    except READ_ERRORS as error:
        raise BadCheckpointError(source, f"{problem}: {describe(error)}") from error
    if isinstance(target, torch.optim.Optimizer):
        mismatch = _optimizer_shape_mismatch(target)
        if mismatch:
            raise BadCheckpointError(source, f"{problem}: {mismatch}")


def _optimizer_shape_mismatch(optimizer: torch.optim.Optimizer) -> Optional[str]:
    # Optimizer.load_state_dict matches parameters by position only: the buffers of a model of another
    # width load without complaint and fail (or broadcast) at the first step. Each per-parameter buffer
    # must have its parameter's shape (momentum, exp_avg, ...) or its leading dimensions (a per-output-
    # channel statistic, e.g. AdaSAP's channel_rho of shape (out_channels,)); 0-d entries (step counts)
    # are exempt.
    index = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and (
                        value.dim() > param.dim() or value.shape != param.shape[:value.dim()]):
                    return (f"its {name} of parameter {index} has shape {tuple(value.shape)}, the parameter "
                            f"{tuple(param.shape)}")
            index += 1
    return None


def read_checkpoint(path: str) -> Dict[str, Any]:
    """The dict a checkpoint file holds, loaded with ``weights_only=True``; BadCheckpointError if unusable."""
    if os.path.getsize(path) == 0:
        raise BadCheckpointError(path, "the checkpoint is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    if head != _ZIP_MAGIC:
        raise BadCheckpointError(path, f"not a checkpoint written by torch.save: it does not start like a zip archive "
                                       f"(first bytes {head!r}); random bytes or another kind of file?")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every member and checks its CRC-32
    except READ_ERRORS as error:
        raise BadCheckpointError(path, f"the checkpoint is truncated or corrupt: its zip archive cannot be read "
                                       f"({describe(error)})") from error
    if damaged is not None:
        raise BadCheckpointError(path, f"the checkpoint is corrupt: archive member {damaged} fails its CRC-32 check")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise BadCheckpointError(path, f"the checkpoint holds objects other than tensors, numbers, strings, lists "
                                       f"and dicts, which are not loaded ({describe(error)})") from error
    except READ_ERRORS as error:
        raise BadCheckpointError(path, f"the checkpoint cannot be read by torch.load: {describe(error)}") from error
    if not isinstance(state, dict):
        raise BadCheckpointError(path, f"the checkpoint does not hold a dict (got {type(state).__name__})")
    return state


def _test_write_delay() -> float:
    text = os.environ.get(WRITE_DELAY_ENV)
    if not text:
        return 0.0
    try:
        delay = float(text)
    except ValueError:
        raise ValueError(f"{WRITE_DELAY_ENV} must be a number of seconds, got {text!r}") from None
    if not 0 <= delay < 3600:
        raise ValueError(f"{WRITE_DELAY_ENV} must be in [0, 3600) seconds, got {text!r}")
    return delay


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


__all__ = ["Checkpointer", "read_checkpoint", "restore_state", "checkpoint_source", "READ_ERRORS", "WRITE_DELAY_ENV",
           "capture_rng_state", "restore_rng_state", "BadCheckpointError"]
