"""PNG figures of robustness results (the dicts the evaluation functions return).

Each function takes one result dict or a mapping ``{label: result}`` to
compare models, writes a PNG and returns its path. Figures are drawn on
matplotlib's Agg canvas directly, so the caller's pyplot backend is untouched
and no display is needed.
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from .._extras import require
from .._files import atomic_file
from .corruptions import CORRUPTIONS


def new_figure(width: float, height: float, ncols: int = 1):
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", extra="robust", purpose="plots").FigureCanvasAgg
    Figure = require("matplotlib.figure", extra="robust", purpose="plots").Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, ncols)
    return figure, axes


def save_figure(figure, path: str) -> str:
    figure.tight_layout()
    with atomic_file(path, "wb") as f:  # a reader never sees half a PNG
        figure.savefig(f, dpi=150, format="png")
    return path


def _finish_line_plot(figure, axes, xlabel: str, ylabel: str, title: Optional[str], path: str) -> str:
    """Labels, a [0, 1] accuracy axis, grid, legend and title of a one-panel line plot; saves it."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    if title:
        axes.set_title(title)
    return save_figure(figure, path)


def _named(results: Mapping, marker_key: str) -> dict:
    """A single result (it has ``marker_key``) becomes {its model name: it}.

    Labels lose leading underscores: matplotlib hides legend entries that start with one.
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a result dict or a non-empty {label: result} mapping")
    if marker_key in results:
        results = {str(results.get("model") or "model"): results}
    for label, result in results.items():
        if not isinstance(result, Mapping) or marker_key not in result:
            raise ValueError(f"results[{label!r}] is not a result with a {marker_key!r} entry")
    return {str(label).lstrip("_") or "model": result for label, result in results.items()}


def plot_corruption_accuracy(results: Mapping, path: str, *, title: Optional[str] = None) -> str:
    """Left: accuracy per corruption (mean over severities), one bar per model.
    Right: mean accuracy over corruptions vs severity (0 = clean)."""
    named = _named(results, "accuracy")
    figure, (left, right) = new_figure(13, 4.2, ncols=2)
    corruptions = [c for c in CORRUPTIONS if any(c in r["accuracy"] for r in named.values())]
    corruptions += [c for r in named.values() for c in r["accuracy"] if c not in corruptions]
    width = 0.8 / len(named)
    for k, (label, result) in enumerate(named.items()):
        means = [np.mean(result["accuracy"][c]) if c in result["accuracy"] else np.nan for c in corruptions]
        left.bar(np.arange(len(corruptions)) + (k - (len(named) - 1) / 2) * width, means, width, label=label)
        severities = list(result["severities"])
        per_severity = np.mean([result["accuracy"][c] for c in result["accuracy"]], axis=0)
        right.plot([0] + severities, [result["clean_accuracy"], *per_severity], marker="o", label=label)
    left.set_xticks(np.arange(len(corruptions)))
    left.set_xticklabels([c.replace("_", " ") for c in corruptions], rotation=45, ha="right")
    left.set_ylabel("accuracy (mean over severities)")
    left.set_ylim(0, 1)
    left.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    return _finish_line_plot(figure, right, "severity (0 = clean)", "mean accuracy over corruptions", None, path)


def plot_certified_accuracy(curves: Mapping, path: str, *, title: Optional[str] = None) -> str:
    """Certified accuracy vs L2 radius (the ``certified_accuracy`` curves of randomized smoothing)."""
    named = _named(curves, "certified_accuracy")
    figure, axes = new_figure(5.5, 4)
    for label, curve in named.items():
        sigma = curve.get("sigma")
        name = label if sigma is None or "sigma" in label else f"{label} (sigma={sigma:g})"
        axes.plot(curve["radii"], curve["certified_accuracy"], label=name)
    return _finish_line_plot(figure, axes, "L2 radius", "certified accuracy", title, path)


def plot_accuracy_vs_epsilon(results: Mapping, path: str, *, title: Optional[str] = None) -> str:
    """Robust accuracy vs attack budget eps, one line per model / attack."""
    named = _named(results, "epsilons")
    figure, axes = new_figure(5.5, 4)
    norms = set()
    for label, result in named.items():
        norms.add(result.get("norm", ""))
        axes.plot(result["epsilons"], result["accuracy"], marker="o",
                  label=f"{label} ({result.get('attack', 'attack')})")
    xlabel = "eps" + (f" ({norms.pop()})" if len(norms) == 1 else "")
    return _finish_line_plot(figure, axes, xlabel, "robust accuracy", title, path)


def plot_cc_cert(results: Mapping, path: str, *, epsilon: Optional[float] = None, title: Optional[str] = None) -> str:
    """CC-Cert certified accuracy per transform at one eps (default: the largest evaluated), one bar per model."""
    named = _named(results, "transforms")
    figure, axes = new_figure(7, 4)
    transforms = list(dict.fromkeys(t for r in named.values() for t in r["transforms"]))
    width = 0.8 / len(named)
    shown = None
    for k, (label, result) in enumerate(named.items()):
        eps_list = list(result["epsilons"])
        eps = max(eps_list) if epsilon is None else float(epsilon)
        if eps not in eps_list:
            raise ValueError(f"epsilon {eps} was not evaluated for {label!r}; it has {eps_list}")
        shown = eps
        i = eps_list.index(eps)
        values = [result["transforms"][t]["certified_accuracy"][i] if t in result["transforms"] else np.nan
                  for t in transforms]
        axes.bar(np.arange(len(transforms)) + (k - (len(named) - 1) / 2) * width, values, width, label=label)
    axes.set_xticks(np.arange(len(transforms)))
    axes.set_xticklabels(transforms, rotation=30, ha="right")
    axes.set_ylabel(f"certified accuracy (failure prob. <= {shown:g})")
    axes.set_ylim(0, 1)
    axes.legend(fontsize="small")
    if title:
        axes.set_title(title)
    return save_figure(figure, path)
