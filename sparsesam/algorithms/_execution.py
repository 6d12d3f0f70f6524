"""How a fixed-mask phase runs: its masked layers in dense or sparse form (sparsesam.nn.set_execution).

fit() calls :func:`settle_execution` when a fixed-mask phase begins (after
its transition, before its optimizer is built: converting replaces the
weight parameters), records :func:`layer_forms` in every checkpoint, and on
resuming calls :func:`restore_forms` so that each layer is in exactly the
form it trained in (the optimizer's state then has the same shapes and the
run continues bit for bit).

"auto" decides by timing each layer's forms on a real training batch
(:func:`example_batch`: the first ``batch_size`` items of the dataset, read
with every random stream forked off, so nothing the training draws
changes); the timing pass leaves BatchNorm statistics untouched.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from typing import Dict, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..nn import execution_summary, resolve_execution, set_execution
from ..optim import frozen_bn_stats
from ..pruning.channel_graph import channel_gates


def first_inputs(dataset, count: int) -> torch.Tensor:
    """The first ``count`` inputs of ``dataset`` as one batch, drawing no random number (a dataset that
    augments with torch's generator gets a forked one)."""
    count = max(1, min(len(dataset), count))
    with torch.random.fork_rng(devices=[]):
        items = [dataset[i][0] for i in range(count)]
    return torch.stack([x if isinstance(x, torch.Tensor) else torch.as_tensor(x) for x in items])


def example_batch(loader: DataLoader) -> torch.Tensor:
    """A training batch's worth of ``loader.dataset``'s first inputs: what "auto" times the forms on."""
    return first_inputs(loader.dataset, loader.batch_size or 1)


def layer_forms(model: nn.Module) -> Dict[str, str]:
    """``{layer name: "dense" or a sparse format's name}`` of every masked / sparse layer."""
    return execution_summary(model, formats=True)


def all_dense(model: nn.Module) -> bool:
    return all(form == "dense" for form in layer_forms(model).values())


def settle_execution(model: nn.Module, execution: str, example: torch.Tensor, train: bool = True) -> Dict[str, str]:
    """Put ``model``'s fixed-mask layers in ``execution`` form ("auto": timed on ``example``, forward and
    backward in training mode, or forward only in eval mode with ``train=False``); returns the forms they
    settled in. A layer whose output a channel gate multiplies by its mask at every forward stays dense (the
    gate reads the dense form's mask; a channel-pruned model trains compacted instead)."""
    gated = {id(gate.layer) for gate in channel_gates(model).values()}
    set_execution(model, execution, layers=[m for m in model.modules() if id(m) not in gated])
    if execution == "auto":
        was_training = model.training
        model.train(train)
        try:
            with frozen_bn_stats(model), torch.random.fork_rng(devices=_cuda_devices(example)):
                resolve_execution(model, example)
        finally:
            model.train(was_training)
    return layer_forms(model)


def _cuda_devices(example: torch.Tensor):
    return [example.device.index or 0] if example.is_cuda else []


def restore_forms(model: nn.Module, forms: Mapping[str, str]) -> None:
    """Convert each layer named in ``forms`` to its recorded form (grouped: one set_execution per form)."""
    modules = dict(model.named_modules())
    unknown = sorted(name for name in forms if name not in modules)
    if unknown:
        raise ValueError(f"the checkpoint names layers the model does not have: {unknown}")
    by_form = defaultdict(list)
    for name, form in forms.items():
        by_form[form].append(modules[name])
    for form, layers in by_form.items():
        set_execution(model, form, layers=layers)
    now = layer_forms(model)
    wrong = {name: (form, now.get(name)) for name, form in forms.items() if now.get(name) != form}
    if wrong:
        raise RuntimeError(f"layers did not take the form they were saved in (saved, now): {wrong}")


def dense_view(model: nn.Module) -> nn.Module:
    """``model`` itself if every layer is dense, else a copy with every layer dense (exact)."""
    if all_dense(model):
        return model
    return set_execution(copy.deepcopy(model), "dense")


def dense_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` in dense form (weights and masks): loads into the restructured model of a
    resumed run, which then converts to the saved forms."""
    return dense_view(model).state_dict()
