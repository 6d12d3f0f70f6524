"""``sparsesam prune``: sparsify a trained (or briefly trained) model with one of the registry's algorithms.

Under ``torchrun --nproc_per_node=N -m sparsesam prune ...`` the
pre-training and the algorithm's epochs run data-parallel as in
``sparsesam train`` (``--batch-size`` per rank; rank 0 alone writes,
evaluates and prints), for the algorithms that can
(``Algorithm.data_parallel``: magnitude, sam_prune); the others are refused
with a message naming them.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import textwrap
from typing import Dict

from .._validate import FRACTION
from ..algorithms.registry import algorithm_registry, build_config, get_algorithm
from ..checkpoint import Checkpointer
from ..distributed import data_parallel, is_main_process, on_main_process, process_group
from ..model_files import build_from_spec, check_model_name, jsonable, load_model_folder, model_spec
from ..pruning_run import PRUNE_CHECKPOINT, check_data_parallel, prune_model, with_execution
from ..run_setup import (check_execution, check_fraction, dataset_key, load_data, make_loaders, prepare_out,
                         resolve_device, seed_everything)
from ..training import check_optimizer_arguments, fit_dense
from .common import ConfigError, add_execution_argument, add_number, echo_config
from .train import add_data_arguments, add_model_arguments, add_optimizer_arguments, world_config

# One line per algorithm for --help: what it does and what runs where.
ALGORITHM_HELP = {
    "magnitude": "global |w| threshold (or L2 channels with granularity=channel), then fine-tuning with the "
                 "mask fixed (sparse / compacted)",
    "hydra": "score masks learnt with frozen weights, one uniform rate per layer (dense search), then "
             "fine-tuning with the mask fixed (sparse)",
    "harp": "HYDRA's score masks plus learnt per-layer rates under a hardware loss (dense search), then "
            "fine-tuning with the mask fixed (sparse)",
    "csam": "sharpness-aware soft masks in mask space (dense), binarised to the target, then fine-tuning "
            "(sparse)",
    "sam_prune": "SAM training of the dense model, magnitude pruning, then SAM fine-tuning (sparse / compacted)",
    "adasap": "ASAM with per-channel radii from channel scores (dense), channel pruning, then uniform-ASAM "
              "fine-tuning of the compacted model",
    "asam_prune": "uniform ASAM training of the dense model (AdaSAP's control), then AdaSAP's pruning and "
                  "fine-tuning",
}


def algorithm_lines() -> Dict[str, str]:
    """``{name: one line}`` for every algorithm the CLI can run (a line-less one: its class docstring's first line)."""
    lines = {}
    for name, algorithm in algorithm_registry().items():
        doc = (algorithm.__doc__ or "").strip().splitlines()
        lines[name] = ALGORITHM_HELP.get(name) or (doc[0] if doc else "")
    return lines
PRETRAIN_CHECKPOINT = "pretrain_checkpoint.pt"


def parse_settings(pairs) -> Dict[str, str]:
    settings = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        settings[key.strip()] = value.strip()
    return settings


def run_prune(args: argparse.Namespace, registry=None) -> dict:
    with process_group(args.device):
        return _run_prune(args, registry)


def _unfinished(out: str):
    """The checkpoint files of an interrupted run in ``out`` (rank 0 looks)."""
    return [os.path.join(out, name) for name in (PRETRAIN_CHECKPOINT, PRUNE_CHECKPOINT)
            if os.path.exists(os.path.join(out, name))]


def _run_prune(args: argparse.Namespace, registry=None) -> dict:
    check_fraction("--sparsity", args.sparsity)
    registry = algorithm_registry() if registry is None else registry
    algorithm = get_algorithm(args.algorithm, registry)
    check_data_parallel(args.algorithm, registry)  # under torchrun: refused before any file is written
    check_execution(args.execution)
    config = with_execution(build_config(algorithm, args.sparsity, parse_settings(args.set),
                                         defaults={"seed": args.seed}), args.execution)
    args.dataset = dataset_key(args.dataset)
    check_optimizer_arguments(args)
    device = resolve_device(args.device)
    if args.source is None:
        check_model_name(args.model)
    elif not os.path.isdir(args.source):
        raise ConfigError(f"--from {args.source} is not a folder (give the --out of 'sparsesam train')")
    train, test = load_data(args.dataset, args.data_dir, args.limit, args.image_size)  # bad data: no folder made
    out = prepare_out(args.out)
    unfinished = on_main_process(_unfinished, out)  # rank 0's answer on every rank
    if unfinished and not args.resume:
        raise ConfigError(f"{unfinished[0]} holds an unfinished run: pass --resume to continue it "
                          f"or choose another --out")
    on_main_process(echo_config, args, out,
                    extra={"algorithm_config": dataclasses.asdict(config), **world_config()})
    seed_everything(args.seed)
    train_loader, test_loader, generator = make_loaders(train, test, args.batch_size, args.seed)
    pretrain = None
    if args.source is not None:
        model, source_info = load_model_folder(args.source)
        model.to(device)
        spec = source_info["spec"]
        if spec["dataset"] != train.info.name or spec["image_size"] != train.info.image_size:
            raise ConfigError(f"--from {args.source} was trained on {spec['dataset']} ({spec['image_size']}px), "
                              f"not on {train.info.name} ({train.info.image_size}px)")
    else:
        spec = model_spec(args.model, args.width, train.info)
        model = build_from_spec(spec).to(device)
        pre_checkpoint = Checkpointer(os.path.join(out, PRETRAIN_CHECKPOINT))
        history = fit_dense(data_parallel(model), train_loader, test_loader, generator, args, pre_checkpoint,
                            label="pretrain")
        pretrain = {"epochs": args.epochs, "history": history}
    report = prune_model(model, spec, args.algorithm, config, train_loader, test_loader, out, progress=args.progress,
                         registry=registry, extra={"source": args.source, "pretrain": pretrain,
                                                   "dataset": args.dataset, "model": spec["model"]})
    if args.source is None:
        Checkpointer(os.path.join(out, PRETRAIN_CHECKPOINT)).remove()
    if is_main_process():
        print(f"prune {args.algorithm}: sparsity {report['sparsity']:.4f}, test accuracy "
              f"{report['test_accuracy']:.4f}; model in {out}")
    return jsonable(report)


def add_parser(sub) -> argparse.ArgumentParser:
    lines = algorithm_lines()
    parser = sub.add_parser("prune", help="prune a model with " + ", ".join(lines),
                            description="Sparsify a model with one algorithm.\n\nalgorithms:\n" + "\n".join(
                                textwrap.fill(line, 100, initial_indent=f"  {name:<11}", subsequent_indent=" " * 13)
                                for name, line in lines.items()),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithm", required=True, metavar="NAME",
                        help="one of: " + ", ".join(lines) + " (see above)")
    add_number(parser, "--sparsity", FRACTION, default=0.9,
               help="target fraction pruned: of the prunable layers' WEIGHTS for magnitude, "
                    "hydra, harp, csam and sam_prune (granularity=unstructured, the default; nm: 1 - n/m); "
                    "of their OUTPUT CHANNELS for adasap and for granularity=channel (--set "
                    "granularity=channel on magnitude, sam_prune, hydra, harp)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="set a field of the algorithm's config (repeatable), e.g. --set finetune_epochs=2")
    parser.add_argument("--from", dest="source", default=None,
                        help="folder of a trained model ('sparsesam train --out'); without it a dense model is "
                             "first trained for --epochs")
    add_model_arguments(parser)
    add_data_arguments(parser)
    add_optimizer_arguments(parser, epochs=1, what="pre-training (without --from; the algorithm's own settings "
                                                    "are --set fields)")
    parser.add_argument("--out", required=True, help="output folder (model, sparsity.json, prune.json, config.json)")
    parser.add_argument("--resume", action="store_true", help="continue the run whose checkpoints are in --out")
    add_execution_argument(parser, None, "the fixed-mask phases (fine-tuning) and the final test evaluation; "
                                         "overrides the config's 'execution' field (default auto)")
    parser.set_defaults(func=run_prune)
    return parser
