"""The inference section: each variant (the plain path, the fast path, its test.amp copy,
with --ablation each optimization on its own, torchvision's C4) end to end through its public
forward, and per stage from torch.profiler (profiling.py); FLOPs, RoI counts, and whether
each gives the plain path's proposals and detections."""
from __future__ import annotations

import argparse
import copy
import os
from collections import defaultdict
from typing import Any

import torch

from detection.benchmarking.meters import interleaved, log_run, timed_cpu
from detection.benchmarking.models import STAGES, ProposalRecorder, compare_proposals, staged_torchvision
from detection.benchmarking.profiling import OURS_LABELS, TORCHVISION_LABELS, profile_stages, stage_label
from detection.accel import fold_frozen_bn, install_runner, optimize_for_inference, to_channels_last
from detection.modeling.precision import inference_amp
from detection.testing import compare_detections
from detection.utils.comm import tf32_set


def inference_variants(plain: torch.nn.Module, tv: torch.nn.Module | None, args: argparse.Namespace
                       ) -> dict[str, torch.nn.Module]:
    """name -> model. With --ablation, each optimization added one by one."""
    variants = {"plain": plain}
    if args.ablation:
        folded = fold_frozen_bn(copy.deepcopy(plain))
        variants["+fold_bn"] = folded
        variants["+channels_last"] = to_channels_last(copy.deepcopy(folded))
        variants["+gather_pool"] = install_runner(copy.deepcopy(variants["+channels_last"]),
                                                  hoist=False, chunk_size=None)
        variants["+hoist"] = install_runner(copy.deepcopy(variants["+channels_last"]), hoist=True, chunk_size=None)
    variants["fast"] = optimize_for_inference(plain, chunk_size=args.chunk_size)
    device = next(plain.parameters()).device
    if inference_amp(True, device):  # test.amp: bfloat16 where the CPU has it, float16 on CUDA
        amp = optimize_for_inference(_with_amp(plain), chunk_size=args.chunk_size)
        variants["fast_fp16" if device.type == "cuda" else "fast_bf16"] = amp
    if tv is not None:
        variants["torchvision"] = tv
    return variants


def _with_amp(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` that runs inference under autocast (test.amp)."""
    amp = copy.deepcopy(model)
    amp.amp = True
    return amp


def profiled_inference(name: str, model: torch.nn.Module, images: list[torch.Tensor], with_flops: bool = False
                       ) -> tuple[list[dict], dict[str, float], dict[str, float], list[torch.Tensor]]:
    """One inference under torch.profiler: (detections, seconds and FLOPs per stage per image,
    proposals per image). Ours runs its real forward (model(images)) and is read through its
    c4det.* labels; torchvision runs staged, each stage in a label of its own. On CUDA the
    seconds are the GPU time of each stage's kernels."""
    device = images[0].device.type
    if name == "torchvision":
        (dets, proposals), seconds, flops = profile_stages(lambda: staged_torchvision(model, images, stage_label),
                                                           TORCHVISION_LABELS, len(images), with_flops, device)
        return dets, seconds, flops, proposals
    with ProposalRecorder(model) as recorder:
        dets, seconds, flops = profile_stages(lambda: model(images), OURS_LABELS, len(images), with_flops, device)
    return dets, seconds, flops, recorder.proposals


def bench_inference(variants: dict[str, torch.nn.Module], images: list[torch.Tensor], args: argparse.Namespace
                    ) -> dict[str, Any]:
    """End-to-end times (the public forward, no profiler) and per-stage times (the same forward
    under torch.profiler, read from the labels) of all timed runs, FLOPs per stage and RoI counts
    per variant. The FLOP-counting pass comes first and doubles as a warm-up; it runs without
    TF32, so its check of equal detections and proposals compares the code in float32 (on CUDA,
    TF32 rounding moves boxes more than the check allows); the timed runs keep the config's tf32."""
    inputs = {name: [img / 255 for img in images] if name == "torchvision" else images for name in variants}
    with tf32_set(False):
        result = _first_pass(variants, inputs)
    for run, name, kept in interleaved(variants, args.warmup, args.runs):
        model, entry = variants[name], result[name]
        with torch.inference_mode():
            e2e, cpu = timed_cpu(lambda: model(inputs[name]))
            _, seconds, _, _ = profiled_inference(name, model, inputs[name])
        if kept:
            entry["end_to_end_s"].append(e2e / len(images))
            entry["end_to_end_cpu_s"].append(cpu / len(images))
            for stage in STAGES:
                entry["stages_s"][stage].append(seconds.get(stage, 0.0))
        entry.setdefault("loadavg", []).append(os.getloadavg()[0])
        log_run("inference", run, name, e2e)
    return result


def _first_pass(variants: dict[str, torch.nn.Module], inputs: dict[str, list[torch.Tensor]]) -> dict[str, Any]:
    """Each variant's entry with its FLOPs per stage and RoI count from one profiled pass, and
    (all but the plain path) how its proposals and detections compare with the plain path's."""
    result: dict[str, Any] = {name: {"end_to_end_s": [], "end_to_end_cpu_s": [], "stages_s": defaultdict(list)}
                              for name in variants}
    detections, proposals = {}, {}
    for name, model in variants.items():
        with torch.inference_mode():
            detections[name], _, flops, proposals[name] = profiled_inference(name, model, inputs[name],
                                                                             with_flops=True)
        result[name]["flops"], result[name]["num_rois"] = flops, sum(len(p) for p in proposals[name])
    for name in variants:  # the fast variants and torchvision must give the plain path's proposals and detections
        if name != "plain":
            result[name]["vs_plain"] = {**compare_detections(detections["plain"][0], detections[name][0]),
                                        "proposals": compare_proposals(proposals["plain"], proposals[name])}
    return result
