"""What every subcommand shares: config errors, the echoed config, data, models and loaders."""
from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import _validate
from .._validate import ConfigError, Range
from ..data import DATASETS, build_dataset, canonical_name, load_dataset
from ..model_files import jsonable, read_json, write_json

CONFIG_FILE = "config.json"
# Datasets whose image size is a loader option (the file-backed ones have a fixed size).
SIZED_DATASETS = ("digits", "synthetic")


def dataset_key(name: str) -> str:
    """The dataset's registry name (``imagefolder:PATH`` with PATH made absolute, so a model folder names it)."""
    try:
        return canonical_name(name)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def is_sized(dataset: str) -> bool:
    """Whether ``--image-size`` applies to ``dataset`` (a dataset key)."""
    return dataset in SIZED_DATASETS or dataset.startswith("imagefolder:")


def resolve_device(name: str) -> torch.device:
    """``--device``: "cpu", "cuda" or "cuda:N", checked against what this machine has (ConfigError if not)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {name!r}") from error
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda or cuda:N")


def check_fraction(name: str, value: float) -> float:
    problem = _validate.FRACTION.problem(value)
    if problem is not None:
        raise ConfigError(f"{name} {problem}")
    return float(value)


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


def number_problem(value: Any, allowed: Range) -> Optional[str]:
    """None when ``value`` (a number, or a list of them: non-empty, every entry) is in ``allowed``, else
    "must be ..., got ..." (without the flag's name)."""
    if not isinstance(value, (list, tuple)):
        return allowed.problem(value)
    if not value:
        return f"must list one or more numbers, each {allowed.describe()}"
    for i, entry in enumerate(value):
        problem = allowed.problem(entry)
        if problem is not None:
            return f"{problem} (entry {i + 1} of {len(value)})"
    return None


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


def check_numbers(args: argparse.Namespace, flags: Mapping[str, Range]) -> None:
    """The same ranges on a namespace built in code (not parsed): a ConfigError naming the first flag out of
    its range. ``flags``: ``{"--flag-name": Range}``; a value of None (a default left to the command) passes."""
    for flag, allowed in flags.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        problem = None if value is None else number_problem(value, allowed)
        if problem is not None:
            raise ConfigError(f"{flag} {problem}")


def prepare_out(out: str) -> str:
    """Create the output folder (an existing file of that name is a ConfigError)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} exists and is not a folder")
    os.makedirs(out, exist_ok=True)
    return out


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


def data_options(dataset: str, image_size: Optional[int]) -> Dict[str, Any]:
    if image_size is None:
        return {}
    if not is_sized(dataset):
        raise ConfigError(f"--image-size applies only to {list(SIZED_DATASETS)} and imagefolder:PATH, "
                          f"not {dataset!r}")
    return {"image_size": image_size}


def load_data(dataset: str, data_dir: Optional[str], limit: Optional[int], image_size: Optional[int] = None,
              split: Optional[str] = None):
    """``(train, test)`` of ``dataset`` (or only ``split``); a missing folder or a bad option is a ConfigError."""
    key = dataset_key(dataset)
    if data_dir is not None and key.startswith("imagefolder:"):
        raise ConfigError(f"--data-dir does not apply to {key}: the folder is part of the name")
    if data_dir is not None and not os.path.isdir(data_dir):
        raise ConfigError(f"--data-dir {data_dir} does not exist or is not a folder")
    try:
        if split is not None:
            return build_dataset(key, split, data_dir, limit=limit, **data_options(key, image_size))
        return load_dataset(key, data_dir, limit=limit, **data_options(key, image_size))
    except (FileNotFoundError, ImportError) as error:  # a missing folder, or torchvision for an image folder
        raise ConfigError(str(error)) from error
    except (ValueError, TypeError) as error:
        raise ConfigError(f"dataset {key!r}: {error}") from error


def make_loaders(train, test, batch_size: int, seed: int, eval_batch_size: int = 512
                 ) -> Tuple[DataLoader, DataLoader, torch.Generator]:
    """A shuffled training loader driven by its own generator (part of the checkpointed state) and a test loader."""
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator)
    test_loader = DataLoader(test, batch_size=eval_batch_size, shuffle=False)
    return train_loader, test_loader, generator


def seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- Execution: the form a fixed-mask model runs in (sparsesam.nn.set_execution) ---------------------------

EXECUTION_HELP = ("how masked layers run: 'auto' (each layer times dense and the sparse formats its mask "
                  "allows and keeps the fastest), 'dense', 'sparse', or a format's name ({formats})")


def execution_choices() -> Tuple[str, ...]:
    from ..nn import executions
    return executions()


def add_execution_argument(parser: argparse.ArgumentParser, default: Optional[str], what: str) -> None:
    """``--execution``: checked when the command runs (a bad value is one ConfigError line, exit 2)."""
    formats = ", ".join(c for c in execution_choices() if c not in ("auto", "dense", "sparse"))
    parser.add_argument("--execution", default=default, metavar="FORM",
                        help=f"{what}: {EXECUTION_HELP.format(formats=formats)}"
                             + (f" (default {default})" if default else ""))


def check_execution(value: Optional[str]) -> Optional[str]:
    if value is not None and value not in execution_choices():
        raise ConfigError(f"--execution must be one of {list(execution_choices())}, got {value!r}")
    return value


def example_batch(dataset, batch_size: int) -> torch.Tensor:
    """The first ``batch_size`` inputs of ``dataset``: what "auto" times the layers' forms on."""
    from ..algorithms._execution import first_inputs
    return first_inputs(dataset, batch_size)


def in_execution(model: nn.Module, execution: str, example: torch.Tensor) -> Dict[str, str]:
    """Convert ``model`` (in place) for evaluation in ``execution`` form ("auto": timed on ``example``,
    forward only, in eval mode); returns ``{layer: form}``. Layers whose channel gates read their mask
    at every forward stay dense (evaluate a structured model through its compacted form instead)."""
    from ..algorithms._execution import layer_forms, settle_execution
    settle_execution(model, execution, example, train=False)
    return layer_forms(model)
