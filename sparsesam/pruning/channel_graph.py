"""What a model's graph says about its channels (through torch-pruning's DependencyGraph).

Two facts matter for structured pruning and neither is visible from one layer:

* coupling: the convolutions whose outputs meet in a residual sum share
  their channels; a channel of the sum exists while any of them feeds it,
  so only channels pruned in all of them can be removed
  (coupled_channel_groups ranks them as one unit);
* alignment: a grouped convolution (ResNeXt's, ``groups=G`` but not
  depthwise) needs every one of its G groups to keep the same number of
  channels, in its outputs and in its inputs, so the layers tied to it must
  lose the same positions in each of the G chunks of their channels
  (torch-pruning's MetaPruner rule, ``_get_channel_groups``);
  coupled_channel_groups records G per layer (``.alignment``) and
  prune_channels ranks positions instead of channels there;
* the layer after: an all-zero output channel of a conv followed by
  BatchNorm is not zero after the BatchNorm (it is ``beta -
  gamma*mean/std``, a constant image), and a Linear keeps adding its
  bias. Removing such a channel would change the network. gate_pruned_channels
  makes a pruned channel really zero: a forward hook multiplies the output
  of the BatchNorm that directly follows the layer (or the layer's own
  output, when no BatchNorm follows) by the layer's per-channel keep mask.
  With the gates on, the masked model computes what the physically smaller
  model computes, so it can be fine-tuned in that form and compacted
  exactly (compact_channels bakes the gates into the BatchNorm / bias).

The graph is traced on an exported (plain nn.Conv2d / nn.Linear) copy in
eval mode, so tracing leaves the model and its BatchNorm statistics alone.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from .._extras import require
from ..nn import export
from ..nn.sparsify import Selector
from ._common import output_channels, prunable_layers


def import_torch_pruning():
    """torch-pruning, an optional dependency (``pip install sparsesam[structured]``)."""
    return require("torch_pruning", extra="structured", purpose="channel graphs and compaction")


def dependency_graph(model: nn.Module, example_inputs) -> Tuple[nn.Module, "object"]:
    """(plain copy of ``model``, torch_pruning.DependencyGraph traced on it); module names match the model's."""
    tp = import_torch_pruning()

    plain = export(model)
    for module in plain.modules():
        remove_gates(module)
    plain.eval()
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(plain, example_inputs=example_inputs, verbose=False)
    return plain, graph


def channel_chunks(graph, group) -> int:
    """Into how many equal chunks the channels of a torch-pruning ``group`` fall, which must all lose the same
    positions: the largest channel-group count of a grouped conv / GroupNorm in the group, 1 if none.

    This is torch-pruning's MetaPruner._get_channel_groups (v1.6), with its rule that a depthwise conv
    (groups == out_channels) sets no constraint: its input and output channels are one channel.
    """
    counts = [1]
    for item in group.items:
        module = item.dep.target.module
        if isinstance(module, nn.Conv2d) and module.groups == module.out_channels:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None:
            continue
        if graph.is_out_channel_pruning_fn(item.dep.handler):
            counts.append(int(pruner.get_out_channel_groups(module)))
        else:
            counts.append(int(pruner.get_in_channel_groups(module)))
    return max(counts)


class CoupledGroups(list):
    """coupled_channel_groups' result: a list of tied layer-name lists, plus ``alignment``:
    {layer name: G} for every selected layer whose output channels must be pruned at the same positions
    in each of G equal chunks (layers tied to a grouped conv); layers absent from it have G = 1."""

    def __init__(self, groups=(), alignment: Dict[str, int] | None = None) -> None:
        super().__init__(groups)
        self.alignment: Dict[str, int] = dict(alignment or {})


def coupled_channel_groups(model: nn.Module, example_inputs, include: Selector = None, exclude: Selector = None,
                           keep_output_layer: bool = True) -> CoupledGroups:
    """Names of the selected masked layers whose output channels are tied, one list per tie (2+ layers).

    Pass the result as ``coupled=`` to prune_channels / channel_prune so
    that tied layers lose the same channels; its ``alignment`` (see
    CoupledGroups) makes them prune the same positions in every chunk of a
    grouped conv, which they read from it.
    """
    tp = import_torch_pruning()
    names = [name for name, _ in prunable_layers(model, include, exclude, keep_output_layer)]
    plain, graph = dependency_graph(model, example_inputs)
    modules = dict(plain.named_modules())
    name_of = {module: name for name, module in modules.items()}
    groups, seen, alignment = [], set(), {}
    for name in names:
        module = modules[name]
        pruner = graph.get_pruner_of_module(module)
        group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(module.weight.shape[0])))
        chunks = channel_chunks(graph, group)
        if chunks > 1:
            alignment[name] = chunks
        if name in seen:
            continue
        members = []
        for item in group.items:
            target = item.dep.target.module
            # Producers of the channels: convs / linears pruned on their outputs, and depthwise convs,
            # whose output channel c is their input channel c (so they are tied to the layer before).
            depthwise = item.dep.target.type == tp.ops.OPTYPE.DEPTHWISE_CONV
            produces = graph.is_out_channel_pruning_fn(item.dep.handler) and (
                depthwise or not graph.is_in_channel_pruning_fn(item.dep.handler))
            if (isinstance(target, (nn.Conv2d, nn.Linear)) and produces and name_of.get(target) in names
                    and list(item.idxs) == list(item.root_idxs)):
                members.append(name_of[target])
        members = sorted(set(members), key=names.index)
        seen.update(members)
        if len(members) > 1:
            groups.append(members)
    return CoupledGroups(groups, alignment)


class _ChannelGate:
    """Forward hook: multiply ``output`` by the keep mask of ``layer``'s output channels."""

    def __init__(self, layer: nn.Module, channel_dim: int) -> None:
        self.layer = layer
        self.channel_dim = channel_dim

    def keep(self) -> torch.Tensor:
        return output_channels(self.layer.weight_mask)

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        keep = self.keep().to(output.dtype)
        if self.channel_dim == 1 and output.dim() > 2:
            keep = keep.view(-1, *([1] * (output.dim() - 2)))
        return output * keep


def remove_gates(module: nn.Module) -> List[_ChannelGate]:
    removed = []
    for key, hook in list(module._forward_hooks.items()):
        if isinstance(hook, _ChannelGate):
            removed.append(module._forward_hooks.pop(key))
    return removed


def channel_gates(model: nn.Module) -> Dict[str, _ChannelGate]:
    """{name of the gated module: its gate} for every gate on ``model``."""
    return {name: hook for name, module in model.named_modules()
            for hook in module._forward_hooks.values() if isinstance(hook, _ChannelGate)}


class ChannelGates:
    """The gates gate_pruned_channels put on a model: ``gated`` maps each masked layer to the module gated."""

    def __init__(self, handles, gated: Dict[str, str]) -> None:
        self._handles = handles
        self.gated = gated

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "ChannelGates":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def gate_pruned_channels(model: nn.Module, example_inputs, include: Selector = None, exclude: Selector = None,
                         keep_output_layer: bool = True) -> ChannelGates:
    """Make every all-zero output channel of the selected masked layers output exactly zero.

    A layer directly followed by an affine BatchNorm (its only consumer) gets
    its gate after the BatchNorm, any other layer after itself (which also
    cancels its bias). The gates read the masks at every forward, so they
    follow later pruning. The classifier is not gated (keep_output_layer).
    Returns a ChannelGates whose remove() takes them off.
    """
    names = [name for name, _ in prunable_layers(model, include, exclude, keep_output_layer)]
    plain, graph = dependency_graph(model, example_inputs)
    plain_modules = dict(plain.named_modules())
    name_of = {module: name for name, module in plain_modules.items()}
    modules = dict(model.named_modules())
    already = channel_gates(model)
    handles, gated = [], {}
    for name in names:
        node = graph.module2node.get(plain_modules[name])
        target_name = name
        if node is not None and len(node.outputs) == 1:
            follower = node.outputs[0].module
            if (isinstance(follower, nn.modules.batchnorm._BatchNorm) and follower.affine
                    and len(node.outputs[0].inputs) == 1 and follower in name_of):
                target_name = name_of[follower]
        if target_name in already:
            raise ValueError(f"{target_name!r} is already gated: remove the old gates first")
        target = modules[target_name]
        channel_dim = -1 if isinstance(target, nn.Linear) else 1
        handles.append(target.register_forward_hook(_ChannelGate(modules[name], channel_dim)))
        gated[name] = target_name
    return ChannelGates(handles, gated)
