"""Model files: config + safetensors only, byte-identical for identical inputs, loadable by the plain architecture,
never unpickled, and a bad file is a one-line error."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from sparsesam.model_files import build_from_spec, model_spec
from sparsesam.model_files import load_compacted, load_model_folder, save_model_folder
from sparsesam.model_files import canonical_safetensors, read_safetensors, write_safetensors
from sparsesam.data import load_digits
from sparsesam.file_errors import BadFileError
from sparsesam.nn import masked_layers, sparsify
from sparsesam.pruning import magnitude_prune

from cli_helpers import DATA, run, train_argv

ROOT = Path(__file__).resolve().parents[1]
INFO = load_digits(False, image_size=8, limit=4).info
SPEC = model_spec("smallcnn", 0.25, INFO)


def _x():
    return torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def _trained(model, steps=3):
    # Non-trivial weights and BatchNorm statistics, so that a dense / sparse mix-up changes the logits.
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        x = torch.rand(16, 1, 8, 8)
        torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (16,))).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _header(data: bytes) -> str:
    return data[8:8 + int.from_bytes(data[:8], "little")].decode()


# --- safetensors bytes -------------------------------------------------------------------------------------

def test_safetensors_metadata_is_written_in_sorted_order():
    tensors = {"b.weight": torch.arange(6.0).view(2, 3), "a.mask": torch.tensor([True, False])}
    metadata = {key: str(i) for i, key in enumerate(["zeta", "format", "model", "alpha", "mid", "beta"])}
    files = {canonical_safetensors(tensors, metadata) for _ in range(20)}
    # The library's own map order changes from one call to the next (a Rust HashMap); ours never does.
    assert len(files) == 1
    data = files.pop()
    header = _header(data)
    assert re.search(r'"__metadata__":\{"alpha":"3","beta":"5","format":"1","mid":"4","model":"2","zeta":"0"\}',
                     header), header
    assert (8 + len(header)) % 8 == 0


def test_canonical_safetensors_loads_back_with_the_library(tmp_path):
    from safetensors import safe_open
    tensors = {"w": torch.randn(3, 4), "i": torch.arange(5), "m": torch.tensor([True, False, True])}
    path = write_safetensors(str(tmp_path / "t.safetensors"), tensors, {"format": "pt", "k": "v"})
    loaded = read_safetensors(path)
    assert sorted(loaded) == sorted(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}
    assert os.listdir(tmp_path) == ["t.safetensors"]  # written through a temporary file, now gone


# --- the stored weights are the sparse function ---------------------------------------------------------------

def _pruned_masked_model():
    model = build_from_spec(SPEC)
    sparsify(model)
    _trained(model)
    magnitude_prune(model, 0.8)
    return _trained(model.train())


def test_masked_file_loaded_by_the_plain_architecture_gives_the_sparse_logits(tmp_path):
    model = _pruned_masked_model()
    save_model_folder(model, SPEC, tmp_path)
    tensors = read_safetensors(str(tmp_path / "model.safetensors"))
    for name, layer in masked_layers(model):  # the stored weight is W*M, pruned entries exactly 0
        assert torch.equal(tensors[f"{name}.weight"], layer.weight.detach() * layer.weight_mask), name
    plain = build_from_spec(SPEC).eval()  # our model class without masks
    result = plain.load_state_dict(tensors, strict=False)
    assert not result.missing_keys and result.unexpected_keys
    assert all(key.endswith(".weight_mask") for key in result.unexpected_keys)
    with torch.no_grad():
        reference = model(_x())
        assert torch.equal(plain(_x()), reference)
        loaded, _ = load_model_folder(tmp_path)
        assert torch.equal(loaded(_x()), reference)
        # What the issue saw: the unmasked weights would give the dense model's (different) logits.
        dense = build_from_spec(SPEC).eval()
        dense.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("weight_mask")})
        assert not torch.allclose(dense(_x()), reference, atol=1e-3)


def test_channel_gated_file_loaded_by_the_plain_architecture_gives_the_gated_logits(tmp_path):
    pytest.importorskip("torch_pruning")
    from sparsesam.pruning import channel_prune, compact_channels, gate_pruned_channels
    model = build_from_spec(SPEC)
    sparsify(model)
    _trained(model)
    channel_prune(model, 0.5)
    gate_pruned_channels(model, _x())
    model.eval()
    compacted, _ = compact_channels(model, _x())
    save_model_folder(model, SPEC, tmp_path, compacted=compacted)
    assert not any(name.endswith(".pt") for name in os.listdir(tmp_path))  # nothing pickled
    plain = build_from_spec(SPEC).eval()
    plain.load_state_dict(read_safetensors(str(tmp_path / "model.safetensors")), strict=False)
    loaded, info = load_model_folder(tmp_path)
    small = load_compacted(str(tmp_path), info)
    with torch.no_grad():
        reference = model(_x())
        # BatchNorm's beta of a gated channel is stored as 0, so the plain model's pruned channels are zero too.
        assert torch.equal(plain(_x()), reference)
        assert torch.equal(loaded(_x()), reference)
        torch.testing.assert_close(small(_x()), reference)
    assert sum(p.numel() for p in small.parameters()) == info["compacted"]["parameters"] < sum(
        p.numel() for p in plain.parameters())


def test_dense_file_loads_into_a_masked_model(tmp_path):
    dense = _trained(build_from_spec(SPEC).train())
    save_model_folder(dense, SPEC, tmp_path)
    tensors = read_safetensors(str(tmp_path / "model.safetensors"))
    assert not any(key.endswith("weight_mask") for key in tensors)
    masked = build_from_spec(SPEC)
    sparsify(masked)
    masked.load_state_dict(tensors, strict=True)  # a dense checkpoint keeps the layers' masks (all ones)
    masked.eval()
    with torch.no_grad():
        assert torch.equal(masked(_x()), dense(_x()))
    # With masks set before loading, the dense weights are loaded under them: the masked function W*M.
    pruned = build_from_spec(SPEC)
    sparsify(pruned)
    magnitude_prune(pruned, 0.7)
    masks = {name: layer.weight_mask.clone() for name, layer in masked_layers(pruned)}
    pruned.load_state_dict(tensors, strict=True)
    for name, layer in masked_layers(pruned):
        assert torch.equal(layer.weight_mask, masks[name])
        assert torch.equal(layer.effective_weight(), tensors[f"{name}.weight"] * masks[name])


# --- nothing is unpickled ---------------------------------------------------------------------------------------

UNSAFE = [
    (re.compile(r"weights_only\s*=\s*False"), "torch.load(weights_only=False) unpickles code"),
    (re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"\bpickle\.loads?\("), "a bare pickle load"),
    (re.compile(r"\bnp\.load\([^)]*allow_pickle\s*=\s*True"), "numpy load with allow_pickle=True"),
    (re.compile(r"\bpickle\.Unpickler\b"), "an unpickler"),
]
# The one unpickler the package has: CIFAR-10 batches are pickles, read by an Unpickler whose find_class
# accepts only numpy's array globals (tests/data/test_datasets.py::test_cifar10_refuses_pickles_that_run_code).
ALLOWED = {("sparsesam/data/cifar10.py", "an unpickler")}


def test_the_package_never_unpickles_code():
    found, allowed_seen = [], set()
    for path in sorted((ROOT / "sparsesam").rglob("*.py")) + sorted((ROOT / "triton_kernels").rglob("*.py")):
        text = path.read_text()
        relative = path.relative_to(ROOT).as_posix()
        for pattern, what in UNSAFE:
            for match in pattern.finditer(text):
                if (relative, what) in ALLOWED:
                    allowed_seen.add((relative, what))
                else:
                    line = text.count("\n", 0, match.start()) + 1
                    found.append(f"{relative}:{line}: {what}")
    assert not found, "\n".join(found)
    assert allowed_seen == ALLOWED  # an allowance that no longer matches anything is removed
    # The checker itself sees the forms it forbids (so an empty result means something).
    sample = "m = torch.load(f, weights_only=False)\nx = torch.load(p)\npickle.loads(b)\nclass U(pickle.Unpickler):\n"
    assert sum(len(pattern.findall(sample)) for pattern, _ in UNSAFE) == 5


# --- bad model folders: one line, exit 2 ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("files") / "model"
    assert run(train_argv(out, 1)) == 0
    return out


def _copy(folder, tmp_path):
    import shutil
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def _safetensors_of_another_width():
    other = build_from_spec(model_spec("smallcnn", 0.5, INFO))
    return canonical_safetensors({k: v.contiguous() for k, v in other.state_dict().items()}, {"format": "pt"})


@pytest.mark.parametrize("name,content,expected", [
    ("model.safetensors", b"", "empty"),
    ("model.safetensors", "truncate", "not a readable safetensors file"),
    ("model.safetensors", os.urandom(256), "not a readable safetensors file"),
    ("model.safetensors", "other width", "do not fit the architecture"),
    ("model.json", b'{"spec": {"model": "smallcnn"', "not a readable model.json"),
    ("model.json", b"\xff\xfe\x00binary", "not a readable model.json"),
    ("model.json", b'["a list"]', "must hold a JSON object"),
    ("model.json", b'{"masked_layers": []}', "lacks ['spec']"),
    ("model.json", "unknown model", "cannot be built"),
], ids=["empty", "truncated", "random", "other-width", "cut-json", "binary-json", "list-json", "no-spec",
        "unknown-model"])
def test_bad_model_folder_files_are_one_line_errors(model_folder, tmp_path, capsys, name, content, expected):
    folder = _copy(model_folder, tmp_path)
    path = folder / name
    if content == "truncate":
        content = path.read_bytes()[: path.stat().st_size // 2]
    elif content == "other width":
        content = _safetensors_of_another_width()
    elif content == "unknown model":
        info = json.loads(path.read_text())
        info["spec"]["model"] = "no_such_net"
        content = json.dumps(info).encode()
    path.write_bytes(content)
    with pytest.raises(BadFileError, match=re.escape(expected)) as error:
        load_model_folder(str(folder))
    assert error.value.path == str(path) and "\n" not in str(error.value)
    capsys.readouterr()
    assert run(["eval", folder, "--limit", "8", "--no-progress", "--out", tmp_path / "eval", "--no-pgd",
                "--no-smoothing", "--no-cc-cert", "--no-corruptions"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and expected in err[0], err


def test_prune_from_a_truncated_model_is_exit_2(model_folder, tmp_path, capsys):
    folder = _copy(model_folder, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert run(["prune", "--algorithm", "magnitude", "--from", folder, *DATA, "--out", tmp_path / "p"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(weights) in err[0], err


def test_a_compacted_entry_of_an_older_version_is_named(tmp_path):
    pytest.importorskip("torch_pruning")
    model = build_from_spec(SPEC)
    sparsify(model)
    save_model_folder(model, SPEC, tmp_path)
    info = json.loads((tmp_path / "model.json").read_text())
    info["compacted"] = {"weights": "model_compact.safetensors", "module": "model_compact.pt", "parameters": 1}
    with pytest.raises(BadFileError, match="older version"):
        load_compacted(str(tmp_path), info)
