"""SAM, ASAM and per-channel-radius SAM over sparsesam's fused multi-tensor ops.

The API is the one SAM users know (davda54/sam)::

    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    loss_fn(model(x), y).backward()
    optimizer.first_step(zero_grad=True)     # move to the ascent point w + e
    loss_fn(model(x), y).backward()
    optimizer.second_step(zero_grad=True)    # back to w, then the base optimizer's step

How it moves less memory than the usual implementation: ``first_step``
writes the ascent point ``w + e`` into a persistent buffer and *swaps* it
with the parameter's storage, so the weights themselves are never modified;
``second_step`` swaps back (exact, free) and applies the update. With
``torch.optim.SGD`` as the base, the update is one fused pass
(``sgd_step_``); any other ``torch.optim`` optimizer runs its own step.

Masks (from masked layers, via ``model=`` or ``masks=``) are honoured: a
pruned entry never moves and does not count in the gradient norm.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..nn import masked_layers
from ..ops.sam_step import sam_grad_sq_norm, sam_perturb_, sgd_step_
from .batchnorm import restore_bn_stats, snapshot_bn_stats

Tensor = torch.Tensor


def _check_rho(rho, where: str = "rho") -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)):
        raise TypeError(f"{where} must be a number, got {type(rho).__name__}")
    if not rho >= 0 or rho == float("inf"):
        raise ValueError(f"{where} must be a finite number >= 0, got {rho}")


def param_masks(model: nn.Module) -> Dict[Tensor, Tensor]:
    """``{weight parameter: its mask}`` for every masked layer of ``model``."""
    return {layer.weight: layer.weight_mask for _, layer in masked_layers(model)}


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation around any ``torch.optim`` optimizer.

    Args:
        params: parameters or param groups (a group may set its own ``rho``
            and ``adaptive``).
        base_optimizer: a ``torch.optim.Optimizer`` class, built here over the
            same param groups with ``**kwargs``.
        rho: neighbourhood radius (``>= 0``).
        adaptive: ASAM (scale-invariant perturbation ``e ∝ w^2 g``).
        eps: added to the gradient norm.
        model: the model being trained; if given, its masked layers' masks
            are honoured and BatchNorm running statistics are updated once
            per step (by the first forward pass only).
        masks: ``{parameter: mask}``, in addition to those of ``model``.
    """

    # GradScaler hands us `grad_scale` and `found_inf` and lets step()
    # decide: the weights must be restored even when the step is skipped.
    _step_supports_amp_scaling = True

    def __init__(self, params, base_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.SGD, rho: float = 0.05,
                 adaptive: bool = False, eps: float = 1e-12, *, model: Optional[nn.Module] = None,
                 masks: Optional[Mapping[Tensor, Tensor]] = None, **kwargs) -> None:
        _check_rho(rho)
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError("base_optimizer must be a torch.optim.Optimizer class (e.g. torch.optim.SGD), "
                            f"got {base_optimizer!r}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.eps = eps
        self.model = model
        self._masks: Dict[Tensor, Tensor] = dict(param_masks(model)) if model is not None else {}
        self._masks.update(masks or {})
        self._ascent_buffers: Dict[Tensor, Tensor] = {}   # persistent, not in state_dict
        self._swapped: List[Tuple[Tensor, Tensor]] = []    # (param, its own storage) while at w + e
        self._bn_snapshot = None
        self._in_ascent = False

    def add_param_group(self, param_group: dict) -> None:
        if "rho" in param_group:
            _check_rho(param_group["rho"], "param group rho")
        super().add_param_group(param_group)

    # ----------------------------------------------------------------- radii
    def set_channel_rho(self, param: Tensor, rho: Tensor) -> None:
        """Give ``param`` one radius per output channel (dim 0), as AdaSAP does; overrides its group's rho."""
        if not any(param is p for group in self.param_groups for p in group["params"]):
            raise ValueError("param is not managed by this optimizer")
        if not isinstance(rho, torch.Tensor) or not rho.is_floating_point():
            raise TypeError("rho must be a floating tensor with one radius per output channel")
        if param.dim() == 0 or rho.shape != (param.shape[0],):
            raise ValueError(f"rho must have shape ({param.shape[0] if param.dim() else 1},) for a parameter of "
                             f"shape {tuple(param.shape)}, got {tuple(rho.shape)}")
        if not torch.isfinite(rho).all() or (rho < 0).any():
            raise ValueError("rho must be finite and >= 0 in every channel")
        self.state[param]["channel_rho"] = rho.detach().to(device=param.device, dtype=torch.float64).clone()

    def _rho_of(self, param: Tensor, group: dict) -> Tensor:
        channel = self.state.get(param, {}).get("channel_rho")
        if channel is not None:
            return channel
        return torch.tensor(float(group["rho"]), dtype=torch.float64, device=param.device)

    # ----------------------------------------------------------------- steps
    def _with_grads(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("SAM does not support sparse gradients")
                yield group, p

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter with a gradient to its ascent point ``w + e``.

        A zero, infinite or NaN gradient norm leaves the weights where they
        are (no perturbation; the descent step decides what to do with such
        gradients). The norm is scale-invariant, so gradients scaled by a
        GradScaler need no unscaling here.
        """
        if self._in_ascent:
            raise RuntimeError("first_step() was called twice: call second_step() (or step()) in between")
        # SAM and ASAM groups share one global norm but scale it differently.
        by_mode = {False: [], True: []}
        for group, p in self._with_grads():
            by_mode[bool(group["adaptive"])].append((group, p))
        if self.model is not None:
            self._bn_snapshot = snapshot_bn_stats(self.model)
        self._in_ascent = True
        sq_norm = None
        for adaptive, chosen in by_mode.items():
            if chosen:
                part = sam_grad_sq_norm([p.grad for _, p in chosen], [p for _, p in chosen],
                                        [self._masks.get(p) for _, p in chosen], adaptive)
                sq_norm = part if sq_norm is None else sq_norm + part
        if sq_norm is not None and bool(torch.isfinite(sq_norm)) and float(sq_norm) > 0:
            for adaptive, chosen in by_mode.items():
                if chosen:
                    self._perturb(chosen, sq_norm, adaptive)
        if zero_grad:
            self.zero_grad()

    def _perturb(self, entries, sq_norm: Tensor, adaptive: bool) -> None:
        params = [p for _, p in entries]
        buffers = [self._buffer_for(p) for p in params]
        # The op works on flat memory: non-contiguous parameters (rare) go
        # through contiguous copies.
        flat_params = [p if p.is_contiguous() else p.contiguous() for p in params]
        flat_out = [b if p.is_contiguous() else torch.empty_like(fp) for b, p, fp in zip(buffers, params, flat_params)]
        sam_perturb_(flat_out, flat_params, [p.grad for p in params], [self._masks.get(p) for p in params],
                     [self._rho_of(p, g) for g, p in entries], sq_norm, adaptive, self.eps)
        for p, buf, out in zip(params, buffers, flat_out):
            if out is not buf:
                buf.copy_(out)
            original = p.data
            p.data = buf
            self._swapped.append((p, original))

    def _buffer_for(self, p: Tensor) -> Tensor:
        buf = self._ascent_buffers.get(p)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = torch.empty_like(p)
            self._ascent_buffers[p] = buf
        return buf

    @torch.no_grad()
    def _restore(self) -> None:
        for p, original in self._swapped:
            ascent_point = p.data
            p.data = original
            self._ascent_buffers[p] = ascent_point  # reused next step
        self._swapped.clear()
        if self._bn_snapshot is not None:
            restore_bn_stats(self._bn_snapshot)
            self._bn_snapshot = None
        self._in_ascent = False

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to ``w`` (bitwise) and apply the base optimizer with the gradients taken at ``w + e``."""
        if not self._in_ascent:
            raise RuntimeError("second_step() needs a first_step() before it")
        self._restore()
        grad_scale = getattr(self, "grad_scale", None)   # set by GradScaler.step()
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            pass  # GradScaler found inf/NaN: the weights are restored, the update skipped
        else:
            if grad_scale is not None:
                grads = [p.grad for _, p in self._with_grads()]
                if grads:
                    torch._foreach_mul_(grads, (1.0 / grad_scale).to(grads[0].dtype))
            self._descend()
        if zero_grad:
            self.zero_grad()

    def _descend(self) -> None:
        if type(self.base_optimizer) is torch.optim.SGD:
            for group in self.param_groups:
                if not group.get("differentiable") and not group.get("fused"):
                    self._fused_sgd(group)
                else:
                    self._generic_step_for([group])
            return
        self._generic_step_for(self.param_groups)

    def _fused_sgd(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        momentum = float(group["momentum"])
        state = self.base_optimizer.state
        # Parameters with a momentum buffer, and those starting one now
        # (torch.optim.SGD initialises it with the first update direction).
        batches = {False: [], True: []}
        for p in params:
            first = momentum != 0 and state[p].get("momentum_buffer") is None
            if first:
                # zeros: pruned entries are never written by the step
                state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            batches[first].append(p)
        for first, batch in batches.items():
            if not batch:
                continue
            work = [p if p.is_contiguous() else p.contiguous() for p in batch]
            sgd_step_(work, [p.grad for p in batch],
                      [state[p]["momentum_buffer"] for p in batch] if momentum else [],
                      [self._masks.get(p) for p in batch],
                      lr=float(group["lr"]), momentum=momentum, dampening=float(group["dampening"]),
                      weight_decay=float(group["weight_decay"]), nesterov=bool(group["nesterov"]),
                      maximize=bool(group.get("maximize", False)), first_step=first)
            for p, w in zip(batch, work):
                if w is not p:
                    p.copy_(w)

    def _generic_step_for(self, groups: List[dict]) -> None:
        # The base optimizer knows nothing of masks: keep the pruned entries
        # of masked parameters as they were.
        masked = [(p, self._masks[p], p.detach().clone()) for g in groups for p in g["params"]
                  if p in self._masks and p.grad is not None]
        if groups is self.param_groups:
            self.base_optimizer.step()
        else:
            # Only some groups: hide the others' gradients from the base step.
            hidden = [(p, p.grad) for g in self.param_groups if all(g is not chosen for chosen in groups)
                      for p in g["params"]]
            for p, _ in hidden:
                p.grad = None
            try:
                self.base_optimizer.step()
            finally:
                for p, grad in hidden:
                    p.grad = grad
        for p, mask, before in masked:
            p.copy_(torch.where(mask != 0, p, before))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        """``second_step()`` after a ``first_step()``; or, with a closure that
        recomputes the loss and calls backward, the whole SAM step (the first
        forward/backward must already have run, as in davda54/sam)."""
        if closure is None:
            return self.second_step()
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        loss = closure()
        self.second_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """SAM's own state (per-channel radii) and the base optimizer's (momentum, ...)."""
        if self._in_ascent:
            raise RuntimeError("state_dict() between first_step() and second_step() would save the ascent point")
        return {"sam": super().state_dict(), "base": self.base_optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"sam", "base"}:
            raise ValueError("not a SAM state_dict (expected the keys 'sam' and 'base')")
        super().load_state_dict(state_dict["sam"])
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups


__all__ = ["SAM", "param_masks"]
