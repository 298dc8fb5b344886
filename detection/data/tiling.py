"""A data set cut into tiles for training (tools/make_tiles.py; SAHI's slice_coco): large images
of small objects (aerial, microscopy) trained at input.min_size_train would shrink their objects
with them; their tiles keep the objects at their size. The tiles are those test.tiles cuts at test
time (detection.utils.tiling.tile_windows), so training and inference see the same scale.

Each tile is a COCO image of its own: `<NNNNNN>_<stem>_x<x0>_y<y0>.<ext>` (NNNNNN the source's
place in the data set: two sources of one name never share a tile's; the source's extension for
JPEG and PNG, else PNG), its objects' boxes clipped to it, an object kept when at least
`min_visible` of its box's area is inside (a sliver of an object is neither taught as the object
nor, being left out, as background more than a tile's border is). VOC `difficult` objects are
written as objects when `use_difficult` (training's dataloader.use_difficult), else with
"iscrowd": 1 (neither trained nor scored, as the metrics treat them); a COCO source's regions that
are not objects (`regions`: crowd, written "iscrowd": 1; `ignore`, written "ignore": 1) go to
every tile they overlap, clipped. Each image entry also names its source image and the tile's
offset ("source", "offset": [x0, y0]).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from detection.data.dataset_info import DatasetInfo
from detection.utils.files import atomic_write
from detection.utils.tiling import tile_windows


def tile_records(record: dict, windows: Sequence[tuple[int, int, int, int]], min_visible: float
                 ) -> list[tuple[tuple[int, int, int, int], np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per window (x0, y0, x1, y1): (window, boxes XYXY in the tile's pixels, labels, difficult,
    kept: the record's objects' mask) of the objects at least `min_visible` of whose area is inside it."""
    boxes = np.asarray(record.get("boxes", ()), np.float64).reshape(-1, 4)
    labels = np.asarray(record.get("labels", ()), np.int64).reshape(-1)
    difficult = np.asarray(record.get("difficult", np.zeros(len(boxes), bool)), bool).reshape(-1)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    out = []
    for window in windows:
        x0, y0, x1, y1 = window
        clipped = np.stack([boxes[:, 0].clip(x0, x1), boxes[:, 1].clip(y0, y1), boxes[:, 2].clip(x0, x1),
                            boxes[:, 3].clip(y0, y1)], axis=1) if len(boxes) else boxes
        inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        keep = (inside > 0) & (inside >= min_visible * np.maximum(area, 1e-12))
        out.append((window, clipped[keep] - [x0, y0, x0, y0], labels[keep], difficult[keep], keep))
    return out


def write_tiled_dataset(dataset: DatasetInfo, output: str | Path, size: int, overlap: float, min_visible: float,
                        read: Callable[[str], np.ndarray], write: Callable[[Path, np.ndarray], None],
                        skip_empty: bool = False, progress: Callable[[], None] = lambda: None,
                        use_difficult: bool = True, regions: dict | None = None) -> dict[str, Any]:
    """Cut every image of `dataset` into tiles (read(path) -> RGB array as the data set reads it;
    write(path, RGB array)), into OUTPUT/images/, with OUTPUT/annotations.json (COCO). `regions`:
    image id -> (XYXY boxes, labels, tags "crowd" / "not trained") of a COCO source's regions that
    are not objects (visualization.draw.read_crowd_regions). -> counts: {"images", "tiles",
    "objects", "objects_left_out"} (left out: under min_visible in every tile)."""
    output = Path(output)
    (output / "images").mkdir(parents=True, exist_ok=True)
    category_of = dict(dataset.label_to_category_id) if dataset.label_to_category_id else \
        {k: k for k in range(1, len(dataset.class_names) + 1)}
    images, annotations = [], []
    counts = {"images": 0, "tiles": 0, "objects": 0, "objects_left_out": 0}
    for index, record in enumerate(dataset.records):
        pixels = read(record["file_name"])
        height, width = pixels.shape[:2]
        windows = tile_windows(height, width, size, overlap)
        tiles = tile_records(record, windows, min_visible)
        seen = np.logical_or.reduce([tile[4] for tile in tiles])  # each object kept by some tile
        counts["images"] += 1
        counts["objects"] += len(seen)
        counts["objects_left_out"] += int((~seen).sum())
        source = Path(record["file_name"])
        ext = source.suffix.lower() if source.suffix.lower() in (".jpg", ".jpeg", ".png") else ".png"
        for (x0, y0, x1, y1), boxes, labels, difficult, _ in tiles:
            if skip_empty and not len(boxes):
                continue
            name = f"{index:06d}_{source.stem}_x{x0}_y{y0}{ext}"
            write(output / "images" / name, pixels[y0:y1, x0:x1])
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": name, "width": x1 - x0, "height": y1 - y0,
                           "source": str(source), "offset": [x0, y0]})
            for box, label, hard in zip(boxes.tolist(), labels.tolist(), difficult.tolist()):
                annotations.append(_annotation(len(annotations) + 1, image_id, category_of[label], box,
                                               {"iscrowd": int(bool(hard) and not use_difficult)}))
            boxes, labels, tags = (regions or {}).get(record["image_id"], (np.zeros((0, 4)), [], []))
            for box, label, tag in zip(np.asarray(boxes, np.float64).reshape(-1, 4), labels, tags):
                clipped = [max(box[0], x0) - x0, max(box[1], y0) - y0, min(box[2], x1) - x0, min(box[3], y1) - y0]
                if clipped[2] > clipped[0] and clipped[3] > clipped[1]:
                    annotations.append(_annotation(len(annotations) + 1, image_id, category_of[int(label)], clipped,
                                                   {"iscrowd": 1} if tag == "crowd" else {"iscrowd": 0, "ignore": 1}))
            counts["tiles"] += 1
        progress()
    categories = [{"id": int(category_of[k]), "name": name} for k, name in enumerate(dataset.class_names, start=1)]
    with atomic_write(output / "annotations.json") as f:
        f.write(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return counts


def _annotation(ann_id: int, image_id: int, category_id: int, box: Sequence[float], flags: dict) -> dict:
    """A COCO annotation of an XYXY box in a tile's pixels."""
    w, h = box[2] - box[0], box[3] - box[1]
    return {"id": ann_id, "image_id": image_id, "category_id": int(category_id),
            "bbox": [round(float(v), 2) for v in (box[0], box[1], w, h)], "area": round(float(w * h), 2), **flags}
