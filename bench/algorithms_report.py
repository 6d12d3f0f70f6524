"""The end-to-end section of RESULTS.md: each algorithm phase's step, sparsesam vs plain PyTorch (bench_algorithms.py).

One row per case: the medians and minima of both sides from the same run, their ratio, and the
issue's target for it (met / missed). AdaSAP's row also gives the time *beyond* the step's two
forward+backward passes (``two_passes``, measured in the same run): what the SAM machinery itself
costs on each side, which is what the fused optimizer can change.
"""
from __future__ import annotations

from typing import Dict, Optional

# case prefix -> (target speedup, what the ratio is of)
TARGETS = {
    "harp_search": 1.5,
    "harp_finetune sparsity=0.99": 2.5,
    "harp_finetune sparsity=0.9": 1.5,
    "magnitude_finetune sparsity=0.99": 2.5,
    "magnitude_finetune sparsity=0.9": 1.5,
    "csam_mask": 1.2,
    "adasap_adaptive": 3.0,  # of the time beyond the two forward+backward passes
}


def _target(case: str) -> Optional[float]:
    return next((t for prefix, t in TARGETS.items() if case.startswith(prefix)), None)


def _stats(b: dict):
    return b["stats"]["median"] * 1e3, b["stats"]["min"] * 1e3


def _verdict(ratio: float, target: Optional[float]) -> str:
    if target is None:
        return ""
    return f">= {target:g}x: {'met' if ratio >= target else 'MISSED'}"


def algorithms_table(cases: Dict[str, Dict[str, dict]]) -> str:
    """``cases``: {group: {impl: benchmark}} of the "algorithms" kernel (sparse_report.by_kernel)."""
    rows = ["| case | sparsesam median / min (ms) | baseline median / min (ms) | speedup, medians | minima "
            "| target | sparsesam's layers in sparse form |",
            "|---|---:|---:|---:|---:|---|---:|"]
    notes = []
    for group, impls in cases.items():
        ours, base = impls.get("sparsesam"), impls.get("baseline")
        if not ours or not base:
            continue
        (om, on), (bm, bn) = _stats(ours), _stats(base)
        case = ours["extra_info"].get("case", group)
        info = ours["extra_info"]
        layers = f"{info.get('sparse_layers', 0)}/{info.get('layers', 0)}"
        target = _target(case)
        ratio = bm / om
        if "two_passes" in impls:  # AdaSAP: the target is on the time beyond the two passes
            turns = ours["extra_info"].get("interleaved")
            if turns:  # timed in turns in one loop: their minima
                om, bm, pm, opm = (min(turns[k]) * 1e3 for k in
                                   ("sparsesam", "baseline", "two_passes", "two_passes_sparsesam"))
                source = f"minima of {len(turns['sparsesam'])} interleaved rounds"
            else:
                pm = opm = _stats(impls["two_passes"])[0]
                source = "medians of separate runs"
            beyond = (bm - pm) / max(om - opm, 1e-9)
            rows.append(f"| {case} (whole step) | {om:.0f} | {bm:.0f} | {bm / om:.2f}x | | | {layers} |")
            rows.append(f"| {case}: beyond each side's own two passes ({opm:.0f} / {pm:.0f} ms; {source}) "
                        f"| {om - opm:.0f} | {bm - pm:.0f} | {beyond:.2f}x | | {_verdict(beyond, target)} | |")
            continue
        rows.append(f"| {case} | {om:.0f} / {on:.0f} | {bm:.0f} / {bn:.0f} | {ratio:.2f}x | {bn / on:.2f}x "
                    f"| {_verdict(ratio, target)} | {layers} |")
        dense = impls.get("sparsesam_dense")
        if dense:
            dm, dn = _stats(dense)
            notes.append(f"- {case}: sparsesam with `execution=\"dense\"` {dm:.0f} / {dn:.0f} ms, so the sparse "
                         f"forms alone give {dm / om:.2f}x (medians) / {dn / on:.2f}x (minima) over sparsesam's "
                         f"own dense masked layers.")
    text = "\n".join(rows) if len(rows) > 2 else "(not run)"
    if notes:
        text += "\n\n" + "\n".join(notes)
    return text


def prune_run_table(runs: Dict[str, dict]) -> str:
    """The whole ``sparsesam prune`` run in each execution form (one round each, same run)."""
    if not runs or "dense" not in runs:
        return "(not run)"
    dense = runs["dense"]["stats"]["min"]
    rows = ["| `--execution` | wall time (s) | vs dense |", "|---|---:|---:|"]
    for form, b in runs.items():
        seconds = b["stats"]["min"]
        rows.append(f"| {form} | {seconds:.1f} | {dense / seconds:.2f}x |")
    auto = runs.get("auto")
    if auto:
        ratio = dense / auto["stats"]["min"]
        rows.append(f"\nTarget >= 2x for `auto` against `dense`: {'met' if ratio >= 2 else 'MISSED'} ({ratio:.2f}x).")
    return "\n".join(rows)
