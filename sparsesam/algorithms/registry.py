"""Which pruning algorithms a run can use, and how their configs are built from settings.

The algorithms are ``sparsesam.algorithms.ALGORITHMS`` (name -> class taking
a ``<Name>Config`` dataclass). The CLI (``prune``, ``demo``, ``reproduce``)
and the study look them up here by name, and build their configs from the
``--set key=value`` strings; a registry may also be given explicitly (the
tests' fake algorithms), and the demo reports a method missing from it as
not run.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Dict, List, Mapping, Optional

from .._validate import ConfigError

KNOWN = ("adasap", "harp", "csam", "magnitude", "hydra", "sam_prune", "asam_prune")


def package_algorithms() -> Mapping[str, type]:
    """``sparsesam.algorithms.ALGORITHMS`` (a function, so that a test can stand in another registry)."""
    from . import ALGORITHMS  # at call time, so that a test can also patch the package attribute
    return ALGORITHMS


def algorithm_registry() -> Dict[str, type]:
    """Every algorithm a run can use now (a copy of the package's registry)."""
    return dict(package_algorithms())


def get_algorithm(name: str, registry: Optional[Mapping[str, type]] = None) -> type:
    registry = algorithm_registry() if registry is None else registry
    if name not in registry:
        missing = " (not available in this installation)" if name in KNOWN else ""
        raise ConfigError(f"unknown algorithm {name!r}{missing}; available: {sorted(registry)}")
    return registry[name]


def config_class(algorithm: type) -> type:
    """The ``<Name>Config`` dataclass ``algorithm`` takes (class attribute, or the annotation of ``config``)."""
    for attribute in ("config_type", "Config", "config_class"):
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


def parse_value(text: str, current: Any, wants_float: bool = False) -> Any:
    """A --set value, read as JSON when it parses (numbers, true/false, lists), else as a string; for a
    float field (``current`` a float, or ``wants_float``: an Optional[float] field), also as Python reads a
    float ("nan", "inf": the config's check then refuses it, naming the field)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
        if isinstance(current, float) or wants_float:
            try:
                value = float(text)
            except ValueError:
                pass
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ValueError(f"expects true or false, got {text!r}")
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


def _field_types(cls: type, name: str) -> tuple:
    """The types a config field's annotation allows (``Optional[float]`` -> (float, NoneType)); () if unknown."""
    try:
        hint = typing.get_type_hints(cls).get(name)
    except Exception:  # an annotation that does not resolve: no type to go by
        return ()
    return typing.get_args(hint) or (hint,)


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
            values[key] = parse_value(text, getattr(base, key, None), float in _field_types(cls, key))
        except ValueError as error:
            raise ConfigError(f"--set {key}: {error}") from error
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{cls.__name__}: {error}") from error


def epoch_fields(algorithm: type) -> List[str]:
    """The config's epoch counts (fields named ``*epochs``): what a time budget shortens."""
    return [f.name for f in dataclasses.fields(config_class(algorithm)) if f.name.endswith("epochs")]
