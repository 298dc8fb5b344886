"""ONNX export (detection/export.py, tools/export.py): ONNX Runtime's detections equal
PyTorch's (boxes within 0.01 px, scores within 1e-4, the same labels) on image sizes other
than the traced one, for a tiny model, the demo's shapes model and a random-weight R50-C4."""
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from detection.config import load_config
from detection.export import ExportableDetector, ExportError, check_with_onnxruntime, export_onnx, prepare_image
from detection.model import build_model
from detection.testing import make_sane
from tests.helpers import load_tool, make_model

ROOT = Path(__file__).resolve().parents[1]


def needs_onnx():
    for name in ("onnx", "onnxruntime"):
        pytest.importorskip(name, reason=f"ONNX export needs {name}, the export extra: pip install -e '.[export]'")


def images(*sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]


def traceable_equals_model(model, image):
    """The export's rewrite of inference (run in eager mode) against FasterRCNN's own."""
    with torch.no_grad():
        ref = model([image])[0]
        inputs = prepare_image(image, model.min_size_test, model.max_size_test, model.resize_mode)
        boxes, scores, labels = ExportableDetector(model)(torch.from_numpy(inputs["image"]),
                                                          torch.from_numpy(inputs["original_size"]))
    assert len(ref["scores"]) > 0
    assert torch.equal(labels, ref["labels"]) and torch.equal(scores, ref["scores"])
    assert torch.equal(boxes, ref["boxes"])


@pytest.mark.parametrize("variant", [{}, {"pooler": "roi_pool"}, {"global_context": True}])
def test_the_traceable_inference_is_the_models(variant):
    model = make_model(score_thresh_test=0.0, **variant).eval()
    model.input_format = "BGR"
    for image in images((70, 90), (120, 64)):
        traceable_equals_model(model, image)
    model.size_divisibility = 0
    traceable_equals_model(model, images((50, 77))[0])


def test_what_cannot_be_exported_is_one_clear_error():
    from detection.fast import optimize_for_inference
    from detection.refinement import BoxRefinement

    model = make_model().eval()
    with pytest.raises(ExportError, match="fast_path"):
        ExportableDetector(optimize_for_inference(model))
    with pytest.raises(ExportError, match="test-time augmentation"):
        ExportableDetector(torch.nn.Sequential(model))
    model.roi_heads.box_refinement = BoxRefinement(0.3, True, 0.5)
    with pytest.raises(ExportError, match="box_refinement"):
        ExportableDetector(model)


def assert_onnxruntime_equals_pytorch(model, path, sizes):
    traced = export_onnx(model, path, example_size=(model.min_size_test, model.min_size_test))
    results = check_with_onnxruntime(model, traced, images(*sizes))
    for result in results:
        assert result["model_size"] != [model.min_size_test] * 2  # not the traced size
        assert result["detections"] > 0 and result["equal"], result
    assert len({tuple(r["model_size"]) for r in results}) == len(sizes)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [{}, {"pooler": "roi_pool", "global_context": True}])
def test_onnxruntime_equals_pytorch_on_a_tiny_model(tmp_path, variant):
    needs_onnx()
    model = make_model(score_thresh_test=0.0, **variant).eval()
    model.input_format = "BGR"
    assert_onnxruntime_equals_pytorch(model, tmp_path / "tiny.onnx", [(70, 90), (200, 96)])


@pytest.mark.slow
@pytest.mark.parametrize("config, overrides", [
    # the demo's model (random weights): ResNet-18, BatchNorm, shapes' anchors and test sizes
    ("shapes_r18.yaml", []),
    # a random-weight R50-C4 of the COCO recipe, smaller images; at a score threshold of 0.01
    # its 80 near-uniform classes give a full 100 detections, so the per-class NMS is exercised
    ("coco_r50.yaml", ["input.min_size_test=192", "input.max_size_test=320",
                       "model.roi_heads.score_thresh_test=0.01", "model.rpn.post_nms_topk_test=100"]),
])
def test_onnxruntime_equals_pytorch(tmp_path, config, overrides):
    needs_onnx()
    cfg = load_config(ROOT / "configs" / config, ["model.backbone.weights=null", *overrides])
    model = make_sane(build_model(cfg)).eval()
    side = cfg.input.min_size_test
    assert_onnxruntime_equals_pytorch(model, tmp_path / "model.onnx", [(side // 2, side), (side * 2, side + 30)])


@pytest.mark.slow
def test_export_tool_writes_and_checks_the_file(tmp_path):
    needs_onnx()
    from detection.data.shapes import generate_shapes
    from detection.engine.trainer import train
    from tests.helpers import tiny_overrides

    generate_shapes(tmp_path / "data" / "shapes", num_train=4, num_val=2, seed=1, image_size=(64, 80))
    overrides = tiny_overrides(tmp_path / "data", tmp_path / "out", **{"solver.max_iter": 1,
                               "model.roi_heads.score_thresh_test": 0.0, "model.fast_path": True})
    train(load_config(None, overrides))
    base = [sys.executable, str(ROOT / "tools" / "export.py"), "--config", str(ROOT / "configs" / "base.yaml"),
            "--weights", str(tmp_path / "out" / "model_final.pth")]
    out = subprocess.run([*base, "--output", str(tmp_path / "m.onnx"), *overrides], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "plain path" in out.stdout and out.stdout.count(": equal") == 2, out.stdout
    import onnx

    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    assert {i.name for i in onnx.load(str(tmp_path / "m.onnx")).graph.input} == {"image", "original_size"}
    out = subprocess.run([*base, "--output", str(tmp_path / "r.onnx"), *overrides, "test.box_refinement.enabled=true"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: ONNX export: box"), \
        out.stderr


def test_prepare_image_resizes_as_the_model():
    image = np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8)
    inputs = prepare_image(image, 100, 150)
    assert inputs["image"].shape == (1, 3, 94, 150) and inputs["image"].dtype == np.uint8
    assert inputs["original_size"].tolist() == [50, 80]
    with pytest.raises(ValueError, match="uint8"):
        prepare_image(image.astype(np.float32), 100, 150)


@pytest.mark.slow  # exports and times a model
def test_benchmark_times_onnxruntime_against_the_fast_path(capsys):
    needs_onnx()
    benchmark = load_tool("benchmark")
    assert benchmark.parse_args(["--config", "c.yaml", "--onnx"]).onnx
    model = make_model(score_thresh_test=0.0).eval()
    options = SimpleNamespace(chunk_size=256, warmup=0, runs=1)
    onnx = benchmark.bench_onnx(model, [img.float() for img in images((96, 128))], options)
    for name in ("fast", "onnxruntime"):
        assert onnx[name]["end_to_end_median_s"] > 0 and onnx[name]["vs_plain"]["equal"], onnx
    assert onnx["onnxruntime"]["vs_plain"]["detections"] > 0
    benchmark.print_onnx(onnx)
    assert "ONNX Runtime vs the fast path" in capsys.readouterr().out


def test_export_check_reports_unpaired_detections_as_differing_not_zero(monkeypatch, capsys):
    """ONNX Runtime finding another number of detections than PyTorch: the tool's check says the
    counts or labels differ and fails, instead of printing box and score differences of 0."""
    import detection.export as export_module
    from detection.testing import compare_detections

    ref = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    none = {key: value[:0] for key, value in ref.items()}
    monkeypatch.setattr(export_module, "check_with_onnxruntime", lambda model, path, images: [
        {"model_size": [96, 144], **compare_detections(ref, none)}])
    tool = load_tool("export")
    assert tool._check(SimpleNamespace(min_size_test=96), Path("model.onnx")) is False
    out = capsys.readouterr().out
    assert "0 / 1 detections, counts or labels DIFFER: NOT EQUAL" in out and "max box diff" not in out
