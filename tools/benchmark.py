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
             (detection.accel) and torchvision. Our stages are read with torch.profiler from
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

--device cuda --levers: only the GPU levers of the fast path (config group accel; docs/accel.md,
"GPU levers"): ms per image at batch 1 and 8 in float32 and with test.amp for the plain path,
the fast path, each lever alone on it and all together, and torchvision's C4 assembly in
float32 and under float16 autocast, each model's detections checked against the plain path's;
then (unless --no-train) the training rows: ms per step and the step's peak GPU memory in float32
and with solver.amp for plain, fast, fast with each training lever (sync_free, compile) and all,
and torchvision's C4, with the issue's targets (--train-images 2 --image-size 800 1088 for them).

--device cuda: the same report on the GPU. Timings are synchronised (torch.cuda.synchronize
around each), stage times are the GPU time of the kernels launched under each label (the
profiler's CUDA activity), the hardware probe measures float32, TF32 and float16/bfloat16
matrix products and convolutions, and the targets are the GPU's (report.CUDA_TARGETS). The
config's `tf32` setting applies (select_device).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from detection.benchmarking.kernels import print_kernels
from detection.benchmarking.levers import print_levers
from detection.benchmarking.memory import child_main
from detection.benchmarking.onnx_runtime import bench_onnx, print_onnx  # bench_onnx: also this tool's API
from detection.benchmarking.report import print_report, summarize
from detection.benchmarking.suite import run, run_levers
from detection.benchmarking.training_levers import print_training_levers
from detection.cli import add_config_args, parse_command_line, run_tool
from detection.utils.files import atomic_write
from detection.accel import AUTO, COMPILE_MODES, chunk_rois

# what runs this tool again: the memory children (--child)
TOOL = [sys.executable, str(Path(__file__).resolve())]


def _chunk_size(value: str) -> int | str:
    """--chunk-size: "auto" or a number, checked as the fast path checks it (chunk_rois)."""
    size = int(value) if value.lstrip("-").isdigit() else value
    try:
        chunk_rois(size, 1)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return size


def _compile_mode(value: str) -> str | None:
    """--levers-compile: a torch.compile mode, or "off"."""
    if value == "off":
        return None
    if value not in COMPILE_MODES:
        raise argparse.ArgumentTypeError(f"{value!r} is not off or one of {', '.join(COMPILE_MODES)}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    _add_options(p)
    args = parse_command_line(p, argv)
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be >= 1 and --warmup >= 0")
    if args.dataset and args.eval_images is not None:
        p.error("--eval-images sets how many images are generated; with --dataset the whole data set is timed")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no CUDA device (torch.cuda.is_available() is False)")
    if args.levers and args.device != "cuda":
        p.error("--levers measures the GPU levers (config group accel): it needs --device cuda")
    if args.json and not os.access(os.path.dirname(os.path.abspath(args.json)), os.W_OK):
        # said now, not after the whole benchmark (its figures were lost with a traceback)
        p.error(f"--json {args.json}: its folder does not exist or cannot be written")
    if args.kernels and not args.levers:
        p.error("--kernels profiles after the levers' tables: use it with --levers")
    if args.kernels < 0:
        p.error("--kernels must be >= 0")
    if args.onnx and args.device == "cuda":
        p.error("--onnx times ONNX Runtime on the CPU against the fast path there: leave out --device cuda")
    if args.eval_images is None:
        args.eval_images = 4
    elif args.eval_images < 1:
        p.error("--eval-images must be >= 1")
    return args


def _add_options(p: argparse.ArgumentParser) -> None:
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
                   help="also time ONNX Runtime on the exported plain path (detection/export/onnx.py; the export "
                        "extra) against the fast path")
    p.add_argument("--levers", action="store_true",
                   help="only the GPU levers' tables (accel.*: each alone on the fast path, all together, plain, "
                        "torchvision in float32 and float16) at batch 1 and 8, float32 and test.amp, and the "
                        "training step's (unless --no-train); needs --device cuda")
    p.add_argument("--levers-compile", default="default", type=_compile_mode, metavar="MODE",
                   help="the torch.compile mode of --levers' compile rows (default: default; off: leave them out)")
    p.add_argument("--kernels", type=int, default=0, metavar="N",
                   help="with --levers: after its tables, profile one call of the fast path (float32, b1), the "
                        "fast path with every inference lever but compile (test.amp, b1) and one fast training "
                        "step (solver.amp), and print each one's N ops with the most device time (default 0: off)")
    p.add_argument("--child", choices=("plain", "fast", "torchvision"), help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_flush_denormal(True)
    if args.child:
        return child_main(args)

    def save(report: dict) -> None:
        if args.json:
            with atomic_write(args.json) as f:  # a WriteError is one line naming the file
                f.write(json.dumps(report, indent=2, default=float))

    def levers_table_done(report: dict, name: str) -> None:
        """Each levers table printed and saved as it is done (device time is lent in slices)."""
        {"levers": print_levers, "training_levers": print_training_levers, "kernels": print_kernels}[name](report[name])
        sys.stdout.flush()
        save(report)

    def work() -> None:
        if args.levers:
            run_levers(args, argv, levers_table_done)
            return
        report = summarize(run(args, argv, TOOL))
        print_report(report)
        if "onnx" in report:
            print_onnx(report["onnx"])
        save(report)

    return run_tool(work)


if __name__ == "__main__":
    raise SystemExit(main())
