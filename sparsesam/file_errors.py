"""BadFileError: a file the package reads is unusable -- one line naming the file and what is wrong.

Raised by the readers of checkpoints (:mod:`sparsesam.checkpoint`) and of
dataset files (:mod:`sparsesam.data`) when a file is empty, truncated,
corrupt, of another kind altogether, or from another run (model, width,
algorithm). It is a ValueError, so code that already catches bad values
catches it too; the CLI turns it into exit status 2 with its message.

The message is always one line, ``<path>: <problem>``: low-level errors
(zip, pickle, numpy, load_state_dict) are multi-line or name nothing, so
their text is folded into the problem and the original stays as
``__cause__`` for a debugger.
"""
from __future__ import annotations

import os
from typing import Union

# Longest piece of a low-level error quoted in a message: enough to say what
# it was, short enough to stay one readable line.
_DETAIL_CHARS = 300


class BadFileError(ValueError):
    """``path`` cannot be used: ``problem`` says why. ``str(error)`` is ``"<path>: <problem>"``, one line."""

    def __init__(self, path: Union[str, os.PathLike], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = one_line(problem)
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self):
        # Pickled with its two fields (the default rebuilds from self.args, the one message, and fails): a
        # study worker (``sparsesam reproduce --workers N``) sends its error back to the parent, and rank 0 sends
        # a bad file's error to the other ranks of a torchrun job (sparsesam.distributed.on_main_process).
        return type(self), (self.path, self.problem)


class BadCheckpointError(BadFileError):
    """A checkpoint that cannot be resumed from (unreadable, or written by another run)."""


class BadDatasetFileError(BadFileError):
    """A dataset file (Fashion-MNIST IDX, CIFAR-10 batch) that is truncated, corrupt or of another format."""


def one_line(text: str) -> str:
    """``text`` with its lines joined by "; " (tabs and repeated spaces folded), cut to a readable length."""
    parts = [" ".join(line.split()) for line in str(text).splitlines()]
    joined = "; ".join(part for part in parts if part)
    return joined if len(joined) <= _DETAIL_CHARS else joined[:_DETAIL_CHARS - 3].rstrip() + "..."


def describe(error: BaseException) -> str:
    """``"<Type>: <message>"`` of a low-level error, on one line (the type alone when the message is empty)."""
    message = one_line(str(error))
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


__all__ = ["BadFileError", "BadCheckpointError", "BadDatasetFileError", "one_line", "describe"]
