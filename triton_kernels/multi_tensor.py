"""The multi-tensor machinery of the Triton kernels that cover many tensors
in one call (sam_step.py, mask_scoring.py), apex-style.

The host writes one int64 table holding

* a row per tensor: its data pointers (``data_ptr()``), its length and
  whatever else its kernel reads (the row layout is the kernel's);
* a row per chunk of ``_CHUNK`` elements: (tensor row, first element);
* the float hyper-parameters as float64 bit patterns, so float64 tensors see
  them without a float32 detour;

copies it to the device in one transfer (pinned, non-blocking) and launches
one program per chunk. A program loads its row, turns the stored integers
back into typed pointers (``int64 -> pointer``, which the interpreter also
supports for CPU tensors) and walks its chunk in blocks of ``_BLOCK``.

Element types are compile-time constants, so tensors are grouped by their
dtypes and mask kind, one launch per group (``_Groups``). Reductions are
deterministic without atomics: one partial per chunk at the chunk's fixed
index, added in a fixed order by a single program. The sum-of-squares kernel
here serves both ``sam_grad_sq_norm`` and ``mask_grad_sq_norm``.

Package-private: the names keep their leading underscore.
"""
from __future__ import annotations

import struct
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

# Elementwise, bandwidth-bound work: blocks of 1024 elements x 4 warps; a
# program walks one chunk of 4 blocks, which amortises its table loads. The
# loop stops at the tensor's end, so a small tensor costs one block (this also
# keeps the interpreter's sequentially simulated programs cheap).
_BLOCK = 1024
_CHUNK = 4 * _BLOCK
_NUM_WARPS = 4
# The partials of the norm (one per chunk) are added by one program.
_SUM_BLOCK = 1024

# The element type a kernel reads a tensor as. A bool mask is read as its
# bytes (torch stores False/True as 0/1) and tested with != 0.
_TL_DTYPE = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bool: tl.int8,
}


# ---------------------------------------------------------------------------
# Kernels



# The kernels inline their small steps: under the interpreter every call of
# a @triton.jit helper costs milliseconds. Conventions shared by all three:
#
# * A tensor's pointers are int64 words of its row, cast back with
#   ``.to(tl.pointer_type(...))``; ``tl.multiple_of(ptr, ALIGN)`` then tells
#   the compiler they are 16-byte aligned when the host found them so (the
#   hint must go on the pointer: it does not survive the cast), which allows
#   16-byte vector loads and stores.
# * A chunk is walked as full blocks, loaded and stored without a mask (so
#   they can be vectorised), then at most one masked tail block.
# * Pruning masks are read with mask ``has_mask``, false for a dense tensor
#   of a masked group, whose mask pointer is null: the load never happens and
#   every entry counts as kept.



@triton.jit
def _chunk(table_ptr, chunk_ptr, ROW: tl.constexpr, NUMEL_AT: tl.constexpr, CHUNK: tl.constexpr,
           BLOCK: tl.constexpr):
    """This program's tensor row, and its chunk [start, end): full blocks up to full_end, then a tail."""
    c = tl.program_id(0)
    row = table_ptr + tl.load(chunk_ptr + 2 * c) * ROW
    start = tl.multiple_of(tl.load(chunk_ptr + 2 * c + 1), CHUNK)
    end = tl.minimum(start + CHUNK, tl.load(row + NUMEL_AT))
    full_end = start + (end - start) // BLOCK * BLOCK
    return row, start, full_end, end


@triton.jit
def _sq_norm_block(acc, g_ptr, w_ptr, m_ptr, has_mask, lo, end, ADAPTIVE: tl.constexpr, HAS_MASKS: tl.constexpr,
                   TAIL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.multiple_of(lo, BLOCK) + tl.arange(0, BLOCK)
    inb = offs < end if TAIL else None
    zero = 0.0 if TAIL else None
    v = tl.load(g_ptr + offs, mask=inb, other=zero).to(acc.dtype)
    if ADAPTIVE:
        v = v * tl.abs(tl.load(w_ptr + offs, mask=inb, other=zero).to(acc.dtype))
    v = v * v
    if HAS_MASKS:
        m = tl.load(m_ptr + offs, mask=inb & has_mask if TAIL else has_mask, other=1)
        # Select, not multiply: a pruned inf/nan gradient must add 0.
        v = tl.where(m != 0, v, 0.0)
    return acc + v


@triton.jit
def _sq_norm_partials_kernel(
    table_ptr,
    chunk_ptr,
    partial_ptr,
    G_DTYPE: tl.constexpr,
    W_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    HAS_MASKS: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    ALIGN: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Row: grad, weight (0 unless adaptive), mask (0 if dense), numel.
    row, start, full_end, end = _chunk(table_ptr, chunk_ptr, 4, 3, CHUNK, BLOCK)
    g_ptr = tl.multiple_of(tl.load(row).to(tl.pointer_type(G_DTYPE)), ALIGN)
    w_ptr = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(W_DTYPE)), ALIGN)
    m_ptr = tl.multiple_of(tl.load(row + 2).to(tl.pointer_type(M_DTYPE)), ALIGN)
    has_mask = tl.load(row + 2) != 0
    acc = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    for lo in range(start, full_end, BLOCK):
        acc = _sq_norm_block(acc, g_ptr, w_ptr, m_ptr, has_mask, lo, end, ADAPTIVE, HAS_MASKS, False, BLOCK)
    if full_end < end:
        acc = _sq_norm_block(acc, g_ptr, w_ptr, m_ptr, has_mask, full_end, end, ADAPTIVE, HAS_MASKS, True, BLOCK)
    # One partial per chunk at the chunk's own index: no atomics, and the
    # bits do not depend on which program runs first.
    tl.store(partial_ptr + tl.program_id(0), tl.sum(acc, axis=0).to(tl.float64))


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # A single program: lane i adds partials i, i + BLOCK, ... in order, then
    # a fixed-shape tree sum; the same n always gives the same bits.
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for lo in range(0, n, BLOCK):
        offs = lo + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))



# ---------------------------------------------------------------------------
# Host side: checks, groups, the table


def _float_bits(x: float) -> int:
    """The float64 bit pattern of x as a signed int64 (for the int64 table)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _check_lengths(**lists: Sequence) -> int:
    (first_name, first), *rest = lists.items()
    for name, value in rest:
        if len(value) != len(first):
            raise ValueError(f"{name} has {len(value)} entries but {first_name} has {len(first)}")
    return len(first)


def _elem(name: str, t, device: torch.device, *, is_mask: bool = False):
    """The kernel's element type for ``t``, after checking it is a tensor on ``device``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the first tensor is on {device}: all must be on one device")
    if (t.dtype == torch.bool and not is_mask) or t.dtype not in _TL_DTYPE:
        kinds = "bool or a floating dtype" if is_mask else "a floating dtype"
        raise TypeError(f"{name} has dtype {t.dtype}; expected {kinds}")
    return _TL_DTYPE[t.dtype]


def _same_shape(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}")


def _same_dtype(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} dtype {t.dtype} differs from {ref_name} dtype {ref.dtype}")


def _mask_elem(name: str, m: Optional[Tensor], ref_name: str, ref: Tensor):
    """The mask's element type, or None for a dense tensor (mask None)."""
    if m is None:
        return None
    dtype = _elem(name, m, ref.device, is_mask=True)
    _same_shape(name, m, ref_name, ref)
    return dtype


def _written(t: Tensor, writebacks: List[Tuple[Tensor, Tensor]], *, overwritten: bool = False) -> Tensor:
    """A contiguous tensor to write into; a non-contiguous one is copied back afterwards.

    overwritten: every entry is written (so a stand-in need not copy ``t`` first).
    """
    if t.is_contiguous():
        return t
    tmp = torch.empty_like(t, memory_format=torch.contiguous_format) if overwritten else t.contiguous()
    writebacks.append((t, tmp))
    return tmp


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


class _Group:
    """Tensors sharing one launch: the same element types and the same mask type."""

    def __init__(self, dtypes: tuple, mask_dtype) -> None:
        self.dtypes = dtypes
        self.mask_dtype = mask_dtype
        self.rows: List[List[int]] = []
        self.numels: List[int] = []
        self.per_channel = False
        self.aligned = True

    def take(self, other: "_Group") -> None:
        self.rows += other.rows
        self.numels += other.numels
        self.per_channel |= other.per_channel
        self.aligned &= other.aligned

    @property
    def n_chunks(self) -> int:
        return sum(triton.cdiv(n, _CHUNK) for n in self.numels)

    @property
    def has_masks(self) -> bool:
        return self.mask_dtype is not None

    @property
    def mask_or_placeholder(self):
        # A group without masks never reads one; any type will do.
        return self.mask_dtype if self.has_masks else tl.int8

    @property
    def align(self) -> int:
        # Every pointer 16-byte aligned (the norm for allocations): the
        # compiler may use 16-byte vector loads.
        return 16 if self.aligned else 1


class _Groups:
    """Tensor rows collected per group: ``add`` each non-empty tensor, then ``finish``."""

    def __init__(self) -> None:
        self._by_key: Dict[tuple, _Group] = {}

    def add(self, dtypes: tuple, mask_dtype, row: List[int], numel: int, vector_ptrs: Sequence[int],
            per_channel: bool = False) -> None:
        """row: the kernel's words for this tensor; vector_ptrs: the pointers it loads blocks from."""
        key = (dtypes, mask_dtype)
        group = self._by_key.get(key)
        if group is None:
            group = self._by_key[key] = _Group(dtypes, mask_dtype)
        group.rows.append(row)
        group.numels.append(numel)
        group.per_channel |= per_channel
        group.aligned &= all(p % 16 == 0 for p in vector_ptrs)

    def finish(self) -> List[_Group]:
        # Dense tensors (mask None) join a masked group of the same dtypes,
        # with a null mask pointer, so that masked weights plus dense biases
        # are one launch.
        groups = self._by_key
        for dtypes, mask_dtype in [k for k in groups if k[1] is None]:
            target = next((g for (d, m), g in groups.items() if d == dtypes and m is not None), None)
            if target is not None:
                target.take(groups.pop((dtypes, None)))
        return list(groups.values())


def _upload(groups: List[_Group], hyper: Sequence[float], device: torch.device):
    """One int64 table on ``device``: [hyper | per group: rows, chunks].

    Returns the hyper-parameters as a float64 view and, per group, views of
    its rows and its chunk list ((row, first element) pairs).
    """
    parts = [torch.tensor([_float_bits(x) for x in hyper] or [0], dtype=torch.int64)]
    spans = []
    at = parts[0].numel()
    for group in groups:
        rows = torch.tensor(group.rows, dtype=torch.int64).flatten()
        # (row i, start) for every chunk of every tensor, built without a
        # Python loop over chunks (a large model has hundreds of thousands).
        # (torch.repeat_interleave would do, but is slow on CPU: a cumsum of
        # row-start marks gives each chunk's row.) Every tensor here has at
        # least one chunk, so the marks land on distinct entries.
        counts = torch.tensor([triton.cdiv(n, _CHUNK) for n in group.numels], dtype=torch.int64)
        first_chunk = torch.cumsum(counts, 0) - counts
        marks = torch.zeros(int(first_chunk[-1] + counts[-1]), dtype=torch.int64)
        marks[first_chunk[1:]] = 1
        row_of_chunk = torch.cumsum(marks, 0)
        start = (torch.arange(marks.numel()) - first_chunk[row_of_chunk]) * _CHUNK
        chunks = torch.stack([row_of_chunk, start], dim=1).flatten()
        parts += [rows, chunks]
        spans.append((at, at + rows.numel(), at + rows.numel() + chunks.numel()))
        at = spans[-1][-1]
    table = torch.cat(parts)
    if device.type == "cuda":
        # Pinned and non-blocking: the copy is queued on the stream ahead of
        # the kernels that read it, and the host does not wait for the GPU.
        table = table.pin_memory().to(device, non_blocking=True)
    else:
        table = table.to(device)
    hyper_view = table[: max(1, len(hyper))].view(torch.float64)
    return hyper_view, [(table[a:b], table[b:e]) for a, b, e in spans]


def _sum_of_squares(groups: List[_Group], device: torch.device) -> Tensor:
    """sum of (s*g)^2 over finished groups of ``_sq_norm_partials_kernel`` rows, float64 0-d.

    A group's dtypes are (grad, weight or None): s = |w| where a weight is
    given, else 1. Partials go group after group, chunk after chunk, and are
    added by one program: the bits depend only on the inputs.
    """
    n_partials = sum(group.n_chunks for group in groups)
    if n_partials == 0:
        return torch.zeros((), dtype=torch.float64, device=device)
    _, spans = _upload(groups, (), device)
    partials = torch.empty(n_partials, dtype=torch.float64, device=device)
    base = 0
    for group, (rows, chunks) in zip(groups, spans):
        g_dtype, w_dtype = group.dtypes
        wide = tl.float64 in (g_dtype, w_dtype)
        _sq_norm_partials_kernel[(group.n_chunks,)](
            rows, chunks, partials[base:],
            G_DTYPE=g_dtype,
            W_DTYPE=w_dtype if w_dtype is not None else g_dtype,
            M_DTYPE=group.mask_or_placeholder,
            HAS_MASKS=group.has_masks,
            ADAPTIVE=w_dtype is not None,
            ACC_DTYPE=tl.float64 if wide else tl.float32,
            ALIGN=group.align,
            CHUNK=_CHUNK,
            BLOCK=_BLOCK,
            num_warps=_NUM_WARPS,
        )
        base += group.n_chunks
    out = torch.empty((), dtype=torch.float64, device=device)
    _sum_partials_kernel[(1,)](partials, out, n_partials, BLOCK=_SUM_BLOCK, num_warps=_NUM_WARPS)
    return out
