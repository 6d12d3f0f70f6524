"""Reader for the IDX format of MNIST / Fashion-MNIST (optionally gzipped).

Every way a file can be unusable -- not gzip though named ``.gz``, a
truncated gzip stream, a wrong magic number, an unknown element type, a
header or payload shorter than the header promises, trailing bytes -- is a
one-line :class:`~sparsesam.file_errors.BadDatasetFileError` naming the
file, rather than numpy's or gzip's own error.
"""
from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from ..file_errors import BadDatasetFileError, describe

# IDX type codes -> numpy dtypes (big-endian on disk).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: str) -> bytes:
    if not path.endswith(".gz"):
        with open(path, "rb") as f:
            return f.read()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError; a cut stream an EOFError
        raise BadDatasetFileError(path, f"not a readable gzip file (truncated, or not gzip at all): "
                                        f"{describe(error)}") from error


def read_idx(path: str) -> np.ndarray:
    """The array stored in an IDX file (``.gz`` or plain)."""
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise BadDatasetFileError(path, f"not an IDX file (bad magic number: an IDX file starts with two zero bytes, "
                                        f"this one with {data[:4]!r})")
    dtype, ndim = data[2], data[3]
    if dtype not in _IDX_DTYPES:
        raise BadDatasetFileError(path, f"not an IDX file: unknown IDX element type 0x{dtype:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise BadDatasetFileError(path, f"truncated: the header of a {ndim}-d IDX array takes {header} bytes, "
                                        f"the file has {len(data)}")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    itemsize = np.dtype(_IDX_DTYPES[dtype]).itemsize
    expected = int(np.prod(shape, dtype=np.int64)) * itemsize
    payload = len(data) - header
    if payload < expected:
        raise BadDatasetFileError(path, f"truncated: the header says shape {shape} ({expected} bytes of data) but "
                                        f"the file holds {payload}")
    if payload > expected:
        raise BadDatasetFileError(path, f"{payload - expected} bytes follow the {shape} array the header describes: "
                                        f"not an IDX file, or a corrupt header")
    return np.frombuffer(data, dtype=_IDX_DTYPES[dtype], offset=header).reshape(shape)


def find_idx(root: str, stem: str) -> str:
    """``root/stem`` or ``root/stem.gz``, whichever exists."""
    for name in (stem, stem + ".gz"):
        path = os.path.join(root, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"neither {stem} nor {stem}.gz is in {root}")
