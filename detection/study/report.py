"""A study's outputs from what study.json holds: the markdown table (the paper's Table 3 style)
and the plot (the paper's Figure 4 style: training loss against iterations, plain nets on the
left, residual nets on the right, the deeper net drawn bold). Plots use the Agg canvas of
detection/visualization/plots.py (no pyplot, no GUI backend)."""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from detection.visualization.plots import moving_average, save_figure

SMOOTH_FRACTION = 0.04  # the curves are drawn as a trailing mean over this fraction of their logged points


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)  # the Agg canvas, without pyplot's global state
    return figure


def _number(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def markdown_table(study: dict) -> str:
    """One row per variant: backbone options, parameters, multiply-adds, and, when trained, the
    final training loss, AP and AP50 on the test sets, and the training time."""
    trained = study.get("trained", True)
    header = ["variant", "depth", "shortcuts", "params (M)", "GMACs"]
    if trained:
        header += ["final train loss", "final RPN loss", "AP", "AP50", "iterations", "train min"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in study["variants"]:
        shortcuts = "none (plain)" if not v["residual"] else \
            {"A": "A: identity, zero-padding", "B": "B: projection where shape changes",
             "C": "C: projection in every block"}[v["shortcut"]]
        row = [v["name"], str(v["depth"]), shortcuts, f"{v['params'] / 1e6:.2f}", f"{v['macs'] / 1e9:.2f}"]
        if trained:
            minutes = v.get("train_seconds")
            row += [_number(v.get("final_train_loss"), 3), _number(v.get("final_rpn_loss"), 3),
                    _number(v.get("AP"), 1), _number(v.get("AP50"), 1), str(v.get("iterations", "-")),
                    _number(minutes / 60 if minutes else None, 1) + (" *" if v.get("resumed") else "")]
        lines.append("| " + " | ".join(row) + " |")
    notes = [f"Params and GMACs: {study['flops_note']}."]
    if trained and study.get("schedule"):
        notes.append(schedule_note(study["schedule"]))
    if trained:
        headline = sorted({v["AP_test_set"] for v in study["variants"] if v.get("AP_test_set")})
        sets = headline or sorted({str(s) for v in study["variants"] for s in v.get("test_sets", [])})
        first = " (the first test set; study.json has every set's metrics)" if headline else ""
        notes.append(f"Final train loss: {study['final_loss_note']}. AP, AP50: COCO metrics on "
                     f"{', '.join(sets) or 'the test sets'}{first}.")
        if any(v.get("resumed") for v in study["variants"]):
            notes.append("* resumed after a stop: the train time is the last part's only.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def schedule_note(schedule: dict) -> str:
    """The learning-rate schedule every variant trained with, and the one --max-iter scaled."""
    scaled = schedule.get("scaled_from")
    return (f"Schedule: {_schedule_text(schedule)}"
            + (f" (--max-iter scaled the config's {_schedule_text(scaled)})." if scaled else "."))


def _schedule_text(s: dict) -> str:
    drops = ("cosine to 0" if s["lr_schedule"] != "multistep" else
             f"x{s['gamma']} at {s['steps']}" if s["steps"] else "no steps")
    warmup = (f"after a {s['warmup_iters']}-iteration warmup from x{s['warmup_factor']}" if s["warmup_iters"]
              else "from the start (no warmup)")
    return f"{s['max_iter']} iterations, lr {s['base_lr']} {warmup}, {drops}"


ROWS = (("loss_curve", "final_train_loss", "total training loss"),
        ("rpn_loss_curve", "final_rpn_loss", "RPN training loss"))


def study_figure(study: dict) -> Any:
    """One column per variant family (plain | residual, or one for the shortcut options), one row
    per loss (total; RPN, when recorded); in each panel every variant's loss, raw and faint, and its
    trailing mean on top, the deeper net bold (as the paper's Figure 4)."""
    panels: list[str] = []
    for v in study["variants"]:
        if v["panel"] not in panels:
            panels.append(v["panel"])
    rows = [row for row in ROWS if any(v.get(row[0]) for v in study["variants"])]
    figure = _figure(5.0 * len(panels), 3.6 * len(rows))
    grid = figure.subplots(len(rows), len(panels), sharex=True, sharey="row", squeeze=False)
    colours = ["tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange"]
    for axes, (curve_key, final_key, label) in zip(grid, rows):
        top = 0.0  # the y range: what the smoothed curves reach after their first 5% (the start is off the scale)
        for ax, panel in zip(axes, panels):
            members = [v for v in study["variants"] if v["panel"] == panel and v.get(curve_key)]
            deepest = max((v["depth"] for v in members), default=0)
            for index, v in enumerate(members):
                iterations = [point[0] for point in v[curve_key]]
                losses = [point[1] for point in v[curve_key]]
                colour = colours[index % len(colours)]
                ax.plot(iterations, losses, color=colour, alpha=0.15, linewidth=0.5)
                smooth = moving_average(losses, max(1, round(len(losses) * SMOOTH_FRACTION)))
                top = max(top, float(np.nanmax(smooth[len(smooth) // 20:])))
                bold = v["depth"] == deepest and len({m["depth"] for m in members}) > 1
                ax.plot(iterations, smooth, color=colour, linewidth=2.2 if bold else 1.2,
                        label=f"{v['name']} (final {v.get(final_key, math.nan):.3f})")
            ax.set_title(f"{panel}: {label}", fontsize=10)
            ax.grid(alpha=0.3)
            if members:
                ax.legend(loc="upper right", fontsize=8)
        if top > 0:
            axes[0].set_ylim(0.0, 1.1 * top)
        axes[0].set_ylabel(f"{label}\n(trailing mean over {SMOOTH_FRACTION:.0%} of the run)", fontsize=9)
    for ax in grid[-1]:
        ax.set_xlabel("iteration")
    figure.suptitle(f"study: {study['study']}", fontsize=10)
    figure.tight_layout()
    return figure


def plot_study(study: dict, out_png: str | os.PathLike) -> None:
    save_figure(study_figure(study), out_png)
