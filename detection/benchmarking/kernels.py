"""`tools/benchmark.py --levers --kernels N`: where one call's time goes, op by op, for the next
lever to aim at. After the levers' tables, torch.profiler records one call (after a warm-up call)
of: the fast path in float32 at batch 1 (today's default), the fast path with every inference
lever under test.amp at batch 1, and one fast training step under solver.amp (2 images as
--train-images says). For each: the N ops (aten ops and the project's record_function stages)
with the most self time on the device (on the CPU: self CPU time), their calls, and the whole
call's device time, host time and kernel launches (a host-bound call launches many small kernels:
its device time is far below its host time), and the call's host reads (`detection.testing.HostReads`,
counted in one more call: each waits for the GPU) with the project's lines that ask most."""
from __future__ import annotations

import argparse
import copy
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from detection.accel import Levers, optimize_for_inference, optimize_for_training
from detection.benchmarking.meters import TimeMeter, failure_noted
from detection.benchmarking.models import bench_state, settle_loss_scale, synthetic_batch, train_step
from detection.config import Config
from detection.testing import HostReads

ALL_INFERENCE = Levers(cuda_channels_last=True, sync_free_postprocess=True, cuda_graphs=True, cuda_hoist=True,
                       cuda_fused_relu=True)  # compile left out: its first call compiles for minutes


def _self_device_us(event: Any) -> float:
    """An averaged event's self time on the device in microseconds (the attribute's name changed
    from self_cuda_time_total to self_device_time_total across PyTorch versions)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def top_ops(fn: Callable[[], Any], device_type: str, count: int) -> dict[str, Any]:
    """fn() once to warm up, then once under torch.profiler: the `count` ops with the most self
    device time (self CPU time on the CPU), the call's host milliseconds, its device milliseconds
    (the ops' self device time summed) and its launches (launch_counts: the runtime's kernel
    launch calls, cudaLaunchKernel and Triton's cuLaunchKernel, and its CUDA-graph replays,
    cudaGraphLaunch, each of which runs a captured graph's kernels in one call); then once more
    counting its host reads (`host_reads`, and the 5 places with the most)."""
    cuda = device_type == "cuda"
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    host_ms = 1000 * (time.perf_counter() - start)
    events = prof.key_averages()
    ops = [e for e in events if e.device_type == DeviceType.CPU and "LaunchKernel" not in e.key]

    def weight(e: Any) -> float:
        return _self_device_us(e) if cuda else float(e.self_cpu_time_total)

    top = sorted(ops, key=weight, reverse=True)[:count]
    with HostReads() as reads:  # outside the profile: the mode's Python call per op costs host time
        fn()
    return {"host_ms": host_ms, "device_ms": sum(_self_device_us(e) for e in ops) / 1000,
            "host_reads": reads.count, "host_read_places": reads.places.most_common(5),
            **launch_counts(events),
            "ops": [{"name": e.key, "calls": e.count, "self_device_ms": _self_device_us(e) / 1000,
                     "self_cpu_ms": e.self_cpu_time_total / 1000} for e in top]}


def profile_kernels(cfg: Config, plain: nn.Module, images: list[torch.Tensor], args: argparse.Namespace
                    ) -> dict[str, Any]:
    """The three profiles (module docstring), each {"error": ...} if it raises; `plain` is the
    float32 plain model on its device, `images` the benchmark's (the first is used at batch 1)."""
    device = next(plain.parameters()).device
    count, out = args.kernels, {}

    def inference(amp: bool, levers: Levers) -> Callable[[], Any]:
        base = copy.deepcopy(plain).eval()
        base.amp = amp
        model = optimize_for_inference(base, levers=levers)

        def call() -> Any:
            with torch.inference_mode():
                return model(images[:1])
        return call

    def training() -> Callable[[], Any]:
        model = optimize_for_training(copy.deepcopy(plain).train(), channels_last=True)
        state = bench_state(model, cfg.solver.momentum, cfg.solver.weight_decay, ours=True, amp=True)
        batch, targets = synthetic_batch(args.train_images, tuple(args.image_size), cfg.model.num_classes,
                                         device=device)

        def call() -> None:
            torch.manual_seed(0)
            train_step(state, batch, targets, TimeMeter(), amp=True)
        settle_loss_scale(state, call)  # the profiled step an update, not a skipped one
        return call

    for name, make in (("inference fast float32 b1", lambda: inference(False, Levers())),
                       ("inference fast+all amp b1", lambda: inference(True, ALL_INFERENCE)),
                       ("training step fast amp", training)):
        out[name] = {}
        with failure_noted(out[name], name):
            out[name] = top_ops(make(), device.type, count)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def launch_counts(events: Any) -> dict[str, int]:
    """{"launches": kernel launch calls (cudaLaunchKernel, cudaLaunchKernelExC, Triton's
    cuLaunchKernel), "graph_launches": CUDA-graph replays (cudaGraphLaunch)} among the profiler's
    averaged events (key, count)."""
    return {"launches": sum(e.count for e in events if "LaunchKernel" in e.key),
            "graph_launches": sum(e.count for e in events if "GraphLaunch" in e.key)}


def print_kernels(report: dict[str, Any]) -> None:
    for name, entry in report.items():
        if "error" in entry:
            print(f"profile of {name}: FAILED: {entry['error']}")
            continue
        print(f"profile of {name}: {entry['host_ms']:.1f} ms on the host, {entry['device_ms']:.1f} ms of ops on "
              f"the device, {entry['launches']} kernel launches"
              + (f" and {entry['graph_launches']} CUDA-graph replays" if entry.get("graph_launches") else "")
              + "; the ops with the most self time:")
        print(f"  {'op':<48}{'calls':>7}{'device ms':>11}{'cpu ms':>9}")
        for op in entry["ops"]:
            print(f"  {op['name'][:47]:<48}{op['calls']:>7}{op['self_device_ms']:>11.2f}{op['self_cpu_ms']:>9.2f}")
        places = ", ".join(f"{place} x{n}" for place, n in entry["host_read_places"])
        print(f"  {entry['host_reads']} host reads (each waits for the device); the most: {places or '-'}")
