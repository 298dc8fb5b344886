"""Smoke test of tools/benchmark.py: a tiny model and image, every section, one run; the
speed targets live in the benchmark itself, not here."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the benchmark in subprocesses
ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.backbone.depth=18", "model.rpn.pre_nms_topk_test=100", "model.rpn.post_nms_topk_test=20",
        "model.rpn.pre_nms_topk_train=100", "model.rpn.post_nms_topk_train=30",
        "model.roi_heads.batch_size_per_image=16", "model.roi_heads.pooler_resolution=7",
        "model.anchors.sizes=[32,64]", "solver.ims_per_batch=2", "dataloader.num_workers=0"]
BENCHMARK = [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--config", str(ROOT / "configs" / "base.yaml")]


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [*BENCHMARK, *TINY, "--image-size", "64", "96", "--runs", "1", "--compare-torchvision", "--quick",
           "--no-memory", "--loader-batches", "1", "--eval-images", "1", "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    stages = {"preprocess", "trunk", "rpn", "roi_pool", "res5_head", "postprocess"}
    for name in ("plain", "fast", "torchvision"):
        entry = report["inference"][name]
        assert set(entry["stages_median_s"]) == stages
        assert entry["end_to_end_median_s"] > 0 and entry["num_rois"] > 0
    # the comparison with torchvision is fair: the same work (FLOPs within 10%, same RoIs)
    work = report["equal_work"]
    assert work["ok"], work
    assert abs(work["inference_flops_ratio"] - 1) <= 0.10 and abs(work["training_flops_ratio"] - 1) <= 0.10
    assert work["num_rois"]["plain"] == work["num_rois"]["torchvision"] > 0
    assert set(report["training"]) == {"plain", "fast", "fast_amp", "torchvision"}
    assert report["training"]["fast"]["iteration_median_s"] > 0
    assert report["data_loader"]["images_per_s"] > 0 and report["evaluation"]["images"] == 1
    assert report["hardware"]["matmul_gflops"] > 0
    # each ratio the table prints is a measured number (memory was skipped: no memory ratio)
    ratios = report["ratios"]
    for key in ("inference_speedup", "training_speedup", "training_speedup_amp_vs_fast",
                "inference_speedup_fast_vs_plain"):
        assert isinstance(ratios[key], float) and 0 < ratios[key] < float("inf"), (key, ratios[key])
    assert ratios["memory_ratio"] is None and report["targets_met"]["memory_ratio"] is None
    assert isinstance(report["targets_met"]["inference_speedup"], bool)
    assert f"inference_speedup {ratios['inference_speedup']:.2f}" in result.stdout
    assert report["inference"]["fast"]["vs_plain"]["equal"] and "fast vs plain:" in result.stdout


def test_benchmark_peak_memory_child():
    """The child process that measures one model's peak RSS (the parent runs one per model)."""
    cmd = [*BENCHMARK, *TINY, "--image-size", "64", "96", "--memory-proposals", "10", "--child", "fast"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["max_rss_mb"] >= figures["max_rss_before_inference_mb"] > 0
