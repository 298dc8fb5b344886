"""Helpers for checking detectors (tests, the benchmark, the ONNX export's check).

`compare_detections` pairs two detection lists of one image.

Random weights with frozen BatchNorm are not a usable network: frozen BN with fresh
statistics is the identity, so activations grow block after block and the RPN's random
deltas give degenerate proposals. `make_sane` keeps them O(1).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

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
    boxes within box_tolerance px and scores within score_tolerance. Also the largest box and
    score differences; when the counts or labels differ the lists are not paired and those are
    None, not 0."""
    ref = {k: v.cpu() for k, v in ref.items()}
    other = {k: v.cpu() for k, v in other.items()}
    same = len(ref["boxes"]) == len(other["boxes"]) and torch.equal(ref["labels"], other["labels"])
    box = score = None
    if same:
        box = float((ref["boxes"] - other["boxes"]).abs().max()) if len(ref["boxes"]) else 0.0
        score = float((ref["scores"] - other["scores"]).abs().max()) if len(ref["scores"]) else 0.0
    return {"detections": len(ref["boxes"]), "other_detections": len(other["boxes"]), "same_labels": same,
            "max_box_diff_px": box, "max_score_diff": score,
            "equal": same and box <= box_tolerance and score <= score_tolerance}
