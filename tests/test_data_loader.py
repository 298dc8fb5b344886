"""Loaders: aspect-ratio groups, seeding, sharding, test order, bad images."""
import itertools
import json
import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from detection.data import DataError, build_test_loader, build_train_loader, build_transforms, get_dataset
from detection.data import loader as loader_module
from detection.data.loader import TrainingSampler, epoch_seed, seed_worker

# (width, height): ids 1..4 landscape or square (w >= h), ids 5..8 portrait (w < h)
SIZES = [(40, 30), (44, 30), (48, 30), (36, 36), (30, 40), (30, 44), (30, 48), (30, 52)]


def make_set(root, sizes=SIZES, empty_ids=()):
    (root / "img").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, (w, h) in enumerate(sizes, start=1):
        cv2.imwrite(str(root / "img" / f"{i}.png"), np.full((h, w, 3), 10 * i, np.uint8))
        images.append({"id": i, "file_name": f"{i}.png", "height": h, "width": w})
        if i not in empty_ids:  # box x1 = image id: tells which image a target came from
            anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [i, 2, 10, 20], "iscrowd": 0})
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns,
                                               "categories": [{"id": 1, "name": "thing"}]}))
    return {"type": "coco", "ann_file": "ann.json", "image_root": "img"}


def train_loader(info, *, grouping=True, seed=0, workers=0, batch=3, flip=0.5, filter_empty=True):
    transform = build_transforms(min_sizes=[30], max_size=200, hflip_prob=flip)
    return build_train_loader([info], transform=transform, images_per_batch=batch, num_workers=workers,
                              aspect_ratio_grouping=grouping, filter_empty=filter_empty, seed=seed)


def take(loader, n):
    out = []
    for i, batch in enumerate(loader):
        out.append(batch)
        if i + 1 == n:
            return out


def image_id(img):
    return int(img[0, 0, 0]) // 10  # images are flat, 10 * id (a resize keeps that)


def is_landscape(img):
    return img.shape[2] >= img.shape[1]


def test_batches_share_an_aspect_ratio_group(tmp_path):
    info = get_dataset(make_set(tmp_path), str(tmp_path))
    batches = take(train_loader(info), 12)  # 36 images from an 8-image set: the stream is endless
    for images, targets in batches:
        assert len(images) == len(targets) == 3
        assert len({is_landscape(img) for img in images}) == 1
    groups_seen = {is_landscape(images[0]) for images, _ in batches}
    assert groups_seen == {True, False}
    # control: without grouping the same stream does mix the groups
    mixed = take(train_loader(info, grouping=False), 12)
    assert any(len({is_landscape(img) for img in images}) == 2 for images, _ in mixed)


def test_batch_contents_types_and_box_transform(tmp_path):
    info = get_dataset(make_set(tmp_path), str(tmp_path))
    images, targets = take(train_loader(info, flip=0.0, batch=2), 1)[0]
    for img, target in zip(images, targets):
        assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        image_id = int(target["boxes"][0, 0])  # min side is already 30: no resize, no flip
        w, h = SIZES[image_id - 1]
        assert tuple(img.shape[1:]) == (h, w)
        assert torch.equal(target["boxes"], torch.tensor([[image_id, 2, image_id + 10, 22]], dtype=torch.float32))
        assert int(img[0, 0, 0]) == 10 * image_id
    assert train_loader(info).pin_memory == torch.cuda.is_available()


def stream_signature(loader, n):
    return [(tuple(tuple(img.shape) for img in imgs), tuple(tuple(t["boxes"].flatten().tolist()) for t in tgts))
            for imgs, tgts in take(loader, n)]


def test_same_seed_same_stream_other_seed_differs(tmp_path):
    info = get_dataset(make_set(tmp_path), str(tmp_path))
    a = stream_signature(train_loader(info, seed=7), 8)
    b = stream_signature(train_loader(info, seed=7), 8)
    c = stream_signature(train_loader(info, seed=8), 8)
    assert a == b and a != c


def test_two_workers_group_and_reproduce(tmp_path):
    info = get_dataset(make_set(tmp_path), str(tmp_path))
    a = stream_signature(train_loader(info, seed=3, workers=2), 6)
    b = stream_signature(train_loader(info, seed=3, workers=2), 6)
    assert a == b
    for shapes, _ in a:
        assert len({w >= h for _, h, w in shapes}) == 1


def test_start_iter_resumes_the_image_order(tmp_path):
    info = get_dataset(make_set(tmp_path), str(tmp_path))

    def order(loader, n):
        return [[image_id(img) for img in imgs] for imgs, _ in take(loader, n)]

    transform = build_transforms(min_sizes=[30], max_size=200, hflip_prob=0.5)
    resumed = build_train_loader([info], transform=transform, images_per_batch=3, num_workers=0,
                                 aspect_ratio_grouping=True, filter_empty=True, seed=4, start_iter=5)
    assert order(resumed, 4) == order(train_loader(info, seed=4), 9)[5:]
    # with repeat factor sampling (a class made rare) too: epochs of varying length, the same batches
    data = json.loads(Path(info.ann_file).read_text())
    data["categories"].append({"id": 2, "name": "rare"})
    data["annotations"][4]["category_id"] = 2
    Path(info.ann_file).write_text(json.dumps(data))
    info = get_dataset({"type": "coco", "ann_file": "ann.json", "image_root": "img"}, str(tmp_path))

    def repeated(start):
        return build_train_loader([info], transform=transform, images_per_batch=3, num_workers=0,
                                  aspect_ratio_grouping=True, filter_empty=True, seed=4, start_iter=start,
                                  repeat_threshold=1.0)
    assert order(repeated(5), 6) == order(repeated(0), 11)[5:]
    assert order(repeated(0), 11) != order(train_loader(info, seed=4), 11)


def test_start_iter_and_workers_give_the_same_augmented_batches(tmp_path):
    """Exact resume: flips (seen in the boxes) match the uninterrupted stream, with any num_workers."""
    info = get_dataset(make_set(tmp_path), str(tmp_path))
    transform = build_transforms(min_sizes=[30], max_size=200, hflip_prob=0.5)
    resumed = build_train_loader([info], transform=transform, images_per_batch=3, num_workers=2,
                                 aspect_ratio_grouping=True, filter_empty=True, seed=4, start_iter=5)
    straight = stream_signature(train_loader(info, seed=4), 9)
    assert stream_signature(resumed, 4) == straight[5:]
    flipped = [b for _, boxes in straight for b in boxes if b[0] != int(b[0]) or b[1] != 2 or b[0] > 8]
    assert flipped, "hflip_prob 0.5 over 27 images should flip some boxes"


@pytest.mark.parametrize("world_size, data_order", [(1, 2), (3, 2), (3, 1)])
def test_training_sampler_matches_distributed_sampler(world_size, data_order):
    """DistributedSampler's indices, with seed epoch_seed(seed, 0) (data_order 1, before 2026-12-07: seed)."""
    size, seed = 7, 11
    for rank in range(world_size):
        stream = iter(TrainingSampler(size, seed=seed, rank=rank, world_size=world_size, data_order=data_order))
        for epoch in range(3):
            reference = DistributedSampler(range(size), num_replicas=world_size, rank=rank, shuffle=True,
                                           seed=epoch_seed(seed, 0, data_order))
            reference.set_epoch(epoch)
            assert [next(stream) for _ in range(len(reference))] == list(reference)


def test_other_seeds_draw_other_epochs_and_seed_0_its_old_order():
    """Epoch e of seed s was epoch e + 1 of seed s - 1 (seed + epoch): at the demo's size seed 1
    trained on 1500 of seed 0's 1650 batches, 150 iterations later (a reproducibility trial).
    Now no epoch of seeds 0..3 repeats another's, and seed 0 (every config's) keeps its order."""
    size, epochs = 600, 4

    def epochs_of(seed, data_order=2):
        stream = iter(TrainingSampler(size, seed=seed, data_order=data_order))
        return [tuple(next(stream) for _ in range(size)) for _ in range(epochs)]

    drawn = [epoch for seed in range(4) for epoch in epochs_of(seed)]
    assert len(set(drawn)) == len(drawn) == 16
    old = {seed: epochs_of(seed, data_order=1) for seed in (0, 1)}
    assert old[1][0] == old[0][1]  # the old overlap, as it was
    assert epochs_of(0) == old[0]
    with pytest.raises(ValueError, match="data_order must be 1 or 2, got 3"):
        TrainingSampler(size, seed=0, data_order=3)
    top = TrainingSampler(size, seed=2**32 - 1)  # the largest seed the config takes
    assert len(set(itertools.islice(iter(top), size))) == size


def test_loader_shards_by_rank_when_distributed(tmp_path, monkeypatch):
    info = get_dataset(make_set(tmp_path), str(tmp_path))
    monkeypatch.setattr(loader_module.comm, "get_rank", lambda: 1)
    monkeypatch.setattr(loader_module.comm, "get_world_size", lambda: 2)
    sampler = train_loader(info).batch_sampler.sampler
    assert (sampler.rank, sampler.world_size) == (1, 2)


def test_filter_empty_in_the_train_loader(tmp_path):
    info = get_dataset(make_set(tmp_path, empty_ids=(1, 2, 3, 5)), str(tmp_path))
    seen = {image_id(img) for imgs, _ in take(train_loader(info, grouping=False, flip=0.0), 8) for img in imgs}
    assert seen == {4, 6, 7, 8}
    kept = take(train_loader(info, grouping=False, flip=0.0, filter_empty=False), 8)
    assert any(len(t["boxes"]) == 0 for _, tgts in kept for t in tgts)
    everything_empty = get_dataset(make_set(tmp_path / "e", sizes=SIZES[:2], empty_ids=(1, 2)), str(tmp_path / "e"))
    with pytest.raises(DataError, match="filter_empty"):
        train_loader(everything_empty)


def test_test_loader_in_order_original_size(tmp_path):
    info = get_dataset(make_set(tmp_path), str(tmp_path))
    loader = build_test_loader(info, num_workers=0, batch_size=3)
    batches = list(loader)
    assert len(loader) == 3 and [len(images) for images, _ in batches] == [3, 3, 2]
    records = [r for _, recs in batches for r in recs]
    assert [r["image_id"] for r in records] == list(range(1, 9))
    for img, (w, h) in zip([img for images, _ in batches for img in images], SIZES):
        assert img.dtype == torch.uint8 and tuple(img.shape) == (3, h, w)


def test_test_loader_workers_leave_ctrl_c_to_the_main_process(tmp_path, monkeypatch):
    """Training evaluates with its SIGINT handler (GracefulStop) installed; the test loader's
    forked workers ignore SIGINT (as the training loader's), so a Ctrl-C is handled, and
    reported, once: by the main process."""
    info = get_dataset(make_set(tmp_path), str(tmp_path))
    real = loader_module.TestDataset.__getitem__

    def with_handler(self, index):  # runs in the worker: which SIGINT handler it has
        image, record = real(self, index)
        return image, {**record, "sigint": signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
                       "sigterm": signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])}

    monkeypatch.setattr(loader_module.TestDataset, "__getitem__", with_handler)
    previous = signal.signal(signal.SIGINT, lambda *args: None)  # the trainer's, in the parent
    try:
        records = [r for _, recs in build_test_loader(info, num_workers=1, batch_size=4) for r in recs]
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(records) == 8 and all(r["sigint"] and r["sigterm"] for r in records)  # SIGTERM: the parent's only


def test_missing_image_errors_or_is_skipped(tmp_path, caplog):
    """A file that vanishes after get_dataset checked it (tests/test_data_checks.py covers the check)."""
    entry = make_set(tmp_path)
    (tmp_path / "img" / "5.png").unlink()
    info = get_dataset(entry, str(tmp_path), check_images=False)
    with pytest.raises(DataError, match=r"image file not found: .*5\.png"):
        list(build_test_loader(info, num_workers=0))
    with pytest.raises(DataError, match=r"5\.png"):
        take(train_loader(info, grouping=False, batch=8), 2)
    info = get_dataset(entry, str(tmp_path), skip_bad_images=True, check_images=False)
    with caplog.at_level(logging.WARNING, logger="detection.data.loader"):
        ids = [r["image_id"] for _, recs in build_test_loader(info, num_workers=0) for r in recs]
    assert ids == [1, 2, 3, 4, 6, 7, 8]
    assert "5.png" in caplog.text and "skipping a bad image" in caplog.text
    for images, targets in take(train_loader(info), 10):  # batches stay full and grouped
        assert len(images) == 3 and len({is_landscape(img) for img in images}) == 1
        assert 5 not in {image_id(img) for img in images}


def test_image_size_disagreeing_with_annotation_is_an_error(tmp_path):
    """Found when the data set is built (from the headers: orientation.check_image_sizes); a
    file replaced after that is still caught by the loader, which checks every decoded size."""
    entry = make_set(tmp_path)
    info = get_dataset(entry, str(tmp_path))
    cv2.imwrite(str(tmp_path / "img" / "2.png"), np.zeros((44, 30, 3), np.uint8))  # stored rotated
    with pytest.raises(DataError, match=r"2\.png is 30x44 .* annotation says 44x30"):
        list(build_test_loader(info, num_workers=0))
    with pytest.raises(DataError, match=r"1 of \d+ images .*2\.png is 30x44 \(WxH\), annotated 44x30"):
        get_dataset(entry, str(tmp_path))


def test_seed_worker_is_deterministic_per_worker():
    draws = []
    for worker_id in (0, 0, 1):
        seed_worker(worker_id, base_seed=5)
        draws.append((np.random.rand(), random.random(), torch.rand(1).item()))
    assert draws[0] == draws[1] and draws[0] != draws[2]


FORK_AFTER_OPENCV = """
import sys, cv2, numpy as np
from detection.data import build_test_loader, build_train_loader, build_transforms, get_dataset
cv2.resize(np.zeros((2000, 2000, 3), np.uint8), (3000, 3000))  # starts OpenCV's thread pool
info = get_dataset({"type": "coco", "ann_file": "ann.json", "image_root": "img"}, sys.argv[1])
transform = build_transforms(min_sizes=[600], max_size=1000, hflip_prob=0.5)
train = build_train_loader([info], transform=transform, images_per_batch=2, num_workers=2,
                           aspect_ratio_grouping=True, filter_empty=True, seed=0)
batches = iter(train)
next(batches), next(batches)
assert len(list(build_test_loader(info, num_workers=2))) == 8
print("loaded")
"""


@pytest.mark.slow  # starts worker processes
def test_workers_forked_after_opencv_ran_in_the_parent_do_not_hang(tmp_path):
    """A parallel OpenCV call before the workers fork (generate_shapes, a large resize) used
    to leave every worker blocked in its first OpenCV call."""
    make_set(tmp_path)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.Popen([sys.executable, "-c", FORK_AFTER_OPENCV, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the hung workers too
        proc.communicate()
        pytest.fail("the data-loader workers hung after OpenCV ran in the parent process")
    assert proc.returncode == 0, stderr
    assert stdout.strip() == "loaded"


def test_a_set_of_crowd_regions_only_is_no_training_set_and_says_why(tmp_path):
    """Crowd regions are not trained on: a set of them only has no training image, and the error
    says why (a trial: 'every image is without boxes' while the json held a box on every image)."""
    spec = make_set(tmp_path)
    data = json.loads((tmp_path / "ann.json").read_text())
    for ann in data["annotations"]:
        ann["iscrowd"] = 1
    (tmp_path / "ann.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"no training images in .*every image is without boxes to train on \(COCO "
                                        r"crowd regions, iscrowd: 1, are not trained on, as in Detectron2, nor "
                                        r"'ignore': 1 annotations\).*dataloader.filter_empty: false"):
        train_loader(get_dataset(spec, str(tmp_path)))


def test_repeat_factors_are_lvis_sqrt_of_threshold_over_the_share_of_images_of_the_rarest_class():
    """Detectron2's repeat_factors_from_category_frequency: f(c) = images with c / images,
    r(c) = max(1, sqrt(t / f(c))), an image's the largest of its classes'; 1 without objects."""
    from detection.data.loader import repeat_factors

    labels = [[1]] * 6 + [[1, 2]] + [[2, 2]] + [[3, 1]] + [[]]  # 10 images: class 1 in 8, 2 in 2, 3 in 1
    records = [{"labels": np.array(x, np.int64)} for x in labels]
    factors = repeat_factors(records, threshold=0.4)
    r2, r3 = np.sqrt(0.4 / 0.2), np.sqrt(0.4 / 0.1)  # sqrt(2), 2; class 1: sqrt(0.5) < 1 -> 1
    np.testing.assert_allclose(factors, [1] * 6 + [r2, r2, r3, 1], rtol=1e-12)
    np.testing.assert_array_equal(repeat_factors(records, threshold=0.05), np.ones(10))  # every class common
    assert repeat_factors(records, threshold=1.0)[8] == pytest.approx(np.sqrt(10))


def test_repeat_factor_sampling_repeats_each_image_floor_or_ceil_of_its_factor_an_epoch():
    """Stochastic rounding per epoch (Detectron2's): index 1 (factor 2.5) twice or three times an
    epoch, 2.5 on average; the others once or three times; epoch after epoch in the stream; ranks
    share each epoch's draw and split it."""
    factors = [1.0, 2.5, 1.0, 3.0]
    sampler = TrainingSampler(4, seed=5, factors=factors)
    epochs = [sampler.epoch_indices(e).tolist() for e in range(400)]
    for epoch in epochs:
        assert epoch.count(0) == epoch.count(2) == 1 and epoch.count(3) == 3 and epoch.count(1) in (2, 3), epoch
    assert 2.4 < np.mean([epoch.count(1) for epoch in epochs]) < 2.6  # 400 epochs: standard error 0.025
    assert len({tuple(epoch) for epoch in epochs}) > 100  # shuffled, not one order
    stream = iter(sampler)
    assert [next(stream) for _ in range(sum(map(len, epochs[:5])))] == [i for epoch in epochs[:5] for i in epoch]
    other = TrainingSampler(4, seed=6, factors=factors)
    assert [other.epoch_indices(e).tolist() for e in range(5)] != epochs[:5]
    # two ranks: together each epoch's draw, padded to an even length by wrapping around
    halves = [iter(TrainingSampler(4, seed=5, factors=factors, rank=r, world_size=2)) for r in range(2)]
    for epoch in epochs[:5]:
        padded = epoch + epoch[:len(epoch) % 2]
        shards = [[next(h) for _ in range(len(padded) // 2)] for h in halves]
        assert shards == [padded[0::2], padded[1::2]]
    with pytest.raises(ValueError, match="factors must be 4 values of at least 1"):
        TrainingSampler(4, seed=0, factors=[1.0, 0.5, 1.0, 1.0])


def test_the_loader_samples_by_repeat_factors_of_the_images_it_trains_on(tmp_path):
    """dataloader.repeat_threshold > 0: the factors of the images training keeps (empty ones
    dropped first); 0: the plain permutation, as before."""
    from detection.data.loader import repeat_factors

    spec = make_set(tmp_path, empty_ids=(8,))
    data = json.loads((tmp_path / "ann.json").read_text())
    data["categories"].append({"id": 2, "name": "rare"})
    data["annotations"][2]["category_id"] = 2  # image 3 holds the one rare object
    (tmp_path / "ann.json").write_text(json.dumps(data))
    info = get_dataset(spec, str(tmp_path))
    transform = build_transforms(min_sizes=[30], max_size=200, hflip_prob=0.5)
    loader = build_train_loader([info], transform=transform, images_per_batch=2, num_workers=0,
                                aspect_ratio_grouping=False, filter_empty=True, seed=0, repeat_threshold=0.5)
    sampler = loader.batch_sampler.sampler
    np.testing.assert_allclose(sampler.factors.numpy(), repeat_factors(info.records[:7], 0.5))
    assert sampler.factors[2] == pytest.approx(np.sqrt(0.5 * 7)) and sampler.factors[0] == 1.0  # 6 of 7: common
    seen = [image_id(img) for images, _ in take(loader, 100) for img in images]
    assert sorted(set(seen)) == [1, 2, 3, 4, 5, 6, 7]  # image 8 has no box
    assert seen.count(3) > 1.5 * np.mean([seen.count(i) for i in (1, 2, 4, 5, 6, 7)])  # 1.87x each epoch
    plain = build_train_loader([info], transform=transform, images_per_batch=2, num_workers=0,
                               aspect_ratio_grouping=False, filter_empty=True, seed=0)
    assert plain.batch_sampler.sampler.factors is None
    # a threshold under every class's share repeats nothing: the plain order, not a reshuffled one
    # (a review: the start line said 'no image repeated' while the batches differed from a run at 0)
    none_rare = build_train_loader([info], transform=transform, images_per_batch=2, num_workers=0,
                                   aspect_ratio_grouping=False, filter_empty=True, seed=0, repeat_threshold=1e-3)
    assert (repeat_factors(info.records[:7], 1e-3) == 1).all()
    batches = [list(itertools.islice(iter(x.batch_sampler), 20)) for x in (none_rare, plain)]
    assert batches[0] == batches[1]
