"""The training section: one SGD iteration (forward, backward, step) per model and run,
through the trainer's own functions (models.train_step), for the plain path, the fast path as
the trainer sets it up, the fast path under solver.amp's autocast and torchvision's C4."""
from __future__ import annotations

import argparse
import copy
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from detection.benchmarking.meters import FlopMeter, TimeMeter, gpu_peak, interleaved, log_run
from detection.benchmarking.models import bench_state, settle_loss_scale, synthetic_batch, train_step
from detection.config import Config
from detection.engine.trainer import TrainState
from detection.accel import optimize_for_training
from detection.modeling.precision import training_amp

# the models whose step runs under autocast (bfloat16 on the CPU, float16 on CUDA)
AMP_MODELS = frozenset({"fast_amp", "torchvision_amp"})


def bench_training(cfg: Config, plain: torch.nn.Module, tv: torch.nn.Module | None,
                   args: argparse.Namespace) -> dict[str, Any]:
    """One iteration per model and run. lr = 0: the same arithmetic as training, but the
    weights stay put, so every run does the same work. On CUDA also each model's step peak:
    the most GPU memory a step held above what was allocated before it (`step_peak_mb`)."""
    models = training_models(plain, tv)
    timed_names = [n for n in models if n != "plain" or args.ablation or tv is None]
    device = next(plain.parameters()).device
    images, targets = synthetic_batch(args.train_images, tuple(args.image_size), cfg.model.num_classes,
                                      device=device)
    s = cfg.solver
    states = {n: bench_state(m, s.momentum, s.weight_decay, ours=not n.startswith("torchvision"), amp=n in AMP_MODELS)
              for n, m in models.items()}
    result = {name: {"flops": _step_flops(states[name], name, images, targets),  # and a warm-up
                     "iteration_s": [], "iteration_cpu_s": [], "parts_s": defaultdict(list)} for name in models}
    for name, state in states.items():  # float16: past the loss scale's first overflows (skipped updates)
        settle_loss_scale(state, lambda: train_step(state, train_inputs(name, images), targets, TimeMeter(),
                                                    amp=name in AMP_MODELS))
    for run, name, kept in interleaved(timed_names, args.warmup, args.runs):
        torch.manual_seed(run)  # the same RPN / RoI samples for every model
        meter, entry = TimeMeter(), result[name]
        cpu = time.process_time()
        with gpu_peak(entry, device.type == "cuda"):
            train_step(states[name], train_inputs(name, images), targets, meter, amp=name in AMP_MODELS)
        cpu = time.process_time() - cpu
        if kept:
            entry["iteration_s"].append(sum(meter.values.values()))
            entry["iteration_cpu_s"].append(cpu)
            for part, value in meter.values.items():
                entry["parts_s"][part].append(value)
        entry.setdefault("loadavg", []).append(os.getloadavg()[0])
        log_run("training", run, name, sum(meter.values.values()))
    return result


def training_models(plain: torch.nn.Module, tv: torch.nn.Module | None) -> dict[str, torch.nn.Module]:
    """name -> a train-mode copy: the plain path, the fast ones as the trainer sets them up (with
    solver.amp only where it runs: not on a CPU without bfloat16 instructions, where the trainer
    trains in float32), torchvision's C4 (on CUDA twice: the GPU targets compare AMP steps)."""
    models = {"plain": copy.deepcopy(plain).train(),
              "fast": optimize_for_training(copy.deepcopy(plain), channels_last=True).train()}
    if training_amp(True, next(plain.parameters()).device):
        models["fast_amp"] = optimize_for_training(copy.deepcopy(plain), channels_last=True).train()
    if tv is not None:
        models["torchvision"] = copy.deepcopy(tv).train()
        if next(plain.parameters()).is_cuda:  # float16 with the GradScaler, as its reference scripts' --amp
            models["torchvision_amp"] = copy.deepcopy(tv).train()
    return models


def _step_flops(state: TrainState, name: str, images: list[torch.Tensor], targets: list[dict]) -> float:
    """FLOPs of one step of model `name` (also its warm-up)."""
    torch.manual_seed(0)
    meter = FlopMeter()
    with direct_convs(state.model):
        train_step(state, train_inputs(name, images), targets, meter, amp=name in AMP_MODELS)
    return sum(meter.values.values())


@contextmanager
def direct_convs(model: torch.nn.Module) -> Iterator[None]:
    """The fast path's Winograd convs (training) run as direct convs meanwhile: FLOPs count the
    convolutions computed, as the inference stages do, not Winograd's fewer products."""
    flagged = [m for m in model.modules() if getattr(m, "winograd", False)]
    for m in flagged:
        m.winograd = False
    try:
        yield
    finally:
        for m in flagged:
            m.winograd = True


def train_inputs(name: str, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """torchvision's models take images in 0..1, ours in 0..255."""
    return [img / 255 for img in images] if name.startswith("torchvision") else images
