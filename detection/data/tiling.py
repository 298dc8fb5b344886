"""A data set cut into tiles for training (tools/make_tiles.py; SAHI's slice_coco): large images
of small objects (aerial, microscopy) trained at input.min_size_train would shrink their objects
with them; their tiles keep the objects at their size. The tiles are those test.tiles cuts at test
time (detection.modeling.tiles.tile_windows), so training and inference see the same scale.

Each tile is a COCO image of its own: `<stem>_x<x0>_y<y0>.<ext>` (the source's extension for JPEG
and PNG, else PNG), its objects' boxes clipped to it, an object kept when at least `min_visible`
of its box's area is inside (a sliver of an object is neither taught as the object nor, being
left out, as background more than a tile's border is), VOC `difficult` objects written with
"iscrowd": 1 (not trained, not scored: what the metrics do with them); each image entry also
names its source image and the tile's offset ("source", "offset": [x0, y0]).
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
                 ) -> list[tuple[tuple[int, int, int, int], np.ndarray, np.ndarray, np.ndarray]]:
    """Per window (x0, y0, x1, y1): (window, boxes XYXY in the tile's pixels, labels, difficult)
    of the record's objects at least `min_visible` of whose area is inside it."""
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
        out.append((window, clipped[keep] - [x0, y0, x0, y0], labels[keep], difficult[keep]))
    return out


def write_tiled_dataset(dataset: DatasetInfo, output: str | Path, size: int, overlap: float, min_visible: float,
                        read: Callable[[str], np.ndarray], write: Callable[[Path, np.ndarray], None],
                        skip_empty: bool = False, progress: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Cut every image of `dataset` into tiles (read(path) -> RGB array as the data set reads it;
    write(path, RGB array)), into OUTPUT/images/, with OUTPUT/annotations.json (COCO). -> counts:
    {"images", "tiles", "objects", "objects_left_out"} (left out: under min_visible in every tile)."""
    output = Path(output)
    (output / "images").mkdir(parents=True, exist_ok=True)
    category_of = dict(dataset.label_to_category_id) if dataset.label_to_category_id else \
        {k: k for k in range(1, len(dataset.class_names) + 1)}
    images, annotations = [], []
    counts = {"images": 0, "tiles": 0, "objects": 0, "objects_left_out": 0}
    for record in dataset.records:
        pixels = read(record["file_name"])
        height, width = pixels.shape[:2]
        windows = tile_windows(height, width, size, overlap)
        tiles = tile_records(record, windows, min_visible)
        seen = _objects_in_some_tile(record, windows, min_visible)
        counts["images"] += 1
        counts["objects"] += len(seen)
        counts["objects_left_out"] += int((~seen).sum())
        source = Path(record["file_name"])
        ext = source.suffix.lower() if source.suffix.lower() in (".jpg", ".jpeg", ".png") else ".png"
        for (x0, y0, x1, y1), boxes, labels, difficult in tiles:
            if skip_empty and not len(boxes):
                continue
            name = f"{source.stem}_x{x0}_y{y0}{ext}"
            write(output / "images" / name, pixels[y0:y1, x0:x1])
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": name, "width": x1 - x0, "height": y1 - y0,
                           "source": str(source), "offset": [x0, y0]})
            for box, label, hard in zip(boxes.tolist(), labels.tolist(), difficult.tolist()):
                w, h = box[2] - box[0], box[3] - box[1]
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": int(category_of[label]), "bbox": [round(v, 2) for v in
                                                                                     (box[0], box[1], w, h)],
                                    "area": round(w * h, 2), "iscrowd": int(bool(hard))})
            counts["tiles"] += 1
        progress()
    categories = [{"id": int(category_of[k]), "name": name} for k, name in enumerate(dataset.class_names, start=1)]
    with atomic_write(output / "annotations.json") as f:
        f.write(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return counts


def _objects_in_some_tile(record: dict, windows: Sequence[tuple[int, int, int, int]], min_visible: float
                          ) -> np.ndarray:
    """Per object of the record, whether some window keeps it (tile_records' rule)."""
    boxes = np.asarray(record.get("boxes", ()), np.float64).reshape(-1, 4)
    kept = np.zeros(len(boxes), bool)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for x0, y0, x1, y1 in windows:
        inside = (np.minimum(boxes[:, 2], x1) - np.maximum(boxes[:, 0], x0)).clip(0) * \
            (np.minimum(boxes[:, 3], y1) - np.maximum(boxes[:, 1], y0)).clip(0)
        kept |= (inside > 0) & (inside >= min_visible * np.maximum(area, 1e-12))
    return kept
