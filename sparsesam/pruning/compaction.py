"""Structured compaction: a masked model with empty channels -> a physically smaller plain model.

compact_channels() exports the model (plain layers, W*M baked in), bakes the
channel gates in (a gated BatchNorm channel gets gamma = beta = 0, a gated
layer's bias entry 0), then removes, through torch-pruning's
DependencyGraph, every channel group that outputs exactly zero:

* a group is the set of layers tied to one channel (the conv, its
  BatchNorm, the next layers' input channels, the other branches of a
  residual sum);
* a channel is removed only if every producer in its group gives exactly
  zero: conv / linear rows zero and bias zero, BatchNorm gamma = beta = 0,
  and between them only operations that map 0 to 0 (ReLU, add, pooling,
  reshapes; anything unknown keeps the group);
* the classifier's outputs (and any layer whose output is the model's
  output) are never removed.

So the consumers only lose input channels that were always zero, and the
small model computes the masked model's function: the same outputs up to
float rounding, in eval mode and in train mode. Without gates, a zeroed conv
channel followed by BatchNorm still carries the BatchNorm's constant and is
kept (exact, but not smaller): gate first (gate_pruned_channels).
Where even gates cannot make a channel exactly zero downstream (DenseNet's
concatenations), ``compact_channels(..., exact=False)`` removes it anyway,
changing the function by the dropped BatchNorm constants (opt-in).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from ..nn import masked_layers
from ._common import output_layer_name
from .channel_graph import channel_chunks, channel_gates, dependency_graph, import_torch_pruning, remove_gates

# Autograd nodes (as torch-pruning records them) that map an all-zero channel to an all-zero channel.
_ZERO_PRESERVING = {
    "ReluBackward0", "ReluBackward1", "HardtanhBackward0", "LeakyReluBackward0",
    "GeluBackward0", "SiluBackward0", "MishBackward0", "TanhBackward0", "HardswishBackward0", "EluBackward0",
    "MulBackward0", "MulBackward1", "AddBackward0", "SubBackward0",
    "MaxPool2DWithIndicesBackward0", "AvgPool2DBackward0", "AdaptiveAvgPool2DBackward0",
    "AdaptiveMaxPool2DBackward0", "MeanBackward0", "MeanBackward1", "SumBackward0", "SumBackward1",
    "TBackward0", "PermuteBackward0", "TransposeBackward0", "CloneBackward0", "NativeDropoutBackward0",
    "ToCopyBackward0",
}
# Add / Sub of two traced tensors keeps 0 + 0 = 0; with an untraced constant operand it does not.
_NEEDS_ALL_OPERANDS = {"AddBackward0", "SubBackward0"}


@dataclass
class CompactionReport:
    """Sizes before / after (torch_pruning.utils.count_ops_and_params: parameters, and
    multiply-accumulates per example of conv / linear plus BatchNorm / pooling / activation elements)."""

    params_before: int
    params_after: int
    macs_before: float
    macs_after: float
    channels_removed: Dict[str, int] = field(default_factory=dict)
    max_abs_diff: Optional[float] = None
    # {module name: {"0": kept output-channel indices, "1": kept input-channel indices}} (original numbering)
    # for every conv / linear / BatchNorm that lost channels: enough to rebuild the small model by slicing
    # (sparsesam.algorithms._compacted) without tracing it again.
    kept: Dict[str, Dict[str, List[int]]] = field(default_factory=dict)

    @property
    def param_ratio(self) -> float:
        return self.params_after / self.params_before

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before


def _tensors(value) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _call(model: nn.Module, example_inputs):
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (list, tuple)):
        return model(*example_inputs)
    return model(example_inputs)


def _output_producers(model: nn.Module, example_inputs) -> List[nn.Module]:
    """Conv / linear layers whose output tensor is itself part of the model's output."""
    produced, handles = {}, []
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            # Hold the output too, so that its id cannot be reused by another tensor.
            handles.append(module.register_forward_hook(
                lambda mod, args, out: produced.__setitem__(id(out), (mod, out))))
    try:
        with torch.no_grad():
            outputs = list(_tensors(_call(model, example_inputs)))
    finally:
        for handle in handles:
            handle.remove()
    return [produced[id(t)][0] for t in outputs if id(t) in produced and produced[id(t)][1] is t]


@torch.no_grad()
def bake_gates(model: nn.Module, plain: nn.Module) -> None:
    """Give ``plain`` (an export of ``model``) the gates' effect in its parameters, then drop the gates."""
    keeps = {name: gate.keep() for name, gate in channel_gates(model).items()}
    modules = dict(plain.named_modules())
    for module in plain.modules():
        remove_gates(module)
    for name, keep in keeps.items():
        module = modules[name]
        drop = ~keep.to(module.weight.device)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.weight[drop] = 0
            module.bias[drop] = 0
        elif module.bias is not None:
            module.bias[drop] = 0  # the weight rows are zero already: export baked W*M


def _zero_rows(module: nn.Module, idxs: List[int]) -> List[bool]:
    """For each index: is that output channel of a conv / linear / BatchNorm always exactly zero?"""
    weight, bias = module.weight, module.bias
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if not module.affine:
            return [False] * len(idxs)  # outputs -mean/std, not zero
        return [bool(weight[i] == 0 and bias[i] == 0) for i in idxs]
    rows = weight.detach().reshape(weight.shape[0], -1)
    return [bool(rows[i].eq(0).all() and (bias is None or bias[i] == 0)) for i in idxs]


def _removable(graph, group, candidates: List[int], protected, exact: bool = True) -> List[int]:
    """The candidate root channels that every producer in ``group`` leaves exactly zero (see module doc).

    exact=False: only the conv / linear producers are asked (their rows zero), not the BatchNorms nor the
    operations between them: the channel goes even where a BatchNorm's constant or an unknown operation
    makes it non-zero downstream (compact_channels(exact=False))."""
    tp = import_torch_pruning()

    alive = set()
    for item in group.items:
        node, handler = item.dep.target, item.dep.handler
        module = node.module
        out_fn = graph.is_out_channel_pruning_fn(handler)
        in_fn = graph.is_in_channel_pruning_fn(handler)
        if node.type in (tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.LINEAR, tp.ops.OPTYPE.DEPTHWISE_CONV):
            if type(module) not in (nn.Conv2d, nn.Linear):
                return []  # transposed convs etc.: row layout differs, do not guess
            if out_fn and not in_fn and node.type != tp.ops.OPTYPE.DEPTHWISE_CONV:
                if module in protected:
                    return []
                alive.update(r for r, dead in zip(item.root_idxs, _zero_rows(module, item.idxs)) if not dead)
            elif node.type == tp.ops.OPTYPE.DEPTHWISE_CONV:
                alive.update(r for r, dead in zip(item.root_idxs, _zero_rows(module, item.idxs)) if not dead)
        elif not exact:
            continue  # BatchNorm constants, elementwise operations, norms...: dropped with the channel
        elif node.type == tp.ops.OPTYPE.BN:
            alive.update(r for r, dead in zip(item.root_idxs, _zero_rows(module, item.idxs)) if not dead)
        elif node.type == tp.ops.OPTYPE.ELEMENTWISE:
            grad_fn = node.grad_fn
            fn_name = grad_fn.name() if grad_fn is not None else ""
            if fn_name not in _ZERO_PRESERVING:
                return []
            if fn_name in _NEEDS_ALL_OPERANDS and any(f is None for f, _ in grad_fn.next_functions):
                return []
            if fn_name == "HardtanhBackward0" and not grad_fn._saved_min_val <= 0 <= grad_fn._saved_max_val:
                return []  # clamps 0 to a non-zero bound
        elif node.type in (tp.ops.OPTYPE.RESHAPE, tp.ops.OPTYPE.CONCAT, tp.ops.OPTYPE.SPLIT,
                           tp.ops.OPTYPE.UNBIND, tp.ops.OPTYPE.SLICE, tp.ops.OPTYPE.EXPAND):
            continue  # moves values, keeps zeros
        else:
            return []  # the model's output, norms over channels, attention, parameters...: keep
    return [c for c in candidates if c not in alive]


def _aligned(idxs: List[int], channels: int, chunks: int) -> List[int]:
    """The channels of ``idxs`` whose position is removable in every one of ``chunks`` equal chunks (a grouped
    conv keeps equal groups: torch-pruning removes the same positions from each), less one position when that
    would be all of them (a layer keeps one channel, zero so exact, rather than vanish)."""
    size = channels // chunks
    removable = set(idxs)
    positions = [p for p in range(size) if all(p + k * size in removable for k in range(chunks))]
    if len(positions) == size:
        positions = positions[1:]
    return sorted(p + k * size for p in positions for k in range(chunks))


def _record_kept(kept: Dict[str, Dict[str, List[int]]], name: Optional[str], module: nn.Module, graph, item,
                 seen: set) -> None:
    """Remove ``item.idxs`` (positions in the module as it is now) from ``kept[name]``'s index lists
    (once per module and dimension in a group: ``seen``)."""
    if name is None or not isinstance(module, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
        return  # parameters of other kinds hold no channel dimension we rebuild
    out_fn = graph.is_out_channel_pruning_fn(item.dep.handler)
    in_fn = graph.is_in_channel_pruning_fn(item.dep.handler)
    depthwise = isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels
    if isinstance(module, nn.modules.batchnorm._BatchNorm) or depthwise:
        dims = ["0"]  # BatchNorm, depthwise conv: in and out channels are one dimension
    elif out_fn and not in_fn:
        dims = ["0"]
    elif in_fn and not out_fn:
        dims = ["1"]
    else:
        return
    entry = kept.setdefault(name, {})
    size = {"0": module.weight.shape[0], "1": module.weight.shape[1] if module.weight.dim() > 1 else 0}
    drop = set(int(i) for i in item.idxs)
    if dims == ["1"] and isinstance(module, nn.Conv2d) and module.groups > 1:
        # A grouped conv's weight holds in_channels / groups inputs per group, and the same positions go
        # from every group (_aligned): the kept positions are those of one group.
        drop = {i % size["1"] for i in drop}
    for dim in dims:
        if (name, dim) in seen:
            continue
        seen.add((name, dim))
        current = entry.setdefault(dim, list(range(size[dim])))
        entry[dim] = [index for position, index in enumerate(current) if position not in drop]


@torch.no_grad()
def compact_channels(model: nn.Module, example_inputs, protect: Iterable[str] = (),
                     check: bool = True, exact: bool = True) -> "tuple[nn.Module, CompactionReport]":
    """A physically smaller plain copy of ``model`` without its always-zero channels, and a report.

    example_inputs: what ``model(example_inputs)`` takes (a tensor, a tuple
    of positional inputs or a dict), on the model's device; used to trace the
    graph and count operations. protect: names of extra layers whose
    outputs must stay. check: also run both models in eval mode on
    example_inputs and report the largest output difference.
    ``model`` is left unchanged.

    exact=False (opt-in) removes every channel whose conv / linear rows are
    all pruned in every producer of its group, through torch-pruning, even
    where the exact rule keeps it: a channel that meets a BatchNorm that is
    not its layer's only consumer (DenseNet's concatenated features reach
    the BatchNorms of every later layer, whose ``beta - gamma*mean/std``
    makes a zero channel a constant image) or an operation not known to
    keep zeros. The small model then computes the masked model with those
    constants dropped: not the same function (``max_abs_diff`` says by how
    much on ``example_inputs``), so fine-tune it afterwards. Protected
    layers and the classifier's outputs still stay.
    """
    tp = import_torch_pruning()
    if not list(masked_layers(model)):
        raise ValueError("model has no masked layers: call sparsesam.sparsify(model) first")
    protect = list(protect)
    plain, graph = dependency_graph(model, example_inputs)
    bake_gates(model, plain)
    modules = dict(plain.named_modules())
    unknown = [name for name in protect if name not in modules]
    if unknown:
        raise ValueError(f"protect names modules the model does not have: {unknown}")
    protected = set(_output_producers(plain, example_inputs))
    protected.update(modules[name] for name in [*protect, output_layer_name(model)])

    macs_before, params_before = tp.utils.count_ops_and_params(plain, example_inputs)
    removed: Dict[str, int] = {}
    kept: Dict[str, Dict[str, List[int]]] = {}
    name_of = {module: name for name, module in modules.items()}
    for name, _ in masked_layers(model):
        module = modules[name]
        if module in protected:
            continue
        candidates = [i for i, dead in enumerate(_zero_rows(module, range(module.weight.shape[0]))) if dead]
        if not candidates:
            continue
        pruner = graph.get_pruner_of_module(module)
        group = graph.get_pruning_group(module, pruner.prune_out_channels, candidates)
        idxs = _aligned(_removable(graph, group, candidates, protected, exact), module.weight.shape[0],
                        channel_chunks(graph, group))
        if not idxs:
            continue
        group = graph.get_pruning_group(module, pruner.prune_out_channels, idxs)
        seen: set = set()
        for item in group.items:
            target = item.dep.target.module
            if isinstance(target, (nn.Conv2d, nn.Linear)) and graph.is_out_channel_pruning_fn(item.dep.handler) \
                    and not graph.is_in_channel_pruning_fn(item.dep.handler):
                removed[name_of[target]] = removed.get(name_of[target], 0) + len(item.idxs)
            _record_kept(kept, name_of.get(target), target, graph, item, seen)
        group.prune()
    macs_after, params_after = tp.utils.count_ops_and_params(plain, example_inputs)
    plain.train(model.training)

    report = CompactionReport(int(params_before), int(params_after), float(macs_before), float(macs_after), removed,
                              kept=kept)
    if check:
        was_training = model.training
        model.eval()
        plain.eval()
        try:
            diffs = [(a.double() - b.double()).abs().max().item() if a.numel() else 0.0
                     for a, b in zip(_tensors(_call(model, example_inputs)), _tensors(_call(plain, example_inputs)))]
        finally:
            model.train(was_training)
            plain.train(was_training)
        report.max_abs_diff = max(diffs, default=0.0)
    return plain, report
