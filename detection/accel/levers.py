"""The GPU levers of the fast path (config group `accel`, docs/accel.md "GPU levers"), each off
by default until a GPU measures what it buys (`tools/benchmark.py --device cuda --levers`):

- cuda_channels_last: on CUDA the trunk, the RPN and res5 in NHWC (inference_plan chooses it;
  the CPU's plan is unchanged); RoIAlign's output goes into res5 through `ToChannelsLast`.
- sync_free_postprocess (any device): detection/modeling/syncfree.py, the same detections.
- compile (any device): torch.compile of the trunk and of res5 (the plain res5 head, or off the
  CPU the Res5Runner's head, cuda_hoist's; where the CPU's Res5Runner runs res5, only the trunk),
  mode "default" (or true), "reduce-overhead" (CUDA graphs), "max-autotune" or
  "max-autotune-no-cudagraphs" (COMPILE_MODES). It compiles at the first
  images; that time is logged once per module at INFO.
- cuda_graphs: on CUDA res5 on RoI counts padded to fixed buckets, captured as CUDA graphs
  (graphs.py; the padding is device-neutral and tested on the CPU). res5 is then not compiled.
  With cuda_hoist the graphs hold the Res5Runner's head (res5 after the pooling).
- cuda_hoist: on CUDA res5 through the Res5Runner (inference_plan chooses it): the first block's
  1x1 conv1 and projection shortcut run once on the C4 map instead of on every RoI's bins (at
  R50's 14x14 RoIs a quarter of res5's FLOPs), the RoIs pooled by gather at the bins each conv
  reads, all RoIs in one call (the CPU's chunks of 64 RoIs cost 3,900 launches per image there).
- cuda_fused_relu: on CUDA the folded convs' bias, ReLU and residual add inside cuDNN's
  convolution (cudnn.py; the onednn.Fused* blocks, inference_plan chooses them), each output
  written once instead of once per elementwise op.

In training (plan.training_plan) sync_free_postprocess (the RPN's proposals, any device) and
compile (the trunk in place and the Res5Runner's head, off the CPU) act; the others are
inference-only (training hoists on every device already).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from detection.accel.graphs import PaddedRes5

logger = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Levers:
    """Which GPU levers optimize_for_inference and optimize_for_training apply (all off: today's fast path)."""
    cuda_channels_last: bool = False
    sync_free_postprocess: bool = False
    compile: str | None = None  # a torch.compile mode (COMPILE_MODES); None: not compiled
    cuda_graphs: bool = False
    cuda_hoist: bool = False
    cuda_fused_relu: bool = False

    def __post_init__(self) -> None:
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile: {self.compile!r} is not one of {', '.join(COMPILE_MODES)} (or off)")


class CompiledModule(nn.Module):
    """torch.compile(module, mode=mode); the first call, where compiling happens, is timed and
    logged at INFO (later recompiles for new shapes are not)."""

    def __init__(self, module: nn.Module | Callable[..., Any], mode: str, name: str) -> None:
        super().__init__()
        self.compiled = torch.compile(module, mode=mode)
        self.mode, self.name, self.logged = mode, name, False

    def forward(self, *args: Any) -> Any:
        if self.logged:
            return self.compiled(*args)
        start = time.perf_counter()
        out = self.compiled(*args)
        if isinstance(out, Tensor) and out.is_cuda:
            torch.cuda.synchronize(out.device)
        self.logged = True
        logger.info("accel.compile: torch.compile (mode %s) of the %s took %.1f s at its first call",
                    self.mode, self.name, time.perf_counter() - start)
        return out


CUDA_ONLY = ("cuda_channels_last", "cuda_graphs", "cuda_hoist", "cuda_fused_relu")


def apply_levers(fast: nn.Module, levers: Levers) -> nn.Module:
    """In place, after the plan's steps: the levers the plan does not choose (sync_free_postprocess,
    cuda_graphs, compile). CUDA's levers set for a model elsewhere do nothing, and a warning says
    so (a config written for a GPU machine, run on a CPU one)."""
    idle = [f"accel.{name}" for name in CUDA_ONLY if getattr(levers, name)]
    if idle and fast.device.type != "cuda":
        logger.warning("%s: CUDA levers, and the model is on %s: they do nothing here", ", ".join(idle),
                       fast.device.type)
    fast.rpn.sync_free = fast.roi_heads.sync_free = levers.sync_free_postprocess
    heads = fast.roi_heads
    graphed = levers.cuda_graphs and fast.device.type == "cuda"
    if graphed and heads.res5_runner is None:
        heads.res5 = PaddedRes5(heads.res5, graphs=True)
    elif graphed:  # cuda_hoist: the runner's head (res5 after the pooling) in the graphs
        heads.res5_runner.head_fn = PaddedRes5(heads.res5_runner.head, graphs=True)
    if levers.compile is not None:
        fast.trunk = CompiledModule(fast.trunk, levers.compile, "trunk")
        if heads.res5_runner is None and not graphed:
            heads.res5 = CompiledModule(heads.res5, levers.compile, "res5 head")
        elif heads.res5_runner is not None and not graphed and fast.device.type != "cpu":
            compile_runner_head(heads.res5_runner, levers.compile)  # cuda_hoist's runner (the CPU's: eager)
    return fast


def compile_runner_head(runner: Any, mode: str) -> None:
    """In place: the Res5Runner's head (res5 after the pooling) through torch.compile (`mode`),
    as its head_fn; the pooling stays eager. At inference (cuda_hoist on CUDA) the first call's
    compile time is logged; in training (training_plan's compile, off the CPU) autograd runs
    through the compiled graph."""
    runner.head_fn = CompiledModule(runner.head, mode, "res5 head (the runner's)")
