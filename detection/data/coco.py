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
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from detection.data import DataError
from detection.data.dataset_info import DatasetInfo
from detection.utils.files import USER_TEXT_ENCODING, utf16_hint
from detection.utils.text import first_few

logger = logging.getLogger(__name__)

_LAYOUT_HINT = ("expected a COCO-format json; the known names use <root>/coco/annotations/"
                "instances_{train,val}2017.json with images in <root>/coco/{train,val}2017/, "
                "instances_{train,val,minival,valminusminival}2014.json with images in <root>/coco/train2014/ "
                "and <root>/coco/val2014/ (minival and valminusminival: val2014), and "
                "<root>/shapes/annotations/instances_{train,val,test}.json with images in "
                "<root>/shapes/{train,val,test}/ (create those with: python tools/make_shapes.py --output "
                "<root>/shapes; add --splits test to give an older one its test split)")


def load_coco_json(ann_file: str, image_root: str, *, name: str | None = None,
                   exif_orientation: bool = True) -> DatasetInfo:
    """Read every image of `ann_file` (sorted by image id) into a record; see DatasetInfo. A json
    whose images give no `width` / `height` (some converters write none) takes each image's size
    from its file's header, as viewed (`exif_orientation`), as Detectron2 reads it."""
    coco = open_coco(ann_file)
    if not os.path.isdir(image_root):
        raise DataError(f"image folder not found: {image_root} (for annotations {ann_file}); {_LAYOUT_HINT}")
    _sizes_from_files(coco, image_root, ann_file, exif_orientation)
    cat_ids = sorted(coco.cats)
    cat_to_label = {cat_id: i + 1 for i, cat_id in enumerate(cat_ids)}
    records, dropped, clipped, repeats = [], [], [], []
    for img_id in sorted(coco.imgs):
        record, its_dropped, its_clipped, its_repeats = _image_record(coco, img_id, image_root, cat_to_label,
                                                                      ann_file)
        records.append(record)
        dropped += its_dropped
        clipped += its_clipped
        repeats += its_repeats
    if dropped or clipped:
        what = ([f"clipped {len(clipped)} boxes that reach more than a pixel past their image (annotation ids "
                 f"{first_few(clipped, 3)})"] if clipped else []) + (
            [f"dropped {len(dropped)} boxes with no area in their image ({first_few(dropped, 3)})"] if dropped else [])
        logger.warning("%s: in the boxes training learns from, %s; the COCO evaluation (pycocotools) scores the "
                       "json's boxes as written, and --gt and the report draw those%s", ann_file, " and ".join(what),
                       _xyxy_hint(coco, len(clipped) + len(dropped)))
    if repeats:
        logger.warning("%s: %d annotations repeat another of their image with the same category and box (%s): the "
                       "evaluation counts each copy as one more object to find, which no detection can match once "
                       "the first is (AP falls), and training learns the box twice; remove the copies", ann_file,
                       len(repeats), first_few(repeats, 3))
    _warn_zero_area(coco, ann_file)
    _warn_orphan_annotations(coco, ann_file)
    _warn_ignore_annotations(coco, ann_file)
    return DatasetInfo(
        name=name or os.path.splitext(os.path.basename(ann_file))[0],
        kind="coco",
        class_names=[str(coco.cats[c].get("name", c)) for c in cat_ids],
        records=records,
        ann_file=os.path.abspath(ann_file),
        label_to_category_id={label: cat_id for cat_id, label in cat_to_label.items()},
        # COCO's test-dev json (image_info_test-dev2017.json) lists images and categories only
        has_annotations="annotations" in coco.dataset,
    )


def _sizes_from_files(coco: COCO, image_root: str, ann_file: str, exif_orientation: bool) -> None:
    """Fill the images' missing width / height from their files' headers (check_coco_json lets a
    json give none, never some); one line says so. A file that cannot tell is one error."""
    from detection.data.orientation import header_size  # imported where used: PIL

    missing = [img for img in coco.imgs.values() if "height" not in img]
    for img in missing:
        path = os.path.join(image_root, img["file_name"])
        size = header_size(path, apply_tag=exif_orientation) if os.path.isfile(path) else None
        if size is None:
            raise DataError(f"{ann_file}: image id {img['id']!r} gives no width / height and its file {path} "
                            f"{'is not there' if not os.path.isfile(path) else 'has no header that tells'}: "
                            "give them in the json")
        img["height"], img["width"] = size[0], size[1]
    if missing:
        logger.info("%s gives no image sizes: read from the %d images' files", ann_file, len(missing))


def open_coco(ann_file: str) -> COCO:
    """pycocotools.COCO for `ann_file`, with a DataError naming the file instead of a traceback.

    The json is checked before pycocotools indexes it (check_coco_json): a wrong type, a
    missing field or a duplicate id is one error naming the file, the record and the field,
    never a TypeError from inside pycocotools or, worse, a duplicate silently shadowing
    another record (pycocotools keys its indexes by id)."""
    if os.path.isdir(ann_file):
        raise DataError(f"annotation file {ann_file} is a folder, not a COCO json file; {_LAYOUT_HINT}")
    if not os.path.isfile(ann_file):
        raise DataError(f"annotation file not found: {ann_file}; {_LAYOUT_HINT}")
    try:
        with open(ann_file, "rb") as f:
            raw = f.read()
        data = json.loads(raw.decode(USER_TEXT_ENCODING))
    except OSError as e:
        raise DataError(f"could not read annotation file {ann_file}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"annotation file {ann_file} is not UTF-8 text (byte {e.start}: "
                        f"{raw[e.start:e.start + 1]!r}){utf16_hint(ann_file)}; a COCO json is UTF-8") from None
    except json.JSONDecodeError as e:
        what = "is empty" if not raw.strip() else f"is not valid json ({e})"
        raise DataError(f"annotation file {ann_file} {what}") from None
    except RecursionError:  # thousands of nested brackets: no COCO json nests more than a few levels
        raise DataError(f"annotation file {ann_file} nests its json too deeply to be a COCO json") from None
    check_coco_json(data, ann_file)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_id(value: Any) -> bool:
    """COCO ids are integers; some converted sets use strings. Never bool, float or null."""
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value != "")


def _is_box(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(type(x) in (int, float) for x in value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_size(value: Any) -> bool:
    """A positive whole number of pixels (480 or 480.0)."""
    return _is_number(value) and math.isfinite(value) and value >= 1 and float(value).is_integer()


def check_coco_json(data: Any, ann_file: str) -> None:
    """DataError for the first thing in a parsed COCO json that readers or COCOeval would
    trip over or misread: wrong types, missing fields, non-finite numbers, duplicate ids.
    Extra fields are allowed (and ignored); box values are judged later (_parse_annotation)."""
    expect = "a COCO json object {\"images\": [...], \"annotations\": [...], \"categories\": [...]}"
    if not isinstance(data, dict):
        results = isinstance(data, list) and data and isinstance(data[0], dict) and "score" in data[0]
        raise DataError(f"{ann_file}: expected {expect}, got a json {type(data).__name__}"
                        + (" of detections (a results file, as eval.py's coco_results.json): to train on a model's "
                           "detections, tools/pseudo_labels.py writes them as a data set's json" if results else ""))
    for key in ("images", "categories"):
        if key not in data:
            raise DataError(f"{ann_file}: no {key!r} list; expected {expect}")
    for key in ("images", "annotations", "categories"):
        if key in data and not isinstance(data[key], list):
            raise DataError(f"{ann_file}: {key!r} must be a list, got {type(data[key]).__name__}")
    if not data["categories"]:
        raise DataError(f"{ann_file} defines no categories ('categories' is empty)")
    _check_records(data["categories"], "category", {"id": (_is_int, "an integer id"),
                                                    "name": (lambda v: isinstance(v, str), "a string")},
                   ann_file)
    _check_records(data["images"], "image", {
        "id": (_is_id, "an id"), "file_name": (lambda v: isinstance(v, str) and v != "", "a file name"),
        # without both, the size is read from the image file (load_coco_json), as Detectron2 does
        "height": (_is_size, "a positive whole number"), "width": (_is_size, "a positive whole number")}, ann_file,
        optional=("height", "width") if all("height" not in i and "width" not in i for i in data["images"]
                                           if isinstance(i, dict)) else ())
    _check_records(data.get("annotations", []), "annotation", {
        "id": (_is_id, "an id"), "image_id": (_is_id, "an image id"),
        "category_id": (_is_int, "an integer category id"),
        "bbox": (_is_box, "[x, y, width, height] (4 numbers)")}, ann_file)
    if len({type(img["id"]) for img in data["images"]}) > 1:
        raise DataError(f"{ann_file}: image ids mix numbers and strings; use one kind")
    _check_unique(data["categories"], "name", "category", ann_file,
                  "each class needs a name of its own (its AP is reported, and its detections matched, by name)")
    _check_unique(data["images"], "file_name", "image", ann_file,
                  "list an image once, with all its annotations (under two ids, the boxes of each are "
                  "background to the other in training, and misses in evaluation)")
    for index, ann in enumerate(data.get("annotations", [])):
        for key in ("iscrowd", "ignore"):
            if key in ann and ann[key] not in (0, 1):  # (False and True are 0 and 1)
                raise DataError(f"{ann_file}: annotation #{index} (id {ann['id']!r}): {key!r} must be 0 or 1, "
                                f"got {ann[key]!r}")
        if "area" in ann and not (_is_number(ann["area"]) and math.isfinite(ann["area"]) and ann["area"] >= 0):
            raise DataError(f"{ann_file}: annotation #{index} (id {ann['id']!r}): 'area' must be a finite number "
                            f">= 0, got {ann['area']!r}")


def _check_unique(items: list, key: str, kind: str, ann_file: str, why: str) -> None:
    """DataError naming the first two items (by index and id) that share `key`'s value."""
    seen: dict[Any, int] = {}
    for index, item in enumerate(items):
        first = seen.setdefault(item[key], index)
        if first != index:
            raise DataError(f"{ann_file}: {kind} #{first} (id {items[first]['id']!r}) and {kind} #{index} (id "
                            f"{item['id']!r}) have the same {key} {item[key]!r}; {why}")


def _check_records(items: list, kind: str, fields: dict, ann_file: str, optional: Sequence[str] = ()) -> None:
    """Each item a dict holding every field of `fields` (name -> (test, what it must be)) but
    the `optional` ones (checked where given), ids unique."""
    def where(index: int, item: dict) -> str:  # built only for the message (COCO has ~1M records)
        return f"{ann_file}: {kind} #{index}" + (f" (id {item['id']!r})" if _is_id(item.get("id")) else "")

    checks = list(fields.items())
    seen: dict[Any, int] = {}
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{ann_file}: {kind} #{index} must be a json object, got {item!r:.80}")
        for key, (test, what) in checks:
            if key not in item:
                if key in optional:
                    continue
                raise DataError(f"{where(index, item)} has no {key!r} field")
            if not test(item[key]):
                raise DataError(f"{where(index, item)}: {key!r} must be {what}, got {item[key]!r:.80}")
        if seen.setdefault(item["id"], index) != index:
            raise DataError(f"{where(index, item)} repeats the id of {kind} #{seen[item['id']]}; ids must be unique")


def _image_record(coco: COCO, img_id: int, image_root: str, cat_to_label: dict[int, int],
                  ann_file: str) -> tuple[dict, list[str], list[str], list[str]]:
    """-> (record, the boxes dropped (no area in the image), each named with why, the ids of the
    kept boxes clipped by more than a pixel (an export's rounding past the border is not worth a
    word), the annotations that repeat another's category and box, each named)."""
    img = coco.imgs[img_id]
    height, width = int(img["height"]), int(img["width"])  # whole numbers (check_coco_json)
    boxes, labels, outside, ids, written, seen, repeats = [], [], [], [], [], {}, []
    for ann in coco.imgToAnns.get(img_id, []):
        box, label, annotated = _parse_annotation(ann, width, height, cat_to_label, ann_file)
        if box is not None:
            boxes.append(box)
            labels.append(label)
            outside.append(max(abs(a - b) for a, b in zip(box, annotated)) > 1.0)
            ids.append((ann.get("id"), annotated))
            written.append(ann["bbox"])
            first = seen.setdefault((label, tuple(ann["bbox"])), ann.get("id"))
            if first != ann.get("id"):
                repeats.append(f"id {ann.get('id')!r} repeats id {first!r} (image id {img_id!r})")
    keep = [i for i, b in enumerate(boxes) if b[2] > b[0] and b[3] > b[1]]
    dropped = [f"annotation id {ids[i][0]!r} (image id {img_id!r}): {box_problem(ids[i][1], width, height, written[i])}"
               for i in sorted(set(range(len(boxes))) - set(keep))]
    record = {
        "file_name": os.path.join(image_root, img["file_name"]),
        "image_id": img_id,
        "height": height,
        "width": width,
        "boxes": np.array([boxes[i] for i in keep], dtype=np.float32).reshape(-1, 4),
        "labels": np.array([labels[i] for i in keep], dtype=np.int64),
        "difficult": np.zeros(len(keep), dtype=np.bool_),
    }
    if len(keep) < len(boxes) or any(box != annotated for box, (_, annotated) in zip(boxes, ids)):
        # the boxes as the json writes them, which COCOeval scores: what --gt and the report's galleries
        # draw (they showed "1 missed" where the drawing had dropped the box), as a VOC record's
        record["annotated"] = {"boxes": np.array([a for _, a in ids], np.float64).reshape(-1, 4),
                               "labels": np.array(labels, np.int64), "difficult": np.zeros(len(boxes), np.bool_)}
    return record, dropped, [repr(ids[i][0]) for i in keep if outside[i]], repeats


def _xyxy_hint(coco: COCO, past: int) -> str:
    """'; ... are they XYXY?' when a json's boxes look like [x1, y1, x2, y2] written where COCO's bbox
    is [x, y, width, height]: a quarter or more of them past their image (`past`: clipped or
    dropped) and nearly all with a width and height above their x and y (an API trial's own json
    said only 'clipped 30 boxes'). '' otherwise."""
    boxes = [ann["bbox"] for ann in coco.dataset.get("annotations", []) if not ann.get("iscrowd")]
    if not boxes or past < 0.25 * len(boxes):
        return ""
    above = sum(1 for x, y, w, h in boxes if w > x and h > y)
    if above < 0.9 * len(boxes):
        return ""
    return (f"; {above} of its {len(boxes)} boxes have a width and height above their x and y, as [x1, y1, x2, y2] "
            "boxes written where COCO's bbox is [x, y, width, height] would: are they XYXY?")


def box_problem(box: list[float], width: int, height: int, shown: str | list = "") -> str:
    """Why an XYXY box (0-based continuous, as annotated) has no area in its width x height image,
    in words; `shown`: the box as its file writes it, text or a COCO json's [x, y, w, h] list
    (default: [x, y, w, h] from `box`). A json's positive width too small to move its x (1e-300 at
    x 20) has none either: said so, quoting the file (it said 'bbox [20.0, 20.0, 0.0, 30.0]')."""
    x1, y1, x2, y2 = box
    tiny = isinstance(shown, list) and all(isinstance(v, (int, float)) and v > 0 for v in shown[2:4])
    shown = f"bbox {shown}" if isinstance(shown, list) else shown or \
        f"bbox {[round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)]}"
    if tiny and (x2 <= x1 or y2 <= y1):
        return f"{shown} has a width or height too small to tell from 0 at its x or y"
    if x2 <= x1 or y2 <= y1:
        return f"{shown} has a width or height <= 0"
    return f"{shown} lies outside the {width}x{height} image"


def _warn_zero_area(coco: COCO, ann_file: str) -> None:
    """'area': 0 on a box with width and height (a converter's placeholder): COCOeval sorts
    objects into APs / APm / APl by 'area' and counts these small. One warning (a missing
    'area' is filled as the box's, with its own warning, at evaluation)."""
    zero = [ann.get("id") for ann in coco.dataset.get("annotations", [])
            if ann.get("area", None) == 0 and ann["bbox"][2] > 0 and ann["bbox"][3] > 0]
    if zero:
        logger.warning("%s: %d annotations have 'area': 0 with a box of non-zero size (ids %s): the COCO evaluation "
                       "sorts objects by 'area' and counts these small, so APs, APm and APl are wrong (AP and "
                       "AP50 are not); give each its area (pixels of the object, or the box's width x height) or "
                       "leave the key out (then taken as width x height)", ann_file, len(zero),
                       first_few([repr(i) for i in zero], 3))


def _parse_annotation(ann: dict[str, Any], width: int, height: int, cat_to_label: dict[int, int],
                      ann_file: str) -> tuple[list[float] | None, int, list[float]]:
    """-> (clipped XYXY box, label, the XYXY box as annotated), or (None, 0, []) for crowd /
    ignored regions."""
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
        return None, 0, []
    # XYWH -> XYXY; COCO boxes are already 0-based continuous coordinates
    annotated = [x, y, x + w, y + h]
    box = [min(max(v, 0.0), limit) for v, limit in zip(annotated, (width, height, width, height))]
    return box, cat_to_label[cat_id], annotated


def _warn_ignore_annotations(coco: COCO, ann_file: str) -> None:
    """Annotations marked "ignore": 1 but not crowd are no training targets here (Detectron2
    refuses such a file), yet COCOeval scores them as objects: it reads only "iscrowd" (it sets
    its own "ignore" from it). One warning, with the count and what to do."""
    ids = [repr(ann.get("id")) for ann in coco.dataset.get("annotations", [])
           if ann.get("ignore", 0) and not ann.get("iscrowd", 0)]
    if ids:
        logger.warning("%s: %d annotations are marked 'ignore': 1 but not 'iscrowd': 1 (ids %s): they are left out "
                       "of training, but the COCO evaluation (pycocotools reads only iscrowd) scores them as objects "
                       "to find; mark them 'iscrowd': 1 for both to ignore them", ann_file, len(ids),
                       first_few(ids, 3))


def _warn_orphan_annotations(coco: COCO, ann_file: str) -> None:
    orphans = sum(len(v) for k, v in coco.imgToAnns.items() if k not in coco.imgs)
    if orphans:
        logger.warning("%s: %d annotations refer to image ids not listed in 'images' and are ignored",
                       ann_file, orphans)
