"""Detectron2 C4 Faster R-CNN parameter names -> this project's names.

Detectron2 (GeneralizedRCNN with a ResNet C4 backbone and Res5ROIHeads) names its tensors
    backbone.stem.conv1.weight, backbone.stem.conv1.norm.{weight,bias,running_mean,running_var}
    backbone.res{2,3,4}.{i}.conv{1,2,3}.weight / .conv{k}.norm.*, .shortcut.weight / .shortcut.norm.*
    proposal_generator.rpn_head.{conv, objectness_logits, anchor_deltas}.{weight,bias}
    roi_heads.res5.{i}.*  (as the backbone blocks)
    roi_heads.box_predictor.{cls_score, bbox_pred}.{weight,bias}
Ours: trunk.stem.conv1 / trunk.stem.norm1, trunk.res{2,3,4}.{i}.conv{k} / .norm{k}, .shortcut.0 / .shortcut.1,
rpn.head.*, roi_heads.res5.*, roi_heads.predictor.*.

One difference is more than a name: Detectron2's cls_score puts the background class LAST
(row K of K+1), ours FIRST (row 0). bbox_pred (4K rows, class-specific) has no background rows.

Older model-zoo files also hold buffers that are no weights: the model's pixel_mean / pixel_std
and the RPN's cell anchors. They are returned apart, so the loader can check them against the
config instead of dropping them unseen.
"""
from __future__ import annotations

import re
from typing import Callable

from torch import Tensor

# Name prefixes that only a Detectron2 detector has (ours start with trunk. / rpn. / roi_heads.predictor.).
DETECTRON2_PREFIXES = ("backbone.", "proposal_generator.", "roi_heads.box_predictor.")

_NORM = r"(weight|bias|running_mean|running_var)"
_BLOCK = r"(res[2-5]\.\d+)"
# (full-match pattern, our name); the first matching rule wins. Applied after the prefix map below.
_RULES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(r"stem\.conv1\.weight"), lambda m: "stem.conv1.weight"),
    (re.compile(rf"stem\.conv1\.norm\.{_NORM}"), lambda m: f"stem.norm1.{m[1]}"),
    (re.compile(rf"{_BLOCK}\.conv([1-3])\.weight"), lambda m: f"{m[1]}.conv{m[2]}.weight"),
    (re.compile(rf"{_BLOCK}\.conv([1-3])\.norm\.{_NORM}"), lambda m: f"{m[1]}.norm{m[2]}.{m[3]}"),
    (re.compile(rf"{_BLOCK}\.shortcut\.weight"), lambda m: f"{m[1]}.shortcut.0.weight"),
    (re.compile(rf"{_BLOCK}\.shortcut\.norm\.{_NORM}"), lambda m: f"{m[1]}.shortcut.1.{m[2]}"),
]
# Detectron2 prefix -> ours, and whether the ResNet rules above apply below it.
_PREFIXES = (
    ("backbone.", "trunk.", True),
    ("roi_heads.res5.", "roi_heads.", True),  # res5.N... keeps its "res5." through the rules
    ("proposal_generator.rpn_head.", "rpn.head.", False),
    ("roi_heads.box_predictor.", "roi_heads.predictor.", False),
)
# Buffers of older Detectron2 checkpoints that are configuration, not weights.
_NON_WEIGHTS = re.compile(r"pixel_mean|pixel_std|proposal_generator\.anchor_generator\.cell_anchors\.\d+")


def is_detectron2_state(state: dict[str, object]) -> bool:
    """True when the names are Detectron2's (any key under one of DETECTRON2_PREFIXES)."""
    return any(str(k).startswith(DETECTRON2_PREFIXES) for k in state)


def detectron2_name(name: str) -> str | None:
    """Our name for one Detectron2 parameter name, or None when it has no counterpart."""
    for theirs, ours, resnet in _PREFIXES:
        if not name.startswith(theirs):
            continue
        rest = name[len(theirs):]
        if theirs == "roi_heads.res5.":
            rest = "res5." + rest
        if not resnet:
            return ours + rest
        for pattern, target in _RULES:
            match = pattern.fullmatch(rest)
            if match:
                return ours + target(match)
        return None
    return None


def convert_detectron2_state(state: dict[str, Tensor]
                             ) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str]]:
    """-> (tensors under our names with cls_score's background row moved first,
    Detectron2's configuration buffers (pixel_mean, pixel_std, cell anchors) by their names,
    names with no counterpart here). Nothing is dropped silently: the caller decides."""
    ours: dict[str, Tensor] = {}
    buffers: dict[str, Tensor] = {}
    unknown: list[str] = []
    for name, value in state.items():
        if _NON_WEIGHTS.fullmatch(name):
            buffers[name] = value
            continue
        target = detectron2_name(name)
        if target is None:
            unknown.append(name)
            continue
        if name.startswith("roi_heads.box_predictor.cls_score."):
            value = background_first(value)
        ours[target] = value
    return ours, buffers, unknown


def background_first(cls_score: Tensor) -> Tensor:
    """(K+1, ...) rows with the background last (Detectron2) -> background first (ours)."""
    return cls_score[[-1] + list(range(cls_score.shape[0] - 1))]
