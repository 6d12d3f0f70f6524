"""sparsesam.hub offline: push to a recorder standing in for huggingface_hub.HfApi (the commit's exact files),
pull from a Hub cache laid out here in huggingface_hub's documented layout, with the network disabled.

What these tests do not cover: a real upload or download (network, authentication, the server). The push
goes through HfApi.create_commit and the pull through snapshot_download, huggingface_hub's own calls."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import pytest
import torch

pytest.importorskip("huggingface_hub")
import huggingface_hub  # noqa: E402
from huggingface_hub import constants as hub_constants  # noqa: E402
from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: E402
from huggingface_hub.utils import filter_repo_objects  # noqa: E402

from sparsesam.data import load_digits  # noqa: E402
from sparsesam.file_errors import BadFileError  # noqa: E402
from sparsesam.hub import PULLED_PATTERNS, model_folder_files, pull_model, push_model  # noqa: E402
from sparsesam.model_files import (build_from_spec, load_compacted, load_model_folder, model_spec,  # noqa: E402
                                   save_model_folder)
from sparsesam.nn import sparsify  # noqa: E402
from sparsesam.pruning import magnitude_prune  # noqa: E402
from sparsesam._validate import ConfigError  # noqa: E402

INFO = load_digits(False, image_size=8, limit=4).info
SPEC = model_spec("smallcnn", 0.25, INFO)
REPO = "someone/smallcnn-sparse"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # As HF_HUB_OFFLINE=1 (read once at import, so set on the module): any HTTP request raises.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def _x():
    return torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def _masked_model():
    torch.manual_seed(0)
    model = build_from_spec(SPEC)
    sparsify(model)
    with torch.no_grad():  # non-trivial BatchNorm statistics and weights, then 80% pruned
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    magnitude_prune(model, 0.8)
    return model.eval()


def _run_folder(tmp_path, compacted=False):
    """A run's folder: the model files plus what a run leaves beside them, pickles included."""
    model = _masked_model()
    small = None
    if compacted:
        pytest.importorskip("torch_pruning")
        from sparsesam.pruning import channel_prune, compact_channels, gate_pruned_channels
        channel_prune(model, 0.5)
        gate_pruned_channels(model, _x())
        small, _ = compact_channels(model.eval(), _x())
    folder = tmp_path / "run"
    save_model_folder(model, SPEC, str(folder), compacted=small)
    torch.save({"model": model.state_dict()}, folder / "checkpoint.pt")
    torch.save(model, folder / "model_compact.pt")  # a pickled module, as an older version wrote
    (folder / "config.json").write_text("{}")
    return model, str(folder)


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records the calls push_model makes, sends nothing."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_commit(self, repo_id, *, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, kwargs))
        self.operations = operations
        return "commit-info"

    def committed_files(self):
        """{path in the repository: bytes} of the recorded commit."""
        files = {}
        for op in self.operations:
            assert isinstance(op, huggingface_hub.CommitOperationAdd)
            with open(op.path_or_fileobj, "rb") as f:
                files[op.path_in_repo] = f.read()
        return files


def _hub_cache(cache_dir, repo_id, files, commit=COMMIT, refs=("main",)):
    """Lay ``files`` ({name: bytes}) out as huggingface_hub caches a downloaded snapshot:
    models--OWNER--NAME/{blobs/<sha256>, snapshots/<commit>/<name> -> ../../blobs/<sha256>, refs/<branch>}."""
    root = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(root, "snapshots", commit)
    os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        with open(os.path.join(root, "blobs", blob), "wb") as f:
            f.write(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snapshot, name))
    for ref in refs:
        with open(os.path.join(root, "refs", ref), "w") as f:
            f.write(commit)
    return snapshot


# --- push -----------------------------------------------------------------------------------------------------

def test_push_commits_exactly_the_model_files(tmp_path):
    _, folder = _run_folder(tmp_path)
    api = RecordingApi()
    assert push_model(folder, REPO, revision="dev", private=True, api=api) == "commit-info"
    assert [call[0] for call in api.calls] == ["create_repo", "create_commit"]
    assert api.calls[0][2] == {"repo_type": "model", "private": True, "exist_ok": True}
    assert api.calls[1][2] == {"commit_message": "Upload sparsesam model", "repo_type": "model", "revision": "dev"}
    files = api.committed_files()
    # The run's checkpoint, its settings and the old pickled module stay behind.
    assert sorted(files) == ["model.json", "model.safetensors", "sparsity.json"]
    for name, data in files.items():
        assert data == (tmp_path / "run" / name).read_bytes(), name


def test_push_of_a_structured_model_includes_its_compacted_weights(tmp_path):
    _, folder = _run_folder(tmp_path, compacted=True)
    api = RecordingApi()
    push_model(folder, REPO, create_repo=False, commit_message="v1", api=api)
    assert [call[0] for call in api.calls] == ["create_commit"]
    assert api.calls[0][2]["commit_message"] == "v1"
    assert sorted(api.committed_files()) == ["model.json", "model.safetensors", "model_compact.safetensors",
                                             "sparsity.json"]


@pytest.mark.parametrize("weights", ["model_compact.pt", "pytorch_model.bin", "../elsewhere.safetensors", None])
def test_push_refuses_compacted_weights_that_are_not_safetensors_of_the_folder(tmp_path, weights):
    _, folder = _run_folder(tmp_path)
    path = os.path.join(folder, "model.json")
    with open(path) as f:
        info = json.load(f)
    info["compacted"] = {"weights": weights, "kept": {}, "parameters": 1}
    with open(path, "w") as f:
        json.dump(info, f)
    api = RecordingApi()
    with pytest.raises(ValueError, match="not a safetensors file of the folder .*pickle"):
        push_model(folder, REPO, api=api)
    assert api.calls == []


def test_push_refuses_a_folder_that_does_not_load(tmp_path):
    _, folder = _run_folder(tmp_path)
    api = RecordingApi()
    with open(os.path.join(folder, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(BadFileError, match="model.safetensors"):
        push_model(folder, REPO, api=api)
    with pytest.raises(ConfigError, match="not a model folder"):
        push_model(str(tmp_path), REPO, api=api)
    assert api.calls == []


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(repo_id=""), TypeError, "repo_id"),
    (dict(repo_id=7), TypeError, "repo_id"),
    (dict(repo_id="a/b/c"), ValueError, "repo_id"),
    (dict(repo_id="owner/na me"), ValueError, "repo_id"),
    (dict(private="yes"), TypeError, "private"),
    (dict(revision=""), TypeError, "revision"),
    (dict(create_repo=None), TypeError, "create_repo"),
])
def test_push_bad_arguments(tmp_path, kwargs, error, match):
    api = RecordingApi()
    arguments = {"repo_id": REPO, "api": api, **kwargs}
    with pytest.raises(error, match=match):
        push_model(str(tmp_path), arguments.pop("repo_id"), **arguments)
    assert api.calls == []


# --- pull -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compacted", [False, True], ids=["masked", "structured"])
@pytest.mark.parametrize("revision", [None, "v1", COMMIT], ids=["default-branch", "tag", "commit"])
def test_what_push_sends_pulls_back_offline_and_computes_the_same_logits(tmp_path, revision, compacted):
    model, folder = _run_folder(tmp_path, compacted=compacted)
    api = RecordingApi()
    push_model(folder, REPO, api=api)
    files = api.committed_files()
    # Someone also put a pickle into the repository; loading never reads it.
    files["checkpoint.pt"] = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    cache = str(tmp_path / "hub-cache")
    snapshot = _hub_cache(cache, REPO, files, refs=("main", "v1"))
    # huggingface_hub's own cache scanner accepts the layout.
    (repo,) = huggingface_hub.scan_cache_dir(cache).repos
    (cached,) = repo.revisions
    assert repo.repo_id == REPO and cached.commit_hash == COMMIT and set(cached.refs) == {"main", "v1"}
    assert {f.file_name for f in cached.files} == set(files)

    path = pull_model(REPO, revision=revision, cache_dir=cache)
    assert os.path.samefile(path, snapshot)
    loaded, info = load_model_folder(path)
    with torch.no_grad():
        assert torch.equal(loaded(_x()), model(_x()))
        if compacted:
            torch.testing.assert_close(load_compacted(path, info)(_x()), model(_x()))


def test_pull_asks_only_for_model_files():
    # snapshot_download filters the repository's files with this huggingface_hub function and these patterns.
    repository = ["model.json", "model.safetensors", "sparsity.json", "model_compact.safetensors", "checkpoint.pt",
                  "pytorch_model.bin", "model_compact.pt", "weights.pkl", "README.md", "config.json"]
    assert sorted(filter_repo_objects(repository, allow_patterns=PULLED_PATTERNS)) == [
        "model.json", "model.safetensors", "model_compact.safetensors", "sparsity.json"]


def test_pull_of_a_repository_without_a_model_folder_is_a_config_error(tmp_path):
    cache = str(tmp_path / "hub-cache")
    _hub_cache(cache, REPO, {"pytorch_model.bin": b"not for us", "README.md": b"# a model"})
    with pytest.raises(ConfigError, match="holds no sparsesam model folder"):
        pull_model(REPO, cache_dir=cache, local_files_only=True)


def test_pull_offline_of_an_uncached_repository_is_huggingface_hubs_error(tmp_path):
    with pytest.raises(LocalEntryNotFoundError):
        pull_model(REPO, cache_dir=str(tmp_path))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(repo_id=None), TypeError, "repo_id"),
    (dict(repo_id="a/b/c"), ValueError, "repo_id"),
    (dict(revision=3), TypeError, "revision"),
    (dict(cache_dir=3), TypeError, "cache_dir"),
    (dict(local_files_only="yes"), TypeError, "local_files_only"),
])
def test_pull_bad_arguments(kwargs, error, match):
    arguments = {"repo_id": REPO, **kwargs}
    with pytest.raises(error, match=match):
        pull_model(arguments.pop("repo_id"), **arguments)


# --- the extra ------------------------------------------------------------------------------------------------

def test_model_folder_files_lists_the_model_only(tmp_path):
    _, folder = _run_folder(tmp_path)
    assert model_folder_files(folder) == ["model.json", "model.safetensors", "sparsity.json"]
    os.remove(os.path.join(folder, "sparsity.json"))  # optional
    assert model_folder_files(folder) == ["model.json", "model.safetensors"]


@pytest.mark.parametrize("call", [lambda: push_model("folder", REPO), lambda: pull_model(REPO)], ids=["push", "pull"])
def test_without_huggingface_hub_the_error_names_the_extra(monkeypatch, call):
    for loaded in [m for m in sys.modules if m == "huggingface_hub" or m.startswith("huggingface_hub.")]:
        monkeypatch.setitem(sys.modules, loaded, None)
    with pytest.raises(ImportError, match=r"pip install 'sparsesam\[hub\]'"):
        call()


# --- the command ----------------------------------------------------------------------------------------------

def test_cli_push_then_pull_offline_prints_a_folder_eval_reads(tmp_path, monkeypatch, capsys):
    from cli_helpers import run
    model, folder = _run_folder(tmp_path)
    api = RecordingApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api)
    assert run(["hub", "push", folder, REPO, "--private", "--message", "first", "--revision", "dev"]) == 0
    assert api.calls[0][2]["private"] is True and api.calls[1][2]["commit_message"] == "first"
    assert api.calls[1][2]["revision"] == "dev"
    files = api.committed_files()
    assert sorted(files) == ["model.json", "model.safetensors", "sparsity.json"]
    capsys.readouterr()

    cache = str(tmp_path / "hub-cache")
    snapshot = _hub_cache(cache, REPO, files)
    assert run(["hub", "pull", REPO, "--cache-dir", cache, "--offline"]) == 0
    printed = capsys.readouterr().out.strip()
    assert os.path.samefile(printed, snapshot)
    loaded, _ = load_model_folder(printed)
    with torch.no_grad():
        assert torch.equal(loaded(_x()), model(_x()))


def test_cli_hub_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from cli_helpers import run
    assert run(["hub", "pull", REPO, "--cache-dir", tmp_path, "--offline"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sparsesam hub: error: {REPO}: ") and "\n" not in err, err
    assert run(["hub", "push", tmp_path, REPO]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparsesam hub: error: folder ") and "not a model folder" in err and "\n" not in err, err
    assert run(["hub", "pull", "a/b/c", "--offline"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparsesam hub: error: repo_id 'a/b/c' is not a Hub repository id") and "\n" not in err, err
    for loaded in [m for m in sys.modules if m == "huggingface_hub" or m.startswith("huggingface_hub.")]:
        monkeypatch.setitem(sys.modules, loaded, None)
    assert run(["hub", "pull", REPO]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'sparsesam[hub]'" in err and "\n" not in err, err
