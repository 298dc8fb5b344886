"""tools/benchmark.py and detection/benchmarking: the torchvision baseline gives our detections
(so its speed ratio compares equal work), unequal work is reported as not comparable, the
stages are read from our model's profiler labels, and the benchmark code touches no private
member of the library; then a smoke test of the tool (a tiny model and image, every section,
one run; slow). The speed targets live in the benchmark itself, not here: no timing is asserted."""
import ast
import io
import json
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from detection.benchmarking.models import (STAGES, ProposalRecorder, build_ours, build_torchvision_c4,
                                          compare_proposals, staged_torchvision, synthetic_batch)
from detection.benchmarking.profiling import OURS_LABELS, TORCHVISION_LABELS, profile_stages, stage_label
from detection.benchmarking.report import CUDA_TARGETS, TARGETS, print_ratios, summarize
from detection.benchmarking.memory import child_argv
from detection.benchmarking.meters import interleaved
from detection.config import load_config
from detection.accel import optimize_for_inference
from detection.testing import compare_detections
from detection.modeling.tta import DetectorWithTTA
from tests.helpers import TINY_BENCHMARK, load_tool, run_main

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_BENCHMARK
BENCHMARK = [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--config", str(ROOT / "configs" / "base.yaml")]


@pytest.mark.slow  # the benchmark in a subprocess
def test_benchmark_smoke(tmp_path):
    from detection.modeling.precision import training_amp

    out = tmp_path / "bench.json"
    tta = ["test.aug.enabled=true", "test.aug.min_sizes=[64]", "test.aug.max_size=96", "test.aug.flip=true"]
    # score threshold 0: at base.yaml's 0.05 the random model detects nothing, and "the same
    # detections as torchvision / the fast path" held vacuously (0 = 0); it costs ~4 s here
    cmd = [*BENCHMARK, *TINY, *tta, "model.roi_heads.score_thresh_test=0.0", "--image-size", "64", "96", "--runs", "1",
           "--compare-torchvision", "--quick", "--no-memory", "--loader-batches", "1", "--eval-images", "1",
           "--json", str(out)]
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
    # solver.amp's row where it runs: not on a CPU without bfloat16 instructions (the trainer trains in float32 there)
    amp = training_amp(True, "cpu")
    assert set(report["training"]) == {"plain", "fast", "torchvision"} | ({"fast_amp"} if amp else set())
    assert ("no fast_amp row: on a CPU without bfloat16 instructions" in result.stdout) == (not amp)
    assert report["training"]["fast"]["iteration_median_s"] > 0
    assert report["data_loader"]["images_per_s"] > 0 and report["evaluation"]["images"] == 1
    # evaluation runs the model as tools/eval.py does: the config's test-time augmentation
    assert report["evaluation"]["passes_per_image"] == 2 and report["evaluation"]["model_s"] > 0
    assert report["hardware"]["matmul_gflops"] > 0
    # each ratio the table prints is a measured number (memory was skipped: no memory ratio)
    ratios = report["ratios"]
    for key in ("inference_speedup", "training_speedup", "inference_speedup_fast_vs_plain",
                *(["training_speedup_amp_vs_fast"] if amp else [])):
        assert isinstance(ratios[key], float) and 0 < ratios[key] < float("inf"), (key, ratios[key])
    assert ratios["memory_ratio"] is None and report["targets_met"]["memory_ratio"] is None
    assert isinstance(report["targets_met"]["inference_speedup"], bool)  # equal work: a verdict
    assert report["inference"]["torchvision"]["vs_plain"]["equal"] and "torchvision vs plain:" in result.stdout
    assert report["equal_work"]["num_detections"]["plain"] == report["equal_work"]["num_detections"]["torchvision"] > 0
    assert report["inference"]["fast"]["vs_plain"]["detections"] > 0
    assert "not comparable" not in result.stdout and work["same_proposals"] is True
    assert f"inference_speedup {ratios['inference_speedup']:.2f}" in result.stdout
    assert report["inference"]["fast"]["vs_plain"]["equal"] and "fast vs plain:" in result.stdout


@pytest.mark.slow
def test_benchmark_peak_memory_child():
    """The child process that measures one model's peak RSS (the parent runs one per model)."""
    cmd = [*BENCHMARK, *TINY, "--image-size", "64", "96", "--memory-proposals", "10", "--child", "fast"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["max_rss_mb"] >= figures["max_rss_before_inference_mb"] > 0


def test_gpu_peak_memory_is_the_models_own(monkeypatch):
    """On CUDA the benchmark keeps its plain and torchvision models on the GPU while it measures
    each model's peak: the figure included them (two R50-C4s, about 260 MB, in every row; the
    fast row also the copy optimize_for_inference made it from). A stand-in of torch.cuda's
    allocator counters: 1000 MB held before, a model of 100 MB built through a passing copy of
    100 MB, 50 MB more at its inference's peak -> 150 MB."""
    import gc

    from detection.benchmarking import memory

    state = {"allocated": 1000, "peak": 1000}

    def allocate(mb):
        state["allocated"] += mb
        state["peak"] = max(state["peak"], state["allocated"])

    def build(args, kind):
        allocate(200)  # the model and the passing copy it is made from
        allocate(-100)  # the copy, freed
        return (lambda images: (allocate(50), allocate(-50))), []

    mb = 2 ** 20
    cuda = {"empty_cache": lambda: None, "synchronize": lambda: None,
            "memory_allocated": lambda: state["allocated"] * mb, "max_memory_allocated": lambda: state["peak"] * mb,
            "reset_peak_memory_stats": lambda: state.update(peak=state["allocated"])}
    for name, fn in cuda.items():
        monkeypatch.setattr(memory.torch.cuda, name, fn)
    monkeypatch.setattr(memory, "memory_model", build)
    monkeypatch.setattr(gc, "collect", lambda: 0)
    result = memory.bench_gpu_memory(None, ["plain"])
    assert result["plain"] == {"max_gpu_mb": 150, "gpu_before_inference_mb": 100}


# ---- the torchvision baseline does our work ------------------------------------------------


def tiny_config(height: int, width: int, **extra):
    """TINY with 3 classes (random weights then give detections above the score threshold) and
    the test size = the image size, as tools/benchmark.py sets it."""
    items = TINY + ["model.num_classes=3", "model.backbone.weights=null", f"input.min_size_test={min(height, width)}",
                    f"input.max_size_test={max(height, width)}"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(ROOT / "configs" / "base.yaml", items)


@pytest.mark.parametrize("size", [(64, 96), (72, 100)])  # 72 x 100 is padded to 96 x 128
def test_torchvision_c4_gives_our_detections(size):
    """Equal FLOPs do not prove equal work: the same weights must give the same proposals and
    detections. (Before: torchvision's rounded anchors and aligned=False RoIAlign moved boxes by
    up to half a pixel and changed the RoI count, e.g. 96 against 95.)"""
    cfg = tiny_config(*size)
    ours = build_ours(cfg)
    tv = build_torchvision_c4(ours, cfg)
    images, _ = synthetic_batch(1, size, cfg.model.num_classes)
    with torch.inference_mode(), ProposalRecorder(ours) as recorder:
        mine = ours(images)[0]
        theirs, tv_proposals = staged_torchvision(tv, [img / 255 for img in images], lambda stage: torch.no_grad())
        theirs_forward = tv([img / 255 for img in images])[0]
    assert recorder.count == sum(len(p) for p in tv_proposals) == 20
    torch.testing.assert_close(tv_proposals[0], recorder.proposals[0], atol=1e-3, rtol=0)  # also the order
    assert compare_proposals(recorder.proposals, tv_proposals)["equal"]
    assert len(mine["boxes"]) > 10
    for other in (theirs[0], theirs_forward):
        assert torch.equal(mine["labels"], other["labels"])
        torch.testing.assert_close(other["boxes"], mine["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(other["scores"], mine["scores"], atol=1e-5, rtol=0)
    assert compare_detections(mine, theirs_forward)["equal"]


def test_torchvision_c4_refuses_what_it_cannot_do():
    for key in ("model.roi_heads.global_context", "test.box_refinement.enabled", "model.backbone.stride_in_1x1"):
        cfg = tiny_config(64, 96, **{key: "true"})
        with pytest.raises(ValueError, match=key.split(".")[-1]):
            build_torchvision_c4(build_ours(cfg), cfg)
    for norm in ("bn", "gn"):  # the shapes configs train BN: it was a KeyError from deep inside
        cfg = tiny_config(64, 96, **{"model.backbone.norm": norm})
        with pytest.raises(ValueError, match=f"norm is '{norm}': give model.backbone.norm=frozen_bn"):
            build_torchvision_c4(build_ours(cfg), cfg)


def test_compare_proposals_as_sets():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 30.0], [1.0, 2.0, 3.0, 4.0]])
    assert compare_proposals([boxes], [boxes.flip(0)])["equal"]  # order does not matter
    assert not compare_proposals([boxes], [boxes[:2]])["equal"]  # one fewer
    shifted = boxes + torch.tensor([0.5, 0.0, 0.5, 0.0])  # half a pixel: torchvision's rounded anchors
    result = compare_proposals([boxes], [shifted])
    assert not result["equal"] and result["max_diff_px"] == pytest.approx(0.5)
    # a proposal clipped to 0.3 px: float32 noise of 0.001 px is IoU 0.997, still the same RoI
    thin = torch.tensor([[1087.672, 0.0, 1088.0, 800.0], [0.0, 0.0, 500.0, 400.0]])
    noisy = thin + torch.tensor([-0.001, 0.0, 0.0, 0.0])
    result = compare_proposals([thin, boxes], [noisy.flip(0), boxes])
    assert result["equal"] and result["min_best_iou"] < 0.999 and result["max_diff_px"] == pytest.approx(0.001, abs=1e-4)
    assert not compare_proposals([thin], [thin + 0.06])["equal"]


# ---- unequal work: no target is met -------------------------------------------------------


def fake_report(torchvision_rois: int, torchvision_detections: int = 7, same_proposals: bool | None = None,
                speedup: float = 1.91) -> dict:
    """A report as tools/benchmark.py collects it (no timing): torchvision 1.91 s, fast 1.0 s;
    the bfloat16 fast path 0.5 s."""
    def entry(seconds: float, rois: int, gflop: float, detections: int | None = None) -> dict:
        out = {"end_to_end_s": [seconds] * 3, "end_to_end_cpu_s": [seconds] * 3, "num_rois": rois,
               "stages_s": {s: [seconds / len(STAGES)] * 3 for s in STAGES},
               "flops": {"trunk": gflop * 0.4e9, "res5_head": gflop * 0.6e9}, "loadavg": [0.5]}
        if detections is not None:
            out["vs_plain"] = {"detections": 7, "other_detections": detections, "equal": detections == 7,
                               "proposals": {"equal": rois == 96 if same_proposals is None else same_proposals}}
        return out

    return {"inference": {"plain": entry(2.0, 96, 10.0), "fast": entry(1.0, 96, 9.0, 7),
                          "fast_bf16": entry(0.5, 96, 9.0, 7),
                          "torchvision": entry(speedup, torchvision_rois, 10.0, torchvision_detections)},
            "hardware": {"matmul_gflops": 100.0, "conv3x3_gflops": 40.0, "conv3x3_channels_last_gflops": 50.0},
            "loadavg_start": (0.1, 0.1, 0.1), "cpu_count": 2, "threads": 2}


def printed_ratios(report: dict) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        print_ratios(report)
    return out.getvalue()


@pytest.mark.parametrize("rois, detections, same_proposals", [(95, 7, None), (96, 6, None), (96, 7, False)])
def test_unequal_work_meets_no_target(rois, detections, same_proposals):
    """The RoI count, the detection count or the proposals themselves differ (equal FLOPs)."""
    report = summarize(fake_report(rois, detections, same_proposals))
    assert report["ratios"]["inference_speedup"] == pytest.approx(1.91)
    assert not report["equal_work"]["ok"]
    assert report["targets_met"] == {key: None for key in TARGETS}
    text = printed_ratios(report)
    assert "equal work: NO" in text and "inference_speedup: 1.91 (target >= 2.0): not comparable" in text
    assert text.count("not comparable") == 1 + len(TARGETS)  # the explanation and each target
    assert ": met" not in text and "NOT met" not in text


def test_equal_work_gives_a_verdict_and_rates_against_the_conv_peak():
    report = summarize(fake_report(96))
    assert report["equal_work"]["ok"] and report["targets_met"]["inference_speedup"] is False
    text = printed_ratios(report)
    assert "inference_speedup: 1.91 (target >= 2.0): NOT met" in text and "not comparable" not in text
    assert "training_speedup: - (target >= 2.0): -" in text
    assert report["ratios"]["bf16_vs_fp32_fast"] == pytest.approx(2.0)  # fast 1.0 s, bfloat16 0.5 s
    assert report["ratios"]["inference_speedup_bf16"] == pytest.approx(3.82)
    assert report["targets_met"]["bf16_vs_fp32_fast"] is True and report["targets_met"]["inference_speedup_bf16"] is True
    faster = summarize(fake_report(96, speedup=2.1))
    assert faster["targets_met"]["inference_speedup"] is True
    assert "inference_speedup: 2.10 (target >= 2.0): met" in printed_ratios(faster)
    fast = report["inference"]["fast"]  # res5_head: 5.4 GFLOP in 1/6 s = 32.4 GFLOP/s; peak 50 (channels_last)
    assert fast["stages_gflops_per_s"]["res5_head"] == pytest.approx(32.4)
    assert fast["stages_fraction_of_conv_peak"]["res5_head"] == pytest.approx(32.4 / 50)


# ---- our stages come from the profiler labels of the real forward ------------------------


@pytest.mark.parametrize("fast,amp", [(False, False), (True, False), (True, True)])
def test_profiled_stages_of_the_real_forward(fast, amp):
    """Every stage is seen; the FLOPs the labels split equal FlopCounterMode's total of the same
    call (nothing unlabelled, nothing twice: under bfloat16 autocast the profiler records each
    convolution twice, nested; the fast path's fused convolutions, which FlopCounterMode does
    not see, counted as the unfused path's); the detections are those of model(images)."""
    cfg = tiny_config(64, 96)
    model = unfused = build_ours(cfg)
    if fast:
        model = optimize_for_inference(model, chunk_size=7)  # 20 RoIs: 3 chunks
        unfused = optimize_for_inference(unfused, chunk_size=7, fuse=False)
    images, _ = synthetic_batch(2, (64, 96), cfg.model.num_classes)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp)
    with torch.inference_mode(), autocast:
        expected = model(images)
        with FlopCounterMode(display=False) as counter:
            unfused(images)
        dets, seconds, flops = profile_stages(lambda: model(images), OURS_LABELS, len(images), with_flops=True)
    assert set(seconds) == set(STAGES) and all(v > 0 for v in seconds.values()), seconds
    assert set(flops) == {"trunk", "rpn", "res5_head"}, flops
    assert sum(flops.values()) * len(images) == counter.get_total_flops()
    for a, b in zip(expected, dets):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])


def test_profiled_stages_of_torchvision_match_ours_in_flops():
    cfg = tiny_config(64, 96)
    ours = build_ours(cfg)
    tv = build_torchvision_c4(ours, cfg)
    images, _ = synthetic_batch(1, (64, 96), cfg.model.num_classes)
    with torch.inference_mode():
        _, _, mine = profile_stages(lambda: ours(images), OURS_LABELS, with_flops=True)
        _, seconds, theirs = profile_stages(lambda: staged_torchvision(tv, [images[0] / 255], stage_label),
                                            TORCHVISION_LABELS, with_flops=True)
    assert set(seconds) == set(STAGES)
    assert mine["trunk"] == theirs["trunk"] and mine["rpn"] == theirs["rpn"]
    # torchvision's predictor also has 4 box outputs for the background class
    assert theirs["res5_head"] - mine["res5_head"] == 2 * 20 * 4 * ours.roi_heads.predictor.cls_score.in_features


# ---- the benchmark times the library, not a copy of it -------------------------------------


def benchmark_sources() -> list[Path]:
    return sorted((ROOT / "detection" / "benchmarking").glob("*.py")) + [ROOT / "tools" / "benchmark.py"]


def test_benchmark_code_uses_no_private_member_of_the_library():
    """`heads._pool`, `detection.modeling.model._rescale`, ...: a copy of private steps drifts from the
    code it claims to time. Only public entry points and profiler labels."""
    found = []
    for path in benchmark_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append(f"{path.name}:{node.lineno}: .{node.attr}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("detection", "backbones"):
                found += [f"{path.name}:{node.lineno}: import {a.name}" for a in node.names if a.name.startswith("_")]
    assert not found


def test_benchmark_code_replaces_no_method_of_a_model():
    """Counting or timing by assigning over `detector.inference` (or forward) changes the object
    under test for everyone holding it; the benchmark uses public hooks and wrappers instead."""
    found = []
    for path in benchmark_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else []
            found += [f"{path.name}:{node.lineno}: .{t.attr} =" for t in targets
                      if isinstance(t, ast.Attribute) and t.attr in ("inference", "forward", "__call__")]
    assert not found


def test_proposal_recorder_counts_the_images_of_every_inference_pass():
    """The evaluation timing's passes per image: test-time augmentation at two sizes with the
    mirrored images runs each image through the box head 4 times (2 passes of 2 images)."""
    cfg = tiny_config(64, 96)
    detector = build_ours(cfg)
    tta = DetectorWithTTA(detector, min_sizes=[48, 64], max_size=96, flip=True)
    images, _ = synthetic_batch(1, (64, 96), cfg.model.num_classes)
    with torch.inference_mode(), ProposalRecorder(detector) as recorder:
        tta(images)
        assert recorder.images == 4
        detector(images)
    assert recorder.images == 5 and recorder.count == 20  # count: the last call's proposals


def test_runs_are_interleaved_in_alternating_order_after_the_warmup():
    assert list(interleaved(["a", "b"], warmup=1, runs=2)) == [
        (0, "a", False), (0, "b", False), (1, "b", True), (1, "a", True), (2, "a", True), (2, "b", True)]


def test_memory_children_get_the_command_line_without_size_and_json():
    """The parent gives each child the image size it settled on; a child must not write the JSON."""
    argv = ["--config", "c.yaml", "--image-size", "64", "96", "--json", "out.json", "--json=o.json", "--runs", "2",
            "model.rpn.post_nms_topk_test=10"]
    assert child_argv(argv) == ["--config", "c.yaml", "--runs", "2", "model.rpn.post_nms_topk_test=10"]


def test_chunk_size_option_is_checked_as_the_fast_path_checks_it(capsys):
    parse = load_tool("benchmark").parse_args
    assert parse(["--config", "c.yaml"]).chunk_size == "auto"
    assert parse(["--config", "c.yaml", "--chunk-size", "64"]).chunk_size == 64
    for bad in ("0", "-3", "many"):
        with pytest.raises(SystemExit) as exit_info:
            parse(["--config", "c.yaml", "--chunk-size", bad])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.splitlines()[-1]
        assert "argument --chunk-size" in error and "positive number of RoIs" in error


def test_make_sane_is_the_librarys_only():
    """tools/ and tests/ use detection.testing.make_sane, not a copy."""
    for path in sorted((ROOT / "tools").glob("*.py")) + sorted((ROOT / "tests").glob("*.py")) + benchmark_sources():
        tree = ast.parse(path.read_text())
        assert not any(isinstance(n, ast.FunctionDef) and n.name == "make_sane" for n in ast.walk(tree)), path
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and any(a.name == "make_sane" for a in node.names):
                assert node.module == "detection.testing", f"{path}: make_sane from {node.module}"


def test_compare_detections_does_not_report_zero_differences_for_unpaired_lists():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0]])
    ref = {"boxes": boxes, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])}
    near = {"boxes": boxes + 0.005, "scores": torch.tensor([0.9, 0.8005]), "labels": torch.tensor([1, 2])}
    swapped = {"boxes": boxes.flip(0), "scores": torch.tensor([0.8, 0.9]), "labels": torch.tensor([2, 1])}
    paired = compare_detections(ref, near)
    assert paired["equal"] and paired["max_box_diff_px"] == pytest.approx(0.005, abs=1e-6)
    unpaired = compare_detections(ref, swapped)
    assert not unpaired["equal"] and not unpaired["same_labels"]
    assert unpaired["max_box_diff_px"] is None and unpaired["max_score_diff"] is None
    # two detections whose scores tie (ONNX Runtime rounds 3e-9 otherwise: a random R50's 100
    # near-uniform scores came out swapped, and the export check read "not equal"): either order
    tied = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0], [1.0, 1.0, 4.0, 4.0]]),
            "scores": torch.tensor([0.5, 0.5, 0.1]), "labels": torch.tensor([1, 2, 3])}
    turned = {"boxes": tied["boxes"][[1, 0, 2]] + 0.001, "scores": torch.tensor([0.5, 0.5 - 3e-9, 0.1]),
              "labels": torch.tensor([2, 1, 3])}
    either = compare_detections(tied, turned)
    assert either["equal"] and either["tied_swaps"] == 2 and either["max_box_diff_px"] == pytest.approx(0.001, abs=1e-6)
    turned["boxes"][0] += 5  # the same labels at tied scores, but not the same box: not equal
    assert not compare_detections(tied, turned)["equal"]
    # one label's two tied detections swapped (the labels agree in order, the boxes only paired off it)
    same_label = {**tied, "labels": torch.tensor([1, 1, 3])}
    swapped_boxes = {**same_label, "boxes": tied["boxes"][[1, 0, 2]]}
    assert compare_detections(same_label, swapped_boxes)["tied_swaps"] == 2
    # labels in order but a box off: unequal, its difference reported (not None)
    moved = {**same_label, "boxes": same_label["boxes"] + torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 3, 0]])}
    result = compare_detections(same_label, moved)
    assert not result["equal"] and result["same_labels"] and result["max_box_diff_px"] == pytest.approx(3.0)


@pytest.fixture
def benchmark_main(capsys, restore_logging):
    """benchmark(*args): tools/benchmark.py's command line (--config configs/base.yaml first) run
    by its main() in this process -> (exit code, stdout, stderr); an unexpected exception (a
    traceback on the command line) raises here. main() flushes denormals: put that back after."""
    tool = load_tool("benchmark")
    yield lambda *args: run_main(tool, [*BENCHMARK[2:], *args], capsys)
    torch.set_flush_denormal(False)


@pytest.mark.slow  # the benchmark tool's command line
def test_a_missing_weights_file_is_one_line_not_a_traceback(tmp_path, benchmark_main):
    missing = tmp_path / "nope.pth"
    code, _, err = benchmark_main(*TINY, "--quick", "--runs", "1", "--no-train", "--no-memory", "--no-data",
                                  "--weights", missing)
    assert code == 2
    assert err.strip().splitlines()[-1] == f"error: {missing}: weights file not found"
    assert "Traceback" not in err


@pytest.mark.slow  # the benchmark tool's command line
def test_eval_images_with_a_dataset_is_refused_not_ignored(benchmark_main):
    code, _, err = benchmark_main("--dataset", "shapes_val", "--eval-images", "5")
    assert code == 2 and "Traceback" not in err
    assert "with --dataset the whole data set is timed" in err.strip().splitlines()[-1]


def cuda_report(plain_s: float = 2.0, fast_s: float = 1.0) -> dict:
    """fake_report as `--device cuda` collects it: the float16 variant, peak GPU memory, the
    TF32 / float16 probes, torchvision's AMP training step (2.2 s) beside ours (1.0 s)."""
    report = fake_report(96)
    inference = report["inference"]
    inference["fast_fp16"] = inference.pop("fast_bf16")
    for name, seconds in (("plain", plain_s), ("fast", fast_s)):
        inference[name]["end_to_end_s"] = [seconds] * 3
    step = {"iteration_s": [1.0] * 3, "iteration_cpu_s": [0.1] * 3, "parts_s": {}, "flops": 1e12}
    report["training"] = {"plain": dict(step), "fast": dict(step, iteration_s=[1.2] * 3),
                          "fast_amp": dict(step, step_peak_mb=900.0),
                          "torchvision": dict(step, iteration_s=[2.0] * 3),
                          "torchvision_amp": dict(step, iteration_s=[2.2] * 3, step_peak_mb=1000.0)}
    report["hardware"].update({"conv3x3_tf32_gflops": 80.0, "conv3x3_fp16_gflops": 300.0})
    report.update(device="cuda", gpu="NVIDIA H100", tf32=True)
    return report


def test_cuda_report_has_the_gpu_targets():
    report = summarize(cuda_report())
    assert report["targets_met"].keys() == CUDA_TARGETS.keys()
    assert report["ratios"]["fp16_vs_fp32_fast"] == pytest.approx(2.0)
    assert report["ratios"]["inference_speedup_fp16"] == pytest.approx(3.82)
    assert report["ratios"]["training_speedup_amp"] == pytest.approx(2.2)
    assert report["ratios"]["training_memory_ratio"] == pytest.approx(0.9)
    assert report["targets_met"]["inference_speedup_fast_vs_plain"] is True
    assert report["targets_met"]["training_speedup"] is True  # 2.0 / 1.2 >= 1.5
    text = printed_ratios(report)
    assert "inference_speedup_fast_vs_plain: 2.00 (target >= 1.0): met" in text
    assert "bf16" not in text
    # the stages' rates are fractions of the best conv probe, float16's on the GPU
    assert report["inference"]["fast"]["stages_fraction_of_conv_peak"]["res5_head"] == pytest.approx(32.4 / 300)
    slower = summarize(cuda_report(plain_s=1.0, fast_s=1.1))  # the default slower than plain: the rule broken
    assert slower["targets_met"]["inference_speedup_fast_vs_plain"] is False


def test_fast_against_plain_is_judged_without_torchvisions_work():
    """The default-never-slower rule compares our two paths: it gets its verdict when torchvision
    did other work (the torchvision targets do not), and none when the fast path's detections
    differ from the plain path's."""
    report = cuda_report()
    report["inference"]["torchvision"]["vs_plain"]["proposals"]["equal"] = False
    report = summarize(report)
    assert not report["equal_work"]["ok"] and report["targets_met"]["inference_speedup"] is None
    assert report["targets_met"]["inference_speedup_fast_vs_plain"] is True
    text = printed_ratios(report)
    assert "inference_speedup_fast_vs_plain: 2.00 (target >= 1.0): met" in text
    assert "inference_speedup: " in text and "not comparable" in text
    differs = cuda_report()
    differs["inference"]["fast"]["vs_plain"]["equal"] = False
    differs = summarize(differs)
    assert differs["equal_work"]["ok"] and differs["targets_met"]["inference_speedup_fast_vs_plain"] is None
    assert "inference_speedup_fast_vs_plain: 2.00 (target >= 1.0): not comparable" in printed_ratios(differs)


@pytest.mark.slow  # the benchmark tool's command line
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_one_line(benchmark_main):
    code, _, err = benchmark_main("--device", "cuda")
    assert code == 2 and "Traceback" not in err
    assert "--device cuda: this machine has no CUDA device" in err.strip().splitlines()[-1]


@pytest.mark.slow  # the tool's command line
def test_weights_that_hold_no_detector_are_one_line(tmp_path, benchmark_main):
    """A backbone file given as --weights: the project's WeightsError, one line, exit 2."""
    import torchvision

    backbone = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), backbone)
    code, _, err = benchmark_main(*TINY, "--quick", "--runs", "1", "--no-train", "--no-memory", "--no-data",
                                  "--weights", backbone)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: {backbone}: holds no detector")


def test_the_benchmarks_amp_step_scales_the_loss_as_training_does(monkeypatch):
    """solver.amp on CUDA trains with the GradScaler (its unscale and inf check are kernels of the
    step), and so do torchvision's reference scripts with --amp: the benchmark's AMP steps had none,
    so the measured step was cheaper than training's. bench_state now asks the trainer's rule."""
    from detection.benchmarking import models
    from detection.engine.train_state import amp_scaler

    asked = []
    monkeypatch.setattr(models, "amp_scaler", lambda amp, device: asked.append((amp, device.type)) or
                        amp_scaler(amp, device))
    model = torch.nn.Linear(2, 2)
    for amp in (True, False):
        state = models.bench_state(model, 0.9, 1e-4, amp=amp)
        assert not state.scaler.is_enabled()  # on the CPU: bfloat16, no loss scaling, as training
    assert asked == [(True, "cpu"), (False, "cpu")]
    if torch.cuda.is_available():
        assert models.bench_state(model.cuda(), 0.9, 1e-4, amp=True).scaler.is_enabled()


def test_the_timed_amp_steps_come_after_the_loss_scales_first_overflows():
    """At the scaler's first scale (65536) float16 gradients may overflow: such a step skips the
    update and halves the scale, cheaper than training's steps (a second review). The benchmark
    steps until the scale stops changing before it times; without a scaler, no step."""
    from types import SimpleNamespace

    from detection.benchmarking.models import settle_loss_scale

    scales = iter([65536.0, 32768.0, 16384.0, 16384.0, 16384.0])
    current = {"scale": next(scales)}
    scaler = SimpleNamespace(is_enabled=lambda: True, get_scale=lambda: current["scale"])
    steps = []

    def step():
        steps.append(1)
        current["scale"] = next(scales)

    assert settle_loss_scale(SimpleNamespace(scaler=scaler), step) == 3 and len(steps) == 3
    off = SimpleNamespace(scaler=SimpleNamespace(is_enabled=lambda: False))
    assert settle_loss_scale(off, lambda: steps.append(1)) == 0 and len(steps) == 3
