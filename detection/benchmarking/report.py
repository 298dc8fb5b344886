"""Medians, ratios against the targets, and the printed table of tools/benchmark.py."""
from __future__ import annotations

import statistics
from typing import Any

from detection.benchmarking.models import STAGES

# The CPU's targets: the float32 fast path against torchvision's float32 C4, the bfloat16 fast
# path (test.amp) against the same and against the float32 fast path, a training step, and peak
# memory at --memory-proposals (1000).
TARGETS = {"inference_speedup": (">=", 2.0), "inference_speedup_bf16": (">=", 3.2),
           "bf16_vs_fp32_fast": (">=", 1.6), "training_speedup": (">=", 2.0), "memory_ratio": ("<=", 0.5)}
# On CUDA (--device cuda): the default fast path never slower than the plain one; against
# torchvision's C4 in float32 and with float16 test.amp / solver.amp (the README's GPU speed
# targets); training memory as the step's peak above what was allocated before it.
CUDA_TARGETS = {"inference_speedup_fast_vs_plain": (">=", 1.0), "inference_speedup": (">=", 1.5),
                "inference_speedup_fp16": (">=", 3.0), "training_speedup": (">=", 1.5),
                "training_speedup_amp": (">=", 2.0), "training_memory_ratio": ("<=", 1.0)}


# Targets between our own two paths: comparable when the fast path gives the plain path's
# detections, whatever torchvision did (the others need torchvision's equal work)
OWN_TARGETS = frozenset({"inference_speedup_fast_vs_plain"})


def targets_for(report: dict[str, Any]) -> dict[str, tuple[str, float]]:
    return CUDA_TARGETS if report.get("device") == "cuda" else TARGETS
EQUAL_WORK_TOLERANCE = 0.10


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def conv_peak_gflops(hardware: dict[str, float]) -> float:
    """The best measured 3x3 convolution throughput (NCHW or channels_last; on CUDA also TF32,
    float16 and bfloat16): the reference for each stage's achieved rate, since the stages that
    count are convolutions."""
    return max(v for k, v in hardware.items() if k.startswith("conv3x3"))


def _summarize_inference(inference: dict[str, Any], conv_gflops: float) -> None:
    for entry in inference.values():
        entry["end_to_end_median_s"] = _median(entry["end_to_end_s"])
        entry["end_to_end_cpu_median_s"] = _median(entry["end_to_end_cpu_s"])
        entry["stages_median_s"] = {s: _median(entry["stages_s"].get(s, [])) for s in STAGES}
        entry["total_gflop"] = sum(entry["flops"].values()) / 1e9
        rates = {s: entry["flops"].get(s, 0.0) / 1e9 / t if t > 0 else 0.0
                 for s, t in entry["stages_median_s"].items()}
        entry["stages_gflops_per_s"] = rates
        entry["stages_fraction_of_conv_peak"] = {s: r / conv_gflops for s, r in rates.items()}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _paired(slow: list[float] | None, fast: list[float] | None) -> float | None:
    """Median over runs of slow[i] / fast[i]: the two ran back to back in run i, so a change
    of the machine's load between runs cancels out."""
    if not slow or not fast:
        return None
    return statistics.median(a / b for a, b in zip(slow, fast))


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Adds medians, FLOP rates, the equal-work check and the ratios (with their targets)."""
    inference = report["inference"]
    _summarize_inference(inference, conv_peak_gflops(report["hardware"]))
    ratios: dict[str, Any] = {"inference_speedup_fast_vs_plain": _paired(inference["plain"]["end_to_end_s"],
                                                                         inference["fast"]["end_to_end_s"])}
    amp = next((n for n in ("fast_bf16", "fast_fp16") if n in inference), None)  # test.amp: CPU, CUDA
    if amp:
        ratios[f"{amp[5:]}_vs_fp32_fast"] = _paired(inference["fast"]["end_to_end_s"], inference[amp]["end_to_end_s"])
    for entry in report.get("training", {}).values():
        entry["iteration_median_s"] = _median(entry["iteration_s"])
        entry["iteration_cpu_median_s"] = _median(entry["iteration_cpu_s"])
        entry["parts_median_s"] = {k: _median(v) for k, v in entry["parts_s"].items()}
    memory = {n: e.get("max_gpu_mb", e.get("max_rss_mb")) for n, e in report.get("memory", {}).items()}
    ratios["training_speedup_fast_vs_plain"] = _paired(report.get("training", {}).get("plain", {}).get("iteration_s"),
                                                       report.get("training", {}).get("fast", {}).get("iteration_s"))
    ratios["training_speedup_amp_vs_fast"] = _paired(report.get("training", {}).get("fast", {}).get("iteration_s"),
                                                      report.get("training", {}).get("fast_amp", {}).get("iteration_s"))
    ratios["memory_ratio_fast_vs_plain"] = _ratio(memory.get("fast"), memory.get("plain"))
    if "torchvision" in inference:
        ratios.update(_torchvision_ratios(report, amp, memory))
        report["equal_work"] = _equal_work(report)
        report["targets_met"] = targets_met(ratios, report["equal_work"]["ok"], targets_for(report))
        for key in OWN_TARGETS & report["targets_met"].keys():
            report["targets_met"][key] = _meets(ratios.get(key), *targets_for(report)[key]) \
                if _comparable(report, key) else None
    report["ratios"] = ratios
    loads = [v for part in ("inference", "training") for e in report.get(part, {}).values()
             for v in e.get("loadavg", [])]
    report["max_loadavg_during_runs"] = max(loads, default=0.0)
    half = 0.5 * report["cpu_count"]
    report["busy"] = report["loadavg_start"][0] > half or report["max_loadavg_during_runs"] > report["threads"] + half
    return report


def _torchvision_ratios(report: dict[str, Any], amp: str | None, memory: dict[str, float | None]
                        ) -> dict[str, float | None]:
    """The fast path against torchvision's C4: inference (paired, of medians, of CPU times, and
    the test.amp variant's), training (on CUDA also the AMP steps and their peak memory), memory."""
    inference, training = report["inference"], report.get("training", {})
    runs = {n: e["end_to_end_s"] for n, e in inference.items()}
    train_runs = {n: e["iteration_s"] for n, e in training.items()}
    train = {n: e["iteration_median_s"] for n, e in training.items()}
    step_peak = {n: e.get("step_peak_mb") for n, e in training.items()}
    ratios = {"inference_speedup": _paired(runs["torchvision"], runs["fast"]),
              "inference_speedup_of_medians": _ratio(inference["torchvision"]["end_to_end_median_s"],
                                                     inference["fast"]["end_to_end_median_s"])}
    if amp:
        ratios[f"inference_speedup_{amp[5:]}"] = _paired(runs["torchvision"], runs[amp])
    ratios["training_speedup"] = _paired(train_runs.get("torchvision"), train_runs.get("fast"))
    if "torchvision_amp" in train_runs:  # CUDA: AMP steps against each other
        ratios["training_speedup_amp"] = _paired(train_runs["torchvision_amp"], train_runs.get("fast_amp"))
        ratios["training_memory_ratio"] = _ratio(step_peak.get("fast_amp"), step_peak.get("torchvision_amp"))
    ratios["training_speedup_of_medians"] = _ratio(train.get("torchvision"), train.get("fast"))
    ratios["memory_ratio"] = _ratio(memory.get("fast"), memory.get("torchvision"))
    cpu = {n: e["end_to_end_cpu_median_s"] for n, e in inference.items()}
    ratios["inference_speedup_cpu_time"] = _ratio(cpu["torchvision"], cpu["fast"])
    cpu = {n: e["iteration_cpu_median_s"] for n, e in training.items()}
    ratios["training_speedup_cpu_time"] = _ratio(cpu.get("torchvision"), cpu.get("fast"))
    return ratios


def _meets(value: float | None, op: str, target: float) -> bool | None:
    if value is None:
        return None
    return value >= target if op == ">=" else value <= target


def targets_met(ratios: dict[str, Any], equal_work: bool, targets: dict[str, tuple[str, float]] = TARGETS
                ) -> dict[str, bool | None]:
    """Each target: True / False, or None when there is no number or when the two models did
    not do the same work (a speed ratio of unequal work says nothing about the code)."""
    return {k: _meets(ratios.get(k), *targets[k]) if equal_work else None for k in targets}


def target_verdict(report: dict[str, Any], key: str) -> str:
    """What the report prints for one target: met, NOT met, - (not measured), or not
    comparable (the models did unequal work)."""
    if not _comparable(report, key):
        return "not comparable"
    met = report["targets_met"][key]
    return "-" if met is None else "met" if met else "NOT met"


def _comparable(report: dict[str, Any], key: str) -> bool:
    """Whether target `key`'s ratio says something about the code: for OWN_TARGETS the fast path
    gave the plain path's detections; for the others torchvision did our plain path's work."""
    if key in OWN_TARGETS:
        return bool(report["inference"]["fast"].get("vs_plain", {}).get("equal"))
    return report["equal_work"]["ok"]


def _equal_work(report: dict[str, Any]) -> dict[str, Any]:
    """Our plain path and torchvision: total FLOPs within 10% (inference, and training if run),
    the same proposals (the RoIs the box head runs on; FLOPs could hide different ones) and the
    same number of detections (postprocessing work). The fast path's hoisting does less work
    on purpose."""
    inf = report["inference"]
    tv = inf["torchvision"].get("vs_plain", {})
    out = {"inference_flops_ratio": inf["plain"]["total_gflop"] / inf["torchvision"]["total_gflop"],
           "num_rois": {"plain": inf["plain"]["num_rois"], "torchvision": inf["torchvision"]["num_rois"]},
           "num_detections": {"plain": tv.get("detections"), "torchvision": tv.get("other_detections")},
           "same_detections": tv.get("equal"),
           "same_proposals": tv.get("proposals", {}).get("equal"),
           "fast_gflop": inf["fast"]["total_gflop"]}
    if "training" in report:
        t = report["training"]
        out["training_flops_ratio"] = t["plain"]["flops"] / t["torchvision"]["flops"]
        out["fast_training_gflop"] = t["fast"]["flops"] / 1e9
    ratios = [v for k, v in out.items() if k.endswith("flops_ratio")]
    out["ok"] = (all(abs(r - 1) <= EQUAL_WORK_TOLERANCE for r in ratios)
                 and out["num_rois"]["plain"] == out["num_rois"]["torchvision"]
                 and out["num_detections"]["plain"] == out["num_detections"]["torchvision"]
                 and out["same_proposals"] is True)
    return out


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_report(report: dict[str, Any]) -> None:
    hw = report["hardware"]
    print(f"command: {report['command']}")
    print(f"image {report['image_size'][0]}x{report['image_size'][1]}, {report['proposals']} proposals, "
          f"weights {report['weights']}, {report['threads']} threads, "
          f"load average {tuple(round(v, 2) for v in report['loadavg_start'])} at start, "
          f"{tuple(round(v, 2) for v in report['loadavg_end'])} at end")
    if report["busy"]:
        print(f"warning: other processes were running (1-min load {report['loadavg_start'][0]:.1f} at start, "
              f"up to {report['max_loadavg_during_runs']:.1f} during runs, which includes this benchmark's "
              f"{report['threads']} threads): expect noise; ratios are medians of back-to-back pairs")
    if report.get("device") == "cuda":
        print(f"device: {report.get('gpu', 'cuda')} (tf32 {'on' if report.get('tf32') else 'off'}); stage times "
              "are the GPU time of each stage's kernels")
    for suffix in ("", "_tf32", "_fp16", "_bf16"):
        if f"matmul{suffix}_gflops" in hw:
            print(f"hardware{suffix.replace('_', ' ')}: matmul {hw[f'matmul{suffix}_gflops']:.1f} GFLOP/s, 3x3 conv "
                  f"{hw[f'conv3x3{suffix}_gflops']:.1f} (channels_last {hw[f'conv3x3_channels_last{suffix}_gflops']:.1f})")
    print(f"the stages' rates are fractions of the best conv rate, {conv_peak_gflops(hw):.1f} GFLOP/s")
    _print_inference(report["inference"])
    if "training" in report:
        print("\ntraining iteration (median s): " + ", ".join(
            f"{n} {e['iteration_median_s']:.3f} (CPU {e['iteration_cpu_median_s']:.1f}, GFLOP {e['flops'] / 1e9:.0f})"
            for n, e in report["training"].items() if e["iteration_s"]))
        if "fast_amp" not in report["training"]:
            print("no fast_amp row: on a CPU without bfloat16 instructions solver.amp trains in float32 (PyTorch "
                  "emulates bfloat16 there, several times slower)")
        peaks = {n: e["step_peak_mb"] for n, e in report["training"].items() if "step_peak_mb" in e}
        if peaks:
            print("training step's peak GPU memory above the resident (MB): "
                  + ", ".join(f"{n} {v:.0f}" for n, v in peaks.items()))
    if "memory" in report:
        gpu = any("max_gpu_mb" in e for e in report["memory"].values())
        print(f"peak {'GPU memory' if gpu else 'RSS'} at {report['memory_proposals']} proposals (MB): " + ", ".join(
            f"{n} {e['max_gpu_mb' if gpu else 'max_rss_mb']:.0f}" for n, e in report["memory"].items()))
    if "data_loader" in report:
        _print_data(report["data_loader"], report["evaluation"])
    print_ratios(report)


def _print_data(d: dict[str, Any], ev: dict[str, Any]) -> None:
    print(f"data loader: {d['images_per_s']:.1f} images/s ({d['num_workers']} workers, "
          f"batch {d['images_per_batch']}); evaluation: {ev['per_image_s']:.3f} s/image "
          f"over {ev['images']} images, metrics {ev['metrics_s']:.3f} s")
    if "model_s" in ev:
        print(f"evaluation time: {ev['images_per_s']:.2f} images/s; model {ev['model_s']:.2f} s, scoring "
              f"and files {ev['metrics_s']:.2f} s, reading images and the loop {ev['other_s']:.2f} s "
              f"({100 * ev['outside_model_share']:.0f}% outside the model; {ev.get('num_workers', 0)} loader "
              f"workers, {ev.get('passes_per_image', 1)} passes per image, {'test.amp' if ev.get('amp') else 'float32'})")


def _print_inference(inference: dict[str, Any]) -> None:
    names = list(inference)
    print("\ninference per stage, from torch.profiler (median s per image; GFLOP; GFLOP/s; "
          "fraction of the conv peak)")
    print(f"{'stage':<12}" + "".join(f"{n:>30}" for n in names))
    for stage in STAGES:
        cells = []
        for n in names:
            e = inference[n]
            cells.append(f"{e['stages_median_s'][stage]:8.3f} {e['flops'].get(stage, 0) / 1e9:7.1f} "
                         f"{e['stages_gflops_per_s'][stage]:6.1f} {e['stages_fraction_of_conv_peak'][stage]:5.2f}")
        print(f"{stage:<12}" + "".join(f"{c:>30}" for c in cells))
    print(f"{'end to end':<12}" + "".join(f"{inference[n]['end_to_end_median_s']:>8.3f} "
                                        f"{inference[n]['total_gflop']:7.1f}{'':>13}" for n in names))
    print(f"{'(CPU time)':<12}" + "".join(f"{inference[n]['end_to_end_cpu_median_s']:>8.3f}{'':>22}" for n in names))
    print(f"{'RoIs':<12}" + "".join(f"{inference[n]['num_rois']:>8d}{'':>22}" for n in names))
    for n in names:
        same = inference[n].get("vs_plain")
        if same:
            print(f"{n} vs plain: {same.get('other_detections', same['detections'])} detections against "
                  f"{same['detections']}, "
                  f"{'equal' if same['equal'] else 'NOT equal'} (labels {'same' if same['same_labels'] else 'differ'}, "
                  + (f"max box diff {same['max_box_diff_px']:.2g} px, max score diff {same['max_score_diff']:.2g})"
                     if same['max_box_diff_px'] is not None else "so boxes and scores not paired)")
                  + (f"; proposals {'the same' if same['proposals']['equal'] else 'NOT the same'} (farthest "
                     f"{_fmt(same['proposals'].get('max_diff_px'), '.2g')} px, lowest best IoU "
                     f"{same['proposals']['min_best_iou']:.4f})" if "proposals" in same else ""))


def print_ratios(report: dict[str, Any]) -> None:
    """The ratios, the equal-work check and each target's verdict (not comparable when the
    work was unequal)."""
    r = report["ratios"]
    print("\n" + ", ".join(f"{k} {_fmt(v)}" for k, v in r.items()))
    if "equal_work" in report:
        w = report["equal_work"]
        print(f"equal work: {'yes' if w['ok'] else 'NO'} (plain/torchvision FLOPs: inference "
              f"{w['inference_flops_ratio']:.3f}, training {_fmt(w.get('training_flops_ratio'), '.3f')}; "
              f"RoIs {w['num_rois']}, {'the same' if w['same_proposals'] else 'NOT the same'}; "
              f"detections {w['num_detections']}); "
              f"fast path (hoisted) {w['fast_gflop']:.1f} GFLOP")
        if not w["ok"]:
            print("  the models did different work: their speed ratios are not comparable")
        for key, (op, target) in targets_for(report).items():
            print(f"  {key}: {_fmt(r.get(key))} (target {op} {target}): {target_verdict(report, key)}")
