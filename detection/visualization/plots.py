"""PNG plots: training curves from metrics.jsonl and per-class precision-recall curves.

Losses are drawn raw and faint with their moving average on top (`moving_average`); each
precision-recall panel's title carries the class's AP. The `*_figure` functions build the
figures (tests read them back), the `plot_*` functions save them.

matplotlib is an optional extra (`pip install -e .[plots]`), imported only when a plot is
made. Figures are drawn on the Agg canvas directly, without pyplot, so no GUI backend and
no global matplotlib state are involved.
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from detection.utils.files import atomic_write, read_metrics_lines

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


def save_figure(figure: Any, out_png: str | os.PathLike) -> None:
    """The figure as a PNG, whole or not at all (atomic_write: a killed eval.py left a 0-byte
    pr_curves.png)."""
    with atomic_write(out_png, "wb") as f:
        figure.savefig(f, format="png")


def read_metrics_jsonl(path: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """key -> (iterations, values) for every numeric key of every line that has "iteration".

    A line that does not parse (e.g. the last one while training is still writing) is skipped.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such metrics file (training writes metrics.jsonl to its output_dir)")
    series: dict[str, tuple[list[int], list[float]]] = {}
    lines, skipped = read_metrics_lines(path)
    for _, record in lines:
        for key, value in record.items():
            if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                its, values = series.setdefault(key, ([], []))
                its.append(int(record["iteration"]))
                values.append(float(value))
    if skipped:
        logger.warning("%s: skipped %d lines that are not metrics records", path, skipped)
    return series


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean of the last `window` values, of fewer at the start:
    out[i] = mean(values[max(0, i - window + 1) : i + 1]). Non-finite values are left out of
    the means (nan where a window holds none)."""
    if window < 1:
        raise ValueError(f"moving_average: window must be >= 1, got {window}")
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = np.isfinite(values)
    kernel = np.ones(window)
    sums = np.convolve(np.where(finite, values, 0.0), kernel)[: len(values)]
    counts = np.convolve(finite.astype(np.float64), kernel)[: len(values)]
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def smoothing_window(num_values: int) -> int:
    """The loss curves' moving-average window: a twentieth of the points, 1 to 50."""
    return int(min(50, max(1, num_values // 20)))


def plot_training_curves(metrics_jsonl_path: str | os.PathLike, out_png: str | os.PathLike) -> None:
    """Losses, learning rate and AP keys against iteration, one panel each, as a PNG."""
    series = read_metrics_jsonl(metrics_jsonl_path)
    save_figure(training_curves_figure(series, source=str(metrics_jsonl_path)), out_png)


def training_curves_figure(series: Mapping[str, tuple[Sequence[int], Sequence[float]]], source: str = "metrics") -> Any:
    """The figure of plot_training_curves from `read_metrics_jsonl`'s series: each loss raw and
    faint with its moving average (`smoothing_window` points) on top in the same colour."""
    panels = [
        ("loss", sorted(k for k in series if "loss" in k)),
        ("learning rate", [k for k in ("lr",) if k in series]),
        ("AP (%)", sorted(k for k in series if _AP_KEY.match(k))),
    ]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        raise ValueError(f"{source}: no loss, lr or AP values to plot")
    figure = _figure(9.0, 2.8 * len(panels))
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            its, values = series[key]
            window = smoothing_window(len(values)) if title == "loss" else 1
            marker = "o" if len(its) < 30 else None
            if window == 1:
                ax.plot(its, values, label=key, linewidth=1.0, marker=marker, markersize=3)
                continue
            (raw,) = ax.plot(its, values, linewidth=0.8, alpha=0.3, label="_raw " + key)
            ax.plot(its, moving_average(values, window), color=raw.get_color(), linewidth=1.5,
                    label=f"{key} (mean of {window})")
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("iteration")
    figure.tight_layout()
    return figure


def curve_ap(recall: Any, precision: Any) -> float:
    """The AP (percent) of one precision-recall curve as the evaluators give it: COCO's curve is
    sampled at the 101 recall thresholds 0, 0.01, ..., 1 and its AP is the mean precision there;
    any other curve (VOC's cumulative recall and precision) gets the area under its precision
    envelope, as VOC2010+. nan for an empty curve."""
    recall = np.asarray(recall, dtype=np.float64).reshape(-1)
    precision = np.asarray(precision, dtype=np.float64).reshape(-1)
    if recall.size == 0 or recall.size != precision.size:
        return math.nan
    if recall.size == 101 and np.allclose(recall, np.linspace(0.0, 1.0, 101)):
        defined = precision[precision > -1]  # COCOeval's -1: no ground truth
        return float(defined.mean() * 100) if defined.size else math.nan
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.maximum.accumulate(np.concatenate(([0.0], precision, [0.0]))[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]) * 100)


def plot_pr_curves(pr_curves: Mapping[str, tuple[Any, Any]], out_png: str | os.PathLike, *,
                   metrics: Mapping[str, float] | None = None) -> None:
    """One small precision-recall panel per class (class -> (recall, precision) arrays, e.g.
    `evaluator.pr_curves`), each titled with the class's AP (see pr_curves_figure)."""
    save_figure(pr_curves_figure(pr_curves, metrics=metrics), out_png)


def pr_curves_figure(pr_curves: Mapping[str, tuple[Any, Any]], *,
                     metrics: Mapping[str, float] | None = None) -> Any:
    """The figure of plot_pr_curves. Each panel's title is "<class> (AP x)" with the metrics'
    "AP-<class>" when `metrics` has it, else "<class> (AP50 x)": the AP of the curve drawn
    (the curves are at IoU 0.5; `curve_ap`)."""
    if not pr_curves:
        raise ValueError("plot_pr_curves: no curves to plot (was the evaluator's evaluate() called?)")
    names, note = _panels(pr_curves, metrics)
    cols = math.ceil(math.sqrt(len(names)))
    rows = math.ceil(len(names) / cols)
    figure = _figure(2.6 * cols, 2.4 * rows)
    axes = figure.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax, name in zip(axes, names):
        recall, precision = (np.asarray(a, dtype=np.float64).reshape(-1) for a in pr_curves[name])
        ax.plot(recall, precision, linewidth=1.2)
        ax.set_title(_pr_title(name, recall, precision, metrics), fontsize=9)
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, 1.05)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    figure.supxlabel("recall")
    figure.supylabel("precision")
    if note:
        figure.suptitle(note, fontsize=10)
    figure.tight_layout()
    return figure


# More classes than this get a panel each only for the half with the lowest AP and the half with
# the highest: one per class took 35 s and 3.5 MB of PNG at 400 classes, 131 s at LVIS's 1200,
# most of an evaluation's time (a many-class trial); every class's AP stays in metrics.json.
MAX_PR_PANELS = 48


def _panels(pr_curves: Mapping[str, tuple[Any, Any]], metrics: Mapping[str, float] | None) -> tuple[list[str], str]:
    """The classes drawn (in their order) and the figure's note when not all of them are."""
    names = list(pr_curves)
    if len(names) <= MAX_PR_PANELS:
        return names, ""

    def ap(name: str) -> float:
        value = metrics.get(f"AP-{name}") if metrics else None
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            value = curve_ap(*(np.asarray(a, dtype=np.float64).reshape(-1) for a in pr_curves[name]))
        return value if math.isfinite(value) else math.inf
    ranked = sorted((n for n in names if math.isfinite(ap(n))), key=ap)  # stable: ties in class order
    half = MAX_PR_PANELS // 2
    if len(ranked) > MAX_PR_PANELS:
        chosen = set(ranked[:half] + ranked[-half:])
        which = f"the {half} with the lowest AP and the {half} with the highest"
    else:  # few have an AP: those, then the first others
        chosen = set(ranked) | set([n for n in names if n not in ranked][:MAX_PR_PANELS - len(ranked)])
        which = f"the {len(ranked)} with an AP, then the first of the others"
    return ([n for n in names if n in chosen],
            f"{MAX_PR_PANELS} of {len(names)} classes: {which} (every class's AP is in metrics.json)")


def _pr_title(name: str, recall: np.ndarray, precision: np.ndarray, metrics: Mapping[str, float] | None) -> str:
    ap = metrics.get(f"AP-{name}") if metrics else None
    if isinstance(ap, (int, float)) and math.isfinite(ap):
        return f"{name} (AP {ap:.1f})"
    ap50 = curve_ap(recall, precision)
    return name if not math.isfinite(ap50) else f"{name} (AP50 {ap50:.1f})"
