"""The whole benchmark of tools/benchmark.py in order: the machine's peak, inference,
optionally ONNX Runtime, training, peak memory, the data loader and evaluation; the raw
report that report.summarize completes."""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any, Callable, Sequence

import torch

from detection.benchmarking.data import bench_eval, bench_loader, datasets
from detection.benchmarking.hardware import hardware_throughput
from detection.benchmarking.inference import bench_inference, inference_variants
from detection.benchmarking.kernels import profile_kernels
from detection.benchmarking.levers import BATCH_SIZES, measure_levers, summarize_levers
from detection.benchmarking.memory import bench_gpu_memory, bench_memory, child_argv
from detection.benchmarking.models import bench_config, build_bench_model, build_torchvision_c4, synthetic_batch
from detection.benchmarking.onnx_runtime import bench_onnx
from detection.benchmarking.training import bench_training
from detection.benchmarking.training_levers import measure_training_levers, summarize_training_levers
from detection.config import Config
from detection.utils.comm import select_device


def run(args: argparse.Namespace, argv: list[str], tool: Sequence[str]) -> dict[str, Any]:
    """Every section the options ask for. argv: the tool's command line (reported, and given
    again to the memory children); tool: the command that runs the tool (python and its path)."""
    cfg = bench_config(args)
    device = select_device(args.device, cfg.tf32)
    report = _header(args, argv, cfg, device)
    report["hardware"] = hardware_throughput(args.quick, device.type)
    plain = build_bench_model(cfg, args)
    tv = build_torchvision_c4(plain, cfg).to(device) if args.compare_torchvision else None
    plain = plain.to(device)
    images, _ = synthetic_batch(1, tuple(args.image_size), cfg.model.num_classes, device=device)
    report["inference"] = bench_inference(inference_variants(plain, tv, args), images, args)
    if args.onnx:
        report["onnx"] = bench_onnx(plain, images, args)
    if not args.no_train:
        report["training"] = bench_training(cfg, plain, tv, args)
    if not args.no_memory:
        kinds = ["plain", "fast"] + (["torchvision"] if tv is not None else [])
        report["memory"] = (bench_gpu_memory(args, kinds) if device.type == "cuda"
                            else bench_memory(args, [*tool, *child_argv(argv)], kinds))
        report["memory_proposals"] = args.memory_proposals
    if not args.no_data:
        with tempfile.TemporaryDirectory() as tmp:
            train_ds, val_ds = datasets(cfg, args, tmp)
            report["data_loader"] = bench_loader(cfg, train_ds, args)
            report["evaluation"] = bench_eval(args, val_ds)
    report["loadavg_end"] = os.getloadavg()
    return report


def run_levers(args: argparse.Namespace, argv: list[str],
               section_done: Callable[[dict[str, Any], str], None] | None = None) -> dict[str, Any]:
    """--levers: the header and the GPU levers' tables, inference (detection/benchmarking/levers.py)
    and, unless --no-train, training (training_levers.py), with torchvision's C4 assembly as the
    yardstick, and with --kernels N the op profiles (kernels.py); no other section.
    section_done(report, name) is called as each table is done ("levers", "training_levers",
    "kernels"), so a later failure or a time limit keeps the earlier ones."""
    cfg = bench_config(args)
    device = select_device(args.device, cfg.tf32)
    report = _header(args, argv, cfg, device)
    plain = build_bench_model(cfg, args)
    tv = build_torchvision_c4(plain, cfg).to(device).eval()
    images, _ = synthetic_batch(max(BATCH_SIZES), tuple(args.image_size), cfg.model.num_classes, device=device)
    raw = measure_levers(plain.to(device), tv, images, args)
    report["levers"] = summarize_levers(raw)
    if section_done:
        section_done(report, "levers")
    if not args.no_train:  # the training rows (training_levers.py)
        report["training_levers"] = summarize_training_levers(measure_training_levers(cfg, plain, tv, args))
        if section_done:
            section_done(report, "training_levers")
    if getattr(args, "kernels", 0):  # where one call's time goes (kernels.py)
        report["kernels"] = profile_kernels(cfg, plain, images, args)
        if section_done:
            section_done(report, "kernels")
    return report


def _header(args: argparse.Namespace, argv: list[str], cfg: Config, device: torch.device) -> dict[str, Any]:
    """What ran where: the command, image size, proposals, weights, threads, the load average."""
    report: dict[str, Any] = {"command": " ".join(["python", "tools/benchmark.py", *argv]),
                              "image_size": args.image_size, "proposals": cfg.model.rpn.post_nms_topk_test,
                              "weights": args.weights or "random (sane)", "threads": torch.get_num_threads(),
                              "cpu_count": os.cpu_count(), "torch": torch.__version__,
                              "device": device.type, "loadavg_start": os.getloadavg()}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
        report["tf32"] = cfg.tf32
    return report
