"""Op registrations: every schema of csrc/common/schemas.h, in every namespace.

``csrc/common/schemas.h`` is the one list of op schemas. Every schema there
must be registered under ``torch.ops.sparsesam`` (CPU kernel + the Python
CUDA router) and, in a build with the CUDA C++ kernels, under
``torch.ops.sparsesam_cuda`` (CUDA kernel only) with the identical signature;
that check runs everywhere, GPU or not, so a schema added to the header but
not to ops.cpp or to the CUDA registration fails CI.

scripts/check_cuda_build.sh runs this file in the CUDA build too.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import sparsesam  # noqa: F401  (registers the ops and the CUDA router)
from sparsesam.ops import cuda_cpp_available

SCHEMAS_H = Path(__file__).resolve().parents[1] / "csrc" / "common" / "schemas.h"


def header_schemas() -> dict:
    """``{op name: schema}`` from the SPARSESAM_SCHEMA_* macros in schemas.h."""
    text = re.sub(r"\\\n", " ", SCHEMAS_H.read_text())  # join continued macro lines
    schemas = {}
    for line in text.splitlines():
        define = re.match(r"\s*#\s*define\s+SPARSESAM_SCHEMA_\w+\s+(.*)", line)
        if define:
            # Adjacent string literals concatenate, as in C.
            schema = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', define.group(1)))
            schemas[schema.split("(", 1)[0].strip()] = schema
    return schemas


# Ops without a CUDA C++ kernel yet: CUDA tensors run their reference
# (registered on sparsesam:: by their Python face; see its docstring).
NO_CUDA_CPP_KERNEL = {"sparse_conv2d", "sparse_conv2d_backward"}


@pytest.mark.skipif(not SCHEMAS_H.exists(), reason="needs the source tree (csrc/common/schemas.h)")
def test_every_schema_is_registered():
    schemas = header_schemas()
    assert {"apply_mask", "masked_weight_grad", "masked_linear", "masked_conv2d"} <= set(schemas)
    # Public ops: a CPU kernel from csrc/cpu and the CUDA router from sparsesam/ops.
    namespaces = {"sparsesam": ("CPU", "CUDA")}
    if cuda_cpp_available():
        # Only CUDA: the CUDA C++ kernels never serve CPU tensors.
        namespaces["sparsesam_cuda"] = ("CUDA",)
    for ns, keys in namespaces.items():
        for name, schema in schemas.items():
            if ns == "sparsesam_cuda" and name in NO_CUDA_CPP_KERNEL:
                continue
            assert hasattr(getattr(torch.ops, ns), name), f"{ns}::{name} is in schemas.h but not registered"
            registered = getattr(getattr(torch.ops, ns), name).default._schema
            assert registered == torch._C.parse_schema(f"{ns}::{schema}"), f"{registered} != {ns}::{schema}"
            for key in keys:
                assert torch._C._dispatch_has_kernel_for_dispatch_key(f"{ns}::{name}", key), f"{ns}::{name} has no {key} kernel"
