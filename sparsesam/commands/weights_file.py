"""safetensors files written byte for byte the same by identical runs, and read with one-line errors.

``safetensors.torch.save`` lays the tensors out deterministically (by dtype
alignment, then name), but serialises the ``__metadata__`` map from a Rust
HashMap, whose order changes from one process to the next: two identical
runs wrote files that differed in the metadata's key order.
:func:`write_safetensors` therefore takes the library's bytes and rewrites
only the header, with the metadata keys sorted (compact JSON, padded with
spaces to a multiple of 8 bytes as the library pads it; the tensor offsets
are relative to the end of the header, so they stay valid), and writes the
file atomically (sparsesam._files).

Reading goes through the library too; whatever it raises on a truncated,
empty or foreign file becomes a one-line :class:`BadFileError` naming it.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Mapping, Optional

import torch

from .._files import atomic_write
from ..file_errors import BadFileError, describe

# The 8-byte little-endian header length that starts a safetensors file, and the alignment of its data.
_LENGTH_BYTES = 8
_ALIGNMENT = 8


def _safetensors_torch():
    try:
        import safetensors.torch
    except ImportError as error:  # a declared dependency; only a broken install gets here
        raise ImportError("model folders are written and read with safetensors: pip install safetensors") from error
    return safetensors.torch


def canonical_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """The safetensors bytes of ``tensors``, with the header's metadata keys in sorted order."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError(f"metadata must map str to str, got {dict(metadata)!r}")
    data = _safetensors_torch().save(dict(tensors), metadata=None if metadata is None else dict(metadata))
    length = int.from_bytes(data[:_LENGTH_BYTES], "little")
    header = json.loads(data[_LENGTH_BYTES:_LENGTH_BYTES + length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % _ALIGNMENT)
    return len(text).to_bytes(_LENGTH_BYTES, "little") + text + data[_LENGTH_BYTES + length:]


def write_safetensors(path: str, tensors: Mapping[str, torch.Tensor],
                      metadata: Optional[Mapping[str, str]] = None) -> str:
    """Write ``tensors`` to ``path`` atomically, in the same bytes for the same tensors and metadata."""
    return atomic_write(path, canonical_safetensors(tensors, metadata))


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file (on the CPU); BadFileError if it is missing, truncated or foreign."""
    if not os.path.isfile(path):
        raise BadFileError(path, "the weights file is missing")
    if os.path.getsize(path) == 0:
        raise BadFileError(path, "the weights file is empty (0 bytes)")
    safetensors_torch = _safetensors_torch()
    from safetensors import SafetensorError
    try:
        return safetensors_torch.load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise BadFileError(path, f"not a readable safetensors file (truncated, corrupt or another format): "
                                 f"{describe(error)}") from error


__all__ = ["canonical_safetensors", "write_safetensors", "read_safetensors"]
