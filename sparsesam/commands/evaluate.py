"""``sparsesam eval``: clean accuracy, size, CPU latency and robustness of an exported model.

The measuring (forms, latency, the robustness measures) is the library's:
see ``sparsesam.evaluation``. This module holds the flags, their checks and
the run.
"""
from __future__ import annotations

import argparse
import os

from .. import robust
from .._extras import require
from .._validate import NON_NEGATIVE, OPEN_PROBABILITY, POSITIVE, Range, check_numbers
from ..data.cifar10c import CORRUPTIONS as CIFAR10C_CORRUPTIONS, find_cifar10c
from ..evaluation import evaluate_model
from ..model_files import load_compacted, load_model_folder, write_json
from ..robust.attacks_torchattacks import TORCHATTACKS
from ..run_setup import check_execution, dataset_key, is_sized, load_data, prepare_out, seed_everything
from .common import ConfigError, add_execution_argument, add_number, echo_config, int_list, name_list, positive_int

RESULT = "eval.json"
# The robustness flags' ranges: checked when parsed, and again on namespaces built in code (demo, reproduce).
ROBUSTNESS_FLAGS = {"--pgd-eps": NON_NEGATIVE, "--sigma": POSITIVE, "--alpha": OPEN_PROBABILITY,
                    "--radii": NON_NEGATIVE, "--cc-eps": Range(0.0, 1.0, low_open=True)}


def check_eval_arguments(args: argparse.Namespace) -> None:
    check_execution(getattr(args, "execution", None))
    if getattr(args, "pgd", False) and getattr(args, "attack", "pgd") in TORCHATTACKS:
        try:  # before any measurement: a missing extra is one line, not a failure half-way through
            require("torchattacks", extra="attacks", purpose=f"--attack {args.attack}")
        except ImportError as error:
            raise ConfigError(str(error)) from error
    cifar10c = getattr(args, "cifar10c", None)
    known = CIFAR10C_CORRUPTIONS if cifar10c else robust.CORRUPTIONS
    for name in args.corruptions:
        if name not in known:
            raise ConfigError(f"unknown corruption {name!r}; choose from {list(known)}")
    if cifar10c and args.corruptions:
        try:
            find_cifar10c(cifar10c)
        except FileNotFoundError as error:
            raise ConfigError(f"--cifar10c: {error}") from error
    for s in args.severities:
        if not 1 <= s <= 5:
            raise ConfigError(f"--severities must be in 1..5, got {s}")
    check_numbers(args, ROBUSTNESS_FLAGS)
    for name in args.cc_transforms:
        if name not in robust.TRANSFORMS:
            raise ConfigError(f"unknown CC-Cert transform {name!r}; choose from {list(robust.TRANSFORMS)}")


def run_eval(args: argparse.Namespace) -> dict:
    check_eval_arguments(args)
    model, info = load_model_folder(args.model_dir)
    compacted = load_compacted(args.model_dir, info)
    spec = info["spec"]
    dataset = dataset_key(args.dataset or spec["dataset"])
    if dataset != spec["dataset"]:
        raise ConfigError(f"{args.model_dir} holds a {spec['dataset']} model; it cannot be evaluated on {dataset}")
    image_size = spec["image_size"] if is_sized(dataset) else None
    test = load_data(dataset, args.data_dir, args.limit, image_size, split="test")
    out = prepare_out(args.out or os.path.join(args.model_dir, "eval"))
    echo_config(args, out)
    seed_everything(args.seed)
    result = evaluate_model(model, info, test, args, compacted)
    result["model_dir"] = os.path.abspath(args.model_dir)
    write_json(os.path.join(out, RESULT), result)
    print(f"eval {result['name']}: accuracy {result['clean_accuracy']:.4f}, sparsity {result['sparsity']:.4f}; "
          f"results in {os.path.join(out, RESULT)}")
    return result


def add_robustness_arguments(parser: argparse.ArgumentParser, *, examples: int = 200) -> None:
    group = parser.add_argument_group("robustness (each on the first N test images)")
    group.add_argument("--no-corruptions", dest="corruptions_on", action="store_false")
    group.add_argument("--corruptions", type=name_list,
                       default=["gaussian_noise", "defocus_blur", "fog", "contrast", "pixelate"],
                       help="comma-separated names of sparsesam.robust.CORRUPTIONS")
    group.add_argument("--severities", type=int_list, default=[1, 3, 5])
    group.add_argument("--corruption-examples", type=positive_int, default=examples)
    group.add_argument("--cifar10c", default=None, metavar="DIR",
                       help="score the corruptions on the released CIFAR-10-C files in DIR (<corruption>.npy, "
                            "labels.npy) instead of corrupting the test images here (CIFAR-10 models)")
    group.add_argument("--no-pgd", dest="pgd", action="store_false")
    add_number(group, "--pgd-eps", ROBUSTNESS_FLAGS["--pgd-eps"], many=True, default=[0.0, 0.01, 0.03, 0.1],
               help="L-inf budgets")
    group.add_argument("--pgd-steps", type=positive_int, default=10, help="iterations of pgd and apgd-*")
    group.add_argument("--attack", default="pgd", choices=robust.ATTACKS,
                       help="the attack of the adversarial measurement: our pgd / fgsm, or torchattacks' "
                            "(pip install 'sparsesam[attacks]'): autoattack (the standard ensemble at its official "
                            "settings, as papers report it), apgd-ce, apgd-dlr, apgd-t, fab-t, square")
    group.add_argument("--pgd-examples", type=positive_int, default=examples)
    group.add_argument("--no-smoothing", dest="smoothing", action="store_false")
    add_number(group, "--sigma", ROBUSTNESS_FLAGS["--sigma"], default=0.25, help="randomized-smoothing noise level")
    group.add_argument("--smoothing-n0", type=positive_int, default=32)
    group.add_argument("--smoothing-n", type=positive_int, default=256, help="Monte-Carlo samples per image")
    add_number(group, "--alpha", ROBUSTNESS_FLAGS["--alpha"], default=0.001,
               help="failure probability of a smoothing certificate")
    add_number(group, "--radii", ROBUSTNESS_FLAGS["--radii"], many=True, default=[0.0, 0.1, 0.25, 0.5, 0.75],
               help="L2 radii of the certified-accuracy curve")
    group.add_argument("--smoothing-examples", type=positive_int, default=min(examples, 50))
    group.add_argument("--smoothing-batch", type=positive_int, default=256)
    group.add_argument("--no-cc-cert", dest="cc_cert", action="store_false")
    group.add_argument("--cc-transforms", type=name_list, default=["rotation", "brightness", "contrast"])
    add_number(group, "--cc-eps", ROBUSTNESS_FLAGS["--cc-eps"], many=True, default=[0.01, 0.05, 0.1],
               help="failure probabilities")
    group.add_argument("--cc-samples", type=positive_int, default=100)
    group.add_argument("--cc-examples", type=positive_int, default=min(examples, 50))
    group.add_argument("--latency-batch", type=positive_int, default=64)
    group.add_argument("--latency-repeats", type=positive_int, default=10)


def normalize_robustness_arguments(args: argparse.Namespace) -> None:
    """``--no-corruptions`` empties the corruption list (one switch per measurement)."""
    if not args.corruptions_on:
        args.corruptions = []


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser("eval", help="accuracy, size, latency and robustness of a model folder")
    parser.add_argument("model_dir", help="a model folder written by 'sparsesam train' or 'sparsesam prune'")
    parser.add_argument("--out", default=None, help="output folder (default: MODEL_DIR/eval)")
    parser.add_argument("--name", default=None, help="label in reports (default: the algorithm, or 'dense')")
    parser.add_argument("--dataset", default=None, help="default: the dataset the model was trained on")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--limit", type=positive_int, default=None, help="use only the first N test images")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    add_execution_argument(parser, "auto", "the form every evaluation runs the model in (a structured model runs "
                                           "compacted)")
    add_robustness_arguments(parser)
    parser.set_defaults(func=_run_eval_normalized)
    return parser


def _run_eval_normalized(args: argparse.Namespace) -> dict:
    normalize_robustness_arguments(args)
    return run_eval(args)
