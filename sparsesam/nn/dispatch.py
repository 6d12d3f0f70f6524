"""The forms a fixed-mask layer can run in, and how "auto" decides between them.

A fixed-mask layer can run dense (``MaskedLinear`` / ``MaskedConv2d``: the
full weight and a mask, cuBLAS/oneDNN speed whatever the sparsity) or in a
sparse format (:data:`SPARSE_FORMATS`: CSR for any mask, ``CSRLinear`` /
``SparseConv2d``, plus structured formats for masks that have their
structure: only the kept weights, time in proportion to nnz). Which is
fastest depends on the shape, the batch, the sparsity, the mask's structure,
the dtype and the machine, so ``execution="auto"``
(:func:`sparsesam.nn.set_execution`) measures it, here:

* A layer's situation is looked up in a process-wide :class:`DispatchCache`,
  keyed by :func:`dispatch_key` (layer kind and shape, input spatial size,
  batch-size bucket, density bucket, dtype, device, thread count,
  forward-only or forward+backward, candidate forms). On a miss every
  candidate (dense and each format that accepts the mask: fresh copies of
  the layer, on the layer's input from an example batch) is timed by
  :func:`time_forms` (forward+backward for a model in training mode, forward
  only otherwise, taking turns, minimum of a few runs) and the fastest is
  recorded.
* ``SPARSESAM_DISPATCH_CACHE=/path.json`` persists the decisions (loaded
  when the cache is first used, rewritten atomically after each new one),
  so a second process does not time again.

Layers whose mask can still change (``mask_mode="trainable"``, soft or score
masks, any parametrized layer) have no sparse form (:func:`sparse_forms` is
empty), nor do convolutions :func:`~sparsesam.nn.sparse_conv2d.convertible`
rejects (groups > 1, non-zero padding modes). Converting a layer between its
forms is :func:`converted`: a new module, exact (weights, mask, bias, outputs).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from .bsr_linear import BlockSparseLinear
from .masked import MaskedConv2d, MaskedLinear
from .nm_linear import NMSparseLinear
from .sparse_conv2d import SparseConv2d, convertible
from .csr_linear import CSRLinear

# ({form: module}, x, backward) -> {form: seconds}
Timer = Callable[[Mapping[str, nn.Module], torch.Tensor, bool], Dict[str, float]]

EXECUTIONS = ("auto", "dense", "sparse")
CACHE_ENV = "SPARSESAM_DISPATCH_CACHE"


@dataclass(frozen=True)
class SparseFormat:
    """One sparse form a fixed-mask layer can run in.

    ``masked``: the dense form class it converts from (MaskedLinear or
    MaskedConv2d); ``layer``: its layer class (``from_masked(masked_layer)``,
    ``to_masked()``); ``refuses(masked_layer)``: None if the layer's fixed
    mask can run in this format, else the reason it cannot.
    """

    name: str
    masked: type
    layer: type
    refuses: Callable[[nn.Module], Optional[str]]


def _csr_linear_refuses(layer: nn.Module) -> Optional[str]:
    return None  # CSR holds any mask


def _bsr_refuses(layer: nn.Module) -> Optional[str]:
    # Only the block sizes measured faster than CSR (sparsesam.sparse.bsr.BLOCK_SIZES).
    return BlockSparseLinear.applicable(layer.weight_mask)


def _nm_refuses(layer: nn.Module) -> Optional[str]:
    return NMSparseLinear.applicable(layer.weight_mask)


# In order of preference: "sparse" runs a layer in the first format that
# accepts its mask ("auto" times them all). The structured formats come first:
# where a mask has their structure they are the faster kernels (bench/RESULTS.md).
# A name ("csr") may serve several layer kinds (linear and conv).
SPARSE_FORMATS: List[SparseFormat] = []


def register_sparse_format(fmt: SparseFormat, first: bool = False) -> None:
    """Add ``fmt`` (after those registered before it, or before all if ``first``)."""
    if not isinstance(fmt, SparseFormat):
        raise TypeError(f"fmt must be a SparseFormat, got {type(fmt).__name__}")
    if fmt.name in EXECUTIONS or any(f.name == fmt.name and f.masked is fmt.masked for f in SPARSE_FORMATS):
        raise ValueError(f"a sparse format named {fmt.name!r} for {fmt.masked.__name__} exists already")
    SPARSE_FORMATS.insert(0 if first else len(SPARSE_FORMATS), fmt)


def _find_format(name: str, masked: type) -> SparseFormat:
    return next(f for f in SPARSE_FORMATS if f.name == name and f.masked is masked)


def executions() -> Tuple[str, ...]:
    """What ``execution`` accepts: "auto", "dense", "sparse", or a sparse format's name."""
    return EXECUTIONS + tuple(dict.fromkeys(f.name for f in SPARSE_FORMATS))


# --- Timing ------------------------------------------------------------------------


def time_forms(forms: Mapping[str, nn.Module], x: torch.Tensor, backward: bool, repeats: int = 3) -> Dict[str, float]:
    """Seconds per call of each module on ``x`` (forward, plus backward if asked): the minimum
    of ``repeats`` runs after one warm-up, the modules taking turns so that noise on a
    shared machine hits all alike."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def run(module: nn.Module) -> float:
        inp = x.detach().requires_grad_(backward and x.requires_grad)
        sync()
        start = time.perf_counter()
        with torch.set_grad_enabled(backward):
            y = module(inp)
            if backward:
                y.backward(torch.ones_like(y))
        sync()
        elapsed = time.perf_counter() - start
        for p in module.parameters():
            p.grad = None
        return elapsed

    for module in forms.values():  # warm-up: allocations, lazy init
        run(module)
    best = {name: math.inf for name in forms}
    for _ in range(repeats):
        for name, module in forms.items():
            best[name] = min(best[name], run(module))
    return best


# --- The cache -----------------------------------------------------------------------


class DispatchCache:
    """Decisions (the form: "dense" or a sparse format's name) by situation key, with the
    timings behind them.

    ``timer`` measures the candidate forms (default :func:`time_forms`; tests
    inject one). ``path``: a JSON file to load from and save to (None: memory only).
    """

    VERSION = 2

    def __init__(self, path: Optional[str] = None, timer: Optional[Timer] = None) -> None:
        self.path = path
        self.timer: Timer = timer if timer is not None else time_forms
        self.entries: Dict[str, dict] = {}
        self.timings_run = 0  # how many times the forms were timed (a miss)
        self._lock = threading.Lock()
        if path is not None and os.path.exists(path):
            self.load(path)

    def lookup(self, key: str) -> Optional[str]:
        entry = self.entries.get(key)
        return None if entry is None else entry["choice"]

    def record(self, key: str, seconds: Mapping[str, float]) -> str:
        """Store the fastest form for ``key`` and return it; a tie goes to the form listed
        first (the callers list "dense" first: nothing to gain from converting)."""
        choice = min(seconds, key=lambda form: seconds[form])
        with self._lock:
            self.entries[key] = {"choice": choice, "seconds": {k: float(v) for k, v in seconds.items()}}
            if self.path is not None:
                self.save(self.path)
        return choice

    def decide(self, key: str, builders: Mapping[str, Callable[[], nn.Module]], x: torch.Tensor,
               backward: bool) -> str:
        """The cached choice for ``key``, or time every form (each built on demand) and record the fastest."""
        choice = self.lookup(key)
        if choice is None or choice not in builders:
            self.timings_run += 1
            seconds = self.timer({form: build() for form, build in builders.items()}, x, backward)
            if list(seconds) != list(builders):
                raise RuntimeError(f"the dispatch timer returned times of {list(seconds)} for the forms {list(builders)}")
            choice = self.record(key, seconds)
        return choice

    def clear(self) -> None:
        self.entries.clear()

    def load(self, path: str) -> None:
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict) and isinstance(data.get("version"), int) and data["version"] < self.VERSION:
            # An older sparsesam's decisions (other forms then): time again, and overwrite it on the next save.
            warnings.warn(f"{path} was written by an older sparsesam (dispatch cache version {data['version']}); "
                          "its decisions are ignored and will be measured again")
            return
        if not isinstance(data, dict) or data.get("version") != self.VERSION or not isinstance(data.get("entries"), dict):
            raise ValueError(f"{path} is not a sparsesam dispatch cache (version {self.VERSION})")
        for key, entry in data["entries"].items():
            if not isinstance(entry, dict) or not isinstance(entry.get("choice"), str) or not (
                    entry["choice"] == "dense" or entry["choice"] in entry.get("seconds", {})):
                raise ValueError(f"{path}: entry {key!r} has no valid choice")
        self.entries.update(data["entries"])

    def save(self, path: str) -> None:
        """Write atomically (temp file + os.replace): a crash never leaves half a file."""
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".dispatch-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": self.VERSION, "entries": self.entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


_cache: Optional[DispatchCache] = None


def dispatch_cache() -> DispatchCache:
    """The process-wide cache (created on first use, persisted to $SPARSESAM_DISPATCH_CACHE if set)."""
    global _cache
    if _cache is None:
        _cache = DispatchCache(os.environ.get(CACHE_ENV) or None)
    return _cache


def set_dispatch_cache(cache: Optional[DispatchCache]) -> Optional[DispatchCache]:
    """Install ``cache`` as the process-wide one (None: a fresh one on next use); returns the old one."""
    global _cache
    if cache is not None and not isinstance(cache, DispatchCache):
        raise TypeError(f"cache must be a DispatchCache, got {type(cache).__name__}")
    old, _cache = _cache, cache
    return old


def _bucket_pow2(n: int) -> int:
    """The power of two at or above n (batch sizes 65..128 share a decision)."""
    return 1 << max(0, int(n) - 1).bit_length()


def dispatch_key(layer: nn.Module, x: torch.Tensor, backward: bool, forms: Iterable[str] = ("dense",)) -> str:
    """The situation a crossover decision holds for (see the module docstring); ``forms``:
    the candidates (a mask with block or N:M structure has more of them)."""
    if isinstance(layer, nn.Linear) or hasattr(layer, "in_features"):
        out_f, in_f = layer.out_features, layer.in_features
        rows = x.numel() // max(in_f, 1)
        shape = f"linear:{out_f}x{in_f}"
    else:
        kh, kw = layer.kernel_size
        rows = x.shape[0] if x.dim() == 4 else 1
        shape = (f"conv2d:{layer.out_channels}x{layer.in_channels}x{kh}x{kw}:in{x.shape[-2]}x{x.shape[-1]}"
                 f":s{layer.stride[0]}x{layer.stride[1]}:p{layer.padding[0]}x{layer.padding[1]}"
                 f":d{layer.dilation[0]}x{layer.dilation[1]}")
    density = 1.0 - layer.sparsity
    return "|".join([
        shape, f"batch<={_bucket_pow2(rows)}", f"density~{density:.2g}", str(x.dtype).replace("torch.", ""),
        x.device.type, f"threads={torch.get_num_threads()}", "fwd+bwd" if backward else "fwd",
        "forms=" + ",".join(forms),
    ])


# --- Forms of a layer ---------------------------------------------------------------------

_MASKED = (MaskedLinear, MaskedConv2d)

# Linear: block-sparse, then N:M, then CSR (each measured at least as fast as CSR on the masks it accepts).
register_sparse_format(SparseFormat("bsr", MaskedLinear, BlockSparseLinear, _bsr_refuses))
register_sparse_format(SparseFormat("nm", MaskedLinear, NMSparseLinear, _nm_refuses))
register_sparse_format(SparseFormat("csr", MaskedLinear, CSRLinear, _csr_linear_refuses))
register_sparse_format(SparseFormat("csr", MaskedConv2d, SparseConv2d, convertible))


def _format_of(layer: nn.Module) -> Optional[SparseFormat]:
    for cls in type(layer).__mro__:
        for fmt in SPARSE_FORMATS:
            if cls is fmt.layer:
                return fmt
    return None


def form_of(layer: nn.Module) -> str:
    """"dense" or the sparse format ``layer`` computes in now."""
    fmt = _format_of(layer)
    return "dense" if fmt is None else fmt.name


def has_forms(module: nn.Module) -> bool:
    """Whether ``module`` is a fixed-mask layer in one of its forms (a masked layer, or a sparse
    format's layer); a parametrized one (a score-driven mask) is not."""
    if parametrize.is_parametrized(module):
        return False
    return isinstance(module, _MASKED) or _format_of(module) is not None


def _masked_base(layer: nn.Module) -> type:
    """MaskedLinear or MaskedConv2d: the dense form of ``layer``, whatever form it is in."""
    fmt = _format_of(layer)
    if fmt is not None:
        return fmt.masked
    for cls in _MASKED:
        if isinstance(layer, cls):
            return cls
    raise TypeError(f"{type(layer).__name__} has no dense and sparse form")


def _plain_masked_copy(layer: nn.Module) -> nn.Module:
    # Through the CSR form, which holds any mask: an exact copy of the kept weights,
    # mask and bias in a fresh plain layer (no hooks).
    return _find_format("csr", _masked_base(layer)).layer.from_masked(layer).to_masked()


def sparse_forms(layer: nn.Module) -> List[str]:
    """The sparse formats ``layer`` can run in, in order of preference ([] while its mask can still change)."""
    if parametrize.is_parametrized(layer):
        return []
    if form_of(layer) == "dense" and layer.mask_mode != "fixed":
        return []  # the mask may still change
    masked = layer.to_masked() if form_of(layer) != "dense" else layer
    base = _masked_base(layer)
    return [fmt.name for fmt in SPARSE_FORMATS if fmt.masked is base and fmt.refuses(masked) is None]


def copy_in_form(layer: nn.Module, form: str) -> nn.Module:
    """A plain copy of ``layer`` in ``form`` (shares nothing): what "auto" times."""
    masked = layer.to_masked() if form_of(layer) != "dense" else _plain_masked_copy(layer)
    return masked if form == "dense" else _find_format(form, _masked_base(layer)).layer.from_masked(masked)


def _main_parameter(layer: nn.Module) -> nn.Parameter:
    """The weight (dense form) or the kept values (sparse forms): the parameter that is not the bias."""
    return next(p for name, p in layer.named_parameters(recurse=False) if name != "bias")


def converted(layer: nn.Module, form: str) -> nn.Module:
    """``layer`` in ``form`` ("dense" or a sparse format its mask allows): ``layer`` itself if it is
    in that form already, else a new module built by the forms' ``from_masked`` / ``to_masked``
    (exact: kept weights, mask and bias). The new module takes over the old one's hooks (forward,
    pre-forward, backward, state_dict: the same hook dicts, so their handles still remove them),
    its training flag, its bias Parameter object and whether its weight requires grad. It is not
    put anywhere: :func:`sparsesam.nn.set_execution` swaps it in by path."""
    current = form_of(layer)
    if form == current:
        return layer
    if form != "dense" and form not in sparse_forms(layer):
        raise ValueError(f"a {type(layer).__name__} with this mask cannot run in form {form!r} "
                         f"(it can run dense or in {sparse_forms(layer)})")
    masked = layer.to_masked() if current != "dense" else layer
    new = masked if form == "dense" else _find_format(form, _masked_base(layer)).layer.from_masked(masked)
    _main_parameter(new).requires_grad_(_main_parameter(layer).requires_grad)
    if layer.bias is not None:
        new.bias = layer.bias  # same values (copied exactly); keep the Parameter object
    for name, value in vars(layer).items():
        if "hook" in name:  # _forward_hooks, _forward_pre_hooks, _backward_hooks, ..., and their flag dicts
            vars(new)[name] = value
    new.train(layer.training)
    return new
