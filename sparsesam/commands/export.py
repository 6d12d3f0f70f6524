"""Model folders: a config (JSON) plus weights (safetensors), and loading them back without running code.

A model folder (written by ``train`` and ``prune``) holds

* ``model.safetensors``: the model's state_dict, with a bool ``weight_mask``
  next to each masked layer's ``weight``;
* ``model.json``: the architecture (``spec``), which layers are masked,
  which carry channel gates, and the sparsity;
* ``sparsity.json``: the sparsity of every masked layer and overall;
* for structured pruning, ``model_compact.safetensors``: the physically
  smaller model's weights. Its architecture is described in ``model.json``
  (``compacted.kept``: the output / input channels each sliced layer
  keeps), so loading builds the plain architecture, slices it and loads
  the weights: nothing is unpickled (no ``torch.load`` of a module).

The stored weights hold the model's *function* in the plain architecture:
a masked layer's ``weight`` is ``W*M`` (pruned entries are zero), and a
channel-gated BatchNorm (or layer bias) has its pruned channels' gamma and
beta (bias) zero. So the same architecture without masks -- our own model
class, or any ``nn.Module`` with the same parameter names -- loading the
state_dict (``strict=False``, ignoring the ``weight_mask`` entries)
computes the sparse model's outputs, never the dense one's; and the masked
model computes exactly what it computed before export (its mask multiplies
zeros, its gates zero channels whose affine parameters are already zero).
Whatever extra tensors an algorithm left on its model (scores, soft-mask
parameters, hooks) are not exported; a soft (float) mask with values other
than 0 and 1 is baked into the weight, its stored mask being ``M != 0``.

Every file is written atomically, JSON with sorted keys and safetensors
with sorted metadata, so identical runs write identical bytes. Reading a
folder whose files are missing, truncated, corrupt or of another model is a
one-line :class:`~sparsesam.file_errors.BadFileError` naming the file.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..file_errors import BadFileError, describe
from ..nn import masked_layers, sparsify
from ..pruning import global_sparsity
from ..pruning.channel_graph import channel_gates, gate_pruned_channels
from .common import ConfigError, build_from_spec, write_json
from .weights_file import read_safetensors, write_safetensors

WEIGHTS = "model.safetensors"
MODEL_JSON = "model.json"
SPARSITY_JSON = "sparsity.json"
COMPACT_WEIGHTS = "model_compact.safetensors"
# What every safetensors file of a folder carries: "pt" is the framework tag the Hugging Face tools read.
METADATA = {"format": "pt"}


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
    """A freshly built model of ``spec`` computing ``model``'s function, masked and gated like it, whose
    values are those the folder stores: the plain model's (``W*M``, gates baked in) plus the bool masks
    (a model with layers in sparse form is read through its dense form)."""
    from ..algorithms._execution import dense_view
    model = dense_view(model)
    layers = dict(masked_layers(model))
    fresh = build_from_spec(spec)
    if layers:
        sparsify(fresh, include=list(layers))
    source = plain_model(model).state_dict()
    source.update({f"{name}.weight_mask": layer.weight_mask.detach() != 0 for name, layer in layers.items()})
    state = {}
    for key, target in fresh.state_dict().items():
        if key not in source:
            raise ValueError(f"the fitted model has no {key!r}: it does not match the architecture {spec['model']!r}")
        value = source[key].detach()
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


def _state(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}


def _compaction_record(canonical: nn.Module, spec: Dict[str, Any], compacted: nn.Module) -> Dict[str, Any]:
    """What rebuilds ``compacted`` from the plain architecture: the channels each sliced layer keeps
    (compact_channels of the exported model, checked to give ``compacted`` exactly)."""
    from ..pruning import compact_channels
    rebuilt, report = compact_channels(canonical, example_input(spec), check=False)
    expected, given = _state(rebuilt), _state(compacted)
    if sorted(expected) != sorted(given) or any(expected[k].shape != given[k].shape or not torch.equal(
            expected[k], given[k].to(expected[k].dtype)) for k in expected):
        raise ValueError("compacted is not the channel compaction (sparsesam.pruning.compact_channels) of the "
                         "model being exported: its tensors differ")
    return {"weights": COMPACT_WEIGHTS, "kept": report.kept,
            "parameters": sum(p.numel() for p in compacted.parameters())}


def save_model_folder(model: nn.Module, spec: Dict[str, Any], out: str, *,
                      compacted: Optional[nn.Module] = None, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Export ``model`` (and, for structured pruning, its compacted form) into folder ``out``."""
    os.makedirs(out, exist_ok=True)
    canonical = canonical_copy(model, spec)
    write_safetensors(os.path.join(out, WEIGHTS), _state(canonical), METADATA)
    sparsity = sparsity_report(canonical)
    write_json(os.path.join(out, SPARSITY_JSON), sparsity, sort_keys=True)
    info = {"spec": spec, "masked_layers": [name for name, _ in masked_layers(canonical)],
            "gated_layers": _gated_layers(canonical), "weights": WEIGHTS, "sparsity": sparsity["global"],
            "compacted": None, **(extra or {})}
    if compacted is not None:
        info["compacted"] = _compaction_record(canonical, spec, compacted)
        write_safetensors(os.path.join(out, COMPACT_WEIGHTS), _state(compacted), METADATA)
    write_json(os.path.join(out, MODEL_JSON), info, sort_keys=True)
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


def read_model_json(path: str) -> Dict[str, Any]:
    """A folder's model.json, checked for the fields loading needs; BadFileError if it is unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadFileError(path, f"not a readable model.json: {describe(error)}") from error
    if not isinstance(info, dict):
        raise BadFileError(path, f"model.json must hold a JSON object, got {type(info).__name__}")
    missing = [key for key in ("spec", "masked_layers") if key not in info]
    spec = info.get("spec")
    if not missing and isinstance(spec, dict):
        missing = [f"spec.{key}" for key in ("model", "width", "in_channels", "num_classes", "image_size", "mean",
                                              "std") if key not in spec]
    elif not missing:
        missing = ["spec (an object)"]
    if missing:
        raise BadFileError(path, f"model.json lacks {missing}: it was not written by 'sparsesam train' or "
                                 f"'sparsesam prune'")
    return info


def _load_weights(model: nn.Module, path: str) -> None:
    state = read_safetensors(path)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise BadFileError(path, f"the weights do not fit the architecture model.json describes (weights of "
                                 f"another model or width?): {describe(error)}") from error


def load_model_folder(path: str) -> "tuple[nn.Module, Dict[str, Any]]":
    """The masked model of a model folder (eval mode) and its model.json; one-line BadFileError on bad files."""
    if not is_model_folder(path):
        raise ConfigError(f"{path} is not a model folder (it needs {MODEL_JSON} and {WEIGHTS}, "
                          f"as written by 'sparsesam train' or 'sparsesam prune')")
    json_path = os.path.join(path, MODEL_JSON)
    info = read_model_json(json_path)
    try:
        model = build_from_spec(info["spec"])
        if info["masked_layers"]:
            sparsify(model, include=info["masked_layers"])
    except (ValueError, TypeError, KeyError) as error:  # ConfigError included: an unknown model name
        raise BadFileError(json_path, f"its architecture cannot be built: {describe(error)}") from error
    _load_weights(model, os.path.join(path, WEIGHTS))
    if info.get("gated_layers"):
        gate_pruned_channels(model, example_input(info["spec"]), include=info["gated_layers"])
    return model.eval(), info


def load_compacted(path: str, info: Dict[str, Any]) -> Optional[nn.Module]:
    """The compacted module of a structured model folder: the plain architecture of ``info["spec"]``, its
    layers sliced to the channels ``info["compacted"]["kept"]`` names, then its safetensors weights loaded
    (nothing is unpickled)."""
    record = info.get("compacted")
    if not record:
        return None
    json_path = os.path.join(path, MODEL_JSON)
    if not isinstance(record, dict) or not isinstance(record.get("kept"), dict) or "weights" not in record:
        raise BadFileError(json_path, "its 'compacted' entry lacks the kept channels ('kept') or the weights file: "
                                      "a folder of an older version (re-export it with this version)")
    from ..algorithms._compacted import _slice
    module = build_from_spec(info["spec"])
    try:
        _slice(module, record["kept"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        raise BadFileError(json_path, f"its compacted architecture ('kept') does not fit the model: "
                                      f"{describe(error)}") from error
    _load_weights(module, os.path.join(path, record["weights"]))
    return module.eval()
