"""The GPU suite (`make test-gpu`, marker `cuda`): every tool on CUDA, on tiny shapes data.

Skipped, with one line saying why, where torch.cuda.is_available() is False (CI, the
development machines). Sized to finish within a few minutes on one GPU: device time is lent in
short slices. float32 comparisons run with TF32 off (config `tf32: false`), so "equal" means
the rounding of float32, not of TF32's 10-bit mantissa.

`C4DET_CUDA_SUITE_ON_CPU=1` runs these tests' code on the CPU instead, to check the tests
themselves on a machine without a GPU. It proves nothing about CUDA.
"""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision

from detection.config import load_config
from detection.data.catalog import get_datasets
from detection.data.shapes import generate_shapes
from detection.engine.checkpoint import load_checkpoint
from detection.engine.inference_model import build_inference_model
from detection.engine.trainer import train
from detection.evaluation import evaluate_test_sets
from detection.testing import DeviceWaits, HostReads
from detection.utils.comm import set_tf32
from tests.helpers import IMAGES, TARGETS, load_tool, make_model, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
ON_CPU = os.environ.get("C4DET_CUDA_SUITE_ON_CPU") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"
# slow too: each test trains or runs a tool on the GPU, so `make test-fast` leaves them out there
pytestmark = [pytest.mark.cuda, pytest.mark.slow, pytest.mark.skipif(
    not ON_CPU and not torch.cuda.is_available(),
    reason="the GPU suite needs CUDA (torch.cuda.is_available() is False): run `make test-gpu` on a GPU machine")]


def overrides(root: Path, out: Path, **extra) -> list[str]:
    """The tests' tiny detector on the GPU, float32 without TF32, a few steps."""
    return tiny_overrides(root / "data", out, **{"device": DEVICE, "tf32": False, "solver.max_iter": 4,
                                                 "model.roi_heads.score_thresh_test": 0.0,
                                                 "test.multi_scale.sizes": [48, 64, 96],
                                                 "test.multi_scale.max_size": 160, **extra})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    generate_shapes(root / "data" / "shapes", num_train=8, num_val=3, seed=3, image_size=(64, 80))
    return root


@pytest.fixture(scope="module")
def trained(root):
    """Trained on the GPU with the fast path (the default) and solver.amp: float16 with the
    GradScaler on CUDA."""
    args = overrides(root, root / "amp", **{"solver.amp": True, "model.backbone.norm": "bn"})
    model = train(load_config(None, args))
    return args, root / "amp", model


@pytest.fixture(scope="module")
def context(root):
    args = overrides(root, root / "context", **{"model.roi_heads.global_context": True, "model.backbone.norm": "bn"})
    train(load_config(None, args))
    return args, root / "context"


def val_images(root: Path) -> list[torch.Tensor]:
    from detection.data.image_io import read_image

    folder = root / "data" / "shapes" / "val"
    return [torch.from_numpy(read_image(str(p))).permute(2, 0, 1) for p in sorted(folder.glob("*.jpg"))]


def detections(cfg, weights: Path, device: str, images: list[torch.Tensor]) -> list[dict]:
    model, _ = build_inference_model(cfg, weights, torch.device(device))
    with torch.inference_mode():
        return [{k: v.cpu() for k, v in out.items()} for out in model(images)]


def assert_equal(ref: list[dict], other: list[dict], box_tolerance: float, score_tolerance: float,
                 min_matched: float = 0.95) -> None:
    """Per image, at least `min_matched` of ref's detections have one in `other` with the same
    label, every box coordinate within box_tolerance px and the score within score_tolerance,
    and the counts differ by at most the rest. Matched as sets: another device's (or the folded
    convs') float rounding may reorder near-tied scores or flip an NMS tie of a barely trained
    model, which says nothing about the code."""
    for i, (a, b) in enumerate(zip(ref, other)):
        if len(a["boxes"]) == 0:
            assert len(b["boxes"]) == 0, f"image {i}: {len(b['boxes'])} detections against none"
            continue
        close = ((a["boxes"][:, None] - b["boxes"][None]).abs().amax(dim=2) <= box_tolerance) \
            & ((a["scores"][:, None] - b["scores"][None]).abs() <= score_tolerance) \
            & (a["labels"][:, None] == b["labels"][None])  # (ref, other)
        matched = float(close.any(dim=1).float().mean())
        assert matched >= min_matched, f"image {i}: {matched:.1%} of {len(a['boxes'])} detections matched"
        assert abs(len(a["boxes"]) - len(b["boxes"])) <= (1 - min_matched) * len(a["boxes"]) + 1, f"image {i}"


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 without TF32 in every test (a test that wants TF32 says so, e.g. through the
    config's tf32), and PyTorch's flags as they were afterwards."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    set_tf32(False)
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_training_with_amp_and_resume_on_the_gpu(trained):
    args, out, model = trained
    assert next(model.parameters()).device.type == DEVICE
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1, 2, 3, 4]
    assert all(x["total_loss"] == x["total_loss"] for x in lines)  # finite: no NaN from float16
    if DEVICE == "cuda":
        assert all(x["max_mem_mb"] > 0 for x in lines)
        assert load_checkpoint(out / "last.pth")["scaler"]["scale"] > 0  # the GradScaler ran
    cfg = load_config(None, [*args, "solver.max_iter=6"])
    train(cfg, resume=True)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint(out / "last.pth")["iteration"] == 6


@pytest.mark.skipif(ON_CPU, reason="CUDA's sync debug mode needs CUDA")
def test_every_wait_for_the_gpu_in_a_training_step_is_a_counted_host_read():
    """PyTorch's sync debug mode warns at each point where the host waits for the GPU
    (DeviceWaits places each at the project's innermost frame, as HostReads places its reads). In a
    training step of two images (forward and backward, global context on: its whole-image boxes
    and counts are host data too) the waits on the project's lines are exactly the reads HostReads
    counts there on any device (8 in all, as tests/test_gpu_levers.py pins on the CPU): the
    samplers' CPU randperm and the other host data reach the GPU without a wait (host_to_device),
    and no op waits where the CPU-side count cannot see it (bincount's max, a pageable copy, the
    backward). NMS waits twice inside torchvision (its mask to the host, its kept indices back),
    which HostReads counts as one read at the project's call."""
    torch.manual_seed(0)
    model = make_model(global_context=True).to(DEVICE).train()
    images = [image.float().to(DEVICE) for image in IMAGES]
    targets = [{k: v.to(DEVICE) for k, v in t.items()} for t in TARGETS]
    sum(model(images, targets).values()).backward()  # warm-up: cuDNN's plans, the caching allocators
    torch.cuda.synchronize()
    with DeviceWaits() as waits, HostReads() as reads:
        sum(model(images, targets).values()).backward()
    nms_file = str(Path(torchvision.ops.boxes.__file__))
    nms_places = {place for place in reads.places if place.endswith(" first_nms_survivors")}
    direct = Counter(place for place, files in waits.waits if nms_file not in files)
    in_nms = {place for place, files in waits.waits if nms_file in files}
    counted = Counter({place: n for place, n in reads.places.items() if place not in nms_places})
    assert reads.count == 8 and direct == counted and in_nms <= nms_places, (waits.waits, reads.places)


def test_torchrun_one_process_trains_through_ddp(root):
    """`torchrun --nproc_per_node 1`: the process group (NCCL on CUDA), DDP and the all-reduces; then
    eval.py under torchrun."""
    args = overrides(root, root / "torchrun", **{"solver.max_iter": 2})
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                          str(ROOT / "tools" / "train_det.py"), "--config", str(ROOT / "configs" / "base.yaml"),
                          *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (root / "torchrun" / "model_final.pth").is_file()
    # and eval.py the same way (Detectron2's --eval-only --num-gpus): the process group, the shard, the gather
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                          str(ROOT / "tools" / "eval.py"), "--config", str(ROOT / "configs" / "base.yaml"),
                          "--weights", str(root / "torchrun" / "model_final.pth"), *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (root / "torchrun" / "inference" / "shapes_val" / "metrics.json").is_file()


@pytest.mark.parametrize("extra", [{}, {"test.box_refinement.enabled": True, "test.multi_scale.enabled": True},
                                   {"test.aug.enabled": True, "test.aug.min_sizes": [48, 64]}],
                         ids=["default", "refinement+multi-scale", "tta"])
def test_fast_path_gives_the_plain_paths_detections_on_the_gpu(root, trained, extra):
    args, out, _ = trained
    images = val_images(root)
    fast = detections(load_config(None, [*args, *_kv(extra)]), out / "model_final.pth", DEVICE, images)
    plain = detections(load_config(None, [*args, *_kv(extra), "model.fast_path=false"]), out / "model_final.pth",
                       DEVICE, images)
    assert sum(len(d["boxes"]) for d in plain) > 0
    assert_equal(plain, fast, box_tolerance=1e-3, score_tolerance=1e-4)


@pytest.mark.parametrize("levers", [{"accel.cuda_channels_last": True},
                                    {"accel.cuda_channels_last": True, "test.amp": True},
                                    {"accel.sync_free_postprocess": True, "test.multi_scale.enabled": True},
                                    {"accel.cuda_graphs": True, "test.amp": True},
                                    {"accel.cuda_hoist": True, "accel.cuda_graphs": True, "test.amp": True},
                                    {"accel.cuda_fused_relu": True},
                                    {"accel.cuda_fused_relu": True, "accel.cuda_channels_last": True, "test.amp": True}],
                         ids=["channels_last", "channels_last+amp", "sync_free+multi-scale", "cuda_graphs+amp",
                              "hoist+graphs+amp", "fused_relu", "fused_relu+channels_last+amp"])
def test_gpu_levers_give_the_fast_paths_detections_on_the_gpu(root, trained, levers):
    """The accel levers (off by default, detection/accel/levers.py) on CUDA: the default fast
    path's detections, in the same precision (test.amp: float16 both). cuda_graphs: res5
    captured for the padded RoI count, then replayed with the real RoIs (with cuda_hoist the
    Res5Runner's head: gather pooling on CUDA; ResNet-18's basic blocks are not hoisted, the
    Detectron2 test below hoists R50's). All of them with torch.compile: the last tests."""
    assert_levers_keep_the_detections(root, trained, levers)


def assert_levers_keep_the_detections(root: Path, trained, levers: dict) -> None:
    args, out, _ = trained
    images = val_images(root)
    same = {k: v for k, v in levers.items() if not k.startswith("accel.")}
    ref = detections(load_config(None, [*args, *_kv(same)]), out / "model_final.pth", DEVICE, images)
    got = detections(load_config(None, [*args, *_kv(levers)]), out / "model_final.pth", DEVICE, images)
    assert sum(len(d["boxes"]) for d in ref) > 0
    tolerance = (0.05, 2e-3) if levers.get("test.amp") else (1e-3, 1e-4)  # float16: other kernels may round otherwise
    assert_equal(ref, got, *tolerance)


def test_the_context_model_fast_and_plain_on_the_gpu(root, context):
    args, out = context
    images = val_images(root)
    fast = detections(load_config(None, args), out / "model_final.pth", DEVICE, images)
    plain = detections(load_config(None, [*args, "model.fast_path=false"]), out / "model_final.pth", DEVICE, images)
    assert_equal(plain, fast, box_tolerance=1e-3, score_tolerance=1e-4)


def test_cpu_and_gpu_give_the_same_detections(root, trained):
    """One checkpoint trained on the GPU, evaluated on both devices (float32, no TF32)."""
    args, out, _ = trained
    images = val_images(root)
    cfg = load_config(None, args)
    on_gpu = detections(cfg, out / "model_final.pth", DEVICE, images)
    on_cpu = detections(cfg, out / "model_final.pth", "cpu", images)
    assert sum(len(d["boxes"]) for d in on_cpu) > 0
    assert_equal(on_cpu, on_gpu, box_tolerance=1e-2, score_tolerance=1e-3)


def test_evaluation_with_test_amp_on_the_gpu(root, trained):
    """test.amp (float16 autocast on CUDA) through the evaluation loop: AP close to float32's."""
    args, out, _ = trained
    scores = {}
    for amp in (False, True):
        cfg = load_config(None, [*args, f"test.amp={str(amp).lower()}"])
        model, _ = build_inference_model(cfg, out / "model_final.pth", torch.device(DEVICE))
        if DEVICE == "cuda":
            assert bool(model.amp) == amp  # float16 autocast
        datasets = get_datasets(cfg.datasets.test, cfg.datasets.root)
        scores[amp] = evaluate_test_sets(datasets, model=model)[datasets[0].name]["AP"]
    assert abs(scores[True] - scores[False]) <= 5.0, scores  # a tiny, barely trained model: loose


def test_eval_and_visualize_tools_on_the_gpu(root, trained, tmp_path, restore_logging):
    """The tools on CUDA; eval.py again with the inference levers (not compile) and loader workers,
    whose pin-memory thread allocates pinned buffers while res5's CUDA graph is captured at the
    first batch (the capture's thread_local mode): the same AP."""
    args, out, _ = trained
    weights = str(out / "model_final.pth")
    base = ["--config", str(ROOT / "configs" / "base.yaml"), "--weights", weights]
    assert load_tool("eval").main([*base, "--output-dir", str(tmp_path / "eval"), *args]) == 0
    levers = ["accel.cuda_channels_last=true", "accel.sync_free_postprocess=true", "accel.cuda_graphs=true",
              "dataloader.num_workers=2"]
    assert load_tool("eval").main([*base, "--output-dir", str(tmp_path / "levers"), *args, *levers]) == 0
    (plain,), (fast,) = (list((tmp_path / name).rglob("metrics.json")) for name in ("eval", "levers"))
    assert json.loads(fast.read_text())["AP"] == pytest.approx(json.loads(plain.read_text())["AP"], abs=0.1)
    assert load_tool("visualize").main([*base, "--input", str(root / "data" / "shapes" / "val"),
                                        "--output", str(tmp_path / "vis"), *args]) == 0
    assert len(list((tmp_path / "vis").glob("*.jpg"))) == 3


def test_export_of_a_gpu_trained_checkpoint(trained, tmp_path):
    """tools/export.py on a checkpoint trained on CUDA: exported on the CPU, then ONNX Runtime's
    detections checked against PyTorch's (the tool exits 1 when they differ)."""
    pytest.importorskip("onnxruntime")
    args, out, _ = trained
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "export.py"), "--config",
                             str(ROOT / "configs" / "base.yaml"), "--weights", str(out / "model_final.pth"),
                             "--output", str(tmp_path / "m.onnx"), *args], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "m.onnx").stat().st_size > 1000


def test_study_and_ablate_tools_on_the_gpu(root, trained, context, tmp_path, restore_logging):
    args, out, _ = trained
    study_args = [o for o in overrides(root, tmp_path / "unused", **{"solver.max_iter": 2})
                  if not o.startswith(("output_dir=", "model.backbone.norm="))] + ['model.backbone.norm="bn"']
    assert load_tool("study").main(["--config", "configs/base.yaml", "--study", "degradation", "--depths", "18",
                                    "--output-dir", str(tmp_path / "study"), *study_args]) == 0
    assert (tmp_path / "study" / "study.json").is_file()
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "ablate.py"), "--config",
                             str(out / "config.yaml"), "--weights", str(out / "model_final.pth"),
                             "--context-weights", str(context[1] / "model_final.pth"),
                             "--output-dir", str(tmp_path / "ablation"), f"device={DEVICE}"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "ablation" / "ablation.json").read_text())["rows"]


@pytest.mark.parametrize("tf32", [False, True], ids=["float32", "tf32"])
def test_predictor_reproduces_detectron2_on_the_gpu(tf32):
    """The Detectron2 fixture (tests/fixtures/detectron2_c4): with tf32 off every detection of
    real Detectron2 (float32, CPU) is reproduced as on the CPU; with TF32 (PyTorch's and
    Detectron2's default for convolutions) at least 95% of them per image were (H100). Matched:
    the same label, IoU >= 0.99 and the score within 0.002."""
    from tests.helpers import DETECTRON2_CASE as CASE, DETECTRON2_FIXTURE as FIXTURE, DETECTRON2_R50 as R50, \
        matched_to_detectron2

    from detection.predictor import Predictor

    weights = Path(os.environ.get("C4DET_D2_FIXTURE", "/tmp/c4det_d2_fixture.pkl"))
    if not weights.is_file():
        subprocess.run([sys.executable, str(FIXTURE / "make_checkpoint.py"), str(FIXTURE / "keys_R_50_C4_coco.json"),
                        "11", str(weights)], check=True)
    reference = json.loads((CASE / "d2_outputs.json").read_text())
    cfg = load_config(R50, [f"tf32={str(tf32).lower()}"])
    predictor = Predictor(cfg, weights=str(weights), device=DEVICE)
    for name in ("exact_0", "resize_0"):
        fraction = matched_to_detectron2(predictor(str(CASE / "images" / f"{name}.png")), reference[name])
        assert fraction >= (0.95 if tf32 else 0.99), (name, fraction)


def test_gpu_levers_reproduce_detectron2_on_the_gpu():
    """The Detectron2 fixture (R50, MSRA layout: stride 2 in res5's first 1x1 convs, so hoisting
    pools the shortcut at every other bin) with the inference levers but compile (minutes for R50),
    float32 without TF32: Detectron2's detections, as the default path gives them (>= 99% per
    image). (test.amp's agreement with float32 at R50 is measured by the levers benchmark.)"""
    from tests.helpers import DETECTRON2_CASE as CASE, DETECTRON2_FIXTURE as FIXTURE, DETECTRON2_R50 as R50, \
        matched_to_detectron2

    from detection.predictor import Predictor

    weights = Path(os.environ.get("C4DET_D2_FIXTURE", "/tmp/c4det_d2_fixture.pkl"))
    if not weights.is_file():
        subprocess.run([sys.executable, str(FIXTURE / "make_checkpoint.py"), str(FIXTURE / "keys_R_50_C4_coco.json"),
                        "11", str(weights)], check=True)
    reference = json.loads((CASE / "d2_outputs.json").read_text())
    levers = ["accel.cuda_channels_last=true", "accel.sync_free_postprocess=true", "accel.cuda_graphs=true",
              "accel.cuda_hoist=true", "accel.cuda_fused_relu=true"]
    cfg = load_config(R50, ["tf32=false", *levers])
    predictor = Predictor(cfg, weights=str(weights), device=DEVICE)
    runner = predictor.model.roi_heads.res5_runner
    assert runner.hoist and (runner.head_fn is not None) == (DEVICE == "cuda")
    assert type(predictor.model.roi_heads.res5[0]).__name__ == "FusedBottleneck"
    for name in ("exact_0", "resize_0"):
        fraction = matched_to_detectron2(predictor(str(CASE / "images" / f"{name}.png")), reference[name])
        assert fraction >= 0.99, (name, fraction)


# torch.compile's tests last: their compile time is the suite's least predictable, and a session
# that stops the suite at its time limit (tools/gpu_session.py) then loses them, not the rest
def test_training_levers_on_the_gpu(root, trained):
    """accel.sync_free_postprocess and accel.compile (the trunk compiled in place and the
    Res5Runner's head, off the CPU) in training with solver.amp: finite losses, the same state_dict keys as without, and the
    checkpoint detects like the plain path (as sets: float16 training of a barely trained model)."""
    args = overrides(root, root / "levers", **{"solver.amp": True, "model.backbone.norm": "bn",
                                               "accel.sync_free_postprocess": True, "accel.compile": "default"})
    model = train(load_config(None, args))
    lines = [json.loads(x) for x in (root / "levers" / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1, 2, 3, 4]
    assert all(x["total_loss"] == x["total_loss"] for x in lines)
    assert set(load_checkpoint(root / "levers" / "model_final.pth")["model"]) == set(trained[2].state_dict())
    del model
    images, weights = val_images(root), root / "levers" / "model_final.pth"
    fast = load_config(None, [*args, "accel.compile=false"])  # compiled inference: the next test
    plain = load_config(None, [*args, "model.fast_path=false", "accel.compile=false",
                               "accel.sync_free_postprocess=false"])
    ref = detections(plain, weights, DEVICE, images)
    assert sum(len(d["boxes"]) for d in ref) > 0
    assert_equal(ref, detections(fast, weights, DEVICE, images), box_tolerance=1e-3, score_tolerance=1e-4)


def test_every_inference_lever_with_compile_gives_the_fast_paths_detections_on_the_gpu(root, trained):
    assert_levers_keep_the_detections(root, trained, {
        "accel.cuda_channels_last": True, "accel.sync_free_postprocess": True, "accel.compile": "default",
        "accel.cuda_graphs": True, "accel.cuda_hoist": True, "accel.cuda_fused_relu": True})


def _kv(extra: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in extra.items()]
