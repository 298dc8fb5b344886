"""Balanced positive / negative subsampling of labelled anchors or RoIs."""
from __future__ import annotations

import torch
from torch import Tensor


def subsample_labels(labels: Tensor, num_samples: int, positive_fraction: float,
                     bg_label: int = 0, generator: torch.Generator | None = None
                     ) -> tuple[Tensor, Tensor]:
    """Pick at most `num_samples` entries of `labels` (P,), at most `positive_fraction` of them
    positive; negatives fill the rest when positives are few.

    Label -1 is ignored, `bg_label` is negative, anything else positive (so the RoI head can
    pass class labels 1..K directly). Returns the indices (into `labels`) of the sampled
    positives and negatives. Picks are uniform at random via `torch.randperm`; pass a
    seeded CPU `generator` for reproducible draws.
    """
    positive = ((labels != -1) & (labels != bg_label)).nonzero().squeeze(1)
    negative = (labels == bg_label).nonzero().squeeze(1)
    num_pos = min(int(num_samples * positive_fraction), positive.numel())
    num_neg = min(num_samples - num_pos, negative.numel())
    return _pick(positive, num_pos, generator), _pick(negative, num_neg, generator)


def _pick(indices: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
    # randperm on the CPU so a CPU generator works whatever device the labels are on.
    order = torch.randperm(indices.numel(), generator=generator, device="cpu")[:count]
    return indices[order.to(indices.device)]
