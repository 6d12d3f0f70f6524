"""sparsify(): swap a model's Linear/Conv2d layers for masked ones, in place; export(): back again.

The swap changes each module's class and adds a mask, nothing else: the
module objects, their parameters (so an optimizer built before still holds
the right tensors), hooks and names stay, so an existing ``state_dict``
loads and, with masks of ones, outputs and gradients are the original's.
"""
from __future__ import annotations

import copy
import fnmatch
import warnings
from collections import abc
from typing import Callable, Iterable, Iterator, Optional, Tuple, Union

import torch
from torch.nn.utils import parametrize
from torch import nn

from .execution import check_execution, set_execution
from .masked import (DENSE_OF, MASK_MODES, MASKED_OF, MaskedConv2d, MaskedLinear, _MaskedWeight, has_own_forward,
                     masked_subclass, non_finite_mask_error)

Selector = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


def check_selector(argument: str, selector: Selector) -> Selector:
    """None, a callable, or the glob patterns as a tuple of strings (read once,
    so a generator of patterns serves every module)."""
    if selector is None or callable(selector):
        return selector
    if isinstance(selector, str):
        return (selector,)
    if isinstance(selector, bytes) or not isinstance(selector, abc.Iterable):
        raise TypeError(f"{argument} must be a glob pattern, a list of them or a callable (name, module) -> bool, "
                        f"got {type(selector).__name__} {selector!r}")
    patterns = tuple(selector)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{argument} must hold glob patterns (str), got {type(p).__name__} {p!r}")
    return patterns


def matches_selector(selector: Selector, name: str, module: nn.Module) -> bool:
    if callable(selector):
        return bool(selector(name, module))
    patterns = (selector,) if isinstance(selector, str) else selector   # as check_selector leaves it
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def masked_layers(model: nn.Module) -> Iterator[Tuple[str, _MaskedWeight]]:
    """``(name, layer)`` for every masked layer of ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, _MaskedWeight):
            yield name, module


def sparsify(model: nn.Module, include: Selector = None, exclude: Selector = None, mask_mode: str = "fixed",
             execution: str = "dense", example=None) -> nn.Module:
    """Make every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` a masked layer, in place; returns ``model``.

    include / exclude: glob patterns on qualified module names (``"layer1.*"``),
    a list of them, or a callable ``(name, module) -> bool``. A layer pruned
    with ``torch.nn.utils.prune`` keeps its mask.

    Subclasses of nn.Linear / nn.Conv2d: one that computes with its own
    ``forward`` (timm's ``Conv2dSame``, ``StdConv2d``) is masked too, its
    forward running with ``weight`` standing for ``W*M`` (dense only, see
    masked.masked_subclass). One that keeps the torch layer's forward is
    left dense, because nothing says its forward is what uses the weight
    (the ``out_proj`` of ``nn.MultiheadAttention`` is read directly, never
    called), so a mask could be silently ignored: such layers are named in
    a UserWarning, and ``left_dense(model)`` lists them.

    execution: "dense" (default: plain masked layers, computed densely),
    "sparse", a format's name, or "auto" (fixed-mask layers run in a sparse
    form, always or where measured faster on ``example``): this is
    ``set_execution(model, execution, example, layers=<the swapped layers>)``,
    see :func:`sparsesam.nn.set_execution`. Converting to a sparse form
    replaces the layer module (and its weight parameter); "auto" without
    ``example`` leaves the layers dense until ``resolve_execution``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_execution(execution)
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    include = check_selector("include", include)
    exclude = check_selector("exclude", exclude)
    chosen, unsupported = [], []
    for name, module in list(model.named_modules()):
        if include is not None and not matches_selector(include, name, module):
            continue
        if exclude is not None and matches_selector(exclude, name, module):
            continue
        masked_cls = _masked_class(type(module))
        if masked_cls is None:
            if _is_dense_layer(module):
                unsupported.append(f"{name} ({type(module).__name__})")
            continue
        # Checked before any layer changes, so a bad mask leaves the model as it was.
        prune_mask = getattr(module, "weight_mask", None) if hasattr(module, "weight_orig") else None
        if isinstance(prune_mask, torch.Tensor):
            error = non_finite_mask_error(f"{name}.weight_mask (torch.nn.utils.prune)", prune_mask)
            if error is not None:
                raise ValueError(error)
        chosen.append((module, masked_cls))
    swapped = []
    for module, masked_cls in chosen:
        mask = _take_torch_prune_mask(module)
        module.__class__ = masked_cls
        module._init_mask(mask_mode, mask)
        swapped.append(module)
    if unsupported:
        warnings.warn(f"sparsify left {len(unsupported)} layer(s) dense: {', '.join(unsupported)}: subclasses of "
                      f"nn.Linear / nn.Conv2d with the torch layer's forward may be used without calling it "
                      f"(sparsesam.nn.left_dense lists them; exclude them to silence this)", UserWarning,
                      stacklevel=2)
    if execution != "dense":
        plain = [m for m in swapped if type(m) in DENSE_OF and type(m) in MASKED_OF.values()]
        model = set_execution(model, execution, example=example, layers=plain)
    return model


def _is_dense_layer(module: nn.Module) -> bool:
    """An nn.Linear / nn.Conv2d (or subclass) that is not masked nor one of the sparse forms."""
    from .dispatch import has_forms
    return isinstance(module, (nn.Linear, nn.Conv2d)) and not isinstance(module, _MaskedWeight) \
        and not has_forms(module)


def _masked_class(cls: type) -> Optional[type]:
    """The masked class a module of class ``cls`` becomes, or None (not a layer sparsify masks)."""
    if cls in MASKED_OF:
        return MASKED_OF[cls]
    if issubclass(cls, _MaskedWeight) or not issubclass(cls, (nn.Linear, nn.Conv2d)) or not has_own_forward(cls):
        return None
    return masked_subclass(cls)


def left_dense(model: nn.Module) -> dict:
    """``{name: class name}`` of every nn.Linear / nn.Conv2d (subclasses included) of ``model`` that has no
    mask: what sparsify excluded or could not mask (see sparsify)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return {name: type(module).__name__ for name, module in model.named_modules() if _is_dense_layer(module)}


def _take_torch_prune_mask(module: nn.Module) -> Optional[torch.Tensor]:
    """If torch.nn.utils.prune pruned ``module.weight``, undo its reparametrisation and return the mask."""
    if not hasattr(module, "weight_orig"):
        return None
    mask = module.weight_mask.detach().clone()
    weight_orig = module.weight_orig
    torch.nn.utils.prune.remove(module, "weight")  # weight := weight_orig * mask, a plain Parameter
    with torch.no_grad():
        module.weight.copy_(weight_orig)  # keep the pruned values: the mask, not the weight, prunes
    return mask


def export(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with plain nn.Linear / nn.Conv2d layers whose weights are ``W*M``."""
    # Sparse-form layers become plain masked layers first (exact).
    exported = set_execution(copy.deepcopy(model), "dense")
    for _, layer in list(masked_layers(exported)):
        with torch.no_grad():
            baked = layer.effective_weight().detach().clone()
        if parametrize.is_parametrized(layer, "weight_mask"):
            # A score-driven mask (sparsesam.pruning.attach_scores), baked above as it is now. The
            # copy shares torch.nn.utils.parametrize's per-module class with the original layer, and
            # remove_parametrizations would delete the weight_mask property from that shared class
            # (breaking the original): drop the copy's parametrization by hand instead.
            layer.__class__ = type(layer).__bases__[0]
            del layer._modules["parametrizations"]
        else:
            del layer.weight_mask  # works for the buffer and the parameter alike
        del layer.mask_mode
        layer.__class__ = DENSE_OF[type(layer)]
        layer.weight = nn.Parameter(baked, requires_grad=layer.weight.requires_grad)
    return exported


__all__ = ["sparsify", "export", "masked_layers", "left_dense", "MaskedLinear", "MaskedConv2d"]
