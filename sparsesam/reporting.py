"""Reports over many runs: report.json, report.md (markdown tables) and PNG plots.

``collect_runs`` reads the folders written by ``sparsesam eval`` (eval.json)
and ``sparsesam prune`` (prune.json; a prune folder's ``eval/`` subfolder is
picked up too). ``write_report`` turns them into

* ``report.json``: one summary row per run plus the runs that were not run;
* ``report.md``: a comparison table (accuracy, sparsity, size, the form the
  model ran in, its latency in that form and in dense form, robustness) and
  per-measurement tables;
* plots: accuracy vs sparsity per method, corruption accuracy per type,
  certified accuracy vs radius, PGD accuracy vs eps, CC-Cert per transform
  (the robustness plots are sparsesam.robust.plots').
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ._files import atomic_write
from .robust import plots

EVAL_JSON = "eval.json"
PRUNE_JSON = "prune.json"


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def collect_runs(folders: Sequence[str]) -> List[dict]:
    """One record per folder: ``{"folder", "eval": eval.json or None, "prune": prune.json or None}``."""
    runs = []
    for folder in folders:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder} is not a folder")
        evaluation = prune = None
        if os.path.isfile(os.path.join(folder, EVAL_JSON)):
            evaluation = _read(os.path.join(folder, EVAL_JSON))
        elif os.path.isfile(os.path.join(folder, "eval", EVAL_JSON)):
            evaluation = _read(os.path.join(folder, "eval", EVAL_JSON))
        if os.path.isfile(os.path.join(folder, PRUNE_JSON)):
            prune = _read(os.path.join(folder, PRUNE_JSON))
        elif evaluation is not None and evaluation.get("model_dir") \
                and os.path.isfile(os.path.join(evaluation["model_dir"], PRUNE_JSON)):
            prune = _read(os.path.join(evaluation["model_dir"], PRUNE_JSON))
        if evaluation is None and prune is None:
            raise FileNotFoundError(f"{folder} holds neither {EVAL_JSON} nor {PRUNE_JSON} "
                                    f"(give the --out of 'sparsesam eval' or 'sparsesam prune')")
        runs.append({"folder": os.path.abspath(folder), "eval": evaluation, "prune": prune})
    return runs


def summarize(run: Mapping) -> Dict[str, Any]:
    """The headline figures of one run (None where a measurement was not made)."""
    ev, pr = run.get("eval") or {}, run.get("prune") or {}
    name = ev.get("name") or pr.get("algorithm") or os.path.basename(run["folder"])
    row: Dict[str, Any] = OrderedDict(
        name=name, folder=run["folder"],
        target_sparsity=ev.get("target_sparsity", pr.get("target_sparsity")),
        sparsity=ev.get("sparsity", pr.get("sparsity")),
        clean_accuracy=ev.get("clean_accuracy", pr.get("test_accuracy")),
        parameters=ev.get("parameters"), nonzero_parameters=ev.get("nonzero_parameters"), macs=ev.get("macs"),
        compacted_parameters=ev.get("compacted_parameters", pr.get("compacted_parameters")),
        compacted_nonzero_parameters=ev.get("compacted_nonzero_parameters"),
        compacted_macs=ev.get("compacted_macs"),
        latency_ms=(ev.get("latency") or {}).get("median_ms"),
        dense_latency_ms=(ev.get("latency_dense") or {}).get("median_ms"),
        runs_as=runs_as(ev.get("layer_forms")),
        mean_corruption_accuracy=ev.get("mean_corruption_accuracy"),
        fit_seconds=pr.get("fit_seconds"),
    )
    if ev.get("pgd"):
        row["pgd_accuracy"] = dict(zip([f"{e:g}" for e in ev["pgd"]["epsilons"]], ev["pgd"]["accuracy"]))
    if ev.get("smoothing"):
        curve = ev["smoothing"]["curve"]
        row["certified_accuracy"] = dict(zip([f"{r:g}" for r in curve["radii"]], curve["certified_accuracy"]))
        row["smoothing_sigma"] = ev["smoothing"].get("sigma")
    if ev.get("cc_cert"):
        cc = ev["cc_cert"]
        eps = max(cc["epsilons"])
        i = cc["epsilons"].index(eps)
        row["cc_cert_eps"] = eps
        row["cc_cert_accuracy"] = {t: r["certified_accuracy"][i] for t, r in cc["transforms"].items()}
    return row


def runs_as(forms: Optional[Mapping[str, str]]) -> Optional[str]:
    """How the evaluated model ran: "compacted", "dense", or the count of layers per form ("3 csr, 2 dense")."""
    if forms is None:
        return None
    if not forms or set(forms.values()) == {"dense"}:
        return "dense"  # no masked layer (a dense model), or all of them dense
    if set(forms.values()) == {"compacted"}:
        return "compacted"
    counts = OrderedDict()
    for form in sorted(forms.values(), key=lambda f: (f == "dense", f)):
        counts[form] = counts.get(form, 0) + 1
    return ", ".join(f"{n} {form}" for form, n in counts.items())


def _fmt(value: Any, kind: str = "float") -> str:
    if value is None:
        return "–"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "mega":
        return f"{value / 1e6:.2f}M"
    if kind == "ms":
        return f"{value:.2f}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _labels(rows: List[dict]) -> List[str]:
    """Unique labels: the method name, with the sparsity when a method appears more than once."""
    names = [r["name"] for r in rows]
    return [f"{r['name']} @ {100 * (r['sparsity'] or 0):.0f}%" if names.count(r["name"]) > 1 else r["name"]
            for r in rows]


def markdown(rows: List[dict], not_run: Mapping[str, str], title: str = "sparsesam report") -> str:
    labels = _labels(rows)
    parts = [f"# {title}", ""]
    # latency ms: the model in the form it was evaluated in (runs as); dense latency ms: the same masks baked
    # into plain full-size layers.
    header = ["method", "sparsity %", "clean acc %", "params", "non-zero params", "MACs", "runs as", "latency ms",
              "dense latency ms", "corruption acc %"]
    body = []
    for label, r in zip(labels, rows):
        body.append([label, _fmt(r["sparsity"], "pct"), _fmt(r["clean_accuracy"], "pct"),
                     _fmt(r["compacted_parameters"] or r["parameters"], "int"),
                     _fmt(r["compacted_nonzero_parameters"] or r["nonzero_parameters"], "int"),
                     _fmt(r["compacted_macs"] or r["macs"], "mega"), _fmt(r.get("runs_as")),
                     _fmt(r["latency_ms"], "ms"), _fmt(r.get("dense_latency_ms"), "ms"),
                     _fmt(r["mean_corruption_accuracy"], "pct")])
    for name, reason in not_run.items():
        body.append([name] + ["not run"] + ["–"] * (len(header) - 2))
    parts += ["## Summary", "", markdown_table(header, body), ""]
    if not_run:
        parts += ["Not run: " + "; ".join(f"{k} ({v})" for k, v in not_run.items()), ""]
    for key, heading, col in (("pgd_accuracy", "PGD (L-inf) accuracy % by eps", "eps"),
                              ("certified_accuracy", "Randomized-smoothing certified accuracy % by L2 radius", "r"),
                              ("cc_cert_accuracy", "CC-Cert certified accuracy % by transform", None)):
        present = [(label, r) for label, r in zip(labels, rows) if r.get(key)]
        if not present:
            continue
        columns = list(OrderedDict.fromkeys(c for _, r in present for c in r[key]))
        header = ["method"] + [f"{col}={c}" if col else c for c in columns]
        body = [[label] + [_fmt(r[key].get(c), "pct") for c in columns] for label, r in present]
        note = ""
        if key == "certified_accuracy":
            note = f" (sigma = {present[0][1].get('smoothing_sigma')})"
        if key == "cc_cert_accuracy":
            note = f" (failure probability <= {present[0][1].get('cc_cert_eps')})"
        parts += [f"## {heading}{note}", "", markdown_table(header, body), ""]
    return "\n".join(parts)


def plot_accuracy_vs_sparsity(rows: List[dict], path: str) -> str:
    """Clean (and mean corruption) accuracy against sparsity, one line per method."""
    figure, axes = plots.new_figure(5.5, 4)
    methods = OrderedDict()
    for r in rows:
        if r["sparsity"] is not None and r["clean_accuracy"] is not None:
            methods.setdefault(r["name"], []).append(r)
    for name, points in methods.items():
        points = sorted(points, key=lambda r: r["sparsity"])
        line, = axes.plot([100 * p["sparsity"] for p in points], [p["clean_accuracy"] for p in points],
                          marker="o", label=f"{name} (clean)")
        corrupted = [p for p in points if p["mean_corruption_accuracy"] is not None]
        if corrupted:
            axes.plot([100 * p["sparsity"] for p in corrupted], [p["mean_corruption_accuracy"] for p in corrupted],
                      marker="s", linestyle="--", color=line.get_color(), label=f"{name} (corruptions)")
    axes.set_xlabel("sparsity (%)")
    axes.set_ylabel("accuracy")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return plots.save_figure(figure, path)


def write_report(runs: List[dict], out: str, *, not_run: Optional[Mapping[str, str]] = None,
                 title: str = "sparsesam report") -> Dict[str, Any]:
    """report.json, report.md and the plots for ``runs`` (from collect_runs) into folder ``out``."""
    os.makedirs(out, exist_ok=True)
    not_run = dict(not_run or {})
    rows = [summarize(run) for run in runs]
    labels = _labels(rows)
    figures: Dict[str, str] = {}
    if rows:
        figures["accuracy_vs_sparsity"] = plot_accuracy_vs_sparsity(rows, os.path.join(out, "accuracy_vs_sparsity.png"))
    evals = [(label, run["eval"]) for label, run in zip(labels, runs) if run.get("eval")]
    corruption = {label: ev["corruption"] for label, ev in evals if ev.get("corruption")}
    if corruption:
        figures["corruption_accuracy"] = plots.plot_corruption_accuracy(
            corruption, os.path.join(out, "corruption_accuracy.png"))
    curves = {label: ev["smoothing"]["curve"] for label, ev in evals if ev.get("smoothing")}
    if curves:
        figures["certified_accuracy"] = plots.plot_certified_accuracy(curves, os.path.join(out, "certified_accuracy.png"))
    pgd = {label: ev["pgd"] for label, ev in evals if ev.get("pgd")}
    if pgd:
        figures["pgd_accuracy"] = plots.plot_accuracy_vs_epsilon(pgd, os.path.join(out, "pgd_accuracy.png"))
    cc = {label: ev["cc_cert"] for label, ev in evals if ev.get("cc_cert")}
    if cc:
        figures["cc_cert"] = plots.plot_cc_cert(cc, os.path.join(out, "cc_cert.png"))
    report = {"title": title, "runs": rows, "not_run": not_run,
              "figures": {k: os.path.basename(v) for k, v in figures.items()}}
    text = markdown(rows, not_run, title)
    if figures:
        text += "\n## Figures\n\n" + "\n".join(f"![{k}]({os.path.basename(v)})" for k, v in figures.items()) + "\n"
    atomic_write(os.path.join(out, "report.md"), text)
    from .model_files import write_json  # shared atomic JSON writer (NaN-free)
    write_json(os.path.join(out, "report.json"), report)
    return report


__all__ = ["collect_runs", "summarize", "markdown", "plot_accuracy_vs_sparsity", "write_report"]
