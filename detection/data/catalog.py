"""Data set catalog: a config entry (known name or explicit mapping) -> DatasetInfo.

A known name is a fixed layout under `datasets.root` (see KNOWN_DATASETS); an
explicit mapping points at any COCO json + image folder or any VOC-layout folder
with its own class list, so custom data needs no code change.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from detection.data import DataError

# name -> explicit entry; paths are relative to datasets.root
KNOWN_DATASETS: dict[str, dict[str, str]] = {
    "coco_2017_train": {"type": "coco", "ann_file": "coco/annotations/instances_train2017.json",
                        "image_root": "coco/train2017"},
    "coco_2017_val": {"type": "coco", "ann_file": "coco/annotations/instances_val2017.json",
                      "image_root": "coco/val2017"},
    "voc_2007_trainval": {"type": "voc", "root": "VOCdevkit/VOC2007", "split": "trainval"},
    "voc_2007_train": {"type": "voc", "root": "VOCdevkit/VOC2007", "split": "train"},
    "voc_2007_val": {"type": "voc", "root": "VOCdevkit/VOC2007", "split": "val"},
    "voc_2007_test": {"type": "voc", "root": "VOCdevkit/VOC2007", "split": "test"},
    "voc_2012_trainval": {"type": "voc", "root": "VOCdevkit/VOC2012", "split": "trainval"},
    "voc_2012_train": {"type": "voc", "root": "VOCdevkit/VOC2012", "split": "train"},
    "voc_2012_val": {"type": "voc", "root": "VOCdevkit/VOC2012", "split": "val"},
    "shapes_train": {"type": "coco", "ann_file": "shapes/annotations/instances_train.json",
                     "image_root": "shapes/train"},
    "shapes_val": {"type": "coco", "ann_file": "shapes/annotations/instances_val.json",
                   "image_root": "shapes/val"},
}

_ENTRY_KEYS = {
    "coco": ({"type", "ann_file", "image_root"}, {"name"}),
    "voc": ({"type", "root", "split"}, {"name", "classes", "use_07_metric"}),
}


@dataclass
class DatasetInfo:
    """One data set: class names, per-image records and what evaluation needs.

    Record: {"file_name": abs path, "image_id": int (coco json id) | str (voc stem),
    "height": int, "width": int, "boxes": float32[N,4] XYXY 0-based, "labels": int64[N] in 1..K,
    "difficult": bool[N]}. COCO crowd boxes are not in "boxes" (pycocotools sees them
    through `ann_file`). Images without boxes are kept here; training drops them.
    """

    name: str
    kind: str  # "coco" | "voc"
    class_names: list[str]
    records: list[dict]
    ann_file: str | None = None
    label_to_category_id: dict[int, int] = field(default_factory=dict)
    root: str | None = None
    split: str | None = None
    use_07_metric: bool = False
    skip_bad_images: bool = False  # the loaders skip (and count) unreadable images

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def get_dataset(entry: str | Mapping[str, Any], root: str, *, skip_bad_images: bool = False) -> DatasetInfo:
    """Resolve a config entry (known name or {type: coco|voc, ...}) under `root` and load it."""
    name, spec = _resolve_entry(entry)
    kind = spec["type"]
    if kind == "coco":
        from detection.data.coco import load_coco_json

        info = load_coco_json(_under(root, spec["ann_file"]), _under(root, spec["image_root"]), name=name)
    else:
        from detection.data.voc import load_voc

        info = load_voc(_under(root, spec["root"]), str(spec["split"]), classes=spec.get("classes"),
                        use_07_metric=spec.get("use_07_metric"), name=name, skip_bad_files=skip_bad_images)
    info.skip_bad_images = skip_bad_images
    return info


def get_datasets(entries: Sequence[str | Mapping[str, Any]], root: str, *,
                 skip_bad_images: bool = False) -> list[DatasetInfo]:
    """`get_dataset` for each entry of a config list (datasets.train / datasets.test)."""
    if isinstance(entries, (str, Mapping)):
        entries = [entries]
    return [get_dataset(e, root, skip_bad_images=skip_bad_images) for e in entries]


def concat_datasets(datasets: Sequence[DatasetInfo]) -> DatasetInfo:
    """Concatenate records of data sets sharing one label space (e.g. VOC 07+12 training)."""
    if not datasets:
        raise DataError("no data sets given: datasets.train / datasets.test must list at least one entry")
    first = datasets[0]
    for other in datasets[1:]:
        if other.class_names != first.class_names:
            raise DataError(f"cannot concatenate data sets with different classes: {first.name} has "
                            f"{first.class_names}, {other.name} has {other.class_names}")
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
    )


def _resolve_entry(entry: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """-> (display name, explicit spec) with the keys checked."""
    if isinstance(entry, str):
        if entry not in KNOWN_DATASETS:
            raise DataError(f"unknown data set name {entry!r}; known names: {', '.join(KNOWN_DATASETS)}; "
                            "or give a mapping {type: coco, ann_file, image_root} / {type: voc, root, split, classes}")
        return entry, dict(KNOWN_DATASETS[entry])
    if not isinstance(entry, Mapping):
        raise DataError(f"data set entry must be a name or a mapping, got {type(entry).__name__}: {entry!r}")
    spec = dict(entry)
    kind = spec.get("type")
    if kind not in _ENTRY_KEYS:
        raise DataError(f"data set entry {spec!r}: 'type' must be 'coco' or 'voc'")
    required, optional = _ENTRY_KEYS[kind]
    missing = sorted(required - spec.keys())
    unknown = sorted(spec.keys() - required - optional)
    if missing or unknown:
        raise DataError(f"data set entry {spec!r}: missing keys {missing}, unknown keys {unknown}; "
                        f"a {kind} entry takes {sorted(required)} and optionally {sorted(optional)}")
    name = spec.get("name") or _default_name(spec)
    return str(name), spec


def _default_name(spec: dict[str, Any]) -> str:
    if spec["type"] == "coco":
        return "coco:" + os.path.splitext(os.path.basename(str(spec["ann_file"])))[0]
    return f"voc:{os.path.basename(os.path.normpath(str(spec['root'])))}_{spec['split']}"


def _under(root: str, path: str) -> str:
    """Relative paths are taken from datasets.root; absolute ones are kept."""
    path = os.path.expanduser(str(path))
    return os.path.abspath(path if os.path.isabs(path) else os.path.join(str(root), path))
