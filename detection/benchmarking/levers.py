"""`tools/benchmark.py --device cuda --levers`: what each GPU lever of the fast path (config group
`accel`, detection/accel/levers.py) buys. Inference milliseconds per image at each batch size, in
float32 and with test.amp, for the plain path, today's fast path, each lever alone on top of it and
all of them together, and torchvision's C4 assembly in float32 and under float16 autocast (its
best precision is the issue's yardstick). Every model's detections are compared with the plain
path's in float32 at the same batch (as sets: `matched_fraction`). The timings are paired: the
models of one precision run back to back, in an order reversed every other round (meters.interleaved).
summarize_levers and print_levers (fed fake timings in the tests) turn the raw runs into the table.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
from typing import Any

import torch
from torch import Tensor, nn

from detection.accel import Levers, optimize_for_inference
from detection.benchmarking.meters import failure_noted, interleaved, log_run, timed
from detection.testing import matched_fraction
from detection.utils.comm import tf32_set

PRECISIONS = ("float32", "amp")
BATCH_SIZES = (1, 8)
TORCHVISION = ("torchvision", "torchvision_fp16")


def lever_settings(compile_mode: str | None) -> dict[str, Levers]:
    """Each lever alone, then all together, and all but cuda_hoist (which changes what res5's
    graph holds and what is compiled: the runner's head, only the trunk); compile_mode None
    leaves torch.compile out."""
    alone = {"cuda_channels_last": Levers(cuda_channels_last=True),
             "sync_free": Levers(sync_free_postprocess=True), "cuda_graphs": Levers(cuda_graphs=True),
             "cuda_hoist": Levers(cuda_hoist=True), "cuda_fused_relu": Levers(cuda_fused_relu=True)}
    if compile_mode is not None:
        alone["compile"] = Levers(compile=compile_mode)
    everything = Levers(cuda_channels_last=True, sync_free_postprocess=True, compile=compile_mode, cuda_graphs=True,
                        cuda_hoist=True, cuda_fused_relu=True)
    return {**{f"fast+{name}": levers for name, levers in alone.items()}, "fast+all": everything,
            "fast+all but cuda_hoist": dataclasses.replace(everything, cuda_hoist=False)}


class Autocast(nn.Module):
    """A detector run under autocast (torchvision's in its best precision), outputs in float32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        device = images[0].device.type
        with torch.autocast(device, self.dtype):
            out = self.model(images)
        return [{k: v.float() if v.is_floating_point() else v for k, v in det.items()} for det in out]


def lever_models(plain: nn.Module, tv: nn.Module | None, precision: str, compile_mode: str | None
                 ) -> dict[str, nn.Module]:
    """name -> model for one precision: plain, fast, fast+each lever, fast+all (with test.amp under
    "amp"); torchvision in float32 and under autocast (float16 on CUDA, bfloat16 on the CPU)."""
    base = copy.deepcopy(plain).eval()
    base.amp = precision == "amp"
    models = {"plain": base, "fast": optimize_for_inference(base)}
    models.update({name: optimize_for_inference(base, levers=levers)
                   for name, levers in lever_settings(compile_mode).items()})
    if tv is not None:
        key = "torchvision" if precision == "float32" else "torchvision_fp16"
        dtype = torch.float16 if next(tv.parameters()).is_cuda else torch.bfloat16
        models[key] = tv if precision == "float32" else Autocast(tv, dtype)
    return models


def _inputs(name: str, images: list[Tensor]) -> list[Tensor]:
    return [img / 255 for img in images] if name in TORCHVISION else images  # torchvision takes 0..1


def measure_precision(models: dict[str, nn.Module], batches: dict[int, list[Tensor]],
                      reference: dict[int, list[dict]], args: argparse.Namespace) -> dict[str, Any]:
    """For each model and batch size: the first call's seconds (where torch.compile compiles),
    the detections of a second call against `reference` (the plain path in float32), and the timed
    runs' seconds per image. The second call runs cuDNN's convolutions without TF32, so the check
    compares the code, not TF32's rounding (the box predictor's matmuls keep the config's tf32; a
    CUDA graph is captured per TF32 setting, so the check replays one captured without). A model
    that raises (a lever never run on this
    GPU) gets {"error": ...} and is left out of the later runs; the others are measured."""
    out: dict[str, Any] = {name: {"first_call_s": {}, "vs_plain": {}, "runs_s": {}} for name in models}
    for size, images in batches.items():
        for name, model in models.items():
            if "error" in out[name]:
                continue
            with torch.inference_mode(), failure_noted(out[name], name):
                seconds = timed(lambda: model(_inputs(name, images)))  # torch.compile compiles here
                with tf32_set(False, matmul=False):  # the check: convolutions without TF32 (CUDA)
                    dets = model(_inputs(name, images))
            if "error" in out[name]:
                continue
            if name == "plain" and size not in reference:
                reference[size] = dets  # float32 runs first: the plain path in float32
            entry = out[name]
            entry["first_call_s"][size] = seconds
            fraction = min(matched_fraction(ref, det) for ref, det in zip(reference[size], dets))
            entry["vs_plain"][size] = {"matched": fraction, "equal": fraction == 1.0 and
                                       [len(d["boxes"]) for d in dets] == [len(d["boxes"]) for d in reference[size]]}
            entry["runs_s"][size] = []
        for run, name, kept in interleaved(models, args.warmup, args.runs):
            if "error" in out[name]:
                continue
            with torch.inference_mode(), failure_noted(out[name], name):
                seconds = timed(lambda: models[name](_inputs(name, images)))
                if kept:
                    out[name]["runs_s"][size].append(seconds / size)
                log_run(f"levers b{size}", run, name, seconds)
    return out


def measure_levers(plain: nn.Module, tv: nn.Module | None, images: list[Tensor], args: argparse.Namespace,
                   batch_sizes: tuple[int, ...] = BATCH_SIZES) -> dict[str, Any]:
    """The raw lever report: per precision, per model, per batch size (images cycled to fill a
    batch). args: runs, warmup, levers_compile (a torch.compile mode or None)."""
    batches = {size: [images[i % len(images)] for i in range(size)] for size in batch_sizes}
    reference: dict[int, list[dict]] = {}
    raw: dict[str, Any] = {"batch_sizes": list(batch_sizes), "compile_mode": args.levers_compile}
    for precision in PRECISIONS:
        models = lever_models(plain, tv, precision, args.levers_compile)
        raw[precision] = measure_precision(models, batches, reference, args)
        del models
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return raw


def summarize_levers(raw: dict[str, Any]) -> dict[str, Any]:
    """Rows (model, precision) with median ms per image per batch size, the first call's seconds,
    the detections' check, and the speed-up over torchvision's best (the faster of its float32
    and float16 runs at that batch size)."""
    sizes = raw["batch_sizes"]
    rows = []
    for precision in PRECISIONS:
        for name, entry in raw.get(precision, {}).items():
            if "error" in entry:
                rows.append({"model": name, "precision": precision, "error": entry["error"]})
                continue
            ms = {size: 1000 * statistics.median(entry["runs_s"][size]) for size in sizes}
            rows.append({"model": name, "precision": precision, "ms_per_image": ms,
                         "first_call_s": entry["first_call_s"], "vs_plain": entry["vs_plain"]})
    best = {}
    for size in sizes:
        tv = [r["ms_per_image"][size] for r in rows if r["model"] in TORCHVISION and "error" not in r]
        best[size] = min(tv) if tv else None
    for row in (r for r in rows if "error" not in r):
        row["speedup_vs_torchvision_best"] = {
            size: (best[size] / row["ms_per_image"][size] if best[size] else None) for size in sizes}
        row["targets_met"] = None if row["model"] in TORCHVISION else _targets_met(row, sizes)
    return {"batch_sizes": sizes, "compile_mode": raw.get("compile_mode"), "torchvision_best_ms": best,
            "rows": rows, "verdicts": lever_verdicts(rows, sizes)}


# issue "GPU speed"'s inference targets: ms per image against torchvision's C4 in its best precision
TARGET_SPEEDUP = {"float32": 1.5, "amp": 3.0}
AMP_MATCHED = 0.95  # with test.amp, the share of the float32 detections kept, per image (worst image)
PAYS = 1.03  # a lever pays when the fast path with it is at least this much faster at every batch size


def _detections_kept(row: dict[str, Any], sizes: list[int]) -> bool:
    """float32: the plain path's detections; test.amp: at least AMP_MATCHED of them on every image."""
    if row["precision"] == "float32":
        return all(row["vs_plain"][s]["equal"] for s in sizes)
    return all(row["vs_plain"][s]["matched"] >= AMP_MATCHED for s in sizes)


def _targets_met(row: dict[str, Any], sizes: list[int]) -> bool | None:
    """The issue's target for the row's precision at every batch size, with the detections kept;
    None without torchvision's timings."""
    speedups = [row["speedup_vs_torchvision_best"][s] for s in sizes]
    if any(x is None for x in speedups):
        return None
    return all(x >= TARGET_SPEEDUP[row["precision"]] for x in speedups) and _detections_kept(row, sizes)


def lever_verdicts(rows: list[dict[str, Any]], sizes: list[int]) -> dict[str, dict[str, Any]]:
    """Per precision, each lever measured alone ("fast+<lever>"): its speed-up over the fast path
    at each batch size, and whether it pays (>= PAYS at every batch size, detections kept)."""
    found = {(r["model"], r["precision"]): r for r in rows if "error" not in r}
    verdicts: dict[str, dict[str, Any]] = {}
    for precision in PRECISIONS:
        fast = found.get(("fast", precision))
        for (model, p), row in found.items():
            lever = model.removeprefix("fast+")
            if p != precision or fast is None or lever == model or lever.startswith("all"):
                continue
            ratio = {s: fast["ms_per_image"][s] / row["ms_per_image"][s] for s in sizes}
            pays = all(r >= PAYS for r in ratio.values()) and _detections_kept(row, sizes)
            verdicts.setdefault(precision, {})[lever] = {"speedup_vs_fast": ratio, "pays": pays}
    return verdicts


def print_levers(summary: dict[str, Any]) -> None:
    sizes = summary["batch_sizes"]
    print(f"GPU levers: inference ms per image (median), speed-up over torchvision's best precision, "
          f"detections vs the float32 plain path (matched fraction, worst image); compile mode "
          f"{summary['compile_mode']}")
    head = "".join(f"{'b' + str(s) + ' ms':>9}{'x tv':>7}" for s in sizes)
    print(f"{'model':<24}{'precision':<10}{head}  {'same detections':<22}{'first call s':<14}targets")
    for row in summary["rows"]:
        if "error" in row:
            print(f"{row['model']:<24}{row['precision']:<10}FAILED: {row['error']}")
            continue
        cells = "".join(f"{row['ms_per_image'][s]:>9.2f}{_fmt(row['speedup_vs_torchvision_best'][s]):>7}"
                        for s in sizes)
        same = " ".join(f"{'yes' if row['vs_plain'][s]['equal'] else 'no'}({row['vs_plain'][s]['matched']:.2f})"
                        for s in sizes)
        first = " ".join(f"{row['first_call_s'][s]:.1f}" for s in sizes)
        met = {None: "-", True: "met", False: "not met"}[row.get("targets_met")]
        print(f"{row['model']:<24}{row['precision']:<10}{cells}  {same:<22}{first:<14}{met}")
    print(f"targets: >= {TARGET_SPEEDUP['float32']}x torchvision's best in float32 with the plain path's "
          f"detections, >= {TARGET_SPEEDUP['amp']}x with test.amp keeping >= {AMP_MATCHED:.0%} of them, "
          f"at every batch size")
    for precision, levers in summary.get("verdicts", {}).items():
        cells = ", ".join(name + "".join(f" {v['speedup_vs_fast'][s]:.2f}" for s in sizes)
                          + (" pays" if v["pays"] else "") for name, v in levers.items())
        print(f"each lever over the fast path ({precision}, x at {', '.join(f'b{s}' for s in sizes)}; pays: "
              f">= {PAYS}x at every batch size, detections kept): {cells}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
