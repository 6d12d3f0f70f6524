"""``sparsesam report``: report.json, report.md and plots over the folders of eval / prune runs."""
from __future__ import annotations

import argparse
import os

from .. import reporting
from .common import ConfigError


def run_report(args: argparse.Namespace) -> dict:
    for folder in args.folders:
        if not os.path.isdir(folder):
            raise ConfigError(f"{folder} is not a folder")
    try:
        runs = reporting.collect_runs(args.folders)
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from error
    report = reporting.write_report(runs, args.out, title=args.title)
    print(f"report: {len(runs)} run(s); report.json, report.md and {len(report['figures'])} plot(s) in {args.out}")
    return report


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser("report", help="compare eval / prune runs: report.json, report.md, PNG plots")
    parser.add_argument("folders", nargs="+", help="output folders of 'sparsesam eval' or 'sparsesam prune'")
    parser.add_argument("--out", required=True, help="folder for report.json, report.md and the plots")
    parser.add_argument("--title", default="sparsesam report")
    parser.set_defaults(func=run_report)
    return parser
