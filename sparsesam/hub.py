"""Push a model folder to the Hugging Face Hub and pull one back (``pip install 'sparsesam[hub]'``).

A model folder (:mod:`sparsesam.model_files`: ``model.json`` plus
safetensors weights) is what goes up and what comes down; nothing else::

    from sparsesam.hub import pull_model, push_model
    from sparsesam.model_files import load_model_folder

    push_model("runs/prune", "me/resnet18-adasap-90")       # token: `hf auth login` or HF_TOKEN
    model, info = load_model_folder(pull_model("me/resnet18-adasap-90"))

Only the model's own files are sent (:func:`model_folder_files`): the
config, the weights and, for structured pruning, the compacted weights. A
run's other files (its checkpoint, logs, reports) stay behind, and a folder
whose model.json names weights in any format but safetensors (a pickle:
``.pt``, ``.bin``, ...) is refused. The folder is loaded once before
anything is sent, so a truncated or foreign file is reported here, not by
whoever downloads it. Pulling asks for the same kinds of files only
(``model.json``, ``sparsity.json``, ``*.safetensors``): a pickle that
someone put into the repository is never downloaded, and loading reads
safetensors only.

Both go through huggingface_hub's own client (``HfApi.create_commit`` with
one ``CommitOperationAdd`` per file, and ``snapshot_download``), so its
login, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and cache settings apply.

Tested offline (``tests/test_hub.py``): pulling from a Hub cache laid out by
the test (huggingface_hub's documented ``models--OWNER--NAME`` layout, which
its own ``scan_cache_dir`` accepts) with ``local_files_only``, and pushing
to a recorder standing in for ``HfApi`` that checks the commit's exact
files. What that does not cover: a real upload or download (the network,
authentication, the server's answers); those are huggingface_hub's, through
the two calls above.
"""
from __future__ import annotations

import os
from typing import Any, List, Optional

from ._extras import require
from ._validate import ConfigError
from .model_files import (COMPACT_WEIGHTS, MODEL_JSON, SPARSITY_JSON, WEIGHTS, is_model_folder, load_compacted,
                          load_model_folder, read_model_json)

# The kinds of files a model folder is made of: what is pulled (a pickle in the repository is not).
PULLED_PATTERNS = [MODEL_JSON, SPARSITY_JSON, "*.safetensors"]
SAFETENSORS_SUFFIX = ".safetensors"


def _hub(purpose: str):
    return require("huggingface_hub", extra="hub", purpose=purpose)


def _check_repo_id(repo_id: Any) -> str:
    if not isinstance(repo_id, str) or not repo_id:
        raise TypeError(f"repo_id must be a non-empty string such as 'owner/name', got {repo_id!r}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"repo_id {repo_id!r} is not a Hub repository id ('owner/name'): {error}") from error
    return repo_id


def _check_optional_str(name: str, value: Any) -> Optional[str]:
    if value is not None and (not isinstance(value, str) or not value):
        raise TypeError(f"{name} must be a non-empty string or None, got {value!r}")
    return value


def model_folder_files(folder: str) -> List[str]:
    """The files of model folder ``folder`` that make the model (names relative to it, sorted).

    ``model.json`` and ``model.safetensors`` always; ``sparsity.json`` when
    present; the compacted weights that model.json names, which must be a
    safetensors file of the folder itself. The folder is loaded first (its
    masked model and compacted module, from safetensors only), so a folder
    that would not load is refused with the loader's one-line error.
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path, got {type(folder).__name__}")
    folder = os.fspath(folder)
    if not is_model_folder(folder):
        raise ConfigError(f"folder {folder} is not a model folder (it needs {MODEL_JSON} and {WEIGHTS}, as "
                          f"written by 'sparsesam train' or 'sparsesam prune')")
    info = read_model_json(os.path.join(folder, MODEL_JSON))
    files = [MODEL_JSON, WEIGHTS]
    if os.path.isfile(os.path.join(folder, SPARSITY_JSON)):
        files.append(SPARSITY_JSON)
    record = info.get("compacted")
    if record:
        weights = record.get("weights") if isinstance(record, dict) else None
        if (not isinstance(weights, str) or os.path.basename(weights) != weights
                or not weights.endswith(SAFETENSORS_SUFFIX)):
            # An older folder pickled its compacted module (model_compact.pt): it would run code when loaded.
            raise ValueError(f"folder {folder}: model.json's compacted weights {weights!r} are not a safetensors "
                             f"file of the folder (a pickle would run code when loaded; re-export the model "
                             f"with this version, which writes {COMPACT_WEIGHTS})")
        files.append(weights)
    _, info = load_model_folder(folder)
    load_compacted(folder, info)
    return sorted(files)


def push_model(folder: str, repo_id: str, *, revision: Optional[str] = None, commit_message: Optional[str] = None,
               private: Optional[bool] = None, create_repo: bool = True, token: Optional[str] = None,
               api: Any = None):
    """Upload model folder ``folder``'s model files (:func:`model_folder_files`) to Hub repository ``repo_id``.

    One commit holds exactly those files; the repository's other files are
    left as they are. Returns huggingface_hub's ``CommitInfo``.

    Args:
        folder: a model folder, as ``sparsesam train`` / ``prune`` write it.
        repo_id: ``"owner/name"`` of a model repository.
        revision: the branch to commit to (None: the default branch).
        commit_message: None: "Upload sparsesam model".
        private: visibility of a repository created here (None: the Hub's default).
        create_repo: create the repository when it does not exist (an existing one is kept).
        token: None: huggingface_hub's login (``hf auth login``, ``HF_TOKEN``).
        api: an ``huggingface_hub.HfApi`` to use (e.g. with your own endpoint); None: ``HfApi(token=token)``.
    """
    hub = _hub("pushing a model to the Hugging Face Hub")
    repo_id = _check_repo_id(repo_id)
    revision = _check_optional_str("revision", revision)
    commit_message = _check_optional_str("commit_message", commit_message)
    if private is not None and not isinstance(private, bool):
        raise TypeError(f"private must be a bool or None, got {private!r}")
    if not isinstance(create_repo, bool):
        raise TypeError(f"create_repo must be a bool, got {create_repo!r}")
    files = model_folder_files(folder)
    if api is None:
        api = hub.HfApi(token=token)
    if create_repo:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    operations = [hub.CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(os.fspath(folder), name))
                  for name in files]
    return api.create_commit(repo_id, operations=operations, commit_message=commit_message or "Upload sparsesam model",
                             repo_type="model", revision=revision)


def pull_model(repo_id: str, *, revision: Optional[str] = None, cache_dir: Optional[str] = None,
               token: Optional[str] = None, local_files_only: bool = False) -> str:
    """Download Hub repository ``repo_id``'s model folder; returns its local path (huggingface_hub's cache).

    Only ``model.json``, ``sparsity.json`` and ``*.safetensors`` are
    fetched; load the folder with
    :func:`sparsesam.model_files.load_model_folder` (safetensors only,
    nothing unpickled). ConfigError if the repository holds no model folder.

    Args:
        repo_id: ``"owner/name"`` of a model repository.
        revision: a branch, tag or commit (None: the default branch).
        cache_dir: huggingface_hub's cache (None: its default, ``HF_HUB_CACHE``).
        token: None: huggingface_hub's login.
        local_files_only: use the cache only, never the network (as ``HF_HUB_OFFLINE=1``).
    """
    hub = _hub("pulling a model from the Hugging Face Hub")
    repo_id = _check_repo_id(repo_id)
    revision = _check_optional_str("revision", revision)
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be a path or None, got {type(cache_dir).__name__}")
    if not isinstance(local_files_only, bool):
        raise TypeError(f"local_files_only must be a bool, got {local_files_only!r}")
    path = hub.snapshot_download(repo_id, repo_type="model", revision=revision, cache_dir=cache_dir, token=token,
                                 local_files_only=local_files_only, allow_patterns=PULLED_PATTERNS)
    if not is_model_folder(path):
        raise ConfigError(f"Hub repository {repo_id!r} (revision {revision or 'default'}) holds no sparsesam model "
                          f"folder: it needs {MODEL_JSON} and {WEIGHTS}")
    return path


__all__ = ["PULLED_PATTERNS", "model_folder_files", "push_model", "pull_model"]
