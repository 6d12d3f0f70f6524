"""Training the physically smaller model: a channel-pruned model compacted in place, and expanded back.

After structured pruning the pruned channels of a masked, gated model
output exactly zero, so the model computes what its compacted form
(torch-pruning through :func:`sparsesam.pruning.compact_channels`) computes
with fewer channels. A phase that fine-tunes such a model trains the
compacted one instead:

* :func:`compact_in_place` turns the model object the caller holds into its
  compacted form (its submodules, parameters and buffers are replaced; the
  object stays) and returns a *record*: for every layer that lost channels
  the kept output / input channel indices (original numbering) and the
  original sizes, the masked and the gated layers' names -- plain lists and
  strings, so the record goes into a checkpoint as it is;
* :func:`rebuild_compact` rebuilds the same structure from the record on a
  fresh model (resuming): slicing by the saved indices, no data-dependent
  value is computed (the example input only traces the graph of gates);
* :func:`expand_in_place` puts the trained compacted model back into the
  original architecture, masked and gated: what a removed channel held
  becomes zero (BatchNorm running variance one), so the expanded model
  computes the compacted model's function, exports like any masked model
  and is the same bits however the run was interrupted.

A layer whose sliced mask still has zeros (a channel compaction had to keep,
e.g. the last channel of a layer or one that meets an operation compaction
does not know) stays masked and gated in the compacted model, so fine-tuning
cannot revive it.

The gradients are those of the masked gated model: a removed weight there
has a zero gradient (masked row, or an input channel that is always zero),
and so does a gated BatchNorm channel's; the two runs differ only by float
rounding (fewer terms in each sum).
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch import nn

from ..nn import export, masked_layers, sparsify
from ..pruning import compact_channels, gate_pruned_channels
from ..pruning.channel_graph import channel_gates, remove_gates
from ..pruning.compaction import bake_gates

_BN = nn.modules.batchnorm._BatchNorm


def _gated_layer_names(model: nn.Module) -> List[str]:
    names = {id(layer): name for name, layer in masked_layers(model)}
    return sorted(names[id(gate.layer)] for gate in channel_gates(model).values() if id(gate.layer) in names)


def _adopt(model: nn.Module, other: nn.Module) -> None:
    """Make ``model`` hold ``other``'s submodules, parameters and buffers (``other`` is a copy of ``model``)."""
    model._modules = other._modules
    model._parameters = other._parameters
    model._buffers = other._buffers


def _index(tensor: torch.Tensor, kept: Dict[str, List[int]]) -> torch.Tensor:
    for dim, indices in kept.items():
        if int(dim) < tensor.dim():
            tensor = tensor.index_select(int(dim), torch.as_tensor(indices, dtype=torch.long, device=tensor.device))
    return tensor


def _channel_tensors(module: nn.Module) -> List[str]:
    """Names of ``module``'s parameters and buffers that carry its channel dimensions."""
    names = ["weight", "bias"]
    if isinstance(module, _BN):
        names += ["running_mean", "running_var"]
    elif hasattr(module, "weight_mask"):
        names.append("weight_mask")
    return [name for name in names if getattr(module, name, None) is not None]


def _set_sizes(module: nn.Module, groups: int | None = None) -> None:
    """The size attributes of a conv / linear / BatchNorm after its tensors changed shape.

    groups: a conv's group count after the change when known (expanding back: the original's);
    otherwise a depthwise conv (a group per input channel, before the change) follows its channel
    count and a grouped one (ResNeXt) keeps its groups, each holding weight.shape[1] inputs.
    """
    weight = module.weight
    if isinstance(module, _BN):
        module.num_features = weight.shape[0]
    elif isinstance(module, nn.Conv2d):
        if groups is None:
            depthwise = module.groups > 1 and module.groups == module.in_channels
            groups = weight.shape[0] if depthwise else module.groups
        module.groups = groups
        module.out_channels = weight.shape[0]
        module.in_channels = weight.shape[1] * groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=module._parameters[name].requires_grad)
    else:
        module._buffers[name] = value


def _check_module(name: str, module: nn.Module) -> None:
    if not isinstance(module, (nn.Conv2d, nn.Linear, _BN)):
        raise TypeError(f"cannot slice channels of {name!r} ({type(module).__name__})")


@torch.no_grad()
def slice_channels(model: nn.Module, kept: Dict[str, Dict[str, List[int]]]) -> None:
    modules = dict(model.named_modules())
    for name, dims in kept.items():
        module = modules[name]
        _check_module(name, module)
        for tensor_name in _channel_tensors(module):
            _replace(module, tensor_name, _index(getattr(module, tensor_name), dims).clone())
        _set_sizes(module)


def _keep_masked(model: nn.Module, compact: nn.Module, record: Dict[str, Any], example) -> None:
    """Layers whose sliced mask still prunes something stay masked and gated in ``compact`` (see module doc)."""
    masks = {name: layer.weight_mask.detach() for name, layer in masked_layers(model)}
    still = []
    for name in record["masked"]:
        sliced = _index(masks[name], record["kept"].get(name, {}))
        if not bool((sliced != 0).all()):
            still.append((name, sliced))
    record["still_masked"] = [name for name, _ in still]
    if still:
        sparsify(compact, include=record["still_masked"])
        layers = dict(masked_layers(compact))
        with torch.no_grad():
            for name, sliced in still:
                layers[name].weight_mask.copy_(sliced.to(layers[name].weight_mask.dtype))
        gate_pruned_channels(compact, example, include=record["still_masked"], keep_output_layer=False)


@torch.no_grad()
def compact_in_place(model: nn.Module, example: torch.Tensor) -> Dict[str, Any]:
    """Replace ``model``'s insides by its compacted form; returns the record (see the module docstring)."""
    modules = dict(model.named_modules())
    compact, report = compact_channels(model, example, check=False)
    sizes = {}
    for name in report.kept:
        weight = modules[name].weight
        sizes[name] = {"0": int(weight.shape[0]), "1": int(weight.shape[1]) if weight.dim() > 1 else 0}
        if isinstance(modules[name], nn.Conv2d):
            sizes[name]["groups"] = int(modules[name].groups)  # expand_in_place restores it
    record: Dict[str, Any] = {
        "kept": {name: {dim: list(map(int, idx)) for dim, idx in dims.items()} for name, dims in report.kept.items()},
        "sizes": sizes, "masked": [name for name, _ in masked_layers(model)], "gated": _gated_layer_names(model),
        "params_before": int(report.params_before), "params_after": int(report.params_after),
        "macs_before": float(report.macs_before), "macs_after": float(report.macs_after),
    }
    _keep_masked(model, compact, record, example)
    compact.train(model.training)
    _adopt(model, compact)
    return record


@torch.no_grad()
def rebuild_compact(model: nn.Module, record: Dict[str, Any], example: torch.Tensor) -> None:
    """The structure compact_in_place gave, on a model of the original structure (masked, gated);
    the values are whatever ``model`` held: load the saved state afterwards."""
    plain = export(model)
    bake_gates(model, plain)
    slice_channels(plain, record["kept"])
    if record["still_masked"]:
        sparsify(plain, include=record["still_masked"])
        gate_pruned_channels(plain, example, include=record["still_masked"], keep_output_layer=False)
    plain.train(model.training)
    _adopt(model, plain)


def _scatter(small: torch.Tensor, dims: Dict[str, List[int]], full_shape, fill: float) -> torch.Tensor:
    full = torch.full(full_shape, fill, dtype=small.dtype, device=small.device)
    index = [slice(None)] * len(full_shape)
    for dim, indices in dims.items():
        if int(dim) < len(full_shape):
            index[int(dim)] = torch.as_tensor(indices, dtype=torch.long, device=small.device)
    # Advanced indexing on two dims at once needs an open grid.
    tensors = [i for i in index if isinstance(i, torch.Tensor)]
    if len(tensors) == 2:
        rows, cols = index[0], index[1]
        full[rows[:, None], cols[None, :]] = small
    else:
        full[tuple(index)] = small
    return full


@torch.no_grad()
def expand_in_place(model: nn.Module, record: Dict[str, Any], example: torch.Tensor) -> None:
    """Put the compacted ``model`` back into its original architecture, masked and gated (module docstring)."""
    modules = dict(model.named_modules())
    for module in model.modules():
        remove_gates(module)
    masks = {}  # the full-size masks of the layers that are plain in the compacted model
    for name, dims in record["kept"].items():
        module = modules[name]
        _check_module(name, module)
        size = record["sizes"][name]
        full_weight = [size["0"], *(([size["1"]] if size["1"] else [])), *module.weight.shape[2:]]
        # A removed output channel was a pruned row (mask 0); a removed input channel carried zeros, and
        # keeps the mask it had before compaction (1: channel pruning masks rows only).
        rows = torch.zeros(size["0"], dtype=torch.bool, device=module.weight.device)
        rows[torch.as_tensor(dims.get("0", range(size["0"])), dtype=torch.long, device=rows.device)] = True
        row_mask = rows.view(-1, *([1] * (len(full_weight) - 1))).expand(full_weight)
        for tensor_name in _channel_tensors(module):
            tensor = getattr(module, tensor_name)
            if tensor_name == "weight_mask":
                # A row the compacted mask prunes entirely (a dead channel compaction kept) is pruned in
                # the removed input channels too.
                alive = torch.zeros(size["0"], dtype=torch.bool, device=rows.device)
                alive[rows] = tensor.reshape(tensor.shape[0], -1).ne(0).any(dim=1)
                alive = alive.view(-1, *([1] * (len(full_weight) - 1))).expand(full_weight)
                full = _scatter(tensor, dims, full_weight, 1.0) * alive.to(tensor.dtype)
            else:
                shape = full_weight if tensor_name == "weight" else [size["0"]]
                full = _scatter(tensor, dims, shape, 1.0 if tensor_name == "running_var" else 0.0)
            _replace(module, tensor_name, full)
        if name in record["masked"] and not hasattr(module, "weight_mask"):
            masks[name] = row_mask.clone()
        _set_sizes(module, size.get("groups"))  # records from before groups were kept: the depthwise rule
    # Plain in the compacted model: masked again (all ones where nothing was removed).
    sparsify(model, include=[name for name in record["masked"] if not hasattr(modules[name], "weight_mask")])
    layers = dict(masked_layers(model))
    for name, mask in masks.items():
        layers[name].weight_mask.copy_(mask.to(layers[name].weight_mask.dtype))
    if record["gated"]:
        gate_pruned_channels(model, example, include=record["gated"])
