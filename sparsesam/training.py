"""The training loop and the evaluation loop (tqdm progress): one of each, for the CLI, the study and the tests.

:func:`train_epoch` is the one training epoch: a plain optimizer steps once,
a SAM optimizer takes its two passes, and the loss is cross-entropy or any
``loss_fn(model, x, y, step)`` (the algorithms' adversarial losses).
:func:`fit_dense` trains a dense model for ``epochs`` epochs with a
checkpoint after each (``sparsesam train``, ``prune``'s pre-training and
the study's dense models). The algorithms' own phases
(``sparsesam.algorithms._steps``) keep their epoch loops (they step masks,
scores and per-phase optimizers this loop does not know about) but take
the same step, :func:`take_step`, on the same clean loss,
:func:`cross_entropy_loss`.

Under torchrun (see sparsesam.distributed) the loops take a model wrapped
in DistributedDataParallel and a loader with a DistributedSampler: each
rank trains on its share, the epoch's metrics are the all-reduced means
(weighted by the samples each rank saw), the test set is evaluated by
rank 0 alone, in full, and sent to every rank (:func:`evaluate_on_main`),
and checkpoints hold the wrapped module's state, written by rank 0.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ._validate import ConfigError, MOMENTUM, NON_NEGATIVE, POSITIVE, check_numbers
from .checkpoint import READ_ERRORS, Checkpointer, capture_rng_state, restore_rng_state
from .distributed import (all_reduce_mean, is_main_process, on_main_process, reseed_for_epoch, set_sampler_epoch,
                          unwrap, world)
from .divergence import StepCheck, TrainingDiverged, check_state
from .file_errors import BadCheckpointError, describe
from .optim import SAM


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer (the CPU for a model with neither)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, *, desc: str = "eval", progress: bool = True) -> Dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``loader`` (eval mode), on the model's device."""
    model.eval()
    device = model_device(model)
    total_loss = correct = seen = 0.0
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1)}


def evaluate_on_main(model: nn.Module, loader: DataLoader, *, desc: str = "eval",
                     progress: bool = True) -> Dict[str, float]:
    """:func:`evaluate` of the (unwrapped) model, run by rank 0 alone on the whole of ``loader``; every rank
    gets its result. Exact: the numbers one process would get with rank 0's weights and statistics. In a world
    of one process it is :func:`evaluate`."""
    return on_main_process(evaluate, unwrap(model), loader, desc=desc, progress=progress and is_main_process())


# The dense optimizer's settings and their ranges (named as the CLI's flags): checked when parsed, and again
# on namespaces built in code.
OPTIMIZER_FLAGS = {"--lr": POSITIVE, "--momentum": MOMENTUM, "--weight-decay": NON_NEGATIVE,
                   "--sam-rho": NON_NEGATIVE}
# The file fit_dense checkpoints to in a run's folder (``sparsesam train``'s, and each dense model's of the study).
DENSE_CHECKPOINT = "checkpoint.pt"


def check_optimizer_arguments(args: argparse.Namespace) -> None:
    """The optimizer settings' ranges (parsed flags were checked already; a namespace built in code was not)."""
    check_numbers(args, OPTIMIZER_FLAGS)
    if args.adaptive and args.sam_rho == 0:
        raise ConfigError("--adaptive needs --sam-rho > 0 (ASAM is a SAM variant)")


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    sgd = dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, nesterov=args.momentum > 0)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.sam_rho > 0:
        return SAM(params, torch.optim.SGD, rho=args.sam_rho, adaptive=args.adaptive, model=model, **sgd)
    return torch.optim.SGD(params, **sgd)


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int):
    """The clean loss in the ``loss_fn(model, x, y, step) -> (loss, logits)`` form (``step`` unused)."""
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def take_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
              loss_fn: Callable, step: int, *, sam: bool,
              extra_loss: Optional[Callable[[], torch.Tensor]] = None
              ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Dict[str, float]]:
    """One optimizer step on ``loss_fn(model, x, y, step)``: returns (the loss, its logits or None, extras).

    sam: SAM's two passes (gradient at w, ascent to w + e, gradient there,
    descent from w; ``optimizer`` has first_step / second_step); otherwise one
    step of ``optimizer`` on the loss plus ``extra_loss()`` (a regulariser,
    whose value is returned in extras). The step every training loop takes:
    train_epoch's and the algorithms' (sparsesam.algorithms._steps).
    """
    loss, logits = loss_fn(model, x, y, step)
    extras: Dict[str, float] = {}
    if sam:
        if extra_loss is not None:
            raise ValueError("extra_loss is not supported with sam=True")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.first_step(zero_grad=True)
        loss_fn(model, x, y, step)[0].backward()
        optimizer.second_step(zero_grad=True)
        return loss, logits, extras
    total = loss
    if extra_loss is not None:
        regulariser = extra_loss()
        total = total + regulariser
        extras["regulariser"] = regulariser.item()
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return loss, logits, extras


def train_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, *, desc: str,
                progress: bool = True, loss_fn: Optional[Callable] = None, first_step: int = 0) -> Dict[str, float]:
    """One epoch of training; a SAM optimizer takes its two-pass step.

    ``loss_fn(model, x, y, step) -> (loss, logits or None)`` (the algorithms'
    form, e.g. an adversarial loss of ``algorithms._steps.make_loss``; step
    seeds its random draws) defaults to cross-entropy. With logits None
    (adversarial losses) the accuracy is not measured (None). A NaN or inf
    loss raises TrainingDiverged naming the step (read from the loss the loop
    reads anyway).
    """
    model.train()
    loss_fn = cross_entropy_loss if loss_fn is None else loss_fn
    sam = isinstance(optimizer, SAM)
    total_loss = correct = seen = 0.0
    measured = True
    check = StepCheck()
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    device = model_device(model)
    for i, (x, y) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss, logits, _ = take_step(model, x, y, optimizer, loss_fn, first_step + i, sam=sam)
        value = loss.item()  # the step's one sync
        check.step(loss=value)
        total_loss += value * len(y)
        if logits is None:
            measured = False
        else:
            correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}" if measured else "-")
    stats = {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1) if measured else None}
    if world().size == 1:
        return stats
    # Under torchrun: the means over every rank's samples (each rank counts its own; DistributedSampler gives
    # them all the same number, repeating a few samples when the data does not split evenly).
    means = all_reduce_mean({k: v for k, v in stats.items() if v is not None}, weight=seen)
    return {k: means.get(k) for k in stats}


# What a dense-training checkpoint holds; "kind" tells it from an algorithm's (prune_checkpoint.pt).
DENSE_STATE_KEYS = ("kind", "label", "model", "optimizer", "epoch", "history", "rng")
DENSE_KIND = "dense"


def divergence_hint(args: argparse.Namespace) -> str:
    sam = f", --sam-rho {args.sam_rho:g}" if args.sam_rho > 0 else ""
    return f"--lr {args.lr:g}{sam}: lower it"


def _where(label: str) -> Optional[str]:
    """The phase a divergence message names: none for ``sparsesam train`` itself ("pretrain" for prune's)."""
    return None if label == "train" else label


def fit_dense(model: nn.Module, train_loader, test_loader, generator: torch.Generator, args: argparse.Namespace,
              checkpointer: Checkpointer, *, label: str = "train", loss_fn: Optional[Callable] = None) -> List[dict]:
    """Train ``args.epochs`` epochs, checkpointing after each; resumes from ``checkpointer`` if it holds a state.

    ``loss_fn``: see train_epoch (default cross-entropy). Calling again with a
    larger ``args.epochs`` continues from the last checkpoint (the learning
    rate is constant, so the epochs do not depend on the total). A checkpoint
    of another kind of run (an algorithm's, another label's) or one whose
    model / optimizer state does not fit (another model, width or optimizer)
    is a one-line BadCheckpointError naming the file. A NaN or inf loss,
    parameter, BatchNorm statistic or test loss raises TrainingDiverged naming
    the epoch (and the step); the epoch is not checkpointed.

    Under torchrun pass the model wrapped by sparsesam.distributed.wrap_ddp
    and make_loaders' loaders: SAM gets ``model=ddp``; the checkpoint holds
    the module's state (rank 0's BatchNorm statistics, which DDP gives every
    rank at the next forward) and every rank loads it; each epoch reshuffles
    through ``set_epoch(epoch)`` and reseeds the global generators from
    (seed, rank, epoch) (sparsesam.distributed.reseed_for_epoch), so a
    resumed run draws what the uninterrupted one drew; progress bars show on
    rank 0 only.
    """
    module = unwrap(model)
    progress = args.progress and is_main_process()
    optimizer = build_optimizer(model, args)
    history: List[dict] = []
    start = 0
    state = checkpointer.load(required=DENSE_STATE_KEYS)
    if state is not None:
        checkpointer.expect(state, kind=DENSE_KIND, label=label)
        checkpointer.restore(module, state, "model")
        checkpointer.restore(optimizer, state, "optimizer")
        start = _resumed_epoch(checkpointer, state, args.epochs)
        history = list(state["history"])
        try:
            restore_rng_state(state["rng"], generator)
        except READ_ERRORS as error:
            raise BadCheckpointError(checkpointer.path, f"its random-number state cannot be restored: "
                                                        f"{describe(error)}") from error
    for epoch in range(start, args.epochs):
        began = time.perf_counter()
        set_sampler_epoch(train_loader, epoch)
        reseed_for_epoch(args.seed, epoch)
        try:
            stats = train_epoch(model, train_loader, optimizer, desc=f"{label} {epoch + 1}/{args.epochs}",
                                progress=progress, loss_fn=loss_fn, first_step=epoch * len(train_loader))
            check_state(module)  # BatchNorm statistics can overflow while every loss stays finite
        except TrainingDiverged as error:
            raise error.locate(epoch=epoch + 1, where=_where(label), hint=divergence_hint(args))
        test = evaluate_on_main(module, test_loader, desc="test", progress=progress)
        if not math.isfinite(test["loss"]):  # finite weights whose logits overflow
            raise TrainingDiverged(f"the test loss is {test['loss']}", epoch=epoch + 1, where=_where(label),
                                   hint=divergence_hint(args))
        history.append({"phase": label, "epoch": epoch + 1, "loss": stats["loss"], "accuracy": stats["accuracy"],
                        "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                        "seconds": time.perf_counter() - began})
        checkpointer.save({"kind": DENSE_KIND, "label": label, "model": module.state_dict(),
                           "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "history": history,
                           "rng": capture_rng_state(generator)})
    return history


def _resumed_epoch(checkpointer: Checkpointer, state: dict, epochs: int) -> int:
    epoch, history = state["epoch"], state["history"]
    if not isinstance(epoch, int) or not 0 <= epoch <= epochs or not isinstance(history, list) \
            or len(history) != epoch:
        raise BadCheckpointError(checkpointer.path, f"the checkpoint is at epoch {epoch!r} with "
                                                    f"{len(history) if isinstance(history, list) else history!r} "
                                                    f"history entries; this run has {epochs} epoch(s)")
    return epoch
