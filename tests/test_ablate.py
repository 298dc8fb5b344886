"""tools/ablate.py: the paper's Table 9 rows for a checkpoint (and a global-context one)."""
import json
import subprocess
import sys

import pytest
import torch

from detection.config import load_config
from detection.data.catalog import get_datasets
from detection.data.shapes import generate_shapes
from detection.engine.loading import build_inference_model
from detection.engine.trainer import train
from detection.evaluation import evaluate_test_sets
from tests.helpers import ROOT, load_tool, tiny_overrides


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny baseline and a tiny global-context model, trained a few iterations on shapes."""
    root = tmp_path_factory.mktemp("ablate")
    generate_shapes(root / "data" / "shapes", num_train=6, num_val=3, seed=2, image_size=(64, 80))
    extra = {"solver.max_iter": 2, "model.roi_heads.score_thresh_test": 0.0,
             "test.multi_scale.sizes": [48, 64, 96], "test.multi_scale.max_size": 160}
    base = tiny_overrides(root / "data", root / "base", **extra)
    train(load_config(None, base))
    context = tiny_overrides(root / "data", root / "context", **extra, **{"model.roi_heads.global_context": True})
    train(load_config(None, context))
    return root, base


def ablate(root, overrides, *args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "ablate.py"), "--config",
                           str(root / "base" / "config.yaml"), *args], capture_output=True, text=True, cwd=ROOT)


def test_ablation_rows_and_the_baseline_equals_plain_evaluation(runs):
    root, overrides = runs
    out = root / "table"
    result = ablate(root, overrides, "--weights", str(root / "base" / "model_final.pth"),
                    "--context-weights", str(root / "context" / "model_final.pth"), "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "ablation.json").read_text())
    names = [row["row"] for row in saved["rows"]]
    assert names == ["baseline", "+ box refinement", "+ global context", "+ multi-scale testing",
                     "+ box refinement + multi-scale testing", "all three"]
    assert [row["weights"].endswith(("context/model_final.pth",)) for row in saved["rows"]] == \
        [False, False, True, False, False, True]
    for row in saved["rows"]:
        assert 0 <= row["AP"] <= 100 and row["seconds_per_image"] > 0
    assert "| baseline |" in (out / "ablation.md").read_text()
    # the baseline row is what evaluating the checkpoint without any switch gives
    cfg = load_config(root / "base" / "config.yaml")
    model, _ = build_inference_model(cfg, root / "base" / "model_final.pth", torch.device("cpu"))
    datasets = get_datasets(cfg.datasets.test, cfg.datasets.root)
    plain = evaluate_test_sets(datasets, model=model)[datasets[0].name]
    assert saved["rows"][0]["AP"] == pytest.approx(plain["AP"], abs=1e-9)
    assert saved["rows"][0]["AP50"] == pytest.approx(plain["AP50"], abs=1e-9)
    # each row kept its evaluation files
    assert (out / "all_three" / "shapes_val" / "metrics.json").is_file()


def test_without_context_weights_the_context_rows_are_left_out():
    ablate_tool = load_tool("ablate")
    rows = [row[0] for row in ablate_tool.select_rows(False)]
    assert rows == ["baseline", "+ box refinement", "+ multi-scale testing", "+ box refinement + multi-scale testing"]
    assert len(ablate_tool.select_rows(True)) == 6


def test_another_checkpoints_ablation_is_not_overwritten(runs, tmp_path):
    root, overrides = runs
    out = tmp_path / "t"
    out.mkdir()
    (out / "ablation.json").write_text(json.dumps({"sources": {"weights": "/elsewhere/model_final.pth"}}))
    result = ablate(root, overrides, "--weights", str(root / "base" / "model_final.pth"), "--output-dir", str(out))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "--overwrite" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_context_checkpoint_as_the_baseline_is_one_clear_line(runs, tmp_path):
    root, overrides = runs
    result = ablate(root, overrides, "--weights", str(root / "context" / "model_final.pth"),
                    "--output-dir", str(tmp_path / "t"))
    assert result.returncode == 2
    assert "global_context" in result.stderr and len(result.stderr.strip().splitlines()) == 1
