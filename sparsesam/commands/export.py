"""Model folders: weights in safetensors, the architecture and sparsity in JSON, and loading them back.

A model folder (written by ``train`` and ``prune``) holds

* ``model.safetensors``: the model's state_dict, masks kept (bool) for
  masked layers: loads back into ``build_model(...)`` + ``sparsify``;
* ``model.json``: the architecture (``spec``), which layers are masked,
  which carry channel gates, and the sparsity;
* ``sparsity.json``: the sparsity of every masked layer and overall;
* for structured pruning, ``model_compact.safetensors``: the physically
  smaller model's weights, and ``model_compact.pt`` (the module itself,
  whose reduced shapes no builder knows) to evaluate it.

Whatever extra tensors an algorithm left on its model (scores, soft-mask
parameters, hooks) are not exported: the folder holds the function the
model computes, as plain weights and binary masks. A soft (float) mask with
values other than 0 and 1 is baked into the weight (``W*M``) so the
exported masked model computes exactly the same outputs.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..nn import masked_layers, sparsify
from ..pruning import global_sparsity
from ..pruning.channel_graph import channel_gates, gate_pruned_channels
from .common import ConfigError, build_from_spec, read_json, write_json

WEIGHTS = "model.safetensors"
MODEL_JSON = "model.json"
SPARSITY_JSON = "sparsity.json"
COMPACT_WEIGHTS = "model_compact.safetensors"
COMPACT_MODULE = "model_compact.pt"


def _import_safetensors():
    try:
        from safetensors.torch import load_file, save_file
    except ImportError as error:
        raise ImportError("exporting models needs safetensors (pip install safetensors)") from error
    return load_file, save_file


def sparsity_report(model: nn.Module) -> Dict[str, Any]:
    layers = {name: layer.sparsity for name, layer in masked_layers(model)}
    kept = sum(int(torch.count_nonzero(layer.weight_mask)) for _, layer in masked_layers(model))
    total = sum(layer.weight_mask.numel() for _, layer in masked_layers(model))
    return {"global": global_sparsity(model) if layers else 0.0, "kept_weights": kept, "masked_weights": total,
            "layers": layers}


def example_input(spec: Dict[str, Any]) -> torch.Tensor:
    return torch.zeros(1, spec["in_channels"], spec["image_size"], spec["image_size"])


def _gated_layers(model: nn.Module) -> List[str]:
    names = {id(layer): name for name, layer in masked_layers(model)}
    return sorted(names[id(gate.layer)] for gate in channel_gates(model).values() if id(gate.layer) in names)


@torch.no_grad()
def canonical_copy(model: nn.Module, spec: Dict[str, Any]) -> nn.Module:
    """A freshly built model of ``spec`` holding ``model``'s function: its weights, binary masks, gates
    (a model with layers in sparse form is read through its dense form)."""
    from ..algorithms._execution import dense_view
    model = dense_view(model)
    masked = [name for name, _ in masked_layers(model)]
    fresh = build_from_spec(spec)
    if masked:
        sparsify(fresh, include=masked)
    source = model.state_dict()
    layers = dict(masked_layers(model))
    state = {}
    for key, target in fresh.state_dict().items():
        if key not in source:
            raise ValueError(f"the fitted model has no {key!r}: it does not match the architecture {spec['model']!r}")
        value = source[key].detach()
        module_name, _, leaf = key.rpartition(".")
        layer = layers.get(module_name)
        if layer is not None and leaf == "weight":
            mask = layer.weight_mask.detach()
            soft = mask.is_floating_point() and not bool(((mask == 0) | (mask == 1)).all())
            value = value * mask if soft else value   # bake a soft mask in so outputs stay exact
        if layer is not None and leaf == "weight_mask":
            value = value != 0
        if value.shape != target.shape:
            raise ValueError(f"{key}: fitted shape {tuple(value.shape)} differs from the architecture's "
                             f"{tuple(target.shape)} (export the compacted model separately)")
        state[key] = value.to(target.dtype).clone()
    fresh.load_state_dict(state, strict=True)
    gated = _gated_layers(model)
    if gated:
        gate_pruned_channels(fresh, example_input(spec), include=gated)
    fresh.train(model.training)
    return fresh


def save_model_folder(model: nn.Module, spec: Dict[str, Any], out: str, *,
                      compacted: Optional[nn.Module] = None, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Export ``model`` (and, for structured pruning, its compacted form) into folder ``out``."""
    _, save_file = _import_safetensors()
    os.makedirs(out, exist_ok=True)
    canonical = canonical_copy(model, spec)
    state = {k: v.contiguous() for k, v in canonical.state_dict().items()}
    save_file(state, os.path.join(out, WEIGHTS), metadata={"format": "pt", "model": spec["model"]})
    sparsity = sparsity_report(canonical)
    write_json(os.path.join(out, SPARSITY_JSON), sparsity)
    info = {"spec": spec, "masked_layers": [name for name, _ in masked_layers(canonical)],
            "gated_layers": _gated_layers(canonical), "weights": WEIGHTS, "sparsity": sparsity["global"],
            "compacted": None, **(extra or {})}
    if compacted is not None:
        compacted_state = {k: v.detach().contiguous() for k, v in compacted.state_dict().items()}
        save_file(compacted_state, os.path.join(out, COMPACT_WEIGHTS), metadata={"format": "pt"})
        torch.save(compacted, os.path.join(out, COMPACT_MODULE))
        info["compacted"] = {"weights": COMPACT_WEIGHTS, "module": COMPACT_MODULE,
                             "parameters": sum(p.numel() for p in compacted.parameters())}
    write_json(os.path.join(out, MODEL_JSON), info)
    return info


def plain_model(model: nn.Module) -> nn.Module:
    """``model`` as plain nn.Conv2d / nn.Linear layers computing the same function: masks baked into the
    weights, channel gates into the BatchNorm / bias that follows (what one would deploy)."""
    from ..nn import export
    from ..pruning.compaction import _bake_gates
    plain = export(model)
    _bake_gates(model, plain)  # also takes the copied gate hooks off (they point at the masked layers)
    return plain


def is_model_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_JSON)) and os.path.isfile(os.path.join(path, WEIGHTS))


def load_model_folder(path: str) -> "tuple[nn.Module, Dict[str, Any]]":
    """The masked model of a model folder (eval mode) and its model.json."""
    if not is_model_folder(path):
        raise ConfigError(f"{path} is not a model folder (it needs {MODEL_JSON} and {WEIGHTS}, "
                          f"as written by 'sparsesam train' or 'sparsesam prune')")
    load_file, _ = _import_safetensors()
    info = read_json(os.path.join(path, MODEL_JSON))
    model = build_from_spec(info["spec"])
    if info["masked_layers"]:
        sparsify(model, include=info["masked_layers"])
    model.load_state_dict(load_file(os.path.join(path, WEIGHTS)), strict=True)
    if info.get("gated_layers"):
        gate_pruned_channels(model, example_input(info["spec"]), include=info["gated_layers"])
    return model.eval(), info


def load_compacted(path: str, info: Dict[str, Any]) -> Optional[nn.Module]:
    """The compacted module of a structured model folder, its weights checked against the safetensors file."""
    if not info.get("compacted"):
        return None
    load_file, _ = _import_safetensors()
    module = torch.load(os.path.join(path, info["compacted"]["module"]), map_location="cpu", weights_only=False)
    module.load_state_dict(load_file(os.path.join(path, info["compacted"]["weights"])), strict=True)
    return module.eval()
