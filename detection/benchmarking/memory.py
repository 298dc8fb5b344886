"""The memory section: the peak memory of one inference at --memory-proposals proposals per
model. On the CPU each model runs in a child process of its own (the tool run again with
--child), since the peak RSS is a process-wide high-water mark; on CUDA the peak GPU memory
is measured in this process, less what was allocated before the model was built (the models
the other sections keep on the GPU)."""
from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
from typing import Any, Sequence

import torch

from detection.benchmarking.models import bench_config, build_bench_model, build_torchvision_c4, synthetic_batch
from detection.accel import optimize_for_inference


def max_rss_mb() -> float:
    """Peak RSS of this process image. Linux's VmHWM, not ru_maxrss: after fork + exec,
    ru_maxrss keeps the parent's size at the fork."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_main(args: argparse.Namespace) -> int:
    """The child (--child KIND): one inference at --memory-proposals proposals; prints
    {"max_rss_mb", "max_rss_before_inference_mb"} as JSON."""
    model, images = memory_model(args, args.child)
    gc.collect()
    before = max_rss_mb()
    with torch.inference_mode():
        model(images)
    print(json.dumps({"max_rss_mb": max_rss_mb(), "max_rss_before_inference_mb": before}))
    return 0


def bench_memory(args: argparse.Namespace, command: Sequence[str], kinds: list[str]) -> dict[str, Any]:
    """Each model's peak RSS from a child process: `command` (the tool's command line, without
    the options child_argv leaves out) run with --child KIND."""
    result = {}
    for kind in kinds:
        cmd = [*command, "--child", kind, "--image-size", *map(str, args.image_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        result[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  memory: {kind} {result[kind]['max_rss_mb']:.0f} MB", file=sys.stderr)
    return result


def child_argv(argv: list[str]) -> list[str]:
    """The command line minus the options a memory child must not see again."""
    out, skip = [], 0
    for item in argv:
        if skip:
            skip -= 1
        elif item in ("--image-size", "--json"):
            skip = 2 if item == "--image-size" else 1
        elif not item.startswith("--json="):
            out.append(item)
    return out


def bench_gpu_memory(args: argparse.Namespace, kinds: list[str]) -> dict[str, Any]:
    """On CUDA, in this process: each model's peak GPU memory in one inference at
    --memory-proposals proposals (torch.cuda.max_memory_allocated), its own weights and input
    included; what was allocated before it was built (the plain and torchvision models the
    other sections keep on the GPU) and the build's passing copies (optimize_for_inference's)
    left out."""
    result = {}
    for kind in kinds:
        gc.collect()
        torch.cuda.empty_cache()
        others = torch.cuda.memory_allocated()
        model, images = memory_model(args, kind)
        gc.collect()  # the build's passing copies
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            model(images)
        torch.cuda.synchronize()
        result[kind] = {"max_gpu_mb": (torch.cuda.max_memory_allocated() - others) / 2**20,
                        "gpu_before_inference_mb": (before - others) / 2**20}
        del model, images
        print(f"  memory: {kind} {result[kind]['max_gpu_mb']:.0f} MB (GPU)", file=sys.stderr)
    return result


def memory_model(args: argparse.Namespace, kind: str) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The model `kind` (plain, fast, torchvision) at --memory-proposals proposals, on --device,
    and one synthetic image for it."""
    cfg = bench_config(args, [f"model.rpn.post_nms_topk_test={args.memory_proposals}"])
    model = build_bench_model(cfg, args)
    if kind == "torchvision":
        model = build_torchvision_c4(model, cfg)
    model = model.to(args.device).eval()
    if kind == "fast":
        model = optimize_for_inference(model, chunk_size=args.chunk_size)
    images, _ = synthetic_batch(1, tuple(args.image_size), cfg.model.num_classes)
    images = [img.to(args.device) / (255 if kind == "torchvision" else 1) for img in images]
    return model, images
