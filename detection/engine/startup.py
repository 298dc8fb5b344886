"""The start and the end of a training run around the loop (trainer.py): the training and
test sets built and checked before anything is written (a wrong `ann_file` in `datasets.test`
stops the run there, not at its first evaluation hours later), the training loader, the
summary that names them, and what a run that stops before its first iteration takes back.
"""
from __future__ import annotations

import logging
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from detection.config import Config, ConfigError
from detection.data.dataset_info import DatasetInfo
from detection.engine import distributed as du
from detection.modeling.precision import amp_dtype, training_amp
from detection.utils.text import counted, first_few

logger = logging.getLogger(__name__)

EVENT_FILES = "events.out.tfevents.*"  # log.tensorboard's files in the output folder


def check_initial_weights(cfg: Config) -> None:
    """A new run with frozen norms or frozen stages must start from weights: frozen at their
    initial values (scale 1, shift 0) the norms normalise nothing, and the layers freeze_at holds
    stay random, for the whole schedule (Detectron2 trains so without a word when MODEL.WEIGHTS
    is empty). One error instead, saying what to give."""
    backbone = cfg.model.backbone
    if cfg.model.weights or backbone.weights:
        return
    frozen = ["model.backbone.norm is frozen_bn (the norms would stay at their initial values, normalising "
              "nothing)"] if backbone.norm == "frozen_bn" else []
    frozen += [f"model.backbone.freeze_at is {backbone.freeze_at} (the stages it freezes would stay random)"] \
        if backbone.freeze_at > 0 else []
    if frozen:
        raise ConfigError(f"{' and '.join(frozen)}, but no weights are given (model.weights and model.backbone.weights "
                          "are null), for the whole run; give ImageNet weights (model.backbone.weights=PATH or "
                          "'torchvision:IMAGENET1K_V1') or a detector (model.weights=PATH), or train from scratch "
                          "with trainable norms (model.backbone.norm=gn or bn, model.backbone.freeze_at=0)")


def build_train_datasets(cfg: Config, resumed: tuple[Path, Sequence[str]] | None = None) -> list[DatasetInfo]:
    """The training sets, checked against each other, the model's classes and the number of
    processes: before anything is written, so a run that fails here leaves no folder.
    `resumed`: the checkpoint a resume goes on from and its class names, which the data's must
    equal, in order."""
    from detection.data.catalog import concat_datasets, get_datasets, in_one_label_space

    world = du.get_world_size()
    if cfg.solver.ims_per_batch % world:
        raise ConfigError(f"solver.ims_per_batch={cfg.solver.ims_per_batch} is not divisible by the "
                          f"{world} processes")
    datasets = get_datasets(cfg.datasets.train, cfg.datasets.root, skip_bad_images=cfg.dataloader.skip_bad_images,
                            exif_orientation=cfg.input.exif_orientation)
    datasets = in_one_label_space(datasets)  # the same classes in every set (by name), or a DataError
    names = concat_datasets(datasets).class_names
    which = (f"the training sets {', '.join(d.name for d in datasets)} have" if len(datasets) > 1
             else f"the training set {datasets[0].name} has")
    if resumed and resumed[1] and list(resumed[1]) != list(names):
        raise ConfigError(resumed_classes_problem(resumed[0], list(resumed[1]), list(names), which))
    if cfg.model.num_classes != len(names):
        raise ConfigError(f"model.num_classes is {cfg.model.num_classes} but {which} {len(names)} classes "
                          f"({', '.join(names)}): set model.num_classes={len(names)}{_unused_classes(datasets, names)}")
    if cfg.model.class_names and list(cfg.model.class_names) != list(names):
        order = ("; a COCO json's classes are numbered 1..K in ascending category id, not in the order the json "
                 "lists them: give them in that order, or leave model.class_names out to take the data's"
                 if sorted(cfg.model.class_names) == sorted(names) and datasets[0].kind == "coco" else "")
        raise ConfigError(f"model.class_names is {list(cfg.model.class_names)} but {which} the classes "
                          f"{list(names)}{order}")
    return datasets


def resumed_classes_problem(path: Path, trained: list[str], data: list[str], which: str) -> str:
    """The error of a resume onto data whose classes are not the checkpoint's, in its order (a
    growing-data trial: a new export listing the same classes in another order was resumed, and
    each classifier row went on as another class, every name swapped, without a word)."""
    if sorted(trained) == sorted(data):
        what = "the same classes in another order"
    else:
        added, gone = [n for n in data if n not in trained], [n for n in trained if n not in data]
        what = "other classes" + (f" (new: {first_few(added, 5)})" if added else "") + (
            f" (gone: {first_few(gone, 5)})" if gone else "")
    return (f"--resume: {path} was trained on {first_few(trained, 8)} (its classifier's rows, "
            f"in that order) but {which} {first_few(data, 8)}: {what}. A resume cannot change what the rows mean "
            f"(each would go on training as another class); start a new run from its weights, which matches the "
            f"classes by name (the same ones reordered, others start fresh): model.weights={path} and a new "
            f"output_dir, without --resume")


def _unused_classes(datasets: list[DatasetInfo], names: list[str]) -> str:
    """The message's last words when some classes have no object in the training data (a
    Roboflow export lists its project as category 0, above the real classes): which, and that
    they can be taken out of the annotation file instead."""
    used = {d.class_names[int(label) - 1] for d in datasets for r in d.records  # each set's own numbering
            for label in np.asarray(r["labels"]).reshape(-1)}
    unused = [name for name in names if name not in used]
    if not unused or len(unused) == len(names):
        return ""
    return (f"; {', '.join(repr(n) for n in unused)} {'has' if len(unused) == 1 else 'have'} no object in the "
            f"training data: a class the model would learn never to find (an export's project or placeholder "
            f"category?), which taking out of the annotation file's categories leaves {len(names) - len(unused)}")


def build_train_data_loader(cfg: Config, datasets: list[DatasetInfo], start_iter: int = 0,
                            data_order: int | None = None) -> Iterable:
    """The config's training loader over `datasets` (this process's share of each batch), from
    iteration start_iter on: what training iterates and tools/benchmark.py times. `data_order`:
    a resumed run's (its checkpoint's; default loader.DATA_ORDER)."""
    from detection.data.loader import DATA_ORDER, build_train_loader
    from detection.data.transforms import build_train_transform

    world = du.get_world_size()
    return build_train_loader(
        datasets, transform=build_train_transform(cfg), images_per_batch=cfg.solver.ims_per_batch // world,
        num_workers=cfg.dataloader.num_workers, aspect_ratio_grouping=cfg.dataloader.aspect_ratio_grouping,
        filter_empty=cfg.dataloader.filter_empty, seed=cfg.seed, use_difficult=cfg.dataloader.use_difficult,
        start_iter=start_iter, data_order=DATA_ORDER if data_order is None else data_order,
        repeat_threshold=cfg.dataloader.repeat_threshold)


def training_data_id(datasets: Sequence[DatasetInfo]) -> dict:
    """The training images as a checkpoint keeps them: their count and a digest of each set's
    name and image ids (not their paths: data moved to another datasets.root is the same data)."""
    import hashlib

    digest = hashlib.sha256()
    count = 0
    for dataset in datasets:
        for record in dataset.records:
            digest.update(f"{dataset.name}/{record['image_id']}\n".encode("utf-8", "surrogateescape"))
            count += 1
    return {"images": count, "sha256": digest.hexdigest()[:16]}


def other_data_note(saved: dict | None, now: dict, path: Path) -> str | None:
    """The warning for a resume whose training images are not the run's (a datasets.root that
    names other data: accepted in silence before, and the run then no longer resumes exactly);
    None when they are, or the checkpoint does not say (written before 2026-12-07)."""
    if not saved or saved == now:
        return None
    return (f"--resume: the training images are not those {path} was trained on ({saved.get('images')} images "
            f"then, {now['images']} now{', other ones' if saved.get('images') == now['images'] else ''}): the run "
            "goes on, on today's data, in another order than it would have (datasets.root, datasets.train or "
            "the annotation files changed)")


def build_test_datasets(cfg: Config, class_names: Sequence[str]) -> list[DatasetInfo]:
    """datasets.test read and checked as tools/eval.py checks them (annotations, image files,
    a results folder each, classes): their classes must be the training classes, or a subset
    of them by name (scored so, and said here). A ValueError (DataError) otherwise."""
    from detection.data.catalog import get_datasets
    from detection.evaluation.classes import label_map_for_test_set, subset_note
    from detection.evaluation.outputs import results_subfolders
    from detection.evaluation.test_sets import evaluator_class

    datasets = get_datasets(cfg.datasets.test, cfg.datasets.root, skip_bad_images=cfg.dataloader.skip_bad_images,
                            exif_orientation=cfg.input.exif_orientation)
    results_subfolders([d.name for d in datasets])  # two sets that would share a results folder
    for dataset in datasets:
        evaluator_class(dataset)  # one that cannot be scored stops the run now, not at its first evaluation
        if label_map_for_test_set(dataset.name, dataset.class_names, class_names, len(class_names),
                                  "the training classes are"):
            logger.info("%s", subset_note(dataset.name, dataset.class_names, class_names))
    return datasets


def summary_of_test_sets(cfg: Config, datasets: Sequence[DatasetInfo]) -> list[str]:
    """The start summary's lines for the test sets, named as the training sets are (the data
    set's name, as eval.py's results folders and the metrics keys name them)."""
    period = f" (evaluated every {cfg.test.eval_period} iterations)" if cfg.test.eval_period else ""
    if not datasets:
        return ["test sets: none" + (": test.eval_period has nothing to evaluate" if period else "")]
    lines = [f"test set {d.name}: {counted(len(d.records), 'image')}, {counted(d.num_classes, 'class', 'classes')}"
             + (_test_objects(d) if d.has_annotations else " (no annotations: files for its evaluation server)")
             for d in datasets]
    return lines + ([f"test sets evaluated every {cfg.test.eval_period} iterations"] if period else [])


def _test_objects(d: DatasetInfo) -> str:
    """", objects per class: ..." of a test set, with its images without any (a curator's trial:
    a test image whose labels were all deleted was never mentioned; Detectron2 prints every
    set's per-class histogram)."""
    counts = np.bincount(np.concatenate([np.asarray(r["labels"], np.int64) for r in d.records]
                                        + [np.zeros(0, np.int64)]), minlength=d.num_classes + 1)
    empty = sum(1 for r in d.records if not len(r["labels"]))
    return (f" ({empty} without objects)" if empty else "") + ", objects per class: " + ", ".join(
        f"{n} {c}" for n, c in zip(d.class_names, counts[1:]))


def summary_lines(cfg: Config, datasets: list[DatasetInfo], device: torch.device,
                  test_sets: list[DatasetInfo]) -> list[str]:
    """What the run trains on, where, and how: printed at its start (and kept in log.txt)."""
    from detection.data.loader import repeat_factors, training_records
    from detection.utils.environment import command_line, environment, environment_line

    lines, images, objects, trained = [], 0, {}, []
    for d in datasets:
        kept = training_records(d.records, filter_empty=cfg.dataloader.filter_empty,
                                use_difficult=cfg.dataloader.use_difficult)
        images += len(kept)
        trained += kept
        counts = np.bincount(np.concatenate([r["labels"] for r in kept] + [np.zeros(0, np.int64)]),
                             minlength=d.num_classes + 1)
        dropped = f" ({len(d.records) - len(kept)} without boxes dropped: dataloader.filter_empty)" \
            if cfg.dataloader.filter_empty else ""
        lines.append(f"training set {d.name}: {counted(len(kept), 'image')}{dropped}, "
                     f"{counted(d.num_classes, 'class', 'classes')}, objects "
                     "per class: " + ", ".join(f"{n} {c}" for n, c in zip(d.class_names, counts[1:])))
        for n, c in zip(d.class_names, counts[1:]):
            objects[n] = objects.get(n, 0) + int(c)
    absent = [n for n, c in objects.items() if c == 0]  # a long tail's, lost in a line of hundreds (a trial)
    if absent:
        lines.append(f"{len(absent)} of the {len(objects)} classes have no object to train on "
                     f"({first_few(absent, 5)}): the model learns never to find them")
    lines += summary_of_test_sets(cfg, test_sets)
    epoch = images  # the images an epoch shows
    if cfg.dataloader.repeat_threshold > 0 and trained:
        threshold = cfg.dataloader.repeat_threshold
        factors = repeat_factors(trained, threshold)
        epoch = float(factors.sum())
        line = f"repeat factor sampling (dataloader.repeat_threshold {threshold:g}): "
        if (factors > 1).any():
            line += (f"{int((factors > 1).sum())} of the {len(trained)} images repeated, up to {factors.max():.3g}x; "
                     f"an epoch about {epoch:.0f} images")
        else:  # LVIS's 0.001 on a set of hundreds: no class is that rare (a long-tail trial)
            holding = np.bincount(np.concatenate([np.unique(r["labels"]) for r in trained]
                                                 + [np.zeros(0, np.int64)]))[1:]
            rarest = int(holding[holding > 0].min()) if (holding > 0).any() else 0
            line += (f"no image repeated: the rarest class is in {rarest} of the {len(trained)} images "
                     f"({rarest / len(trained):.2g} of them), not under the threshold, a share of the images"
                     if rarest else "no image repeated: no image holds an object")
        lines.append(line)
    s, world = cfg.solver, du.get_world_size()
    # torchvision's --batch-size is per GPU and its schedule in epochs: both said here (a trial)
    lines.append(f"batch: {counted(s.ims_per_batch, 'image')} an iteration"
                 + (f" ({s.ims_per_batch // world} per process)"
                 if world > 1 else "") + f", base_lr {s.base_lr:g}, {s.max_iter} iterations" +
                 (f": {s.max_iter * s.ims_per_batch / epoch:.3g} epochs of the {counted(images, 'training image')}"
                  + (" (repeated as above)" if epoch != images else "") if images else ""))
    amp = str(amp_dtype(device)).removeprefix("torch.") if training_amp(cfg.solver.amp, device) else \
        "off (no bfloat16 instructions: float32)" if cfg.solver.amp else "off"
    lines.append(f"device: {device}, torch threads: {torch.get_num_threads()}, AMP: {amp}, "
                 f"fast path: {'on' if cfg.model.fast_path else 'off'}, processes: {du.get_world_size()}")
    lines.append(f"datasets.root: {Path(cfg.datasets.root).resolve()}")
    lines.append(f"output folder: {Path(cfg.output_dir).resolve()}")
    lines.append(f"command: {command_line()}")  # with the versions and the code's: the run can be made again
    lines.append(environment_line(environment(device)))
    return lines


def parameters_line(model: torch.nn.Module, freeze_at: int) -> str:
    """How much of the model trains: model.backbone.freeze_at's stages are frozen (5 freezes res5
    too, the box head's trunk here; Detectron2's C4 never freezes res5, so its FREEZE_AT 5 is 4 here)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = ("stem", "res2", "res3", "res4", "res5")[:freeze_at]
    return (f"parameters: {trainable / 1e6:.2f}M trained of {total / 1e6:.2f}M (model.backbone.freeze_at "
            f"{freeze_at}: {', '.join(frozen) or 'nothing'} frozen)")


def small_objects_line(dataset: DatasetInfo, min_size: int, max_size: int, anchor_sizes: Sequence[int],
                       size_key: str, what: str = "test", tile: int = 0, *, max_key: str | None = None,
                       aspect_ratios: Sequence[float] = (1.0,), stride: int = 16,
                       background: float = 0.3) -> str | None:
    """A warning when a set's objects, at the size the model sees them (each image resized to
    `min_size` / `max_size`), are too small for the anchors. Either half of them are under half
    the smallest anchor: their IoU with any anchor is then under 0.25, so each is matched only as
    its best anchor's and few are proposed (a dense-scene trial: 4000x3000 images shrunk to
    640x480 made their 8-20 px objects 1-2 px, AP 0 with no word). Or a tenth or more of them may
    lie between the anchor centres (every `stride` pixels) with no anchor overlapping them at all
    (an object and an anchor whose sides add up to less than the stride): the RPN then has no
    target for them (a small-object trial: anchors of 4 px, as the first warning advised, left
    58% of 6 px objects none, and nothing was said). The size of an object: the square root of
    its area. `tile`: test.tiles.size (an image larger than it is run in tiles of that side, each
    resized as an image)."""
    from detection.modeling.resize import resized_shape

    sides, shapes, capped = [], [], 0
    for record in dataset.records:
        boxes = np.asarray(record.get("boxes", ()), np.float64).reshape(-1, 4)
        height, width = record.get("height") or 0, record.get("width") or 0
        if not len(boxes) or not height or not width:
            continue
        if tile and max(height, width) > tile:  # run as tiles: each tile is the image the model resizes
            height, width = min(height, tile), min(width, tile)
        new_h, new_w = resized_shape(height, width, min_size, max_size)
        capped += min(new_h, new_w) < min_size  # the longer side's cap set the scale
        w = (boxes[:, 2] - boxes[:, 0]).clip(0) * (new_w / width)
        h = (boxes[:, 3] - boxes[:, 1]).clip(0) * (new_h / height)
        sides.append(np.sqrt(w * h))
        shapes.append(np.stack([w, h], 1))
    if not sides:
        return None
    median = float(np.median(np.concatenate(sides)))
    smallest = min(anchor_sizes)
    max_key = max_key or size_key.replace("min_size", "max_size")
    capping = capped * 2 > len(sides)  # most images' scale set by the longer side's cap (a panorama's)
    at = f"{max_key} {max_size}, which caps most of these images' scale" if capping else f"{size_key} {min_size}"
    at += f" in test.tiles.size {tile} px tiles" if tile else ""
    raise_key = max_key if capping else size_key
    tiles = " (test.tiles.size at test time)" if what == "test" and not tile else ""
    if median < smallest / 2:
        below = f", below the RPN's background threshold {background:g}" if background >= 0.25 else ""
        smaller = f", train with smaller model.anchors.sizes (not under {stride}: model.anchors.stride)" \
            if smallest > stride else ""
        return (f"{what} set {dataset.name}: half its objects are under {median:.1f} px (the square root of their "
                f"area) at {at}, under half the smallest anchor (model.anchors.sizes: {smallest}): their IoU with "
                f"every anchor is under 0.25{below}, so few are proposed; raise {raise_key}{smaller}, or cut the "
                f"images into tiles{tiles}")
    objects = np.concatenate(shapes)
    objects = objects[np.linspace(0, len(objects) - 1, min(len(objects), _SHARE_SAMPLE)).astype(int)]
    share = _between_anchors(objects, anchor_sizes, aspect_ratios, stride)
    if share < 0.1:
        return None
    # the smallest anchor size (with these aspect ratios) under which fewer than a tenth are missed: one of
    # the stride's size reaches every object with an area (a review: a size from the objects' square root of
    # area was negative for 1 x 300 px ones, and too small for thin ones)
    enough = next(size for size in range(1, stride + 1)
                  if _between_anchors(objects, [size], aspect_ratios, stride) < 0.1)
    return (f"{what} set {dataset.name}: about {share:.0%} of its objects, at {at}, lie between the anchor centres "
            f"(every {stride} px) with no anchor overlapping them (model.anchors.sizes {list(anchor_sizes)}: an "
            f"object and an anchor whose sides add up to under {stride} px can miss each other), so the RPN has "
            f"no target for them and few are proposed; anchors of {enough} px or more miss under a tenth of them; "
            f"or raise {raise_key}, or cut the images into tiles{tiles}")


_SHARE_SAMPLE = 20000  # objects (evenly spaced in the set) whose share between anchors is computed: COCO's 860k
# boxes x 15 anchors took a few hundred MB at each training start


def _between_anchors(shapes: np.ndarray, sizes: Sequence[int], aspect_ratios: Sequence[float], stride: int
                     ) -> float:
    """The expected share of objects of these (width, height)s (N, 2), placed anywhere, that no
    anchor overlaps (anchors of `sizes` x `aspect_ratios`, ratio = height / width, centred every
    `stride` pixels). Anchor a overlaps an object whose centre is (dx, dy) from the nearest anchor
    centre when |dx| < (w + w_a) / 2 and |dy| < (h + h_a) / 2: the places covered are a union of
    rectangles centred there, whose area is summed in strips of x, each as high as the tallest
    rectangle reaching past it."""
    half = stride / 2
    ratios = np.sqrt(np.asarray(aspect_ratios, np.float64))
    anchor_w = (np.asarray(sizes, np.float64)[:, None] / ratios[None]).ravel()  # (A,)
    anchor_h = (np.asarray(sizes, np.float64)[:, None] * ratios[None]).ravel()
    reach_x = np.minimum((shapes[:, :1] + anchor_w[None]) / 2, half)  # (N, A)
    reach_y = np.minimum((shapes[:, 1:] + anchor_h[None]) / 2, half)
    order = np.argsort(reach_x, axis=1)
    reach_x, reach_y = np.take_along_axis(reach_x, order, 1), np.take_along_axis(reach_y, order, 1)
    strips = np.diff(reach_x, axis=1, prepend=0.0)  # x from the previous reach to this one
    tallest = np.maximum.accumulate(reach_y[:, ::-1], axis=1)[:, ::-1]  # of the rectangles reaching past it
    return float(1.0 - ((strips * tallest).sum(1) / half ** 2).mean())


def small_objects_warnings(cfg: Config, datasets: Sequence[DatasetInfo], test_sets: Sequence[DatasetInfo]
                           ) -> list[str]:
    """small_objects_line of each training set (at the largest input.min_size_train) and test set
    with annotations (at input.min_size_test, or with test.aug on at the largest of its sizes: the
    objects' largest view); training and eval.py say them."""
    a = cfg.model.anchors
    anchors = dict(aspect_ratios=a.aspect_ratios, stride=a.stride, background=cfg.model.rpn.iou_thresholds[0])
    lines = [small_objects_line(d, max(cfg.input.min_size_train), cfg.input.max_size_train, a.sizes,
                                "input.min_size_train", "training", **anchors) for d in datasets]
    if cfg.test.aug.enabled:  # TTA runs at its own sizes only (a small-object trial: input.min_size_test was checked)
        sizes, keys = (max(cfg.test.aug.min_sizes), cfg.test.aug.max_size), ("test.aug.min_sizes' largest",
                                                                             "test.aug.max_size")
    else:
        sizes, keys = (cfg.input.min_size_test, cfg.input.max_size_test), ("input.min_size_test", "input.max_size_test")
    lines += [small_objects_line(d, *sizes, a.sizes, keys[0], tile=cfg.test.tiles.size, max_key=keys[1], **anchors)
              for d in test_sets if d.has_annotations]
    return [line for line in lines if line]


def shared_images_warnings(datasets: Sequence[DatasetInfo], test_sets: Sequence[DatasetInfo]) -> list[str]:
    """Image files in two training sets (other than one set listed twice, to see it twice as
    often), or in a training set and a test set: a pseudo-labelling trial trained the labelled
    images again under a teacher's boxes, and a held-out set as a training set, without a word
    (Detectron2 and MMDetection say nothing either). Links are followed, and a copy with the same
    bytes under another name or folder counts too (a split made by copying files); a copy saved
    again (re-encoded) is another image."""
    from detection.data.catalog import image_paths, same_listing

    distinct: list[DatasetInfo] = []  # a set listed twice is said of once
    for d in datasets:
        if not any(same_listing(d, seen) for seen in distinct):
            distinct.append(d)
    datasets, paths = distinct, [image_paths(d) for d in distinct]
    lines = []
    for i, a in enumerate(datasets):
        for j in range(i + 1, len(datasets)):
            count, named = _shared_files(paths[i], paths[j])
            if count:
                lines.append(f"training sets {a.name} and {datasets[j].name} share {count} image "
                             f"file{'s' if count != 1 else ''} ({named}): each trains with both sets' boxes (a "
                             "teacher's pseudo-labels over labelled images?); list one set twice to see it twice as "
                             "often")
    for test in test_sets:
        tested = image_paths(test)
        for d, p in zip(datasets, paths):
            count, named = _shared_files(tested, p)
            if count:
                lines.append(f"test set {test.name} shares {count} of its {len(tested)} image files with training "
                             f"set {d.name} ({named}): its metrics are not of held-out images")
    return lines


def _shared_files(ours: set[str], theirs: set[str]) -> tuple[int, str]:
    """How many files of `ours` `theirs` has too, the same file or a copy with the same bytes,
    and the first few named (each copy with theirs)."""
    from detection.utils.files import same_bytes

    by_path, copies = ours & theirs, same_bytes(ours, theirs)
    named = first_few(sorted(by_path), 2) if by_path else ""
    if copies:
        pairs = [f"{mine} = {copies[mine]}" for mine in sorted(copies)]
        named += f"{'; ' if named else ''}{'a copy' if len(copies) == 1 else f'{len(copies)} copies'} with the " \
                 f"same bytes under another path: {first_few(pairs, 2)}"
    return len(by_path) + len(copies), named


def schedule_warnings(cfg: Config) -> list[str]:
    """What in the lr schedule never happens within solver.max_iter (as Detectron2 warns of steps
    past MAX_ITER): easy to leave behind when a long config's max_iter is cut for a short run;
    steps inside the warmup, where this schedule and Detectron2's differ; and evaluations that
    fall between the checkpoints solver.keep_checkpoints keeps."""
    s, out = cfg.solver, []
    late = [x for x in s.steps if x >= s.max_iter]
    if late and s.lr_schedule == "multistep":
        out.append(f"solver.steps {', '.join(map(str, late))} {'is' if len(late) == 1 else 'are'} not below "
                   f"solver.max_iter {s.max_iter}: the lr is not lowered there (give steps within the run)")
    early = [x for x in s.steps if x < min(s.warmup_iters, s.max_iter)]
    if early and s.lr_schedule == "multistep":
        out.append(f"solver.steps {', '.join(map(str, early))} {'is' if len(early) == 1 else 'are'} inside the "
                   f"warmup (solver.warmup_iters {s.warmup_iters}): the warmup ramp is multiplied by gamma from "
                   "there (Detectron2 ramps to the lowered lr instead; the two differ until the warmup ends): put "
                   "the steps after the warmup")
    if s.warmup_iters >= s.max_iter:
        out.append(f"solver.warmup_iters {s.warmup_iters} is not below solver.max_iter {s.max_iter}: the whole "
                   f"run is warmup and the lr never reaches solver.base_lr {s.base_lr:g}")
    period = cfg.test.eval_period if cfg.datasets.test else 0
    if s.keep_checkpoints and period and period % s.checkpoint_period and cfg.test.save_best is None:
        out.append(f"test.eval_period {period} is not a multiple of solver.checkpoint_period "  # kept to pick by AP
                   f"{s.checkpoint_period}: most evaluated iterations have no checkpoint kept "
                   "(solver.keep_checkpoints) to pick by its AP; make the one a multiple of the other, or "
                   "test.save_best=AP keeps the best evaluation's weights as model_best.pth")
    return out


def event_files(out_dir: Path) -> set[Path]:
    return set(out_dir.glob(EVENT_FILES))


def undo_unstarted_run(out_dir: Path, *, events_before: set[Path], created: Sequence[Path]) -> None:
    """A run that stopped before its first iteration leaves nothing of its own: the files it
    `created` (config.yaml, log.txt: not a resumed run's, which were there before) and the
    TensorBoard event files it opened, empty. The lock's release then removes a folder the run
    created."""
    for path in [*sorted(event_files(out_dir) - events_before), *created]:
        path.unlink(missing_ok=True)


def final_line(path: Path, iteration: int, has_test_sets: bool = True) -> str:
    """The run's closing line: where the trained model went and how to evaluate it."""
    command = f"python tools/eval.py --weights {shlex.quote(str(Path(path).resolve()))}"  # from any folder
    how = f"{command} evaluates it on datasets.test" if has_test_sets else \
        f"{command} 'datasets.test=[...]' evaluates it: the run's datasets.test is empty"
    return f"training finished at iteration {iteration}: the model is {path.resolve()} ({how})"


def note_stop(err: BaseException, iteration: int, kept: str) -> None:
    """An error that stops the loop (a bad image in a loader worker, a failed evaluation) gets
    a note saying which checkpoint the run left (`kept`: loop_checkpoints.what_is_kept): shown under
    its traceback (Python 3.11+), and by tools/train_det.py on the error's one line."""
    line = f"training stopped at iteration {iteration}, {kept}"
    if hasattr(err, "add_note"):
        err.add_note(line)
    else:  # Python 3.10: the same attribute, read by train_det.py
        err.__notes__ = [*getattr(err, "__notes__", []), line]
