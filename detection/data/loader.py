"""Train / test loaders: torch DataLoader over data set records, batches as lists.

Training is an infinite stream: each epoch is a permutation drawn from a
torch.Generator seeded with seed + epoch, sharded by rank like DistributedSampler
when torch.distributed is initialised, then grouped into batches whose images all
have w >= h or all w < h (padding a batch then wastes little). Batches are formed
in the sampler from the record sizes, so they do not depend on worker timing.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import pickle
import random
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from detection.data import DataError
from detection.data.catalog import DatasetInfo, concat_datasets
from detection.data.image_io import read_image
from detection.utils import comm

logger = logging.getLogger(__name__)

_MAX_REPLACEMENTS = 20  # consecutive unreadable images tolerated before giving up


# How TrainingSampler seeds epoch e of a run of `seed` (checkpoints keep it as "data_order", so a
# run resumes in the order it began with): 1 (before 2026-12-07) seed + e, DistributedSampler's,
# which made seed s + 1 draw seed s's epochs one epoch later (a multi-seed study's runs shared most
# of their batches); 2: seed * STRIDE + e modulo 2**32 (the CPU generator's randperm reads only a
# seed's low 32 bits): the epochs of two seeds meet only some 10**8 or more epochs apart (seeds
# 1 apart: 2.65e9), and seed 0, every config's, keeps its order.
DATA_ORDER = 2
STRIDE = 0x9E3779B9  # 2**32 / the golden ratio, odd: seed -> seed * STRIDE mod 2**32 is one to one


def epoch_seed(seed: int, epoch: int, data_order: int = DATA_ORDER) -> int:
    """The torch.Generator seed of a run's epoch (see DATA_ORDER)."""
    if data_order == 1:
        return (seed + epoch) % 2**63
    if data_order == 2:
        return (seed * STRIDE + epoch) % 2**32
    raise ValueError(f"data_order must be 1 or 2, got {data_order!r}")


def build_train_loader(datasets: Sequence[DatasetInfo], *, transform: Callable, images_per_batch: int,
                       num_workers: int, aspect_ratio_grouping: bool, filter_empty: bool, seed: int,
                       use_difficult: bool = True, start_iter: int = 0, data_order: int = DATA_ORDER,
                       repeat_threshold: float = 0.0) -> DataLoader:
    """Infinite iterable of (images: list[uint8 Tensor[3,H,W]], targets: list[{"boxes", "labels"}]).

    images_per_batch is per process. use_difficult=False drops VOC difficult boxes;
    filter_empty drops images left without boxes (they stay in evaluation).
    start_iter (resuming): the first start_iter batches are skipped at the index level, and
    every sample's augmentation is seeded from (seed, rank, batch number, position in batch),
    so a resumed run sees exactly the batches of an uninterrupted one, whatever num_workers.
    data_order: how each epoch's order follows from the seed (DATA_ORDER; a resumed run's own).
    repeat_threshold > 0: repeat factor sampling (repeat_factors) over the images training keeps.
    """
    if images_per_batch < 1:
        raise DataError(f"images per batch must be >= 1, got {images_per_batch}")
    info = concat_datasets([datasets] if isinstance(datasets, DatasetInfo) else list(datasets))
    records = training_records(info.records, filter_empty=filter_empty, use_difficult=use_difficult)
    if not records:
        difficult_only = not use_difficult and training_records(info.records, filter_empty=True, use_difficult=True)
        coco = (" (COCO crowd regions, iscrowd: 1, are not trained on, as in Detectron2, nor 'ignore': 1 annotations)"
                if info.kind in ("coco", "mixed") else "")
        raise DataError(f"no training images in {info.name}: every image is without boxes to train on{coco}"
                        + (" once its difficult objects are dropped (dataloader.use_difficult: false; true keeps "
                           "them, as Detectron2 does)" if difficult_only else "")
                        + " (set dataloader.filter_empty: false to train on them anyway)")
    rank, world_size = comm.get_rank(), comm.get_world_size()
    groups = [0 if r["width"] >= r["height"] else 1 for r in records]
    factors = repeat_factors(records, repeat_threshold) if repeat_threshold > 0 else None
    if factors is not None and (factors == 1).all():  # nothing repeats: the plain order, as Detectron2's
        factors = None  # RepeatFactorTrainingSampler is then TrainingSampler (the start line says so)
    sampler = TrainingSampler(len(records), seed=seed, rank=rank, world_size=world_size, data_order=data_order,
                              factors=factors)
    base_seed = _process_seed(seed, rank)
    batch_sampler = GroupedBatchSampler(sampler, groups if aspect_ratio_grouping else [0] * len(groups),
                                        images_per_batch, start=start_iter, seed=base_seed)
    dataset = TrainDataset(records, transform, skip_bad_images=info.skip_bad_images, groups=groups,
                           exif_orientation=info.exif_orientation)
    # an explicit generator: creating the iterator must not draw from (and shift) the global torch RNG
    generator = torch.Generator()
    generator.manual_seed(base_seed)
    return ForkSafeDataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                              collate_fn=collate_lists, pin_memory=torch.cuda.is_available(),
                              worker_init_fn=partial(seed_worker, base_seed=base_seed), generator=generator)


def training_samples(loader: DataLoader, batches: int) -> Iterator[tuple[int, torch.Tensor, dict, dict]]:
    """The first `batches` batches of a build_train_loader loader, sample by sample: (batch
    number from 0, image, target, the record it came from). Made in this process from the
    loader's own batch sampler and data set: the images, boxes and augmentation its workers
    give, since each sample's augmentation is seeded by its batch number and position
    (tools/visualize.py --train-batches; Detectron2's visualize_data.py --source dataloader)."""
    for number, batch in enumerate(itertools.islice(iter(loader.batch_sampler), batches)):
        for item in batch:
            image, target, record = loader.dataset.sample(item)
            yield number, image, target, record


def build_test_loader(dataset: DatasetInfo, *, num_workers: int, batch_size: int = 1) -> "TestLoader":
    """Iterable of (images: list[uint8 Tensor[3,H,W]] at original size, records: list[dict]), in dataset order."""
    if batch_size < 1:
        raise DataError(f"test batch size must be >= 1, got {batch_size}")
    data = TestDataset(dataset.records, skip_bad_images=dataset.skip_bad_images,
                       exif_orientation=dataset.exif_orientation)
    loader = ForkSafeDataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                collate_fn=collate_lists, pin_memory=torch.cuda.is_available(),
                                worker_init_fn=ignore_stop_signals if num_workers > 0 else None)
    return TestLoader(loader)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """In a loader worker (test or training: seed_worker): Ctrl-C is ignored, and SIGTERM from
    anyone but the parent. A terminal's Ctrl-C, Slurm's scancel and a pre-emption reach every
    process of the job, and the main process decides (the trainer's GracefulStop finishes its step
    and saves, eval.py stops, the DataLoader ends its workers). Without this a worker forked during
    training's evaluation ran the trainer's handler and said "SIGINT received" a second time, and
    a SIGTERM to the job killed the training loader's workers: the run stopped with a worker's
    traceback and exit 1, not by saving last.pth (exit 143). The parent's SIGTERM (the DataLoader's
    and multiprocessing's shutdown of a worker, terminate()) still ends the worker at once, as
    PyTorch's own worker handler does: only a signal waited for (sigwaitinfo), not a Python
    handler, is told who sent it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # not on macOS: PyTorch's own handling of SIGTERM stays
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the waiting thread below takes them

    def wait_for_sigterm() -> None:
        while True:
            sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
            if sender == parent or os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=wait_for_sigterm, name="sigterm-from-the-parent", daemon=True).start()


class ForkSafeDataLoader(DataLoader):
    """A DataLoader whose worker processes are forked with OpenCV's thread pool off.

    A process that has run a parallel OpenCV call (a large resize, generate_shapes) holds a
    thread pool that fork() does not copy; a forked worker's first OpenCV call (even
    cv2.setNumThreads) then waits on it forever. So before forking, OpenCV is set to run
    serially (cv2.setNumThreads(0)) in this process, and the workers inherit that: they run
    in parallel with each other already. The setting is not restored (as in mmcv): the pool
    would be back for the next fork, and the training process does its OpenCV work in the
    workers.
    """

    def __iter__(self):
        if self.num_workers > 0:
            cv2.setNumThreads(0)
        return _OneLineDataErrors(super().__iter__())


class _OneLineDataErrors:
    """Iterator wrapper: torch re-raises a worker's DataError with its message replaced by
    "Caught DataError in DataLoader worker process 0. Original Traceback ..." (many lines);
    give the user the one line the data layer wrote instead."""

    def __init__(self, iterator: Iterator) -> None:
        self.iterator = iterator

    def __iter__(self) -> "_OneLineDataErrors":
        return self

    def __len__(self) -> int:
        return len(self.iterator)

    def __next__(self):
        try:
            return next(self.iterator)
        except DataError as error:
            text = str(error).rstrip()
            if "Original Traceback" not in text:
                raise
            # the traceback's last line is "detection.data.DataError: <the message>"
            one_line = DataError(text.rsplit("DataError: ", 1)[-1] + " (in a data loader worker)")
            # Let go of torch's iterator now, so that it stops its workers at once: kept alive by
            # the original error's traceback, it was collected later with a 5 s wait on a worker
            error.__traceback__ = None
            self.iterator = iter(())
        raise one_line from None

    def close(self) -> None:
        """Stop the worker processes now (the trainer, when its run ends however it ends: an
        interrupted train() in a notebook kept them while the traceback's frames held this)."""
        shutdown = getattr(self.iterator, "_shutdown_workers", None)  # torch's own: what its __del__ calls
        if shutdown is not None:
            shutdown()
        self.iterator = iter(())


def training_records(records: Sequence[dict], *, filter_empty: bool, use_difficult: bool) -> list[dict]:
    """Records as training sees them: difficult boxes removed unless use_difficult, empty ones filtered."""
    out = []
    for r in records:
        if not use_difficult and r["difficult"].any():
            keep = ~r["difficult"]
            r = {**r, "boxes": r["boxes"][keep], "labels": r["labels"][keep], "difficult": r["difficult"][keep]}
        if filter_empty and len(r["boxes"]) == 0:
            continue
        out.append(r)
    return out


def collate_lists(batch: list[tuple]) -> tuple[list, list]:
    """[(image, target), ...] -> ([images], [targets]); None (a skipped bad image) is left out."""
    batch = [b for b in batch if b is not None]
    return [b[0] for b in batch], [b[1] for b in batch]


def repeat_factors(records: Sequence[dict], threshold: float) -> np.ndarray:
    """Repeat factor sampling (LVIS, Gupta et al. 2019; Detectron2's RepeatFactorTrainingSampler
    with REPEAT_THRESHOLD, MMDetection's ClassBalancedDataset with oversample_thr): f(c), the share
    of the images holding an object of class c; r(c) = max(1, sqrt(threshold / f(c))); an image's
    factor the largest of its classes' (1 for an image without objects). The records' labels are the
    objects trained on: crowd and `ignore` regions are not counted (Detectron2 counts every
    annotation, crowd ones included). -> float64[len(records)]."""
    per_image = [np.unique(np.asarray(r["labels"], np.int64)) for r in records]
    images_with = np.bincount(np.concatenate(per_image + [np.zeros(0, np.int64)]))
    share = images_with / max(len(records), 1)
    with np.errstate(divide="ignore", invalid="ignore"):  # a class no image holds: never taken
        factor = np.maximum(1.0, np.sqrt(threshold / share))
    return np.array([factor[labels].max() if len(labels) else 1.0 for labels in per_image], np.float64)


class TrainingSampler(Sampler[int]):
    """Endless indices: epoch e is randperm(size) from torch.Generator(epoch_seed(seed, e)), this
    rank's shard.

    Shards follow DistributedSampler: the permutation is padded by wrapping around to a
    multiple of world_size and rank r takes positions r, r + world_size, ... (the same indices as
    DistributedSampler's with seed epoch_seed(seed, 0); data_order 1: with seed).

    With `factors` (repeat_factors), epoch e first draws each image's count from the same
    generator, floor(r) plus one more with probability r - floor(r) (Detectron2's stochastic
    rounding), then permutes the repeated indices: an epoch's length varies around sum(r); every
    rank draws the same epoch and takes its shard.
    """

    def __init__(self, size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 data_order: int = DATA_ORDER, factors: Sequence[float] | None = None) -> None:
        self.size, self.seed, self.rank, self.world_size = size, int(seed), rank, world_size
        epoch_seed(self.seed, 0, data_order)  # a data_order it does not know: now, not at the first batch
        self.data_order = data_order
        self.factors = None if factors is None else torch.as_tensor(np.asarray(factors, np.float64), device="cpu")
        if self.factors is not None and (len(self.factors) != size or not bool((self.factors >= 1).all())):
            raise ValueError(f"TrainingSampler: factors must be {size} values of at least 1")

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """Epoch `epoch`'s indices in order, every rank's (before sharding and padding)."""
        gen = torch.Generator()
        gen.manual_seed(epoch_seed(self.seed, epoch, self.data_order))
        if self.factors is None:
            return torch.randperm(self.size, generator=gen, device="cpu")
        whole = torch.floor(self.factors)
        drawn = torch.rand(self.size, generator=gen, dtype=torch.float64, device="cpu")
        counts = whole + (drawn < self.factors - whole)
        repeated = torch.repeat_interleave(torch.arange(self.size, device="cpu"), counts.long())
        return repeated[torch.randperm(len(repeated), generator=gen, device="cpu")]

    def __iter__(self) -> Iterator[int]:
        epoch = 0
        while True:
            perm = self.epoch_indices(epoch)
            length = len(perm)
            total = math.ceil(length / self.world_size) * self.world_size
            perm = perm.repeat(math.ceil(total / length))[:total]  # pad by wrapping around
            yield from perm[self.rank:total:self.world_size].tolist()
            epoch += 1


class GroupedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of `batch_size` (index, sample seed) pairs whose indices share a group id
    (aspect-ratio grouping).

    The first `start` batches are dropped (resuming); only indices are drawn for them. The
    sample seed is a function of (seed, batch number, position), so augmentation does not
    depend on which worker loads a sample or on where a run was resumed.
    """

    def __init__(self, sampler: Sampler[int], groups: Sequence[int], batch_size: int, start: int = 0,
                 seed: int = 0) -> None:
        self.sampler, self.groups, self.batch_size, self.start = sampler, list(groups), batch_size, start
        self.seed = int(seed)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = itertools.islice(enumerate(self._batches()), self.start, None)
        for number, batch in batches:
            seeds = np.random.SeedSequence([self.seed, number]).generate_state(len(batch))
            yield list(zip(batch, (int(s) for s in seeds)))

    def _batches(self) -> Iterator[list[int]]:
        buckets: dict[int, list[int]] = {}
        for index in self.sampler:
            bucket = buckets.setdefault(self.groups[index], [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()


class SerializedRecords:
    """Records pickled into one numpy buffer.

    A list of dicts read by forked workers gets copied page by page as reference
    counts change (copy-on-read); one flat byte buffer is shared for real.
    """

    def __init__(self, records: Sequence[dict]) -> None:
        blobs = [np.frombuffer(pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8) for r in records]
        self._offsets = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._buffer = np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> dict:
        start = int(self._offsets[index - 1]) if index > 0 else 0
        return pickle.loads(memoryview(self._buffer[start:int(self._offsets[index])]))


class TrainDataset(Dataset):
    """index -> (uint8 Tensor[3,H,W] transformed, {"boxes": float32[N,4], "labels": int64[N]})."""

    def __init__(self, records: Sequence[dict], transform: Callable, *, skip_bad_images: bool,
                 groups: Sequence[int], exif_orientation: bool = True) -> None:
        self.records = SerializedRecords(records)
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.exif_orientation = exif_orientation
        self.groups = np.asarray(groups)
        self.bad = _shared_flags(len(records))
        self._rng = np.random.default_rng(0)

    def reseed(self, seed: int) -> None:
        """Seeds replacement picks and the transform (before every sample, from its sample seed)."""
        self._rng = np.random.default_rng(seed)
        if hasattr(self.transform, "set_seed"):
            self.transform.set_seed(seed)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, dict]:
        image, target, _ = self.sample(item)
        return image, target

    def sample(self, item: tuple[int, int]) -> tuple[torch.Tensor, dict, dict]:
        """(image, target, the record it was made from: another than item's index when that
        image was unreadable and skip_bad_images replaced it)."""
        index, sample_seed = item
        self.reseed(sample_seed)
        for _ in range(_MAX_REPLACEMENTS):
            record = self.records[index]
            img = _read_checked(record, index, self.skip_bad_images, self.bad, self.exif_orientation)
            if img is not None:
                break
            index = self._replacement(index, record["file_name"])
        else:
            raise DataError(f"{_MAX_REPLACEMENTS} unreadable images in a row; last: {record['file_name']}")
        img, boxes, labels = self.transform(img, record["boxes"], record["labels"])
        target = {"boxes": torch.as_tensor(boxes, dtype=torch.float32, device="cpu").reshape(-1, 4),
                  "labels": torch.as_tensor(labels, dtype=torch.int64, device="cpu").reshape(-1)}
        return _to_chw_tensor(img), target, record


    def _replacement(self, index: int, file_name: str) -> int:
        """An image to stand in for a bad one: of the same aspect-ratio group (the batch then
        pads little), not known to be bad; another group's when that group has none left."""
        good = self.bad.numpy() == 0
        for candidates in (np.flatnonzero((self.groups == self.groups[index]) & good), np.flatnonzero(good)):
            if len(candidates):
                return int(self._rng.choice(candidates))
        raise DataError(f"no readable training image is left (dataloader.skip_bad_images skipped every one); "
                        f"the last: {file_name}")


class TestDataset(Dataset):
    """index -> (uint8 Tensor[3,H,W] original size, record), or None for a skipped bad image."""

    def __init__(self, records: Sequence[dict], *, skip_bad_images: bool, exif_orientation: bool = True) -> None:
        self.records = SerializedRecords(records)
        self.skip_bad_images = skip_bad_images
        self.exif_orientation = exif_orientation
        self.bad = _shared_flags(len(records))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict] | None:
        record = self.records[index]
        img = _read_checked(record, index, self.skip_bad_images, self.bad, self.exif_orientation)
        return None if img is None else (_to_chw_tensor(img), record)


class TestLoader:
    """The test DataLoader without the batches that lost all their images to skip_bad_images."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], list[dict]]]:
        for images, records in self.loader:
            if images:
                yield images, records


def seed_worker(worker_id: int, *, base_seed: int) -> None:
    """worker_init_fn: seed numpy, random, torch and the data set's transform per worker, deterministically."""
    # Ctrl-C and a scheduler's SIGTERM reach the whole process group: the trainer finishes its
    # iteration and saves (GracefulStop), so the workers keep serving it instead of dying
    if get_worker_info() is not None:  # in a worker (a test may call this in its own process)
        ignore_stop_signals()
    seed = int(np.random.SeedSequence([base_seed, worker_id + 1]).generate_state(1)[0])
    np.random.seed(seed)
    random.seed(seed)
    torch.manual_seed(seed)
    info = get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):
        info.dataset.reseed(seed)


def _shared_flags(size: int) -> torch.Tensor:
    """One byte per record, in shared memory: worker processes (forked or spawned) all see a
    bad image flagged by any of them, so each bad file is reported once, not once per epoch
    and worker."""
    return torch.zeros(size, dtype=torch.uint8, device="cpu").share_memory_()


def _read_checked(record: dict, index: int, skip: bool, bad: torch.Tensor,
                  exif_orientation: bool = True) -> np.ndarray | None:
    """read_image + size check against the annotation; None when skipping bad images (a
    warning the first time a file fails, then not even a read). The data set's startup check
    (orientation.check_image_sizes) has compared the headers already; this catches a file
    changed since, or one whose header PIL could not parse."""
    if skip and bad[index]:
        return None
    try:
        img = read_image(record["file_name"], exif_orientation=exif_orientation)
        if img.shape[:2] != (record["height"], record["width"]):
            view = "as viewed, EXIF orientation applied" if exif_orientation else "as stored, EXIF orientation ignored"
            raise DataError(f"image {record['file_name']} is {img.shape[1]}x{img.shape[0]} (WxH, {view}: "
                            f"input.exif_orientation) but its annotation says {record['width']}x{record['height']}; "
                            "boxes would be wrong")
        return img
    except DataError as e:
        if not skip:
            raise
        bad[index] = 1
        logger.warning("skipping a bad image (dataloader.skip_bad_images; reported once per file): %s", e)
        return None


def _to_chw_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))  # (H, W, 3) -> (3, H, W)


def _process_seed(seed: int, rank: int) -> int:
    """Distinct, reproducible augmentation seed per rank."""
    return int(np.random.SeedSequence([int(seed) % 2**64, rank]).generate_state(1)[0])
