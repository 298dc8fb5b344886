"""Per-stage seconds and FLOPs of one inference, read from torch.profiler.

Our detector carries torch.profiler.record_function labels on its inference stages
(`c4det.*`: detection/modeling/model.py, detection/modeling/roi_heads.py, detection/accel/), so the benchmark
runs the real `model(images)` under the profiler and reads the labels back: nothing is
re-staged by hand, and the benchmark cannot drift from the code it times. torchvision's model
is staged by detection.benchmarking.models.staged_torchvision inside labels of its own
(`stage.<name>`), read the same way.

Each op and each label belongs to its innermost enclosing label; a label's seconds are its
CPU time (the profiler's cpu_time_total: wall time on the calling thread, intra-op threads
included; on CUDA its device_time_total, the GPU time of the kernels launched under it) minus
that of the labels nested in it, summed over its occurrences (the fast path
enters `c4det.pool` and `c4det.res5` once per chunk). So the stages add up to the labelled
part of the call, nothing is counted twice, and `c4det.roi_heads` keeps only what is neither
pooling, res5 nor postprocessing (the box predictor and the glue between them).

FLOPs are the profiler's own (`with_flops=True`) for convolutions and matrix products only,
the ops torch.utils.flop_counter counts (its totals equal FlopCounterMode's; pooling, NMS and
elementwise ops are not counted), and the fast path's fused convolutions, counted as their
conv2d would be. Its Winograd convolutions (detection/accel/winograd.py) count as the direct
convolution they compute, from their label; the products inside them are not counted.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections import defaultdict
from typing import Any, Callable, Iterator, Mapping

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from detection.benchmarking.models import STAGES
from detection.accel.winograd import PROFILER_LABEL as WINOGRAD_LABEL

# our labels -> the benchmark's stages (the same six as torchvision's staging)
OURS_LABELS: dict[str, str] = {
    "c4det.preprocess": "preprocess",
    "c4det.trunk": "trunk",
    "c4det.rpn": "rpn",
    "c4det.pool": "roi_pool",
    "c4det.hoisted_convs": "res5_head",  # fast path: res5's first 1x1 convs on the whole map
    "c4det.res5": "res5_head",
    "c4det.roi_heads": "res5_head",  # what is left of it: the box predictor and glue
    "c4det.box_postprocess": "postprocess",
    "c4det.postprocess": "postprocess",
}
# the labels staged_torchvision is run in (see stage_label)
TORCHVISION_LABELS: dict[str, str] = {f"stage.{s}": s for s in STAGES}
# ops whose FLOPs count: those of torch.utils.flop_counter (the profiler also reports add / mul)
FLOP_OPS = frozenset({"aten::conv2d", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})
# the fast path's fused convolutions (detection.accel.onednn.conv_pointwise), for which the profiler
# reports no FLOPs: counted from their recorded shapes and arguments (fused_conv_flops)
FUSED_CONV_OPS = frozenset({"mkldnn::_convolution_pointwise", "mkldnn::_convolution_pointwise_"})


def fused_conv_flops(event: Any) -> float:
    """2 x multiply-adds of a fused oneDNN convolution event, as torch.utils.flop_counter
    counts a conv2d (the bias and the post-ops not counted). Its arguments: (X, W, B, padding,
    stride, dilation, groups, ...) unary, (X, other, W, B, padding, ...) binary, and
    (other, X, W, B, padding, ...) for the in-place binary op (the name ending in "_")."""
    shapes, values = event.input_shapes, event.concrete_inputs
    unary = len(shapes) == 10
    x_at, w_at = (0, 1) if unary else ((1, 2) if event.name.endswith("_") else (0, 2))
    padding, stride, dilation, groups = values[w_at + 2:w_at + 6]
    (n, c, h, w), (k, _, kh, kw) = shapes[x_at], shapes[w_at]
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return 2.0 * n * k * ho * wo * (c // groups) * kh * kw


def stage_label(stage: str) -> Any:
    """A meter for staged_torchvision: each stage inside record_function("stage.<name>")."""
    from torch.profiler import record_function

    return record_function(f"stage.{stage}")


def _innermost_label(event: Any, labels: Mapping[str, str]) -> Any:
    parent = event.cpu_parent
    while parent is not None and parent.name not in labels:
        parent = parent.cpu_parent
    return parent


def _inside_flop_op(event: Any, labels: Mapping[str, str]) -> bool:
    """True for an op called by another counted op below the same label: under autocast the
    profiler records aten::conv2d twice (the autocast wrapper's call and the cast call inside);
    the products inside a Winograd convolution, which counts as a whole."""
    parent = event.cpu_parent
    while parent is not None and parent.name not in labels:
        if parent.name in FLOP_OPS or parent.name.startswith(WINOGRAD_LABEL):
            return True
        parent = parent.cpu_parent
    return False


def stages_from_events(events: Any, labels: Mapping[str, str], device: str = "cpu"
                       ) -> tuple[dict[str, float], dict[str, float]]:
    """(seconds per stage, FLOPs per stage) from a profile's events (prof.events()); FLOPs of
    ops outside every label go to "unlabelled". device "cuda": GPU time per label."""
    seconds: dict[str, float] = defaultdict(float)
    flops: dict[str, float] = defaultdict(float)
    for event in events:
        if event.name in labels and event.device_type == DeviceType.CPU:  # not the GPU's copy of a label
            own = (event.device_time_total if device == "cuda" else event.cpu_time_total) / 1e6  # microseconds
            seconds[labels[event.name]] += own
            outer = _innermost_label(event, labels)
            if outer is not None:  # nested: its time is not the enclosing label's
                seconds[labels[outer.name]] -= own
        elif (event.name in FLOP_OPS and event.flops and not _inside_flop_op(event, labels)) \
                or (event.name in FUSED_CONV_OPS and event.input_shapes) or event.name.startswith(WINOGRAD_LABEL):
            outer = _innermost_label(event, labels)
            flops[labels[outer.name] if outer is not None else "unlabelled"] += _flops(event)
    return dict(seconds), dict(flops)


def _flops(event: Any) -> float:
    if event.name in FLOP_OPS:
        return event.flops
    if event.name in FUSED_CONV_OPS:
        return fused_conv_flops(event)
    return float(event.name.removeprefix(WINOGRAD_LABEL))


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
    """Kineto prints start/stop lines (and a GPU probe error) on file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profile_stages(fn: Callable[[], Any], labels: Mapping[str, str], num_images: int = 1,
                   with_flops: bool = False, device: str = "cpu") -> tuple[Any, dict[str, float], dict[str, float]]:
    """Runs fn() once under torch.profiler (CPU activity, and CUDA's on "cuda"); returns (fn's
    result, seconds per stage per image, FLOPs per stage per image; FLOPs only with
    `with_flops`, which records shapes and costs time, so the timed runs go without)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    prof = profile(activities=activities, with_flops=with_flops, record_shapes=with_flops)
    with _quiet_fd2():
        prof.__enter__()
    try:
        result = fn()
    finally:
        with _quiet_fd2():
            prof.__exit__(None, None, None)
    seconds, flops = stages_from_events(prof.events(), labels, device)
    return (result, {s: v / num_images for s, v in seconds.items()},
            {s: v / num_images for s, v in flops.items()})
