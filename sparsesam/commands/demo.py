"""``sparsesam demo``: dense model -> magnitude / AdaSAP / HARP / C-SAM at one sparsity -> evaluation -> report.

The default budgets (a SmallCNN at half width, a subset of Fashion-MNIST,
one epoch per algorithm phase, robustness measured on a few hundred test
images) are chosen to finish in about ten minutes on two CPU cores; every
budget is a flag. A method whose algorithm is not in the registry is
reported as not run: nothing is filled in for it.

``--execution`` (default "auto") is both the algorithms' fine-tuning form
and the evaluations': the table shows the form each model runs in (its
masked layers' forms, or "compacted" for AdaSAP) with its latency in that
form next to the latency of its dense form, measured in turns.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import traceback

import torch
from torch.utils.data import DataLoader, Subset

from ..checkpoint import Checkpointer
from ..training import DENSE_CHECKPOINT, check_optimizer_arguments, evaluate, fit_dense
from .. import reporting
from .._validate import FRACTION, POSITIVE
from ..model_files import build_from_spec, load_model_folder, model_spec, save_model_folder, write_json
from ..run_setup import check_fraction, dataset_key, load_data, make_loaders, prepare_out, seed_everything
from ..evaluation import evaluate_model
from ..pruning_run import PRUNE_CHECKPOINT, prune_model
from .common import ConfigError, add_execution_argument, add_number, echo_config
from .evaluate import add_robustness_arguments, check_eval_arguments, normalize_robustness_arguments
from .prune import parse_settings
from ..algorithms.registry import algorithm_registry, build_config, epoch_fields

DEFAULT_METHODS = ("magnitude", "adasap", "harp", "csam")
STRUCTURED_METHODS = ("adasap",)


def short_run_settings(method: str, sparsity: float) -> dict:
    """Config fields a method needs to do its job in the demo's one short epoch per phase.

    HARP reaches its target only through its hardware loss, whose weight grows by gamma0 = 0.01 per
    epoch in the official CIFAR setting (hundreds of steps an epoch, 20 epochs): in the demo's one
    epoch of 16 steps that moves the rates by almost nothing and the search ends near the dense model.
    The demo starts the rates at twice the target keep rate and uses gamma0 = 1, so the hardware loss
    brings them to the target within the epoch (the momentum of the one SGD may carry them a little
    past it). ``--set`` overrides these.
    """
    if method == "harp":
        return {"gamma": 1.0, "initial_keep": min(1.0, 2.0 * (1.0 - sparsity))}
    return {}


def _methods(text: str):
    return [m.strip() for m in text.split(",") if m.strip()]


def _eval_into(folder: str, args: argparse.Namespace, name: str, test) -> dict:
    model, info = load_model_folder(folder)
    from ..model_files import load_compacted
    compacted = load_compacted(folder, info)
    eval_args = argparse.Namespace(**vars(args))
    eval_args.name = name
    result = evaluate_model(model, info, test, eval_args, compacted)
    result["model_dir"] = os.path.abspath(folder)
    os.makedirs(os.path.join(folder, "eval"), exist_ok=True)
    write_json(os.path.join(folder, "eval", "eval.json"), result)
    return result


def run_demo(args: argparse.Namespace, registry=None) -> dict:
    began = time.perf_counter()
    check_fraction("--sparsity", args.sparsity)
    check_fraction("--channel-sparsity", args.channel_sparsity)
    args.dataset = dataset_key(args.dataset)
    check_optimizer_arguments(args)
    normalize_robustness_arguments(args)
    check_eval_arguments(args)
    settings = parse_settings(args.set)
    registry = algorithm_registry() if registry is None else registry
    image_size = args.image_size
    train, _ = load_data(args.dataset, args.data_dir, args.limit, image_size)  # bad data: no folder made
    _, test = load_data(args.dataset, args.data_dir, args.test_limit, image_size)
    out = prepare_out(args.out)
    dense_dir = os.path.join(out, "dense")
    for method in args.methods:
        leftover = os.path.join(out, method, PRUNE_CHECKPOINT)
        if os.path.exists(leftover) and not args.resume:
            raise ConfigError(f"{leftover} holds an unfinished run: pass --resume or choose another --out")
    if os.path.exists(os.path.join(dense_dir, DENSE_CHECKPOINT)) and not args.resume:
        raise ConfigError(f"{os.path.join(dense_dir, DENSE_CHECKPOINT)} holds an unfinished run: pass --resume "
                          f"or choose another --out")
    echo_config(args, out)
    seed_everything(args.seed)
    train_loader, test_loader, generator = make_loaders(train, test, args.batch_size, args.seed)
    spec = model_spec(args.model, args.width, train.info)

    # 1. the dense model every method starts from
    print(f"[demo] training a dense {args.model} (width {args.width}) on {len(train)} {args.dataset} images "
          f"for {args.epochs} epoch(s)", file=sys.stderr)
    os.makedirs(dense_dir, exist_ok=True)
    finished = lambda folder, marker: os.path.isfile(os.path.join(folder, marker)) and \
        os.path.isfile(os.path.join(folder, "eval", "eval.json"))
    if args.resume and finished(dense_dir, "train.json"):
        # --resume after an interruption in a later step: the dense model is done (exported bit-exactly).
        dense, _ = load_model_folder(dense_dir)
        print("[demo] dense model already trained (--resume): reusing it", file=sys.stderr)
    else:
        dense = build_from_spec(spec)
        checkpointer = Checkpointer(os.path.join(dense_dir, DENSE_CHECKPOINT))
        history = fit_dense(dense, train_loader, test_loader, generator, args, checkpointer, label="dense")
        save_model_folder(dense, spec, dense_dir, extra={"stage": "train", "algorithm": None})
        dense_test = evaluate(dense, test_loader, desc="test", progress=args.progress)
        _eval_into(dense_dir, args, "dense", test)
        write_json(os.path.join(dense_dir, "train.json"), {"command": "demo", "history": history,
                                                           "test_accuracy": dense_test["accuracy"]})
        checkpointer.remove()
    folders = [dense_dir]
    print(f"[demo] dense: done at {time.perf_counter() - began:.0f} s", file=sys.stderr)

    # 2. every method that exists, from the same dense weights, on the first --algo-limit training images
    algo_set = train if args.algo_limit >= len(train) else Subset(train, range(args.algo_limit))
    algo_generator = torch.Generator().manual_seed(args.seed)
    algo_loader = DataLoader(algo_set, batch_size=args.batch_size, shuffle=True, generator=algo_generator)
    not_run, failed = {}, {}
    for method in args.methods:
        if method not in registry:
            not_run[method] = "not available: sparsesam.algorithms has no such algorithm in this installation"
            print(f"[demo] {method}: not available, not run", file=sys.stderr)
            continue
        folder = os.path.join(out, method)
        if args.resume and finished(folder, "prune.json"):
            print(f"[demo] {method}: already done (--resume)", file=sys.stderr)
            folders.append(folder)
            continue
        os.makedirs(folder, exist_ok=True)
        algorithm = registry[method]
        defaults = {name: args.algo_epochs for name in epoch_fields(algorithm)}
        defaults.update(seed=args.seed, attack_steps=args.algo_attack_steps, execution=args.execution)
        # AdaSAP prunes whole channels: 90% of the channels is not the
        # same model size as 90% of the weights, and leaves almost
        # nothing of a small CNN; it gets its own (channel) target.
        target = args.channel_sparsity if method in STRUCTURED_METHODS else args.sparsity
        defaults.update(short_run_settings(method, target))
        defaults.update({k: v for k, v in settings.items()})
        try:
            config = build_config(algorithm, target, defaults=_typed(algorithm, defaults))
            print(f"[demo] {method}: {config}", file=sys.stderr)
            seed_everything(args.seed)
            algo_generator.manual_seed(args.seed)  # every method sees the same batches
            prune_model(copy.deepcopy(dense), spec, method, config, algo_loader, test_loader, folder,
                        progress=args.progress, registry=registry,
                        extra={"source": dense_dir, "dataset": args.dataset, "model": args.model})
            _eval_into(folder, args, method, test)
            folders.append(folder)
            print(f"[demo] {method}: done at {time.perf_counter() - began:.0f} s", file=sys.stderr)
        except ConfigError:
            raise
        except Exception as error:  # report the failure and go on with the other methods
            failed[method] = f"failed: {type(error).__name__}: {error}"
            traceback.print_exc()
            print(f"[demo] {method}: {failed[method]}", file=sys.stderr)
    report = reporting.write_report(reporting.collect_runs(folders), out, not_run={**not_run, **failed},
                                    title=f"sparsesam demo: {args.model} on {args.dataset} at "
                                          f"{100 * args.sparsity:.0f}% sparsity")
    report["seconds"] = time.perf_counter() - began
    write_json(os.path.join(out, "report.json"), report)
    with open(os.path.join(out, "report.md")) as f:
        table = f.read().split("## Figures")[0]
    print(table.rstrip())
    print(f"\n[demo] {report['seconds']:.0f} s; report.json, report.md and plots in {out}")
    if failed:
        raise RuntimeError(f"{len(failed)} method(s) failed: {', '.join(failed)}")
    return report


def _typed(algorithm, values):
    """Demo defaults are ints / floats already; --set strings are parsed like prune's --set."""
    from ..algorithms.registry import config_class, parse_value
    import dataclasses
    cls = config_class(algorithm)
    base = {f.name: f.default for f in dataclasses.fields(cls)}
    return {k: (parse_value(v, base.get(k)) if isinstance(v, str) else v) for k, v in values.items()}


def add_parser(sub) -> argparse.ArgumentParser:
    from .common import positive_int
    from .train import add_optimizer_arguments
    parser = sub.add_parser("demo", help="train, prune with magnitude / AdaSAP / HARP / C-SAM, evaluate, report "
                                         "(about 10 minutes on 2 CPU cores)")
    parser.add_argument("--out", default="./demo-out")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: Debian's package)")
    parser.add_argument("--image-size", type=positive_int, default=None, help="digits / synthetic only")
    parser.add_argument("--model", default="smallcnn")
    add_number(parser, "--width", POSITIVE, default=0.5, help="multiplier of the paper's channel counts")
    parser.add_argument("--limit", type=positive_int, default=10000, help="training images used")
    parser.add_argument("--test-limit", type=positive_int, default=1000, help="test images used")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    add_number(parser, "--sparsity", FRACTION, default=0.9, help="weight sparsity of the unstructured methods")
    add_number(parser, "--channel-sparsity", FRACTION, default=0.5,
               help="fraction of channels the structured method (adasap) removes")
    parser.add_argument("--methods", type=_methods, default=list(DEFAULT_METHODS))
    parser.add_argument("--algo-limit", type=positive_int, default=2000,
                        help="training images the pruning algorithms use (their epochs cost several passes)")
    parser.add_argument("--algo-epochs", type=int, default=1, help="every '*epochs' field of the algorithms' configs")
    parser.add_argument("--algo-attack-steps", type=int, default=2,
                        help="PGD steps of adversarial training (HARP, HYDRA)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="set a config field of every algorithm that has it (repeatable)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    add_execution_argument(parser, "auto", "the algorithms' fine-tuning and every evaluation (AdaSAP's model "
                                           "fine-tunes and runs compacted)")
    add_optimizer_arguments(parser, epochs=2, what="training of the starting model")
    add_robustness_arguments(parser, examples=200)
    # Headline robustness on small subsets: one severity of five corruptions, PGD at one eps, smoothing and
    # CC-Cert on 30 images (raise them for tighter numbers).
    parser.set_defaults(func=run_demo, severities=[3], pgd_eps=[0.0, 0.05], pgd_steps=5, radii=[0.0, 0.25, 0.5],
                        smoothing_examples=30, smoothing_n0=16, smoothing_n=100, cc_examples=30, cc_samples=32,
                        latency_repeats=10)
    return parser
