"""PASCAL VOC layout (VOCdevkit/VOC20xx or any folder laid out the same way) -> DatasetInfo.

Layout: <root>/ImageSets/Main/<split>.txt (one image id per line),
<root>/Annotations/<id>.xml, <root>/JPEGImages/<id>.jpg.
VOC boxes are 1-based inclusive pixel indices; like Detectron2 we subtract 1
from xmin/ymin only, giving 0-based continuous coordinates (a box covering
pixels 1..10 becomes [0, 10], width 10).

Training takes each box clipped to its image (one with nothing left inside is dropped). The
VOC evaluation scores the boxes as annotated, as the devkit does: a record whose clipping changed
or dropped a box also holds `annotated` = {"boxes" (0-based, unclipped, float64), "labels",
"difficult"} of all its objects, which the evaluator takes instead (evaluation/voc.py).

A test split without published annotations (VOC2012 test: ImageSets/Main/test.txt and
JPEGImages, no Annotations folder) is read with `annotations=False`: records without
boxes, image sizes from the image files' headers, `DatasetInfo.has_annotations` False.
"""
from __future__ import annotations

import difflib
import logging
import math
import os
import unicodedata
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence

import cv2
import numpy as np

from detection.data import DataError
from detection.data.coco import box_problem
from detection.data.dataset_info import DatasetInfo
from detection.data.orientation import header_size
from detection.utils.files import USER_TEXT_ENCODING, in_other_unicode_form, utf16_hint
from detection.utils.text import first_few

logger = logging.getLogger(__name__)

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

_LAYOUT_HINT = ("expected the VOC layout <root>/ImageSets/Main/<split>.txt, <root>/Annotations/<id>.xml, "
                "<root>/JPEGImages/<id>.jpg (the known names use <datasets.root>/VOCdevkit/VOC2007 and VOC2012)")


def load_voc(root: str, split: str, *, classes: Sequence[str] | None = None, use_07_metric: bool | None = None,
             name: str | None = None, skip_bad_files: bool = False, annotations: bool = True,
             exif_orientation: bool = True, leave_out_other_classes: bool = False) -> DatasetInfo:
    """Read split `split` of the VOC-layout folder `root`.

    classes: defaults to the 20 VOC classes (label i+1 = classes[i]).
    use_07_metric: defaults to True for a folder named VOC2007 (11-point AP), else False.
    skip_bad_files: a missing or unparsable XML is skipped with a warning instead of raising.
    annotations: False for a split without ground truth (VOC2012 test): no XML is read.
    leave_out_other_classes: objects of names not in `classes` are left out (counted in one line),
    not an error: an entry's keep_classes without its classes (MMDetection's VOC classes=(...)).
    exif_orientation: a size read from an image header (no <size> in the XML) is the size
    as viewed, turned by the EXIF orientation tag, as read_image returns the image.
    """
    class_names = list(VOC_CLASSES if classes is None else classes)
    if not class_names or len(set(class_names)) != len(class_names):
        raise DataError(f"VOC data set {root}: 'classes' must be a non-empty list of distinct names, got {class_names}")
    # the evaluation names a file after each class (comp4_det_test_{class}.txt): "1/2 inch" made a
    # subfolder, "../x" a file outside the results folder (a many-class trial)
    unfit = [c for c in class_names if not isinstance(c, str) or not c.strip() or c in (".", "..")
             or any(ch in c for ch in '/\\\0')]
    if unfit:
        raise DataError(f"VOC data set {root}: class name {unfit[0]!r} cannot name a file, as a VOC set's results "
                        "files are named after its classes (comp4_det_test_{class}.txt): give it a name without "
                        "'/' or '\\', not empty, '.' or '..' (or use a COCO json: its results file names no class)")
    folder = os.path.basename(os.path.normpath(root))
    info = DatasetInfo(
        name=name or f"voc:{folder}_{split}",
        kind="voc",
        class_names=class_names,
        records=[],
        label_to_category_id={i + 1: i + 1 for i in range(len(class_names))},
        root=os.path.abspath(root),
        split=split,
        use_07_metric=(folder == "VOC2007") if use_07_metric is None else bool(use_07_metric),
        has_annotations=annotations,
    )
    image_ids = read_split(root, split)
    if not annotations:
        info.records = [_unannotated_record(root, image_id, exif_orientation) for image_id in image_ids]
        return info
    annotation_folder = os.path.join(root, "Annotations")
    if image_ids and not os.path.isdir(annotation_folder):
        raise DataError(f"VOC annotations folder not found: {annotation_folder} (split {split} of {info.name} needs "
                        f"<id>.xml files there); only a test set without published annotations, such as "
                        f"voc_2012_test, goes without: give its entry annotations: false")
    info.records = _load_records(root, split, image_ids, {c: i + 1 for i, c in enumerate(class_names)},
                                 skip_bad_files, exif_orientation, leave_out_other_classes)
    return info


def _load_records(root: str, split: str, image_ids: list[str], class_to_label: dict[str, int],
                  skip_bad_files: bool, exif_orientation: bool, leave_out_others: bool = False) -> list[dict]:
    """One record per image id from its XML; bad files skipped (one warning) or raised."""
    records, dropped, num_clipped, skipped, repeats, others = [], [], 0, [], [], Counter()
    for image_id in image_ids:
        try:
            record, its_dropped, clipped, its_repeats = _load_xml_record(root, image_id, class_to_label,
                                                                         exif_orientation, others if leave_out_others
                                                                         else None)
        except _UnreadableXML as e:
            if not skip_bad_files:
                raise DataError(str(e)) from e
            skipped.append(e.path)
            continue
        records.append(record)
        dropped += its_dropped
        num_clipped += clipped
        repeats += its_repeats
    if dropped or num_clipped:
        what = ([f"clipped {num_clipped} boxes that reach past their image"] if num_clipped else []) + (
            [f"dropped {len(dropped)} boxes with no area in their image ({first_few(dropped, 3)})"] if dropped else [])
        logger.warning("%s split %s: in the boxes training learns from, %s; the VOC evaluation scores every box "
                       "as annotated, as the devkit does, and --gt and the report draw those", root, split,
                       " and ".join(what))
    if repeats:
        logger.warning("%s split %s: %d objects repeat another of their image with the same class and box (%s): the "
                       "evaluation counts each copy as one more object to find, which no detection can match once "
                       "the first is (AP falls), and training learns the box twice; remove the copies", root, split,
                       len(repeats), first_few(repeats, 3))
    if others:
        logger.info("%s split %s: %d objects of classes not kept left out (%s)", root, split, sum(others.values()),
                    ", ".join(f"{name} {n}" for name, n in others.most_common()))
    if leave_out_others:  # a kept name no object has: a typo would otherwise leave out everything in silence
        found = {int(label) for record in records for label in record["labels"]}
        absent = [name for name, label in class_to_label.items() if label not in found]
        if absent:
            close = difflib.get_close_matches(absent[0], list(others), n=1)
            logger.warning("%s split %s: no object is named %s (keep_classes)%s; the other names found: %s", root,
                           split, ", ".join(absent), f" (did you mean {close[0]}?)" if close else "",
                           ", ".join(others) or "none")
    if skipped:  # one warning for all of them, not a line per file
        logger.warning("%s split %s: skipped %d images with missing or unreadable annotation files: %s",
                       root, split, len(skipped), first_few(skipped, 3))
    return records


def _unannotated_record(root: str, image_id: str, exif_orientation: bool) -> dict:
    """A record without boxes; the size from the image header (PIL reads no pixels), as
    viewed. A missing or unreadable image gets size 0x0 and is reported with all the others
    by catalog.check_image_files (or by the loader, which checks every decoded size)."""
    file_name = os.path.join(root, "JPEGImages", f"{image_id}.jpg")
    height, width, _ = header_size(file_name, apply_tag=exif_orientation) or (0, 0, 1)
    return {
        "file_name": file_name,
        "image_id": image_id,
        "height": int(height),
        "width": int(width),
        "boxes": np.zeros((0, 4), dtype=np.float32),
        "labels": np.zeros(0, dtype=np.int64),
        "difficult": np.zeros(0, dtype=np.bool_),
    }


def read_split(root: str, split: str) -> list[str]:
    """Image ids listed in <root>/ImageSets/Main/<split>.txt (first token of each non-empty line)."""
    if not os.path.isdir(root):
        raise DataError(f"VOC folder not found: {root}; {_LAYOUT_HINT}")
    path = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
    if os.path.isdir(path):
        raise DataError(f"VOC split file {path} is a folder, not a text file; {_LAYOUT_HINT}")
    if not os.path.isfile(path):
        raise DataError(f"VOC split file not found: {path}; {_LAYOUT_HINT}")
    try:
        with open(path, encoding=USER_TEXT_ENCODING) as f:
            ids = [line.split()[0] for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise DataError(f"VOC split file {path} is not UTF-8 text (byte {e.start}){utf16_hint(path)}; it lists one "
                        "image id per line") from None
    except OSError as e:
        raise DataError(f"could not read VOC split file {path}: {e.strerror or e}") from None
    unique = list(dict.fromkeys(ids))
    if len(unique) < len(ids):  # an image listed twice would be trained on, and counted, twice
        repeated = [i for i, n in Counter(ids).items() if n > 1]
        logger.warning("VOC split file %s lists %d image ids more than once (%s): each is read once", path,
                       len(repeated), first_few(repeated, 3))
    return unique


class _UnreadableXML(Exception):
    """A missing or unparsable annotation file (skippable with skip_bad_images)."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path  # the file to name in the one summary warning


def _load_xml_record(root: str, image_id: str, class_to_label: dict[str, int], exif_orientation: bool,
                     others: Counter | None = None) -> tuple[dict, list[str], int, list[str]]:
    """-> (record, the boxes dropped (nothing of them inside the image), each named with why, the
    number of boxes clipped to the image, the objects that repeat another's class and box, named).
    `others`: objects of names not in class_to_label are left out and counted there (else an error)."""
    xml_path = os.path.join(root, "Annotations", f"{image_id}.xml")
    if not os.path.isfile(xml_path):  # the split file's é, the disk's e + accent?
        xml_path = in_other_unicode_form(xml_path) or xml_path
    if not os.path.isfile(xml_path):
        raise _UnreadableXML(f"VOC annotation file not found: {xml_path}; {_LAYOUT_HINT}", xml_path)
    try:
        tree = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError, UnicodeDecodeError) as e:
        raise _UnreadableXML(f"malformed XML in VOC annotation file {xml_path}: {e}", xml_path) from e
    file_name = _image_path(root, image_id, tree)
    height, width = _image_size(tree, xml_path, file_name, exif_orientation)
    elements = list(enumerate(tree.findall("object")))
    if others is not None:  # an object without a <name> stays an error (_parse_object): it is no other class
        names = [(obj.findtext("name") or "").strip() for _, obj in elements]
        others.update(name for name in names if name and name not in class_to_label)
        elements = [element for element, name in zip(elements, names) if name in class_to_label or not name]
    objects = [_parse_object(obj, index, xml_path, class_to_label) for index, obj in elements]
    annotated = np.array([box for box, _, _ in objects], dtype=np.float64).reshape(-1, 4)
    labels = np.array([label for _, label, _ in objects], dtype=np.int64)
    difficult = np.array([flag for _, _, flag in objects], dtype=np.bool_)
    clipped = np.clip(annotated, 0.0, [width, height, width, height])
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    num_clipped = int(((clipped != annotated).any(axis=1) & keep).sum())
    record = {
        "file_name": file_name,
        "image_id": image_id,
        "height": height,
        "width": width,
        "boxes": clipped[keep].astype(np.float32),
        "labels": labels[keep],
        "difficult": difficult[keep],
    }
    # the devkit scores the boxes as annotated, in float64: a box clipped or dropped here, or a
    # coordinate float32 does not hold (10.1: an IoU of exactly 0.5 came out 0.49999998, a miss,
    # or a match when another box of the image was clipped), is scored from this copy
    inexact = bool((annotated.astype(np.float32) != annotated).any())
    if num_clipped or not keep.all() or inexact:
        record["annotated"] = {"boxes": annotated, "labels": labels, "difficult": difficult}
    dropped = [f"{xml_path}: object #{i}: " + box_problem(
        annotated[i].tolist(), width, height,
        f"<bndbox> {[round(float(v), 2) for v in (annotated[i][0] + 1, annotated[i][1] + 1, *annotated[i][2:])]}")
        for i in np.flatnonzero(~keep)]
    seen: dict[tuple, int] = {}
    repeats = [f"{xml_path}: object #{i} repeats #{seen[key]}" for i, key in
               enumerate((int(label), *box) for label, box in zip(labels, annotated.tolist()))
               if seen.setdefault(key, i) != i]
    return record, dropped, num_clipped, repeats


def _parse_object(obj: ET.Element, index: int, xml_path: str, class_to_label: dict[str, int]
                  ) -> tuple[list[float], int, bool]:
    """One <object> -> (0-based XYXY box as annotated, label, difficult)."""
    name = (obj.findtext("name") or "").strip()
    where = f"{xml_path}: object #{index} ({name or 'no <name>'})"
    if name not in class_to_label:
        raise DataError(f"{where} has unknown class name {name!r}; classes are {list(class_to_label)}")
    bndbox = obj.find("bndbox")
    if bndbox is None:
        raise DataError(f"{where} has no <bndbox>")
    x1, y1, x2, y2 = (_number(bndbox.findtext(k), f"<bndbox>/<{k}>", where) for k in ("xmin", "ymin", "xmax", "ymax"))
    flag = _number(obj.findtext("difficult") or "0", "<difficult> (0 or 1)", where)
    if not math.isfinite(flag):
        raise DataError(f"{where}: <difficult> (0 or 1) is {flag}")
    difficult = bool(int(flag))
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise DataError(f"{where} has a non-finite box {[x1, y1, x2, y2]}")
    # 1-based inclusive pixels -> 0-based continuous coordinates (Detectron2's convention)
    return [x1 - 1.0, y1 - 1.0, x2, y2], class_to_label[name], difficult


def _number(text: str | None, element: str, where: str) -> float:
    """An element's text as a number; DataError naming the element when it is missing or is not one."""
    if text is None or not text.strip():
        raise DataError(f"{where}: {element} is missing")
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{where}: {element} is {text.strip()!r}, not a number") from None


def _image_path(root: str, image_id: str, tree: ET.Element) -> str:
    """JPEGImages/<id>.jpg; a custom set may store another extension, named in <filename>."""
    path = os.path.join(root, "JPEGImages", f"{image_id}.jpg")
    if not os.path.exists(path):
        path = in_other_unicode_form(path) or path
    stored = (tree.findtext("filename") or "").strip()
    if not os.path.exists(path) and stored and _same_name(os.path.splitext(stored)[0], image_id):
        return os.path.join(root, "JPEGImages", stored)
    return path  # a missing image is reported with all the others by catalog.check_image_files


def _same_name(a: str, b: str) -> bool:
    return unicodedata.normalize("NFC", a) == unicodedata.normalize("NFC", b)


def _image_size(tree: ET.Element, xml_path: str, file_name: str, exif_orientation: bool) -> tuple[int, int]:
    """(height, width) from <size>, or from the image header when the XML lacks it (as viewed:
    turned by the EXIF tag unless exif_orientation is False, as read_image returns it)."""
    sizes = []
    for key in ("height", "width"):
        text = (tree.findtext(f"size/{key}") or "0").strip() or "0"
        try:
            value = float(text)
        except ValueError:
            raise DataError(f"{xml_path}: <size>/<{key}> is {text!r}, not a number of pixels") from None
        if not math.isfinite(value) or not value.is_integer():
            raise DataError(f"{xml_path}: <size>/<{key}> is {text!r}, not a whole number of pixels")
        sizes.append(int(value))
    height, width = sizes
    if height > 0 and width > 0:
        return height, width  # 0 or less: unknown (some tools write 0), read from the image instead
    header = header_size(file_name, apply_tag=exif_orientation)
    if header is not None:
        return header[0], header[1]
    try:  # a format PIL does not parse: no tag known either. Decoded from its bytes, not by name: OpenCV
        img = cv2.imdecode(np.fromfile(file_name, dtype=np.uint8), cv2.IMREAD_UNCHANGED)  # crashes on some names
    except (OSError, cv2.error):
        img = None
    if img is None:
        raise _UnreadableXML(f"{xml_path} has no <size> and its image {file_name} cannot be read", xml_path)
    return int(img.shape[0]), int(img.shape[1])
