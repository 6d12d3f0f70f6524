"""Model folders: safetensors + JSON written by the CLI load back into the same function."""
from __future__ import annotations

import json

import pytest
import torch

from sparsesam.model_files import model_spec
from sparsesam.model_files import (canonical_copy, load_compacted, load_model_folder, plain_model,
                                       save_model_folder)
from sparsesam.data import load_digits
from sparsesam.models import build_model
from sparsesam.nn import masked_layers, sparsify
from sparsesam.pruning import magnitude_prune

INFO = load_digits(False, image_size=8, limit=4).info
SPEC = model_spec("smallcnn", 0.25, INFO)


def _model(mask_mode="fixed"):
    model = build_model("smallcnn", 1, 10, 0.25, image_size=8, normalization=INFO.normalization)
    sparsify(model, mask_mode=mask_mode)
    return model


def _x():
    return torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _train_steps(model, steps=3):
    # Non-trivial BatchNorm statistics and weights.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        x = torch.rand(16, 1, 8, 8)
        torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (16,))).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_round_trip_masks_and_sparsity_json(tmp_path):
    model = _model()
    magnitude_prune(model, 0.8)
    model = _train_steps(model)
    save_model_folder(model, SPEC, tmp_path)
    loaded, info = load_model_folder(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(_x()), model(_x()))
    for (name, a), (_, b) in zip(masked_layers(model), masked_layers(loaded)):
        assert torch.equal(a.weight_mask, b.weight_mask) and b.weight_mask.dtype == torch.bool, name
    sparsity = json.loads((tmp_path / "sparsity.json").read_text())
    assert sparsity["layers"] == {name: layer.sparsity for name, layer in masked_layers(loaded)}
    assert sparsity["global"] == pytest.approx(0.8, abs=1e-3) == info["sparsity"]
    kept = sum(int(layer.weight_mask.sum()) for _, layer in masked_layers(loaded))
    assert sparsity["kept_weights"] == kept


def test_safetensors_file_is_the_state_dict(tmp_path):
    from safetensors.torch import load_file
    model = _train_steps(_model())
    save_model_folder(model, SPEC, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    state = model.state_dict()
    assert sorted(tensors) == sorted(state)
    for key, value in state.items():
        assert torch.equal(tensors[key], value), key


def test_soft_mask_is_baked_so_outputs_stay(tmp_path):
    model = _model("trainable")
    with torch.no_grad():
        for _, layer in masked_layers(model):
            soft = torch.rand(layer.weight.shape)
            soft[soft < 0.3] = 0
            layer.weight_mask.copy_(soft)
    model.eval()
    save_model_folder(model, SPEC, tmp_path)
    loaded, _ = load_model_folder(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), model(_x()))
    for (_, a), (_, b) in zip(masked_layers(model), masked_layers(loaded)):
        assert torch.equal(b.weight_mask, a.weight_mask != 0)


def test_extra_state_of_an_algorithm_is_left_out(tmp_path):
    model = _model()
    model.register_buffer("scores", torch.ones(3))  # e.g. an algorithm's score tensor
    model.eval()
    save_model_folder(model, SPEC, tmp_path)
    loaded, _ = load_model_folder(tmp_path)
    assert "scores" not in loaded.state_dict()


def test_gated_structured_model_and_compacted_copy(tmp_path):
    pytest.importorskip("torch_pruning")
    from sparsesam.pruning import channel_prune, compact_channels, gate_pruned_channels
    model = _train_steps(_model())
    channel_prune(model, 0.5)
    gate_pruned_channels(model, _x())
    compacted, _ = compact_channels(model, _x())
    save_model_folder(model, SPEC, tmp_path, compacted=compacted)
    loaded, info = load_model_folder(tmp_path)
    assert info["gated_layers"]
    small = load_compacted(tmp_path, info)
    with torch.no_grad():
        reference = model(_x())
        assert torch.equal(loaded(_x()), reference)
        torch.testing.assert_close(small(_x()), reference)
        torch.testing.assert_close(plain_model(model).eval()(_x()), reference)
    assert sum(p.numel() for p in small.parameters()) == info["compacted"]["parameters"]
    assert info["compacted"]["parameters"] < sum(p.numel() for p in plain_model(model).parameters())


def test_mismatched_architecture_is_refused():
    model = build_model("smallcnn", 1, 10, 0.5, image_size=8, normalization=INFO.normalization)
    with pytest.raises(ValueError, match="differs from the architecture"):
        canonical_copy(model, SPEC)
