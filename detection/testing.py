"""Helpers for running randomly initialised detectors (tests and the benchmark).

Random weights with frozen BatchNorm are not a usable network: frozen BN with fresh
statistics is the identity, so activations grow block after block and the RPN's random
deltas give degenerate proposals. `make_sane` keeps them O(1).
"""
from __future__ import annotations

import torch
from torch import nn

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
