"""The fast path's entry points and the per-device choice of its steps (docs/accel.md):

    fast = optimize_for_inference(model)   # a copy; `model` is left as it is
    optimize_for_training(model, channels_last=True)  # in place, as the trainer calls it; names and
                                                       # checkpoints unchanged

inference_plan chooses the inference steps for a device. Device-neutral rewrites (BN folded
into the convs: it only removes work) run everywhere; the CPU kernels (channels_last layout
choices, the taps matmul, oneDNN post-ops, Winograd, the gather pooling in Res5Runner) only
on the CPU, where they were measured faster; on CUDA torchvision's RoIAlign pools and res5
runs all RoIs at once, as the plain path does. The GPU levers (levers.py, config `accel`) are
off by default; three of them change the CUDA plan: cuda_channels_last (NHWC), cuda_hoist
(Res5Runner's hoisted 1x1 convs and gather pooling, all RoIs in one call) and cuda_fused_relu
(the Fused* blocks, with cuDNN's conv-bias-ReLU in place of oneDNN's post-ops). training_plan
chooses the training steps: the same on every device with the levers off, the taps matmul and
Winograd (CPU kernels) on the CPU only.
"""
from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from backbones.resnet import freeze_batchnorm
from detection.accel.fold import fold_frozen_bn, fold_frozen_bn_for_training, small_map_convs, winograd_training_convs
from detection.accel.levers import Levers, apply_levers, compile_runner_head
from detection.accel.onednn import FusedRPNHead, fuse_blocks
from detection.accel.res5 import AUTO, Res5Runner, chunk_rois
from detection.accel.winograd import winograd_convs
from detection.modeling.rpn import RPNHead

logger = logging.getLogger(__name__)


class ToChannelsLast(nn.Module):
    """First module of the trunk on the fast path: NCHW input -> NHWC memory layout."""

    def forward(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last)


def to_channels_last(model: nn.Module) -> nn.Module:
    """Conv weights and the trunk's input in channels_last (no new parameters or keys)."""
    model.to(memory_format=torch.channels_last)
    model.trunk = with_channels_last_input(model.trunk)
    return model


def with_channels_last_input(seq: nn.Sequential) -> nn.Sequential:
    """`seq` with a ToChannelsLast in front (once); its other children keep their names."""
    if isinstance(seq[0], ToChannelsLast):
        return seq
    return nn.Sequential(OrderedDict([("to_channels_last", ToChannelsLast()), *seq.named_children()]))


# res5 at float32 inference runs NCHW below this pooler resolution (maps under 7x7), where
# NCHW was the faster layout (docs/accel.md)
NCHW_RES5_BELOW = 14


def install_runner(model: nn.Module, *, hoist: bool = True, chunk_size: int | str | None = AUTO,
                   channels_last: bool = True) -> nn.Module:
    """In place: the model's roi_heads compute box features with a Res5Runner over its res5."""
    heads = model.roi_heads
    heads.res5_runner = Res5Runner(heads.res5, pooler=heads.pooler, resolution=heads.pooler_resolution,
                                   spatial_scale=heads.spatial_scale, hoist=hoist, chunk_size=chunk_size,
                                   channels_last=channels_last)
    return model


@dataclass(frozen=True)
class InferencePlan:
    """Which inference steps of the fast path run on a device (see the module docstring)."""
    fold_bn: bool  # BN folded into the convs (device-neutral: it only removes work)
    channels_last: bool  # the trunk's (and the RPN's) convs in NHWC
    res5_channels_last: bool  # res5 in NHWC too
    small_map_taps: bool  # res5's 3x3 convs with small outputs as one matmul
    fuse: bool  # bias, ReLU and residual inside the conv (oneDNN post-ops; on CUDA cuDNN's conv-bias-ReLU)
    winograd: bool  # 3x3 stride-1 convs of 256+ channels as F(4x4, 3x3)
    runner: bool  # Res5Runner: gather pooling, hoisted 1x1 convs
    chunked: bool  # the runner's res5 on chunks of RoIs (chunk_size; else all RoIs in one call)


def inference_plan(device: torch.device | str, *, bf16: bool = False, small_maps: bool = False,
                   fold_bn: bool = True, channels_last: bool = True, fuse: bool = True,
                   winograd: bool = True, cuda_channels_last: bool = False, cuda_hoist: bool = False,
                   cuda_fused_relu: bool = False) -> InferencePlan:
    """The steps for a model on `device`: on the CPU all of them (bf16: under bfloat16
    autocast; small_maps: pooler resolution below NCHW_RES5_BELOW); elsewhere folding, with
    cuda_channels_last (an `accel` lever, unmeasured) the trunk, RPN and res5 in NHWC, with
    cuda_hoist (another) the Res5Runner without chunks (its 3,900 launches per image at 64
    RoIs a chunk made the fast path 2.8x slower on an H100), with cuda_fused_relu the folded
    convs' bias, ReLU and residual add inside cuDNN's convolution; the others are CPU kernels."""
    cpu = torch.device(device).type == "cpu"
    fused = fold_bn and (fuse if cpu else cuda_fused_relu)
    nhwc = channels_last if cpu else cuda_channels_last
    return InferencePlan(fold_bn=fold_bn, channels_last=nhwc,
                         res5_channels_last=nhwc and (not cpu or not small_maps or bf16),
                         small_map_taps=cpu and small_maps and bf16, fuse=fused,
                         winograd=cpu and fused and winograd and not bf16, runner=cpu or cuda_hoist, chunked=cpu)


def optimize_for_inference(model: nn.Module, *, fold_bn: bool = True, channels_last: bool = True,
                           hoist: bool = True, chunk_size: int | str | None = AUTO, fuse: bool = True,
                           winograd: bool = True, levers: Levers = Levers()) -> nn.Module:
    """An eval-mode copy of a FasterRCNN that gives the same detections faster, with the steps
    of `inference_plan` for the model's device (move the model first) and the GPU `levers`
    (detection/accel/levers.py; all off by default). Run it under torch.inference_mode(), as
    evaluation does. Its state_dict differs (folded norms); save checkpoints from the original."""
    chunk_rois(chunk_size, model.roi_heads.pooler_resolution)  # a wrong chunk_size fails on every device
    fast = copy.deepcopy(model).eval().requires_grad_(False)
    fast.inference_only = True  # train mode refuses it (its norms are folded, its gradients off)
    # Small RoI maps: NCHW convs in float32; with bfloat16 autocast on the CPU (model.amp,
    # test.amp), NHWC and the 3x3 convs with small outputs as one matmul (taps_conv2d)
    plan = inference_plan(fast.device, bf16=bool(getattr(fast, "amp", False)), fold_bn=fold_bn,
                          small_maps=fast.roi_heads.pooler_resolution < NCHW_RES5_BELOW,
                          channels_last=channels_last, fuse=fuse, winograd=winograd,
                          cuda_channels_last=levers.cuda_channels_last, cuda_hoist=levers.cuda_hoist,
                          cuda_fused_relu=levers.cuda_fused_relu)
    return apply_levers(apply_plan(fast, plan, hoist=hoist, chunk_size=chunk_size), levers)


def apply_plan(fast: nn.Module, plan: InferencePlan, *, hoist: bool = True,
               chunk_size: int | str | None = AUTO) -> nn.Module:
    """In place, on an eval-mode copy: the steps of `plan` (optimize_for_inference's; a test may
    apply another device's plan on the CPU)."""
    if plan.fold_bn:  # device-neutral
        fold_frozen_bn(freeze_batchnorm(fast))
    _install_cpu_kernels(fast, plan)
    if not plan.runner:
        if plan.res5_channels_last:  # roi_align gives NCHW: res5 takes it to NHWC itself
            fast.roi_heads.res5 = with_channels_last_input(fast.roi_heads.res5)
        return fast
    return install_runner(fast, hoist=hoist, chunk_size=chunk_size if plan.chunked else None,
                          channels_last=plan.res5_channels_last)


def _install_cpu_kernels(fast: nn.Module, plan: InferencePlan) -> None:
    """In place: the layout and kernel steps of `plan` (off the CPU only the levers' layout and
    fused blocks)."""
    if plan.channels_last:
        to_channels_last(fast)
        if not plan.res5_channels_last:
            fast.roi_heads.res5.to(memory_format=torch.contiguous_format)
    if plan.small_map_taps:
        small_map_convs(fast.roi_heads.res5)
    if plan.fuse:
        fuse_blocks(fast.trunk)
        fuse_blocks(fast.roi_heads.res5)
        if type(fast.rpn.head) is RPNHead:
            fast.rpn.head.__class__ = FusedRPNHead
    if plan.winograd:
        winograd_convs(fast)


@dataclass(frozen=True)
class TrainingPlan:
    """Which training steps of the fast path run on a device (optimize_for_training's)."""
    fold_bn: bool  # frozen BN applied through the conv weights at each call (ScaledConv2d)
    channels_last: bool  # the trunk's, the RPN's and res5's convs in NHWC
    runner: bool  # Res5Runner: res5's first 1x1 convs hoisted onto the C4 map, gather pooling
    small_map_taps: bool  # res5's 3x3 convs with small outputs as one matmul (a CPU kernel)
    winograd: bool  # res5's 3x3 stride-1 convs of 256+ channels by Winograd (a CPU kernel)
    sync_free_proposals: bool  # accel.sync_free_postprocess: the RPN's proposals without nonzero round trips
    compile: str | None  # accel.compile off the CPU: torch.compile mode of the trunk and res5's head (None: eager)


def training_plan(device: torch.device | str, *, fold_bn: bool = True, channels_last: bool = False,
                  small_maps: bool = True, winograd: bool = True, levers: Levers = Levers()) -> TrainingPlan:
    """The training steps for a model on `device`. With the levers off the same on every device
    (the taps matmul and Winograd are CPU kernels: elsewhere they were never run, now never
    installed). The levers: sync_free_postprocess on any device (the same proposals);
    compile off the CPU only (the CPU's training path is measured eager, and compiling costs
    there more than a short run gains); cuda_channels_last and cuda_graphs are inference-only
    (the trainer's training is NHWC on every device already: it passes channels_last=True; its
    RoI counts are fixed by sampling)."""
    cpu = torch.device(device).type == "cpu"
    return TrainingPlan(fold_bn=fold_bn, channels_last=channels_last, runner=True,
                        small_map_taps=cpu and small_maps, winograd=cpu and winograd,
                        sync_free_proposals=levers.sync_free_postprocess,
                        compile=None if cpu else levers.compile)


def optimize_for_training(model: nn.Module, *, fold_bn: bool = True, channels_last: bool = False,
                          hoist: bool = True, chunk_size: int | str | None = AUTO, small_maps: bool = True,
                          winograd: bool = True, levers: Levers = Levers()) -> nn.Module:
    """In place: the same parameters (objects, names, values) and gradients, computed faster,
    with the steps of `training_plan` for the model's device (move the model first): frozen BN
    applied through the conv weights, res5's 1x1 convs hoisted, res5's 3x3 convs with small
    outputs as one matmul (small_maps). An optimizer built before or after this sees the same
    parameters; checkpoints load either way (a compiled trunk keeps its keys)."""
    plan = training_plan(model.device, fold_bn=fold_bn, channels_last=channels_last, small_maps=small_maps,
                         winograd=winograd, levers=levers)
    return apply_training_plan(model, plan, hoist=hoist, chunk_size=chunk_size)


def apply_training_plan(model: nn.Module, plan: TrainingPlan, *, hoist: bool = True,
                        chunk_size: int | str | None = AUTO) -> nn.Module:
    """In place, on a model to train: the steps of `plan` (a test may apply another device's)."""
    if plan.fold_bn:
        fold_frozen_bn_for_training(model)
    if plan.channels_last:
        to_channels_last(model)
    if plan.small_map_taps:
        small_map_convs(model.roi_heads.res5)
    if plan.winograd:
        winograd_training_convs(model.roi_heads.res5)
    model.rpn.sync_free = plan.sync_free_proposals
    if plan.compile is not None:  # in place (nn.Module.compile): the state_dict keys stay
        model.trunk.compile(mode=plan.compile)
        logger.info("accel.compile: the trunk and res5's head are compiled for training (mode %s) at the first "
                    "step", plan.compile)
    if not plan.runner:
        return model
    install_runner(model, hoist=hoist, chunk_size=chunk_size)
    if plan.compile is not None:  # res5 after the pooling: outside the module tree, no keys
        compile_runner_head(model.roi_heads.res5_runner, plan.compile)
    return model
