"""set_execution(): which form each fixed-mask layer of a model runs in, settled now, by module swaps.

``set_execution(model, execution, example=None, layers=None)`` converts the
model's fixed-mask layers (masked, or already in a sparse form) and returns
the model:

* "dense": plain ``MaskedLinear`` / ``MaskedConv2d``, exactly what
  ``sparsify()`` makes;
* "sparse": each layer in the first format (:data:`~.dispatch.SPARSE_FORMATS`
  order) that accepts its mask;
* a format's name ("csr", "bsr", "nm"): that format where the mask allows,
  else as "sparse";
* "auto": each layer in the form timed fastest on its input from ``example``
  (see :mod:`.dispatch`). Without ``example`` the layers keep their current
  form (dense after ``sparsify()``) and are marked: a later
  :func:`resolve_execution(model, example) <resolve_execution>` times and
  converts them. Nothing converts inside a forward;
* a Mapping ``{qualified layer name: form}``: exactly those forms for those
  layers (what ``execution_summary(model, formats=True)`` reports: restoring a
  checkpoint's forms); a form the layer's mask does not allow is a ValueError.

How: the new form of a layer is a new module
(:func:`~.dispatch.converted`: ``from_masked`` / ``to_masked``, exact, hooks
carried over), set on its parent under its name (every name, if the module is
shared); no class or ``__dict__`` surgery. So the weight parameter is a new
tensor (``weight`` + ``weight_mask`` <-> ``values`` + the format's index; the
bias Parameter object is kept): build the optimizer after set_execution /
resolve_execution returns. A module of ``model`` held elsewhere is the old
form after a conversion: look layers up again by name. The returned model is
``model`` itself, unless ``model`` is a single layer that was converted.

Layers whose mask can still change (``mask_mode="trainable"``, score masks,
any parametrized layer) and convolutions the sparse op cannot run stay dense;
once such a mask is frozen, call set_execution again. Converting and timing
leave the random number generators as they were. A checkpoint saved in
any form loads into any other (:mod:`._checkpoint_forms`), so a resume
loads the checkpoint into the model as built (dense) and then calls
``set_execution(model, saved_forms)``, in that order: a fresh model's masks
(all ones) may not allow a structured form such as N:M. The "auto" mark is an
attribute of the layer: it survives a deepcopy, and "dense" clears it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, Iterable, List, Optional, Union

import torch
from torch import nn

from . import dispatch
from .dispatch import converted, dispatch_cache, dispatch_key, form_of, has_forms, sparse_forms

Execution = Union[str, Mapping]

# Set on a layer that "auto" is to settle once an example batch comes (resolve_execution).
_PENDING_AUTO = "_sparsesam_pending_auto"


def check_execution(execution) -> str:
    if not isinstance(execution, str) or execution not in dispatch.executions():
        raise ValueError(f"execution must be one of {dispatch.executions()} or a Mapping "
                         f"{{layer name: form}}, got {execution!r}")
    return execution


def _rng_untouched():
    """A context in which the random number generators (CPU, and CUDA once initialised) come out
    as they went in: building a layer's new form runs its initialiser (then overwritten), which
    must not shift a training run's random stream against one that restores forms from a checkpoint."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


# --- Swapping by path ------------------------------------------------------------------------


def _paths(model: nn.Module) -> Dict[int, List[str]]:
    """Every qualified name under which each module of ``model`` sits (a shared module has several)."""
    paths: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    return paths


def _swap(model: nn.Module, replacements: Dict[int, nn.Module]) -> nn.Module:
    """Put each replacement (by id of the module it replaces) at every path of the old module:
    ``setattr(parent, child_name, new)`` (a Sequential / ModuleList index is a child name too).
    Returns the root, which is the replacement if ``model`` itself was replaced."""
    if not replacements:
        return model
    if id(model) in replacements:
        return replacements[id(model)]  # a single layer: it has no parent here
    for old_id, paths in _paths(model).items():
        new = replacements.get(old_id)
        if new is None:
            continue
        for path in paths:
            parent_path, _, child_name = path.rpartition(".")
            setattr(model.get_submodule(parent_path), child_name, new)
    return model


# --- Deciding "auto" on an example batch -----------------------------------------------------


def _run_example(model: nn.Module, example) -> None:
    if isinstance(example, torch.Tensor):
        model(example)
    elif isinstance(example, Mapping):
        model(**example)
    elif isinstance(example, (tuple, list)):
        model(*example)
    else:
        raise TypeError(f"example must be a Tensor (model(example)), a tuple/list of arguments or a Mapping of "
                        f"keyword arguments, got {type(example).__name__}")


def _layer_inputs(model: nn.Module, layers: List[nn.Module], example) -> Dict[int, torch.Tensor]:
    """Each layer's input (its first call's) when ``model`` runs on ``example``, by id. The run leaves
    no trace: grad mode as in training (``model.training``), buffers (BatchNorm statistics) put back,
    the random number generators restored, no gradient kept."""
    inputs: Dict[int, torch.Tensor] = {}

    def capture(module, args):
        if id(module) not in inputs and args and isinstance(args[0], torch.Tensor):
            x = args[0]
            inputs[id(module)] = x.detach().requires_grad_(x.requires_grad)  # whether the layer gets dL/dx

    handles = [layer.register_forward_pre_hook(capture) for layer in layers]
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        with _rng_untouched(), torch.set_grad_enabled(model.training):
            _run_example(model, example)
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
    return inputs


def _fastest_form(layer: nn.Module, x: torch.Tensor, backward: bool) -> str:
    candidates = ["dense", *sparse_forms(layer)]
    builders = {form: (lambda form=form: dispatch.copy_in_form(layer, form)) for form in candidates}
    return dispatch_cache().decide(dispatch_key(layer, x, backward, candidates), builders, x, backward)


# --- The entry points ------------------------------------------------------------------------


def _selected(model: nn.Module, layers) -> List[nn.Module]:
    """The fixed-mask layers of ``model`` (each once) that ``layers`` (modules or qualified names) picks."""
    eligible = [module for module in model.modules() if has_forms(module)]
    if layers is None:
        return eligible
    if isinstance(layers, (str, nn.Module)):
        raise TypeError("layers must be an iterable of modules or qualified names, not a single "
                        f"{type(layers).__name__}")
    named = dict(model.named_modules())
    chosen = set()
    for item in layers:
        if isinstance(item, str):
            if item not in named:
                raise ValueError(f"layers names {item!r}, which is not a module of the model")
            item = named[item]
        if not isinstance(item, nn.Module):
            raise TypeError(f"layers must hold modules or qualified names, got a {type(item).__name__}")
        chosen.add(id(item))
    return [module for module in eligible if id(module) in chosen]


def _target_form(layer: nn.Module, execution: str) -> str:
    forms = sparse_forms(layer)
    if execution == "dense" or not forms:
        return "dense"
    if execution == "sparse" or execution not in forms:
        return forms[0]
    return execution


def _forms_by_name(model: nn.Module, execution: Mapping, layers) -> Dict[int, str]:
    if layers is not None:
        raise ValueError("layers cannot be given with a Mapping execution: the Mapping names the layers")
    named = dict(model.named_modules())
    wanted: Dict[int, str] = {}
    for name, form in execution.items():
        module = named.get(name) if isinstance(name, str) else None
        if module is None or not has_forms(module):
            raise ValueError(f"execution names {name!r}, which is not a fixed-mask layer of the model "
                             f"(those are {[n for n, m in named.items() if has_forms(m)]})")
        if form != "dense" and form not in sparse_forms(module):
            raise ValueError(f"execution asks {name!r} to run as {form!r}, but its mask allows "
                             f"{['dense', *sparse_forms(module)]}")
        wanted[id(module)] = form
    return wanted


def set_execution(model: nn.Module, execution: Execution, example=None,
                  layers: Optional[Iterable[Union[nn.Module, str]]] = None) -> nn.Module:
    """Convert ``model``'s fixed-mask layers to the forms ``execution`` asks for, now; returns the model
    (see the module docstring). ``example``: a batch for "auto" (a Tensor, a tuple of arguments or a
    Mapping of keyword arguments; model(example) must run; unused by the other executions; None with
    "auto": the layers wait for :func:`resolve_execution`); ``layers``: only these modules (or
    qualified names) of ``model``. Build the optimizer after it returns."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(execution, Mapping):
        wanted = _forms_by_name(model, execution, layers)
        selected = [m for m in model.modules() if id(m) in wanted]
    else:
        check_execution(execution)
        selected = _selected(model, layers)
        wanted = {}
        for layer in selected:
            if execution == "auto":
                if sparse_forms(layer):
                    setattr(layer, _PENDING_AUTO, True)
                continue
            wanted[id(layer)] = _target_form(layer, execution)
    replacements = {}
    with _rng_untouched():
        for layer in selected:
            if id(layer) not in wanted:
                continue
            layer.__dict__.pop(_PENDING_AUTO, None)  # another execution overrides a pending "auto"
            new = converted(layer, wanted[id(layer)])
            if new is not layer:
                replacements[id(layer)] = new
    model = _swap(model, replacements)
    if execution == "auto" and example is not None:
        model = resolve_execution(model, example)
    return model


def resolve_execution(model: nn.Module, example) -> nn.Module:
    """Settle the layers that ``set_execution(model, "auto")`` left waiting for an example: run
    ``model`` once on ``example`` to take each one's input, time its candidate forms on it (or find
    the decision in the :class:`~.dispatch.DispatchCache`), and swap in the fastest. Timing is
    forward+backward when ``model.training``, forward only in eval mode. The run leaves no trace
    (see :func:`_layer_inputs`); layers not waiting are left as they are (a no-op after "dense",
    "sparse" or a format). Returns the model (a new module if ``model`` is itself a converted layer)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    pending = [m for m in model.modules() if m.__dict__.get(_PENDING_AUTO) and has_forms(m)]
    if not pending:
        return model
    if example is None:
        raise ValueError("example must be a batch the model runs on, to time the 'auto' layers' forms; got None")
    inputs = _layer_inputs(model, pending, example)
    backward = model.training
    replacements = {}
    with _rng_untouched():
        for layer in pending:
            x = inputs.get(id(layer))
            if x is None:
                continue  # not reached by this example: it stays waiting
            del layer.__dict__[_PENDING_AUTO]
            new = converted(layer, _fastest_form(layer, x, backward))
            if new is not layer:
                replacements[id(layer)] = new
    return _swap(model, replacements)


def execution_summary(model: nn.Module, formats: bool = False) -> Dict[str, str]:
    """``{name: "dense"|"sparse"}``: the form each masked/sparse layer computes in now
    (``formats=True``: the sparse format's name instead of "sparse")."""
    return {name: (form_of(m) if formats or form_of(m) == "dense" else "sparse")
            for name, m in model.named_modules() if has_forms(m) or isinstance(m, dispatch._MASKED)}
