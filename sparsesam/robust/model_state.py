"""Context managers that change a model for an evaluation or an attack and
put every module's mode and every parameter's ``requires_grad`` back after,
exactly as they were (modules may have had mixed modes, e.g. frozen BatchNorm)."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def module_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    saved = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, mode in saved:
            m.training = mode


def eval_mode(model: nn.Module):
    return module_mode(model, False)


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """requires_grad off for every parameter (an attack differentiates the input only)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextlib.contextmanager
def attack_mode(model: nn.Module, training: bool = False) -> Iterator[nn.Module]:
    with module_mode(model, training), frozen_parameters(model):
        yield model
