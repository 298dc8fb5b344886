"""The training rows of `tools/benchmark.py --device cuda --levers`: ms per SGD step (forward,
backward, update through the trainer's own functions, models.train_step) and the step's peak GPU
memory, in float32 and with solver.amp, for the plain path, today's fast path (as the trainer sets
it up), the fast path with each training lever (training_plan: sync_free_postprocess, compile) and
with all of them, and torchvision's C4 assembly. The issue's targets: with solver.amp >= 2x
torchvision's AMP step, in float32 >= 1.5x its float32 step, peak memory <= torchvision's. The
models of one precision run back to back in an order reversed every other round
(meters.interleaved); lr 0, so every run does the same work. summarize_training_levers and
print_training_levers (fed fake timings in the tests) turn the raw runs into the table.
"""
from __future__ import annotations

import argparse
import copy
import statistics
from typing import Any

import torch
from torch import nn

from detection.accel import Levers, optimize_for_training
from detection.benchmarking.meters import TimeMeter, failure_noted, gpu_peak, interleaved, log_run, timed
from detection.benchmarking.models import bench_state, settle_loss_scale, synthetic_batch, train_step
from detection.benchmarking.training import train_inputs
from detection.config import Config

PRECISIONS = ("float32", "amp")
TORCHVISION = "torchvision"
# the speed targets: torchvision's step over ours, per precision (memory: ours <= its)
TARGETS = {"float32": 1.5, "amp": 2.0}


def training_lever_settings(compile_mode: str | None) -> dict[str, Levers]:
    """The levers that act in training (training_plan), each alone, then all together."""
    alone = {"sync_free": Levers(sync_free_postprocess=True)}
    if compile_mode is not None:
        alone["compile"] = Levers(compile=compile_mode)
    everything = Levers(sync_free_postprocess=True, compile=compile_mode)
    return {**{f"fast+{name}": levers for name, levers in alone.items()}, "fast+all": everything}


def training_lever_models(plain: nn.Module, tv: nn.Module | None, compile_mode: str | None
                          ) -> dict[str, nn.Module]:
    """name -> a train-mode copy: plain, fast as the trainer sets it up (channels_last), fast with
    each lever and all of them, torchvision's C4."""
    def fast(levers: Levers = Levers()) -> nn.Module:
        return optimize_for_training(copy.deepcopy(plain).train(), channels_last=True, levers=levers)

    models = {"plain": copy.deepcopy(plain).train(), "fast": fast()}
    models.update({name: fast(levers) for name, levers in training_lever_settings(compile_mode).items()})
    if tv is not None:
        models[TORCHVISION] = copy.deepcopy(tv).train()
    return models


def measure_training_precision(cfg: Config, models: dict[str, nn.Module], images: list, targets: list,
                               amp: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Per model: the first step's seconds (torch.compile compiles there), the timed steps'
    seconds and on CUDA the largest step peak (MiB above what was allocated before the step). A
    model whose step raises gets {"error": ...} and is left out of the later steps."""
    s, device = cfg.solver, images[0].device
    states = {name: bench_state(m, s.momentum, s.weight_decay, ours=name != TORCHVISION, amp=amp)
              for name, m in models.items()}
    out: dict[str, Any] = {name: {"runs_s": []} for name in models}
    for name, state in states.items():
        torch.manual_seed(0)
        with failure_noted(out[name], name):
            out[name]["first_step_s"] = timed(
                lambda: train_step(state, train_inputs(name, images), targets, TimeMeter(), amp=amp))
            settle_loss_scale(state, lambda: train_step(state, train_inputs(name, images), targets, TimeMeter(),
                                                        amp=amp))
    for run, name, kept in interleaved(models, args.warmup, args.runs):
        if "error" in out[name]:
            continue
        torch.manual_seed(run)  # the same RPN / RoI samples for every model
        meter, entry = TimeMeter(), out[name]
        with failure_noted(entry, name), gpu_peak(entry, device.type == "cuda"):
            train_step(states[name], train_inputs(name, images), targets, meter, amp=amp)
            if kept:
                entry["runs_s"].append(sum(meter.values.values()))
            log_run(f"training levers {'amp' if amp else 'float32'}", run, name, sum(meter.values.values()))
    return out


def measure_training_levers(cfg: Config, plain: nn.Module, tv: nn.Module | None,
                            args: argparse.Namespace) -> dict[str, Any]:
    """The raw training rows: per precision, per model. args: train_images, image_size, runs,
    warmup, levers_compile."""
    device = next(plain.parameters()).device
    images, targets = synthetic_batch(args.train_images, tuple(args.image_size), cfg.model.num_classes,
                                      device=device)
    raw: dict[str, Any] = {"compile_mode": args.levers_compile, "images_per_step": len(images),
                           "image_size": list(args.image_size),
                           "rois_per_image": cfg.model.roi_heads.batch_size_per_image}
    for precision in PRECISIONS:
        models = training_lever_models(plain, tv, args.levers_compile)
        raw[precision] = measure_training_precision(cfg, models, images, targets, precision == "amp", args)
        del models
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return raw


def summarize_training_levers(raw: dict[str, Any]) -> dict[str, Any]:
    """Rows (model, precision): median ms per step, the first step's seconds, the step's peak MiB,
    torchvision's step time (same precision) over the row's, the row's peak over torchvision's, and
    whether the row meets the issue's targets for its precision."""
    rows = []
    for precision in PRECISIONS:
        entries = raw.get(precision, {})
        tv = entries.get(TORCHVISION)
        tv = None if tv is None or "error" in tv else tv
        tv_ms = 1000 * statistics.median(tv["runs_s"]) if tv else None
        tv_mb = tv.get("step_peak_mb") if tv else None
        for name, entry in entries.items():
            if "error" in entry:
                rows.append({"model": name, "precision": precision, "error": entry["error"]})
                continue
            ms, mb = 1000 * statistics.median(entry["runs_s"]), entry.get("step_peak_mb")
            speedup = tv_ms / ms if tv_ms else None
            memory = mb / tv_mb if mb is not None and tv_mb else None
            met = None if speedup is None else speedup >= TARGETS[precision] and (memory is None or memory <= 1.0)
            rows.append({"model": name, "precision": precision, "ms_per_step": ms,
                         "first_step_s": entry["first_step_s"], "step_peak_mb": mb, "speedup_vs_torchvision": speedup,
                         "memory_vs_torchvision": memory, "targets_met": met})
    keys = ("compile_mode", "images_per_step", "image_size", "rois_per_image")
    return {**{k: raw.get(k) for k in keys}, "targets": TARGETS, "rows": rows}


def print_training_levers(summary: dict[str, Any]) -> None:
    print(f"GPU levers, training: ms per step (median; {summary['images_per_step']} images of "
          f"{'x'.join(map(str, summary['image_size']))}, {summary['rois_per_image']} RoIs each), peak MiB of the "
          f"step, torchvision's step over ours in the same precision (targets: float32 >= "
          f"{TARGETS['float32']}x, amp >= {TARGETS['amp']}x, memory <= 1.00x); compile mode {summary['compile_mode']}")
    print(f"{'model':<24}{'precision':<10}{'ms':>9}{'x tv':>7}{'peak MiB':>10}{'mem/tv':>8}  "
          f"{'targets':<9}first step s")
    for row in summary["rows"]:
        if "error" in row:
            print(f"{row['model']:<24}{row['precision']:<10}FAILED: {row['error']}")
            continue
        met = {None: "-", True: "met", False: "not met"}[row["targets_met"]]
        print(f"{row['model']:<24}{row['precision']:<10}{row['ms_per_step']:>9.1f}"
              f"{_fmt(row['speedup_vs_torchvision']):>7}{_fmt(row['step_peak_mb'], 0):>10}"
              f"{_fmt(row['memory_vs_torchvision']):>8}  {met:<9}{row['first_step_s']:.1f}")


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
