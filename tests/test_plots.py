"""PNG plots of training curves and precision-recall curves (matplotlib, Agg)."""
from __future__ import annotations

import json
import sys

import cv2
import numpy as np
import pytest

from detection.plots import plot_pr_curves, plot_training_curves, read_metrics_jsonl

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


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    with pytest.raises(ImportError, match=r"pip install -e \.\[plots\]"):
        plot_pr_curves({"cat": ([0.5], [1.0])}, tmp_path / "pr.png")
