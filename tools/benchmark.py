#!/usr/bin/env python
"""Speed and memory of the detector on this machine, optionally against torchvision's
generic Faster R-CNN assembled as C4 with the same weights and the same work.

    python tools/benchmark.py --config configs/coco_r50.yaml --compare-torchvision \\
        [--image-size 600 800] [--runs 3] [--device cpu|cuda] [--json out.json] [KEY=VALUE ...]

Measures (medians over --runs after warm-up; baseline and ours interleaved, since the
machine is shared and noisy; the load average is reported with the numbers):
  hardware   fp32 matmul and 3x3 convolution throughput (NCHW and channels_last)
  inference  end to end (the public model(images), no profiler) and per stage (preprocess,
             trunk, rpn, roi_pool, res5_head, postprocess), for the plain path, the fast path
             (detection.fast) and torchvision. Our stages are read with torch.profiler from
             the c4det.* record_function labels of the real forward (detection/benchmarking/
             profiling.py), torchvision's from labels around its staged forward; FLOPs per
             stage (the profiler's, convs and matmuls as torch.utils.flop_counter; pooling is
             not counted) and each stage's GFLOP/s as a fraction of the measured conv peak
  training   one SGD iteration (forward, backward, step) on --train-images images; also
             the fast path under solver.amp's autocast (bfloat16 on the CPU, float16 on CUDA)
  memory     peak RSS of one inference at --memory-proposals proposals, each model in its
             own child process (ru_maxrss is a process-wide high-water mark); on CUDA peak GPU
             memory (torch.cuda.max_memory_allocated) in this process, and in training too
  data       data-loader throughput (decode + augmentation + batching) and evaluation time,
             on a synthetic shapes set written to a temp dir (or --dataset NAME)
The weights are random (pretrained ones cannot be downloaded here), made sane by
detection.testing.make_sane (see docs/ARCHITECTURE.md); speed does not depend on their
values. "Equal work" is checked as total FLOPs of our plain path against torchvision's,
within 10%, the same proposals (matched as sets) and the same number of detections (its
detections are compared with ours too); the hoisted path's FLOPs are reported apart. Unequal work: the targets are
reported "not comparable", none as met.

--device cuda: the same report on the GPU. Timings are synchronised (torch.cuda.synchronize
around each), stage times are the GPU time of the kernels launched under each label (the
profiler's CUDA activity), the hardware probe measures float32, TF32 and float16/bfloat16
matrix products and convolutions, and the targets are the GPU's (report.CUDA_TARGETS). The
config's `tf32` setting applies (select_device).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

from detection.benchmarking.models import (STAGES, ProposalRecorder, TimedModel, bench_state, build_ours, build_torchvision_c4,
                                          compare_proposals, staged_torchvision, synthetic_batch, train_step)
from detection.benchmarking.profiling import OURS_LABELS, TORCHVISION_LABELS, profile_stages, stage_label
from detection.benchmarking.report import print_report, summarize
from detection.cli import add_config_args, config_from_args, parse_command_line, run_tool
from detection.precision import inference_amp
from detection.utils.comm import select_device, set_tf32
from detection.fast import (AUTO, fold_frozen_bn, install_runner, optimize_for_inference, optimize_for_training,
                            to_channels_last)
from detection.testing import compare_detections


def _chunk_size(value: str) -> int | str:
    if value == AUTO or (value.isdigit() and int(value) > 0):
        return value if value == AUTO else int(value)
    raise argparse.ArgumentTypeError(f'"auto" or a positive number of RoIs, not {value!r}')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help="input image size; both models process it unresized (default: min_size_test x 4/3)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed runs after the first pass, which counts FLOPs and warms up")
    p.add_argument("--compare-torchvision", action="store_true", help="also run torchvision's FasterRCNN as C4")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the models run (default cpu)")
    p.add_argument("--ablation", action="store_true", help="time each inference optimization on its own")
    p.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    p.add_argument("--chunk-size", type=_chunk_size, default=AUTO,
                   help='RoIs per res5 call on the fast path (default "auto": by the pooler resolution)')
    p.add_argument("--train-images", type=int, default=1, help="images per training iteration")
    p.add_argument("--memory-proposals", type=int, default=1000, help="proposals for the peak-memory run")
    p.add_argument("--dataset", help="data set name or path for the loader/eval timing (default: synthetic shapes)")
    p.add_argument("--loader-batches", type=int, default=5, help="batches timed through the data loader")
    p.add_argument("--eval-images", type=int, help="generated images in the evaluation timing (default 4; "
                   "with --dataset the whole data set is timed)")
    p.add_argument("--quick", action="store_true", help="small hardware probes (smoke tests)")
    p.add_argument("--pretrained", action="store_true", help="load model.backbone.weights (default: random)")
    p.add_argument("--weights", metavar="CKPT", help="a detector to time (this project's or a Detectron2 "
                   "model-zoo file) instead of random weights")
    for part in ("train", "memory", "data"):
        p.add_argument(f"--no-{part}", action="store_true", help=f"skip the {part} measurement")
    p.add_argument("--onnx", action="store_true",
                   help="also time ONNX Runtime on the exported plain path (detection/export.py; the export "
                        "extra) against the fast path")
    p.add_argument("--child", choices=("plain", "fast", "torchvision"), help=argparse.SUPPRESS)
    args = parse_command_line(p, argv)
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be >= 1 and --warmup >= 0")
    if args.dataset and args.eval_images is not None:
        p.error("--eval-images sets how many images are generated; with --dataset the whole data set is timed")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no CUDA device (torch.cuda.is_available() is False)")
    if args.onnx and args.device == "cuda":
        p.error("--onnx times ONNX Runtime on the CPU against the fast path there: leave out --device cuda")
    if args.eval_images is None:
        args.eval_images = 4
    elif args.eval_images < 1:
        p.error("--eval-images must be >= 1")
    return args


def bench_config(args: argparse.Namespace, extra: list[str] = ()) -> Any:
    """The config with random weights (unless --pretrained) and test size = the image size."""
    weights = [] if args.pretrained else ["model.backbone.weights=null"]
    if args.image_size is None:
        cfg = config_from_args(args, weights)
        side = cfg.input.min_size_test
        args.image_size = [side, min(cfg.input.max_size_test, round(side * 4 / 3))]
    h, w = args.image_size
    return config_from_args(args, [*weights, f"input.min_size_test={min(h, w)}",
                                   f"input.max_size_test={max(h, w)}", *extra])


# ---- measuring ----------------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TimeMeter:
    """meter(stage) adds the stage's wall time (a stage may be entered several times)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        _sync()
        start = time.perf_counter()
        yield
        _sync()
        self.values[name] += time.perf_counter() - start


class FlopMeter:
    """meter(stage) adds the FLOPs torch.utils.flop_counter sees inside the stage."""

    def __init__(self) -> None:
        self.values: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        with FlopCounterMode(display=False) as counter:
            yield
        self.values[name] += counter.get_total_flops()


def timed(fn: Callable[[], Any]) -> float:
    return timed_cpu(fn)[0]


def timed_cpu(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall, CPU) seconds of fn(); CPU time (all threads) is less sensitive to other load."""
    _sync()
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync()
    return time.perf_counter() - start, time.process_time() - cpu


def median_time(fn: Callable[[], Any], runs: int = 5) -> float:
    fn()
    return statistics.median(timed(fn) for _ in range(runs))


def hardware_throughput(quick: bool = False, device: str = "cpu") -> dict[str, float]:
    """GFLOP/s of an n^3 fp32 matmul (n = 2048) and of a res5-like 3x3 conv (16 x 512 x 14 x 14
    -> 512); `quick` shrinks both 8x (smoke tests). On CUDA (n = 8192, 128 RoI maps) float32
    without TF32, then TF32, float16 and bfloat16 (`*_tf32_gflops`, ...), the TF32 flags put
    back as they were."""
    cuda = device == "cuda"
    n, batch = (1024, 2) if quick else ((8192, 128) if cuda else (2048, 16))
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    x, w = torch.randn(batch, 512, 14, 14, device=device), torch.randn(512, 512, 3, 3, device=device)
    conv_flops = 2 * batch * 14 * 14 * 512 * 512 * 9
    if not cuda:
        return _throughputs(a, b, x, w, conv_flops, "")
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        set_tf32(False)
        out = _throughputs(a, b, x, w, conv_flops, "")
        set_tf32(True)
        out.update(_throughputs(a, b, x, w, conv_flops, "_tf32"))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    for dtype, name in ((torch.float16, "_fp16"), (torch.bfloat16, "_bf16")):
        out.update(_throughputs(a.to(dtype), b.to(dtype), x.to(dtype), w.to(dtype), conv_flops, name))
    return out


def _throughputs(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, w: torch.Tensor, conv_flops: float,
                 suffix: str) -> dict[str, float]:
    """matmul_gflops{suffix}, conv3x3_gflops{suffix} and conv3x3_channels_last_gflops{suffix}."""
    n = a.shape[0]
    out = {f"matmul{suffix}_gflops": 2 * n**3 / median_time(lambda: a @ b) / 1e9,
           f"conv3x3{suffix}_gflops": conv_flops / median_time(lambda: torch.conv2d(x, w, padding=1)) / 1e9}
    x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    out[f"conv3x3_channels_last{suffix}_gflops"] = conv_flops / median_time(lambda: torch.conv2d(x, w, padding=1)) / 1e9
    return out


# ---- inference ------------------------------------------------------------------------


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


def bench_inference(variants: dict, images: list[torch.Tensor], args: argparse.Namespace) -> dict:
    """End-to-end times (the public forward, no profiler) and per-stage times (the same forward
    under torch.profiler, read from the labels) of all timed runs, FLOPs per stage and RoI counts
    per variant. The FLOP-counting pass comes first and doubles as a warm-up."""
    inputs = {name: [img / 255 for img in images] if name == "torchvision" else images for name in variants}
    result = {name: {"end_to_end_s": [], "end_to_end_cpu_s": [], "stages_s": defaultdict(list)}
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
    order = list(variants)
    for run in range(args.warmup + args.runs):
        for name in (order if run % 2 == 0 else order[::-1]):  # interleaved, alternating order
            model = variants[name]
            with torch.inference_mode():
                e2e, cpu = timed_cpu(lambda: model(inputs[name]))
                _, seconds, _, _ = profiled_inference(name, model, inputs[name])
            if run >= args.warmup:
                result[name]["end_to_end_s"].append(e2e / len(images))
                result[name]["end_to_end_cpu_s"].append(cpu / len(images))
                for stage in STAGES:
                    result[name]["stages_s"][stage].append(seconds.get(stage, 0.0))
            result[name].setdefault("loadavg", []).append(os.getloadavg()[0])
            print(f"  inference run {run}: {name} {e2e:.3f} s (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    return result


def build_bench_model(cfg: Any, args: argparse.Namespace) -> torch.nn.Module:
    """Seeded random sane weights, or the detector in --weights."""
    model = build_ours(cfg)
    if args.weights:
        from detection.engine.loading import load_detector_weights, read_detector_file

        weights = read_detector_file(args.weights)
        if weights is None:
            raise SystemExit(f"error: {args.weights}: holds no detector")
        load_detector_weights(model, weights)
    return model


# ---- ONNX Runtime (--onnx) -------------------------------------------------------------


def bench_onnx(plain: torch.nn.Module, images: list[torch.Tensor], args: argparse.Namespace) -> dict:
    """ONNX Runtime running the exported plain path (detection/export.py) against the fast path
    (PyTorch), interleaved, on the same image with the same number of threads; per image, end
    to end (ONNX: prepare_image + session.run; PyTorch: model(images)). Also whether each gives
    the plain path's detections."""
    from detection.export import BOX_TOLERANCE, SCORE_TOLERANCE, OnnxDetector, export_onnx

    fast = optimize_for_inference(plain, chunk_size=args.chunk_size)
    uint8 = [img.round().clamp(0, 255).to(torch.uint8) for img in images]
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(plain, Path(tmp) / "model.onnx")  # traced at another size than the image's
        ort = OnnxDetector(path, plain.min_size_test, plain.max_size_test, plain.resize_mode,
                           threads=torch.get_num_threads())
    runners = {"fast": lambda: fast(images), "onnxruntime": lambda: [ort(img) for img in uint8]}
    with torch.inference_mode():
        ref = plain(images)[0]
        out: dict[str, Any] = {name: {"end_to_end_s": [], "end_to_end_cpu_s": [],
                                      "vs_plain": compare_detections(ref, fn()[0], box_tolerance=BOX_TOLERANCE,
                                                                    score_tolerance=SCORE_TOLERANCE)} for name, fn in runners.items()}
        for run in range(args.warmup + args.runs):
            for name in (list(runners) if run % 2 == 0 else list(runners)[::-1]):
                seconds, cpu = (t / len(images) for t in timed_cpu(runners[name]))
                if run >= args.warmup:
                    out[name]["end_to_end_s"].append(seconds)
                    out[name]["end_to_end_cpu_s"].append(cpu)
                print(f"  onnx run {run}: {name} {seconds:.3f} s (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    for entry in out.values():
        entry["end_to_end_median_s"] = statistics.median(entry["end_to_end_s"])
        entry["end_to_end_cpu_median_s"] = statistics.median(entry["end_to_end_cpu_s"])
    out["threads"] = torch.get_num_threads()
    return out


def print_onnx(onnx: dict) -> None:
    fast, ort = onnx["fast"], onnx["onnxruntime"]
    print(f"\nONNX Runtime vs the fast path ({onnx['threads']} threads, per image, median):")
    for name, entry in (("fast path (PyTorch)", fast), ("onnxruntime (plain path exported)", ort)):
        same = "equal" if entry["vs_plain"]["equal"] else "NOT EQUAL"
        print(f"  {name:36s} {entry['end_to_end_median_s']:.3f} s (CPU {entry['end_to_end_cpu_median_s']:.3f} s)"
              f"   detections vs plain: {same} ({entry['vs_plain']['other_detections']} detections)")
    print(f"  onnxruntime / fast: {ort['end_to_end_median_s'] / fast['end_to_end_median_s']:.2f}x the time")


# ---- training --------------------------------------------------------------------------


def bench_training(cfg: Any, plain: torch.nn.Module, tv: torch.nn.Module | None,
                   args: argparse.Namespace) -> dict:
    """One iteration per model and run. lr = 0: the same arithmetic as training, but the
    weights stay put, so every run does the same work. On CUDA also each model's step peak:
    the most GPU memory a step held above what was allocated before it (`step_peak_mb`)."""
    models = {"plain": copy.deepcopy(plain).train(),  # the fast ones as the trainer sets them up
              "fast": optimize_for_training(copy.deepcopy(plain), channels_last=True).train(),
              "fast_amp": optimize_for_training(copy.deepcopy(plain), channels_last=True).train()}
    if tv is not None:
        models["torchvision"] = copy.deepcopy(tv).train()
        if next(plain.parameters()).is_cuda:  # GPU targets compare AMP steps (float16, GradScaler-free at lr 0)
            models["torchvision_amp"] = copy.deepcopy(tv).train()
    amp = {"fast_amp", "torchvision_amp"}
    timed_names = [n for n in models if n != "plain" or args.ablation or tv is None]
    images, targets = synthetic_batch(args.train_images, tuple(args.image_size), cfg.model.num_classes)
    device = next(plain.parameters()).device
    images = [img.to(device) for img in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    s = cfg.solver
    result = {name: {"flops": 0.0, "iteration_s": [], "iteration_cpu_s": [], "parts_s": defaultdict(list)}
              for name in models}
    states = {n: bench_state(m, s.momentum, s.weight_decay, ours=not n.startswith("torchvision"))
              for n, m in models.items()}
    for name in models:  # FLOPs, and a warm-up
        torch.manual_seed(0)
        meter = FlopMeter()
        with direct_convs(models[name]):
            train_step(states[name], _train_inputs(name, images), targets, meter, amp=name in amp)
        result[name]["flops"] = sum(meter.values.values())
    for run in range(args.warmup + args.runs):
        for name in (timed_names if run % 2 == 0 else timed_names[::-1]):
            torch.manual_seed(run)  # the same RPN / RoI samples for every model
            meter = TimeMeter()
            cpu = time.process_time()
            with gpu_peak(result[name], device.type == "cuda"):
                train_step(states[name], _train_inputs(name, images), targets, meter, amp=name in amp)
            cpu = time.process_time() - cpu
            if run >= args.warmup:
                result[name]["iteration_s"].append(sum(meter.values.values()))
                result[name]["iteration_cpu_s"].append(cpu)
                for part, value in meter.values.items():
                    result[name]["parts_s"][part].append(value)
            result[name].setdefault("loadavg", []).append(os.getloadavg()[0])
            print(f"  training run {run}: {name} {sum(meter.values.values()):.3f} s "
                  f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    return result


@contextmanager
def gpu_peak(entry: dict, cuda: bool) -> Iterator[None]:
    """On CUDA: entry["step_peak_mb"] = the largest GPU memory, above what was allocated before,
    that the block held (over all the blocks measured into this entry). Nothing on the CPU."""
    if not cuda:
        yield
        return
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    yield
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    entry["step_peak_mb"] = max(entry.get("step_peak_mb", 0.0), peak)


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


def _train_inputs(name: str, images: list[torch.Tensor]) -> list[torch.Tensor]:
    return [img / 255 for img in images] if name.startswith("torchvision") else images


# ---- peak memory (child processes) ---------------------------------------------------------


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
    """One inference at --memory-proposals proposals; prints {"max_rss_mb", ...} as JSON."""
    model, images = _memory_model(args, args.child)
    gc.collect()
    before = max_rss_mb()
    with torch.inference_mode():
        model(images)
    print(json.dumps({"max_rss_mb": max_rss_mb(), "max_rss_before_inference_mb": before}))
    return 0


def bench_gpu_memory(args: argparse.Namespace, kinds: list[str]) -> dict:
    """On CUDA, in this process: each model's peak GPU memory in one inference at
    --memory-proposals proposals (torch.cuda.max_memory_allocated), the model's own weights
    included, one model on the GPU at a time."""
    result = {}
    for kind in kinds:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model, images = _memory_model(args, kind)
        before = torch.cuda.memory_allocated()
        with torch.inference_mode():
            model(images)
        torch.cuda.synchronize()
        result[kind] = {"max_gpu_mb": torch.cuda.max_memory_allocated() / 2**20,
                        "gpu_before_inference_mb": before / 2**20}
        del model, images
        print(f"  memory: {kind} {result[kind]['max_gpu_mb']:.0f} MB (GPU)", file=sys.stderr)
    return result


def _memory_model(args: argparse.Namespace, kind: str) -> tuple[torch.nn.Module, list[torch.Tensor]]:
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


def bench_memory(args: argparse.Namespace, argv: list[str], kinds: list[str]) -> dict:
    result = {}
    for kind in kinds:
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", kind,
               "--image-size", *map(str, args.image_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        result[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  memory: {kind} {result[kind]['max_rss_mb']:.0f} MB", file=sys.stderr)
    return result


# ---- data loader and evaluation --------------------------------------------------------------


def _datasets(cfg: Any, args: argparse.Namespace, tmp: str) -> tuple[Any, Any]:
    from detection.data.catalog import get_dataset
    from detection.data.shapes import generate_shapes

    if args.dataset:
        ds = get_dataset(args.dataset, cfg.datasets.root)
        return ds, ds
    h, w = args.image_size
    generate_shapes(os.path.join(tmp, "shapes"), num_train=cfg.solver.ims_per_batch * (args.loader_batches + 1),
                    num_val=args.eval_images, seed=0, image_size=(min(h, w), max(h, w)))
    return get_dataset("shapes_train", tmp), get_dataset("shapes_val", tmp)


def bench_loader(cfg: Any, train_ds: Any, args: argparse.Namespace) -> dict:
    """Images/s through the training loader (decode + augmentation + batching), after the
    first batch (worker start-up, timed apart)."""
    from detection.engine.trainer import build_train_data_loader

    batches = iter(build_train_data_loader(cfg, [train_ds]))
    first = timed(lambda: next(batches))
    start, images = time.perf_counter(), 0
    for _ in range(args.loader_batches):
        images += len(next(batches)[0])
    elapsed = time.perf_counter() - start
    del batches
    return {"first_batch_s": first, "images": images, "images_per_s": images / elapsed,
            "num_workers": cfg.dataloader.num_workers, "images_per_batch": cfg.solver.ims_per_batch}


def bench_eval(args: argparse.Namespace, val_ds: Any) -> dict:
    """The library's one test-set loop (evaluate_test_sets) on the validation images, with the
    model prepared as tools/eval.py prepares it (detection.engine.loading.prepare_for_inference:
    the fast path, test.amp and test-time augmentation as configured) and the config's loader
    workers (decoding overlaps the model): images to metrics and files; then the saved results
    scored again without the model, which is the metrics' share."""
    from detection.engine.loading import prepare_for_inference
    from detection.evaluation import evaluate_test_sets
    from detection.tta import DetectorWithTTA

    cfg = bench_config(args, [f"model.num_classes={len(val_ds.class_names)}"])
    prepared = prepare_for_inference(cfg, build_ours(cfg), torch.device(args.device), chunk_size=args.chunk_size)
    model = TimedModel(prepared)
    detector = prepared.model if isinstance(prepared, DetectorWithTTA) else prepared
    passes: list[int] = []  # images through the detector's inference, one entry per call
    inference = detector.inference

    def counted_inference(images: list, *a: Any, **k: Any) -> list:
        passes.append(len(images))
        return inference(images, *a, **k)

    detector.inference = counted_inference
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stderr(io.StringIO()):  # progress bar
        total = timed(lambda: evaluate_test_sets([val_ds], model=model, device=args.device, output_dir=out,
                                                 num_workers=cfg.dataloader.num_workers))
        metrics = timed(lambda: evaluate_test_sets([val_ds], results=out))
    n = len(val_ds.records)
    in_model = model.total_seconds()
    # where the time goes: the model's forward passes; scoring and writing the results files
    # (the re-scoring of the saved results); the rest: reading and decoding images, the loop
    return {"images": n, "total_s": total, "per_image_s": total / max(n, 1), "images_per_s": n / total,
            "model_s": in_model, "metrics_s": metrics, "other_s": max(0.0, total - in_model - metrics),
            "outside_model_share": 1 - in_model / total, "num_workers": cfg.dataloader.num_workers,
            "amp": bool(detector.amp),
            "passes_per_image": sum(passes) / max(n, 1)}


# ---- main ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    cfg = bench_config(args)
    device = select_device(args.device, cfg.tf32)
    report: dict[str, Any] = {"command": " ".join(["python", "tools/benchmark.py", *argv]),
                              "image_size": args.image_size, "proposals": cfg.model.rpn.post_nms_topk_test,
                              "weights": args.weights or "random (sane)", "threads": torch.get_num_threads(),
                              "cpu_count": os.cpu_count(), "torch": torch.__version__,
                              "device": device.type, "loadavg_start": os.getloadavg()}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
        report["tf32"] = cfg.tf32
    report["hardware"] = hardware_throughput(args.quick, device.type)
    plain = build_bench_model(cfg, args)
    tv = build_torchvision_c4(plain, cfg).to(device) if args.compare_torchvision else None
    plain = plain.to(device)
    images, _ = synthetic_batch(1, tuple(args.image_size), cfg.model.num_classes)
    images = [img.to(device) for img in images]
    report["inference"] = bench_inference(inference_variants(plain, tv, args), images, args)
    if args.onnx:
        report["onnx"] = bench_onnx(plain, images, args)
    if not args.no_train:
        report["training"] = bench_training(cfg, plain, tv, args)
    if not args.no_memory:
        kinds = ["plain", "fast"] + (["torchvision"] if tv is not None else [])
        report["memory"] = (bench_gpu_memory(args, kinds) if device.type == "cuda"
                            else bench_memory(args, _child_argv(argv), kinds))
        report["memory_proposals"] = args.memory_proposals
    if not args.no_data:
        with tempfile.TemporaryDirectory() as tmp:
            train_ds, val_ds = _datasets(cfg, args, tmp)
            report["data_loader"] = bench_loader(cfg, train_ds, args)
            report["evaluation"] = bench_eval(args, val_ds)
    report["loadavg_end"] = os.getloadavg()
    return report


def _child_argv(argv: list[str]) -> list[str]:
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_flush_denormal(True)
    if args.child:
        return child_main(args)

    def work() -> None:
        report = summarize(run(args, argv))
        print_report(report)
        if "onnx" in report:
            print_onnx(report["onnx"])
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=float))

    return run_tool(work)


if __name__ == "__main__":
    raise SystemExit(main())
