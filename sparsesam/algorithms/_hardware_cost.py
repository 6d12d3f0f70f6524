"""HARP's hardware cost: the fraction of parameters or FLOPs that the current keep rates keep.

intellisec/harp, utils/hw.py:

* ``hw_loss`` (weight pruning): ``sum_l numel_l * r_l / sum_l numel_l``
  against the target k;
* ``hw_flops_loss`` (channel pruning): the network's FLOPs with every
  layer's channels scaled by the rates, per layer ``count_flops_conv`` /
  ``count_flops_dense`` (copied below, bias and activation counted as the
  official calls do), against the FLOPs of the network whose channels are
  all scaled by k (``round(C * k)``).

The official FLOPs cost reads the feature-map sizes from a hard-coded table
per architecture (``fmap_dict``) and takes a layer's neighbour in module
order as the layer that feeds it. Here both come from the model itself:
one forward pass records every layer's input size, and a torch.fx trace
finds, for each layer, the prunable layers whose outputs reach its input
(through BatchNorm, activations, pooling, flatten, sums, concatenations).

Our channel masks remove a layer's *output* channels (the official ones its
input channels), so a layer's cost is ``count(C_in * r_in, C_out * r_out)``
with r_out its own rate and r_in the rate of the layer(s) producing its
input -- the same network cost, indexed from the other side. Deviations:

* several producers (a residual sum, a concatenation): r_in is their rate
  weighted by their channel counts (exact for a concatenation; for a sum
  it is the branches' mean, where the official code ties a shortcut's rate
  to its block's first conv, map_shortcut_rate);
* a model fx cannot trace: the producer is the previous prunable layer in
  execution order (the official code's rule, in module order);
* the target scales only what the rates can prune: the image channels and
  the classes stay whole (the official target also rounds ``3 * k`` input
  channels and ``10 * k`` classes, which no mask can reach).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

Number = Union[float, torch.Tensor]


def count_flops_dense(in_features: Number, out_features: Number, bias: bool = True, activation: bool = True) -> Number:
    """utils/hw.py count_flops_dense."""
    flops = (2 * in_features - 1) * out_features
    if bias:
        flops = flops + out_features
    if activation:
        flops = flops + out_features
    return flops


def count_flops_conv(height: float, width: float, in_channels: Number, out_channels: Number, kernel_size,
                     stride: int = 1, padding: int = 0, bias: bool = True, activation: bool = True) -> Number:
    """utils/hw.py count_flops_conv (output size by the float formula, as there)."""
    if isinstance(kernel_size, int):
        kernel_size = [kernel_size] * 2
    n = kernel_size[0] * kernel_size[1] * in_channels
    flops_per_instance = 2 * n - 1
    out_height = (height - kernel_size[0] + 2 * padding) / stride + 1
    out_width = (width - kernel_size[1] + 2 * padding) / stride + 1
    num_instances_per_channel = out_height * out_width
    flops_per_channel = num_instances_per_channel * flops_per_instance
    total_flops = out_channels * flops_per_channel
    if bias:
        total_flops = total_flops + out_channels * num_instances_per_channel
    if activation:
        total_flops = total_flops + out_channels * num_instances_per_channel
    return total_flops


@dataclass
class LayerShape:
    """What the cost of one conv / linear layer needs: its channels, kernel and input size, and its producers."""

    name: str
    in_channels: int            # weight.shape[1], as the official formulas read it
    out_channels: int
    numel: int
    kernel_size: Optional[Sequence[int]] = None  # None: a linear layer
    stride: int = 1
    padding: int = 0
    height: float = 1.0
    width: float = 1.0
    producers: List[str] = field(default_factory=list)

    def flops(self, in_channels: Number, out_channels: Number) -> Number:
        if self.kernel_size is None:
            return count_flops_dense(in_channels, out_channels)
        return count_flops_conv(self.height, self.width, in_channels, out_channels, self.kernel_size,
                                stride=self.stride, padding=self.padding)


class _LeafTracer(torch.fx.Tracer):
    """Keeps the given layers as single nodes (their parametrized masks are not traced into)."""

    def __init__(self, leaves) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m in self.leaves or super().is_leaf_module(m, qualname)


def _fx_producers(model: nn.Module, names: Sequence[str]) -> Optional[Dict[str, List[str]]]:
    """{layer: the layers in ``names`` whose outputs reach its input}, or None when fx cannot trace the model."""
    modules = dict(model.named_modules())
    try:
        graph = _LeafTracer({modules[n] for n in names}).trace(model)
    except Exception:  # fx raises many kinds on data-dependent code: fall back to execution order
        return None
    wanted = set(names)
    memo: Dict[torch.fx.Node, List[str]] = {}

    def reaching(node: torch.fx.Node) -> List[str]:
        if node in memo:
            return memo[node]
        if node.op == "call_module" and node.target in wanted:
            found = [node.target]
        else:
            found = []
            for parent in node.all_input_nodes:
                found += [p for p in reaching(parent) if p not in found]
        memo[node] = found
        return found

    out: Dict[str, List[str]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in wanted:
            inputs: List[str] = []
            for parent in node.all_input_nodes:
                inputs += [p for p in reaching(parent) if p not in inputs]
            out[node.target] = inputs
    return out


@torch.no_grad()
def trace_layer_shapes(model: nn.Module, example: torch.Tensor, names: Sequence[str]) -> Dict[str, LayerShape]:
    """The LayerShape of each named conv / linear layer from one eval-mode forward of ``example[:1]``."""
    modules = dict(model.named_modules())
    sizes: Dict[str, tuple] = {}
    out_sizes: Dict[str, tuple] = {}
    order: List[str] = []

    def hook(name):
        def record(module, inputs, output):
            sizes[name], out_sizes[name] = tuple(inputs[0].shape), tuple(output.shape)
            order.append(name)
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        model(example[:1])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    producers = _fx_producers(model, names)
    if producers is None:
        producers = {name: order[i - 1:i] for i, name in enumerate(order)}
    shapes = {}
    for name in names:
        layer = modules[name]
        weight = layer.weight
        shape = LayerShape(name, int(weight.shape[1]), int(weight.shape[0]), weight.numel(),
                           producers=list(producers.get(name, [])))
        if isinstance(layer, nn.Conv2d):
            shape.kernel_size = tuple(layer.kernel_size)
            shape.stride = int(layer.stride[0])
            shape.height, shape.width = float(sizes[name][2]), float(sizes[name][3])
            if isinstance(layer.padding, str):
                # 'same' / 'valid': the padding the formula needs for the output height the layer produced.
                shape.padding = ((out_sizes[name][2] - 1) * shape.stride - shape.height + shape.kernel_size[0]) / 2
            else:
                shape.padding = int(layer.padding[0])
        elif not isinstance(layer, nn.Linear):
            raise TypeError(f"layer {name!r} is a {type(layer).__name__}: the FLOPs cost knows Conv2d and Linear")
        shapes[name] = shape
    return shapes


class HardwareCost:
    """HARP's cost of the scored layers' rates as a fraction of the dense network's, and the target fraction.

    kind "params": ``sum numel_l r_l / sum numel_l`` over the scored layers
    (hw_loss). kind "flops": the FLOPs of every counted layer (the scored
    ones and, under channel masks, the unscored classifier) with its output
    channels scaled by its rate and its input channels by its producers'
    (hw_flops_loss; see the module docstring).
    """

    def __init__(self, kind: str, shapes: Mapping[str, LayerShape], scored: Sequence[str]) -> None:
        if kind not in ("params", "flops"):
            raise ValueError(f"kind must be 'params' or 'flops', got {kind!r}")
        self.kind = kind
        self.shapes = dict(shapes)
        self.scored = list(scored)
        missing = [n for n in self.scored if n not in self.shapes]
        if missing:
            raise ValueError(f"no shape for the scored layers {missing}")
        self.total = float(self._cost({n: 1.0 for n in self.scored}))

    def _in_rate(self, shape: LayerShape, rates: Mapping[str, Number]) -> Number:
        producers = shape.producers
        if not producers:
            return 1.0  # the image, or a layer nothing prunable feeds
        channels = [self.shapes[p].out_channels for p in producers]
        weighted = sum(c * rates.get(p, 1.0) for p, c in zip(producers, channels))
        return weighted / sum(channels)

    def _cost(self, rates: Mapping[str, Number], rounded: bool = False) -> Number:
        if self.kind == "params":
            return sum(self.shapes[n].numel * rates[n] for n in self.scored)
        total = 0.0
        for name, shape in self.shapes.items():
            in_channels = shape.in_channels * self._in_rate(shape, rates)
            out_channels = shape.out_channels * rates.get(name, 1.0)
            if rounded:  # the official target: round(C * k) channels
                in_channels, out_channels = round(float(in_channels)), round(float(out_channels))
            total = total + shape.flops(in_channels, out_channels)
        return total

    def kept(self, rates: Mapping[str, Number]) -> Number:
        """The fraction of the dense cost the rates keep (differentiable in tensor rates)."""
        return self._cost(rates) / self.total

    def target(self, keep: float) -> float:
        """The fraction every scored layer at rate ``keep`` keeps: ``keep`` itself for params."""
        if self.kind == "params":
            return float(keep)
        return float(self._cost({n: keep for n in self.scored}, rounded=True)) / self.total
