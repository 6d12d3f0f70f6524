"""The ``sparsesam`` command: train / prune / eval / report / demo / reproduce.

Every run writes its settings to ``config.json`` in its output folder and
shows tqdm progress bars on stderr. A bad setting (unknown model, dataset or
algorithm, a sparsity outside [0, 1), a missing data folder, ...) ends the
run with one line on stderr and exit status 2, as argparse does for
malformed arguments; so does a file the run reads that is empty, truncated
or foreign (sparsesam.file_errors.BadFileError: checkpoints, data files).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .commands import demo, evaluate, prune, report, reproduce, train
from .commands.common import ConfigError
from .file_errors import BadFileError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsesam", description="Robust sparse training for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (train, prune, evaluate, report, demo, reproduce):
        module.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # the exact command, for reports (not a setting)
    try:
        args.func(args)
    except (ConfigError, BadFileError) as error:  # a bad setting, or a file that is truncated or foreign
        print(f"sparsesam {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
