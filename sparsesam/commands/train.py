"""``sparsesam train``: dense training (SGD, or SAM / ASAM) with a resumable checkpoint after every epoch."""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._validate import MOMENTUM, NON_NEGATIVE, POSITIVE
from ..checkpoint import READ_ERRORS, Checkpointer, capture_rng_state, restore_rng_state
from ..divergence import StepCheck, TrainingDiverged, check_state
from ..file_errors import BadCheckpointError, describe
from ..optim import SAM
from ..training import evaluate, model_device
from ..model_files import build_from_spec, check_model_name, model_spec, save_model_folder, write_json
from .common import (ConfigError, add_device_argument, add_number, check_numbers, dataset_key, echo_config, load_data,
                     make_loaders, non_negative_int, positive_int, prepare_out, resolve_device, seed_everything)

CHECKPOINT = "checkpoint.pt"
RESULT = "train.json"
# The dense optimizer's flags and their ranges: checked when parsed, and again on namespaces built in code.
OPTIMIZER_FLAGS = {"--lr": POSITIVE, "--momentum": MOMENTUM, "--weight-decay": NON_NEGATIVE,
                   "--sam-rho": NON_NEGATIVE}


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="fashion_mnist",
                        help="fashion_mnist, cifar10, digits, synthetic, or imagefolder:PATH (your images: "
                             "PATH/train/<class>/*.png and PATH/test/<class>/*.png)")
    parser.add_argument("--data-dir", default=None, help="folder of a file-backed dataset (default: its usual place)")
    parser.add_argument("--limit", type=positive_int, default=None, help="use only the first N images of each split")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="image size (digits / synthetic; imagefolder: resize and centre-crop to it)")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smallcnn",
                        help="resnet18, smallcnn, mobilenetv2, googlenet, vgg16bn, or an architecture of torchvision "
                             "or timm without weights: torchvision:NAME, timm:NAME")
    add_number(parser, "--width", POSITIVE, default=1.0,
               help="multiplier of the paper's channel counts (the package's models only)")
    add_device_argument(parser)


def add_optimizer_arguments(parser: argparse.ArgumentParser, epochs: Optional[int] = 5,
                            what: str = "training") -> None:
    """SGD / SAM flags; ``epochs=None``: no --epochs flag (the caller decides how long to train)."""
    group = parser.add_argument_group(f"dense {what}")
    if epochs is not None:
        group.add_argument("--epochs", type=non_negative_int, default=epochs)
    add_number(group, "--lr", OPTIMIZER_FLAGS["--lr"], default=0.05)
    add_number(group, "--momentum", OPTIMIZER_FLAGS["--momentum"], default=0.9)
    add_number(group, "--weight-decay", OPTIMIZER_FLAGS["--weight-decay"], default=5e-4)
    add_number(group, "--sam-rho", OPTIMIZER_FLAGS["--sam-rho"], default=0.0,
               help="SAM radius; 0 trains with plain SGD")
    group.add_argument("--adaptive", action="store_true", help="ASAM (scale-invariant radius); needs --sam-rho > 0")


def check_optimizer_arguments(args: argparse.Namespace) -> None:
    """The optimizer flags' ranges (parsed flags were checked already; a namespace built in code was not)."""
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
    logits = model(x)
    return F.cross_entropy(logits, y), logits


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
        loss, logits = loss_fn(model, x, y, first_step + i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sam:
            optimizer.first_step(zero_grad=True)
            loss_fn(model, x, y, first_step + i)[0].backward()
            optimizer.second_step(zero_grad=True)
        else:
            optimizer.step()
        value = loss.item()  # the step's one sync
        check.step(loss=value)
        total_loss += value * len(y)
        if logits is None:
            measured = False
        else:
            correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}" if measured else "-")
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1) if measured else None}


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
    """
    optimizer = build_optimizer(model, args)
    history: List[dict] = []
    start = 0
    state = checkpointer.load(required=DENSE_STATE_KEYS)
    if state is not None:
        checkpointer.expect(state, kind=DENSE_KIND, label=label)
        checkpointer.restore(model, state, "model")
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
        try:
            stats = train_epoch(model, train_loader, optimizer, desc=f"{label} {epoch + 1}/{args.epochs}",
                                progress=args.progress, loss_fn=loss_fn, first_step=epoch * len(train_loader))
            check_state(model)  # BatchNorm statistics can overflow while every loss stays finite
        except TrainingDiverged as error:
            raise error.locate(epoch=epoch + 1, where=_where(label), hint=divergence_hint(args))
        test = evaluate(model, test_loader, desc="test", progress=args.progress)
        if not math.isfinite(test["loss"]):  # finite weights whose logits overflow
            raise TrainingDiverged(f"the test loss is {test['loss']}", epoch=epoch + 1, where=_where(label),
                                   hint=divergence_hint(args))
        history.append({"phase": label, "epoch": epoch + 1, "loss": stats["loss"], "accuracy": stats["accuracy"],
                        "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                        "seconds": time.perf_counter() - began})
        checkpointer.save({"kind": DENSE_KIND, "label": label, "model": model.state_dict(),
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


def run_train(args: argparse.Namespace) -> dict:
    check_model_name(args.model)
    args.dataset = dataset_key(args.dataset)
    check_optimizer_arguments(args)
    device = resolve_device(args.device)
    train, test = load_data(args.dataset, args.data_dir, args.limit, args.image_size)  # bad data: no folder made
    out = prepare_out(args.out)
    checkpointer = Checkpointer(os.path.join(out, CHECKPOINT))
    if checkpointer.exists() and not args.resume:
        raise ConfigError(f"{checkpointer.path} holds an unfinished run: pass --resume to continue it "
                          f"or choose another --out")
    echo_config(args, out)  # after the check: the interrupted run's config.json stays until it is resumed
    seed_everything(args.seed)
    spec = model_spec(args.model, args.width, train.info)
    model = build_from_spec(spec).to(device)
    train_loader, test_loader, generator = make_loaders(train, test, args.batch_size, args.seed)
    history = fit_dense(model, train_loader, test_loader, generator, args, checkpointer)
    final = evaluate(model, test_loader, desc="test", progress=args.progress)
    model.cpu()  # model folders hold CPU tensors, whatever --device trained them
    save_model_folder(model, spec, out, extra={"stage": "train", "optimizer": "sam" if args.sam_rho > 0 else "sgd"})
    result = {"command": "train", "model": args.model, "dataset": args.dataset, "epochs": args.epochs,
              "history": history, "test_accuracy": final["accuracy"], "test_loss": final["loss"],
              "train_examples": len(train), "test_examples": len(test)}
    write_json(os.path.join(out, RESULT), result)
    checkpointer.remove()  # the run is complete and exported
    print(f"train: test accuracy {final['accuracy']:.4f} after {args.epochs} epoch(s); model in {out}")
    return result


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser("train", help="train a dense model (SGD or SAM) with resumable checkpoints")
    add_model_arguments(parser)
    add_data_arguments(parser)
    add_optimizer_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder (model.safetensors, train.json, config.json)")
    parser.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    parser.set_defaults(func=run_train)
    return parser
