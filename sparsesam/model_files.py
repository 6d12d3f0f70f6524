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

Also the run files' JSON (:func:`write_json`: atomic, NaN-free; :func:`read_json`)
and the model's ``spec`` (:func:`model_spec`, :func:`build_from_spec`): the one
library module for what the package writes and reads back, which the CLI's
commands, the study (:mod:`sparsesam.study`) and the reports share.

safetensors files are written byte for byte the same by identical runs, and read with one-line errors:
``safetensors.torch.save`` lays the tensors out deterministically (by dtype
alignment, then name), but serialises the ``__metadata__`` map from a Rust
HashMap, whose order changes from one process to the next: two identical
runs wrote files that differed in the metadata's key order.
:func:`write_safetensors` therefore takes the library's bytes and rewrites
only the header, with the metadata keys sorted (compact JSON, padded with
spaces to a multiple of 8 bytes as the library pads it; the tensor offsets
are relative to the end of the header, so they stay valid), and writes the
file atomically (sparsesam._files).

Reading goes through the library too; whatever it raises on a truncated,
empty or foreign file becomes a one-line :class:`BadFileError` naming it.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
from torch import nn

from ._files import atomic_write
from ._validate import ConfigError
from .file_errors import BadFileError, describe
from .models import MODELS, build_model, is_external
from .nn import masked_layers, sparsify
from .pruning import global_sparsity
from .pruning.channel_graph import channel_gates, gate_pruned_channels


# --- JSON run files ------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """``value`` with tensors / numpy values turned into JSON numbers and lists; anything else
    (modules, callables) becomes its repr. Non-finite floats become None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist()) if value.numel() <= 4096 else f"<tensor {tuple(value.shape)}>"
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return repr(value)


def write_json(path: str, data: Any, *, sort_keys: bool = False) -> str:
    """Write ``data`` as indented JSON, atomically (sparsesam._files.atomic_write).

    sort_keys: sort every object's keys (the model files, read by programs); the reports keep the
    order the code builds them in, which is fixed, so identical runs still give identical bytes."""
    atomic_write(path, json.dumps(jsonable(data), indent=2, sort_keys=sort_keys, allow_nan=False) + "\n")
    return path


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


# --- The model's spec: what rebuilds its architecture -----------------------------------------------


def check_model_name(name: str) -> str:
    """``name`` if it is a model of the package or an existing ``torchvision:NAME`` / ``timm:NAME``."""
    if is_external(name):
        from .models.external import check_external
        try:
            return check_external(name)
        except (ValueError, ImportError) as error:  # unknown architecture, or its library not installed
            raise ConfigError(str(error)) from error
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODELS)} or torchvision:NAME / timm:NAME")
    return name


def model_spec(model: str, width: float, info) -> Dict[str, Any]:
    """Everything needed to rebuild the architecture (written next to exported weights)."""
    return {"model": model, "width": width, "dataset": info.name, "in_channels": info.in_channels,
            "num_classes": info.num_classes, "image_size": info.image_size,
            "mean": list(info.mean), "std": list(info.std)}


def build_from_spec(spec: Dict[str, Any]) -> nn.Module:
    check_model_name(spec["model"])
    try:
        return build_model(spec["model"], spec["in_channels"], spec["num_classes"], spec["width"],
                           image_size=spec["image_size"], normalization=(spec["mean"], spec["std"]))
    except ValueError as error:
        raise ConfigError(f"model {spec['model']!r}: {error}") from error


# --- safetensors: the same bytes for the same tensors ------------------------------------------------

# The 8-byte little-endian header length that starts a safetensors file, and the alignment of its data.
_LENGTH_BYTES = 8
_ALIGNMENT = 8


def _safetensors_torch():
    try:
        import safetensors.torch
    except ImportError as error:  # a declared dependency; only a broken install gets here
        raise ImportError("model folders are written and read with safetensors: pip install safetensors") from error
    return safetensors.torch


def canonical_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """The safetensors bytes of ``tensors``, with the header's metadata keys in sorted order."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError(f"metadata must map str to str, got {dict(metadata)!r}")
    data = _safetensors_torch().save(dict(tensors), metadata=None if metadata is None else dict(metadata))
    length = int.from_bytes(data[:_LENGTH_BYTES], "little")
    header = json.loads(data[_LENGTH_BYTES:_LENGTH_BYTES + length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % _ALIGNMENT)
    return len(text).to_bytes(_LENGTH_BYTES, "little") + text + data[_LENGTH_BYTES + length:]


def write_safetensors(path: str, tensors: Mapping[str, torch.Tensor],
                      metadata: Optional[Mapping[str, str]] = None) -> str:
    """Write ``tensors`` to ``path`` atomically, in the same bytes for the same tensors and metadata."""
    return atomic_write(path, canonical_safetensors(tensors, metadata))


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file (on the CPU); BadFileError if it is missing, truncated or foreign."""
    if not os.path.isfile(path):
        raise BadFileError(path, "the weights file is missing")
    if os.path.getsize(path) == 0:
        raise BadFileError(path, "the weights file is empty (0 bytes)")
    safetensors_torch = _safetensors_torch()
    from safetensors import SafetensorError
    try:
        return safetensors_torch.load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise BadFileError(path, f"not a readable safetensors file (truncated, corrupt or another format): "
                                 f"{describe(error)}") from error


# --- Model folders -----------------------------------------------------------------------------------

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
    from .algorithms._execution import dense_view
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
    from .pruning import compact_channels
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
    from .nn import export
    from .pruning.compaction import bake_gates
    plain = export(model)
    bake_gates(model, plain)  # also takes the copied gate hooks off (they point at the masked layers)
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
    from .algorithms._compacted import slice_channels
    module = build_from_spec(info["spec"])
    try:
        slice_channels(module, record["kept"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        raise BadFileError(json_path, f"its compacted architecture ('kept') does not fit the model: "
                                      f"{describe(error)}") from error
    _load_weights(module, os.path.join(path, record["weights"]))
    return module.eval()


__all__ = ["jsonable", "write_json", "read_json", "check_model_name", "model_spec", "build_from_spec",
           "canonical_safetensors", "write_safetensors", "read_safetensors",
           "WEIGHTS", "MODEL_JSON", "SPARSITY_JSON", "COMPACT_WEIGHTS", "sparsity_report", "example_input",
           "canonical_copy", "save_model_folder", "plain_model", "is_model_folder", "read_model_json",
           "load_model_folder", "load_compacted"]
