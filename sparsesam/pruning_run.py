"""One pruning run: an algorithm fitted to a model, the model exported, its test accuracy in the form it runs in.

:func:`prune_model` is what ``sparsesam prune``, the demo and the study run
for each algorithm: ``algorithm.fit`` (resumable through
``prune_checkpoint.pt`` in the run's folder), the model folder
(sparsesam.model_files), and ``prune.json``.

Under torchrun every rank fits (in DDP, for the algorithms that can:
``Algorithm.data_parallel``), and rank 0 alone writes the model folder
and prune.json and measures the test accuracy, which every rank gets.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from typing import Any, Dict, Optional

from torch import nn

from ._validate import ConfigError
from .algorithms.registry import get_algorithm
from .checkpoint import Checkpointer
from .distributed import data_parallel, on_main_process, world
from .evaluation import runnable
from .model_files import save_model_folder, write_json
from .run_setup import example_batch
from .training import evaluate

PRUNE_CHECKPOINT = "prune_checkpoint.pt"
PRUNE_RESULT = "prune.json"


def compacted_model(algorithm: Any, result: Any) -> Optional[nn.Module]:
    """The physically smaller model a structured algorithm reports (in its summary, or by a method)."""
    if isinstance(getattr(result, "compact_model", None), nn.Module):
        return result.compact_model
    summary = getattr(result, "summary", None) or {}
    for key in ("compacted_model", "compact_model", "compacted"):
        if isinstance(summary.get(key), nn.Module):
            return summary[key]
    for name in ("compacted_model", "compact"):
        method = getattr(algorithm, name, None)
        if callable(method):
            module = method()
            if isinstance(module, nn.Module):
                return module
    return None


def with_execution(config: Any, execution: Optional[str]) -> Any:
    """``config`` with its ``execution`` field set (an algorithm config without one is left as it is)."""
    if execution is None or not any(f.name == "execution" for f in dataclasses.fields(config)):
        return config
    try:
        return dataclasses.replace(config, execution=execution)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{type(config).__name__}: {error}") from error


def check_data_parallel(algorithm_name: str, registry=None) -> None:
    """Under torchrun (a world of more than one process), refuse an algorithm that cannot train data-parallel,
    naming it and the ones that can (a ConfigError, before anything is written)."""
    size = world().size
    if size == 1 or getattr(get_algorithm(algorithm_name, registry), "data_parallel", False):
        return
    from .algorithms.registry import algorithm_registry
    able = sorted(name for name, cls in (registry or algorithm_registry()).items()
                  if getattr(cls, "data_parallel", False))
    raise ConfigError(f"--algorithm {algorithm_name} cannot run under torchrun (world size {size}): it does not "
                      f"declare data_parallel (state computed from each rank's own data, which the ranks would "
                      f"not agree on). Run it in one process, or use one of {able}")


def prune_model(model: nn.Module, spec: Dict[str, Any], algorithm_name: str, config: Any, train_loader, test_loader,
                out: str, *, progress: bool, registry=None, extra: Optional[Dict[str, Any]] = None) -> dict:
    """Run ``algorithm.fit`` (resumable through ``out/prune_checkpoint.pt``), export the model, write prune.json.

    The test accuracy is measured with the model in the config's ``execution`` form ("auto" if it has none)
    or, for a structured algorithm, on its compacted model."""
    check_data_parallel(algorithm_name, registry)
    algorithm = get_algorithm(algorithm_name, registry)(config)
    checkpointer = Checkpointer(os.path.join(out, PRUNE_CHECKPOINT))
    began = time.perf_counter()
    # parallel= only under torchrun: a registry's duck-typed algorithm need not know the keyword.
    parallel = {"parallel": data_parallel} if world().size > 1 else {}
    result = algorithm.fit(model, train_loader, val_loader=test_loader, progress=progress, checkpoint=checkpointer,
                           **parallel)
    seconds = time.perf_counter() - began
    pruned = result.model.cpu()  # model folders hold CPU tensors, and the final evaluation runs there
    compacted = compacted_model(algorithm, result)
    if compacted is not None:
        compacted = compacted.cpu()
    info = on_main_process(save_model_folder, pruned, spec, out, compacted=compacted,
                           extra={"stage": "prune", "algorithm": algorithm_name,
                                  "target_sparsity": getattr(config, "target_sparsity", None)})
    execution = getattr(config, "execution", "auto")
    forms, test = on_main_process(_test_in_form, pruned, compacted, execution, test_loader, progress)
    summary = {k: v for k, v in dict(getattr(result, "summary", {}) or {}).items() if not isinstance(v, nn.Module)}
    report = {"command": "prune", "algorithm": algorithm_name, "config": dataclasses.asdict(config),
              "target_sparsity": getattr(config, "target_sparsity", None), "sparsity": info["sparsity"],
              "test_accuracy": test["accuracy"], "test_loss": test["loss"], "fit_seconds": seconds,
              "history": list(getattr(result, "history", []) or []), "summary": summary,
              "compacted_parameters": (info["compacted"] or {}).get("parameters"), "execution": execution,
              "layer_forms": forms, **(extra or {})}
    on_main_process(write_json, os.path.join(out, PRUNE_RESULT), report)
    checkpointer.remove()
    return report


def _test_in_form(pruned: nn.Module, compacted: Optional[nn.Module], execution: str, test_loader,
                  progress: bool):
    """(the layers' forms, the test metrics) of ``pruned`` run as it will be deployed (rank 0's timing)."""
    runnable_model, forms = runnable(copy.deepcopy(pruned), compacted, execution,
                                     example_batch(test_loader.dataset, test_loader.batch_size or 1))
    return forms, evaluate(runnable_model, test_loader, desc="test", progress=progress)
