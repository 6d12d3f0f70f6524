"""Architectures of torchvision and timm by name: ``"torchvision:resnet50"``, ``"timm:convnext_atto"``.

Architectures only, freshly initialised: torchvision's builders get
``weights=None`` and timm's ``create_model`` gets ``pretrained=False``, so
nothing is downloaded. torchvision is the ``[vision]`` extra, timm the
``[timm]`` extra; a missing one is an ImportError naming it.
"""
from __future__ import annotations

from typing import Tuple

from torch import nn

from .._extras import require

SOURCES = ("torchvision", "timm")

# torchvision classifiers whose auxiliary heads are on when no weights are given: in training mode
# they return a namedtuple of logits, which the training loops of the package do not take.
_AUXILIARY_HEADS = ("googlenet", "inception_v3")


def split_name(name: str) -> Tuple[str, str]:
    """``("torchvision", "resnet50")`` for ``"torchvision:resnet50"``; a ValueError naming ``name`` otherwise."""
    source, sep, arch = name.partition(":")
    if not sep or source not in SOURCES or not arch:
        raise ValueError(f"model {name!r}: an external architecture is written SOURCE:NAME with SOURCE one of "
                         f"{list(SOURCES)} (e.g. 'torchvision:resnet18', 'timm:resnet18')")
    return source, arch


def is_external(name: str) -> bool:
    """Whether ``name`` has the ``SOURCE:NAME`` form of an external architecture (not whether it exists)."""
    return isinstance(name, str) and name.partition(":")[0] in SOURCES and ":" in name


def torchvision_classifiers() -> Tuple[str, ...]:
    """The names ``torchvision:NAME`` accepts: torchvision's image classifiers."""
    models = require("torchvision.models", extra="vision", purpose="torchvision architectures")
    return tuple(models.list_models(module=models))


def check_external(name: str) -> str:
    """``name`` if its architecture exists (the package is imported to check); ValueError / ImportError if not."""
    source, arch = split_name(name)
    if source == "torchvision":
        known = torchvision_classifiers()
        if arch not in known:
            raise ValueError(f"model {name!r}: torchvision has no image classifier {arch!r}; "
                             f"choose one of {sorted(known)}")
    else:
        timm = require("timm", extra="timm", purpose="timm architectures")
        if not timm.is_model(arch):
            raise ValueError(f"model {name!r}: timm has no architecture {arch!r} "
                             f"(timm.list_models('*{arch[:4]}*') lists similar names)")
    return name


def build_external(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """A freshly initialised ``SOURCE:NAME`` architecture for ``in_channels``-channel images and ``num_classes``.

    torchvision's classifiers take 3-channel images only (their stems are
    fixed), so other channel counts are a ValueError; timm builds any
    (``in_chans``).
    """
    source, arch = split_name(check_external(name))
    if source == "torchvision":
        if in_channels != 3:
            raise ValueError(f"model {name!r}: torchvision's classifiers take 3-channel images, the data has "
                             f"{in_channels} (use a timm architecture, which takes in_chans, or RGB data)")
        models = require("torchvision.models", extra="vision", purpose="torchvision architectures")
        options = {"aux_logits": False} if arch in _AUXILIARY_HEADS else {}
        if arch in _AUXILIARY_HEADS:
            options["init_weights"] = True  # the default without weights, made explicit to skip its warning
        return models.get_model(arch, weights=None, num_classes=num_classes, **options)
    timm = require("timm", extra="timm", purpose="timm architectures")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels)


__all__ = ["SOURCES", "split_name", "is_external", "check_external", "build_external", "torchvision_classifiers"]
