"""PNG plots of training curves and precision-recall curves (matplotlib, Agg)."""
from __future__ import annotations

import json
import sys

import cv2
import numpy as np
import pytest

from detection.visualization.plots import (curve_ap, moving_average, plot_pr_curves, plot_training_curves, pr_curves_figure,
                             read_metrics_jsonl, smoothing_window, training_curves_figure)

pytest.importorskip("matplotlib")


def _read_png(path) -> np.ndarray:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imread(str(path))
    assert image is not None and image.size > 0
    return image


def _write_jsonl(path, with_ap: bool = True) -> None:
    lines = []
    for it in range(20, 201, 20):
        lines.append({"iteration": it, "loss_cls": 1.0 / it, "loss_box": 0.5 / it, "total_loss": 1.5 / it,
                      "lr": 0.01 * min(1.0, it / 100), "time": 0.1})
        if with_ap and it % 100 == 0:
            lines.append({"iteration": it, "AP": it / 10, "AP50": it / 5, "AP-circle": 3.0})
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n{\"iteration\": 2")  # a cut last line


def test_training_curves_png(tmp_path):
    _write_jsonl(tmp_path / "metrics.jsonl")
    series = read_metrics_jsonl(tmp_path / "metrics.jsonl")
    assert series["AP50"] == ([100, 200], [20.0, 40.0]) and len(series["loss_cls"][0]) == 10
    plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "out" / "curves.png")
    with_ap = _read_png(tmp_path / "out" / "curves.png")
    _write_jsonl(tmp_path / "no_ap.jsonl", with_ap=False)
    plot_training_curves(tmp_path / "no_ap.jsonl", tmp_path / "no_ap.png")
    assert with_ap.shape[0] > _read_png(tmp_path / "no_ap.png").shape[0]  # an extra AP panel


def test_training_curves_need_values(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl"):
        plot_training_curves(tmp_path / "empty.jsonl", tmp_path / "x.png")
    with pytest.raises(ValueError, match="missing.jsonl"):
        plot_training_curves(tmp_path / "missing.jsonl", tmp_path / "x.png")


def test_pr_curves_png(tmp_path):
    curves = {"cat": (np.array([0.25, 0.5, 0.75]), np.array([1.0, 0.67, 0.5])),
              "dog": (np.linspace(0, 1, 101), np.linspace(1, 0, 101))}
    plot_pr_curves(curves, tmp_path / "pr.png", metrics={"AP-cat": 54.5})
    image = _read_png(tmp_path / "pr.png")
    assert (image < 200).any()  # something is drawn on the white figure
    with pytest.raises(ValueError):
        plot_pr_curves({}, tmp_path / "none.png")


def test_a_plot_cut_while_written_leaves_the_previous_file(tmp_path, monkeypatch):
    """A killed eval.py left a 0-byte pr_curves.png (savefig wrote in place): the PNGs are written
    whole or not at all, as the results files are."""
    from matplotlib.figure import Figure

    curves = {"cat": (np.array([0.25, 0.5, 0.75]), np.array([1.0, 0.67, 0.5]))}
    plot_pr_curves(curves, tmp_path / "pr.png")
    before = (tmp_path / "pr.png").read_bytes()

    def cut(self, f, **kwargs):
        f.write(b"\x89PNG")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write

    monkeypatch.setattr(Figure, "savefig", cut)
    with pytest.raises(KeyboardInterrupt):
        plot_pr_curves(curves, tmp_path / "pr.png")
    assert (tmp_path / "pr.png").read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["pr.png"]

def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    with pytest.raises(ImportError, match=r"pip install -e \.\[plots\]"):
        plot_pr_curves({"cat": ([0.5], [1.0])}, tmp_path / "pr.png")


def test_moving_average_is_the_trailing_mean():
    np.testing.assert_array_equal(moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 3), [1.0, 1.5, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(moving_average([4.0, 0.0, 8.0], 1), [4.0, 0.0, 8.0])
    np.testing.assert_array_equal(moving_average([2.0, 4.0], 5), [2.0, 3.0])
    # a non-finite value is left out of its windows, not spread over the rest of the curve
    np.testing.assert_array_equal(moving_average([2.0, float("nan"), 4.0, 6.0], 2), [2.0, 2.0, 4.0, 5.0])
    np.testing.assert_array_equal(moving_average([float("inf"), 1.0], 1), [np.nan, 1.0])
    with pytest.raises(ValueError, match="window"):
        moving_average([1.0], 0)
    assert [smoothing_window(n) for n in (5, 39, 40, 220, 5000)] == [1, 1, 2, 11, 50]


def test_training_curves_draw_raw_losses_faintly_under_their_moving_average():
    its = list(range(10, 410, 10))  # 40 points: a window of 2
    losses = [float(i % 3) for i in range(40)]
    figure = training_curves_figure({"loss_cls": (its, losses), "lr": (its, [0.01] * 40)})
    loss_ax, lr_ax = figure.axes[:2]
    raw, smooth = loss_ax.get_lines()
    np.testing.assert_array_equal(raw.get_ydata(), losses)
    np.testing.assert_array_equal(smooth.get_ydata(), moving_average(losses, 2))
    assert raw.get_alpha() < 0.5 and smooth.get_alpha() is None and raw.get_color() == smooth.get_color()
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["loss_cls (mean of 2)"]
    assert len(lr_ax.get_lines()) == 1  # the learning rate is not smoothed


def test_pr_panels_are_titled_with_each_class_ap():
    coco_like = (np.linspace(0, 1, 101), np.r_[np.ones(51), np.zeros(50)])  # precision 1 up to recall 0.5
    voc_like = (np.array([0.25, 0.5, 0.75]), np.array([1.0, 0.5, 0.6]))
    figure = pr_curves_figure({"cat": coco_like, "dog": voc_like})
    # cat: 51 of COCO's 101 thresholds at precision 1; dog: envelope 1, 0.6, 0.6 on recall steps of 0.25 to 0.75
    assert [ax.get_title() for ax in figure.axes if ax.get_visible()] == ["cat (AP50 50.5)", "dog (AP50 55.0)"]
    figure = pr_curves_figure({"cat": coco_like, "dog": voc_like}, metrics={"AP-cat": 34.56, "AP-dog": float("nan")})
    assert [ax.get_title() for ax in figure.axes if ax.get_visible()] == ["cat (AP 34.6)", "dog (AP50 55.0)"]
    assert curve_ap(np.linspace(0, 1, 101), -np.ones(101)) != curve_ap(np.linspace(0, 1, 101), -np.ones(101))  # nan


def test_many_classes_get_panels_for_the_lowest_and_highest_ap_only():
    """One panel per class took 35 s and 3.5 MB of PNG at 400 classes (131 s at LVIS's 1200),
    most of an evaluation's time (a many-class trial): above MAX_PR_PANELS the figure draws the
    half with the lowest AP and the half with the highest, in class order, and says so."""
    from detection.visualization.plots import MAX_PR_PANELS

    curve = (np.array([0.5, 1.0]), np.array([1.0, 0.5]))
    names = [f"class {i}" for i in range(100)]
    metrics = {f"AP-class {i}": float((i * 37) % 100) for i in range(100)}  # APs 0..99, shuffled over the classes
    figure = pr_curves_figure({n: curve for n in names}, metrics=metrics)
    shown = [ax.get_title().split(" (")[0] for ax in figure.axes if ax.get_visible() and ax.get_title()]
    by_ap = sorted(names, key=lambda n: metrics[f"AP-{n}"])
    half = MAX_PR_PANELS // 2
    assert shown == [n for n in names if n in set(by_ap[:half] + by_ap[-half:])]
    note = f"{MAX_PR_PANELS} of 100 classes: the {half} with the lowest AP and the {half} with the highest " \
        "(every class's AP is in metrics.json)"
    assert note in [t.get_text() for t in figure.texts]  # the suptitle (figure.texts: matplotlib 3.7 too)
    few = pr_curves_figure({n: curve for n in names[:MAX_PR_PANELS]}, metrics=metrics)
    assert [t.get_text() for t in few.texts] == ["recall", "precision"]
    assert sum(ax.get_visible() for ax in few.axes) == MAX_PR_PANELS
