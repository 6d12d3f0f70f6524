"""The report of ``sparsesam reproduce``: per-seed runs -> tables, paired differences and tests, figures.

Every method of a seed starts from the same dense model and sees the same
batches, so methods are compared *paired by seed*: for the paper's method
against each baseline and each ablation's control, per sparsity and metric,
the differences d_s = ours_s - theirs_s over the seeds both finished give
the mean difference, its standard deviation, a 95% confidence interval
(Student t) and the two-sided paired t-test (``scipy.stats.ttest_rel``).
The p-values are Holm-adjusted within each comparison (every metric, every
sparsity, every pair), and a difference is *called* (higher / lower) when
the adjusted p is below 0.05; otherwise "no significant difference".
A metric equal on every seed (certified accuracy at a radius out of
reach) is not a test and stays out of the family. Nothing is called on
fewer than MIN_SEEDS seeds.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .. import _extras
from .._files import atomic_write
from ..model_files import read_json, write_json
from ..reporting import markdown_table
from ..robust import plots
from ..robust.smoothing import largest_certified_radius
from .plan import COMPARISONS, Comparison

RUN_FILE = "run.json"
MIN_SEEDS = 3  # the project's rule: no difference is called on fewer seeds
LEVEL = 0.05   # family-wise (Holm, per comparison)
CONSTANT_TOLERANCE = 1e-9  # a paired difference this close to constant is constant (rounding)
NOT_COMPARED = ("sparsity", "compact_param_ratio")  # settings the methods share, not outcomes


def run_folder(out: str, seed: int, comparison: str, method: str, sparsity: float) -> str:
    return os.path.join(out, f"seed{seed}", comparison, f"{method}-{round(100 * sparsity):d}")


def _run_path(out: str, seed: int, comparison: str, method: str, sparsity: float) -> str:
    return os.path.join(run_folder(out, seed, comparison, method, sparsity), RUN_FILE)


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


def seed_stats(values: List[float], seeds: Optional[List[int]] = None) -> Dict[str, Any]:
    stats = {"n": len(values), "mean": statistics.fmean(values),
             "std": statistics.stdev(values) if len(values) > 1 else 0.0,
             "min": min(values), "max": max(values), "values": values}
    if seeds is not None:
        stats["seeds"] = seeds
    return stats


def aggregate(out: str, comparison: Comparison, seeds: List[int]) -> Tuple[List[Dict[str, Any]], List[dict]]:
    """One row per (method, sparsity) with per-metric stats over the finished seeds; and the runs themselves."""
    rows, runs = [], []
    for sparsity in comparison.sparsities:
        for method in comparison.labels:
            per_seed = {}
            for seed in seeds:
                path = _run_path(out, seed, comparison.key, method, sparsity)
                if os.path.isfile(path):
                    record = read_json(path)
                    runs.append(record)
                    per_seed[seed] = metrics(comparison, record)
            names = list(dict.fromkeys(k for m in per_seed.values() for k in m))
            rows.append({"method": method, "target_sparsity": sparsity, "seeds": len(per_seed),
                         "metrics": {k: seed_stats([m[k] for m in per_seed.values() if k in m],
                                               [s for s, m in per_seed.items() if k in m]) for k in names}})
    return rows, runs


def paired(a: Dict[str, Any], b: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Paired difference a - b over the seeds both have: mean, std, 95% CI, paired t-test p, seeds a wins."""
    stats = _extras.require("scipy.stats", extra="robust", purpose="the study's paired tests")
    common = [s for s in a["seeds"] if s in b["seeds"]]
    if not common:
        return None
    x = np.array([a["values"][a["seeds"].index(s)] for s in common])
    y = np.array([b["values"][b["seeds"].index(s)] for s in common])
    d = x - y
    n = len(d)
    result = {"n": n, "mean": float(d.mean()), "std": float(d.std(ddof=1)) if n > 1 else 0.0,
              "wins": int((d > CONSTANT_TOLERANCE).sum()), "losses": int((d < -CONSTANT_TOLERANCE).sum()),
              "p": None, "ci95": None}
    if n > 1:
        half = float(stats.t.ppf(0.975, n - 1) * result["std"] / np.sqrt(n))
        result["ci95"] = [result["mean"] - half, result["mean"] + half]
    # Accuracies are counts over the same images, so a difference the same on every seed differs only by
    # float rounding (1e-17): the t statistic is then noise over noise.
    constant = bool(np.ptp(d) <= CONSTANT_TOLERANCE) if n else False
    result["identical"] = constant and abs(result["mean"]) <= CONSTANT_TOLERANCE
    if n > 1 and not constant:
        result["p"] = float(stats.ttest_rel(x, y).pvalue)
    elif n > 1 and not result["identical"]:
        # The same nonzero difference on every seed: t is infinite; the exact sign test is what is left.
        result["p"] = float(stats.binomtest(result["wins"], n).pvalue)
    # Equal on every seed (e.g. certified accuracy at a radius no model can reach): nothing to test, and
    # left out of Holm's family, where a p of 1 would only raise the others' multiplier.
    return result


def holm(p_values: List[Optional[float]]) -> List[Optional[float]]:
    """Holm's step-down adjustment (family-wise error) of the p-values that are not None."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: List[Optional[float]] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (len(indexed) - rank) * p))
        adjusted[i] = running
    return adjusted


def _pairs(comparison: Comparison) -> List[Tuple[str, str, str]]:
    """(method, other, role): the paper's method against each baseline, then each ablation's pair."""
    ours = comparison.labels[0]
    ablated = {(a.method, a.control) for a in comparison.ablations}
    pairs = [(ours, other, "ablation" if (ours, other) in ablated else "baseline") for other in comparison.labels[1:]]
    pairs += [(a.method, a.control, "ablation") for a in comparison.ablations if a.method != ours]
    return pairs


def verdicts(comparison: Comparison, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per sparsity, metric and pair: the paired difference over seeds, the Holm-adjusted test and the call."""
    found = []
    for sparsity in comparison.sparsities:
        at = {r["method"]: r for r in rows if r["target_sparsity"] == sparsity and r["seeds"]}
        for method, other, role in _pairs(comparison):
            if method not in at or other not in at:
                continue
            for name, a in at[method]["metrics"].items():
                b = at[other]["metrics"].get(name)
                if b is None or name in NOT_COMPARED:
                    continue
                difference = paired(a, b)
                if difference is not None:
                    found.append({"sparsity": sparsity, "metric": name, "method": method, "baseline": other,
                                  "role": role, **difference})
    for verdict, p in zip(found, holm([v["p"] if v["n"] >= MIN_SEEDS else None for v in found])):
        verdict["p_holm"] = p
        if verdict["n"] < MIN_SEEDS:
            verdict["call"] = f"not called (fewer than {MIN_SEEDS} seeds)"
        elif verdict["identical"]:
            verdict["call"] = "equal on every seed (no test)"
        elif p < LEVEL:
            verdict["call"] = "higher" if verdict["mean"] > 0 else "lower"
        else:
            verdict["call"] = "no significant difference"
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
    figure, axes = plots.new_figure(4.2 * len(names), 3.8, ncols=len(names))
    axes = np.atleast_1d(axes)
    for axis, name in zip(axes, names):
        for method in comparison.labels:
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
    return plots.save_figure(figure, path)


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
    kinds = (("corruption", plots.plot_corruption_accuracy, "corruptions", "corruption accuracy"),
             ("pgd", plots.plot_accuracy_vs_epsilon, "pgd", "PGD accuracy"),
             ("smoothing", plots.plot_certified_accuracy, "certified_l2", "smoothing certified accuracy"),
             ("cc_cert", plots.plot_cc_cert, "cc_cert", "CC-Cert certified accuracy"))
    for key, plot, stem, what in kinds:
        data = averaged(key)
        if data:
            made.append(plot(data, os.path.join(figures, f"{comparison.key}_{stem}.png"),
                             title=f"{comparison.key}: {what}{suffix}"))
    return made


def _dense_infos(out: str, seeds: List[int], kinds: List[str]) -> Dict[str, List[dict]]:
    """Each kind's finished dense models (train.json of sparsesam.study.dense), in seed order."""
    infos: Dict[str, List[dict]] = {}
    for kind in kinds:
        for seed in seeds:
            path = os.path.join(out, f"seed{seed}", f"dense-{kind}", "train.json")
            if os.path.isfile(path):
                infos.setdefault(kind, []).append(read_json(path))
    return infos


def _timing(runs: List[dict], out: str, seeds: List[int], kinds: List[str]) -> Dict[str, Any]:
    """Cost of every part: dense models per kind, each method's phases and evaluation (seconds, one process)."""
    dense = {}
    for kind, infos in _dense_infos(out, seeds, kinds).items():
        # Per-epoch training seconds summed (an interrupted training counts every epoch once).
        train = [sum(h.get("seconds", 0.0) for h in info["history"]) for info in infos]
        dense[kind] = {"n": len(infos), "epochs": [info["epochs"] for info in infos],
                       "plateaued": [info["plateaued"] for info in infos],
                       "train_seconds": train, "test_accuracy": seed_stats([i["test_accuracy"] for i in infos]),
                       "val_accuracy": seed_stats([i["val_accuracy"] for i in infos])}
    methods: Dict[str, Dict[str, List[float]]] = {}
    for run in runs:
        key = f"{run['comparison']}/{run['method']}@{run['target_sparsity']:g}"
        parts = methods.setdefault(key, {})
        for phase, seconds in (run.get("phase_seconds") or {"fit": run["fit_seconds"]}).items():
            parts.setdefault(phase, []).append(seconds)
        parts.setdefault("evaluation", []).append(run["eval_seconds"])
        if run.get("cpu_seconds_this_call") is not None:
            # CPU time is what the plan (docs/reproduce/PLAN.md) counts: wall time grows with the machine's load.
            parts.setdefault("CPU", []).append(run["cpu_seconds_this_call"])
    per_run = [r["fit_seconds"] + r["eval_seconds"] for r in runs]
    finished = [os.path.getmtime(_run_path(out, r["seed"], r["comparison"], r["method"], r["target_sparsity"]))
                for r in runs]
    cpu = [r["cpu_seconds_this_call"] for r in runs if r.get("cpu_seconds_this_call") is not None]
    dense_total = sum(sum(d["train_seconds"]) for d in dense.values())
    return {"dense": dense, "methods": {k: {p: statistics.fmean(v) for p, v in parts.items()}
                                        for k, parts in methods.items()},
            "run_seconds": per_run, "run_cpu_seconds": cpu, "last_run_finished": max(finished, default=None),
            "dense_seconds": dense_total, "total_compute_seconds": dense_total + sum(per_run)}


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
                                      "methods": list(comparison.labels), "sparsities": list(comparison.sparsities),
                                      "start": comparison.start, "train_noise": comparison.train_noise,
                                      "ablations": [vars(a) for a in comparison.ablations],
                                      "rows": rows, "verdicts": verdicts(comparison, rows)}
        all_runs.extend(runs)
        made.extend(_figures(comparison, rows, runs, figures))
    planned = len(seeds) * sum(len(c.methods) * len(c.sparsities) for c in chosen)
    timing = _timing(all_runs, out, seeds, list(dict.fromkeys(c.start for c in chosen)))
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
    atomic_write(os.path.join(report_dir, "RESULTS.md"), _markdown(report, chosen))
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


def _difference(v: Dict[str, Any]) -> str:
    text = f"{v['mean']:+.3f} ± {v['std']:.3f}"
    if v.get("ci95"):
        text += f" [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]"
    return text


def _p(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.3g}"


def _verdict_table(verdicts: List[Dict[str, Any]]) -> str:
    return markdown_table(["target", "metric", "vs", "difference: mean ± std [95% CI]", "wins/losses", "p", "p (Holm)",
                   "call"],
                  [[f"{100 * v['sparsity']:g}%", v["metric"], v["baseline"], _difference(v),
                    f"{v['wins']}/{v['losses']} of {v['n']}", _p(v["p"]), _p(v.get("p_holm")), v["call"]]
                   for v in verdicts])


def _markdown(report: Dict[str, Any], chosen: List[Comparison]) -> str:
    b, t = report["budgets"], report["timing"]
    runs = t["run_seconds"]
    invocations = [i for i in report["invocations"] if not i.get("report_only")]
    lines = [
        "# sparsesam reproduce: results", "",
        f"- command: `{report['command']}`",
        f"- seeds: {', '.join(map(str, report['seeds']))}; finished runs: {report['finished_runs']} of "
        f"{report['planned_runs']}",
        "- commits of the code that ran (each run records its own in results.json): "
        + ", ".join(sorted({f"`{r.get('commit') or 'not recorded'}`" for r in report["runs"]}) or ["none yet"])
        + f"; report written at `{report['commit']}`",
        f"- compute: {t['total_compute_seconds'] / 3600:.2f} process-hours of wall time in all (dense models "
        f"{t['dense_seconds'] / 3600:.2f} h; per run fit + evaluation: median "
        f"{statistics.median(runs) if runs else 0:.0f} s, max {max(runs, default=0):.0f} s); the runs' CPU time: "
        f"{sum(t['run_cpu_seconds']) / 3600:.2f} CPU-hours over {len(t['run_cpu_seconds'])} runs (a resumed run "
        f"counts its last call); {_elapsed(report)}",
        "- invocations (the first started the study, later ones resumed it): "
        + "; ".join(f"{i['started']} ({i.get('workers', 1)} worker(s) x {i['threads']} thread(s), "
                    f"`{i.get('commit')}`)" for i in invocations),
        f"- data: {b['dataset']}; dense models: the first {b['limit']} training images, trained until the "
        f"accuracy on the last {b['val_limit']} (held out) stops improving by {b['dense_min_delta']} for "
        f"{b['dense_patience']} epochs (at most {b['dense_max_epochs']}); algorithms: the first {b['algo_limit']} "
        f"images, {b['algo_epochs']} epoch(s) per phase (magnitude: {2 * b['algo_epochs']} of fine-tuning); "
        f"model {b['model']} (width x{b['width']}; csam comparison x{b['certified_width']}); SGD lr {b['lr']}",
        f"- evaluation: the first {b['test_limit']} test images (clean, corruptions {', '.join(b['corruptions'])} "
        f"at severities {b['severities']}, PGD L-inf {b['pgd_steps']} steps); smoothing sigma={b['sigma']} "
        f"N0={b['smoothing_n0']} N={b['smoothing_n']} alpha={b['alpha']} on {b['smoothing_examples']} images "
        f"(no radius above {largest_certified_radius(b['smoothing_n'], b['alpha'], b['sigma']):.3f} can be "
        f"certified at this N and alpha); "
        f"CC-Cert (official bound) {', '.join(b['cc_transforms'])} ({b['cc_samples']} samples) on "
        f"{b['cc_examples']} images; HARP comparison: PGD-AT eps={b['adv_eps']}, {b['attack_steps']} steps, "
        f"for the dense model and every method; csam comparison: Gaussian noise sigma={b['sigma']} in every "
        f"training", ""]
    if t["dense"]:
        lines += ["## Dense starting models", "",
                  markdown_table(["kind", "seeds", "epochs to plateau", "validation accuracy", "test accuracy",
                          "training s (mean)"],
                         [[kind, str(d["n"]), ", ".join(map(str, d["epochs"])) +
                           ("" if all(d["plateaued"]) else " (some hit the cap)"),
                           _cell(d["val_accuracy"]), _cell(d["test_accuracy"]),
                           f"{statistics.fmean(d['train_seconds']):.0f}"] for kind, d in t["dense"].items()]), ""]
    lines += ["Cells: mean ± std [min–max] over the seeds that finished. Differences are paired by seed; "
              f"a difference is called when its Holm-adjusted paired t-test p < {LEVEL} (per comparison).", ""]
    for comparison in chosen:
        data = report["comparisons"][comparison.key]
        rows = data["rows"]
        names = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
        lines += [f"## {comparison.title}", "", f"Paper's claim: {comparison.claim}", "",
                  f"Starts from the `{comparison.start}` dense model"
                  + (", every method trained with Gaussian noise augmentation." if comparison.train_noise else "."),
                  ""]
        table = [[r["method"], f"{100 * r['target_sparsity']:g}% {comparison.unit}", str(r["seeds"]),
                  *[_cell(r["metrics"].get(n)) for n in names]] for r in rows]
        lines += [markdown_table(["method", "target", "seeds", *names], table), ""]
        baseline = [v for v in data["verdicts"] if v["role"] == "baseline"]
        ablation = [v for v in data["verdicts"] if v["role"] == "ablation"]
        if baseline:
            lines += [f"{comparison.labels[0]} against each baseline (paired by seed):", "",
                      _verdict_table(baseline), ""]
        for a in comparison.ablations:
            mine = [v for v in ablation if v["method"] == a.method and v["baseline"] == a.control]
            if mine:
                lines += [f"Ablation: {a.method} vs {a.control} ({a.mechanism}), paired by seed:", "",
                          _verdict_table(mine), ""]
    if t["methods"]:
        lines += ["## Cost per phase (mean seconds of one run, one process)", "",
                  "Wall seconds per phase and for the evaluation; CPU: the run's process CPU seconds (of its last "
                  "call, if it was resumed), the cost on a quiet core.", "",
                  markdown_table(["run", "phases, evaluation and CPU"],
                         [[key, ", ".join(f"{p} {s:.0f}" for p, s in parts.items())]
                          for key, parts in t["methods"].items()]), ""]
    figures = report["figures"]
    if figures:
        lines += ["## Figures", ""] + [f"![{os.path.basename(p)}]({p})" for p in figures] + [""]
    return "\n".join(lines)
