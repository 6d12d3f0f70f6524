"""Which pruning algorithms the CLI can run, and how it builds their configs.

The algorithms live in ``sparsesam.algorithms`` (``ALGORITHMS``: name ->
class taking a ``<Name>Config`` dataclass). That package is imported only
when an algorithm is asked for, and the CLI still runs without it: then the
one baseline defined here, global magnitude pruning followed by
fine-tuning (``magnitude``), is what exists; a registry entry of the same
name replaces it.
"""
from __future__ import annotations

import dataclasses
import json
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from ..checkpoint import capture_rng_state, restore_rng_state
from ..nn import masked_layers, sparsify
from ..pruning import global_sparsity, magnitude_prune
from ..training import evaluate
from .common import ConfigError

KNOWN = ("adasap", "harp", "csam", "magnitude", "hydra", "sam_prune")


def package_algorithms() -> Mapping[str, type]:
    """``sparsesam.algorithms.ALGORITHMS``, or {} while that package does not exist."""
    try:
        from ..algorithms import ALGORITHMS
    except ModuleNotFoundError as error:
        if error.name not in ("sparsesam.algorithms",):
            raise  # the package exists but one of its own imports is missing: say so
        return {}
    return ALGORITHMS


def algorithm_registry() -> Dict[str, type]:
    """Every algorithm the CLI can run now: the package's, else the built-in magnitude baseline."""
    registry: Dict[str, type] = {"magnitude": MagnitudePruning}
    registry.update(package_algorithms())
    return registry


def get_algorithm(name: str, registry: Optional[Mapping[str, type]] = None) -> type:
    registry = algorithm_registry() if registry is None else registry
    if name not in registry:
        missing = " (not available in this installation)" if name in KNOWN else ""
        raise ConfigError(f"unknown algorithm {name!r}{missing}; available: {sorted(registry)}")
    return registry[name]


def config_class(algorithm: type) -> type:
    """The ``<Name>Config`` dataclass ``algorithm`` takes (class attribute, or the annotation of ``config``)."""
    for attribute in ("Config", "config_class"):
        candidate = getattr(algorithm, attribute, None)
        if dataclasses.is_dataclass(candidate):
            return candidate
    try:
        hints = typing.get_type_hints(algorithm.__init__)
    except Exception:  # unresolvable annotations: fall through to the error below
        hints = {}
    candidate = hints.get("config")
    if dataclasses.is_dataclass(candidate):
        return candidate
    raise TypeError(f"cannot tell which config dataclass {algorithm.__name__} takes: give it a 'Config' attribute "
                    f"or annotate __init__(self, config: <Name>Config)")


def _parse_value(text: str, current: Any) -> Any:
    """A --set value, read as JSON when it parses (numbers, true/false, lists), else as a string."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ValueError(f"expects true or false, got {text!r}")
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


def build_config(algorithm: type, target_sparsity: float, overrides: Mapping[str, str] = (),
                 defaults: Mapping[str, Any] = ()) -> Any:
    """``<Name>Config(target_sparsity=..., **defaults, **overrides)``; unknown or ill-typed fields are ConfigErrors.

    ``defaults`` are applied only to fields the config has (e.g. the demo's
    short epoch budgets); ``overrides`` (from ``--set key=value``) must name real fields.
    """
    cls = config_class(algorithm)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    base = cls() if all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
                        for f in fields.values()) else None
    if "target_sparsity" not in fields:
        raise TypeError(f"{cls.__name__} has no target_sparsity field")
    values: Dict[str, Any] = {"target_sparsity": target_sparsity}
    values.update({k: v for k, v in dict(defaults).items() if k in fields})
    for key, text in dict(overrides).items():
        if key not in fields:
            raise ConfigError(f"{cls.__name__} has no setting {key!r}; it has {sorted(fields)}")
        try:
            values[key] = _parse_value(text, getattr(base, key, None))
        except ValueError as error:
            raise ConfigError(f"--set {key}: {error}") from error
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{cls.__name__}: {error}") from error


def epoch_fields(algorithm: type) -> List[str]:
    """The config's epoch counts (fields named ``*epochs``): what a time budget shortens."""
    return [f.name for f in dataclasses.fields(config_class(algorithm)) if f.name.endswith("epochs")]


# --- the built-in baseline -------------------------------------------------------------------------------


@dataclass
class MagnitudeConfig:
    """One-shot global magnitude pruning of every conv / linear weight, then SGD fine-tuning with the mask fixed."""

    target_sparsity: float = 0.9
    scope: str = "global"           # "global": one threshold over all layers; "layer": each layer to the target
    finetune_epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1), got {self.target_sparsity}")
        if self.finetune_epochs < 0:
            raise ValueError(f"finetune_epochs must be >= 0, got {self.finetune_epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class FitResult:
    model: nn.Module
    history: List[dict] = field(default_factory=list)
    summary: Dict[str, Any] = field(default_factory=dict)


class MagnitudePruning:
    """The classic baseline (Han et al. 2015): prune the smallest |w| once, fine-tune the survivors."""

    Config = MagnitudeConfig
    structured = False

    def __init__(self, config: MagnitudeConfig) -> None:
        if not isinstance(config, MagnitudeConfig):
            raise TypeError(f"config must be a MagnitudeConfig, got {type(config).__name__}")
        self.config = config

    def fit(self, model: nn.Module, train_loader, *, val_loader=None, progress: bool = True,
            checkpoint=None) -> FitResult:
        from .train import train_epoch  # the CLI's epoch loop (SGD step, progress bar)

        config = self.config
        if not list(masked_layers(model)):
            sparsify(model)
        generator = getattr(train_loader, "generator", None)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                    momentum=config.momentum, weight_decay=config.weight_decay,
                                    nesterov=config.momentum > 0)
        state = checkpoint.load() if checkpoint is not None else None
        if state is None:
            magnitude_prune(model, config.target_sparsity, scope=config.scope)
            history, start = [], 0
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            history, start = list(state["history"]), int(state["epoch"])
            restore_rng_state(state["rng"], generator)
        for epoch in range(start, config.finetune_epochs):
            began = time.perf_counter()
            stats = train_epoch(model, train_loader, optimizer, desc=f"finetune {epoch + 1}/{config.finetune_epochs}",
                                progress=progress)
            record = {"phase": "finetune", "epoch": epoch + 1, **stats, "sparsity": global_sparsity(model),
                      "seconds": time.perf_counter() - began}
            if val_loader is not None:
                val = evaluate(model, val_loader, desc="val", progress=progress)
                record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
            history.append(record)
            if checkpoint is not None:
                checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                                 "history": history, "rng": capture_rng_state(generator)})
        return FitResult(model, history, {"algorithm": "magnitude", "sparsity": global_sparsity(model),
                                          "scope": config.scope})
