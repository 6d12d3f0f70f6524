"""What every run shares, whoever starts it (a CLI command or the study): data, loaders, seeds, devices,
the output folder, checked settings and the form masked layers run in.

A bad setting is a :class:`~sparsesam._validate.ConfigError` whose message
names the setting as the CLI spells it (``--data-dir``, ``--execution``):
the CLI prints it on one line and exits with status 2, and the study
(:mod:`sparsesam.study`), whose settings are the same flags, does too.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from . import _validate
from ._validate import ConfigError
from .data import build_dataset, canonical_name, load_dataset
from .distributed import distributed_sampler, on_main_process, rank_device


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
    return rank_device(device)  # under torchrun, "cuda" is each rank's cuda:LOCAL_RANK


def check_fraction(name: str, value: float) -> float:
    problem = _validate.FRACTION.problem(value)
    if problem is not None:
        raise ConfigError(f"{name} {problem}")
    return float(value)


def prepare_out(out: str) -> str:
    """Create the output folder (an existing file of that name is a ConfigError); under torchrun rank 0
    creates it and every rank gets its answer."""
    return on_main_process(_make_out, out)


def _make_out(out: str) -> str:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} exists and is not a folder")
    os.makedirs(out, exist_ok=True)
    return out


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
    """A shuffled training loader driven by its own generator (part of the checkpointed state) and a test loader.

    Under torchrun the training loader draws this rank's share of every epoch
    through a DistributedSampler (seeded with ``seed``; call
    ``sparsesam.distributed.set_sampler_epoch`` each epoch), and
    ``batch_size`` is per rank, as in torch's own convention: one step sees
    ``batch_size x world size`` samples. The test loader is the whole test
    set (rank 0 evaluates it alone).
    """
    generator = torch.Generator().manual_seed(seed)
    sampler = distributed_sampler(train, shuffle=True, seed=seed)
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                              generator=generator)
    test_loader = DataLoader(test, batch_size=eval_batch_size, shuffle=False)
    return train_loader, test_loader, generator


def seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def execution_choices() -> Tuple[str, ...]:
    from .nn import executions
    return executions()


def check_execution(value: Optional[str]) -> Optional[str]:
    if value is not None and value not in execution_choices():
        raise ConfigError(f"--execution must be one of {list(execution_choices())}, got {value!r}")
    return value


def example_batch(dataset, batch_size: int) -> torch.Tensor:
    """The first ``batch_size`` inputs of ``dataset``: what "auto" times the layers' forms on."""
    from .algorithms._execution import first_inputs
    return first_inputs(dataset, batch_size)


def in_execution(model: nn.Module, execution: str, example: torch.Tensor) -> Dict[str, str]:
    """Convert ``model`` (in place) for evaluation in ``execution`` form ("auto": timed on ``example``,
    forward only, in eval mode); returns ``{layer: form}``. Layers whose channel gates read their mask
    at every forward stay dense (evaluate a structured model through its compacted form instead)."""
    from .algorithms._execution import layer_forms, settle_execution
    settle_execution(model, execution, example, train=False)
    return layer_forms(model)
