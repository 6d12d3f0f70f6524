"""``sparsesam hub push|pull``: a model folder to / from the Hugging Face Hub (sparsesam.hub; the [hub] extra).

``push FOLDER REPO`` commits the folder's model files (config + safetensors,
nothing else) to the repository; ``pull REPO`` downloads them into
huggingface_hub's cache and prints the folder, which ``sparsesam eval`` or
``sparsesam prune --from`` take as it is::

    sparsesam hub push runs/prune me/resnet18-adasap-90
    sparsesam eval "$(sparsesam hub pull me/resnet18-adasap-90)" --out eval-out

The Hub's answers (no network, no such repository, no permission), like a
missing huggingface_hub, a bad repository id or a folder that does not
load, end the command with one line and exit status 2.
"""
from __future__ import annotations

import argparse

from ..file_errors import BadFileError
from .common import ConfigError


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def run_hub(args: argparse.Namespace) -> str:
    try:
        from .. import hub
        if args.action == "push":
            hub.push_model(args.folder, args.repo, revision=args.revision, commit_message=args.message,
                           private=True if args.private else None)
            print(f"hub: pushed the model files of {args.folder} to {args.repo}")
            return args.folder
        path = hub.pull_model(args.repo, revision=args.revision, cache_dir=args.cache_dir,
                              local_files_only=args.offline)
    except (ConfigError, BadFileError):  # main() reports them
        raise
    except (ImportError, ValueError) as error:  # no [hub] extra (the message names it), a bad repository id, ...
        raise ConfigError(str(error)) from error
    except OSError as error:  # huggingface_hub's network, repository and cache errors are OSErrors
        raise ConfigError(f"{args.repo}: {_one_line(error)}") from error
    print(path)
    return path


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser("hub", help="push / pull a model folder to / from the Hugging Face Hub ([hub] extra)")
    actions = parser.add_subparsers(dest="action", required=True)
    push = actions.add_parser("push", help="commit a model folder's config and safetensors to a Hub repository")
    push.add_argument("folder", help="a model folder written by 'sparsesam train' or 'sparsesam prune'")
    push.add_argument("repo", help="the Hub repository, owner/name (created if missing)")
    push.add_argument("--message", default=None, help="the commit message")
    push.add_argument("--private", action="store_true", help="create the repository private")
    pull = actions.add_parser("pull", help="download a Hub repository's model folder; prints its local path")
    pull.add_argument("repo", help="the Hub repository, owner/name")
    pull.add_argument("--cache-dir", default=None, help="huggingface_hub's cache (default: HF_HUB_CACHE)")
    pull.add_argument("--offline", action="store_true", help="use the cache only (as HF_HUB_OFFLINE=1)")
    for action in (push, pull):
        action.add_argument("--revision", default=None, help="branch (push) or branch, tag or commit (pull)")
    parser.set_defaults(func=run_hub)
    return parser
