"""``sparsesam train``: dense training (SGD, or SAM / ASAM) with a resumable checkpoint after every epoch.

Under ``torchrun --nproc_per_node=N -m sparsesam train ...`` every rank
trains its share of each epoch (``--batch-size`` is per rank) in
DistributedDataParallel; rank 0 alone makes the folder, writes the files
(config, checkpoints, model folder, JSON), evaluates and prints, and the
others wait for it (sparsesam.distributed).
"""
from __future__ import annotations

import argparse
import os
from typing import Optional

from .._validate import POSITIVE
from ..checkpoint import Checkpointer
from ..distributed import data_parallel, is_main_process, on_main_process, process_group, world
from ..model_files import build_from_spec, check_model_name, model_spec, save_model_folder, write_json
from ..run_setup import dataset_key, load_data, make_loaders, prepare_out, resolve_device, seed_everything
from ..training import DENSE_CHECKPOINT, OPTIMIZER_FLAGS, check_optimizer_arguments, evaluate_on_main, fit_dense
from .common import ConfigError, add_device_argument, add_number, echo_config, non_negative_int, positive_int

CHECKPOINT = DENSE_CHECKPOINT
RESULT = "train.json"


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


def world_config() -> dict:
    """What config.json adds under torchrun: the world size (a resume with another one is refused, as it would
    split the data differently). Nothing in one process, whose config stays as it was."""
    size = world().size
    return {} if size == 1 else {"world_size": size}


def run_train(args: argparse.Namespace) -> dict:
    with process_group(args.device):
        return _run_train(args)


def _run_train(args: argparse.Namespace) -> dict:
    check_model_name(args.model)
    args.dataset = dataset_key(args.dataset)
    check_optimizer_arguments(args)
    device = resolve_device(args.device)
    train, test = load_data(args.dataset, args.data_dir, args.limit, args.image_size)  # bad data: no folder made
    out = prepare_out(args.out)
    checkpointer = Checkpointer(os.path.join(out, CHECKPOINT))
    if checkpointer.exists() and not args.resume:  # rank 0's answer on every rank
        raise ConfigError(f"{checkpointer.path} holds an unfinished run: pass --resume to continue it "
                          f"or choose another --out")
    # After the check: the interrupted run's config.json stays until it is resumed.
    on_main_process(echo_config, args, out, extra=world_config())
    seed_everything(args.seed)
    spec = model_spec(args.model, args.width, train.info)
    model = build_from_spec(spec).to(device)
    train_loader, test_loader, generator = make_loaders(train, test, args.batch_size, args.seed)
    history = fit_dense(data_parallel(model), train_loader, test_loader, generator, args, checkpointer)
    final = evaluate_on_main(model, test_loader, desc="test", progress=args.progress)
    model.cpu()  # model folders hold CPU tensors, whatever --device trained them
    on_main_process(save_model_folder, model, spec, out,
                    extra={"stage": "train", "optimizer": "sam" if args.sam_rho > 0 else "sgd"})
    result = {"command": "train", "model": args.model, "dataset": args.dataset, "epochs": args.epochs,
              "history": history, "test_accuracy": final["accuracy"], "test_loss": final["loss"],
              "train_examples": len(train), "test_examples": len(test)}
    on_main_process(write_json, os.path.join(out, RESULT), result)
    checkpointer.remove()  # the run is complete and exported
    if is_main_process():
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
