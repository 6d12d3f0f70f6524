"""The report of ``sparsesam reproduce``: per-seed runs -> mean ± std (min–max) tables, verdicts, figures.

A difference between the paper's method and a baseline is *called* only
when the two methods' seed ranges [min, max] do not overlap (the project's
rule: a difference must exceed the spread over seeds); otherwise the
verdict is "within spread". With 3 seeds this is a conservative test:
it says nothing about differences smaller than the seed-to-seed noise.
With fewer than 3 seeds nothing is called.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..reporting import _table
from ..robust import plots
from .common import read_json, write_json
from .reproduce_plan import COMPARISONS, Comparison

RUN_FILE = "run.json"
MIN_SEEDS = 3  # the project's rule: no difference is called on fewer seeds


def _run_path(out: str, seed: int, comparison: str, method: str, sparsity: float) -> str:
    return os.path.join(out, f"seed{seed}", comparison, f"{method}-{round(100 * sparsity):d}", RUN_FILE)


def git_commit() -> Optional[str]:
    """The commit of the source tree the package runs from (+"-dirty" with uncommitted changes), if it is a git tree."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "sparsesam"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def metrics(comparison: Comparison, record: Dict[str, Any]) -> Dict[str, float]:
    """The figures of one run that the comparison's paper reports (plus achieved sparsity)."""
    values = {"sparsity": record["sparsity"], "clean_accuracy": record["clean_accuracy"]}
    if "mean_corruption_accuracy" in record:
        values["mean_corruption_accuracy"] = record["mean_corruption_accuracy"]
        # Accuracy lost to the corruptions (same images): robustness apart from clean accuracy; lower is better.
        values["corruption_drop"] = record["clean_accuracy"] - record["mean_corruption_accuracy"]
    if record.get("compacted_parameters") and record.get("parameters"):
        values["compact_param_ratio"] = record["compacted_parameters"] / record["parameters"]
    if "pgd" in record:
        for eps, accuracy in zip(record["pgd"]["epsilons"], record["pgd"]["accuracy"]):
            if eps > 0:
                values[f"pgd_accuracy@{eps:g}"] = accuracy
    if "smoothing" in record:
        for radius, accuracy in zip(record["smoothing"]["radii"], record["smoothing"]["certified_accuracy"]):
            values[f"certified_l2@{radius:g}"] = accuracy
    if "cc_cert" in record:
        cc = record["cc_cert"]
        for i, eps in enumerate(cc["epsilons"]):
            per = [r["certified_accuracy"][i] for r in cc["transforms"].values()]
            for name, r in cc["transforms"].items():
                values[f"cc_{name}@{eps:g}"] = r["certified_accuracy"][i]
            values[f"cc_mean@{eps:g}"] = float(np.mean(per))
    return values


def _stats(values: List[float]) -> Dict[str, Any]:
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def aggregate(out: str, comparison: Comparison, seeds: List[int]) -> Tuple[List[Dict[str, Any]], List[dict]]:
    """One row per (method, sparsity) with per-metric stats over the finished seeds; and the runs themselves."""
    rows, runs = [], []
    for sparsity in comparison.sparsities:
        for method in comparison.methods:
            per_seed = []
            for seed in seeds:
                path = _run_path(out, seed, comparison.key, method, sparsity)
                if os.path.isfile(path):
                    record = read_json(path)
                    runs.append(record)
                    per_seed.append(metrics(comparison, record))
            names = list(dict.fromkeys(k for m in per_seed for k in m))
            rows.append({"method": method, "target_sparsity": sparsity, "seeds": len(per_seed),
                         "metrics": {k: _stats([m[k] for m in per_seed if k in m]) for k in names}})
    return rows, runs


def verdicts(comparison: Comparison, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Paper's method vs every baseline, per sparsity and metric: called only when the seed ranges do not overlap."""
    found = []
    ours = comparison.methods[0]
    for sparsity in comparison.sparsities:
        at = {r["method"]: r for r in rows if r["target_sparsity"] == sparsity and r["seeds"]}
        if ours not in at:
            continue
        for baseline in comparison.methods[1:]:
            if baseline not in at:
                continue
            for name, a in at[ours]["metrics"].items():
                b = at[baseline]["metrics"].get(name)
                if b is None or name in ("sparsity", "compact_param_ratio"):
                    continue
                if min(a["n"], b["n"]) < MIN_SEEDS:
                    call = f"not called (fewer than {MIN_SEEDS} seeds)"
                elif a["min"] > b["max"]:
                    call = "higher"
                elif a["max"] < b["min"]:
                    call = "lower"
                else:
                    call = "within spread"
                found.append({"sparsity": sparsity, "metric": name, "method": ours, "baseline": baseline,
                              "difference": a["mean"] - b["mean"], "call": call, "n": min(a["n"], b["n"])})
    return found


def _cell(s: Optional[Dict[str, Any]]) -> str:
    if s is None or not s["n"]:
        return "–"
    if s["n"] == 1:
        return f"{s['mean']:.3f} (n=1)"
    return f"{s['mean']:.3f} ± {s['std']:.3f} [{s['min']:.3f}–{s['max']:.3f}]"


def _mean_dicts(items: List[Any]) -> Any:
    """Element-wise mean of equally shaped JSON results (numbers averaged; the rest taken from the first)."""
    first = items[0]
    if isinstance(first, dict):
        return {k: _mean_dicts([i[k] for i in items if isinstance(i, dict) and k in i]) for k in first}
    if isinstance(first, list) and all(isinstance(i, list) and len(i) == len(first) for i in items):
        return [_mean_dicts([i[j] for i in items]) for j in range(len(first))]
    if isinstance(first, (int, float)) and not isinstance(first, bool) and all(
            isinstance(i, (int, float)) for i in items):
        return float(np.mean(items))
    return first


def plot_metrics_vs_sparsity(comparison: Comparison, rows: List[Dict[str, Any]], names: List[str], path: str) -> str:
    """One panel per metric: mean over seeds against target sparsity, one line per method, min–max error bars."""
    figure, axes = plots._figure(4.2 * len(names), 3.8, ncols=len(names))
    axes = np.atleast_1d(axes)
    for axis, name in zip(axes, names):
        for method in comparison.methods:
            points = [(r["target_sparsity"], r["metrics"][name]) for r in rows
                      if r["method"] == method and name in r["metrics"] and r["metrics"][name]["n"]]
            if not points:
                continue
            x = [100 * p for p, _ in points]
            mean = np.array([s["mean"] for _, s in points])
            low = mean - np.array([s["min"] for _, s in points])
            high = np.array([s["max"] for _, s in points]) - mean
            axis.errorbar(x, mean, yerr=[low, high], marker="o", capsize=4, label=method)
        axis.set_xlabel(f"target sparsity (% of {comparison.unit})")
        axis.set_ylabel(name.replace("_", " "))
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(f"{comparison.key}: mean over seeds, bars = min–max")
    return plots._save(figure, path)


def _figures(comparison: Comparison, rows, runs, figures: str) -> List[str]:
    made = []
    names = ["clean_accuracy"] + [n for n in dict.fromkeys(k for r in rows for k in r["metrics"])
                                  if n.startswith(("mean_corruption", "pgd_accuracy", "certified_l2@0.5", "cc_mean"))]
    if any(r["seeds"] for r in rows):
        made.append(plot_metrics_vs_sparsity(comparison, rows, names,
                                             os.path.join(figures, f"{comparison.key}_accuracy_vs_sparsity.png")))
    groups: Dict[str, List[dict]] = {}
    for run in runs:
        groups.setdefault(f"{run['method']} {100 * run['target_sparsity']:g}%", []).append(run)
    def averaged(key):
        return {label: _mean_dicts([r[key] for r in group]) for label, group in groups.items()
                if all(key in r for r in group)}
    n = max((len(g) for g in groups.values()), default=0)
    suffix = f" (mean of {n} seeds)"
    if averaged("corruption"):
        made.append(plots.plot_corruption_accuracy(averaged("corruption"),
                                                   os.path.join(figures, f"{comparison.key}_corruptions.png"),
                                                   title=f"{comparison.key}: corruption accuracy{suffix}"))
    if averaged("pgd"):
        made.append(plots.plot_accuracy_vs_epsilon(averaged("pgd"), os.path.join(figures, f"{comparison.key}_pgd.png"),
                                                   title=f"{comparison.key}: PGD accuracy{suffix}"))
    if averaged("smoothing"):
        made.append(plots.plot_certified_accuracy(averaged("smoothing"),
                                                  os.path.join(figures, f"{comparison.key}_certified_l2.png"),
                                                  title=f"{comparison.key}: smoothing certified accuracy{suffix}"))
    if averaged("cc_cert"):
        made.append(plots.plot_cc_cert(averaged("cc_cert"), os.path.join(figures, f"{comparison.key}_cc_cert.png"),
                                       title=f"{comparison.key}: CC-Cert certified accuracy{suffix}"))
    return made


def _timing(runs: List[dict], out: str, seeds: List[int]) -> Dict[str, Any]:
    dense, accuracy = [], []
    for seed in seeds:
        path = os.path.join(out, f"seed{seed}", "dense", "train.json")
        if os.path.isfile(path):
            info = read_json(path)
            dense.append(info.get("seconds") or 0.0)
            accuracy.append(info["test_accuracy"])
    per_run = [r["fit_seconds"] + r["eval_seconds"] for r in runs]
    finished = [os.path.getmtime(_run_path(out, r["seed"], r["comparison"], r["method"], r["target_sparsity"]))
                for r in runs]
    # CPU seconds (recorded from commit 659cdc4 on): the cost on a quiet machine, independent of the load.
    cpu = [r["cpu_seconds_this_call"] for r in runs if r.get("cpu_seconds_this_call") is not None]
    return {"dense_seconds": dense, "dense_accuracy": _stats(accuracy) if accuracy else None,
            "run_seconds": per_run, "run_cpu_seconds": cpu,
            "last_run_finished": max(finished, default=None),
            "total_compute_seconds": sum(dense) + sum(per_run)}


def write_study_report(out: str, report_dir: str, study: Dict[str, Any], *, command: str,
                       wall_seconds: float) -> Dict[str, Any]:
    seeds = list(study["seeds"])
    chosen = [COMPARISONS[k] for k in study["comparisons"]]
    figures = os.path.join(report_dir, "figures")
    os.makedirs(figures, exist_ok=True)
    commit = git_commit()
    everything, all_runs, made = {}, [], []
    for comparison in chosen:
        rows, runs = aggregate(out, comparison, seeds)
        everything[comparison.key] = {"title": comparison.title, "claim": comparison.claim, "unit": comparison.unit,
                                      "methods": list(comparison.methods), "sparsities": list(comparison.sparsities),
                                      "rows": rows, "verdicts": verdicts(comparison, rows)}
        all_runs.extend(runs)
        made.extend(_figures(comparison, rows, runs, figures))
    planned = len(seeds) * sum(len(c.methods) * len(c.sparsities) for c in chosen)
    timing = _timing(all_runs, out, seeds)
    # The study's command is the first invocation that trained (a --report-only call only aggregates).
    training = [i for i in study.get("invocations", []) if not i.get("report_only")]
    if training:
        command = training[0]["command"]
    report = {"command": command, "commit": commit, "seeds": seeds, "budgets": study["budgets"],
              "invocations": study.get("invocations", []), "planned_runs": planned, "finished_runs": len(all_runs),
              "timing": timing, "this_call_wall_seconds": wall_seconds, "comparisons": everything,
              "figures": [os.path.relpath(p, report_dir) for p in made], "runs": all_runs,
              "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json(os.path.join(report_dir, "results.json"), report)
    with open(os.path.join(report_dir, "RESULTS.md.tmp"), "w") as f:
        f.write(_markdown(report, chosen))
    os.replace(os.path.join(report_dir, "RESULTS.md.tmp"), os.path.join(report_dir, "RESULTS.md"))
    return report


def _elapsed(report: Dict[str, Any]) -> str:
    """Wall time from the study's first start to its last finished run (runs' file times)."""
    training = [i for i in report["invocations"] if not i.get("report_only")]
    last = report["timing"].get("last_run_finished")
    if not training or last is None:
        return "no run finished yet"
    import calendar
    start = calendar.timegm(time.strptime(training[0]["started"], "%Y-%m-%dT%H:%M:%SZ"))
    return (f"wall time from the first start to the last finished run {(last - start) / 60:.1f} min "
            f"(including any time the study was stopped)")


def _markdown(report: Dict[str, Any], chosen: List[Comparison]) -> str:
    b, t = report["budgets"], report["timing"]
    runs = t["run_seconds"]
    lines = [
        "# sparsesam reproduce: results", "",
        f"- command: `{report['command']}`",
        f"- seeds: {', '.join(map(str, report['seeds']))}; finished runs: {report['finished_runs']} of "
        f"{report['planned_runs']}",
        "- commit of the code that ran: " + ", ".join(sorted({f"`{i.get('commit') or 'not recorded'}`"
                                                               for i in report["invocations"]
                                                               if not i.get("report_only")})) +
        f"; report written at `{report['commit']}`",
        f"- compute time: {t['total_compute_seconds'] / 60:.1f} min in all (dense models "
        f"{sum(t['dense_seconds']):.0f} s; per run fit + evaluation: median "
        f"{statistics.median(runs) if runs else 0:.0f} s, max {max(runs, default=0):.0f} s); "
        f"{_elapsed(report)}"
        + (f"; CPU time per run: median {statistics.median(t['run_cpu_seconds']):.0f} s over "
           f"{len(t['run_cpu_seconds'])} runs" if t.get("run_cpu_seconds") else ""),
        "- invocations (first started the study, later ones resumed it): "
        + "; ".join(f"{i['started']} ({i['threads']} threads)" for i in report["invocations"]
                    if not i.get("report_only")),
        f"- data: {b['dataset']}, dense model trained on the first {b['limit']} training images for {b['epochs']} "
        f"epoch(s); the algorithms use the first {b['algo_limit']}, {b['algo_epochs']} epoch(s) per phase "
        f"(magnitude: {2 * b['algo_epochs']} of fine-tuning); model {b['model']} (width x{b['width']})",
        f"- evaluation: the first {b['test_limit']} test images (clean, corruptions {', '.join(b['corruptions'])} "
        f"at severities {b['severities']}, PGD L-inf {b['pgd_steps']} steps); smoothing sigma={b['sigma']} "
        f"N0={b['smoothing_n0']} N={b['smoothing_n']} alpha={b['alpha']} on {b['smoothing_examples']} images; "
        f"CC-Cert {', '.join(b['cc_transforms'])} ({b['cc_samples']} samples) on {b['cc_examples']} images; "
        f"HARP comparison: PGD-AT eps={b['adv_eps']}, {b['attack_steps']} steps, for every method",
        "",
        f"Dense starting models (one per seed, shared by every method): clean accuracy "
        f"{_cell(t['dense_accuracy'])} on the same test images.", "",
        "Cells: mean ± std [min–max] over the seeds that finished. A difference is called only when the two "
        "methods' min–max ranges do not overlap.", ""]
    for comparison in chosen:
        data = report["comparisons"][comparison.key]
        rows = data["rows"]
        names = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
        lines += [f"## {comparison.title}", "", f"Paper's claim: {comparison.claim}", ""]
        table = [[r["method"], f"{100 * r['target_sparsity']:g}% {comparison.unit}", str(r["seeds"]),
                  *[_cell(r["metrics"].get(n)) for n in names]] for r in rows]
        lines += [_table(["method", "target", "seeds", *names], table), ""]
        if data["verdicts"]:
            lines += [f"{comparison.methods[0]} against each baseline:", ""]
            lines += [_table(["target", "metric", "baseline", "mean difference", "call"],
                             [[f"{100 * v['sparsity']:g}%", v["metric"], v["baseline"], f"{v['difference']:+.3f}",
                               v["call"]] for v in data["verdicts"]]), ""]
    figures = report["figures"]
    if figures:
        lines += ["## Figures", ""] + [f"![{os.path.basename(p)}]({p})" for p in figures] + [""]
    return "\n".join(lines)
