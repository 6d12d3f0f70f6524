"""Dense or sparse execution of fixed-mask layers, chosen per layer: set_execution().

A fixed-mask layer can run dense (``MaskedLinear`` / ``MaskedConv2d``: the
full weight and a mask, cuBLAS/oneDNN speed whatever the sparsity) or in a
sparse format (:data:`SPARSE_FORMATS`: CSR for any mask, ``SparseLinear`` /
``SparseConv2d``, plus structured formats for masks that have their
structure: only the kept weights, time in proportion to nnz). Which is
fastest depends on the shape, the batch, the sparsity, the mask's structure,
the dtype and the machine, so ``execution="auto"`` measures it:

* The first forward of an "auto" layer looks its situation up in a
  process-wide :class:`DispatchCache`, keyed by (layer kind and shape, input
  spatial size, batch-size bucket, density bucket, dtype, device, thread
  count, forward-only or forward+backward, candidate forms). On a miss it
  times every candidate (dense and each format that accepts the mask; fresh
  copies of the layer, on the real input: forward+backward when grad is
  enabled, forward only otherwise, taking turns, minimum of a few runs) and
  records the fastest. The layer then converts itself, in place, to the
  winner and keeps it (a later batch size does not flip it back and forth;
  set ``layer.execution = "auto"`` again to re-decide).
* ``SPARSESAM_DISPATCH_CACHE=/path.json`` persists the decisions (loaded
  when the cache is first used, rewritten atomically after each new one),
  so a second process does not time again.
* ``layer.execution = "dense"`` / ``"sparse"`` / a format's name overrides
  one layer; it converts at its next forward.
* Layers whose mask can still change (``mask_mode="trainable"``, soft or
  score masks, any parametrized layer) always run dense; once their mask is
  frozen to a fixed one (e.g. ``freeze_scores``) their next forward follows
  ``execution``. Convolutions :func:`~sparsesam.nn.sparse_conv2d.convertible`
  rejects (groups > 1, non-zero padding modes) stay dense too.

Converting replaces the weight parameter (``weight`` + ``weight_mask`` <->
``values`` + the format's index; the bias Parameter object is kept), so build
the optimizer after the forms are settled: ``set_execution(model, "sparse")``
converts at once; for "auto" call :func:`resolve_execution` with an example
batch first. All conversions are exact (weights, mask, bias and outputs).
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
from .sparse_linear import SparseLinear

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


def register_sparse_format(fmt: SparseFormat, dispatched: type, first: bool = False) -> None:
    """Add ``fmt`` (after those registered before it, or before all if ``first``) with
    ``dispatched``, its layer class with the :class:`_Dispatched` mixin (a module-level
    class, so models pickle)."""
    if fmt.name in EXECUTIONS or any(f.name == fmt.name and f.masked is fmt.masked for f in SPARSE_FORMATS):
        raise ValueError(f"a sparse format named {fmt.name!r} for {fmt.masked.__name__} exists already")
    SPARSE_FORMATS.insert(0 if first else len(SPARSE_FORMATS), fmt)
    _DISPATCHED[fmt.layer] = dispatched


def _find_format(name: str, masked: type) -> SparseFormat:
    return next(f for f in SPARSE_FORMATS if f.name == name and f.masked is masked)


def executions() -> Tuple[str, ...]:
    """What ``execution`` accepts: "auto", "dense", "sparse", or a sparse format's name."""
    return EXECUTIONS + tuple(dict.fromkeys(f.name for f in SPARSE_FORMATS))


def _check_execution(execution) -> str:
    if execution not in executions():
        raise ValueError(f"execution must be one of {executions()}, got {execution!r}")
    return execution


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
_DISPATCHED: Dict[type, type] = {}  # computing class (MaskedLinear, SparseLinear, ...) -> its dispatched class


def _format_of(layer: nn.Module) -> Optional[SparseFormat]:
    for cls in type(layer).__mro__:
        for fmt in SPARSE_FORMATS:
            if cls is fmt.layer:
                return fmt
    return None


def _form(layer: nn.Module) -> str:
    """"dense" or the sparse format ``layer`` computes in now."""
    fmt = _format_of(layer)
    return "dense" if fmt is None else fmt.name


def _masked_base(layer: nn.Module) -> type:
    """MaskedLinear or MaskedConv2d: the dense form of ``layer``, whatever form it is in."""
    fmt = _format_of(layer)
    if fmt is not None:
        return fmt.masked
    for cls in _MASKED:
        if isinstance(layer, cls):
            return cls
    raise TypeError(f"{type(layer).__name__} has no dense and sparse form")


def _computing_class(layer: nn.Module) -> type:
    fmt = _format_of(layer)
    return _masked_base(layer) if fmt is None else fmt.layer


def _plain_masked_copy(layer: nn.Module) -> nn.Module:
    # Through the CSR form, which holds any mask: an exact copy of the kept weights,
    # mask and bias in a fresh plain layer (no hooks, no dispatch).
    return _find_format("csr", _masked_base(layer)).layer.from_masked(layer).to_masked()


def sparse_forms(layer: nn.Module) -> List[str]:
    """The sparse formats ``layer`` can run in, in order of preference ([] while its mask can still change)."""
    if parametrize.is_parametrized(layer):
        return []
    if _form(layer) == "dense" and layer.mask_mode != "fixed":
        return []  # the mask may still change
    masked = layer.to_masked() if _form(layer) != "dense" else layer
    base = _masked_base(layer)
    return [fmt.name for fmt in SPARSE_FORMATS if fmt.masked is base and fmt.refuses(masked) is None]


def _copy_in(layer: nn.Module, form: str) -> nn.Module:
    """A plain copy of ``layer`` in ``form`` (shares nothing): what "auto" times."""
    masked = layer.to_masked() if _form(layer) != "dense" else _plain_masked_copy(layer)
    return masked if form == "dense" else _find_format(form, _masked_base(layer)).layer.from_masked(masked)


class _Dispatched:
    """Mixin of the dispatcher's layer classes: ``forward`` first converts the layer to the
    form its ``execution`` asks for (see the module docstring)."""

    @property
    def execution(self) -> str:
        return self.__dict__["_execution"]

    @execution.setter
    def execution(self, value: str) -> None:
        self.__dict__["_execution"] = _check_execution(value)
        self.__dict__["_choice"] = None  # decide again

    def wanted_form(self, x: Optional[torch.Tensor] = None) -> str:
        """The form this layer runs in for input ``x`` (times the candidates on an "auto" cache miss)."""
        choice = self.__dict__.get("_choice")
        if choice is not None:
            return choice
        forms = sparse_forms(self)
        if not forms:
            return "dense"  # not remembered: a mask that is frozen later follows ``execution``
        execution = self.execution
        if execution == "dense":
            choice = "dense"
        elif execution == "sparse":
            choice = forms[0]
        elif execution != "auto":  # a format by name, where the mask allows it
            choice = execution if execution in forms else forms[0]
        elif x is None:
            return _form(self)
        else:
            backward = torch.is_grad_enabled()
            candidates = ["dense", *forms]
            builders = {form: (lambda form=form: _copy_in(self, form)) for form in candidates}
            choice = dispatch_cache().decide(dispatch_key(self, x, backward, candidates), builders, x, backward)
        self.__dict__["_choice"] = choice
        return choice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        form = self.wanted_form(x)
        if form != _form(self):
            _convert(self, form, dispatched=True)
        return _computing_class(self).forward(self, x)


class DispatchedMaskedLinear(_Dispatched, MaskedLinear):
    pass


class DispatchedSparseLinear(_Dispatched, SparseLinear):
    pass


class DispatchedBlockSparseLinear(_Dispatched, BlockSparseLinear):
    pass


class DispatchedNMSparseLinear(_Dispatched, NMSparseLinear):
    pass


class DispatchedMaskedConv2d(_Dispatched, MaskedConv2d):
    pass


class DispatchedSparseConv2d(_Dispatched, SparseConv2d):
    pass


_DISPATCHED.update({MaskedLinear: DispatchedMaskedLinear, MaskedConv2d: DispatchedMaskedConv2d})
# Linear: block-sparse, then N:M, then CSR (each measured at least as fast as CSR on the masks it accepts).
register_sparse_format(SparseFormat("bsr", MaskedLinear, BlockSparseLinear, _bsr_refuses), DispatchedBlockSparseLinear)
register_sparse_format(SparseFormat("nm", MaskedLinear, NMSparseLinear, _nm_refuses), DispatchedNMSparseLinear)
register_sparse_format(SparseFormat("csr", MaskedLinear, SparseLinear, _csr_linear_refuses), DispatchedSparseLinear)
register_sparse_format(SparseFormat("csr", MaskedConv2d, SparseConv2d, convertible), DispatchedSparseConv2d)


def _main_parameter(layer: nn.Module) -> nn.Parameter:
    """The weight (dense form) or the kept values (sparse forms): the parameter that is not the bias."""
    return next(p for name, p in layer.named_parameters(recurse=False) if name != "bias")


def _convert(layer: nn.Module, form: str, dispatched: bool) -> None:
    """Turn ``layer`` in place into ``form`` (its identity, hooks, training flag, bias
    Parameter and execution setting stay); ``dispatched=False`` leaves a plain class."""
    if form != "dense" and not dispatched:
        raise ValueError("a sparse layer is always dispatched")
    current = _form(layer)
    if form != current:
        masked = layer.to_masked() if current != "dense" else layer
        new = masked if form == "dense" else _find_format(form, _masked_base(layer)).layer.from_masked(masked)
        _main_parameter(new).requires_grad_(_main_parameter(layer).requires_grad)
        if layer.bias is not None:
            new.bias = layer.bias  # same values (copied exactly); keep the Parameter object
        kept = {k: v for k, v in layer.__dict__.items() if "hook" in k}
        kept["training"] = layer.training
        for name in ("_execution", "_choice"):
            if name in layer.__dict__:
                kept[name] = layer.__dict__[name]
        layer.__dict__.clear()
        layer.__dict__.update(new.__dict__)
        layer.__dict__.update(kept)
    computing = _masked_base(layer) if form == "dense" else _find_format(form, _masked_base(layer)).layer
    layer.__class__ = _DISPATCHED[computing] if dispatched else computing


def _eligible(module: nn.Module) -> bool:
    if parametrize.is_parametrized(module):
        return False
    return isinstance(module, _MASKED) or _format_of(module) is not None


def set_execution(model: nn.Module, execution: str, layers: Optional[Iterable[nn.Module]] = None) -> nn.Module:
    """Set how ``model``'s masked/sparse layers run, converting them in place; returns ``model``.

    * "dense": plain MaskedLinear/MaskedConv2d (what sparsify() makes);
    * "sparse": every layer with a fixed mask that a sparse format accepts
      converts now, to the first format (:data:`SPARSE_FORMATS` order) that
      accepts it; the others run dense until their mask is fixed;
    * a format's name (e.g. "csr"): that format where the mask allows, else as "sparse";
    * "auto": each layer times dense and every format its mask allows at its
      first forward, and keeps the fastest (see the module docstring).

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
            module.__dict__.pop("_choice", None)
            continue
        _convert(module, _form(module), dispatched=True)
        module.execution = execution
        _convert(module, module.wanted_form(), dispatched=True)  # "auto" keeps the current form until its first forward
    return model


def resolve_execution(model: nn.Module, *args, **kwargs):
    """Run ``model(*args, **kwargs)`` once so that every "auto" layer settles its form;
    returns the output. Timing is forward+backward when ``model.training`` (build the
    optimizer afterwards), forward only in eval mode."""
    with torch.set_grad_enabled(model.training):
        return model(*args, **kwargs)


def execution_summary(model: nn.Module, formats: bool = False) -> Dict[str, str]:
    """``{name: "dense"|"sparse"}``: the form each masked/sparse layer computes in now
    (``formats=True``: the sparse format's name instead of "sparse")."""
    return {name: (_form(m) if formats or _form(m) == "dense" else "sparse") for name, m in model.named_modules()
            if _eligible(m) or isinstance(m, _MASKED)}
