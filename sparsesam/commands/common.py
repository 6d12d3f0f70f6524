"""What the subcommands' parsers share: the numeric flags and their argparse types, the echoed config,
--device and --execution. What a run does with its settings (data, loaders, seeds, checks) is the
library's: sparsesam.run_setup."""
from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Any, Dict, List, Optional

import torch

from .. import _validate
from .._validate import ConfigError, Range, number_problem
from ..model_files import jsonable, read_json, write_json
from ..run_setup import execution_choices

CONFIG_FILE = "config.json"


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda or cuda:N")


# --- Numeric flags: every float finite and in its range (sparsesam._validate), refused with one line -------


class FlagError(ConfigError):
    """A flag's value outside its range, found while the command line is parsed (``prog``: the subcommand's
    "sparsesam train"); the CLI prints it on one line and exits with status 2, before anything runs."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


def float_list(text: str) -> List[float]:
    """An argparse type: comma-separated numbers (their range is the flag's action's to check)."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def finite_float_list(text: str) -> List[float]:
    """An argparse type: comma-separated finite numbers (for flags declared without a range; flags with a
    range are add_number flags, which also check it)."""
    values = float_list(text)
    problem = number_problem(values, _validate.FINITE)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return values


def int_list(text: str) -> List[int]:
    """An argparse type: comma-separated integers."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def name_list(text: str) -> List[str]:
    """An argparse type: comma-separated names (blanks dropped)."""
    return [v.strip() for v in text.split(",") if v.strip()]


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


class NumberFlag(argparse.Action):
    """Stores a flag's number (or list of numbers) once it is in ``allowed``; otherwise a FlagError naming
    the flag ends the parse (argparse's own error would print the whole usage before its message)."""

    def __init__(self, option_strings, dest, *, allowed: Range, **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.allowed = allowed

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        problem = number_problem(values, self.allowed)
        if problem is not None:
            raise FlagError(parser.prog, f"{option_string} {problem}")
        setattr(namespace, self.dest, values)


def add_number(container, flag: str, allowed: Range, *, many: bool = False, help: Optional[str] = None,
               **kwargs) -> argparse.Action:
    """``container.add_argument(flag)`` for a float (``many``: comma-separated floats) that must be in
    ``allowed``; the range is added to the help."""
    text = f"comma-separated, each {allowed.describe()}" if many else allowed.describe()
    return container.add_argument(flag, type=float_list if many else float, action=NumberFlag, allowed=allowed,
                                  help=f"{help}; {text}" if help else text, **kwargs)


def echo_config(args: argparse.Namespace, out: str, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write the run's settings to ``out/config.json`` (and return them)."""
    config = {k: v for k, v in vars(args).items() if k != "func" and not k.startswith("_")}
    config.update(extra or {})
    path = os.path.join(out, CONFIG_FILE)
    if getattr(args, "resume", False) and os.path.isfile(path):
        # Resuming with other settings would silently mix two runs.
        before = read_json(path)
        # The device may change: a run interrupted on one GPU resumes on another, or on the CPU.
        ignored = {"resume", "progress", "environment", "device"}
        changed = sorted(k for k in set(before) | set(config) - ignored
                         if k not in ignored and jsonable(before.get(k)) != jsonable(config.get(k)))
        if changed:
            raise ConfigError(f"--resume with settings that differ from the interrupted run in {out}: "
                              + ", ".join(f"{k} ({before.get(k)!r} -> {config.get(k)!r})" for k in changed))
    from .. import __version__
    config["environment"] = {"sparsesam": __version__, "torch": torch.__version__, "python": platform.python_version(),
                             "threads": torch.get_num_threads(), "argv": sys.argv[1:]}
    write_json(path, config)
    return config


# --- Execution: the form a fixed-mask model runs in (sparsesam.nn.set_execution) ---------------------------

EXECUTION_HELP = ("how masked layers run: 'auto' (each layer times dense and the sparse formats its mask "
                  "allows and keeps the fastest), 'dense', 'sparse', or a format's name ({formats})")


def add_execution_argument(parser: argparse.ArgumentParser, default: Optional[str], what: str) -> None:
    """``--execution``: checked when the command runs (a bad value is one ConfigError line, exit 2)."""
    formats = ", ".join(c for c in execution_choices() if c not in ("auto", "dense", "sparse"))
    parser.add_argument("--execution", default=default, metavar="FORM",
                        help=f"{what}: {EXECUTION_HELP.format(formats=formats)}"
                             + (f" (default {default})" if default else ""))
