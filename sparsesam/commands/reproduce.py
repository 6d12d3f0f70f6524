"""``sparsesam reproduce``: the three papers' comparisons on Fashion-MNIST, over several seeds, resumable.

For every seed: one dense model (trained once, shared by every method of
that seed), then every method of every chosen comparison from a copy of
it, then the measurements that comparison's paper reports. Each finished
run is written atomically as ``run.json`` in its own folder; a rerun with
the same --out skips finished runs and continues an interrupted one from
its last epoch checkpoint. At the end (or with --report-only, from
whatever has finished) the runs are aggregated into RESULTS.md (mean ± std
and min–max over seeds), results.json and PNG figures.

Running time: the default budgets were sized on 2 CPU cores (see the
subcommand's help); --quick shrinks every budget to seconds, for tests.
"""
from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
import time
from typing import Any, Dict, List

import torch
from torch.utils.data import DataLoader, Subset

from ..checkpoint import Checkpointer
from ..training import evaluate
from .common import (ConfigError, add_execution_argument, build_from_spec, check_execution, load_data, make_loaders,
                     model_spec, prepare_out, read_json, seed_everything, write_json)
from .evaluate import evaluate_model
from .export import load_compacted, load_model_folder, save_model_folder
from .prune import prune_model, with_execution
from .registry import algorithm_registry, get_algorithm
from .reproduce_plan import COMPARISONS, BUDGETS, check_budgets, method_config, resolve_budgets
from .reproduce_report import write_study_report
from .train import CHECKPOINT, check_optimizer_arguments, fit_dense

STUDY_FILE = "study.json"
RUN_FILE = "run.json"
# Measured as the process's CPU time (one thread) of the study in docs/reproduce, run under load; on a quiet
# machine the wall time with --threads 1 is about the CPU time. Printed by --help.
MEASURED = "about 36 CPU-minutes with the default budgets, i.e. about 40 minutes on a quiet core with --threads 1"


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


def run_folder(out: str, seed: int, comparison: str, method: str, sparsity: float) -> str:
    return os.path.join(out, f"seed{seed}", comparison, f"{method}-{round(100 * sparsity):d}")


def _check_study(out: str, budgets: Dict[str, Any]) -> None:
    """A rerun into the same --out must use the same budgets (seeds and comparisons may be added)."""
    path = os.path.join(out, STUDY_FILE)
    if os.path.isfile(path):
        before = read_json(path)["budgets"]
        from .common import jsonable
        changed = sorted(k for k in set(before) | set(budgets) if jsonable(before.get(k)) != jsonable(budgets.get(k)))
        if changed:
            raise ConfigError(f"{out} holds a study with other budgets ({', '.join(changed)}): "
                              f"rerun with the same ones to continue it, or choose another --out")


def _eval_namespace(args: argparse.Namespace, measures, name: str) -> argparse.Namespace:
    """The settings evaluate_model reads, with only the comparison's measurements switched on."""
    b = args
    return argparse.Namespace(
        name=name, progress=False, batch_size=256, seed=0, latency_batch=8, latency_repeats=1,
        corruptions=list(b.corruptions) if "corruptions" in measures else [], severities=list(b.severities),
        corruption_examples=b.test_limit,
        pgd="pgd" in measures, pgd_eps=list(b.pgd_eps), pgd_steps=b.pgd_steps, pgd_examples=b.test_limit,
        smoothing="smoothing" in measures, sigma=b.sigma, smoothing_n0=b.smoothing_n0, smoothing_n=b.smoothing_n,
        alpha=b.alpha, radii=list(b.radii), smoothing_examples=b.smoothing_examples, smoothing_batch=500,
        cc_cert="cc_cert" in measures, cc_transforms=list(b.cc_transforms), cc_eps=list(b.cc_eps),
        cc_samples=b.cc_samples, cc_examples=b.cc_examples, execution=b.execution)


def _compact_record(evaluation: Dict[str, Any]) -> Dict[str, Any]:
    """The evaluation without per-example data (kept in the run folder's eval.json)."""
    record = {k: v for k, v in evaluation.items() if k not in ("smoothing", "cc_cert", "latency", "latency_dense")}
    if "smoothing" in evaluation:
        s = evaluation["smoothing"]
        record["smoothing"] = {**s["curve"], "n0": s["n0"], "n": s["n"], "alpha": s["alpha"],
                               "examples": s["examples"]}
    if "cc_cert" in evaluation:
        c = evaluation["cc_cert"]
        record["cc_cert"] = {**{k: v for k, v in c.items() if k != "transforms"},
                             "transforms": {t: {k: v for k, v in r.items() if k != "bounds"}
                                            for t, r in c["transforms"].items()}}
    return record


def _dense(args, seed: int, spec, train, test, out: str):
    """The seed's dense model: trained once (resumable), then read back from its folder by every later run."""
    folder = os.path.join(out, f"seed{seed}", "dense")
    marker = os.path.join(folder, "train.json")
    if os.path.isfile(marker):
        return load_model_folder(folder)[0], read_json(marker)
    os.makedirs(folder, exist_ok=True)
    seed_everything(seed)
    train_loader, test_loader, generator = make_loaders(train, test, args.batch_size, seed)
    model = build_from_spec(spec)
    checkpointer = Checkpointer(os.path.join(folder, CHECKPOINT))
    began, cpu_began = time.perf_counter(), time.process_time()
    history = fit_dense(model, train_loader, test_loader, generator, args, checkpointer, label=f"dense seed {seed}")
    save_model_folder(model, spec, folder, extra={"stage": "train", "algorithm": None, "seed": seed})
    accuracy = evaluate(model, test_loader, progress=False)["accuracy"]
    # seconds: this process's share (an interrupted and resumed training counts only its last part).
    info = {"seed": seed, "history": history, "test_accuracy": accuracy, "seconds": time.perf_counter() - began,
            "cpu_seconds": time.process_time() - cpu_began}
    write_json(marker, info)
    checkpointer.remove()
    return load_model_folder(folder)[0], info


def _one_run(args, registry, comparison, method: str, sparsity: float, seed: int, dense, dense_info, spec,
             algo_set, test, folder: str) -> Dict[str, Any]:
    os.makedirs(folder, exist_ok=True)
    algorithm = get_algorithm(method, registry)
    config = with_execution(method_config(comparison, method, sparsity, algorithm, seed, vars(args)),
                            args.execution)
    began, cpu_began = time.perf_counter(), time.process_time()
    if not os.path.isfile(os.path.join(folder, "prune.json")):
        seed_everything(seed)
        generator = torch.Generator().manual_seed(seed)  # every method of the seed sees the same batches
        loader = DataLoader(algo_set, batch_size=args.batch_size, shuffle=True, generator=generator)
        test_loader = DataLoader(test, batch_size=512, shuffle=False)
        prune_model(copy.deepcopy(dense), spec, method, config, loader, test_loader, folder, progress=args.progress,
                    registry=registry, extra={"seed": seed, "comparison": comparison.key})
    pruned = read_json(os.path.join(folder, "prune.json"))
    fitted = time.perf_counter()
    model, info = load_model_folder(folder)
    seed_everything(seed)
    evaluation = evaluate_model(model, info, test, _eval_namespace(args, comparison.measures, method),
                                load_compacted(folder, info))
    write_json(os.path.join(folder, "eval.json"), evaluation)
    summary = pruned.get("summary", {})
    return {"comparison": comparison.key, "method": method, "target_sparsity": sparsity, "seed": seed,
            "unit": comparison.unit, "sparsity": summary.get("sparsity", pruned["sparsity"]),
            "weight_sparsity": info["sparsity"], "config": pruned["config"],
            "dense_test_accuracy": dense_info["test_accuracy"],
            "fit_seconds": pruned["fit_seconds"], "eval_seconds": time.perf_counter() - fitted,
            "run_seconds_this_call": time.perf_counter() - began,
            # CPU time of this process (all threads): what the run costs on a quiet machine, whatever the load.
            "cpu_seconds_this_call": time.process_time() - cpu_began, **_compact_record(evaluation)}


def run_reproduce(args: argparse.Namespace, registry=None) -> dict:
    began = time.perf_counter()
    check_execution(args.execution)
    budgets = resolve_budgets(args)
    check_budgets(budgets)
    check_optimizer_arguments(args)
    budgets.update({k: getattr(args, k) for k in ("lr", "momentum", "weight_decay", "sam_rho", "adaptive")})
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    registry = algorithm_registry() if registry is None else registry
    wanted = [COMPARISONS[key] for key in args.comparisons]
    missing = sorted({m for c in wanted for m in c.methods if m not in registry})
    if missing:
        raise ConfigError(f"algorithm(s) {missing} are not available in this installation")
    for name in ("algo_limit", "test_limit", "limit"):
        if budgets[name] < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {budgets[name]}")
    if budgets["algo_limit"] > budgets["limit"]:
        raise ConfigError(f"--algo-limit ({budgets['algo_limit']}) must not exceed --limit ({budgets['limit']})")
    out = prepare_out(args.out)
    _check_study(out, budgets)
    argv = getattr(args, "_argv", None)
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["sparsesam", *(shlex.quote(a) for a in argv)])
    study = {"budgets": budgets, "seeds": args.seeds, "comparisons": args.comparisons}
    if os.path.isfile(os.path.join(out, STUDY_FILE)):
        prior = read_json(os.path.join(out, STUDY_FILE))
        study["seeds"] = sorted(set(prior.get("seeds", [])) | set(args.seeds))
        study["comparisons"] = [k for k in COMPARISONS if k in set(prior.get("comparisons", [])) | set(args.comparisons)]
        study["invocations"] = prior.get("invocations", [])
    from .reproduce_report import git_commit
    study.setdefault("invocations", []).append({"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                             time.gmtime()),
                                                "threads": torch.get_num_threads(), "commit": git_commit(),
                                                "report_only": bool(args.report_only)})
    write_json(os.path.join(out, STUDY_FILE), study)

    if not args.report_only:
        image_size = budgets["image_size"] if budgets["dataset"] in ("digits", "synthetic") else None
        train, _ = load_data(budgets["dataset"], args.data_dir, budgets["limit"], image_size)
        _, test = load_data(budgets["dataset"], args.data_dir, budgets["test_limit"], image_size)
        algo_set = train if budgets["algo_limit"] >= len(train) else Subset(train, range(budgets["algo_limit"]))
        spec = model_spec(budgets["model"], budgets["width"], train.info)
        total = len(args.seeds) * sum(len(c.methods) * len(c.sparsities) for c in wanted)
        done = 0
        dense: Dict[int, tuple] = {}  # seed -> (model, info): trained once, shared by every method of the seed
        # Comparison by comparison, every seed of one before the next: a study stopped early has whole
        # comparisons (with their spread over seeds) rather than every comparison on one seed.
        for comparison in wanted:
            for seed in args.seeds:
                for sparsity in comparison.sparsities:
                    for method in comparison.methods:
                        done += 1
                        folder = run_folder(out, seed, comparison.key, method, sparsity)
                        label = f"[reproduce] {done}/{total} {comparison.key} seed {seed} {method} @ {sparsity:g}"
                        if os.path.isfile(os.path.join(folder, RUN_FILE)):
                            print(f"{label}: done before, skipped", file=sys.stderr)
                            continue
                        if seed not in dense:
                            dense[seed] = _dense(args, seed, spec, train, test, out)
                        dense_model, dense_info = dense[seed]
                        t0 = time.perf_counter()
                        record = _one_run(args, registry, comparison, method, sparsity, seed, dense_model,
                                          dense_info, spec, algo_set, test, folder)
                        record["dense_seconds"] = dense_info.get("seconds")
                        write_json(os.path.join(folder, RUN_FILE), record)
                        print(f"{label}: clean {record['clean_accuracy']:.4f}, sparsity {record['sparsity']:.3f}, "
                              f"{time.perf_counter() - t0:.0f} s (fit {record['fit_seconds']:.0f} s)",
                              file=sys.stderr, flush=True)
    report_dir = args.report_dir or out
    report = write_study_report(out, report_dir, study, command=command,
                                wall_seconds=time.perf_counter() - began)
    print(f"[reproduce] {report['finished_runs']}/{report['planned_runs']} runs finished; "
          f"{os.path.join(report_dir, 'RESULTS.md')}, results.json and figures written "
          f"({time.perf_counter() - began:.0f} s this call)")
    return report


def add_parser(sub) -> argparse.ArgumentParser:
    from .train import add_optimizer_arguments
    from .evaluate import _floats, _ints as _int_list, _names, _positive_int
    parser = sub.add_parser(
        "reproduce",
        help=f"the AdaSAP / HARP / C-SAM comparisons on Fashion-MNIST over seeds ({MEASURED}; resumable)",
        description="Runs the three papers' comparisons (adasap: AdaSAP vs magnitude vs SAM+prune at 50%%/70%% of "
                    "channels, clean and corruption accuracy; harp: HARP vs HYDRA vs magnitude at 90%%/99%%, "
                    "clean and PGD accuracy; csam: C-SAM vs magnitude vs SAM masks at 90%%, clean, smoothing and "
                    f"CC-Cert certified accuracy) for every seed. Default budgets: {MEASURED}. A rerun with the "
                    "same --out skips finished runs and resumes an interrupted one.")
    parser.add_argument("--out", default="./reproduce-out", help="study folder (runs, results, figures)")
    parser.add_argument("--report-dir", default=None, help="where RESULTS.md, results.json and figures go "
                                                           "(default: --out)")
    parser.add_argument("--report-only", action="store_true",
                        help="only aggregate the runs already finished in --out (no training)")
    parser.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="comma-separated (default 0,1,2)")
    parser.add_argument("--comparisons", type=_comparisons, default=list(COMPARISONS),
                        help=f"comma-separated subset of {','.join(COMPARISONS)}")
    parser.add_argument("--quick", action="store_true", help="tiny budgets on digits (seconds; for tests)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: Debian's package)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    full = {name: values[0] for name, values in BUDGETS.items()}
    budgets = parser.add_argument_group("budgets (default: the full study's; --quick: tiny ones)")
    budgets.add_argument("--dataset", default=None, help=f"default {full['dataset']}")
    budgets.add_argument("--image-size", type=_positive_int, default=None, help="digits / synthetic only")
    budgets.add_argument("--model", default=None, help=f"default {full['model']}")
    budgets.add_argument("--width", type=float, default=None, help=f"width multiplier, default {full['width']}")
    budgets.add_argument("--limit", type=_positive_int, default=None,
                         help=f"training images of the dense model (default {full['limit']})")
    budgets.add_argument("--algo-limit", type=_positive_int, default=None,
                         help=f"training images of the pruning algorithms (default {full['algo_limit']})")
    budgets.add_argument("--test-limit", type=_positive_int, default=None,
                         help=f"test images for clean, corruption and PGD accuracy (default {full['test_limit']})")
    budgets.add_argument("--batch-size", type=_positive_int, default=None)
    budgets.add_argument("--algo-epochs", type=_positive_int, default=None,
                         help=f"epochs of every algorithm phase (magnitude fine-tunes twice as long; "
                              f"default {full['algo_epochs']})")
    budgets.add_argument("--attack-steps", type=_positive_int, default=None,
                         help=f"PGD steps of adversarial training, harp comparison (default {full['attack_steps']})")
    budgets.add_argument("--adv-eps", type=float, default=None,
                         help=f"L-inf eps of adversarial training (default {full['adv_eps']})")
    budgets.add_argument("--pgd-eps", type=_floats, default=None, help=f"evaluation eps (default {full['pgd_eps']})")
    budgets.add_argument("--pgd-steps", type=_positive_int, default=None)
    budgets.add_argument("--corruptions", type=_names, default=None)
    budgets.add_argument("--severities", type=_int_list, default=None)
    budgets.add_argument("--sigma", type=float, default=None, help="randomized-smoothing noise level")
    budgets.add_argument("--smoothing-examples", type=_positive_int, default=None)
    budgets.add_argument("--smoothing-n0", type=_positive_int, default=None)
    budgets.add_argument("--smoothing-n", type=_positive_int, default=None)
    budgets.add_argument("--alpha", type=float, default=None)
    budgets.add_argument("--radii", type=_floats, default=None)
    budgets.add_argument("--cc-examples", type=_positive_int, default=None)
    budgets.add_argument("--cc-samples", type=_positive_int, default=None)
    budgets.add_argument("--cc-transforms", type=_names, default=None)
    budgets.add_argument("--cc-eps", type=_floats, default=None)
    add_optimizer_arguments(parser, epochs=None, what="training of each seed's starting model")
    add_execution_argument(parser, "auto", "the algorithms' fixed-mask phases and every evaluation (not a budget: "
                                           "a rerun may change it)")
    parser.set_defaults(func=run_reproduce)
    return parser
