"""Balanced positive / negative subsampling of labelled anchors or RoIs."""
from __future__ import annotations

import numbers
from typing import Sequence

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
    return subsample_batch([labels], num_samples, positive_fraction, bg_label, generator)[0]


def subsample_batch(labels: Sequence[Tensor], num_samples: int, positive_fraction: float,
                    bg_label: int = 0, generator: torch.Generator | None = None
                    ) -> list[tuple[Tensor, Tensor]]:
    """subsample_labels for each image's labels, with one host read for all of them (the
    images' positive and negative counts). The draws are those of subsample_labels called
    image by image: the positives', then the negatives' of each image in turn."""
    # Positives and negatives in ascending order (what nonzero gives), from one stable sort by
    # kind per image and one host read of every image's two counts (a synchronisation on CUDA).
    kinds = []
    for image_labels in labels:
        kind = torch.where(image_labels == bg_label, 1, 2)
        kinds.append(torch.where((image_labels != -1) & (image_labels != bg_label), 0, kind))  # 0 pos, 1 neg, 2 ignored
    orders = [torch.sort(kind, stable=True).indices for kind in kinds]
    # (sums, not bincount: bincount reads its input's max on the host first)
    counts = torch.stack([torch.stack([(kind == 0).sum(), (kind == 1).sum()]) for kind in kinds]).tolist() \
        if kinds else []
    samples = []
    for order, (num_positive, num_negative) in zip(orders, counts):
        positive, negative = order[:num_positive], order[num_positive:num_positive + num_negative]
        num_pos = min(int(num_samples * positive_fraction), num_positive)
        num_neg = min(num_samples - num_pos, num_negative)
        pos = _pick(positive, num_pos, generator)
        samples.append((pos, _pick(negative, num_neg, generator)))
    return samples


def check_sampling(owner: str, batch_size_per_image: int, positive_fraction: float) -> None:
    """ValueError for a sampling that would train silently wrong (the config's checks are not run
    for a model built by hand or from a config changed by attribute, build_model's: an internals
    trial's 0 sampled nothing and trained no head, a fraction of 1.5 or -0.5 took more than asked)."""
    if isinstance(batch_size_per_image, bool) or not isinstance(batch_size_per_image, numbers.Integral) \
            or batch_size_per_image < 1:
        raise ValueError(f"{owner}: batch_size_per_image must be an integer >= 1, got {batch_size_per_image!r}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"{owner}: positive_fraction must be in [0, 1], got {positive_fraction!r}")


def _pick(indices: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
    # randperm on the CPU so a CPU generator works whatever device the labels are on; its
    # copy to the labels' device does not wait for the GPU (host_to_device)
    order = torch.randperm(indices.numel(), generator=generator, device="cpu")[:count]
    return indices[host_to_device(order, indices.device)]
