"""Data set catalog: a config entry (known name or explicit mapping) -> DatasetInfo.

A known name is a fixed layout under `datasets.root` (see KNOWN_DATASETS); an
explicit mapping points at any COCO json + image folder or any VOC-layout folder
with its own class list, so custom data needs no code change.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import stat
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np

from detection.data import DataError
from detection.data.dataset_info import DatasetInfo  # re-exported: its old home
from detection.utils.files import in_other_unicode_form
from detection.utils.text import first_few

logger = logging.getLogger(__name__)

# name -> explicit entry; paths are relative to datasets.root. The COCO 2014 names and files are
# Detectron's and Detectron2's (minival / valminusminival: Detectron's split of val2014, the
# images stay in val2014). voc_2012_test and coco_2017_test-dev have no published annotations
# (evaluation server only).
KNOWN_DATASETS: dict[str, dict[str, Any]] = {
    "coco_2014_train": {"type": "coco", "ann_file": "coco/annotations/instances_train2014.json",
                        "image_root": "coco/train2014"},
    "coco_2014_val": {"type": "coco", "ann_file": "coco/annotations/instances_val2014.json",
                      "image_root": "coco/val2014"},
    "coco_2014_minival": {"type": "coco", "ann_file": "coco/annotations/instances_minival2014.json",
                          "image_root": "coco/val2014"},
    "coco_2014_valminusminival": {"type": "coco", "ann_file": "coco/annotations/instances_valminusminival2014.json",
                                  "image_root": "coco/val2014"},
    "coco_2017_train": {"type": "coco", "ann_file": "coco/annotations/instances_train2017.json",
                        "image_root": "coco/train2017"},
    "coco_2017_val": {"type": "coco", "ann_file": "coco/annotations/instances_val2017.json",
                      "image_root": "coco/val2017"},
    # no annotations (the json has none): evaluation writes the results file for COCO's server
    "coco_2017_test-dev": {"type": "coco", "ann_file": "coco/annotations/image_info_test-dev2017.json",
                           "image_root": "coco/test2017"},
    "voc_2007_trainval": {"type": "voc", "root": "VOCdevkit/VOC2007", "split": "trainval"},
    "voc_2007_train": {"type": "voc", "root": "VOCdevkit/VOC2007", "split": "train"},
    "voc_2007_val": {"type": "voc", "root": "VOCdevkit/VOC2007", "split": "val"},
    "voc_2007_test": {"type": "voc", "root": "VOCdevkit/VOC2007", "split": "test"},
    "voc_2012_trainval": {"type": "voc", "root": "VOCdevkit/VOC2012", "split": "trainval"},
    "voc_2012_train": {"type": "voc", "root": "VOCdevkit/VOC2012", "split": "train"},
    "voc_2012_val": {"type": "voc", "root": "VOCdevkit/VOC2012", "split": "val"},
    "voc_2012_test": {"type": "voc", "root": "VOCdevkit/VOC2012", "split": "test", "annotations": False},
    "shapes_train": {"type": "coco", "ann_file": "shapes/annotations/instances_train.json",
                     "image_root": "shapes/train"},
    "shapes_val": {"type": "coco", "ann_file": "shapes/annotations/instances_val.json",
                   "image_root": "shapes/val"},
    # held out: the demo reports on it; tune on shapes_val (tools/make_shapes.py --num-test)
    "shapes_test": {"type": "coco", "ann_file": "shapes/annotations/instances_test.json",
                    "image_root": "shapes/test"},
}

# type -> (required fields, optional fields): the one table of what an explicit data-set
# entry holds. detection/config/checks.py checks config entries against it (entry_problem) when
# the config is loaded, so a typo exits at startup, not at the first data access.
ENTRY_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "coco": (("type", "ann_file", "image_root"), ("name", "keep_classes")),
    "voc": (("type", "root", "split"), ("name", "classes", "use_07_metric", "annotations", "keep_classes")),
}
_TYPE_HELP = "coco (a COCO json + image folder) or voc (a VOC-layout folder)"


def get_dataset(entry: str | Mapping[str, Any], root: str, *, skip_bad_images: bool = False,
                check_images: bool = True, exif_orientation: bool = True) -> DatasetInfo:
    """Resolve a config entry (known name or {type: coco|voc, ...}) under `root` and load it.

    check_images: stat every image file now (check_image_files) and read every header
    (orientation.check_image_sizes), so that a missing file or one whose size is not its
    annotation's is reported at startup with all the others, not at the iteration that
    first reads it. Callers that need only the annotations (scoring a results file, class
    names) pass False. exif_orientation: images are read turned by their EXIF orientation
    tag (config input.exif_orientation), in the sizes checked here and wherever they are read.
    """
    from detection.data.orientation import check_image_sizes  # imported where used: PIL

    name, spec = _resolve_entry(entry)
    if not isinstance(entry, str):
        _check_custom_paths(spec, root, name)
    info = LOADERS[spec["type"]](spec, root, name, skip_bad_images, exif_orientation)
    if spec.get("keep_classes") and list(spec["keep_classes"]) != info.class_names:
        info = keep_only(info, spec["keep_classes"])
    _say_outside(info, _under(root, spec["image_root"] if spec["type"] == "coco" else spec["root"]))
    _check_unique_ids(info)
    info.skip_bad_images = skip_bad_images
    info.exif_orientation = exif_orientation
    if check_images:
        check_image_files(info, skip=skip_bad_images)
        check_image_sizes(info, skip=skip_bad_images)
    return info


def _say_outside(info: DatasetInfo, folder: str) -> None:
    """One warning naming the images a set's annotations place outside its folder (an absolute
    file_name, or '..': a COCO json from another machine, or made to read other files; the
    evaluation report then shows them). They are read, as Detectron2 and pycocotools read them."""
    inside = os.path.join(os.path.normpath(folder), "")
    outside = [r["file_name"] for r in info.records if not os.path.normpath(r["file_name"]).startswith(inside)]
    if outside:
        logger.warning("data set %s: %d of its %d images lie outside its image folder %s (absolute file names or "
                       "'..' in the annotations: %s): they are read from there", info.name, len(outside),
                       len(info.records), folder, first_few([os.path.normpath(p) for p in outside], 3))


def _check_unique_ids(info: DatasetInfo) -> None:
    """Evaluation keeps one result per image id (a distributed sampler's padding repeats images),
    so two records of one id would score one image's detections against the other's boxes without
    a word. The readers give each image its own id (COCO's json ids, VOC's stems); a new reader
    that does not (a.jpg and a.png of one stem) is stopped here."""
    counts = Counter(record["image_id"] for record in info.records)
    repeated = [str(image_id) for image_id, n in counts.items() if n > 1]
    if repeated:
        raise DataError(f"data set {info.name}: {len(repeated)} image ids name more than one record "
                        f"({first_few(repeated, 3)}): each image needs its own image_id")


def get_datasets(entries: Sequence[str | Mapping[str, Any]], root: str, *, skip_bad_images: bool = False,
                 check_images: bool = True, exif_orientation: bool = True) -> list[DatasetInfo]:
    """`get_dataset` for each entry of a config list (datasets.train / datasets.test)."""
    if isinstance(entries, (str, Mapping)):
        entries = [entries]
    return [get_dataset(e, root, skip_bad_images=skip_bad_images, check_images=check_images,
                        exif_orientation=exif_orientation) for e in entries]


def _check_custom_paths(spec: dict[str, Any], root: str, name: str) -> None:
    """A custom COCO entry's ann_file / image_root that is not there: one DataError naming the
    entry's field and where a relative path was looked for, without the built-in layouts'
    paragraph the reader adds (those describe the known names, not the user's own files)."""
    if spec["type"] != "coco":
        return
    for field_name, is_there in (("ann_file", os.path.isfile), ("image_root", os.path.isdir)):
        given = str(spec[field_name])
        path = _under(root, given)
        if is_there(path) or (field_name == "ann_file" and os.path.isdir(path)):  # a folder: the reader says so
            continue
        relative = "" if os.path.isabs(os.path.expanduser(given)) else \
            f" (a relative path is taken from datasets.root {os.path.abspath(root)}: datasets.root=DIR gives another)"
        what = "file" if field_name == "ann_file" else "folder"
        raise DataError(f"data set {name}: {field_name} {given!r}: {what} not found: {path}{relative}")


def _load_coco(spec: dict[str, Any], root: str, name: str, skip_bad_images: bool,
               exif_orientation: bool) -> DatasetInfo:
    from detection.data.coco import load_coco_json  # imported where used: pycocotools is slow to import

    return load_coco_json(_under(root, spec["ann_file"]), _under(root, spec["image_root"]), name=name,
                          exif_orientation=exif_orientation)


def _load_voc(spec: dict[str, Any], root: str, name: str, skip_bad_images: bool,
              exif_orientation: bool) -> DatasetInfo:
    from detection.data.voc import load_voc  # imported where used: OpenCV is slow to import

    # keep_classes without classes: the kept ones are the classes, other names' objects are left out
    # (MMDetection's VOC classes=(...)); with classes, an unknown name stays an error (a typo)
    only_kept = bool(spec.get("keep_classes")) and spec.get("classes") is None
    return load_voc(_under(root, spec["root"]), str(spec["split"]),
                    classes=spec["keep_classes"] if only_kept else spec.get("classes"),
                    use_07_metric=spec.get("use_07_metric"), name=name, skip_bad_files=skip_bad_images,
                    annotations=spec.get("annotations", True), exif_orientation=exif_orientation,
                    leave_out_other_classes=only_kept)


# type -> reader of a checked entry (spec, datasets.root, display name, skip_bad_images,
# exif_orientation: the sizes a reader takes from image headers are the viewed ones): the one
# table of data-set types; ENTRY_FIELDS above says what each type's entry holds.
LOADERS: dict[str, Callable[[dict[str, Any], str, str, bool, bool], DatasetInfo]] = {
    "coco": _load_coco,
    "voc": _load_voc,
}


def check_image_files(info: DatasetInfo, *, skip: bool) -> None:
    """One stat per image (0.2-0.7 s for 120k files, measured on a local disk with a warm cache
    on 2 busy cores): missing or empty files are one DataError listing them all (count + the
    first few), naming the annotation file; with `skip` their records are dropped instead, with
    one warning. None found at all is an error either way: the image folder is wrong. A name
    found only in its other Unicode form (NFC / NFD: a folder copied from macOS keeps é as e +
    accent, annotation tools write é) is taken in that form, with one line."""
    bad, other_form = [], 0
    for record in info.records:
        if _is_nonempty_file(record["file_name"]):
            continue
        found = in_other_unicode_form(record["file_name"], _is_nonempty_file)
        if found is None:
            bad.append(record["file_name"])
        else:
            record["file_name"], other_form = found, other_form + 1
    if other_form:
        logger.info("%s: %d image file names found on disk in another Unicode form (NFC / NFD) than %s lists them",
                    info.name, other_form, _listing_file(info))
    if not bad:
        return
    listing = (f"{info.name}: {len(bad)} of {len(info.records)} images listed in {_listing_file(info)} "
               f"are missing or empty: {first_few(bad, 3)}{_why_missing(bad[0])}")
    if len(bad) == len(info.records):
        raise DataError(f"{listing}; is the image folder right (image_root, or <root>/JPEGImages for VOC)?")
    if not skip:
        raise DataError(f"{listing}; set dataloader.skip_bad_images: true to leave them out")
    logger.warning("%s; left out (dataloader.skip_bad_images)", listing)
    bad_set = set(bad)
    info.records = [r for r in info.records if r["file_name"] not in bad_set]


def _why_missing(path: str) -> str:
    """What is wrong with a missing image's path where it can be seen ("" otherwise): an annotation
    tool's export names images with Windows separators, another case than the disk's (.JPG), or
    absolute paths of the machine it ran on (where image_root is not used)."""
    if "\\" in path:
        return " (a '\\' in the name: a Windows path? folders are separated by '/')"
    folder, name = os.path.split(path)
    if not os.path.isdir(folder):
        return (f" (its folder {folder} does not exist; a file name the annotations give as an absolute path is "
                "taken as it is, without image_root)")
    try:
        same = [f for f in os.listdir(folder) if f.lower() == name.lower() and f != name]
    except OSError:
        return ""
    return f" ({os.path.join(folder, same[0])} is on disk: file names differ in case here)" if same else ""


def _is_nonempty_file(path: str) -> bool:
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # missing, a path through a file, a NUL in the name
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size > 0


def _listing_file(info: DatasetInfo) -> str:
    """The file that lists the images: the COCO json, or the VOC split file."""
    if info.kind == "voc" and info.root and info.split is not None:
        return os.path.join(info.root, "ImageSets", "Main", f"{info.split}.txt")
    return info.ann_file or info.name


def image_paths(info: DatasetInfo) -> set[str]:
    """The set's image files as the files they are: links to a folder or to the file followed
    (visualize.py's input takes each file once so too); a copy under another name is another file.
    The folders are resolved once each, the files looked at only when they are links."""
    folders: dict[str, str] = {}
    out = set()
    for record in info.records:
        folder, name = os.path.split(os.path.abspath(record["file_name"]))
        real = folders.get(folder)
        if real is None:
            real = folders[folder] = os.path.realpath(folder)
        path = os.path.join(real, name)
        out.add(os.path.realpath(path) if os.path.islink(path) else path)
    return out


def same_listing(a: DatasetInfo, b: DatasetInfo) -> bool:
    """Whether two entries are the one data set (its json or split file) listed twice, as a
    config lists a set twice to see it twice as often."""
    return os.path.abspath(_listing_file(a)) == os.path.abspath(_listing_file(b)) and image_paths(a) == image_paths(b)


def in_one_label_space(datasets: Sequence[DatasetInfo]) -> list[DatasetInfo]:
    """The sets with the first one's labels: each other set as it is, or relabelled by name when
    it lists the same classes in another order (said once); DataError when the classes differ."""
    return [datasets[0], *(_labels_by_name(other, datasets[0]) for other in datasets[1:])]


def _labels_by_name(other: DatasetInfo, first: DatasetInfo) -> DatasetInfo:
    """`other` in `first`'s label space: as it is when the classes are the same; with its labels
    renumbered by name when it lists the same classes in another order (two COCO exports that
    number the categories differently); DataError when the classes differ."""
    if other.class_names == first.class_names:
        return other
    names, order = list(first.class_names), list(other.class_names)
    if sorted(order) != sorted(names) or len(set(order)) != len(order):
        raise DataError(f"cannot concatenate data sets with different classes: {first.name} has "
                        f"{first.class_names}, {other.name} has {other.class_names}{_class_fix(other, first)}")
    table = np.array([0] + [names.index(name) + 1 for name in order], dtype=np.int64)  # its label -> first's
    logger.info("%s lists the classes of %s in another order (%s): its labels are taken by name", other.name,
                first.name, ", ".join(order))
    return dataclasses.replace(other, class_names=list(names), records=[_relabelled(r, table) for r in other.records],
                               label_to_category_id=dict(first.label_to_category_id))


def _class_fix(other: DatasetInfo, first: DatasetInfo) -> str:
    """The concatenation error's last words: how to make `other` list `first`'s classes (a trial's
    pseudo-label json listed a class no box had, another lacked one the teacher never found)."""
    extra = [n for n in other.class_names if n not in first.class_names]
    lacking = [n for n in first.class_names if n not in other.class_names]
    counts = dict(zip(*np.unique(np.concatenate([np.asarray(r["labels"], np.int64) for r in other.records]
                                                 or [np.zeros(0, np.int64)]), return_counts=True)))
    found = {name: int(counts.get(label, 0)) for label, name in enumerate(other.class_names, start=1)}
    words = []
    if extra:
        empty = [n for n in extra if not found[n]]
        words.append(f"{other.name} has {', '.join(extra)} besides"
                     + ((" (with no object)" if len(empty) == len(extra) else f" ({', '.join(empty)} with no object)")
                        if empty else "")
                     + (f": give its entry keep_classes: [{', '.join(first.class_names)}]" if not lacking else ""))
    if lacking:  # with extra classes too, both steps (a review: one step's advice, then the other's error)
        words.append(f"{other.name} lacks {', '.join(lacking)}: add {'it' if len(lacking) == 1 else 'them'} to its "
                     "categories (a category with no object is fine: its images then teach that none is there, "
                     "so do it only if none is)"
                     + (f", then give its entry keep_classes: [{', '.join(first.class_names)}]" if extra else ""))
    return "; " + "; ".join(words) if words else ""


def _relabelled(record: dict, table: np.ndarray) -> dict:
    """`record` with each object's label looked up in `table` (old label -> new), objects whose new
    label is 0 left out; its `annotated` copy (the boxes as the annotation file writes them, what
    the metrics score) likewise."""
    def objects(these: dict) -> dict:
        labels = table[np.asarray(these["labels"], dtype=np.int64)]
        mine = labels > 0
        if mine.all():  # nothing left out (concat_datasets' renumbering): the labels alone change
            return {**these, "labels": labels}
        return {**these, "boxes": np.asarray(these["boxes"])[mine], "labels": labels[mine],
                "difficult": np.asarray(these["difficult"])[mine]}

    out = objects(record)
    if "annotated" in record:
        out["annotated"] = objects(record["annotated"])
    return out


def keep_only(info: DatasetInfo, keep: Sequence[str]) -> DatasetInfo:
    """`info` with only the classes `keep` (an entry's keep_classes, MMDetection's `classes=(...)`),
    labels 1..K in `keep`'s order: the other classes' objects leave every record, so training
    takes them for background and evaluation does not count them (COCOeval is given the kept
    categories only); images left without objects stay (training drops them with
    dataloader.filter_empty; evaluation counts their false positives). A COCO set's
    label_to_category_id keeps each class's own category id, so results files name the json's
    categories."""
    unknown = [n for n in keep if n not in info.class_names]
    if unknown:
        close = _close(str(unknown[0]), info.class_names)
        source = f"in {info.ann_file}" if info.kind == "coco" else "the entry's classes, VOC's 20 without them"
        raise DataError(f"data set {info.name}, field keep_classes: {unknown[0]!r} is not one of its "
                        f"{len(info.class_names)} classes{_did_you_mean(close)} ({first_few(info.class_names, 8)}; "
                        f"{source})")
    old_label = {name: label for label, name in enumerate(info.class_names, start=1)}
    table = np.zeros(len(info.class_names) + 1, dtype=np.int64)  # old label -> new, 0: left out
    for label, name in enumerate(keep, start=1):
        table[old_label[name]] = label

    records = [_relabelled(record, table) for record in info.records]
    left_out = sum(len(r["labels"]) - len(o["labels"]) for r, o in zip(info.records, records))
    emptied = sum(1 for r, o in zip(info.records, records) if len(r["labels"]) and not len(o["labels"]))
    logger.info("data set %s: keep_classes keeps %d of its %d classes (%s): %d object%s of the others left out, "
                "%d image%s left without objects", info.name, len(keep), len(info.class_names), ", ".join(keep),
                left_out, "" if left_out == 1 else "s", emptied, "" if emptied == 1 else "s")
    ids = {label: info.label_to_category_id[old_label[name]] if info.kind == "coco" else label  # VOC: its labels
           for label, name in enumerate(keep, start=1)}
    return dataclasses.replace(info, class_names=list(keep), records=records, label_to_category_id=ids)


def concat_datasets(datasets: Sequence[DatasetInfo]) -> DatasetInfo:
    """Concatenate records of data sets sharing one label space (e.g. VOC 07+12 training)."""
    if not datasets:
        raise DataError("no data sets given: datasets.train / datasets.test must list at least one entry")
    first = datasets[0]
    datasets = in_one_label_space(datasets)
    for dataset in datasets:
        if not dataset.has_annotations:
            raise DataError(f"cannot train on {dataset.name}: it has no annotations (a test set scored by an "
                            "evaluation server); list it under datasets.test, not datasets.train")
    if len(datasets) == 1:
        return first
    kinds = {d.kind for d in datasets}
    return DatasetInfo(
        name="+".join(d.name for d in datasets),
        kind=first.kind if len(kinds) == 1 else "mixed",
        class_names=list(first.class_names),
        records=[r for d in datasets for r in d.records],
        label_to_category_id=dict(first.label_to_category_id),
        skip_bad_images=any(d.skip_bad_images for d in datasets),
        exif_orientation=first.exif_orientation,  # one config setting for all of them
    )


def entry_problem(entry: Any) -> tuple[str, str] | None:
    """What is wrong with a data-set entry, as (".field" or "", one-line problem), or None.

    Checks names, fields and value types only (no file access), with the closest valid
    names for a misspelling, so the config loader can run it for every entry at startup.
    """
    if isinstance(entry, str):
        return None if entry in KNOWN_DATASETS else ("", _unknown_name(entry))
    if not isinstance(entry, Mapping):
        return "", (f"expected a known data set name or a mapping {{type: {'|'.join(ENTRY_FIELDS)}, ...}}, "
                    f"got {type(entry).__name__} {entry!r}")
    kind = entry.get("type")
    if kind not in ENTRY_FIELDS:
        close = [t for t in ENTRY_FIELDS if str(kind).lower() == t] or _close(str(kind), ENTRY_FIELDS)
        what = "missing" if kind is None else f"{kind!r} is not a data set type"
        return ".type", f"{what}{_did_you_mean(close)}; valid types: {_TYPE_HELP}"
    required, optional = ENTRY_FIELDS[kind]
    takes = f"a {kind} entry takes {', '.join(required)} and optionally {', '.join(optional)}"
    for key in entry:
        if key not in required + optional:
            return f".{key}", f"unknown key{_did_you_mean(_close(str(key), required + optional))}; {takes}"
    for key in required:
        if key not in entry:
            return f".{key}", f"missing; {takes}"
    for key, value in entry.items():
        problem = _value_problem(key, value)
        if problem:
            return f".{key}", f"{problem}, got {value!r}"
    return None


def _value_problem(key: str, value: Any) -> str | None:
    """What a field's value should be, when it is not that."""
    if key in ("ann_file", "image_root", "root", "name"):
        return None if isinstance(value, str) and value else "expected a non-empty string"
    if key == "split":  # a custom split may be a number in YAML (split: 1)
        return None if isinstance(value, (str, int)) and not isinstance(value, bool) else "expected a split name"
    if key in ("classes", "keep_classes"):
        ok = (isinstance(value, list) and value and all(isinstance(c, str) for c in value)
              and len(set(value)) == len(value))
        return None if ok else "expected a list of distinct class names, e.g. [cat, dog]"
    if key in ("use_07_metric", "annotations"):
        return None if isinstance(value, bool) else "expected true or false"
    return None


def _unknown_name(name: str) -> str:
    return (f"unknown data set name {name!r}{_did_you_mean(_close(name, KNOWN_DATASETS))}; known names: "
            f"{', '.join(KNOWN_DATASETS)}; or give a mapping "
            + " / ".join(f"{{type: {kind}, {', '.join(required[1:])}}}" for kind, (required, _) in ENTRY_FIELDS.items()))


def _close(word: str, choices: Sequence[str] | Mapping[str, Any]) -> list[str]:
    return difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)


def _did_you_mean(close: list[str]) -> str:
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def entry_name(entry: Any) -> str | None:
    """The name get_dataset gives a data-set entry, as the tools print it: a known name itself, an
    entry's `name`, else its type's (coco:<json stem>, voc:<folder>_<split>); None for an entry
    that is not one (get_dataset says what is wrong with it)."""
    try:
        return _resolve_entry(entry)[0]
    except DataError:
        return None


def _resolve_entry(entry: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """-> (display name, explicit spec) with the entry checked (entry_problem)."""
    problem = entry_problem(entry)
    if problem:
        field_name, text = problem
        where = f"data set entry {entry!r}" + (f", field {field_name[1:]}" if field_name else "")
        raise DataError(f"{where}: {text}")
    if isinstance(entry, str):
        return entry, dict(KNOWN_DATASETS[entry])
    spec = dict(entry)
    name = spec.get("name") or _default_name(spec)
    return str(name), spec


def _default_name(spec: dict[str, Any]) -> str:
    """coco:<json stem> or voc:<folder>_<split>, with [the kept classes] for an entry that keeps
    some (its results folder is then not the whole set's)."""
    if spec["type"] == "coco":
        name = "coco:" + os.path.splitext(os.path.basename(str(spec["ann_file"])))[0]
    else:
        name = f"voc:{os.path.basename(os.path.normpath(str(spec['root'])))}_{spec['split']}"
    keep = [str(n) for n in spec.get("keep_classes") or ()]
    if not keep:
        return name
    listed = ",".join(keep)
    if len(listed) > 60:  # the first two, how many more, and a digest of all: two lists never share a name
        import hashlib

        listed = f"{','.join(keep[:2])},+{len(keep) - 2},{hashlib.sha256(listed.encode()).hexdigest()[:8]}"
    return f"{name}[{listed}]"


def _under(root: str, path: str) -> str:
    """Relative paths are taken from datasets.root; absolute ones are kept."""
    path = os.path.expanduser(str(path))
    return os.path.abspath(path if os.path.isabs(path) else os.path.join(str(root), path))
