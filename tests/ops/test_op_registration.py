"""Op registrations: every schema of csrc/common/schemas.h, in every namespace, from that one list.

``csrc/common/schemas.h`` holds the one list of op schemas (``kSchemas``);
ops.cpp defines each entry under ``torch.ops.sparsesam`` (CPU kernels from
csrc/cpu, the CUDA kernel bound by sparsesam/ops/_library.py) and, in a build
with the CUDA C++ kernels, under ``torch.ops.sparsesam_cuda`` (CUDA kernels
only) with the identical signature. Python reads the same list through
``sparsesam._C.schemas()``. These checks run everywhere, GPU or not, so a
schema missing a kernel, or a second schema list creeping back into a kernel
file, fails CI.

scripts/check_cuda_build.sh runs this file in the CUDA build too.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import sparsesam._C
from sparsesam.ops import OPS, cuda_cpp_available

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SCHEMAS_H = CSRC / "common" / "schemas.h"

# Ops without a CUDA C++ kernel yet: CUDA tensors run their reference under
# every backend (sparsesam/ops/_library.py; named in the op's docstring).
NO_CUDA_CPP_KERNEL = {"sparse_conv2d", "sparse_conv2d_backward"}


def header_schemas() -> list:
    """The entries of ``kSchemas`` in schemas.h, adjacent string literals joined as in C."""
    text = re.sub(r"//[^\n]*", "", SCHEMAS_H.read_text())  # comments may hold quotes and commas
    body = re.search(r"kSchemas\[\]\s*=\s*\{(.*?)\};", text, re.S).group(1)
    entries = re.findall(r'((?:"(?:[^"\\]|\\.)*"\s*)+),?', body)
    return ["".join(re.findall(r'"((?:[^"\\]|\\.)*)"', entry)) for entry in entries]


def compiled_schemas() -> dict:
    return {schema.split("(", 1)[0]: schema for schema in sparsesam._C.schemas()}


def test_the_python_op_list_is_the_compiled_schema_list():
    schemas = compiled_schemas()
    assert len(schemas) == len(sparsesam._C.schemas()), "an op name appears twice in schemas.h"
    assert tuple(schemas) == OPS
    assert {"apply_mask", "masked_weight_grad", "masked_linear", "masked_conv2d", "sam_perturb_"} <= set(OPS)


@pytest.mark.skipif(not SCHEMAS_H.exists(), reason="needs the source tree (csrc/common/schemas.h)")
def test_the_compiled_list_is_the_header():
    # A stale build (schemas.h edited, the extension not rebuilt) fails here.
    assert header_schemas() == list(sparsesam._C.schemas())


@pytest.mark.skipif(not CSRC.exists(), reason="needs the source tree (csrc/)")
def test_no_schema_is_defined_outside_the_one_list():
    """Only ops.cpp defines schemas, and only from kSchemas: no second copy in a kernel file."""
    definers = {}
    for path in sorted(CSRC.rglob("*")):
        if path.suffix in {".cpp", ".cu", ".h", ".cuh"}:
            code = re.sub(r"//[^\n]*", "", path.read_text())
            found = re.findall(r"\bTORCH_LIBRARY(?:_FRAGMENT)?\s*\(|\bm\.def\s*\(", code)
            if found:
                definers[path.relative_to(CSRC).as_posix()] = found
    assert set(definers) == {"ops.cpp"}, definers
    ops_cpp = re.sub(r"//[^\n]*", "", (CSRC / "ops.cpp").read_text())
    assert re.findall(r"m\.def\s*\(([^)]*)\)", ops_cpp) == ["schema"]  # the loop over kSchemas


def test_every_schema_is_registered():
    schemas = compiled_schemas()
    # Public ops: a CPU kernel from csrc/cpu and the CUDA kernel bound in sparsesam/ops/_library.py.
    namespaces = {"sparsesam": ("CPU", "CUDA")}
    if cuda_cpp_available():
        # Only CUDA: the CUDA C++ kernels never serve CPU tensors.
        namespaces["sparsesam_cuda"] = ("CUDA",)
    for ns, keys in namespaces.items():
        for name, schema in schemas.items():
            assert hasattr(getattr(torch.ops, ns), name), f"{ns}::{name} is in schemas.h but not registered"
            registered = getattr(getattr(torch.ops, ns), name).default._schema
            assert registered == torch._C.parse_schema(f"{ns}::{schema}"), f"{registered} != {ns}::{schema}"
            if ns == "sparsesam_cuda" and name in NO_CUDA_CPP_KERNEL:
                continue
            for key in keys:
                assert torch._C._dispatch_has_kernel_for_dispatch_key(f"{ns}::{name}", key), f"{ns}::{name} has no {key} kernel"
