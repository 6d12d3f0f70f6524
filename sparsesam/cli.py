"""The ``sparsesam`` command: train / prune / eval / report / demo / reproduce / hub.

Every run writes its settings to ``config.json`` in its output folder and
shows tqdm progress bars on stderr. A bad setting (unknown model, dataset or
algorithm, a sparsity outside [0, 1), a NaN or infinite number, a missing
data folder, ...) ends the run with one line on stderr naming the flag and
exit status 2, as argparse does for malformed arguments; numeric flags are
checked as they are parsed (commands.common.add_number), before anything
runs. So does a file the run reads that is empty, truncated or foreign
(sparsesam.file_errors.BadFileError: checkpoints, data files). Training that
diverges (a NaN or inf loss, weight or BatchNorm statistic:
sparsesam.divergence.TrainingDiverged) ends with one line naming the epoch
and the step, exit status 3, and no exported model.

``train`` and ``prune`` also run under ``torchrun`` (``python -m sparsesam``
on every rank; see sparsesam.distributed and the README); the other
commands refuse to.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .commands import demo, evaluate, hub, prune, report, reproduce, train
from .commands.common import ConfigError, FlagError
from .distributed import launched_world_size
from .divergence import TrainingDiverged
from .file_errors import BadFileError

# The commands that run under torchrun (one process per rank, rank 0 writing): sparsesam.distributed.
DATA_PARALLEL_COMMANDS = ("train", "prune")
BAD_INPUT = 2  # a bad setting or file: nothing was run (or nothing was exported)
DIVERGED = 3   # the settings were valid but training turned NaN / inf: nothing was exported


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsesam", description="Robust sparse training for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (train, prune, evaluate, report, demo, reproduce, hub):
        module.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except FlagError as error:  # a number outside its flag's range
        print(f"{error.prog}: error: {error}", file=sys.stderr)
        return BAD_INPUT
    args._argv = list(sys.argv[1:] if argv is None else argv)  # the exact command, for reports (not a setting)
    try:
        if args.command not in DATA_PARALLEL_COMMANDS and launched_world_size() > 1:
            # Each rank would run the whole command and write the same files at the same time.
            raise ConfigError(f"sparsesam {args.command} runs in one process: start it without torchrun "
                              f"(only {' and '.join(DATA_PARALLEL_COMMANDS)} run under torchrun)")
        args.func(args)
    except (ConfigError, BadFileError) as error:  # a bad setting, or a file that is truncated or foreign
        print(f"sparsesam {args.command}: error: {error}", file=sys.stderr)
        return BAD_INPUT
    except TrainingDiverged as error:
        print(f"sparsesam {args.command}: error: {error}", file=sys.stderr)
        return DIVERGED
    return 0


if __name__ == "__main__":
    sys.exit(main())
