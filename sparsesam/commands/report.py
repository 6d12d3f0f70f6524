"""``sparsesam report``: report.json, report.md and plots over the folders of eval / prune runs.

The figures come from the runs' eval.json (measured by ``sparsesam eval``
in the form its ``--execution`` chose, "auto" by default). With
``--execution FORM`` the report measures the latency of every run's model
again, in that form and in dense form, on this machine (the eval.json files
are left as they are).
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List

import torch

from .. import reporting
from ..run_setup import check_execution
from .common import ConfigError, add_execution_argument


def _model_folder(run: Dict[str, Any]):
    from ..model_files import is_model_folder
    for folder in ((run.get("eval") or {}).get("model_dir"), run["folder"]):
        if folder and is_model_folder(folder):
            return folder
    return None


def retime(runs: List[Dict[str, Any]], execution: str, batch: int, repeats: int) -> None:
    """Measure each run's model in ``execution`` form and in dense form; the results replace the eval's."""
    from ..evaluation import latency_as_run_and_dense, runnable
    from ..model_files import load_compacted, load_model_folder, plain_model
    for run in runs:
        folder = _model_folder(run)
        if folder is None:
            continue
        model, info = load_model_folder(folder)
        spec = info["spec"]
        dense = plain_model(model)
        # "auto" times the forms on random images of the latency batch's shape: no test data needed here.
        example = torch.rand(batch, spec["in_channels"], spec["image_size"], spec["image_size"],
                             generator=torch.Generator().manual_seed(0))
        model, forms = runnable(model, load_compacted(folder, info), execution, example)
        evaluation = dict(run.get("eval") or {"name": info.get("algorithm") or "dense"})
        evaluation.update(execution=execution, layer_forms=forms,
                          **latency_as_run_and_dense(model, dense, spec, batch, repeats))
        run["eval"] = evaluation


def run_report(args: argparse.Namespace) -> dict:
    check_execution(args.execution)
    for folder in args.folders:
        if not os.path.isdir(folder):
            raise ConfigError(f"{folder} is not a folder")
    try:
        runs = reporting.collect_runs(args.folders)
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from error
    if args.execution is not None:
        retime(runs, args.execution, args.latency_batch, args.latency_repeats)
    report = reporting.write_report(runs, args.out, title=args.title)
    print(f"report: {len(runs)} run(s); report.json, report.md and {len(report['figures'])} plot(s) in {args.out}")
    return report


def add_parser(sub) -> argparse.ArgumentParser:
    from .common import positive_int
    parser = sub.add_parser("report", help="compare eval / prune runs: report.json, report.md, PNG plots")
    parser.add_argument("folders", nargs="+", help="output folders of 'sparsesam eval' or 'sparsesam prune'")
    parser.add_argument("--out", required=True, help="folder for report.json, report.md and the plots")
    parser.add_argument("--title", default="sparsesam report")
    add_execution_argument(parser, None, "measure every run's latency again, in this form and dense (default: "
                                         "the figures of its eval.json, measured with eval's --execution, auto)")
    parser.add_argument("--latency-batch", type=positive_int, default=64)
    parser.add_argument("--latency-repeats", type=positive_int, default=10)
    parser.set_defaults(func=run_report)
    return parser
