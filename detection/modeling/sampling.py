"""Balanced positive / negative subsampling of labelled anchors or RoIs."""
from __future__ import annotations

import torch
from torch import Tensor

from detection.modeling.structures import host_to_device


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
    # Positives and negatives in ascending order (what nonzero gives), from one stable sort by
    # kind and one host read of the two counts (a synchronisation on CUDA; two nonzero before).
    kind = torch.where(labels == bg_label, 1, 2)
    kind = torch.where((labels != -1) & (labels != bg_label), 0, kind)  # 0 positive, 1 negative, 2 ignored
    order = torch.sort(kind, stable=True).indices
    # (two sums, not bincount: bincount reads its input's max on the host first)
    num_positive, num_negative = torch.stack([(kind == 0).sum(), (kind == 1).sum()]).tolist()
    positive, negative = order[:num_positive], order[num_positive:num_positive + num_negative]
    num_pos = min(int(num_samples * positive_fraction), num_positive)
    num_neg = min(num_samples - num_pos, num_negative)
    return _pick(positive, num_pos, generator), _pick(negative, num_neg, generator)


def _pick(indices: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
    # randperm on the CPU so a CPU generator works whatever device the labels are on; its
    # copy to the labels' device does not wait for the GPU (host_to_device)
    order = torch.randperm(indices.numel(), generator=generator, device="cpu")[:count]
    return indices[host_to_device(order, indices.device)]
