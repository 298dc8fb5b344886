"""Helpers for checking detectors (tests, the benchmark, the ONNX export's check).

`compare_detections` pairs two detection lists of one image in order; `matched_fraction`
matches them as sets (another device or kernel may order near-tied scores either way).

Random weights with frozen BatchNorm are not a usable network: frozen BN with fresh
statistics is the identity, so activations grow block after block and the RPN's random
deltas give degenerate proposals. `make_sane` keeps them O(1).
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

SANE_BRANCH_SCALE = 0.25


def make_sane(model: nn.Module, factor: float = SANE_BRANCH_SCALE) -> nn.Module:
    """Scale the last norm of every residual branch (norm3 / norm2) by `factor`: with random
    weights and frozen BN (identity statistics) activations otherwise grow block by block."""
    with torch.no_grad():
        for module in model.modules():
            if not hasattr(module, "shortcut"):  # not a residual block
                continue
            last = module.norm3 if hasattr(module, "norm3") else module.norm2
            if getattr(last, "weight", None) is not None:
                last.weight.mul_(factor)
    return model


def compare_detections(ref: dict[str, Tensor], other: dict[str, Tensor], *, box_tolerance: float = 0.01,
                       score_tolerance: float = 1e-3) -> dict[str, Any]:
    """Are `other`'s detections `ref`'s, in the same order? `equal`: the same count and labels,
    boxes within box_tolerance px and scores within score_tolerance. Detections whose scores tie
    (within score_tolerance: an ONNX Runtime or a thread count rounding 1e-9 otherwise) may come
    in either order: each is paired with its like among the positions of its tie (`tied_swaps`
    counts those paired off their own position). Also the largest box and score differences;
    when the counts or labels differ the lists are not paired and those are None, not 0."""
    ref = {k: v.cpu() for k, v in ref.items()}
    other = {k: v.cpu() for k, v in other.items()}
    pairs = _paired_in_order(ref, other, box_tolerance, score_tolerance) \
        if len(ref["boxes"]) == len(other["boxes"]) else None
    box = score = None
    if pairs is not None:
        order = torch.tensor(pairs, dtype=torch.int64, device="cpu")
        box = float((ref["boxes"] - other["boxes"][order]).abs().max()) if len(pairs) else 0.0
        score = float((ref["scores"] - other["scores"][order]).abs().max()) if len(pairs) else 0.0
    return {"detections": len(ref["boxes"]), "other_detections": len(other["boxes"]), "same_labels": pairs is not None,
            "max_box_diff_px": box, "max_score_diff": score,
            "tied_swaps": sum(i != j for i, j in enumerate(pairs)) if pairs is not None else None,
            "equal": pairs is not None and box <= box_tolerance and score <= score_tolerance}


def _paired_in_order(ref: dict[str, Tensor], other: dict[str, Tensor], box_tolerance: float,
                     score_tolerance: float) -> list[int] | None:
    """For each of ref's detections the index of its partner in `other` (lists of one length):
    the one at its own position when it agrees (label, box and score within the tolerances), else
    one that agrees at a position whose ref score ties with its own (two detections of one label
    swapped too); when they cannot be paired so, position by position if the labels agree so (the
    differences are then reported), else None. Lists that agree in order are the one pass."""
    labels, scores = ref["labels"].tolist(), ref["scores"].tolist()
    in_order = list(range(len(labels))) if labels == other["labels"].tolist() else None
    if in_order is not None and (not labels or (
            float((ref["boxes"] - other["boxes"]).abs().max()) <= box_tolerance
            and float((ref["scores"] - other["scores"]).abs().max()) <= score_tolerance)):
        return in_order
    pairs, used = [], set()
    for i in range(len(labels)):
        tie = [j for j in range(len(labels)) if abs(scores[j] - scores[i]) <= score_tolerance and j not in used]
        found = next((j for j in sorted(tie, key=lambda j: j != i) if int(other["labels"][j]) == labels[i]
                      and abs(float(other["scores"][j]) - scores[i]) <= score_tolerance
                      and float((other["boxes"][j] - ref["boxes"][i]).abs().max()) <= box_tolerance), None)
        if found is None:
            return in_order
        pairs.append(found)
        used.add(found)
    return pairs


def matched_fraction(ref: dict[str, Tensor], other: dict[str, Tensor], *, min_iou: float = 0.99,
                     score_tolerance: float = 0.002) -> float:
    """The share of `ref`'s detections (one image) that `other` has: the same label, IoU >=
    min_iou, the score within score_tolerance, each detection of `other` used once. Order-free;
    1.0 where both have none."""
    from torchvision.ops import box_iou

    ref = {k: v.detach().cpu().float() if v.is_floating_point() else v.cpu() for k, v in ref.items()}
    other = {k: v.detach().cpu().float() if v.is_floating_point() else v.cpu() for k, v in other.items()}
    if len(ref["boxes"]) == 0:
        return 1.0 if len(other["boxes"]) == 0 else 0.0
    ok = ((box_iou(ref["boxes"], other["boxes"]) >= min_iou) & (ref["labels"][:, None] == other["labels"][None])
          & ((ref["scores"][:, None] - other["scores"][None]).abs() <= score_tolerance))  # (ref, other)
    used: set[int] = set()
    for row in ok:
        free = [j for j in row.nonzero().flatten().tolist() if j not in used]
        if free:
            used.add(free[0])
    return len(used) / len(ref["boxes"])


# ---- tensors created without naming their device ------------------------------------------

# torch's tensor factories: each puts its result on the default device unless told otherwise
# (the ones torch.set_default_device redirects). Functions that follow an input (zeros_like,
# Tensor.new_zeros, ...) are not here: they are device-safe.
TENSOR_FACTORIES = tuple(getattr(torch, name) for name in (
    "tensor", "as_tensor", "scalar_tensor", "zeros", "ones", "full", "empty", "empty_strided",
    "arange", "range", "linspace", "logspace", "eye", "rand", "randn", "randint", "randperm",
    "normal", "tril_indices", "triu_indices", "sparse_coo_tensor"))
_ROOT = Path(__file__).resolve().parents[1]
_PROJECT = tuple(str(_ROOT / folder) + os.sep for folder in ("detection", "backbones", "tools"))
_LIBRARIES = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(torchvision.__file__) + os.sep)


def _place(frame) -> str:
    """'file:line function' of a frame, the file relative to the repository."""
    return f"{os.path.relpath(frame.f_code.co_filename, _ROOT)}:{frame.f_lineno} {frame.f_code.co_name}"


class UnnamedDeviceCheck(TorchFunctionMode):
    """Records each tensor the project creates on the default device without naming one.

    On a GPU such a tensor lands on the CPU next to a CUDA model or input, and the first op
    mixing them raises (or, worse, a loop copies it every step). CI has no GPU, so this check
    finds them on the CPU: a factory call (TENSOR_FACTORIES) without `device=` whose caller is
    the project's code (detection/, backbones/, tools/), directly or through a library class's
    constructor (FrozenBatchNorm2d(...), nn.Conv2d(...) without device: the caller chooses the
    device there). A library function that makes a temporary and moves it itself
    (torchvision's batched_nms) is not the project's doing and is not recorded. `found` lists
    "file:line function" for each place, once. Not caught: tensors made on the CPU by other
    means (torch.from_numpy, .cpu(), a Python number turned into a tensor by an op) and later
    mixed with a model's tensors on another device."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in TENSOR_FACTORIES and kwargs.get("device") is None:
            place = _project_caller(sys._getframe(1))
            if place is not None and place not in self.found:
                self.found.append(place)
        return func(*args, **kwargs)


def _project_caller(frame) -> str | None:
    """'file:line function' of the project frame that made a factory call, or None when the
    call came from a library function (not a constructor) or from outside the project."""
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_PROJECT):
            return _place(frame)
        if not filename.startswith(_LIBRARIES):
            return None  # a test, or another package
        if frame.f_code.co_name not in ("__init__", "__new__") and "/torch/nn/" not in filename \
                and "/torch/utils/_device" not in filename and "/torch/overrides" not in filename:
            return None  # a library function's own temporary
        frame = frame.f_back
    return None


# ops whose result the host must wait for (a synchronisation on CUDA): their output's size or a
# value comes from the device. Under torch.inference_mode the dispatcher sees some composite ops
# whole instead of what they call (`.item()` as aten.item, not _local_scalar_dense;
# `nonzero(as_tuple=True)` as nonzero_numpy; `torch.where(mask)` as where.default; argwhere;
# allclose): named here too, each counted once either way.
_HOST_READ_OPS = frozenset({"aten.nonzero", "aten.nonzero_numpy", "aten.argwhere", "aten.masked_select",
                            "aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal",
                            "aten.allclose", "aten.unique_consecutive", "aten._unique", "aten._unique2",
                            "aten.unique_dim", "aten.bincount", "torchvision.nms"})


class HostReads(TorchDispatchMode):
    """Counts the host's reads of tensor values while it is active: on CUDA each one waits for
    the GPU to finish what it was given (the CPU can no longer queue work ahead of it). Found
    on any device, the CPU included: nonzero (and `torch.where(mask)`), NMS, indexing by a
    boolean mask (also in the backward, where the mask indexes the gradient), `.item()`,
    `bool()` / `int()` / `float()` of a tensor, `.tolist()`, bincount and repeat_interleave
    without `output_size` (their output's size is read). Not counted: `x[mask] = scalar`
    (PyTorch makes it a masked_fill), copies to the CPU by `.cpu()` / `.to("cpu")` / `.numpy()`,
    and on CUDA copies from pageable host memory (`tensor.to("cuda")`, `torch.tensor(...,
    device="cuda")`), which wait too: on the CPU no op runs to see. `host_to_device` makes the
    project's copies that do not wait; the GPU suite compares this count with CUDA's own
    (`torch.cuda.set_sync_debug_mode`). `places` counts them by "file:line function" of
    the project's code that asked (detection/, backbones/, tools/), or "elsewhere"."""

    def __init__(self) -> None:
        super().__init__()
        self.places: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.places.values())

    def __enter__(self) -> "HostReads":
        self._tolist = torch.Tensor.tolist
        reads = self

        def tolist(tensor: Tensor) -> Any:
            reads._record(sys._getframe(1))
            return reads._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.Tensor.tolist = self._tolist
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in _HOST_READ_OPS or (name in ("aten.index", "aten.index_put", "aten.index_put_")
                                      and _reads_a_mask(name, args)) \
                or (name == "aten.repeat_interleave" and (kwargs or {}).get("output_size") is None) \
                or str(func) == "aten.where.default":  # torch.where(mask), one argument: a nonzero
            self._record(sys._getframe(1))
        return func(*args, **(kwargs or {}))

    def _record(self, frame) -> None:
        while frame is not None and not frame.f_code.co_filename.startswith(_PROJECT):
            frame = frame.f_back
        place = "elsewhere" if frame is None else _place(frame)
        self.places[place] += 1


def _reads_a_mask(name: str, args: tuple) -> bool:
    """An index or index_put by a boolean mask, but not `x[mask] = scalar` (a masked_fill)."""
    masked = any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or []))
    return masked and not (name != "aten.index" and args[2].numel() == 1)


class DeviceWaits:
    """Where the host waited for the GPU, by CUDA's own account: while active,
    `torch.cuda.set_sync_debug_mode("warn")` (PyTorch warns at each wait), and each such warning
    placed as HostReads places its reads, at the innermost frame of the project's code on the
    stack when it was raised ("file:line function", or "elsewhere"). Not at the warning's own file
    and line: that is the Python frame that called the op, which is torch's or torchvision's own
    where a Python wrapper called it (torch.ops' `__call__` under torchvision's nms, torch's
    functional.py under `torch.unique`). `waits` lists (place, files): the files of the library
    frames between the project's frame and the op, outermost first (torchvision's ops/boxes.py for
    the two waits inside NMS). This file's frames are skipped: with HostReads active, each op is
    called from its dispatch. Other warnings go on to the previous handler. `set_mode` replaces
    torch's switch (a test on the CPU, where it needs CUDA)."""

    def __init__(self, set_mode: Any = None) -> None:
        self.waits: list[tuple[str, tuple[str, ...]]] = []
        self._set_mode = set_mode or torch.cuda.set_sync_debug_mode

    @property
    def places(self) -> Counter[str]:
        return Counter(place for place, _ in self.waits)

    def __enter__(self) -> "DeviceWaits":
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")  # every wait, not the first at each line
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message):
                return previous(message, category, filename, lineno, file, line)
            self._record(sys._getframe(1))

        warnings.showwarning = show
        try:
            self._set_mode("warn")
        except BaseException:
            self._catch.__exit__(*sys.exc_info())  # the warning filters and handler as they were
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._set_mode("default")
        finally:
            self._catch.__exit__(*exc)

    def _record(self, frame) -> None:
        files: list[str] = []
        while frame is not None and (frame.f_code.co_filename == __file__
                                     or not frame.f_code.co_filename.startswith(_PROJECT)):
            filename = frame.f_code.co_filename  # this file's: HostReads' dispatch around the op
            if filename != __file__ and os.path.basename(filename) not in ("warnings.py", "_py_warnings.py"):
                files.append(filename)
            frame = frame.f_back
        place = "elsewhere" if frame is None else _place(frame)
        self.waits.append((place, tuple(reversed(files))))
