"""Helpers shared by several test files: tiny configs and models, a fixed batch, loading a tool.

Import them as `from tests.helpers import ...`: tests/ is a package, so pytest puts the
repository root on the import path for it and no test edits the path itself.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from collections import OrderedDict
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from backbones import build_resnet
from backbones.resnet import Stem, make_stage
from detection.modeling.anchors import AnchorGenerator
from detection.modeling.model import FasterRCNN, build_trunk
from detection.modeling.roi_heads import Res5ROIHeads
from detection.modeling.rpn import RPN
from detection.testing import make_sane

ROOT = Path(__file__).resolve().parents[1]
# The threads a heavy test (ResNet-50 at 800 px) takes: both cores, or one where tests/parallel.py
# runs two pytest processes at once (`make test`), each with a core of its own
TEST_CORES = int(os.environ.get("C4DET_TEST_CORES", "2"))
# The Detectron2 fixture (tests/fixtures/detectron2_c4): the config, and the case whose detections
# real Detectron2 computed (tests/test_detectron2.py; tests/test_cuda.py on the GPU)
DETECTRON2_FIXTURE = ROOT / "tests" / "fixtures" / "detectron2_c4"
DETECTRON2_CASE = DETECTRON2_FIXTURE / "R_50_C4_coco_seed11"
DETECTRON2_R50 = ROOT / "configs" / "detectron2" / "faster_rcnn_R_50_C4_1x.yaml"
# tools/benchmark.py's models made tiny (tests/test_benchmark.py, tests/test_benchmark_levers.py)
TINY_BENCHMARK = ["model.backbone.depth=18", "model.rpn.pre_nms_topk_test=100", "model.rpn.post_nms_topk_test=20",
                  "model.rpn.pre_nms_topk_train=100", "model.rpn.post_nms_topk_train=30",
                  "model.roi_heads.batch_size_per_image=16", "model.roi_heads.pooler_resolution=7",
                  "model.anchors.sizes=[32,64]", "solver.ims_per_batch=2", "dataloader.num_workers=0"]


def load_tool(name: str) -> ModuleType:
    """tools/<name>.py as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def matched_to_detectron2(ours: dict, theirs: dict) -> float:
    """The share of Detectron2's detections (its d2_outputs.json entry) that ours reproduce
    (detection.testing.matched_fraction: the same label, Detectron2's class + 1, IoU >= 0.99, the
    score within 0.002)."""
    from detection.testing import matched_fraction

    ref = {"boxes": torch.tensor(theirs["boxes"]), "scores": torch.tensor(theirs["scores"]),
           "labels": torch.tensor(theirs["classes"]) + 1}
    return matched_fraction(ref, ours)


def run_main(tool: ModuleType, argv: list[str], capsys) -> tuple[int, str, str]:
    """A tool's main(argv) in this process, as its command line runs it: -> (exit code, stdout,
    stderr). Same parsing and error mapping as the subprocess, without starting a Python and
    importing torch again (about 3 s a call). Use with the `restore_logging` fixture."""
    capsys.readouterr()  # only this call's output
    try:
        code = tool.main([str(arg) for arg in argv])
    except SystemExit as stop:  # argparse's usage errors, and detection.cli.fail
        code = 0 if stop.code is None else stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- configs ----------------------------------------------------------------------------


def tiny_overrides(data_root, out_dir, **extra) -> list[str]:
    """ResNet-18 with trainable GroupNorm (random init: frozen BN would not keep activations
    sane, see docs/ARCHITECTURE.md), 64 px images, few RoIs; as KEY=VALUE overrides."""
    items = {
        "model.num_classes": 3, "model.backbone.depth": 18, "model.backbone.norm": "gn",
        "model.backbone.freeze_at": 0, "model.backbone.weights": None,
        "model.anchors.sizes": [16, 32, 64], "model.rpn.pre_nms_topk_train": 200,
        "model.rpn.post_nms_topk_train": 50, "model.rpn.pre_nms_topk_test": 100,
        "model.rpn.post_nms_topk_test": 20, "model.rpn.batch_size_per_image": 64,
        "model.roi_heads.batch_size_per_image": 16, "model.roi_heads.pooler_resolution": 6,
        "input.min_size_train": [64], "input.max_size_train": 96, "input.min_size_test": 64,
        "input.max_size_test": 96, "datasets.root": str(data_root), "datasets.train": ["shapes_train"],
        "datasets.test": ["shapes_val"], "dataloader.num_workers": 0, "solver.ims_per_batch": 2,
        "solver.base_lr": 0.01, "solver.warmup_iters": 2, "solver.steps": [], "solver.max_iter": 6,
        "solver.checkpoint_period": 3, "log_period": 1, "output_dir": str(out_dir), "device": "cpu",
        "log.tensorboard": False,  # no event files unless a test asks (tests/test_tensorboard.py)
    }
    items.update(extra)
    return [f"{k}={json.dumps(v)}" for k, v in items.items()]


def tiny_cfg(data_root, out_dir, **extra):
    """tiny_overrides as a loaded Config."""
    from detection.config import load_config

    return load_config(None, tiny_overrides(data_root, out_dir, **extra))


def train_tiny_run(root: Path, *, num_train: int, max_iter: int) -> list[str]:
    """A tiny model trained max_iter iterations on num_train shapes images (3 to test on) in
    root/data, its run folder root/out, every detection kept (score threshold 0): enough for
    the tools to find detections on every image. -> its KEY=VALUE overrides."""
    from detection.config import load_config
    from detection.data.shapes import generate_shapes
    from detection.engine.trainer import train

    generate_shapes(root / "data" / "shapes", num_train=num_train, num_val=3, seed=1, image_size=(64, 80))
    overrides = tiny_overrides(root / "data", root / "out", **{"solver.max_iter": max_iter,
                               "model.roi_heads.score_thresh_test": 0.0})
    train(load_config(None, overrides))
    return overrides


# ---- a tiny C4 detector with bottleneck stages (tests of the fast path) -------------------

C4_IMAGE = (96, 128)  # tiny_c4's test size


def bottleneck_stage(blocks: int, c_in: int, width: int, stride_in_1x1: bool = False) -> nn.Sequential:
    """`blocks` bottleneck blocks of `width` (4x out), stride 2, frozen BN."""
    return make_stage("bottleneck", blocks, c_in, width, stride=2, norm="frozen_bn",
                      stride_in_1x1=stride_in_1x1, shortcut="B", residual=True)


def randomize_frozen_bn(module: nn.Module) -> None:
    """Non-trivial frozen-BN statistics, so folding has something to fold."""
    for m in module.modules():
        if type(m) is FrozenBatchNorm2d:
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)


def tiny_c4(stride_in_1x1: bool = False, num_classes: int = 3) -> FasterRCNN:
    """A C4 detector with small bottleneck stages (stride 16 trunk, 64 -> 128 channels res5)."""
    torch.manual_seed(0)
    trunk = nn.Sequential(OrderedDict(stem=Stem("frozen_bn"), res3=bottleneck_stage(1, 64, 8, stride_in_1x1),
                                      res4=bottleneck_stage(1, 32, 16, stride_in_1x1)))
    trunk.stem.requires_grad_(False)
    rpn = RPN(in_channels=64, anchor_generator=AnchorGenerator((16, 32, 64), (0.5, 1.0, 2.0)),
              pre_nms_topk_train=400, post_nms_topk_train=60, pre_nms_topk_test=300, post_nms_topk_test=40,
              batch_size_per_image=64)
    heads = Res5ROIHeads(res5=bottleneck_stage(2, 64, 32, stride_in_1x1), res5_out_channels=128,
                         num_classes=num_classes, batch_size_per_image=32, score_thresh_test=0.0, detections_per_image=30)
    model = FasterRCNN(trunk=trunk, rpn=rpn, roi_heads=heads, pixel_mean=[120.0] * 3, pixel_std=[60.0] * 3,
                       min_size_test=C4_IMAGE[0], max_size_test=C4_IMAGE[1])
    with torch.no_grad():
        randomize_frozen_bn(model)
        make_sane(model)
        # Spread scores and objectness far apart, so float noise cannot reorder NMS.
        nn.init.normal_(rpn.head.objectness_logits.weight, std=1.0)
        nn.init.normal_(heads.predictor.cls_score.weight, std=0.5)
        nn.init.normal_(heads.predictor.bbox_pred.weight, std=0.05)
    return model.eval()


# ---- a tiny detector and a fixed batch of two painted images -----------------------------

K = 2  # classes of the painted batch: 1 = red, 2 = blue


def make_model(*, pooler_resolution: int = 6, roi_batch: int = 16, positive_fraction: float = 0.25,
               min_size_test: int = 96, max_size_test: int = 256, **head_kwargs) -> FasterRCNN:
    """ResNet-18 detector built without a config. Random init: GroupNorm keeps activations
    sane (docs/ARCHITECTURE.md); small sizes keep it fast."""
    resnet = build_resnet(18, norm="gn", freeze_at=0)
    rpn = RPN(in_channels=resnet.out_channels["res4"],
              anchor_generator=AnchorGenerator([16, 32, 64], [0.5, 1.0, 2.0]),
              batch_size_per_image=64, pre_nms_topk_train=300, post_nms_topk_train=50,
              pre_nms_topk_test=300, post_nms_topk_test=50)
    heads = Res5ROIHeads(res5=resnet.res5, res5_out_channels=resnet.out_channels["res5"],
                         num_classes=K, pooler_resolution=pooler_resolution,
                         batch_size_per_image=roi_batch, positive_fraction=positive_fraction,
                         detections_per_image=20, **head_kwargs)
    return FasterRCNN(trunk=build_trunk(resnet), rpn=rpn, roi_heads=heads,
                      pixel_mean=[128.0] * 3, pixel_std=[64.0] * 3,
                      min_size_test=min_size_test, max_size_test=max_size_test)


class CrossDeviceCopies(TorchDispatchMode):
    """Records (source device, dtype) of each copy to another device (a model on `meta` stands
    in for one on a GPU). Under torch.inference_mode the dispatcher shows `.to` whole
    (aten.to), not the _to_copy it calls."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.to, torch.ops.aten.copy_) \
                and args[0].device != out.device:
            self.copies.append((args[0].device.type, args[0].dtype))
        return out


def paint(height: int, width: int, rects: list, background: int) -> torch.Tensor:
    """A uint8 (3, H, W) image of one grey level with solid coloured rectangles."""
    image = torch.full((3, height, width), background, dtype=torch.uint8)
    for (x1, y1, x2, y2), colour in rects:
        image[:, y1:y2, x1:x2] = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)
    return image


RED, BLUE = (230, 40, 40), (40, 40, 230)  # label 1 = red, 2 = blue
BOXES = [[(10, 12, 50, 60), (70, 40, 118, 84)], [(20, 50, 76, 100), (8, 8, 40, 36)]]
IMAGES = [paint(96, 128, [(BOXES[0][0], RED), (BOXES[0][1], BLUE)], 100),
          paint(112, 96, [(BOXES[1][0], BLUE), (BOXES[1][1], RED)], 150)]
TARGETS = [{"boxes": torch.tensor(BOXES[0], dtype=torch.float32), "labels": torch.tensor([1, 2])},
           {"boxes": torch.tensor(BOXES[1], dtype=torch.float32), "labels": torch.tensor([2, 1])}]


# ---- phone photos (EXIF orientation) --------------------------------------------------------

ORIENTATION = 0x0112  # the EXIF tag
# tag -> the PIL transpose that turns a viewed image into what a camera stores with that tag
# (the inverse of exif_transpose's method: 6 is turned back with ROTATE_270, so stored with ROTATE_90)
STORE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
         5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
         8: Image.Transpose.ROTATE_270}


def write_photo(path, viewed: np.ndarray, tag: int) -> None:
    """What a phone writes for the RGB image `viewed`: a JPEG of the pixels turned back from
    the view, and the orientation tag (1: none)."""
    image = Image.fromarray(viewed)
    if tag == 1:
        image.save(path, quality=95)
        return
    exif = Image.Exif()
    exif[ORIENTATION] = tag
    image.transpose(STORE[tag]).save(path, quality=95, exif=exif.tobytes())


# ---- torchvision reference models -----------------------------------------------------------


def random_torchvision_resnet(depth: int) -> torch.nn.Module:
    """torchvision's resnet{depth} with random BN statistics and affine parameters,
    so that any mix-up of norms (bn1 vs bn2, statistics vs affine) shows."""
    model = getattr(torchvision.models, f"resnet{depth}")().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.2, 0.6)
                module.bias.normal_(0, 0.1)
    return model


def run_forked_processes(worker, args: tuple, nprocs: int = 2, timeout: float = 60.0) -> None:
    """Run worker(rank, *args) in `nprocs` forked processes (fork: no fresh interpreter, which
    would re-import torch for seconds); kill them and fail the test past `timeout` seconds."""
    import pytest
    import torch.multiprocessing as mp

    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish within {timeout:.0f} s")


def evaluate_results_file(dataset, path: str) -> dict:
    """Saved results scored through the test-set loop that tools/eval.py --results uses."""
    from detection.evaluation import evaluate_test_sets

    return evaluate_test_sets([dataset], results=path)[dataset.name]


# Each file's seconds in one process (pytest --durations=0, summed per file; 2-vCPU AVX2-only AMD
# EPYC, 2026-12-07): only to balance --shard's parts (a stale figure costs balance, not coverage);
# a file not listed counts 0.3 s a test.
FILE_SECONDS = {
    "test_benchmark_levers.py": 60, "test_detectron2.py": 58, "test_reliability.py": 55, "test_train.py": 54,
    "test_export.py": 49, "test_demo.py": 45, "test_model.py": 40, "test_benchmark.py": 39,
    "test_readme_walkthrough.py": 35, "test_devices.py": 33, "test_ablate.py": 21, "test_fast_configs.py": 19,
    "test_gpu_levers.py": 18, "test_study.py": 17, "test_predictor.py": 17, "test_tools.py": 14,
    "test_run_records.py": 14, "test_fuzz.py": 14, "test_train_safety.py": 13, "test_eval_outputs.py": 13,
    "test_winograd.py": 12, "test_weights.py": 12, "test_checkpoint_retention.py": 11, "test_report.py": 10,
    "test_precision.py": 10, "test_exif_orientation_e2e.py": 9, "test_appendix_b.py": 8, "test_tensorboard.py": 7,
    "test_own_data_checks.py": 7, "test_backbones.py": 7, "test_training_levers.py": 6, "test_eval_test_sets.py": 6,
    "test_backbone_torchvision.py": 6, "test_tta.py": 5, "test_moved_modules.py": 5, "test_loading.py": 5,
    "test_layers.py": 4, "test_fast.py": 4, "test_data_loader.py": 4, "test_paper_configs.py": 3,
}


def shard_files(files: list[str], counts: dict[str, int], parts: int) -> list[list[str]]:
    """`files` in `parts` lists of near-equal seconds (the longest first, each to the lightest part)."""
    cost = {f: FILE_SECONDS.get(Path(f).name, 0.3 * counts[f]) for f in files}
    shards: list[list[str]] = [[] for _ in range(parts)]
    load = [0.0] * parts
    for f in sorted(files, key=lambda f: (-cost[f], f)):
        lightest = load.index(min(load))
        shards[lightest].append(f)
        load[lightest] += cost[f]
    return shards
