"""torch.optim.SGD whose ``step()`` is sparsesam's fused, mask-aware update.

SAM builds its base optimizer as :class:`FusedMaskedSGD` when asked for
``torch.optim.SGD``, so that ``optimizer.base_optimizer.step()`` is the one
call that updates the weights, as in the widely used SAM code: step hooks
registered on the base optimizer fire, and an LR scheduler built on it
(``CosineAnnealingLR(optimizer.base_optimizer, ...)``) sees its optimizer
step (no "lr_scheduler.step() before optimizer.step()" warning). Its
``state_dict`` is torch.optim.SGD's.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from .. import _validate
from ..ops import sgd_step_
from ._sharded import LocalMasks, local, local_mask

Tensor = torch.Tensor
MasksOf = Callable[[List[Tensor]], List[Optional[Tensor]]]


@contextmanager
def pruned_entries_kept(pairs: Sequence[Tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Put back the pruned entries (mask == 0) of each ``(param, mask)`` after the block.

    For an update that knows nothing of masks (any torch.optim step).
    """
    # local(): an FSDP2 parameter is kept through its local shard (its mask is cut to match).
    saved = [(local(p), local_mask(p, mask), local(p).detach().clone()) for p, mask in pairs]
    yield
    with torch.no_grad():
        for p, mask, before in saved:
            p.copy_(torch.where(mask != 0, p, before))


def keep_pruned_entries(optimizer: torch.optim.Optimizer, masks_of: MasksOf) -> list:
    """Make every ``optimizer.step()`` leave the pruned entries of masked parameters as they were.

    For a base optimizer that knows nothing of masks (any torch.optim step).
    Done by a step pre hook (a copy of the masked parameters that have a
    gradient) and a step post hook (the pruned entries put back), registered
    now, so before any hook of the user's: the user's post hooks see the
    final weights. Returns the hooks' handles.
    """
    saved: List[Tuple[Tensor, Tensor, Tensor]] = []

    def snapshot(opt, args, kwargs) -> None:
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        saved[:] = [(local(p), local_mask(p, mask), local(p).detach().clone())
                    for p, mask in zip(params, masks_of(params)) if mask is not None]

    @torch.no_grad()
    def restore(opt, args, kwargs) -> None:
        for p, mask, before in saved:
            p.copy_(torch.where(mask != 0, p, before))
        saved.clear()

    return [optimizer.register_step_pre_hook(snapshot), optimizer.register_step_post_hook(restore)]


def check_sgd_settings(*, lr=None, momentum=None, dampening=None, weight_decay=None) -> None:
    """torch.optim.SGD's ranges, and finite (None: not given): torch's own checks (``lr < 0``) let NaN
    through, and a NaN or infinite lr, momentum, dampening or weight decay turns every parameter into NaN at
    the first step. A one-element tensor lr or weight decay (torch.optim.SGD allows them) is read once."""
    def number(value):
        return float(value) if isinstance(value, Tensor) else value

    for name, value, allowed in (("lr", lr, _validate.NON_NEGATIVE), ("momentum", momentum, _validate.NON_NEGATIVE),
                                 ("dampening", dampening, _validate.FINITE),
                                 ("weight_decay", weight_decay, _validate.NON_NEGATIVE)):
        if value is not None:
            allowed.check(name, number(value))


def _torch_sgd_step() -> Callable:
    """torch.optim.SGD.step without the step-hook wrapper torch adds to it, so that
    calling it from inside our own (hooked) step does not run the hooks twice."""
    step = torch.optim.SGD.step
    return step.__wrapped__ if getattr(step, "hooked", False) else step


class FusedMaskedSGD(torch.optim.SGD):
    """torch.optim.SGD, with ``step()`` run as one fused ``sgd_step_`` pass per group.

    The update is torch.optim.SGD's (momentum, dampening, weight decay,
    Nesterov, maximize), except that an entry whose mask is 0 is never
    written (its momentum buffer included). A group that sets
    ``differentiable`` or ``fused`` goes through torch.optim.SGD's own step,
    and its pruned entries are put back afterwards.

    Args:
        params, **kwargs: as torch.optim.SGD.
        masks_of: ``params -> [mask or None per param]``, asked at every step
            (masks may be replaced between steps); None: no masks. Under
            FSDP2 the parameters are DTensors, updated through their local
            shards: a whole mask is cut to the shard's rows.
    """

    def __init__(self, params, *, masks_of: Optional[MasksOf] = None, **kwargs) -> None:
        if masks_of is not None and not callable(masks_of):
            raise TypeError(f"masks_of must be callable or None, got {type(masks_of).__name__}")
        settings = ("lr", "momentum", "dampening", "weight_decay")
        check_sgd_settings(**{k: kwargs[k] for k in settings if k in kwargs})  # before torch's less clear checks
        super().__init__(params, **kwargs)
        for group in self.param_groups:  # a group may set its own
            check_sgd_settings(**{k: group[k] for k in settings})
        self._masks_of = masks_of
        self._local_masks = LocalMasks()

    def _masks(self, params: List[Tensor]) -> List[Optional[Tensor]]:
        if self._masks_of is None:
            return [None] * len(params)
        # An FSDP2 parameter is updated through its local shard: a whole mask is cut to match.
        masks = [self._local_masks(p, m) for p, m in zip(params, self._masks_of(params))]
        return [m if m is None or m.is_contiguous() else m.contiguous() for m in masks]

    @staticmethod
    def _torch_path(group: dict) -> bool:
        return bool(group.get("differentiable")) or bool(group.get("fused"))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not self._torch_path(group):
                self._fused_step(group)
        others = [group for group in self.param_groups if self._torch_path(group)]
        if others:
            self._torch_step(others)
        return loss

    def _fused_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        if any(p.grad.is_sparse for p in params):
            raise TypeError("FusedMaskedSGD does not support sparse gradients")
        momentum = float(group["momentum"])
        lr, dampening, weight_decay = float(group["lr"]), float(group["dampening"]), float(group["weight_decay"])
        nesterov = bool(group["nesterov"])
        # Checked at construction; a scheduler or a user may have changed them since (Python floats: no sync).
        check_sgd_settings(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"invalid SGD settings: lr={lr}, weight_decay={weight_decay}, nesterov={nesterov} "
                             f"with momentum={momentum}, dampening={dampening}")
        # Parameters with a momentum buffer, and those starting one now
        # (torch.optim.SGD initialises it with the first update direction).
        batches = {False: [], True: []}
        for p in params:
            first = momentum != 0 and self.state[p].get("momentum_buffer") is None
            if first:
                # zeros: pruned entries are never written by the step
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            batches[first].append(p)
        for first, batch in batches.items():
            if not batch:
                continue
            # The op reads flat memory: non-contiguous tensors (rare) go through contiguous copies. An FSDP2
            # parameter (a DTensor) is updated through its local shard, with its gradient's and momentum's.
            shards = [local(p) for p in batch]
            work = [s if s.is_contiguous() else s.contiguous() for s in shards]
            grads = [g if g.is_contiguous() else g.contiguous() for g in (local(p.grad) for p in batch)]
            # check_args=False: the settings were checked above and the lists are built here.
            sgd_step_(work, grads, [local(self.state[p]["momentum_buffer"]) for p in batch] if momentum else [],
                      self._masks(batch), lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                      nesterov=nesterov, maximize=bool(group.get("maximize", False)), first_step=first,
                      check_args=False)
            for s, w in zip(shards, work):
                if w is not s:
                    s.copy_(w)

    def _torch_step(self, groups: List[dict]) -> None:
        params = [p for g in groups for p in g["params"] if p.grad is not None]
        masked = [(p, m) for p, m in zip(params, self._masks(params)) if m is not None]
        # Only these groups: hide the others' gradients from torch's step.
        hidden = [(p, p.grad) for g in self.param_groups if all(g is not chosen for chosen in groups)
                  for p in g["params"]]
        for p, _ in hidden:
            p.grad = None
        try:
            with pruned_entries_kept(masked):
                _torch_sgd_step()(self)
        finally:
            for p, grad in hidden:
                p.grad = grad


__all__ = ["FusedMaskedSGD", "keep_pruned_entries", "pruned_entries_kept"]
