"""Weight storage of a fixed-mask linear layer, dense masked vs sparse, measured from the tensors.

MaskedLinear keeps the full fp32 weight and a bool mask whatever the sparsity;
CSRLinear keeps the nnz values and an int32 index (CSR, plus the transposed
index its backward uses, rebuilt on load and so not saved). Measured: the bytes
of every parameter and buffer each layer holds in memory, and the size of its
``state_dict`` serialised by ``torch.save`` (what a checkpoint costs).

``.venv/bin/python bench/weight_storage.py`` prints the table (report.py includes it).
"""
from __future__ import annotations

import io
from typing import List

import torch
from torch import nn

from sparsesam.nn import MaskedLinear, CSRLinear

FEATURES = 4096
SPARSITIES = [0.0, 0.5, 0.75, 0.9, 0.95, 0.99]


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of the distinct storages of ``module``'s parameters and buffers."""
    storages = {}
    for t in [*module.parameters(), *module.buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def state_dict_bytes(module: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.tell()


def measure(sparsities=SPARSITIES, features: int = FEATURES) -> List[dict]:
    """One row per sparsity: nnz and the measured bytes of both forms of a features x features layer."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for sparsity in sparsities:
        masked = MaskedLinear(features, features, mask=torch.rand(features, features, generator=gen) >= sparsity)
        sparse = CSRLinear.from_masked(masked)
        rows.append({"sparsity": sparsity, "nnz": sparse.nnz, "masked_bytes": tensor_bytes(masked),
                     "sparse_bytes": tensor_bytes(sparse), "masked_state_dict": state_dict_bytes(masked),
                     "sparse_state_dict": state_dict_bytes(sparse)})
    return rows


def table(rows: List[dict], features: int = FEATURES) -> str:
    mb = lambda b: b / 2**20  # noqa: E731
    out = ["| sparsity | nnz | dense masked in memory (MB) | sparse in memory (MB) | sparse / dense masked "
           "| dense masked state_dict (MB) | sparse state_dict (MB) | sparse / dense masked |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['sparsity']:.2f} | {r['nnz']:,} | {mb(r['masked_bytes']):.1f} | {mb(r['sparse_bytes']):.1f} "
                   f"| {r['sparse_bytes'] / r['masked_bytes']:.3f} | {mb(r['masked_state_dict']):.1f} "
                   f"| {mb(r['sparse_state_dict']):.1f} | {r['sparse_state_dict'] / r['masked_state_dict']:.3f} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(measure()))
