"""Balanced positive / negative subsampling."""
import torch

from detection.modeling.sampling import subsample_batch, subsample_labels
from detection.testing import HostReads


def _labels(num_pos: int, num_neg: int, num_ignore: int = 0) -> torch.Tensor:
    labels = torch.cat([torch.ones(num_pos), torch.zeros(num_neg), -torch.ones(num_ignore)]).long()
    return labels[torch.randperm(labels.numel())]


def test_exact_counts_when_both_are_plentiful():
    labels = _labels(300, 1000, 50)
    pos, neg = subsample_labels(labels, 256, 0.5)
    assert pos.numel() == 128 and neg.numel() == 128
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()
    assert torch.unique(pos).numel() == 128 and torch.unique(neg).numel() == 128


def test_negatives_fill_in_when_positives_are_few():
    labels = _labels(10, 1000, 50)
    pos, neg = subsample_labels(labels, 256, 0.5)
    assert pos.numel() == 10 and neg.numel() == 246


def test_roi_head_fraction_and_class_labels_count_as_positive():
    labels = torch.cat([torch.randint(1, 4, (400,)), torch.zeros(1000, dtype=torch.long)])
    pos, neg = subsample_labels(labels, 512, 0.25, bg_label=0)
    assert pos.numel() == 128 and neg.numel() == 384
    assert (labels[pos] >= 1).all()


def test_fewer_candidates_than_requested_takes_all_and_never_ignored():
    labels = _labels(5, 20, 100)
    pos, neg = subsample_labels(labels, 256, 0.5)
    assert pos.numel() == 5 and neg.numel() == 20
    assert set(pos.tolist()) == set((labels == 1).nonzero().squeeze(1).tolist())


def test_seeded_generator_is_reproducible():
    labels = _labels(300, 1000)
    draws = [subsample_labels(labels, 64, 0.5, generator=torch.Generator().manual_seed(3))
             for _ in range(2)]
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])


def test_a_batch_draws_what_image_by_image_draws_with_one_host_read():
    """Three images' labels (one without positives, one all ignored) sampled as a batch: the
    same indices as subsample_labels image by image from the same seeded generator, in one
    read of the device for the batch (one per image before)."""
    torch.manual_seed(0)
    labels = [_labels(300, 1000, 50), _labels(0, 40, 10), _labels(0, 0, 20)]
    generator = torch.Generator().manual_seed(3)
    one_by_one = [subsample_labels(x, 64, 0.25, generator=generator) for x in labels]
    generator = torch.Generator().manual_seed(3)
    with HostReads() as reads:
        batch = subsample_batch(labels, 64, 0.25, generator=generator)
    assert reads.count == 1
    assert [(len(p), len(n)) for p, n in batch] == [(16, 48), (0, 40), (0, 0)]
    for (pos, neg), (ref_pos, ref_neg) in zip(batch, one_by_one):
        assert torch.equal(pos, ref_pos) and torch.equal(neg, ref_neg)
