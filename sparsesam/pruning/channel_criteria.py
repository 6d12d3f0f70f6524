"""Importance of each output channel of the masked layers: L2 norm and first-order Taylor.

Both score the *effective* weight W*M, so a channel already pruned scores 0
and stays pruned when pruning continues (pruning is cumulative), and both
give one score per output channel (dim 0 of the weight): the unit that
structured pruning removes and AdaSAP's per-channel radius rho_i reads.

Taylor (Molchanov et al. 2019, group first-order Taylor): the loss change
when channel c is removed is about ``|sum_{i in c} w_i * g_i|``. Because
``dL/dW = G*M`` for any mask (G = dL/d(W*M)), ``W * dL/dW = (W*M) * G``:
hooking the weight's gradient is enough, for fixed and trainable masks alike.
The per-batch value is made absolute before it is averaged over batches, so
opposite-signed batches do not cancel.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn

from ..nn.sparsify import Selector
from ._common import check_choice, check_finite, prunable_layers

CHANNEL_CRITERIA = ("l2", "taylor")


@torch.no_grad()
def channel_l2_norms(layer: nn.Module) -> torch.Tensor:
    """``||(W*M)[c]||_2`` for each output channel c of a masked layer (float32, on the weight's device)."""
    weight = layer.effective_weight().detach()
    return weight.reshape(weight.shape[0], -1).float().norm(dim=1)


class TaylorAccumulator:
    """Accumulates ``|sum_{i in c} w_i * dL/dw_i|`` per output channel over backward passes.

    Use as a context manager (hooks are on inside the ``with`` block), or
    call start() / stop()::

        with TaylorAccumulator(model) as taylor:
            for x, y in batches:
                loss_fn(model(x), y).backward()
                model.zero_grad()
        scores = taylor.scores()  # {layer name: tensor of its output channels}

    Every backward through a watched layer counts as one batch, so record
    plain forward/backward passes (not SAM's perturbed second pass). The hook
    sees each pass's own gradient, before it is accumulated into ``.grad``.
    By default every masked layer is watched, the classifier included;
    channel_prune() leaves the classifier out when it ranks.
    """

    def __init__(self, model: nn.Module, include: Selector = None, exclude: Selector = None) -> None:
        self._layers = prunable_layers(model, include, exclude, keep_output_layer=False)
        for name, layer in self._layers:
            if not layer.weight.requires_grad:
                raise ValueError(f"layer {name!r} has a frozen weight: Taylor scores need dL/dW (set requires_grad)")
        self._sums: Dict[str, torch.Tensor] = {}
        self._counts: Dict[str, int] = {}
        self._handles = []

    def _hook(self, name: str, weight: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def record(grad: torch.Tensor) -> None:
            with torch.no_grad():
                per_channel = (weight.detach().float() * grad.float()).reshape(grad.shape[0], -1).sum(dim=1).abs()
                if name in self._sums:
                    self._sums[name] += per_channel
                else:
                    self._sums[name] = per_channel
                self._counts[name] = self._counts.get(name, 0) + 1
        return record

    def start(self) -> "TaylorAccumulator":
        if not self._handles:
            self._handles = [layer.weight.register_hook(self._hook(name, layer.weight)) for name, layer in self._layers]
        return self

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "TaylorAccumulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()

    @property
    def num_batches(self) -> int:
        """Backward passes recorded (the most any watched layer saw)."""
        return max(self._counts.values(), default=0)

    def scores(self) -> Dict[str, torch.Tensor]:
        """Mean over the recorded batches of the per-channel Taylor score, per watched layer."""
        if not self._counts:
            raise ValueError("no backward pass was recorded: run forward/backward inside the accumulator first")
        missing = [name for name, _ in self._layers if name not in self._counts]
        if missing:
            raise ValueError(f"layers {missing} saw no backward pass: their gradients did not flow")
        return {name: self._sums[name] / self._counts[name] for name, _ in self._layers}


def accumulate_taylor(model: nn.Module, batches: Iterable, loss_fn: Callable, num_batches: Optional[int] = None,
                      include: Selector = None, exclude: Selector = None) -> Dict[str, torch.Tensor]:
    """Taylor scores over ``num_batches`` (input, target) pairs of ``batches``; restores ``.grad`` afterwards.

    The model's training flag is left as it is (BatchNorm in train mode uses
    the batch statistics, as during training).
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    saved = {p: p.grad for p in model.parameters()}
    try:
        with TaylorAccumulator(model, include, exclude) as taylor:
            for i, (inputs, targets) in enumerate(batches):
                if num_batches is not None and i >= num_batches:
                    break
                for p in saved:
                    p.grad = None
                loss_fn(model(inputs), targets).backward()
    finally:
        for p, grad in saved.items():
            p.grad = grad
    return taylor.scores()


def channel_scores(model: nn.Module, criterion: str = "l2", taylor: Optional[TaylorAccumulator] = None,
                   include: Selector = None, exclude: Selector = None) -> Dict[str, torch.Tensor]:
    """Per-output-channel importance of every selected masked layer, by ``criterion``.

    criterion="l2": the channel's L2 norm; "taylor": the scores a
    TaylorAccumulator collected (pass it as ``taylor``).
    """
    check_choice("criterion", criterion, CHANNEL_CRITERIA)
    layers = prunable_layers(model, include, exclude, keep_output_layer=False)
    if criterion == "l2":
        if taylor is not None:
            raise ValueError("taylor is only read by criterion='taylor'")
        for name, layer in layers:
            check_finite(f"the weight of layer {name!r}", layer.weight.detach())
        return {name: channel_l2_norms(layer) for name, layer in layers}
    if not isinstance(taylor, TaylorAccumulator):
        raise TypeError(f"criterion='taylor' needs taylor=TaylorAccumulator(...), got {type(taylor).__name__}")
    recorded = taylor.scores()
    missing = [name for name, _ in layers if name not in recorded]
    if missing:
        raise ValueError(f"taylor did not watch layers {missing}")
    for name, _ in layers:  # a non-finite loss or gradient during accumulation
        check_finite(f"the Taylor scores of layer {name!r}", recorded[name])
    return {name: recorded[name] for name, _ in layers}
