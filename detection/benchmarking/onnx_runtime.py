"""The --onnx section: ONNX Runtime running the exported plain path (detection/export/onnx.py)
against the fast path in PyTorch, and its printed lines."""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from detection.benchmarking.meters import interleaved, log_run, timed_cpu
from detection.accel import optimize_for_inference
from detection.testing import compare_detections


def bench_onnx(plain: torch.nn.Module, images: list[torch.Tensor], args: argparse.Namespace) -> dict[str, Any]:
    """ONNX Runtime running the exported plain path (detection/export/onnx.py) against the fast path
    (PyTorch), interleaved, on the same image with the same number of threads; per image, end
    to end (ONNX: OnnxDetector, its preprocessing and session.run; PyTorch: model(images)). Also whether each gives
    the plain path's detections."""
    from detection.export.onnx import BOX_TOLERANCE, SCORE_TOLERANCE, OnnxDetector, export_onnx

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
                                                                    score_tolerance=SCORE_TOLERANCE)}
                               for name, fn in runners.items()}
        for run, name, kept in interleaved(runners, args.warmup, args.runs):
            seconds, cpu = (t / len(images) for t in timed_cpu(runners[name]))
            if kept:
                out[name]["end_to_end_s"].append(seconds)
                out[name]["end_to_end_cpu_s"].append(cpu)
            log_run("onnx", run, name, seconds)
    for entry in out.values():
        entry["end_to_end_median_s"] = statistics.median(entry["end_to_end_s"])
        entry["end_to_end_cpu_median_s"] = statistics.median(entry["end_to_end_cpu_s"])
    out["threads"] = torch.get_num_threads()
    return out


def print_onnx(onnx: dict[str, Any]) -> None:
    fast, ort = onnx["fast"], onnx["onnxruntime"]
    print(f"\nONNX Runtime vs the fast path ({onnx['threads']} threads, per image, median):")
    for name, entry in (("fast path (PyTorch)", fast), ("onnxruntime (plain path exported)", ort)):
        same = "equal" if entry["vs_plain"]["equal"] else "NOT EQUAL"
        print(f"  {name:36s} {entry['end_to_end_median_s']:.3f} s (CPU {entry['end_to_end_cpu_median_s']:.3f} s)"
              f"   detections vs plain: {same} ({entry['vs_plain']['other_detections']} detections)")
    print(f"  onnxruntime / fast: {ort['end_to_end_median_s'] / fast['end_to_end_median_s']:.2f}x the time")
