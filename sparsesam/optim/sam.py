"""SAM, ASAM and per-channel-radius SAM over sparsesam's fused multi-tensor ops.

The API is the one SAM users know (davda54/sam)::

    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    loss_fn(model(x), y).backward()
    optimizer.first_step(zero_grad=True)     # move to the ascent point w + e
    loss_fn(model(x), y).backward()
    optimizer.second_step(zero_grad=True)    # back to w, then the base optimizer's step

How it moves less memory than the usual implementation: ``first_step``
writes the ascent point ``w + e`` into a persistent buffer and *swaps* it
with the parameter's storage (``PerturbedPoint``, the mechanism C-SAM uses
for its masks too), so the weights themselves are never modified;
``second_step`` swaps back (exact, free) and applies the update. With
``torch.optim.SGD`` as the base, ``base_optimizer`` is a
:class:`~sparsesam.optim.fused_sgd.FusedMaskedSGD` (a torch.optim.SGD whose
step is one fused pass, ``sgd_step_``); any other ``torch.optim`` optimizer
runs its own step. Either way the update is ``base_optimizer.step()``, so the
idioms of the widely used code hold: an LR scheduler on the base optimizer
(``CosineAnnealingLR(optimizer.base_optimizer, T_max)``) and step hooks
registered on it (``register_step_pre_hook`` / ``register_step_post_hook``)
see every update. ``load_state_dict`` also takes davda54/sam's state_dict.

Gradient accumulation over micro-batches works for both passes: let the
gradients of all micro-batches of a pass accumulate (each loss divided by
the number of micro-batches, as for any accumulation), then step::

    for x, y in micro_batches:
        (loss_fn(model(x), y) / len(micro_batches)).backward()
    optimizer.first_step(zero_grad=True)     # one norm, over the summed gradient
    for x, y in micro_batches:
        (loss_fn(model(x), y) / len(micro_batches)).backward()
    optimizer.second_step(zero_grad=True)

This equals the step on the whole batch for models whose forward does not
depend on the batch split (BatchNorm in training mode normalises each
micro-batch by its own statistics, as in any accumulation). Under DDP, run
all but the last micro-batch of each pass inside ``ddp.no_sync()``.

Masks (from masked layers, via ``model=`` or ``masks=``) are honoured: a
pruned entry never moves and does not count in the gradient norm.

With ``norm_in_backward=True`` each large gradient's squared norm is taken
by a hook the moment backward has produced it, while it is still in cache,
so ``first_step`` does not read the gradients once more just for the norm.
A value is used only if that gradient tensor is unchanged since (same
tensor, same version counter: ``clip_grad_norm_``, ``GradScaler.unscale_``
or any in-place change makes ``first_step`` recompute it), and never under
multi-process data parallelism (DDP averages the gradients after the hooks).

Under DDP, wrap the model with :func:`sparsesam.distributed.wrap_ddp` (the
masks are then not broadcast at every forward) and pass ``model=ddp``: DDP
averages the gradients of both passes, so every rank takes the same norm and
the same steps. (Running the ascent backward inside ``ddp.no_sync()`` gives
the SAM paper's per-device perturbation, m-sharpness: each rank perturbs by
its own gradient, and the ranks still take the same step.) Under FSDP2
(``fully_shard``) the parameters and gradients are DTensors: SAM and its
fused SGD work on the local shards, with each whole mask (and per-channel
radius) cut to the local shard's rows, and the squared gradient norm is
summed over the ranks (one all-reduce per ``first_step``). There the ascent
point is written into the shards in place and ``w`` restored from a copy,
not swapped: FSDP2 all-gathers from its own storage and would not see a swap.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .. import _validate
from ..nn import masked_layers
from ..ops import sam_grad_sq_norm, sam_perturb_
from .batchnorm import restore_bn_stats, snapshot_bn_stats
from .fused_sgd import FusedMaskedSGD, keep_pruned_entries
from ._sharded import (InPlacePoint, LocalMasks, is_sharded, local, local_channel_values, sharded_sq_norm_sum,
                       sharding_key)
from .perturbation import PerturbedPoint

Tensor = torch.Tensor


def _check_rho(rho, where: str = "rho") -> None:
    _validate.NON_NEGATIVE.check(where, rho)


def param_masks(model: nn.Module) -> Dict[Tensor, Tensor]:
    """``{weight parameter: its mask}`` for every masked layer of ``model``."""
    return {layer.weight: layer.weight_mask for _, layer in masked_layers(model)}


def _masks_via(sam: "weakref.ref[SAM]"):
    """The base optimizer asks SAM for the masks without keeping SAM alive."""
    def masks_of(params: List[Tensor]) -> List[Optional[Tensor]]:
        owner = sam()
        return owner._masks_of(params) if owner is not None else [None] * len(params)
    return masks_of


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation around any ``torch.optim`` optimizer.

    Args:
        params: parameters or param groups (a group may set its own ``rho``
            and ``adaptive``).
        base_optimizer: a ``torch.optim.Optimizer`` class, built here over the
            same param groups with ``**kwargs``.
        rho: neighbourhood radius (finite, ``>= 0``).
        adaptive: ASAM (scale-invariant perturbation ``e ∝ w^2 g``).
        eps: added to the gradient norm (finite, ``>= 0``).
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
                 masks: Optional[Mapping[Tensor, Tensor]] = None, norm_in_backward: bool = False, **kwargs) -> None:
        _check_rho(rho)
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError("base_optimizer must be a torch.optim.Optimizer class (e.g. torch.optim.SGD), "
                            f"got {base_optimizer!r}")
        _validate.NON_NEGATIVE.check("eps", eps)  # NaN or inf would make every ascent point NaN (or no ascent)
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        if base_optimizer is torch.optim.SGD:
            # torch.optim.SGD with a fused, mask-aware step(); same state_dict.
            self.base_optimizer = FusedMaskedSGD(self.param_groups, masks_of=_masks_via(weakref.ref(self)), **kwargs)
        else:
            self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
            # It knows nothing of masks: its step() puts the pruned entries back (hooks of its own).
            keep_pruned_entries(self.base_optimizer, _masks_via(weakref.ref(self)))
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.eps = eps
        self.model = model
        # Masks are looked up live at every step (a layer's mask tensor may be
        # replaced, e.g. by model.to()); only the layers are remembered.
        self._masked_layers = [layer for _, layer in masked_layers(model)] if model is not None else []
        self._extra_masks: Dict[int, Tuple[Tensor, Tensor]] = {id(p): (p, m) for p, m in (masks or {}).items()}
        self._rho_tensors: Dict[Tuple[float, torch.device], Tensor] = {}
        # The ascent point w + e lives in persistent buffers swapped with the weights' storage (not in state_dict).
        self._point = PerturbedPoint()
        self._sharded_point = InPlacePoint()   # the same, for FSDP2's DTensor parameters (see _sharded)
        self._local_masks = LocalMasks()
        self._bn_snapshot = None
        self._in_ascent = False
        self._hook_norms: Dict[int, Tuple["weakref.ref[Tensor]", int, Optional[Tensor], int, bool, float]] = {}
        self._hook_handles = []
        if norm_in_backward:
            self._register_norm_hooks()

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
        state = self.state.get(param)
        channel = state.get("channel_rho") if state else None
        if channel is not None:
            return local_channel_values(param, channel)
        # One 0-d tensor per distinct radius, not one per parameter per step.
        key = (float(group["rho"]), param.device)
        rho = self._rho_tensors.get(key)
        if rho is None:
            rho = self._rho_tensors[key] = torch.tensor(key[0], dtype=torch.float64, device=param.device)
        return rho

    # ----------------------------------------------------------------- masks
    def _mask_table(self) -> Dict[int, Tensor]:
        """``{id(param): mask}`` as the masks are now."""
        table = {id(layer.weight): layer.weight_mask for layer in self._masked_layers}
        table.update((key, mask) for key, (_, mask) in self._extra_masks.items())
        return table

    def _masks_of(self, params: List[Tensor]) -> List[Optional[Tensor]]:
        table = self._mask_table()
        # An FSDP2 parameter is worked on through its local shard: its mask is cut to match.
        masks = [self._local_masks(p, table.get(id(p))) for p in params]
        return [m if m is None or m.is_contiguous() else m.contiguous() for m in masks]

    # ------------------------------------------------- norm during backward
    # Below this size a gradient's norm costs less in first_step's single
    # multi-tensor call than a hook's dispatch does during backward.
    _HOOK_MIN_NUMEL = 1 << 16

    def _register_norm_hooks(self) -> None:
        # The parameters must not keep the optimizer alive through its hooks.
        optimizer = weakref.ref(self)

        def hook(p: Tensor) -> None:
            sam = optimizer()
            if sam is not None:
                sam._norm_hook(p)

        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and p.numel() >= self._HOOK_MIN_NUMEL:
                    self._hook_handles.append(p.register_post_accumulate_grad_hook(hook))

    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    @torch.no_grad()
    def _norm_hook(self, p: Tensor) -> None:
        # The second backward (at w + e) needs no norm; DDP changes the
        # gradients after this hook.
        if self._in_ascent or self._distributed():
            return
        g = p.grad
        if g is None or g.is_sparse or not g.is_contiguous() or not p.is_contiguous():
            return
        adaptive = self._adaptive_of(p)
        mask = self._mask_table().get(id(p))
        if mask is not None and not mask.is_contiguous():
            return
        value = sam_grad_sq_norm([g], [p] if adaptive else [], [mask], adaptive, check_args=False)
        self._hook_norms[id(p)] = (weakref.ref(g), g._version, mask, mask._version if mask is not None else 0,
                                   adaptive, float(value))

    def _adaptive_of(self, p: Tensor) -> bool:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return bool(group["adaptive"])
        return False

    def _hook_norm(self, p: Tensor, adaptive: bool, mask: Optional[Tensor]) -> Optional[float]:
        """The squared norm the hook took of ``p.grad``, if it still holds."""
        entry = self._hook_norms.pop(id(p), None)
        if entry is None:
            return None
        grad_ref, version, hook_mask, mask_version, hook_adaptive, value = entry
        g = p.grad
        if (grad_ref() is not g or g._version != version or hook_adaptive != adaptive or hook_mask is not mask
                or (mask is not None and mask._version != mask_version)):
            return None
        return value

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
        by_mode: Dict[bool, List[Tuple[dict, Tensor]]] = {False: [], True: []}
        for group, p in self._with_grads():
            by_mode[bool(group["adaptive"])].append((group, p))
        if self.model is not None:
            self._bn_snapshot = snapshot_bn_stats(self.model)
        self._in_ascent = True
        batches = {adaptive: self._ascent_batch(chosen) for adaptive, chosen in by_mode.items() if chosen}
        sq_norm = self._global_sq_norm(batches)
        if sq_norm is not None and bool(torch.isfinite(sq_norm)) and float(sq_norm) > 0:
            for adaptive, batch in batches.items():
                self._perturb(batch, sq_norm, adaptive)
        if zero_grad:
            self.zero_grad()

    def _ascent_batch(self, entries: List[Tuple[dict, Tensor]]) -> dict:
        params = [p for _, p in entries]
        # The ops read flat memory: non-contiguous tensors (rare) go through
        # contiguous copies.
        grads = [g if g.is_contiguous() else g.contiguous() for g in (local(p.grad) for p in params)]
        return dict(params=params, grads=grads, masks=self._masks_of(params),
                    rhos=[self._rho_of(p, g) for g, p in entries])

    def _global_sq_norm(self, batches: Dict[bool, dict]) -> Optional[Tensor]:
        """The squared norm over every gradient: hook values where they still hold, one fused call for the rest."""
        total = None
        sharded: Dict[tuple, dict] = {}   # FSDP2 parameters, by how they are sharded: summed over the ranks below
        for adaptive, batch in batches.items():
            from_hooks = 0.0
            rest = {"grads": [], "params": [], "masks": []}
            for p, g, m in zip(batch["params"], batch["grads"], batch["masks"]):
                if is_sharded(p):
                    part = sharded.setdefault((adaptive, sharding_key(p)), {"grads": [], "params": [], "masks": []})
                    part.setdefault("param", p)
                    shard = local(p)
                    part["grads"].append(g)
                    part["params"].append(shard if shard.is_contiguous() else shard.contiguous())
                    part["masks"].append(m)
                    continue
                value = self._hook_norm(p, adaptive, m) if self._hook_handles else None
                if value is None:
                    rest["grads"].append(g)
                    rest["params"].append(p if p.is_contiguous() else p.contiguous())
                    rest["masks"].append(m)
                else:
                    from_hooks += value
            part = sam_grad_sq_norm(rest["grads"], rest["params"] if adaptive else [], rest["masks"], adaptive,
                                    check_args=False) if rest["grads"] else None
            if from_hooks:
                part = torch.tensor(from_hooks, dtype=torch.float64) if part is None else part + from_hooks
            if part is not None:
                total = part if total is None else total + part
        self._hook_norms.clear()
        if sharded:
            local_parts = [(part["param"], sam_grad_sq_norm(part["grads"], part["params"] if adaptive else [],
                                                            part["masks"], adaptive, check_args=False))
                           for (adaptive, _), part in sharded.items()]
            summed = sharded_sq_norm_sum(local_parts)
            total = summed if total is None else total + summed.to(total.device)
        return total

    def _perturb(self, batch: dict, sq_norm: Tensor, adaptive: bool) -> None:
        chosen = [i for i, p in enumerate(batch["params"]) if is_sharded(p)]
        if chosen:
            self._perturb_sharded({key: [value[i] for i in chosen] for key, value in batch.items()}, sq_norm, adaptive)
            plain = [i for i, p in enumerate(batch["params"]) if not is_sharded(p)]
            if not plain:
                return
            batch = {key: [value[i] for i in plain] for key, value in batch.items()}
        params = batch["params"]
        buffers = self._point.buffers(params)
        flat_params = [p if p.is_contiguous() else p.contiguous() for p in params]
        flat_out = [b if p.is_contiguous() else torch.empty_like(fp) for b, p, fp in zip(buffers, params, flat_params)]
        # check_args=False: the optimizer builds these lists itself and checks
        # rho when it is set; the face's per-tensor Python checks would cost
        # more than the pass (the kernel still checks every tensor).
        sam_perturb_(flat_out, flat_params, batch["grads"], batch["masks"], batch["rhos"], sq_norm, bool(adaptive),
                     float(self.eps), check_args=False)
        for buf, out in zip(buffers, flat_out):
            if out is not buf:
                buf.copy_(out)
        self._point.swap_in(params)

    def _perturb_sharded(self, batch: dict, sq_norm: Tensor, adaptive: bool) -> None:
        # In place (InPlacePoint): w is copied aside, and the ascent point computed from the copy into the shard.
        params = batch["params"]
        saved = self._sharded_point.save(params)
        shards = [local(p) for p in params]
        out = [s if s.is_contiguous() else torch.empty_like(s, memory_format=torch.contiguous_format) for s in shards]
        sam_perturb_(out, saved, batch["grads"], batch["masks"], batch["rhos"], sq_norm.to(saved[0].device),
                     bool(adaptive), float(self.eps), check_args=False)
        for shard, o in zip(shards, out):
            if o is not shard:
                shard.copy_(o)

    @property
    def _ascent_buffers(self) -> Dict[int, Tensor]:
        """The persistent ascent-point buffers (read by bench/bench_sam.py to count the optimizer's memory)."""
        return self._point._buffers

    @torch.no_grad()
    def _restore(self) -> None:
        self._point.restore()
        self._sharded_point.restore()
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
        # Always through base_optimizer.step() (the instance attribute an LR
        # scheduler wraps, and the hooked method): schedulers and step hooks
        # on the base optimizer see every update. It honours the masks itself
        # (FusedMaskedSGD in its fused pass, any other through the hooks of
        # keep_pruned_entries).
        self.base_optimizer.step()

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
        """Load a state_dict of this class, or one of davda54/sam's SAM.

        davda54's SAM saves ``torch.optim.Optimizer.state_dict()`` of itself:
        ``{"state", "param_groups"}``, the groups holding the hyperparameters
        (rho, adaptive, lr, momentum, ...) and the state only its ``old_p``
        copies. Those copies are dropped (after ``second_step`` they equal the
        weights); its base optimizer's state (momentum buffers) is in no
        state_dict of that code, so the momentum restarts from zero, with a
        warning. State other than ``old_p`` found there (a fork that saved the
        base optimizer's state in the same dict) goes to the base optimizer.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        if set(state_dict) == {"state", "param_groups"}:
            state_dict = _from_davda54(state_dict)
        elif set(state_dict) != {"sam", "base"}:
            raise ValueError("not a SAM state_dict: expected the keys 'sam' and 'base' (sparsesam) "
                             f"or 'state' and 'param_groups' (davda54/sam), got {sorted(state_dict)}")
        super().load_state_dict(state_dict["sam"])
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups
        missing = [group for group in self.param_groups if float(group.get("momentum", 0) or 0) != 0]
        if state_dict.get("_davda54") and missing and not state_dict["base"]["state"]:
            warnings.warn("a davda54/sam state_dict holds no momentum buffers (that code never saves its base "
                          "optimizer's state): the momentum restarts from zero", stacklevel=2)


def _from_davda54(state_dict: Mapping) -> dict:
    """davda54/sam's ``Optimizer.state_dict()`` of its SAM, as ``{"sam", "base"}``."""
    groups = state_dict["param_groups"]
    if not isinstance(groups, list) or not all(isinstance(g, Mapping) and "params" in g for g in groups):
        raise ValueError("not a davda54/sam state_dict: 'param_groups' must be a list of groups with 'params'")
    for group in groups:
        if "rho" not in group or "adaptive" not in group:
            raise ValueError("not a davda54/sam state_dict: its param groups lack 'rho' and 'adaptive'")
    base_state = {}
    for index, entry in state_dict["state"].items():
        kept = {key: value for key, value in entry.items() if key != "old_p"}
        if kept:
            base_state[index] = kept
    # SAM's and the base optimizer's groups are the same dicts (as in davda54's code).
    return {"sam": {"state": {}, "param_groups": groups}, "base": {"state": base_state, "param_groups": groups},
            "_davda54": True}


__all__ = ["SAM", "param_masks"]
