"""The demo pipeline end to end through the real commands, at a tiny scale."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tiny_overrides

pytestmark = pytest.mark.slow  # the demo pipeline through its command lines
ROOT = Path(__file__).resolve().parents[1]


def test_demo_generates_trains_evaluates_draws_and_reuses(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    overrides = [o for o in tiny_overrides(data, out, **{"solver.max_iter": 2})
                 if not o.startswith(("datasets.root=", "output_dir="))]
    cmd = [sys.executable, str(ROOT / "tools" / "demo.py"), "--data", str(data), "--output-dir", str(out),
           "--num-train", "6", "--num-val", "2", "--num-vis", "2", *overrides]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert (data / "shapes" / "annotations" / "instances_val.json").is_file()
    for name in ("model_final.pth", "metrics.jsonl", "config.yaml", "inference/shapes_val/metrics.json",
                 "inference/shapes_val/coco_results.json"):
        assert (out / name).is_file(), name
    assert len(list((out / "vis").glob("*.jpg"))) == 2
    metrics = json.loads((out / "inference" / "shapes_val" / "metrics.json").read_text())
    assert "AP50" in metrics and "AP50" in first.stdout and "target" in first.stdout
    # re-running reuses the data and the finished training (no new iterations logged)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "generate the shapes data set" not in again.stdout
    assert (out / "metrics.jsonl").read_text().splitlines() == lines
