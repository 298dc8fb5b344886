"""COCO-format json + image folder -> DatasetInfo (pycocotools reads the json).

Category ids (often non-contiguous, e.g. 1..90 with gaps) map to labels 1..K in
increasing id order; `DatasetInfo.label_to_category_id` maps back for result
files. Crowd (and "ignore") annotations are not training targets; pycocotools
still reads them from `ann_file` during evaluation.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from detection.data import DataError
from detection.data.dataset_info import DatasetInfo

logger = logging.getLogger(__name__)

_LAYOUT_HINT = ("expected a COCO-format json; the known names use <root>/coco/annotations/"
                "instances_{train,val}2017.json with images in <root>/coco/{train,val}2017/, "
                "instances_{train,val,minival,valminusminival}2014.json with images in <root>/coco/train2014/ "
                "and <root>/coco/val2014/ (minival and valminusminival: val2014), and "
                "<root>/shapes/annotations/instances_{train,val}.json with images in <root>/shapes/{train,val}/ "
                "(create those with: python tools/make_shapes.py --output <root>/shapes)")


def load_coco_json(ann_file: str, image_root: str, *, name: str | None = None) -> DatasetInfo:
    """Read every image of `ann_file` (sorted by image id) into a record; see DatasetInfo."""
    coco = open_coco(ann_file)
    if not os.path.isdir(image_root):
        raise DataError(f"image folder not found: {image_root} (for annotations {ann_file}); {_LAYOUT_HINT}")
    cat_ids = sorted(coco.cats)
    cat_to_label = {cat_id: i + 1 for i, cat_id in enumerate(cat_ids)}
    records, num_degenerate = [], 0
    for img_id in sorted(coco.imgs):
        record, dropped = _image_record(coco, img_id, image_root, cat_to_label, ann_file)
        records.append(record)
        num_degenerate += dropped
    if num_degenerate:
        logger.warning("%s: dropped %d boxes of zero area (after XYWH->XYXY and clipping to the image)",
                       ann_file, num_degenerate)
    _warn_orphan_annotations(coco, ann_file)
    return DatasetInfo(
        name=name or os.path.splitext(os.path.basename(ann_file))[0],
        kind="coco",
        class_names=[str(coco.cats[c].get("name", c)) for c in cat_ids],
        records=records,
        ann_file=os.path.abspath(ann_file),
        label_to_category_id={label: cat_id for cat_id, label in cat_to_label.items()},
    )


def open_coco(ann_file: str) -> COCO:
    """pycocotools.COCO for `ann_file`, with a DataError naming the file instead of a traceback."""
    if not os.path.isfile(ann_file):
        raise DataError(f"annotation file not found: {ann_file}; {_LAYOUT_HINT}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            coco = COCO(ann_file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"could not read annotation file {ann_file}: {e}") from e
    except (AssertionError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{ann_file} is not a COCO-format json (needs 'images', 'annotations', "
                        f"'categories' with ids): {type(e).__name__} {e}") from e
    if not coco.cats:
        raise DataError(f"{ann_file} defines no categories ('categories' is missing or empty)")
    return coco


def _image_record(coco: COCO, img_id: int, image_root: str, cat_to_label: dict[int, int],
                  ann_file: str) -> tuple[dict, int]:
    """-> (record, number of zero-area boxes dropped)."""
    img = coco.imgs[img_id]
    missing = [k for k in ("file_name", "height", "width") if k not in img]
    if missing:
        raise DataError(f"{ann_file}: image id {img_id} lacks {missing}")
    height, width = int(img["height"]), int(img["width"])
    boxes, labels = [], []
    for ann in coco.imgToAnns.get(img_id, []):
        box, label = _parse_annotation(ann, width, height, cat_to_label, ann_file)
        if box is not None:
            boxes.append(box)
            labels.append(label)
    keep = [i for i, b in enumerate(boxes) if b[2] > b[0] and b[3] > b[1]]
    record = {
        "file_name": os.path.join(image_root, img["file_name"]),
        "image_id": img_id,
        "height": height,
        "width": width,
        "boxes": np.array([boxes[i] for i in keep], dtype=np.float32).reshape(-1, 4),
        "labels": np.array([labels[i] for i in keep], dtype=np.int64),
        "difficult": np.zeros(len(keep), dtype=np.bool_),
    }
    return record, len(boxes) - len(keep)


def _parse_annotation(ann: dict[str, Any], width: int, height: int, cat_to_label: dict[int, int],
                      ann_file: str) -> tuple[list[float] | None, int]:
    """-> (clipped XYXY box, label), or (None, 0) for crowd / ignored regions."""
    where = f"{ann_file}: annotation id {ann.get('id')} (image id {ann.get('image_id')})"
    cat_id = ann.get("category_id")
    if cat_id not in cat_to_label:
        raise DataError(f"{where} has unknown category_id {cat_id!r}; the file's category ids are "
                        f"{sorted(cat_to_label)}")
    try:
        x, y, w, h = (float(v) for v in ann["bbox"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{where} has no valid 'bbox' [x, y, w, h]: {ann.get('bbox')!r}") from e
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise DataError(f"{where} has a non-finite bbox {ann['bbox']!r}")
    if ann.get("iscrowd", 0) or ann.get("ignore", 0):
        return None, 0
    # XYWH -> XYXY; COCO boxes are already 0-based continuous coordinates
    box = [min(max(x, 0.0), width), min(max(y, 0.0), height),
           min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)]
    return box, cat_to_label[cat_id]


def _warn_orphan_annotations(coco: COCO, ann_file: str) -> None:
    orphans = sum(len(v) for k, v in coco.imgToAnns.items() if k not in coco.imgs)
    if orphans:
        logger.warning("%s: %d annotations refer to image ids not listed in 'images' and are ignored",
                       ann_file, orphans)
