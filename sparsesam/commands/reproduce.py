"""``sparsesam reproduce``: the flags of the study (sparsesam.study), and the call that runs it."""
from __future__ import annotations

import argparse
from typing import List

from .._validate import OPEN_PROBABILITY, POSITIVE, PROBABILITY, Range
from ..study.plan import BUDGETS, COMPARISONS
from ..study.run import run_study
from .common import add_execution_argument, add_number, finite_float_list, int_list, name_list, positive_int
from .train import add_optimizer_arguments

# Measured on this project's 2-core machine; the arithmetic is in docs/reproduce/README.md ("Cost").
MEASURED = "about 6 CPU-hours with the default budgets: about 3 hours with --workers 2 on 2 quiet cores"


def _ints(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _comparisons(text: str) -> List[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in COMPARISONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown comparison(s) {unknown or text!r}; choose from {list(COMPARISONS)}")
    return names


def run_reproduce(args: argparse.Namespace, registry=None) -> dict:
    """Run the study with the parsed flags (``registry``: the algorithms, default the package's)."""
    return run_study(args, registry)


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "reproduce",
        help=f"the AdaSAP / HARP / C-SAM comparisons and ablations on Fashion-MNIST over seeds ({MEASURED}; "
             f"resumable)",
        description="Runs the three papers' comparisons and the ablations that isolate each paper's mechanism "
                    "(adasap: AdaSAP vs ASAM+prune vs magnitude at 50%%/70%% of channels, clean and corruption "
                    "accuracy; csam: C-SAM vs C-SAM with rho=0 vs magnitude vs SAM masks at 90%%, from a "
                    "noise-trained model, smoothing and CC-Cert certified accuracy; harp: HARP vs HYDRA vs "
                    "magnitude at 90%%/99%%, from a PGD-trained model, clean and PGD accuracy) for every seed. "
                    f"Default budgets: {MEASURED}. A rerun with the same --out skips finished tasks and resumes "
                    "an interrupted one.")
    parser.add_argument("--out", default="./reproduce-out", help="study folder (runs, results, figures)")
    parser.add_argument("--report-dir", default=None, help="where RESULTS.md, results.json and figures go "
                                                           "(default: --out)")
    parser.add_argument("--report-only", action="store_true",
                        help="only aggregate the runs already finished in --out (no training)")
    parser.add_argument("--seeds", type=_ints, default=[0, 1, 2, 3, 4], help="comma-separated (default 0,1,2,3,4)")
    parser.add_argument("--comparisons", type=_comparisons, default=list(COMPARISONS),
                        help=f"comma-separated subset of {','.join(COMPARISONS)}")
    parser.add_argument("--quick", action="store_true", help="tiny budgets on digits (seconds; for tests)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per worker")
    parser.add_argument("--workers", type=int, default=1, help="tasks run at a time, each in its own process")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: Debian's package)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    full = {name: values[0] for name, values in BUDGETS.items()}
    budgets = parser.add_argument_group("budgets (default: the full study's; --quick: tiny ones)")
    budgets.add_argument("--dataset", default=None, help=f"default {full['dataset']}")
    budgets.add_argument("--image-size", type=positive_int, default=None, help="digits / synthetic only")
    budgets.add_argument("--model", default=None, help=f"default {full['model']}")
    add_number(budgets, "--width", POSITIVE, default=None,
               help=f"width multiplier of the adasap and harp comparisons' models, default {full['width']}")
    add_number(budgets, "--certified-width", POSITIVE, default=None,
               help=f"width multiplier of the csam comparison's models, default {full['certified_width']}")
    budgets.add_argument("--limit", type=positive_int, default=None,
                         help=f"training images of the dense models (default {full['limit']})")
    budgets.add_argument("--val-limit", type=positive_int, default=None,
                         help=f"held-out training images (the last ones) for the dense plateau rule "
                              f"(default {full['val_limit']})")
    budgets.add_argument("--algo-limit", type=positive_int, default=None,
                         help=f"training images of the pruning algorithms (default {full['algo_limit']})")
    budgets.add_argument("--test-limit", type=positive_int, default=None,
                         help=f"test images for clean, corruption and PGD accuracy (default {full['test_limit']})")
    budgets.add_argument("--batch-size", type=positive_int, default=None)
    budgets.add_argument("--dense-max-epochs", type=positive_int, default=None,
                         help=f"cap of the dense trainings (default {full['dense_max_epochs']})")
    budgets.add_argument("--dense-patience", type=positive_int, default=None,
                         help=f"plateau: epochs without a gain of --dense-min-delta (default {full['dense_patience']})")
    add_number(budgets, "--dense-min-delta", PROBABILITY, default=None,
               help=f"plateau: the smallest validation-accuracy gain that counts (default {full['dense_min_delta']})")
    budgets.add_argument("--algo-epochs", type=positive_int, default=None,
                         help=f"epochs of every algorithm phase (magnitude fine-tunes twice as long; "
                              f"default {full['algo_epochs']})")
    budgets.add_argument("--attack-steps", type=positive_int, default=None,
                         help=f"PGD steps of adversarial training, harp comparison (default {full['attack_steps']})")
    add_number(budgets, "--adv-eps", Range(0.0, 1.0, low_open=True), default=None,
               help=f"L-inf eps of adversarial training (default {full['adv_eps']})")
    budgets.add_argument("--pgd-eps", type=finite_float_list, default=None,
                         help=f"evaluation eps (default {full['pgd_eps']})")
    budgets.add_argument("--pgd-steps", type=positive_int, default=None)
    budgets.add_argument("--corruptions", type=name_list, default=None)
    budgets.add_argument("--severities", type=int_list, default=None)
    add_number(budgets, "--sigma", POSITIVE, default=None,
               help="randomized-smoothing noise level (also the csam comparison's training noise)")
    budgets.add_argument("--smoothing-examples", type=positive_int, default=None)
    budgets.add_argument("--smoothing-n0", type=positive_int, default=None)
    budgets.add_argument("--smoothing-n", type=positive_int, default=None)
    add_number(budgets, "--alpha", OPEN_PROBABILITY, default=None, help="failure probability of the certificates")
    budgets.add_argument("--radii", type=finite_float_list, default=None)
    budgets.add_argument("--cc-examples", type=positive_int, default=None)
    budgets.add_argument("--cc-samples", type=positive_int, default=None)
    budgets.add_argument("--cc-transforms", type=name_list, default=None)
    budgets.add_argument("--cc-eps", type=finite_float_list, default=None)
    add_optimizer_arguments(parser, epochs=None, what="training of each seed's starting models")
    add_execution_argument(parser, "auto", "the algorithms' fixed-mask phases and every evaluation (not a budget: "
                                           "a rerun may change it)")
    parser.set_defaults(func=run_reproduce)
    return parser
