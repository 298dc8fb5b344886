"""PNG plots: training curves from metrics.jsonl and per-class precision-recall curves.

matplotlib is an optional extra (`pip install -e .[plots]`), imported only when a plot is
made. Figures are drawn on the Agg canvas directly, without pyplot, so no GUI backend and
no global matplotlib state are involved.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# summary AP keys (optionally "<data set>/"-prefixed by the trainer); per-class "AP-x" excluded
_AP_KEY = re.compile(r"^(.+/)?(mAP|AP|AP50|AP75|APs|APm|APl)$")


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"plots need matplotlib ({err}); install it with: pip install -e .[plots]") from err
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)  # attaches the Agg canvas to the figure
    return figure


def _save(figure: Any, out_png: str | os.PathLike) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    figure.savefig(out_png, format="png")


def read_metrics_jsonl(path: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """key -> (iterations, values) for every numeric key of every line that has "iteration".

    A line that does not parse (e.g. the last one while training is still writing) is skipped.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such metrics file (training writes metrics.jsonl to its output_dir)")
    series: dict[str, tuple[list[int], list[float]]] = {}
    skipped = 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if not isinstance(record, dict) or not isinstance(record.get("iteration"), (int, float)):
                continue
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    its, values = series.setdefault(key, ([], []))
                    its.append(int(record["iteration"]))
                    values.append(float(value))
    if skipped:
        logger.warning("%s: skipped %d lines that are not json", path, skipped)
    return series


def plot_training_curves(metrics_jsonl_path: str | os.PathLike, out_png: str | os.PathLike) -> None:
    """Losses, learning rate and AP keys against iteration, one panel each, as a PNG."""
    series = read_metrics_jsonl(metrics_jsonl_path)
    panels = [
        ("loss", sorted(k for k in series if "loss" in k)),
        ("learning rate", [k for k in ("lr",) if k in series]),
        ("AP (%)", sorted(k for k in series if _AP_KEY.match(k))),
    ]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        raise ValueError(f"{metrics_jsonl_path}: no loss, lr or AP values to plot")
    figure = _figure(9.0, 2.8 * len(panels))
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            its, values = series[key]
            ax.plot(its, values, label=key, linewidth=1.0, marker="o" if len(its) < 30 else None, markersize=3)
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("iteration")
    figure.tight_layout()
    _save(figure, out_png)


def plot_pr_curves(pr_curves: Mapping[str, tuple[Any, Any]], out_png: str | os.PathLike, *,
                   metrics: Mapping[str, float] | None = None) -> None:
    """One small precision-recall panel per class (class -> (recall, precision) arrays, e.g.
    `evaluator.pr_curves`); with `metrics`, each title shows the class's "AP-<class>"."""
    if not pr_curves:
        raise ValueError("plot_pr_curves: no curves to plot (was the evaluator's evaluate() called?)")
    names = list(pr_curves)
    cols = math.ceil(math.sqrt(len(names)))
    rows = math.ceil(len(names) / cols)
    figure = _figure(2.6 * cols, 2.4 * rows)
    axes = figure.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax, name in zip(axes, names):
        recall, precision = (np.asarray(a, dtype=np.float64).reshape(-1) for a in pr_curves[name])
        ax.plot(recall, precision, linewidth=1.2)
        ap = metrics.get(f"AP-{name}") if metrics else None
        ax.set_title(name if ap is None or not math.isfinite(ap) else f"{name} (AP {ap:.1f})", fontsize=9)
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, 1.05)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    figure.supxlabel("recall")
    figure.supylabel("precision")
    figure.tight_layout()
    _save(figure, out_png)
