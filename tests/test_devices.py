"""Device safety without a GPU: every tensor the project makes names its device (or follows an
input's), so a CUDA model never meets a CPU tensor; and the fast path chooses its steps by the
model's device. CI has no GPU; tests/test_cuda.py (`make test-gpu`) runs the same code on one."""
import copy
from pathlib import Path

import pytest
import torch

from detection.accel import inference_plan, optimize_for_inference, optimize_for_training
from detection.accel.onednn import FusedBottleneck, FusedStem
from detection.engine.inference_model import accel_levers, prepare_for_inference
from detection.engine.trainer import GracefulStop
from detection.export.onnx import ExportableDetector
from detection.modeling.model import build_model
from detection.testing import UnnamedDeviceCheck
from detection.utils.comm import set_tf32, tf32_set
from tests.helpers import IMAGES, TARGETS, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "trainable BN": {"model.backbone.norm": "bn"},  # folded at inference: the H100 crash
    "global context": {"model.roi_heads.global_context": True},
    "refinement + multi-scale": {"test.box_refinement.enabled": True, "test.multi_scale.enabled": True,
                                 "test.multi_scale.sizes": [48, 64, 96], "test.multi_scale.max_size": 160},
    "test-time augmentation": {"test.aug.enabled": True, "test.aug.min_sizes": [48, 64]},
    "RoIPool": {"model.roi_heads.pooler": "roi_pool"},
    "amp": {"test.amp": True, "solver.amp": True},
    # the GPU levers that run on the CPU, at inference and in training (accel.cuda_channels_last is
    # CUDA's; compile: minutes here, and CUDA-only in training)
    "sync-free postprocess": {"accel.sync_free_postprocess": True, "accel.cuda_channels_last": True,
                              "test.box_refinement.enabled": True, "test.box_refinement.voting": False},
}


def test_the_check_finds_a_factory_call_without_device_in_project_code():
    """A function compiled as if it were in detection/ is the project's: its torch.zeros(2) is
    found, its torch.zeros(2, device=...) and a test's own torch.ones(2) are not."""
    source = ("import torch\n"
              "def unnamed(x):\n    return x + torch.zeros(2)\n"
              "def named(x):\n    return x + torch.zeros(2, device=x.device)\n")
    namespace: dict = {}
    exec(compile(source, str(ROOT / "detection" / "made_up.py"), "exec"), namespace)
    with UnnamedDeviceCheck() as check:
        namespace["named"](torch.ones(2))
        torch.ones(2)
    assert check.found == []
    with UnnamedDeviceCheck() as check:
        namespace["unnamed"](torch.ones(2))
    assert check.found == ["detection/made_up.py:3 unnamed"]


def test_the_check_finds_a_library_module_built_by_the_project_without_device():
    """FrozenBatchNorm2d(n) makes its buffers on the default device: built from project code it
    counts as the project's (that was the H100 crash: BN folding of a CUDA model)."""
    source = ("from torchvision.ops import FrozenBatchNorm2d\n"
              "def build():\n    return FrozenBatchNorm2d(4)\n")
    namespace: dict = {}
    exec(compile(source, str(ROOT / "backbones" / "made_up.py"), "exec"), namespace)
    with UnnamedDeviceCheck() as check:
        namespace["build"]()
    assert check.found and all(place.startswith("backbones/made_up.py:3 build") for place in check.found)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_inference_training_and_export_name_every_device(tmp_path, variant, fast_path):
    """Everything after the model is built on the CPU and moved: preparing it for inference (BN
    folding, Winograd kernels, the runner), detecting, preparing it for training, a training
    step with its backward, the traced export path and the trainer's stop flag."""
    cfg = tiny_cfg(tmp_path, tmp_path / "out", **VARIANTS[variant], **{"model.fast_path": fast_path})
    model = build_model(cfg)
    device = torch.device("cpu")
    with UnnamedDeviceCheck() as check:
        prepared = prepare_for_inference(cfg, copy.deepcopy(model).to(device), device)
        with torch.inference_mode():
            prepared([IMAGES[0], IMAGES[1]])
        trainable = copy.deepcopy(model).to(device).train()
        if fast_path:
            optimize_for_training(trainable, channels_last=True, levers=accel_levers(cfg))  # as the trainer
        with torch.autocast("cpu", torch.bfloat16, enabled=cfg.solver.amp):
            losses = trainable([image.float() for image in IMAGES], TARGETS)
        sum(losses.values()).backward()
        GracefulStop(device).agreed()
        if not (cfg.test.box_refinement.enabled or cfg.test.multi_scale.enabled):
            exportable = ExportableDetector(copy.deepcopy(model).eval())
            with torch.no_grad():
                exportable(IMAGES[0][None], torch.tensor(IMAGES[0].shape[1:], device=device))
    assert check.found == [], f"tensors made without naming their device: {check.found}"


def test_evaluation_names_every_device(tmp_path):
    """The evaluation loop around the model: a test set listing the model's classes in another
    order is relabelled (label_map) on the way to the evaluator."""
    from detection.evaluation.inference import inference_on_dataset

    class Collect:
        def reset(self):
            self.labels = []

        def process(self, records, outputs):
            self.labels += [o["labels"].tolist() for o in outputs]

        def evaluate(self):
            return {"images": len(self.labels)}

    cfg = tiny_cfg(tmp_path, tmp_path / "out", **{"model.roi_heads.score_thresh_test": 0.0})
    model, evaluator = build_model(cfg), Collect()
    with UnnamedDeviceCheck() as check:
        metrics = inference_on_dataset(model, [(IMAGES, [{}, {}])], evaluator, label_map=[0, 3, 1, 2])
    assert check.found == [], f"tensors made without naming their device: {check.found}"
    assert metrics == {"images": 2} and any(evaluator.labels)


def test_fast_path_plan_per_device():
    """CPU: every step; CUDA: BN folding only (the CPU kernels and the gather pooling were
    measured slower there than the plain path)."""
    cpu = inference_plan("cpu", bf16=False, small_maps=False)
    assert all(v for k, v in vars(cpu).items() if k != "small_map_taps")
    assert inference_plan("cpu", bf16=True, small_maps=True).small_map_taps
    cuda = inference_plan("cuda", bf16=True, small_maps=True)
    assert cuda.fold_bn and not any(v for k, v in vars(cuda).items() if k != "fold_bn")
    assert not inference_plan("cpu", bf16=True).winograd  # Winograd is float32 only
    assert inference_plan("cpu", small_maps=True).res5_channels_last is False  # NCHW on small maps


def test_fast_path_on_another_device_installs_only_device_neutral_steps(tmp_path):
    """A model on another device than the CPU ("meta" stands in for CUDA here): the copy gets
    folded norms and nothing of the CPU's: no gather runner, fused oneDNN classes, Winograd
    kernels or channels_last weights. On the CPU the same model gets them all."""
    cfg = tiny_cfg(tmp_path, tmp_path / "out", **{"model.backbone.norm": "bn", "model.backbone.depth": 50,
                                                  "model.roi_heads.pooler_resolution": 14})
    model = build_model(cfg).eval()
    on_cpu = optimize_for_inference(model)
    assert on_cpu.roi_heads.res5_runner is not None
    assert any(isinstance(m, FusedBottleneck) for m in on_cpu.modules())
    assert any(hasattr(m, "winograd_weight") for m in on_cpu.modules())
    other = optimize_for_inference(model.to("meta"))
    assert other.device.type == "meta" and other.roi_heads.res5_runner is None
    assert not any(isinstance(m, (FusedBottleneck, FusedStem)) or hasattr(m, "winograd_weight")
                   for m in other.modules())
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) for m in other.modules())
    assert all(t.device.type == "meta" for t in [*other.parameters(), *other.buffers()])
    conv = other.trunk.stem.conv1
    assert conv.bias is not None and conv.weight.is_contiguous()  # folded, NCHW


def test_a_wrong_chunk_size_is_refused_on_every_device(tmp_path):
    model = build_model(tiny_cfg(tmp_path, tmp_path / "out")).eval().to("meta")
    with pytest.raises(ValueError, match="chunk_size"):
        optimize_for_inference(model, chunk_size=0)


def test_tf32_set_puts_the_flags_back():
    """The benchmark's equality checks run without TF32 inside tf32_set(False) and the timed runs
    with the config's setting after it; matmul=False leaves the matmul flag alone (torch.compile
    guards on it: changing it would compile the models again)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    try:
        set_tf32(True)
        with tf32_set(False):
            assert (cudnn.allow_tf32, matmul.allow_tf32) == (False, False)
        with tf32_set(False, matmul=False):
            assert (cudnn.allow_tf32, matmul.allow_tf32) == (False, True)
        with pytest.raises(RuntimeError), tf32_set(False):
            raise RuntimeError("a failing check")
        assert (cudnn.allow_tf32, matmul.allow_tf32) == (True, True)
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before


def test_the_training_sampler_names_its_device():
    """The sampler's tensors stay on the host whatever the default device: repeat factor
    sampling's draws made theirs on it (a re-read: under a meta default, Tensor.item() failed)."""
    from detection.data.loader import TrainingSampler

    with UnnamedDeviceCheck() as check:
        for factors in (None, [1.0, 1.5, 2.0, 1.0, 1.0]):
            sampler = iter(TrainingSampler(5, seed=0, world_size=2, factors=factors))
            [next(sampler) for _ in range(12)]
    assert check.found == [], f"tensors made without naming their device: {check.found}"
