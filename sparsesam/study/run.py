"""The study (``sparsesam reproduce``): the three papers' comparisons on Fashion-MNIST, over seeds, resumable,
in parallel.

The study is a list of tasks: the dense starting models (one per seed and
kind, :mod:`sparsesam.study.dense`) and the runs (one per seed, comparison, method and
sparsity), each run depending on its seed's dense model. ``--workers N``
runs N tasks at a time in separate processes (each with ``--threads``
threads, default 1). Every task writes its results atomically into its own
folder; a rerun with the same --out skips finished tasks and continues an
interrupted one from its last epoch checkpoint. At the end (or with
--report-only, from whatever has finished) the runs are aggregated into
RESULTS.md (mean ± std over seeds, paired differences and tests),
results.json and PNG figures (:mod:`sparsesam.study.report`).
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import copy
import multiprocessing
import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch.utils.data import DataLoader, Subset

from .._validate import ConfigError
from ..algorithms.registry import algorithm_registry, get_algorithm
from ..evaluation import evaluate_model
from ..model_files import jsonable, load_compacted, load_model_folder, model_spec, read_json, write_json
from ..pruning_run import prune_model, with_execution
from ..run_setup import check_execution, load_data, prepare_out, seed_everything
from ..training import check_optimizer_arguments
from .dense import dense_folder, train_dense, training_loader
from .plan import COMPARISONS, Comparison, check_budgets, dense_starts, method_config, resolve_budgets
from .report import RUN_FILE, git_commit, run_folder, write_study_report

STUDY_FILE = "study.json"
OPTIMIZER_FIELDS = ("lr", "momentum", "weight_decay", "sam_rho", "adaptive")


@dataclass(frozen=True)
class Task:
    """One unit of the study: a dense model (method None) or one method's run."""
    seed: int
    kind: str                            # the dense model's kind (a run: its comparison's start)
    comparison: Optional[str] = None
    method: Optional[str] = None
    sparsity: Optional[float] = None

    @property
    def is_dense(self) -> bool:
        return self.method is None

    def folder(self, out: str) -> str:
        if self.is_dense:
            return dense_folder(out, self.seed, self.kind)
        return run_folder(out, self.seed, self.comparison, self.method, self.sparsity)

    def done(self, out: str) -> bool:
        return os.path.isfile(os.path.join(self.folder(out), "train.json" if self.is_dense else RUN_FILE))

    def label(self) -> str:
        if self.is_dense:
            return f"dense-{self.kind} seed {self.seed}"
        return f"{self.comparison} seed {self.seed} {self.method} @ {self.sparsity:g}"


def plan_tasks(comparisons: List[Comparison], seeds: List[int]) -> List[Task]:
    """Comparison by comparison, every seed of one before the next (a study stopped early has whole comparisons,
    with their spread over seeds); each seed's dense model right before its first run."""
    tasks: List[Task] = []
    for comparison in comparisons:
        for seed in seeds:
            dense = Task(seed, comparison.start)
            if dense not in tasks:
                tasks.append(dense)
            for sparsity in comparison.sparsities:
                for method in comparison.labels:
                    tasks.append(Task(seed, comparison.start, comparison.key, method, sparsity))
    return tasks


def _check_study(out: str, budgets: Dict[str, Any]) -> None:
    """A rerun into the same --out must use the same budgets (seeds and comparisons may be added)."""
    path = os.path.join(out, STUDY_FILE)
    if os.path.isfile(path):
        before = read_json(path)["budgets"]
        changed = sorted(k for k in set(before) | set(budgets) if jsonable(before.get(k)) != jsonable(budgets.get(k)))
        if changed:
            raise ConfigError(f"{out} holds a study with other budgets ({', '.join(changed)}): "
                              f"rerun with the same ones to continue it, or choose another --out")


def _eval_namespace(b: Dict[str, Any], measures, name: str, execution: str) -> argparse.Namespace:
    """The settings evaluate_model reads, with only the comparison's measurements switched on."""
    return argparse.Namespace(
        name=name, progress=False, batch_size=256, seed=0, latency_batch=8, latency_repeats=1,
        corruptions=list(b["corruptions"]) if "corruptions" in measures else [], severities=list(b["severities"]),
        corruption_examples=b["test_limit"],
        pgd="pgd" in measures, pgd_eps=list(b["pgd_eps"]), pgd_steps=b["pgd_steps"], pgd_examples=b["test_limit"],
        smoothing="smoothing" in measures, sigma=b["sigma"], smoothing_n0=b["smoothing_n0"],
        smoothing_n=b["smoothing_n"], alpha=b["alpha"], radii=list(b["radii"]),
        smoothing_examples=b["smoothing_examples"], smoothing_batch=1000,
        cc_cert="cc_cert" in measures, cc_transforms=list(b["cc_transforms"]), cc_eps=list(b["cc_eps"]),
        cc_samples=b["cc_samples"], cc_examples=b["cc_examples"], execution=execution)


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


class Study:
    """The data, model spec and settings every task of one study needs (built once per process)."""

    def __init__(self, budgets: Dict[str, Any], settings: Dict[str, Any], registry=None) -> None:
        self.b, self.settings = budgets, settings
        self.registry = algorithm_registry() if registry is None else registry
        b = budgets
        image_size = b["image_size"] if b["dataset"] in ("digits", "synthetic") else None
        full, _ = load_data(b["dataset"], settings["data_dir"], None, image_size)
        _, self.test = load_data(b["dataset"], settings["data_dir"], b["test_limit"], image_size)
        if b["limit"] + b["val_limit"] > len(full):
            raise ConfigError(f"--limit ({b['limit']}) + --val-limit ({b['val_limit']}) exceed the {len(full)} "
                              f"training images of {b['dataset']}")
        self.train = Subset(full, range(b["limit"]))
        self.val = Subset(full, range(len(full) - b["val_limit"], len(full)))  # never trained on
        self.algo_set = Subset(full, range(b["algo_limit"]))
        # Each kind of dense model (and every run starting from it) has its comparison's width.
        self.specs = {kind: model_spec(b["model"], b[width], full.info) for kind, width in dense_starts().items()}
        self.optimizer_args = argparse.Namespace(**{k: budgets[k] for k in OPTIMIZER_FIELDS})
        # The code this process runs: read once, at its start (a later checkout does not change loaded modules).
        self.commit = git_commit()

    def dense(self, seed: int, kind: str):
        return train_dense(kind, seed, self.specs[kind], self.train, self.val, self.test, self.b, self.optimizer_args,
                           self.settings["out"], progress=self.settings["progress"])

    def run(self, task: Task) -> Dict[str, Any]:
        comparison = COMPARISONS[task.comparison]
        method = comparison.method(task.method)
        dense, dense_info = self.dense(task.seed, task.kind)
        folder = task.folder(self.settings["out"])
        os.makedirs(folder, exist_ok=True)
        algorithm = get_algorithm(method.algorithm, self.registry)
        execution = self.settings["execution"]
        config = with_execution(method_config(comparison, method, task.sparsity, algorithm, task.seed, self.b),
                                execution)
        began, cpu_began = time.perf_counter(), time.process_time()
        if not os.path.isfile(os.path.join(folder, "prune.json")):
            seed_everything(task.seed)
            # Every method of the seed sees the same batches (the same shuffling generator).
            loader, _ = training_loader(self.algo_set, self.b, task.seed, noise=comparison.train_noise)
            test_loader = DataLoader(self.test, batch_size=512, shuffle=False)
            prune_model(copy.deepcopy(dense), self.specs[task.kind], method.algorithm, config, loader, test_loader, folder,
                        progress=self.settings["progress"], registry=self.registry,
                        extra={"seed": task.seed, "comparison": comparison.key, "method": method.label})
        pruned = read_json(os.path.join(folder, "prune.json"))
        fitted = time.perf_counter()
        model, info = load_model_folder(folder)
        seed_everything(task.seed)
        evaluation = evaluate_model(model, info, self.test,
                                    _eval_namespace(self.b, comparison.measures, method.label, execution),
                                    load_compacted(folder, info))
        write_json(os.path.join(folder, "eval.json"), evaluation)
        summary = pruned.get("summary", {})
        return {"comparison": comparison.key, "method": method.label, "algorithm": method.algorithm,
                "target_sparsity": task.sparsity, "seed": task.seed, "unit": comparison.unit,
                "start": comparison.start, "train_noise": comparison.train_noise,
                "sparsity": summary.get("sparsity", pruned["sparsity"]), "weight_sparsity": info["sparsity"],
                "config": pruned["config"], "dense_test_accuracy": dense_info["test_accuracy"],
                "dense_epochs": dense_info["epochs"], "commit": self.commit,
                "fit_seconds": pruned["fit_seconds"], "phase_seconds": summary.get("phase_seconds", {}),
                "eval_seconds": time.perf_counter() - fitted,
                "run_seconds_this_call": time.perf_counter() - began,
                # CPU time of this process (all threads): what the run costs on a quiet machine, whatever the load.
                "cpu_seconds_this_call": time.process_time() - cpu_began, **_compact_record(evaluation)}

    def do(self, task: Task) -> str:
        """Run ``task`` (a finished one is skipped); returns the line to print."""
        if task.done(self.settings["out"]):
            return "done before, skipped"
        began = time.perf_counter()
        if task.is_dense:
            _, info = self.dense(task.seed, task.kind)
            return (f"test accuracy {info['test_accuracy']:.4f} after {info['epochs']} epoch(s) "
                    f"({'plateau' if info['plateaued'] else 'epoch cap'}), {time.perf_counter() - began:.0f} s")
        record = self.run(task)
        write_json(os.path.join(task.folder(self.settings["out"]), RUN_FILE), record)
        return (f"clean {record['clean_accuracy']:.4f}, sparsity {record['sparsity']:.3f}, "
                f"{time.perf_counter() - began:.0f} s (fit {record['fit_seconds']:.0f} s)")


_WORKER_STUDY: Optional[Study] = None


def _exit_with_parent(parent: int, every: float = 2.0) -> None:
    """End this worker when the study's process is gone (killed: no executor shutdown told the workers).

    Without it an orphaned worker finishes its task, and a restarted study
    would work on the same run folder at the same time.
    """
    while True:
        time.sleep(every)
        if os.getppid() != parent:
            os._exit(1)


def _start_worker(budgets: Dict[str, Any], settings: Dict[str, Any], parent: int) -> None:
    global _WORKER_STUDY
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    torch.set_num_threads(settings["threads"] or 1)
    _WORKER_STUDY = Study(budgets, settings)


def _work(task: Task) -> str:
    return _WORKER_STUDY.do(task)


def _ready(task: Task, finished) -> bool:
    """Dense models are always ready; a run once its seed's dense model is finished."""
    return task.is_dense or Task(task.seed, task.kind) in finished


def run_tasks(tasks: List[Task], study: Study) -> None:
    """Every task, ``settings["workers"]`` at a time; a failed task stops the study (after the running ones).

    With one worker the tasks run in this process on ``study``; with more,
    each worker process builds its own Study from the same budgets and settings.
    """
    budgets, settings = study.b, study.settings
    out = settings["out"]
    total = len(tasks)
    number = {task: i + 1 for i, task in enumerate(tasks)}

    def report(task: Task, line: str) -> None:
        print(f"[reproduce] {number[task]}/{total} {task.label()}: {line}", file=sys.stderr, flush=True)

    if settings["workers"] == 1:
        for task in tasks:
            report(task, study.do(task))
        return
    finished = {t for t in tasks if t.done(out)}
    for task in tasks:
        if task in finished:
            report(task, "done before, skipped")
    pending = [t for t in tasks if t not in finished]
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    with futures.ProcessPoolExecutor(settings["workers"], mp_context=context, initializer=_start_worker,
                                     initargs=(budgets, settings, os.getpid())) as pool:
        running: Dict[futures.Future, Task] = {}
        failure: Optional[BaseException] = None
        while pending or running:
            while failure is None and len(running) < settings["workers"]:
                task = next((t for t in pending if _ready(t, finished)), None)
                if task is None:
                    break
                pending.remove(task)
                running[pool.submit(_work, task)] = task
            if not running:
                break
            done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for future in done:
                task = running.pop(future)
                try:
                    report(task, future.result())
                    finished.add(task)
                except BaseException as error:  # noqa: BLE001 - reported, then raised after the running tasks
                    report(task, f"failed: {type(error).__name__}: {error}")
                    failure = failure or error
            if failure is not None:
                pending.clear()
        if failure is not None:
            raise failure


def run_study(args: argparse.Namespace, registry=None) -> dict:
    """``sparsesam reproduce`` with ``args`` (its flags, as parsed): check the budgets and settings, run the
    tasks not finished yet, then aggregate everything finished into RESULTS.md, results.json and figures."""
    began = time.perf_counter()
    check_execution(args.execution)
    budgets = resolve_budgets(args)
    check_budgets(budgets)
    check_optimizer_arguments(args)
    budgets.update({k: getattr(args, k) for k in OPTIMIZER_FIELDS})
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.workers > 1 and registry is not None:
        raise ConfigError("--workers > 1 runs the installed algorithms only (a custom registry needs --workers 1)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    registry = algorithm_registry() if registry is None else registry
    wanted = [COMPARISONS[key] for key in args.comparisons]
    missing = sorted({m.algorithm for c in wanted for m in c.methods if m.algorithm not in registry})
    if missing:
        raise ConfigError(f"algorithm(s) {missing} are not available in this installation")
    settings = {"out": os.path.abspath(args.out), "data_dir": args.data_dir, "progress": args.progress,
                "execution": args.execution, "threads": args.threads, "workers": args.workers}
    # The data are read (and the budgets checked against them) before anything is written.
    runner = None if args.report_only else Study(budgets, settings, registry)
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
    study.setdefault("invocations", []).append({
        "command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "threads": args.threads or torch.get_num_threads(), "workers": args.workers, "commit": git_commit(),
        "report_only": bool(args.report_only)})
    write_json(os.path.join(out, STUDY_FILE), study)

    if runner is not None:
        run_tasks(plan_tasks(wanted, args.seeds), runner)
    report_dir = args.report_dir or out
    report = write_study_report(out, report_dir, study, command=command,
                                wall_seconds=time.perf_counter() - began)
    print(f"[reproduce] {report['finished_runs']}/{report['planned_runs']} runs finished; "
          f"{os.path.join(report_dir, 'RESULTS.md')}, results.json and figures written "
          f"({time.perf_counter() - began:.0f} s this call)")
    return report
