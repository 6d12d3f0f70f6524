"""Writing files atomically: a reader (or a run killed mid-write) sees the old file or the new one, never half.

Every file the package writes goes through :func:`atomic_file` (or
:func:`atomic_write`): the bytes go to a temporary file in the target's own
folder (``os.replace`` is atomic only within one filesystem), which is
flushed and fsync'ed before ``os.replace`` swaps it in; the folder is then
fsync'ed so the rename itself survives a power loss. If writing fails or is
interrupted (an exception, Ctrl-C), the temporary file is removed and the
previous file stays as it was. A process killed outright (SIGKILL) leaves
its temporary file behind, named ``.<name>.<random>.tmp``; the next
successful write of the same file removes such leftovers
(:func:`remove_stale_temporaries`).
"""
from __future__ import annotations

import contextlib
import os
import secrets
from typing import IO, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def _temporary_prefix(path: str) -> str:
    return f".{os.path.basename(path)}."


@contextlib.contextmanager
def atomic_file(path: PathLike, mode: str = "wb", *, fsync: bool = True) -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; on a clean exit it replaces ``path`` atomically.

    mode: "wb" (bytes) or "w" (text, UTF-8). fsync: flush the data and the
    rename to disk (what makes the write survive a crash; tests of many
    tiny files may turn it off).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = _create_temporary(path, directory)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Failed or interrupted mid-write: drop the partial temporary file, keep the previous file.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_directory(directory)
    remove_stale_temporaries(path)


def atomic_write(path: PathLike, data: Union[bytes, str], *, fsync: bool = True) -> str:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically; returns the path."""
    if not isinstance(data, (bytes, str)):
        raise TypeError(f"data must be bytes or str, got {type(data).__name__}")
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w", fsync=fsync) as f:
        f.write(data)
    return os.fspath(path)


def remove_stale_temporaries(path: PathLike) -> None:
    """Delete the temporary files that writes of ``path`` killed mid-way (SIGKILL, power loss) left behind."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    prefix = _temporary_prefix(path)
    for name in os.listdir(directory):
        if name.startswith(prefix) and name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:  # another process cleaned it up first
                pass


def fsync_directory(directory: PathLike) -> None:
    """Make a rename in ``directory`` durable; filesystems that refuse to open a folder are skipped."""
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temporary(path: str, directory: str) -> "tuple[int, str]":
    # Like tempfile.mkstemp (a fresh random name, O_EXCL), but with the permissions a plain open() gives
    # (0666 less the umask) rather than mkstemp's private 0600: the file becomes the user's result.
    for _ in range(100):
        tmp = os.path.join(directory, f"{_temporary_prefix(path)}{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name next to {path}")


__all__ = ["atomic_file", "atomic_write", "remove_stale_temporaries", "fsync_directory"]
