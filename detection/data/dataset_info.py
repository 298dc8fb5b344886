"""DatasetInfo: what every reader (coco.py, voc.py) produces and the catalog hands out.

Its own module so that the readers and the catalog both import it without importing
each other (the catalog dispatches to the readers).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DatasetInfo:
    """One data set: class names, per-image records and what evaluation needs.

    Record: {"file_name": abs path, "image_id": int or str, one per record (the COCO json's id,
    the VOC stem; catalog.get_dataset refuses a repeated one: evaluation keys results by it),
    "height": int, "width": int, "boxes": float32[N,4] XYXY 0-based, "labels": int64[N] in 1..K,
    "difficult": bool[N]}. COCO crowd boxes are not in "boxes" (pycocotools sees them
    through `ann_file`). Images without boxes are kept here; training drops them.

    has_annotations is False for a test set whose ground truth is not published (voc_2012_test;
    a COCO json without an "annotations" list, as coco_2017_test-dev's image_info json):
    its records have no boxes, it cannot be trained on or scored, and evaluation writes the
    files an evaluation server takes instead.
    """

    name: str
    kind: str  # "coco" | "voc" (a catalog.LOADERS type; "mixed" for concat_datasets' training sets)
    class_names: list[str]
    records: list[dict]
    ann_file: str | None = None
    label_to_category_id: dict[int, int] = field(default_factory=dict)
    root: str | None = None
    split: str | None = None
    use_07_metric: bool = False
    skip_bad_images: bool = False  # the loaders skip unreadable images (each reported once)
    has_annotations: bool = True  # False: no ground truth (a benchmark's hidden test set)
    exif_orientation: bool = True  # images are read turned by their EXIF orientation tag (input.exif_orientation)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
