"""Dense or sparse execution of fixed-mask layers, chosen per layer: set_execution().

A fixed-mask layer can run dense (``MaskedLinear`` / ``MaskedConv2d``: the
full weight and a mask, cuBLAS/oneDNN speed whatever the sparsity) or sparse
(``SparseLinear`` / ``SparseConv2d``: only the kept weights, time in
proportion to nnz). Which is faster depends on the shape, the batch, the
sparsity, the dtype and the machine, so ``execution="auto"`` measures it:

* The first forward of an "auto" layer looks its situation up in a
  process-wide :class:`DispatchCache`, keyed by (layer kind and shape, input
  spatial size, batch-size bucket, density bucket, dtype, device, thread
  count, forward-only or forward+backward). On a miss it times both forms
  (fresh copies of the layer, on the real input: forward+backward when grad
  is enabled, forward only otherwise, interleaved, minimum of a few runs)
  and records the faster. The layer then converts itself, in place, to the
  winner and keeps it (a later batch size does not flip it back and forth;
  set ``layer.execution = "auto"`` again to re-decide).
* ``SPARSESAM_DISPATCH_CACHE=/path.json`` persists the decisions (loaded
  when the cache is first used, rewritten atomically after each new one),
  so a second process does not time again.
* ``layer.execution = "dense"`` / ``"sparse"`` overrides one layer; it
  converts at its next forward.
* Layers whose mask can still change (``mask_mode="trainable"``, soft or
  score masks, any parametrized layer) always run dense; once their mask is
  frozen to a fixed one (e.g. ``freeze_scores``) their next forward follows
  ``execution``. Convolutions :func:`~sparsesam.nn.sparse_conv2d.convertible`
  rejects (groups > 1, non-zero padding modes) stay dense too.

Converting replaces the weight parameter (``weight`` + ``weight_mask`` <->
``values`` + the CSR index; the bias Parameter object is kept), so build the
optimizer after the forms are settled: ``set_execution(model, "sparse")``
converts at once; for "auto" call :func:`resolve_execution` with an example
batch first. Both conversions are exact (weights, mask, bias and outputs).
``set_execution(model, "dense")`` gives back plain MaskedLinear/MaskedConv2d
layers, exactly what ``sparsify()`` makes.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from .masked import MaskedConv2d, MaskedLinear
from .sparse_conv2d import SparseConv2d, convertible
from .sparse_linear import SparseLinear

EXECUTIONS = ("auto", "dense", "sparse")
CACHE_ENV = "SPARSESAM_DISPATCH_CACHE"

# (dense_module, sparse_module, x, backward) -> (dense_seconds, sparse_seconds)
Timer = Callable[[nn.Module, nn.Module, torch.Tensor, bool], Tuple[float, float]]


def _check_execution(execution) -> str:
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    return execution


# --- Timing ------------------------------------------------------------------------


def time_forms(dense: nn.Module, sparse: nn.Module, x: torch.Tensor, backward: bool, repeats: int = 3) -> Tuple[float, float]:
    """Seconds per call of each module on ``x`` (forward, plus backward if asked): the minimum
    of ``repeats`` runs after one warm-up, the two modules alternating so that noise on a
    shared machine hits both alike."""
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

    run(dense), run(sparse)  # warm-up: allocations, lazy init
    best = [math.inf, math.inf]
    for _ in range(repeats):
        best[0] = min(best[0], run(dense))
        best[1] = min(best[1], run(sparse))
    return best[0], best[1]


# --- The cache -----------------------------------------------------------------------


class DispatchCache:
    """Decisions "dense"/"sparse" by situation key, with the timings behind them.

    ``timer`` measures both forms (default :func:`time_forms`; tests inject
    one). ``path``: a JSON file to load from and save to (None: memory only).
    """

    VERSION = 1

    def __init__(self, path: Optional[str] = None, timer: Optional[Timer] = None) -> None:
        self.path = path
        self.timer: Timer = timer if timer is not None else time_forms
        self.entries: Dict[str, dict] = {}
        self.timings_run = 0  # how many times both forms were timed (a miss)
        self._lock = threading.Lock()
        if path is not None and os.path.exists(path):
            self.load(path)

    def lookup(self, key: str) -> Optional[str]:
        entry = self.entries.get(key)
        return None if entry is None else entry["choice"]

    def record(self, key: str, dense_s: float, sparse_s: float) -> str:
        """Store the faster form for ``key`` (dense on a tie: nothing to gain) and return it."""
        choice = "sparse" if sparse_s < dense_s else "dense"
        with self._lock:
            self.entries[key] = {"choice": choice, "dense_s": float(dense_s), "sparse_s": float(sparse_s)}
            if self.path is not None:
                self.save(self.path)
        return choice

    def decide(self, key: str, dense: Callable[[], nn.Module], sparse: Callable[[], nn.Module], x: torch.Tensor,
               backward: bool) -> str:
        """The cached choice for ``key``, or time both forms (built on demand) and record it."""
        choice = self.lookup(key)
        if choice is None:
            self.timings_run += 1
            dense_s, sparse_s = self.timer(dense(), sparse(), x, backward)
            choice = self.record(key, dense_s, sparse_s)
        return choice

    def clear(self) -> None:
        self.entries.clear()

    def load(self, path: str) -> None:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("version") != self.VERSION or not isinstance(data.get("entries"), dict):
            raise ValueError(f"{path} is not a sparsesam dispatch cache (version {self.VERSION})")
        for key, entry in data["entries"].items():
            if not isinstance(entry, dict) or entry.get("choice") not in ("dense", "sparse"):
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


def dispatch_key(layer: nn.Module, x: torch.Tensor, backward: bool) -> str:
    """The situation a crossover decision holds for (see the module docstring)."""
    if isinstance(layer, (MaskedLinear, SparseLinear)):
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
    ])


# --- The layers ------------------------------------------------------------------------

_SPARSE_OF = {MaskedLinear: SparseLinear, MaskedConv2d: SparseConv2d}
_MASKED_OF = {sparse: masked for masked, sparse in _SPARSE_OF.items()}


def _base(layer: nn.Module) -> type:
    """The plain form class of ``layer`` (MaskedLinear, SparseLinear, ...)."""
    for cls in type(layer).__mro__:
        if cls in _SPARSE_OF or cls in _MASKED_OF:
            return cls
    raise TypeError(f"{type(layer).__name__} has no dense and sparse form")


def _is_sparse(layer: nn.Module) -> bool:
    return _base(layer) in _MASKED_OF


def _can_run_sparse(layer: nn.Module) -> bool:
    if _is_sparse(layer):
        return True
    if parametrize.is_parametrized(layer) or layer.mask_mode != "fixed":
        return False  # the mask may still change
    return isinstance(layer, MaskedLinear) or convertible(layer) is None


def _sparse_copy(layer: nn.Module) -> nn.Module:
    """A plain sparse-form copy of ``layer`` (shares nothing)."""
    masked = layer.to_masked() if _is_sparse(layer) else layer
    return _SPARSE_OF[_base(masked)].from_masked(masked)


def _masked_copy(layer: nn.Module) -> nn.Module:
    """A plain dense-form (masked) copy of ``layer`` (shares nothing)."""
    if _is_sparse(layer):
        return layer.to_masked()
    return _SPARSE_OF[_base(layer)].from_masked(layer).to_masked()


class _Dispatched:
    """Mixin of the dispatcher's layer classes: ``forward`` first converts the layer to the
    form its ``execution`` asks for (see the module docstring)."""

    _FORM: str  # "dense" or "sparse": the form this class computes in

    @property
    def execution(self) -> str:
        return self.__dict__["_execution"]

    @execution.setter
    def execution(self, value: str) -> None:
        self.__dict__["_execution"] = _check_execution(value)
        self.__dict__["_auto_choice"] = None  # "auto" decides again

    def wanted_form(self, x: Optional[torch.Tensor] = None) -> str:
        """The form this layer runs in for input ``x`` (times both on an "auto" cache miss)."""
        if not _can_run_sparse(self):
            return "dense"
        if self.execution != "auto":
            return self.execution
        choice = self.__dict__.get("_auto_choice")
        if choice is None:
            if x is None:
                return self._FORM
            backward = torch.is_grad_enabled()
            choice = dispatch_cache().decide(dispatch_key(self, x, backward), lambda: _masked_copy(self),
                                             lambda: _sparse_copy(self), x, backward)
            self.__dict__["_auto_choice"] = choice
        return choice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        form = self.wanted_form(x)
        if form != self._FORM:
            _convert(self, form, dispatched=True)
        return _base(self).forward(self, x)


class DispatchedMaskedLinear(_Dispatched, MaskedLinear):
    _FORM = "dense"


class DispatchedSparseLinear(_Dispatched, SparseLinear):
    _FORM = "sparse"


class DispatchedMaskedConv2d(_Dispatched, MaskedConv2d):
    _FORM = "dense"


class DispatchedSparseConv2d(_Dispatched, SparseConv2d):
    _FORM = "sparse"


_DISPATCHED = {
    (MaskedLinear, "dense"): DispatchedMaskedLinear, (MaskedLinear, "sparse"): DispatchedSparseLinear,
    (MaskedConv2d, "dense"): DispatchedMaskedConv2d, (MaskedConv2d, "sparse"): DispatchedSparseConv2d,
}


def _convert(layer: nn.Module, form: str, dispatched: bool) -> None:
    """Turn ``layer`` in place into ``form`` (its identity, hooks, training flag, bias
    Parameter and execution setting stay); ``dispatched=False`` leaves a plain class."""
    base = _base(layer)
    masked_base = base if base in _SPARSE_OF else _MASKED_OF[base]
    if (form == "sparse") != _is_sparse(layer):
        new = _SPARSE_OF[masked_base].from_masked(layer) if form == "sparse" else layer.to_masked()
        main_old = layer.values if _is_sparse(layer) else layer.weight
        main_new = new.values if form == "sparse" else new.weight
        main_new.requires_grad_(main_old.requires_grad)
        if layer.bias is not None:
            new.bias = layer.bias  # same values (copied exactly); keep the Parameter object
        kept = {k: v for k, v in layer.__dict__.items() if "hook" in k}
        kept["training"] = layer.training
        for name in ("_execution", "_auto_choice"):
            if name in layer.__dict__:
                kept[name] = layer.__dict__[name]
        layer.__dict__.clear()
        layer.__dict__.update(new.__dict__)
        layer.__dict__.update(kept)
    if form == "sparse" and not dispatched:
        raise ValueError("a sparse layer is always dispatched")
    layer.__class__ = _DISPATCHED[(masked_base, form)] if dispatched else masked_base


def _eligible(module: nn.Module) -> bool:
    return isinstance(module, (MaskedLinear, MaskedConv2d, SparseLinear, SparseConv2d)) and not (
        parametrize.is_parametrized(module))


def set_execution(model: nn.Module, execution: str, layers: Optional[Iterable[nn.Module]] = None) -> nn.Module:
    """Set how ``model``'s masked/sparse layers run, converting them in place; returns ``model``.

    * "dense": plain MaskedLinear/MaskedConv2d (what sparsify() makes);
    * "sparse": every layer with a fixed, convertible mask becomes
      SparseLinear/SparseConv2d now; the others run dense until their mask is fixed;
    * "auto": each layer picks the faster form at its first forward (see the module docstring).

    ``layers``: only these modules of ``model`` (default: all). Layers with a
    parametrization (score masks) are left alone: call again after freezing them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_execution(execution)
    chosen = None if layers is None else {id(m) for m in layers}
    for module in list(model.modules()):
        if not _eligible(module) or (chosen is not None and id(module) not in chosen):
            continue
        if execution == "dense":
            _convert(module, "dense", dispatched=False)
            module.__dict__.pop("_execution", None)
            module.__dict__.pop("_auto_choice", None)
            continue
        form = "sparse" if execution == "sparse" and _can_run_sparse(module) else (
            "sparse" if _is_sparse(module) and execution == "auto" else "dense")
        _convert(module, form, dispatched=True)
        module.execution = execution
    return model


def resolve_execution(model: nn.Module, *args, **kwargs):
    """Run ``model(*args, **kwargs)`` once so that every "auto" layer settles its form;
    returns the output. Timing is forward+backward when ``model.training`` (build the
    optimizer afterwards), forward only in eval mode."""
    with torch.set_grad_enabled(model.training):
        return model(*args, **kwargs)


def execution_summary(model: nn.Module) -> Dict[str, str]:
    """``{name: "dense"|"sparse"}``: the form each masked/sparse layer computes in now."""
    return {name: ("sparse" if _is_sparse(m) else "dense") for name, m in model.named_modules()
            if isinstance(m, (MaskedLinear, MaskedConv2d, SparseLinear, SparseConv2d))}
