"""The fused SAM step in Triton: sam_grad_sq_norm, sam_perturb_ and sgd_step_.

All three are multi-tensor ops (one call covers every parameter) and launch
apex-style: the host writes one int64 table holding

* a row per tensor: its data pointers (``data_ptr()``), its length and, for
  ``sam_perturb_``, the run length of one output channel;
* a row per chunk of ``_CHUNK`` elements: (tensor row, first element);
* the float hyper-parameters (lr, momentum, ..., eps) as float64 bit
  patterns, so float64 parameters see them without a float32 detour;

copies it to the device in one transfer (pinned, non-blocking) and launches
one program per chunk. A program loads its row, turns the stored integers
back into typed pointers (``int64 -> pointer``, which the interpreter also
supports for CPU tensors) and walks its chunk in blocks of ``_BLOCK``.

Element types are compile-time constants, so tensors are grouped by their
dtypes and mask kind, one launch per group. A dense parameter (mask None)
joins a masked group of the same dtypes with a null mask pointer, which the
kernel never dereferences, so the usual model -- masked weights, dense biases
and norms, one dtype -- is a single launch per op.

Semantics are those of ``sparsesam.reference``: a mask entry that is zero
(False) marks a pruned weight, which does not count in the norm, whose
output entry is the parameter itself, and whose parameter and momentum-buffer
entries keep their bits. (Full blocks store those bits back unchanged, so
that their stores need no lane mask and can be vectorised; the tail block,
and a momentum buffer's first step, skip pruned entries with a masked store.)

* ``sam_grad_sq_norm`` is deterministic without atomics: each chunk is summed
  in float32 (float64 for float64 inputs) into one partial stored at the
  chunk's fixed index, and a second, single-program kernel adds the partials
  in float64 in a fixed order.
* ``sam_perturb_`` computes in float64 like the reference and rounds the way
  torch's ``.to(dtype)`` does (16-bit floats via float32), so it matches the
  reference bit for bit; it reads ``sq_norm`` on the device (no host sync).
* ``sgd_step_`` rounds to the parameter dtype after every operation, exactly
  like the reference's sequence of tensor ops, so it matches it bit for bit.

Both writing kernels are compiled with ``enable_fp_fusion=False``: a fused
multiply-add would round once where the reference rounds twice.
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


@triton.jit
def _sam_perturb_block(out_ptr, w_ptr, g_ptr, m_ptr, has_mask, rho_ptr, run, rho_scale, scale, lo, end,
                       ADAPTIVE: tl.constexpr, HAS_MASKS: tl.constexpr, PER_CHANNEL: tl.constexpr,
                       TAIL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.multiple_of(lo, BLOCK) + tl.arange(0, BLOCK)
    inb = offs < end if TAIL else None
    zero = 0.0 if TAIL else None
    OUT_DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    w_raw = tl.load(w_ptr + offs, mask=inb, other=zero)
    w = w_raw.to(tl.float64)
    g = tl.load(g_ptr + offs, mask=inb, other=zero).to(tl.float64)
    if PER_CHANNEL:
        e = tl.load(rho_ptr + offs // run, mask=inb, other=zero).to(tl.float64) * scale
    else:
        e = rho_scale
    # The reference's order: ((rho * scale) * g) * w^2, then w + e.
    e = e * g
    if ADAPTIVE:
        e = e * (w * w)
    new = w + e
    # float64 -> out dtype as torch's .to() does it: a 16-bit float via
    # float32 (c10::Half and c10::BFloat16 are built from a float; going
    # direct differs where the first rounding lands on a tie).
    if OUT_DTYPE.primitive_bitwidth < 32:
        new = new.to(tl.float32)
    new = new.to(OUT_DTYPE)
    if HAS_MASKS:
        m = tl.load(m_ptr + offs, mask=inb & has_mask if TAIL else has_mask, other=1)
        # A pruned entry is the parameter itself, copied bit for bit.
        new = tl.where(m != 0, new, w_raw.to(OUT_DTYPE))
    tl.store(out_ptr + offs, new, mask=inb)


@triton.jit
def _sam_perturb_kernel(
    table_ptr,
    chunk_ptr,
    hyper_ptr,
    sq_norm_ptr,
    OUT_DTYPE: tl.constexpr,
    W_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    RHO_DTYPE: tl.constexpr,
    HAS_MASKS: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    ALIGN: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Row: out, param, grad, mask (0 if dense), rho, numel, channel run length.
    row, start, full_end, end = _chunk(table_ptr, chunk_ptr, 7, 5, CHUNK, BLOCK)
    out_ptr = tl.multiple_of(tl.load(row).to(tl.pointer_type(OUT_DTYPE)), ALIGN)
    w_ptr = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(W_DTYPE)), ALIGN)
    g_ptr = tl.multiple_of(tl.load(row + 2).to(tl.pointer_type(G_DTYPE)), ALIGN)
    m_ptr = tl.multiple_of(tl.load(row + 3).to(tl.pointer_type(M_DTYPE)), ALIGN)
    has_mask = tl.load(row + 3) != 0
    rho_ptr = tl.load(row + 4).to(tl.pointer_type(RHO_DTYPE))
    # A 0-d rho in a group with per-channel ones has run length numel: every
    # element reads rho[0].
    run = tl.load(row + 6)
    # The reference's float64 scale 1 / (sqrt(sq_norm) + eps): sqrt and
    # division are correctly rounded in float64, so the bits agree. Read on
    # the device, so the host never waits for the norm.
    scale = 1.0 / (tl.sqrt(tl.load(sq_norm_ptr).to(tl.float64)) + tl.load(hyper_ptr))
    rho_scale = scale
    if not PER_CHANNEL:
        rho_scale = tl.load(rho_ptr).to(tl.float64) * scale
    for lo in range(start, full_end, BLOCK):
        _sam_perturb_block(out_ptr, w_ptr, g_ptr, m_ptr, has_mask, rho_ptr, run, rho_scale, scale, lo, end,
                           ADAPTIVE, HAS_MASKS, PER_CHANNEL, False, BLOCK)
    if full_end < end:
        _sam_perturb_block(out_ptr, w_ptr, g_ptr, m_ptr, has_mask, rho_ptr, run, rho_scale, scale, full_end, end,
                           ADAPTIVE, HAS_MASKS, PER_CHANNEL, True, BLOCK)


@triton.jit
def _sgd_block(w_ptr, g_ptr, buf_ptr, m_ptr, has_mask, lr, momentum, one_minus_dampening, weight_decay, lo, end,
               HAS_MASKS: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
               NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, FIRST_STEP: tl.constexpr, TAIL: tl.constexpr,
               BLOCK: tl.constexpr):
    # Every result is rounded to the parameter dtype W and widened back to
    # the compute dtype C (lr's): exactly one tensor op of the reference each.
    offs = tl.multiple_of(lo, BLOCK) + tl.arange(0, BLOCK)
    inb = offs < end if TAIL else None
    zero = 0.0 if TAIL else None
    W: tl.constexpr = w_ptr.dtype.element_ty
    C: tl.constexpr = lr.dtype
    w_raw = tl.load(w_ptr + offs, mask=inb, other=zero)
    w = w_raw.to(C)
    d = tl.load(g_ptr + offs, mask=inb, other=zero).to(C)
    if HAS_MASKS:
        keep = tl.load(m_ptr + offs, mask=inb & has_mask if TAIL else has_mask, other=1) != 0
    if MAXIMIZE:
        d = -d
    if HAS_WEIGHT_DECAY:
        d = (d + (weight_decay * w).to(W).to(C)).to(W).to(C)
    if HAS_MOMENTUM:
        if FIRST_STEP:
            # torch starts the buffer as a copy of the (decayed) gradient. A
            # pruned entry may hold anything and is not read, so it is
            # skipped with a predicated store.
            buf = d
            if HAS_MASKS:
                tl.store(buf_ptr + offs, buf.to(W), mask=keep & inb if TAIL else keep)
            else:
                tl.store(buf_ptr + offs, buf.to(W), mask=inb)
        else:
            buf_raw = tl.load(buf_ptr + offs, mask=inb, other=zero)
            buf = ((buf_raw.to(C) * momentum).to(W).to(C) + (one_minus_dampening * d).to(W).to(C)).to(W).to(C)
            new_buf = buf.to(W)
            if HAS_MASKS:
                # A pruned entry gets its own bits back: an unconditional
                # (vectorisable) store that changes nothing there.
                new_buf = tl.where(keep, new_buf, buf_raw)
            tl.store(buf_ptr + offs, new_buf, mask=inb)
        if NESTEROV:
            d = (d + (momentum * buf).to(W).to(C)).to(W).to(C)
        else:
            d = buf
    new = (w - (lr * d).to(W).to(C)).to(W)
    if HAS_MASKS:
        # Pruned entries keep their bits, as above.
        new = tl.where(keep, new, w_raw)
    tl.store(w_ptr + offs, new, mask=inb)


@triton.jit
def _sgd_step_kernel(
    table_ptr,
    chunk_ptr,
    hyper_ptr,
    W_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    HAS_MASKS: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    ALIGN: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Row: param, grad, momentum buffer (0 without momentum), mask (0 if dense), numel.
    row, start, full_end, end = _chunk(table_ptr, chunk_ptr, 5, 4, CHUNK, BLOCK)
    # Gradient and momentum buffer have the parameter's dtype (the launcher
    # checks): the reference rounds every op to that one dtype.
    w_ptr = tl.multiple_of(tl.load(row).to(tl.pointer_type(W_DTYPE)), ALIGN)
    g_ptr = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(W_DTYPE)), ALIGN)
    buf_ptr = tl.multiple_of(tl.load(row + 2).to(tl.pointer_type(W_DTYPE)), ALIGN)
    m_ptr = tl.multiple_of(tl.load(row + 3).to(tl.pointer_type(M_DTYPE)), ALIGN)
    has_mask = tl.load(row + 3) != 0
    # float64 hyper-parameters converted as torch converts a Python scalar
    # for a tensor op (to float32 for 16/32-bit tensors).
    lr = tl.load(hyper_ptr).to(COMPUTE_DTYPE)
    momentum = tl.load(hyper_ptr + 1).to(COMPUTE_DTYPE)
    one_minus_dampening = tl.load(hyper_ptr + 2).to(COMPUTE_DTYPE)
    weight_decay = tl.load(hyper_ptr + 3).to(COMPUTE_DTYPE)
    for lo in range(start, full_end, BLOCK):
        _sgd_block(w_ptr, g_ptr, buf_ptr, m_ptr, has_mask, lr, momentum, one_minus_dampening, weight_decay, lo, end,
                   HAS_MASKS, HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV, MAXIMIZE, FIRST_STEP, False, BLOCK)
    if full_end < end:
        _sgd_block(w_ptr, g_ptr, buf_ptr, m_ptr, has_mask, lr, momentum, one_minus_dampening, weight_decay,
                   full_end, end, HAS_MASKS, HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV, MAXIMIZE, FIRST_STEP,
                   True, BLOCK)


# ---------------------------------------------------------------------------
# Host side: checks, groups, the table, launches


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


def sam_grad_sq_norm(
    grads: Sequence[Tensor], weights: Sequence[Tensor], masks: Sequence[Optional[Tensor]], adaptive: bool
) -> Tensor:
    """sum over all tensors of (s*g)^2 at kept entries, s = |w| if adaptive else 1; a float64 0-d tensor.

    Deterministic: fixed chunks, one partial each at a fixed index, the
    partials added in float64 in a fixed order. ``weights`` is read only when
    adaptive.
    """
    adaptive = bool(adaptive)
    _check_lengths(grads=grads, masks=masks)
    if adaptive:
        _check_lengths(grads=grads, weights=weights)
    device = grads[0].device if len(grads) else torch.device("cpu")
    groups = _Groups()
    hold = []  # contiguous copies live until their kernels are queued
    for i, g in enumerate(grads):
        g_dtype = _elem(f"grads[{i}]", g, device)
        w_dtype = None
        if adaptive:
            w_dtype = _elem(f"weights[{i}]", weights[i], device)
            _same_shape(f"weights[{i}]", weights[i], f"grads[{i}]", g)
        m_dtype = _mask_elem(f"masks[{i}]", masks[i], f"grads[{i}]", g)
        n = g.numel()
        if n == 0:
            continue
        gc = g.contiguous()
        wc = weights[i].contiguous() if adaptive else None
        mc = masks[i].contiguous() if masks[i] is not None else None
        hold += [gc, wc, mc]
        ptrs = [_ptr(gc), _ptr(wc), _ptr(mc)]  # row layout: _sq_norm_partials_kernel
        groups.add((g_dtype, w_dtype), m_dtype, ptrs + [n], n, ptrs)
    groups = groups.finish()
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
            W_DTYPE=w_dtype if adaptive else g_dtype,
            M_DTYPE=group.mask_or_placeholder,
            HAS_MASKS=group.has_masks,
            ADAPTIVE=adaptive,
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


def sam_perturb_(
    out: Sequence[Tensor],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    masks: Sequence[Optional[Tensor]],
    rhos: Sequence[Tensor],
    sq_norm: Tensor,
    adaptive: bool,
    eps: float,
) -> None:
    """out_i = w_i + rho_i * s^2 * g_i / (sqrt(sq_norm) + eps) at kept entries, w_i elsewhere (s = |w| or 1).

    rho_i is 0-d (or one element) or has one value per output channel (dim
    0). Computed in float64 and rounded to the parameter dtype as torch's
    ``.to`` rounds; sq_norm is read on the device (no host sync).
    """
    adaptive = bool(adaptive)
    if _check_lengths(params=params, out=out, grads=grads, masks=masks, rhos=rhos) == 0:
        return
    device = params[0].device
    _elem("sq_norm", sq_norm, device)
    if sq_norm.numel() != 1:
        raise ValueError(f"sq_norm must have one element, got shape {tuple(sq_norm.shape)}")
    groups = _Groups()
    writebacks: List[Tuple[Tensor, Tensor]] = []
    hold = []
    for i, w in enumerate(params):
        w_dtype = _elem(f"params[{i}]", w, device)
        o_dtype = _elem(f"out[{i}]", out[i], device)
        g_dtype = _elem(f"grads[{i}]", grads[i], device)
        rho_dtype = _elem(f"rhos[{i}]", rhos[i], device)
        _same_shape(f"out[{i}]", out[i], f"params[{i}]", w)
        _same_dtype(f"out[{i}]", out[i], f"params[{i}]", w)
        _same_shape(f"grads[{i}]", grads[i], f"params[{i}]", w)
        m_dtype = _mask_elem(f"masks[{i}]", masks[i], f"params[{i}]", w)
        rho = rhos[i]
        per_channel = rho.numel() != 1
        if per_channel and (w.dim() == 0 or rho.dim() != 1 or rho.numel() != w.shape[0]):
            channels = w.shape[0] if w.dim() else 1
            raise ValueError(
                f"rhos[{i}] must be 0-d or hold one value per output channel ({channels}), got shape {tuple(rho.shape)}"
            )
        n = w.numel()
        if n == 0:
            continue
        oc = _written(out[i], writebacks, overwritten=True)
        wc, gc, rc = w.contiguous(), grads[i].contiguous(), rho.contiguous()
        mc = masks[i].contiguous() if masks[i] is not None else None
        hold += [wc, gc, rc, mc]
        run = n // w.shape[0] if per_channel else n
        ptrs = [_ptr(oc), _ptr(wc), _ptr(gc), _ptr(mc)]  # row layout: _sam_perturb_kernel
        # rho is read as a scalar or gathered: its alignment does not matter.
        groups.add((o_dtype, w_dtype, g_dtype, rho_dtype), m_dtype, ptrs + [_ptr(rc), n, run], n, ptrs, per_channel)
    groups = groups.finish()
    if groups:
        hyper, spans = _upload(groups, (eps,), device)
        sq = sq_norm.contiguous()
        for group, (rows, chunks) in zip(groups, spans):
            o_dtype, w_dtype, g_dtype, rho_dtype = group.dtypes
            _sam_perturb_kernel[(group.n_chunks,)](
                rows, chunks, hyper, sq,
                OUT_DTYPE=o_dtype,
                W_DTYPE=w_dtype,
                G_DTYPE=g_dtype,
                M_DTYPE=group.mask_or_placeholder,
                RHO_DTYPE=rho_dtype,
                HAS_MASKS=group.has_masks,
                PER_CHANNEL=group.per_channel,
                ADAPTIVE=adaptive,
                ALIGN=group.align,
                CHUNK=_CHUNK,
                BLOCK=_BLOCK,
                num_warps=_NUM_WARPS,
                enable_fp_fusion=False,
            )
    for dst, src in writebacks:
        dst.copy_(src)


def sgd_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    masks: Sequence[Optional[Tensor]],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
) -> None:
    """torch.optim.SGD's update in place, one pass per element; pruned entries of w and buf untouched.

    ``momentum_buffers`` is empty when momentum == 0. Grads and buffers must
    have the parameter's dtype (the reference's rounding is defined per op in
    that dtype).
    """
    has_momentum = momentum != 0
    if _check_lengths(params=params, grads=grads, masks=masks) == 0:
        return
    if has_momentum:
        _check_lengths(params=params, momentum_buffers=momentum_buffers)
    device = params[0].device
    groups = _Groups()
    writebacks: List[Tuple[Tensor, Tensor]] = []
    hold = []
    for i, w in enumerate(params):
        w_dtype = _elem(f"params[{i}]", w, device)
        _elem(f"grads[{i}]", grads[i], device)
        _same_shape(f"grads[{i}]", grads[i], f"params[{i}]", w)
        _same_dtype(f"grads[{i}]", grads[i], f"params[{i}]", w)
        buf = momentum_buffers[i] if has_momentum else None
        if has_momentum:
            _elem(f"momentum_buffers[{i}]", buf, device)
            _same_shape(f"momentum_buffers[{i}]", buf, f"params[{i}]", w)
            _same_dtype(f"momentum_buffers[{i}]", buf, f"params[{i}]", w)
        m_dtype = _mask_elem(f"masks[{i}]", masks[i], f"params[{i}]", w)
        n = w.numel()
        if n == 0:
            continue
        wc = _written(w, writebacks)
        bc = _written(buf, writebacks) if has_momentum else None
        gc = grads[i].contiguous()
        mc = masks[i].contiguous() if masks[i] is not None else None
        hold += [gc, mc]
        ptrs = [_ptr(wc), _ptr(gc), _ptr(bc), _ptr(mc)]  # row layout: _sgd_step_kernel
        groups.add((w_dtype,), m_dtype, ptrs + [n], n, ptrs)
    groups = groups.finish()
    if groups:
        # (1 - dampening) in Python double, like the reference's scalar.
        hyper, spans = _upload(groups, (lr, momentum, 1 - dampening, weight_decay), device)
        for group, (rows, chunks) in zip(groups, spans):
            (w_dtype,) = group.dtypes
            _sgd_step_kernel[(group.n_chunks,)](
                rows, chunks, hyper,
                W_DTYPE=w_dtype,
                M_DTYPE=group.mask_or_placeholder,
                COMPUTE_DTYPE=tl.float64 if w_dtype == tl.float64 else tl.float32,
                HAS_MASKS=group.has_masks,
                HAS_WEIGHT_DECAY=weight_decay != 0,
                HAS_MOMENTUM=has_momentum,
                NESTEROV=bool(nesterov),
                MAXIMIZE=bool(maximize),
                FIRST_STEP=bool(first_step),
                ALIGN=group.align,
                CHUNK=_CHUNK,
                BLOCK=_BLOCK,
                num_warps=_NUM_WARPS,
                enable_fp_fusion=False,
            )
    for dst, src in writebacks:
        dst.copy_(src)
