"""Fuzzing every reader: many corrupted inputs, generated (seeded) from small valid
ones, fed to the real entry points: the COCO and VOC readers, the data loader, the config
loader, the checkpoint and weight loaders, `tools/eval.py --results` and `tools/train_det.py`.

Each case must end in exactly one of:
- accepted, with the documented handling (degenerate boxes dropped with a warning and a
  count, orphan annotations ignored with a warning, ...) and the output checked for sanity
  (finite boxes of positive area inside the image, labels 1..K, unique ids);
- one clear error: the layer's error type, one line, naming the file and the record or field;
- skipped with a warning, when `dataloader.skip_bad_images` is on.

Anything else fails the case: a traceback from deep inside (TypeError, KeyError, a numpy
error), a message on several lines or one that does not say where, a result that breaks
the invariants. Each family prints its number of cases. Cases that expose a bug in a file
this suite's author could not change are listed in KNOWN_BUGS and run as strict xfails.
"""
from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import random
import shutil
import signal
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from backbones.errors import WeightsError
from detection.config import ConfigError
from detection.data import DataError
from detection.engine.checkpoint import CheckpointError

SEED = 24
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the fuzzed pickles
CLEAR_ERRORS = (DataError, ConfigError, CheckpointError, WeightsError, ValueError)
ROOT = Path(__file__).resolve().parents[1]
COUNTS: Counter = Counter()  # family -> cases run (printed per family)


@dataclass
class Case:
    name: str
    run: Callable[[], Any]  # the entry point on the corrupted input; its return value is checked
    where: tuple[str, ...] = ()  # what an error must name (the file; the record or field)
    check: Optional[Callable[[Any], None]] = None  # invariants of an accepted result
    outcomes: frozenset = frozenset({"accepted", "error"})  # what is allowed
    warns: tuple[str, ...] = ()  # warnings an accepted (or skipped) case must give
    tags: dict = field(default_factory=dict)


class _Hang(BaseException):
    """Raised by the alarm in a case that runs too long (a BaseException: no reader catches it)."""


def _alarm(signum, frame):
    raise _Hang


CASE_SECONDS = 30  # far beyond any case's time; past it the case counts as a hang


def outcome(case: Case, caplog) -> tuple[str, str]:
    """-> (outcome, problem); problem is "" when the case ended as it may."""
    caplog.clear()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        return _outcome(case, caplog)
    except _Hang:
        return "hang", f"still running after {CASE_SECONDS} s"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _outcome(case: Case, caplog) -> tuple[str, str]:
    try:
        result = case.run()
    except CLEAR_ERRORS as err:
        message = str(err)
        if "\n" in message.strip():
            return "error", f"a message on several lines: {message[:300]!r}"
        missing = [w for w in case.where if w not in message]
        if missing:
            return "error", f"the message does not name {missing}: {message[:300]!r}"
        kind = "error"
    except Exception as err:  # noqa: BLE001 - exactly what the fuzzing looks for
        return "crash", f"{type(err).__name__} from deep inside: {str(err)[:300]!r}"
    else:
        kind = "skipped" if any("skip" in r.getMessage() for r in caplog.records) else "accepted"
        try:
            if case.check is not None:
                case.check(result)
        except AssertionError as err:
            return kind, f"accepted but wrong: {err}"
        text = "\n".join(r.getMessage() for r in caplog.records)
        missing = [w for w in case.warns if w not in text]
        if missing:
            return kind, f"no warning {missing} (got {text[:300]!r})"
    if kind not in case.outcomes:
        return kind, f"ended as {kind}, expected {sorted(case.outcomes)}"
    return kind, ""


def run_family(family: str, cases: list[Case], caplog) -> None:
    """Every case of a family but the known bugs; all problems reported at once."""
    caplog.set_level(logging.WARNING)
    problems, seen = [], Counter()
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    for case in cases:
        if case.name in KNOWN_BUGS:
            continue
        kind, problem = outcome(case, caplog)
        seen[kind] += 1
        if problem:
            problems.append(f"{case.name}: {problem}")
    COUNTS[family] = sum(seen.values())
    print(f"\nfuzz {family}: {sum(seen.values())} cases ({', '.join(f'{v} {k}' for k, v in sorted(seen.items()))})"
          f"{f'; {len(problems)} FAILED' if problems else ''}")
    assert not problems, "\n".join(problems)


# ============================================================================ invariants

def check_dataset(info, *, num_classes: int, min_records: int = 1) -> None:
    """What every accepted data set must satisfy: the records' boxes are finite, inside their
    image, of positive area, labels in 1..K, ids unique, sizes positive."""
    assert info.num_classes == num_classes, f"{info.num_classes} classes, expected {num_classes}"
    assert len(info.records) >= min_records, f"{len(info.records)} records"
    ids = [r["image_id"] for r in info.records]
    assert len(ids) == len(set(ids)), f"duplicate image ids {ids}"
    for r in info.records:
        boxes, labels = r["boxes"], r["labels"]
        assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4, boxes
        assert len(labels) == len(boxes) == len(r["difficult"])
        assert np.isfinite(boxes).all(), boxes
        assert isinstance(r["height"], int) and isinstance(r["width"], int) and r["height"] > 0 and r["width"] > 0
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all(), boxes
        assert (boxes[:, 2] <= r["width"]).all() and (boxes[:, 3] <= r["height"]).all(), (boxes, r["width"])
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all(), boxes
        assert ((labels >= 1) & (labels <= num_classes)).all(), labels


# ============================================================================ COCO reader

WRONG_VALUES = [None, "x", "3", 1.5, True, [], {}, [1, 2], -1, 0, 10**20, float("nan"), float("inf")]
COCO_CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}]
COCO_IMAGES = [{"id": i + 1, "file_name": f"{name}.jpg", "height": 30, "width": 40}
               for i, name in enumerate("abc")]
COCO_ANNOTATIONS = [
    {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 12], "area": 120, "iscrowd": 0},
    {"id": 2, "image_id": 1, "category_id": 5, "bbox": [20, 5, 15, 20], "area": 300, "iscrowd": 0},
    {"id": 3, "image_id": 2, "category_id": 5, "bbox": [1, 1, 30, 25], "area": 750, "iscrowd": 0},
    {"id": 4, "image_id": 3, "category_id": 1, "bbox": [5, 5, 8, 8], "area": 64, "iscrowd": 0},
]


def coco_base() -> dict:
    return {"images": copy.deepcopy(COCO_IMAGES), "annotations": copy.deepcopy(COCO_ANNOTATIONS),
            "categories": copy.deepcopy(COCO_CATEGORIES)}


@pytest.fixture(scope="module")
def coco_images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco_images")
    for img in COCO_IMAGES:
        cv2.imwrite(str(root / img["file_name"]), np.full((img["height"], img["width"], 3), 120, np.uint8))
    return root


def coco_case(name: str, tmp: Path, images: Path, content: Any, *, where: tuple = (), raw: bool = False,
              outcomes=frozenset({"accepted", "error"}), warns: tuple = (), num_classes: int = 2,
              min_records: int = 1) -> Case:
    """The COCO reader through the catalog (as training and evaluation call it) on `content`
    (a dict dumped as json, or raw bytes)."""
    from detection.data.catalog import get_dataset

    path = tmp / f"{name}.json"

    def run():
        if raw:
            path.write_bytes(content)
        else:
            path.write_text(json.dumps(content))
        return get_dataset({"type": "coco", "ann_file": str(path), "image_root": str(images)}, str(tmp))

    return Case(name, run, where=(str(path), *where), outcomes=frozenset(outcomes), warns=warns,
                check=lambda info: check_dataset(info, num_classes=num_classes, min_records=min_records))


def coco_cases(tmp: Path, images: Path) -> list[Case]:
    rng = random.Random(SEED)
    cases = [coco_case("valid", tmp, images, coco_base(), outcomes={"accepted"})]
    text = json.dumps(coco_base()).encode()
    # ---- the file: empty, truncated, invalid, not UTF-8, not an object
    cases.append(coco_case("empty_file", tmp, images, b"", raw=True, where=("empty",), outcomes={"error"}))
    cases.append(coco_case("blank_file", tmp, images, b"  \n", raw=True, where=("empty",), outcomes={"error"}))
    for cut in sorted(rng.sample(range(1, len(text) - 1), 12)):
        cases.append(coco_case(f"truncated_at_{cut}", tmp, images, text[:cut], raw=True,
                               where=("not valid json",), outcomes={"error"}))
    for i in range(6):
        garbage = bytes(rng.randrange(32, 127) for _ in range(rng.randrange(1, 60)))
        cases.append(coco_case(f"garbage_{i}", tmp, images, b"{" + garbage, raw=True, outcomes={"error"}))
    cases.append(coco_case("latin1_bytes", tmp, images, text.replace(b'"cat"', b'"c\xe4t"'), raw=True,
                           where=("not UTF-8",), outcomes={"error"}))
    cases.append(coco_case("utf16", tmp, images, json.dumps(coco_base()).encode("utf-16"), raw=True,
                           where=("is UTF-16 text", "save it as UTF-8"), outcomes={"error"}))
    cases.append(coco_case("nested_200000_deep", tmp, images, b'{"images": ' + b"[" * 200000, raw=True,
                           where=("nests its json too deeply",), outcomes={"error"}))  # was a RecursionError traceback
    # a Windows editor's UTF-8 byte-order mark is not text: the json is read (json.loads refused it)
    cases.append(coco_case("utf8_bom", tmp, images, b"\xef\xbb\xbf" + text, raw=True, outcomes={"accepted"}))
    for value in ([], 3, "x", None, [coco_base()]):
        cases.append(coco_case(f"top_level_{type(value).__name__}_{len(cases)}", tmp, images, value,
                               where=("expected a COCO json object",), outcomes={"error"}))
    # ---- the three lists: missing, wrong type, extra fields
    for key in ("images", "categories"):
        data = coco_base()
        del data[key]
        cases.append(coco_case(f"no_{key}", tmp, images, data, where=(key,), outcomes={"error"}))
    data = coco_base()
    del data["annotations"]  # an image-info json (COCO test-dev): images without boxes
    cases.append(coco_case("no_annotations", tmp, images, data, outcomes={"accepted"}))
    for key in ("images", "annotations", "categories"):
        for value in ({}, "x", 3, None):
            data = coco_base()
            data[key] = value
            cases.append(coco_case(f"{key}_is_{type(value).__name__}", tmp, images, data, where=(key,),
                                   outcomes={"error"}))
    data = coco_base()
    data["categories"] = []
    cases.append(coco_case("empty_categories", tmp, images, data, where=("no categories",), outcomes={"error"}))
    data = coco_base()
    data.update(info={"year": 2024}, licenses=[{"id": 1}], extra=[1, 2])
    cases.append(coco_case("extra_top_level_fields", tmp, images, data, outcomes={"accepted"}))
    # ---- every field of each kind of record: wrong types, missing, extra
    fields = {"annotations": ("id", "image_id", "category_id", "bbox", "area", "iscrowd"),
              "images": ("id", "file_name", "height", "width"), "categories": ("id", "name")}
    singular = {"annotations": "annotation", "images": "image", "categories": "category"}
    for key, names in fields.items():
        for name in names:
            for value in WRONG_VALUES:
                data = coco_base()
                index = rng.randrange(len(data[key]))
                data[key][index][name] = value
                cases.append(coco_case(f"{key}[{index}].{name}={value!r}", tmp, images, data,
                                       where=(f"{singular[key]} #{index}", repr(name))
                                       if _must_refuse(key, name, value) else (),
                                       outcomes={"error"} if _must_refuse(key, name, value)
                                       else {"accepted", "error"}, min_records=0))
            data = coco_base()
            index = rng.randrange(len(data[key]))
            del data[key][index][name]
            optional = name in ("area", "iscrowd")
            cases.append(coco_case(f"{key}[{index}].{name}_missing", tmp, images, data,
                                   where=() if optional else (f"{singular[key]} #{index}", repr(name)),
                                   outcomes={"accepted"} if optional else {"error"}))
        data = coco_base()
        for record in data[key]:
            record["extra_field"] = {"anything": [1, 2]}
        cases.append(coco_case(f"{key}_extra_fields", tmp, images, data, outcomes={"accepted"}))
        data = coco_base()
        data[key][0] = "not a record"
        cases.append(coco_case(f"{key}[0]_not_an_object", tmp, images, data, where=(f"{singular[key]} #0",),
                               outcomes={"error"}))
    # ---- box values: non-finite, negative, zero-area, outside the image
    for coord in range(4):
        for value in (float("nan"), float("inf"), float("-inf")):
            data = coco_base()
            data["annotations"][1]["bbox"][coord] = value
            cases.append(coco_case(f"bbox[{coord}]={value}", tmp, images, data,
                                   where=("annotation id 2", "bbox"), outcomes={"error"}))
    degenerate = {"zero_width": [5, 5, 0, 10], "zero_height": [5, 5, 10, 0], "negative_width": [20, 5, -10, 10],
                  "negative_height": [5, 20, 10, -10], "outside_right": [50, 5, 10, 10],
                  "outside_below": [5, 40, 10, 10], "outside_left": [-30, 5, 10, 10], "outside_above": [5, -30, 10, 10]}
    for name, box in degenerate.items():
        data = coco_base()
        data["annotations"][1]["bbox"] = box
        why = "lies outside the 40x30 image" if name.startswith("outside") else "has a width or height <= 0"
        cases.append(coco_case(f"box_{name}", tmp, images, data, outcomes={"accepted"},
                               warns=("dropped 1 boxes with no area in their image (annotation id 2 ", why)))
    for name, box in {"partly_outside": [30, 20, 50, 50], "whole_image": [0, 0, 40, 30],
                      "huge": [-1e9, -1e9, 2e9, 2e9], "tiny": [3, 3, 1e-3, 1e-3]}.items():
        data = coco_base()
        data["annotations"][1]["bbox"] = box
        cases.append(coco_case(f"box_{name}", tmp, images, data, outcomes={"accepted"}))
    for length in (0, 3, 5):
        data = coco_base()
        data["annotations"][2]["bbox"] = [1.0] * length
        cases.append(coco_case(f"bbox_length_{length}", tmp, images, data, where=("annotation #2", "bbox"),
                               outcomes={"error"}))
    # ---- references: unknown categories, duplicates, orphans
    data = coco_base()
    data["annotations"][3]["category_id"] = 99
    cases.append(coco_case("unknown_category", tmp, images, data, where=("annotation id 4", "99"), outcomes={"error"}))
    for key in ("images", "annotations", "categories"):
        data = coco_base()
        data[key][1]["id"] = data[key][0]["id"]
        cases.append(coco_case(f"duplicate_{key}_id", tmp, images, data, where=(f"{singular[key]} #1", "id"),
                               outcomes={"error"}))
    data = coco_base()
    data["annotations"][2]["image_id"] = 77
    cases.append(coco_case("annotation_of_a_missing_image", tmp, images, data, outcomes={"accepted"},
                           warns=("1 annotations refer to image ids not listed",)))
    data = coco_base()
    data["images"][1]["id"] = "2"
    cases.append(coco_case("mixed_image_id_types", tmp, images, data, where=("image ids mix",), outcomes={"error"}))
    data = coco_base()
    data["images"][2]["file_name"] = "missing.jpg"
    cases.append(coco_case("image_file_missing", tmp, images, data, where=("missing.jpg",), outcomes={"error"}))
    data = coco_base()
    data["annotations"][0]["iscrowd"] = 1
    cases.append(coco_case("crowd_box_not_a_target", tmp, images, data, outcomes={"accepted"}))
    # ---- the path itself
    cases.append(Case("ann_file_is_a_folder", lambda: _coco_at(tmp, images), where=(str(tmp), "folder"),
                      outcomes=frozenset({"error"})))
    cases.append(Case("image_root_is_a_file", lambda: _coco_at(tmp / "valid.json", tmp / "valid.json"),
                      where=(str(tmp / "valid.json"),), outcomes=frozenset({"error"})))
    return cases


def _coco_at(ann_file: Path, image_root: Path):
    from detection.data.catalog import get_dataset

    return get_dataset({"type": "coco", "ann_file": str(ann_file), "image_root": str(image_root)}, "/")


def _must_refuse(key: str, name: str, value: Any) -> bool:
    """Values of a COCO field that can only be refused (the others may be valid there)."""
    if key == "annotations" and name == "area":
        return not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and value >= 0)
    if key == "annotations" and name == "iscrowd":
        return value not in (0, 1)
    if name in ("height", "width"):
        return not (type(value) in (int, float) and math.isfinite(value) and value >= 1)
    if name == "bbox":
        return True  # none of WRONG_VALUES is 4 numbers
    if name == "file_name":
        return not isinstance(value, str) or value == ""
    if name == "name":
        return not isinstance(value, str)
    # ids: an int (any: refs then break) or a non-empty string may be accepted or refused
    return not (type(value) is int or (isinstance(value, str) and value))


def test_fuzz_coco_reader(tmp_path, coco_images, caplog):
    run_family("COCO reader", coco_cases(tmp_path, coco_images), caplog)


# ============================================================================ VOC reader

VOC_XML = """<annotation>
  <folder>VOC</folder><filename>{id}.jpg</filename>
  <size><width>40</width><height>30</height><depth>3</depth></size>
  <object><name>cat</name><difficult>0</difficult>
    <bndbox><xmin>3</xmin><ymin>4</ymin><xmax>12</xmax><ymax>15</ymax></bndbox></object>
  <object><name>dog</name><difficult>1</difficult>
    <bndbox><xmin>20</xmin><ymin>5</ymin><xmax>38</xmax><ymax>28</ymax></bndbox></object>
</annotation>
"""
VOC_IDS = ("000001", "000002")


def make_voc(root: Path) -> Path:
    for sub in ("ImageSets/Main", "Annotations", "JPEGImages"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "ImageSets/Main/train.txt").write_text("\n".join(VOC_IDS) + "\n")
    for image_id in VOC_IDS:
        (root / "Annotations" / f"{image_id}.xml").write_text(VOC_XML.format(id=image_id))
        cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.jpg"), np.full((30, 40, 3), 100, np.uint8))
    return root


def voc_case(name: str, tmp: Path, change: Callable[[Path], Any], *, where: tuple = (), skip: bool = False,
             outcomes=frozenset({"accepted", "error"}), warns: tuple = (), min_records: int = 1) -> Case:
    """The VOC reader through the catalog on a fresh copy of the valid folder, changed by `change`."""
    from detection.data.catalog import get_dataset

    root = tmp / name

    def run():
        shutil.rmtree(root, ignore_errors=True)
        make_voc(root)
        change(root)
        return get_dataset({"type": "voc", "root": str(root), "split": "train", "classes": ["cat", "dog"]},
                           str(tmp), skip_bad_images=skip)

    return Case(name, run, where=where, outcomes=frozenset(outcomes), warns=warns,
                check=lambda info: check_dataset(info, num_classes=2, min_records=min_records))


def xml_of(root: Path, image_id: str = "000001") -> Path:
    return root / "Annotations" / f"{image_id}.xml"


def edit_xml(edit: Callable[[ET.Element], None]) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        tree = ET.parse(xml_of(root))
        edit(tree.getroot())
        tree.write(xml_of(root))
    return change


def set_text(path: str, value: str, index: int = 0) -> Callable[[ET.Element], None]:
    def edit(tree: ET.Element) -> None:
        tree.findall(path)[index].text = value
    return edit


def remove(path: str, index: int = 0) -> Callable[[ET.Element], None]:
    def edit(tree: ET.Element) -> None:
        element = tree.findall(path)[index]
        for parent in tree.iter():
            if element in list(parent):
                parent.remove(element)
                return
    return edit


def voc_cases(tmp: Path) -> list[Case]:
    rng = random.Random(SEED + 1)
    xml = "Annotations/000001.xml"
    cases = [voc_case("valid", tmp, lambda root: None, outcomes={"accepted"})]
    text = VOC_XML.format(id="000001").encode()
    cases.append(voc_case("xml_empty", tmp, lambda r: xml_of(r).write_bytes(b""), where=(xml,), outcomes={"error"}))
    for cut in sorted(rng.sample(range(1, len(text) - 15), 10)):
        cases.append(voc_case(f"xml_truncated_at_{cut}", tmp, lambda r, c=cut: xml_of(r).write_bytes(text[:c]),
                              where=(xml,), outcomes={"error"}))
        cases.append(voc_case(f"xml_truncated_at_{cut}_skipped", tmp,
                              lambda r, c=cut: xml_of(r).write_bytes(text[:c]), skip=True, outcomes={"skipped"},
                              warns=("skipped 1 images with missing or unreadable annotation files",)))
    cases.append(voc_case("xml_latin1", tmp, lambda r: xml_of(r).write_bytes(text.replace(b"cat", b"c\xe4t")),
                          where=(xml,), outcomes={"error"}))
    cases.append(voc_case("xml_missing", tmp, lambda r: xml_of(r).unlink(), where=(xml,), outcomes={"error"}))
    cases.append(voc_case("xml_is_a_folder", tmp, lambda r: (xml_of(r).unlink(), xml_of(r).mkdir()),
                          where=(xml,), outcomes={"error"}))
    cases.append(voc_case("xml_not_voc", tmp, lambda r: xml_of(r).write_text("<html><body/></html>"),
                          min_records=2, outcomes={"accepted"}))  # no <size>, no objects: an empty image
    # ---- <size>
    cases.append(voc_case("size_missing", tmp, edit_xml(remove("size")), outcomes={"accepted"}))
    for value in ("abc", "", "nan", "inf", "-inf", "1e400", "-5", "0", "12.5", "0x20"):
        for dim in ("width", "height"):
            cases.append(voc_case(f"size_{dim}={value!r}", tmp, edit_xml(set_text(f"size/{dim}", value)),
                                  where=(xml, "size") if value in ("abc", "nan", "inf", "-inf", "1e400", "0x20", "12.5")
                                  else (), outcomes={"accepted"} if value in ("", "-5", "0") else {"error"}))
    # ---- <bndbox> and its coordinates
    for index in (0, 1):
        cases.append(voc_case(f"bndbox_missing_{index}", tmp, edit_xml(remove("object/bndbox", index)),
                              where=(xml, f"object #{index}", "bndbox"), outcomes={"error"}))
        cases.append(voc_case(f"name_missing_{index}", tmp, edit_xml(remove("object/name", index)),
                              where=(xml, f"object #{index}"), outcomes={"error"}))
    for coord in ("xmin", "ymin", "xmax", "ymax"):
        cases.append(voc_case(f"{coord}_missing", tmp, edit_xml(remove(f"object/bndbox/{coord}")),
                              where=(xml, "object #0"), outcomes={"error"}))
        for value in ("abc", "", "1,5", "nan", "inf", "-inf", "1e400", "[3]"):
            cases.append(voc_case(f"{coord}={value!r}", tmp, edit_xml(set_text(f"object/bndbox/{coord}", value)),
                                  where=(xml, "object #0"), outcomes={"error"}))
    degenerate = {"zero_width": ("xmax", "2"), "negative_width": ("xmax", "1"), "zero_height": ("ymax", "3"),
                  "outside_right": ("xmin", "45"), "outside_below": ("ymin", "35"), "negative_corner": ("xmax", "-4")}
    for name, (coord, value) in degenerate.items():
        cases.append(voc_case(f"box_{name}", tmp, edit_xml(set_text(f"object/bndbox/{coord}", value)),
                              outcomes={"accepted"}, warns=("dropped 1 boxes with no area in their image (",
                                                            "000001.xml: object #0: <bndbox> [")))
    for name, (coord, value) in {"partly_outside": ("xmax", "90"), "float_coords": ("xmin", "3.7"),
                                 "negative_start": ("xmin", "-20")}.items():
        cases.append(voc_case(f"box_{name}", tmp, edit_xml(set_text(f"object/bndbox/{coord}", value)),
                              outcomes={"accepted"}))
    # ---- names, difficult, extra elements
    cases.append(voc_case("unknown_class", tmp, edit_xml(set_text("object/name", "zebra")),
                          where=(xml, "object #0", "zebra"), outcomes={"error"}))
    for value in ("yes", "nan", "", "2", "1.0"):
        cases.append(voc_case(f"difficult={value!r}", tmp, edit_xml(set_text("object/difficult", value)),
                              where=(xml, "object #0") if value in ("yes", "nan") else (),
                              outcomes={"error"} if value in ("yes", "nan") else {"accepted"}))

    def extra(tree: ET.Element) -> None:
        ET.SubElement(tree, "segmented").text = "0"
        ET.SubElement(tree.find("object"), "pose").text = "Left"
        ET.SubElement(tree.find("object/bndbox"), "zmin").text = "x"
    cases.append(voc_case("extra_elements", tmp, edit_xml(extra), outcomes={"accepted"}))
    # ---- the split file and the layout
    split = "ImageSets/Main/train.txt"
    cases.append(voc_case("split_empty", tmp, lambda r: (r / split).write_text(""), min_records=0,
                          outcomes={"accepted"}))
    cases.append(voc_case("split_latin1", tmp, lambda r: (r / split).write_bytes(b"00000\xe4\n"),
                          where=(split, "UTF-8"), outcomes={"error"}))
    # a BOM began the first image id ("\ufeff000001.xml not found"); UTF-16 is said to be UTF-16
    cases.append(voc_case("split_utf8_bom", tmp, lambda r: (r / split).write_bytes(b"\xef\xbb\xbf000001\n000002\n"),
                          outcomes={"accepted"}))
    cases.append(voc_case("split_utf16", tmp, lambda r: (r / split).write_text("000001\n000002\n", encoding="utf-16"),
                          where=(split, "is UTF-16 text"), outcomes={"error"}))
    cases.append(voc_case("split_is_a_folder", tmp, lambda r: ((r / split).unlink(), (r / split).mkdir()),
                          where=(split,), outcomes={"error"}))
    cases.append(voc_case("split_lists_a_missing_id", tmp, lambda r: (r / split).write_text("000001\n424242\n"),
                          where=("424242.xml",), outcomes={"error"}))
    cases.append(voc_case("split_with_windows_newlines", tmp, lambda r: (r / split).write_text("000001\r\n000002\r\n"),
                          min_records=2, outcomes={"accepted"}))
    cases.append(voc_case("no_annotations_folder", tmp, lambda r: shutil.rmtree(r / "Annotations"),
                          where=("Annotations",), outcomes={"error"}))
    cases.append(voc_case("image_is_a_folder", tmp, lambda r: ((r / "JPEGImages/000002.jpg").unlink(),
                                                               (r / "JPEGImages/000002.jpg").mkdir()),
                          where=("000002.jpg",), outcomes={"error"}))
    cases.append(voc_case("image_missing_skipped", tmp, lambda r: (r / "JPEGImages/000002.jpg").unlink(),
                          skip=True, outcomes={"skipped"}, warns=("000002.jpg",)))
    return cases


def test_fuzz_voc_reader(tmp_path, caplog):
    run_family("VOC reader", voc_cases(tmp_path), caplog)


# ============================================================================ images and the data loader

def _rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


def _jpeg_bytes(array: np.ndarray, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).convert(mode).save(out, format="JPEG")
    return out.getvalue()


def _png_bytes(array: np.ndarray, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).convert(mode).save(out, format="PNG")
    return out.getvalue()


def _encoded(array: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, array)
    assert ok
    return buf.tobytes()


def _tagged(array: np.ndarray, tag: int, fmt: str = "JPEG") -> bytes:
    """An image stored with EXIF orientation `tag` (any value, valid or not)."""
    exif = Image.Exif()
    exif[0x0112] = tag
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt, exif=exif.tobytes())
    return out.getvalue()


def _with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """`jpeg` with an APP1 segment holding `payload` right after its start marker."""
    return jpeg[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def exif_variants(rng: random.Random, a: np.ndarray) -> dict[str, tuple[bytes, str, tuple[int, int], frozenset]]:
    """Phone photos (EXIF orientation tags 1..8): each tag read as viewed (sides swapped for 5..8), an annotation
    of the stored size refused; out-of-range tags and corrupt EXIF blocks read as stored."""
    ok, bad = frozenset({"accepted"}), frozenset({"error", "skipped"})
    out = {f"exif_orientation_{t}": (_tagged(a, t), ".jpg", (40, 30) if t >= 5 else (30, 40), ok) for t in range(1, 9)}
    out["exif_orientation_6_annotated_as_stored"] = (_tagged(a, 6), ".jpg", (30, 40), bad)
    out["exif_orientation_6_png"] = (_tagged(a, 6, "PNG"), ".png", (40, 30), ok)
    for t in (0, 9, 65535):
        out[f"exif_orientation_out_of_range_{t}"] = (_tagged(a, t), ".jpg", (30, 40), ok)
    tiff_header = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08"
    for i in range(4):  # a valid start, then random IFD bytes; then random bytes throughout
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        out[f"exif_corrupt_ifd_{i}"] = (_with_app1(_jpeg_bytes(a), tiff_header + junk), ".jpg", (30, 40), ok)
        out[f"exif_random_block_{i}"] = (_with_app1(_jpeg_bytes(a), b"Exif\x00\x00" + junk), ".jpg", (30, 40), ok)
    return out


def image_variants(rng: random.Random) -> dict[str, tuple[bytes, str, tuple[int, int], frozenset]]:
    """name -> (file bytes, extension, (height, width) the annotation states, allowed outcomes)."""
    a = _rgb(30, 40)
    jpeg, png = _jpeg_bytes(a), _png_bytes(a)
    ok, bad = frozenset({"accepted"}), frozenset({"error", "skipped"})
    out = {
        "rgb_jpeg": (jpeg, ".jpg", (30, 40), ok),
        "grayscale_jpeg": (_jpeg_bytes(a, "L"), ".jpg", (30, 40), ok),
        "grayscale_png": (_png_bytes(a, "L"), ".png", (30, 40), ok),
        "cmyk_jpeg": (_jpeg_bytes(a, "CMYK"), ".jpg", (30, 40), ok),
        "rgba_png": (_png_bytes(a, "RGBA"), ".png", (30, 40), ok),
        "gray_alpha_png": (_png_bytes(a, "LA"), ".png", (30, 40), ok),
        "palette_png": (_png_bytes(a, "P"), ".png", (30, 40), ok),
        "16bit_gray_png": (_encoded(a[:, :, 0].astype(np.uint16) * 257, ".png"), ".png", (30, 40), ok),
        "16bit_color_png": (_encoded(a.astype(np.uint16) * 257, ".png"), ".png", (30, 40), ok),
        "float_tiff": (_encoded(a.astype(np.float32) / 255, ".tiff"), ".tiff", (30, 40), ok),
        "1x1_pixel": (_png_bytes(_rgb(1, 1)), ".png", (1, 1), ok),
        "1x1_pixel_jpeg": (_jpeg_bytes(_rgb(1, 1)), ".jpg", (1, 1), ok),
        "tall_1px_wide": (_png_bytes(_rgb(30, 1)), ".png", (30, 1), ok),
        "zero_bytes": (b"", ".jpg", (30, 40), bad),
        "text_file": (b"this is not an image\n", ".jpg", (30, 40), bad),
        "size_differs_from_annotation": (jpeg, ".jpg", (40, 30), bad),
        "jpeg_with_png_extension": (jpeg, ".png", (30, 40), ok),
    }
    for i, cut in enumerate(sorted(rng.sample(range(2, len(jpeg) - 2), 6))):
        out[f"truncated_jpeg_{i}_at_{cut}"] = (jpeg[:cut], ".jpg", (30, 40), bad)
    for i, cut in enumerate(sorted(rng.sample(range(2, len(png) - 12), 4))):
        out[f"truncated_png_{i}_at_{cut}"] = (png[:cut], ".png", (30, 40), bad)
    for i in range(4):
        flipped = bytearray(png)
        for _ in range(8):
            flipped[rng.randrange(40, len(flipped))] ^= 0xFF  # corrupt the compressed data (CRC errors)
        out[f"corrupt_png_{i}"] = (bytes(flipped), ".png", (30, 40), bad)
    out.update(exif_variants(rng, a))
    return out


def loader_case(name: str, tmp: Path, data: Optional[bytes], ext: str, size: tuple[int, int], outcomes,
                *, skip: bool, workers: int = 0, folder: bool = False) -> Case:
    """A COCO set of three images, the second replaced by `data` (or a folder), read by the
    catalog, the test loader and three training batches (transform included)."""
    from detection.data.catalog import get_dataset
    from detection.data.loader import build_test_loader, build_train_loader
    from detection.data.transforms import build_transforms

    root = tmp / name
    bad_file = root / f"bad{ext}"

    def run():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        images = [{"id": 1, "file_name": "ok1.jpg", "height": 30, "width": 40},
                  {"id": 2, "file_name": bad_file.name, "height": size[0], "width": size[1]},
                  {"id": 3, "file_name": "ok3.jpg", "height": 30, "width": 40}]
        for img in (images[0], images[2]):
            cv2.imwrite(str(root / img["file_name"]), _rgb(30, 40, img["id"]))
        if folder:
            bad_file.mkdir()
        else:
            bad_file.write_bytes(data)
        h, w = size
        anns = [{"id": i + 1, "image_id": i + 1, "category_id": 1,
                 "bbox": [0, 0, min(w, 10), min(h, 10)] if i == 1 else [2, 3, 20, 15]} for i in range(3)]
        (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                   "categories": [{"id": 1, "name": "thing"}]}))
        info = get_dataset({"type": "coco", "ann_file": str(root / "ann.json"), "image_root": str(root)}, str(root),
                           skip_bad_images=skip)
        tests = list(build_test_loader(info, num_workers=workers))
        transform = build_transforms(min_sizes=[24, 32], max_size=64, hflip_prob=0.5)
        train = iter(build_train_loader([info], transform=transform, images_per_batch=2, num_workers=workers,
                                        aspect_ratio_grouping=True, filter_empty=True, seed=0))
        return info, tests, [next(train) for _ in range(3)]

    return Case(name, run, where=(bad_file.name,), outcomes=frozenset(outcomes), check=_check_batches,
                tags={"skip": skip})


def _check_batches(result) -> None:
    """Images uint8 (3, H, W) of the annotated size (test) or resized (train), boxes inside."""
    info, tests, trains = result
    check_dataset(info, num_classes=1, min_records=2)
    for images, records in tests:
        for image, record in zip(images, records):
            assert image.dtype == torch.uint8 and image.shape == (3, record["height"], record["width"]), image.shape
    for images, targets in trains:
        assert len(images) == 2, f"a training batch of {len(images)} images"
        for image, target in zip(images, targets):
            assert image.dtype == torch.uint8 and image.shape[0] == 3
            boxes = target["boxes"]
            assert torch.isfinite(boxes).all() and (boxes[:, 2] > boxes[:, 0]).all() and \
                (boxes[:, 3] > boxes[:, 1]).all(), boxes
            assert (boxes[:, 2] <= image.shape[2] + 1e-3).all() and (boxes[:, 3] <= image.shape[1] + 1e-3).all()


def loader_cases(tmp: Path) -> list[Case]:
    rng = random.Random(SEED + 2)
    cases = []
    for name, (data, ext, size, outcomes) in image_variants(rng).items():
        if outcomes == {"accepted"}:
            cases.append(loader_case(name, tmp, data, ext, size, {"accepted"}, skip=False))
        else:  # refused without skip_bad_images, skipped (with a warning) with it
            cases.append(loader_case(name, tmp, data, ext, size, {"error"}, skip=False))
            cases.append(loader_case(f"{name}_skipped", tmp, data, ext, size, {"skipped"}, skip=True))
    cases.append(loader_case("image_is_a_folder", tmp, None, ".jpg", (30, 40), {"error"}, skip=False, folder=True))
    cases.append(loader_case("image_is_a_folder_skipped", tmp, None, ".jpg", (30, 40), {"skipped"}, skip=True,
                             folder=True))
    a = _jpeg_bytes(_rgb(30, 40))
    cases.append(loader_case("truncated_jpeg_in_a_worker", tmp, a[: len(a) // 2], ".jpg", (30, 40), {"error"},
                             skip=False, workers=1))
    return cases


def test_fuzz_images_and_data_loader(tmp_path, caplog):
    run_family("images and data loader", loader_cases(tmp_path), caplog)


# ============================================================================ the config loader

CONFIG_VALUES = ["abc", "''", "[1]", "[]", "{a: 1}", "null", "true", "0", "-1", "1.5", "10000000000000000000000000000",
                 "-1e308", "1e308", ".nan", ".inf", "-.inf", "1e-300"]
CONFIG_LIST_VALUES = ["[.nan, .nan, .nan]", "[.inf, .inf, .inf]", "[-1, -1, -1]", "[0, 0, 0]", "[abc, 1, 2]",
                      "[[1], [2], [3]]", "[1e308, 1e308, 1e308]"]


def config_leaves(cls=None, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, type) of every field of the config tree."""
    import dataclasses
    import typing

    from detection.config import Config

    cls = cls or Config
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        out += config_leaves(tp, key + ".") if dataclasses.is_dataclass(tp) else [(key, tp)]
    return out


def _finite_everywhere(cfg) -> None:
    """An accepted config holds no NaN or infinite number (no setting means one)."""
    import dataclasses

    def walk(value, key):
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), f"{key}.{f.name}".lstrip("."))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        elif isinstance(value, float):
            assert math.isfinite(value), f"{key} = {value} was accepted"
    walk(cfg, "")


def config_cases(tmp: Path) -> list[Case]:
    from detection.config import load_config

    cases = []
    for key, tp in config_leaves():
        values = CONFIG_VALUES + (CONFIG_LIST_VALUES if "list" in str(tp).lower() else [])
        for value in values:
            override = f"{key}={value}"
            cases.append(Case(f"config {override}", lambda o=override: load_config(None, [o]),
                              where=(key.split(".")[-1],), check=_finite_everywhere))
    # ---- the file itself
    base = (ROOT / "configs" / "base.yaml").resolve()
    files = {
        "empty": b"", "only_a_comment": b"# nothing\n",
        "latin1": "model:\n  num_classes: 3 # caf\xe9\n".encode("latin-1"),
        "truncated_yaml": b"model:\n  backbone: {depth: 50,\n", "tabs": b"model:\n\tnum_classes: 3\n",
        "top_level_list": b"- 1\n- 2\n", "top_level_string": b"hello\n", "section_is_a_number": b"model: 3\n",
        "unknown_section": b"modle:\n  num_classes: 3\n", "unknown_key": b"model:\n  num_clases: 3\n",
        "base_missing": b"_base_: nowhere.yaml\n", "base_is_a_number": b"_base_: 3\n",
        "base_is_null_in_a_list": b"_base_: [null]\n",
        "base_loops": b"_base_: base_loops.yaml\n", "duplicate_key": b"seed: 1\nseed: 2\n",
        "binary": bytes(range(256)), "python_tag": b"seed: !!python/object/apply:os.system ['true']\n",
        "anchor_bomb": b"a: &a [1, 1]\nb: &b [*a, *a]\nc: &c [*b, *b]\nseed: *c\n",
        "dataset_entry_typo":
            f"_base_: {base}\ndatasets:\n  train: [{{type: coco, ann_file: a.json, image_rot: x}}]\n".encode(),
        "dataset_type_typo": f"_base_: {base}\ndatasets:\n  train: [{{type: cocco, ann_file: a.json}}]\n".encode(),
        "dataset_unknown_name": f"_base_: {base}\ndatasets:\n  test: [coco_2017_vall]\n".encode(),
    }
    for name, content in files.items():
        path = tmp / f"{name}.yaml"

        def run(path=path, content=content):
            path.write_bytes(content)
            return load_config(path)
        cases.append(Case(f"config file {name}", run, where=(str(path.name),), check=_finite_everywhere))
    cases.append(Case("config file is a folder", lambda: load_config(tmp), where=(str(tmp),)))
    cases.append(Case("config file missing", lambda: load_config(tmp / "none.yaml"), where=("none.yaml",)))
    cases.append(Case("override without =", lambda: load_config(None, ["model.num_classes"]),
                      where=("model.num_classes",)))
    cases.append(Case("override into a value", lambda: load_config(None, ["seed.x=1"]), where=("seed",)))
    cases.append(Case("override bad yaml", lambda: load_config(None, ["seed=[1"]), where=("seed",)))
    return cases


def test_fuzz_config_loader(tmp_path, caplog):
    run_family("config loader", config_cases(tmp_path), caplog)


# ============================================================================ checkpoints (--resume) and weights

class _Evil:
    """Unpickling this runs a command: no reader may do it."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/c4det_fuzz_pwned",))


def _small_train_state():
    """A TrainState of the trainer's own optimizer, schedule and scaler over a small model,
    after one step (so the optimizer holds momentum buffers)."""
    from detection.engine.optim import build_lr_scheduler, build_optimizer
    from detection.engine.trainer import TrainState, optimizer_step

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Conv2d(8, 4, 1))
    optimizer = build_optimizer(model, base_lr=0.01, momentum=0.9, weight_decay=1e-4)
    scheduler = build_lr_scheduler(optimizer, warmup_iters=2, warmup_factor=0.1, steps=[10], gamma=0.1)
    state = TrainState(model, optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=False))
    optimizer_step(state, model(torch.ones(1, 3, 5, 5)).sum())
    state.iteration = 1
    return state


def _resume_dict(state) -> dict:
    from detection.engine.checkpoint import get_rng_states

    rng = get_rng_states()
    return {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict(), "iteration": 1,
            "rng": rng, "rng_per_rank": [rng], "config": {}, "class_names": ["a"]}


def _file_corruptions(valid: bytes, rng: random.Random) -> dict[str, bytes]:
    out = {"empty": b"", "text": b"not a checkpoint\n", "json": b'{"model": {}}',
           "random_bytes": bytes(rng.randrange(256) for _ in range(300)),
           "zip_magic_then_garbage": b"PK\x03\x04" + bytes(rng.randrange(256) for _ in range(200))}
    for cut in sorted(rng.sample(range(10, len(valid) - 10), 5)):
        out[f"truncated_at_{cut}"] = valid[:cut]
    for i in range(3):
        flipped = bytearray(valid)
        for _ in range(20):
            flipped[rng.randrange(len(flipped))] ^= 0xFF
        out[f"bytes_flipped_{i}"] = bytes(flipped)
    import pickle

    out["pickle_running_code"] = pickle.dumps({"model": _Evil()})
    out["pickle_of_a_list"] = pickle.dumps([1, 2])
    return out


def pth_case_maker(family: str, tmp: Path, load: Callable[[Path], Any],
                   check: Callable[[Any], None]) -> Callable[..., Case]:
    """case(name, content, outcomes, where, raw) for a reader of .pth files: `content` written to
    tmp/<name>.pth (torch.save, or its bytes as they are with raw=True), then read by load(path);
    an error must name the file and `where`, an accepted result pass `check`."""
    def case(name: str, content: Any, outcomes=frozenset({"error"}), where: tuple = (), raw: bool = False) -> Case:
        path = tmp / f"{name}.pth"

        def run():
            if raw:
                path.write_bytes(content)
            else:
                torch.save(content, path)
            return load(path)

        return Case(f"{family} {name}", run, where=(path.name, *where), outcomes=frozenset(outcomes), check=check)

    return case


def valid_and_corrupted_cases(case: Callable[..., Case], valid: dict, rng: random.Random) -> list[Case]:
    """The valid file, which must be accepted, and its bytes damaged in every _file_corruptions way."""
    buffer = io.BytesIO()
    torch.save(valid, buffer)
    return [case("valid", valid, {"accepted"})] + [
        case(name, data, raw=True) for name, data in _file_corruptions(buffer.getvalue(), rng).items()]


def resume_cases(tmp: Path) -> list[Case]:
    """--resume's reader: load_resume_checkpoint + restore_train_state, on broken last.pth files."""
    from detection.engine.checkpoint import load_resume_checkpoint
    from detection.engine.train_state import restore_train_state

    rng = random.Random(SEED + 3)
    base = _small_train_state()
    valid = _resume_dict(base)

    def load(path: Path):
        state = copy.deepcopy(base)
        restore_train_state(state, load_resume_checkpoint(path), path)
        return state

    def check(state) -> None:
        assert state.iteration == 1 and same_state(state.model.state_dict(), valid["model"])

    case = pth_case_maker("resume", tmp, load, check)
    cases = valid_and_corrupted_cases(case, valid, rng)
    for value in (None, [1], torch.zeros(2), "x"):
        cases.append(case(f"top_level_{type(value).__name__}", value))
    for key in ("model", "optimizer", "scheduler", "scaler", "iteration", "rng"):
        broken = dict(valid)
        del broken[key]
        cases.append(case(f"no_{key}", broken, where=(key,)))
        for value in (None, "x", [1], {"a": 1}, 3.5, -1):
            broken = dict(valid)
            broken[key] = value
            # the scaler is off on the CPU (its state is not read); "rng" is rank 0's copy of rng_per_rank[0]
            cases.append(case(f"{key}={value!r}", broken,
                              outcomes={"accepted", "error"} if key in ("scaler", "rng") else {"error"}))
    model = valid["model"]
    first = next(iter(model))
    variants = {
        "model_missing_a_tensor": {k: v for k, v in model.items() if k != first},
        "model_extra_tensor": {**model, "extra.weight": torch.zeros(3)},
        "model_wrong_shape": {**model, first: torch.zeros(2, 2)},
        "model_integer_tensor": {**model, first: model[first].long()},
        "model_nan": {**model, first: torch.full_like(model[first], float("nan"))},
        "model_not_tensors": {**model, first: [1, 2]},
    }
    for name, weights in variants.items():
        cases.append(case(name, {**valid, "model": weights}, where=(first,) if name != "model_extra_tensor" else ()))
    opt = valid["optimizer"]
    momentum = {i: {"momentum_buffer": torch.zeros(7)} for i in opt["state"]}
    for name, value in {"optimizer_no_state": {"param_groups": opt["param_groups"]},
                        "optimizer_one_group": {**opt, "param_groups": opt["param_groups"][:1]},
                        "optimizer_buffer_shape": {**opt, "state": momentum},
                        "optimizer_lr_string": {**opt, "param_groups": [{**g, "lr": "x"} for g in opt["param_groups"]]},
                        "optimizer_lr_nan": {**opt, "param_groups": [{**g, "lr": float("nan")}
                                                                     for g in opt["param_groups"]]}}.items():
        cases.append(case(name, {**valid, "optimizer": value}, where=("optimizer",)))
    for name, value in {"schedule_epoch_string": {**valid["scheduler"], "last_epoch": "x"},
                        "schedule_negative": {**valid["scheduler"], "last_epoch": -5},
                        "schedule_no_base_lrs": {"last_epoch": 1}}.items():
        cases.append(case(name, {**valid, "scheduler": value}, where=("schedule",)))
    for name, value in {"rng_python_missing": {k: v for k, v in valid["rng"].items() if k != "python"},
                        "rng_torch_garbage": {**valid["rng"], "torch": torch.zeros(3)},
                        "rng_numpy_short": {**valid["rng"], "numpy": (1, 2)}}.items():
        cases.append(case(name, {**valid, "rng": value, "rng_per_rank": [value]}, where=("random states",)))
    cases.append(case("rng_per_rank_not_a_list", {**valid, "rng_per_rank": 3}, where=("random states",)))
    cases.append(Case("resume last.pth is a folder", lambda: load_resume_checkpoint(tmp),
                      where=(str(tmp), "folder"), outcomes=frozenset({"error"})))
    return cases


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def weights_cases(tmp: Path) -> list[Case]:
    """model.weights / --weights: read_detector_file + load_detector_weights into a detector."""
    from detection.engine.loading import load_detector_weights, read_detector_file
    from tests.helpers import make_model

    rng = random.Random(SEED + 4)
    model = make_model().eval()
    own = model.state_dict()
    valid = {"model": own, "iteration": 5, "class_names": ["red", "blue"], "config": {}}

    def load(path: Path):
        weights = read_detector_file(path)
        target = copy.deepcopy(model)
        if weights is not None:
            load_detector_weights(target, weights)
        return weights, target

    def check(result) -> None:
        weights, target = result
        if weights is not None:  # a detector was loaded: exactly the valid file's tensors
            loaded = target.state_dict()
            assert all(torch.equal(loaded[k], own[k].to(loaded[k].dtype)) for k in own), "other weights loaded"

    case = pth_case_maker("weights", tmp, load, check)
    cases = valid_and_corrupted_cases(case, valid, rng)
    key = "roi_heads.predictor.bbox_pred.weight"
    variants = {
        "missing_a_tensor": ({k: v for k, v in own.items() if k != key}, (key,)),
        "extra_tensor": ({**own, "rpn.extra.weight": torch.zeros(3)}, ("rpn.extra.weight",)),
        "wrong_shape": ({**own, key: torch.zeros(2, 2)}, (key,)),
        "more_classes": ({**own, "roi_heads.predictor.cls_score.weight": torch.zeros(7, own[
            "roi_heads.predictor.cls_score.weight"].shape[1])}, ("cls_score",)),
    }
    for name, (state, where) in variants.items():
        cases.append(case(name, {**valid, "model": state}, where=where))
    cases.append(case("integer_tensor", {**valid, "model": {**own, key: own[key].long()}}, where=(key,)))
    cases.append(case("nan_weights", {**valid, "model": {**own, key: torch.full_like(own[key], float("nan"))}},
                      {"error"}, where=(key,)))
    cases.append(case("model_is_a_list", {**valid, "model": [1, 2]}))
    cases.append(case("backbone_only", {"conv1.weight": torch.zeros(64, 3, 7, 7)}, {"accepted"}))
    cases.append(Case("weights path is a folder", lambda: read_detector_file(tmp), where=(str(tmp),),
                      outcomes=frozenset({"error"})))
    cases.append(Case("weights file missing", lambda: read_detector_file(tmp / "none.pth"), where=("none.pth",),
                      outcomes=frozenset({"error"})))
    return cases


def test_fuzz_resume_checkpoints(tmp_path, caplog):
    run_family("checkpoints (--resume)", resume_cases(tmp_path), caplog)
    assert not os.path.exists("/tmp/c4det_fuzz_pwned")


def test_fuzz_weight_files(tmp_path, caplog):
    run_family("weight files", weights_cases(tmp_path), caplog)
    assert not os.path.exists("/tmp/c4det_fuzz_pwned")


# ============================================================================ tools/eval.py --results

@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    from detection.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("shapes_data")
    generate_shapes(root / "shapes", num_train=2, num_val=3, seed=3, image_size=(64, 80))
    return root


_TOOLS: dict = {}  # tool name -> its module, loaded once


def run_tool_main(tool: str, argv: list[str]) -> int:
    """A tool's main() in this process; exit 2 becomes the ValueError its one `error:` line states
    (so `outcome` judges the message), a non-zero exit without such a line is a crash."""
    import contextlib

    from tests.helpers import load_tool

    if tool not in _TOOLS:
        _TOOLS[tool] = load_tool(tool)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = _TOOLS[tool].main(argv)
        except SystemExit as exit_:
            code = exit_.code
    lines = [x for x in err.getvalue().split("\n") if x.startswith("error:")]
    if code == 0:
        return 0
    if "Traceback" in err.getvalue() or len(lines) != 1:
        raise RuntimeError(f"exit {code} without one error line: {err.getvalue()[-500:]!r}")
    raise ValueError(lines[0].removeprefix("error: ") + ("" if code == 2 else f" [exit {code}]"))


def _metrics_ok(folder: Path) -> Callable[[Any], None]:
    def check(code) -> None:
        metrics = json.loads((folder / "metrics.json").read_text())
        for key, value in metrics.items():
            assert value is None or 0.0 <= value <= 100.0 + 1e-9, f"{key} = {value}"
    return check


def _defaults_config(tmp: Path) -> Path:
    """A config file of the defaults only (configs/base.yaml restates them, in 200 lines of YAML
    that take longer to parse than a case takes to run)."""
    path = tmp / "defaults.yaml"
    path.write_text("seed: 0\n")
    return path


def eval_results_cases(tmp: Path, shapes_root: Path) -> list[Case]:
    rng = random.Random(SEED + 5)
    gt = json.loads((shapes_root / "shapes" / "annotations" / "instances_val.json").read_text())
    valid = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
             for a in gt["annotations"]]
    base = ["--config", str(_defaults_config(tmp)), f"datasets.root={shapes_root}",
            "datasets.test=[shapes_val]", "model.num_classes=3", f"output_dir={tmp / 'unused'}"]

    def case(name: str, content: Any, outcomes=frozenset({"error"}), where: tuple = (), raw: bool = False) -> Case:
        path = tmp / f"{name}.json"
        out = tmp / f"out_{name}"

        def run():
            if raw:
                path.write_bytes(content)
            else:
                path.write_text(json.dumps(content))
            return run_tool_main("eval", [*base, "--results", str(path), "--output-dir", str(out)])

        return Case(f"eval --results {name}", run, where=(path.name, *where), outcomes=frozenset(outcomes),
                    check=_metrics_ok(out / "shapes_val"))

    cases = [case("valid", valid, {"accepted"}), case("no_detections", [], {"accepted"}),
             case("duplicated", valid + valid, {"accepted"})]
    text = json.dumps(valid).encode()
    files = {"empty": b"", "garbage": b"[{]]", "latin1": text.replace(b'"score"', b'"sc\xf6re"'),
             "utf16": json.dumps(valid).encode("utf-16"), "nested_200000_deep": b"[" * 200000}
    for cut in sorted(rng.sample(range(1, len(text) - 1), 5)):
        files[f"truncated_at_{cut}"] = text[:cut]
    cases += [case(name, data, raw=True) for name, data in files.items()]
    for value in ({}, 3, None, "x", [[1]]):
        cases.append(case(f"top_level_{type(value).__name__}_{len(cases)}", value))
    for key in ("image_id", "category_id", "bbox", "score"):
        for value in WRONG_VALUES:
            broken = copy.deepcopy(valid)
            index = rng.randrange(len(broken))
            broken[index][key] = value
            cases.append(case(f"[{index}].{key}={value!r}", broken, {"accepted", "error"} if (
                key == "score" and type(value) in (int, float) and math.isfinite(value)) else {"error"},
                where=(f"result {index}",)))
        broken = copy.deepcopy(valid)
        del broken[1][key]
        cases.append(case(f"[1].{key}_missing", broken, where=("result 1",)))
    broken = copy.deepcopy(valid)
    for r in broken:
        r["segmentation"], r["extra"] = [], {"x": 1}
    cases.append(case("extra_fields", broken, {"accepted"}))
    for name, change in {"unknown_image": ("image_id", 999), "unknown_category": ("category_id", 42)}.items():
        broken = copy.deepcopy(valid)
        broken[2][change[0]] = change[1]
        cases.append(case(name, broken, where=("result 2", str(change[1]))))
    for name, bbox in {"nan_box": [float("nan"), 1, 2, 3], "inf_box": [1, 1, float("inf"), 3]}.items():
        broken = copy.deepcopy(valid)
        broken[0]["bbox"] = bbox
        cases.append(case(name, broken, where=("result 0", "bbox")))
    # boxes the evaluators write themselves for any model output (scored as pycocotools scores them)
    for name, bbox in {"zero_area_box": [10, 10, 0, 0], "box_outside_image": [500, 500, 10, 10],
                       "negative_width": [10, 10, -5, 5], "negative_height": [10, 10, 5, -5]}.items():
        broken = copy.deepcopy(valid)
        broken[0]["bbox"] = bbox
        cases.append(case(name, broken, {"accepted"}))
    folder = tmp / "a_folder"
    folder.mkdir(exist_ok=True)
    cases.append(Case("eval --results a folder without results", lambda: run_tool_main(
        "eval", [*base, "--results", str(folder), "--output-dir", str(tmp / "out_folder")]), where=("a_folder",),
        outcomes=frozenset({"error"})))
    cases.append(Case("eval --results missing", lambda: run_tool_main(
        "eval", [*base, "--results", str(tmp / "none.json"), "--output-dir", str(tmp / "out_none")]),
        where=("none.json",), outcomes=frozenset({"error"})))
    return cases + voc_results_cases(tmp, shapes_root)


def voc_results_cases(tmp: Path, shapes_root: Path) -> list[Case]:
    """--results of a VOC-type test set: a folder of comp4_det_test_<class>.txt files."""
    voc = shapes_root / "shapes" / "VOC"
    entry = json.dumps({"type": "voc", "root": str(voc), "split": "val", "classes": ["circle", "square", "triangle"],
                        "name": "voc_val"})
    base = ["--config", str(_defaults_config(tmp)), f"datasets.test=[{entry}]", "model.num_classes=3",
            f"output_dir={tmp / 'unused'}"]
    ids = (voc / "ImageSets" / "Main" / "val.txt").read_text().split()
    valid = {"circle": f"{ids[0]} 0.9 10.0 10.0 30.0 30.0\n{ids[1]} 0.5 5.0 5.0 20.0 25.0\n",
             "square": f"{ids[2]} 0.8 1.0 1.0 40.0 40.0\n", "triangle": ""}

    def case(name: str, files: dict, outcomes=frozenset({"error"}), where: tuple = ()) -> Case:
        folder = tmp / f"comp4_{name}"
        out = tmp / f"out_comp4_{name}"

        def run():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            for cls, content in files.items():
                target = folder / f"comp4_det_test_{cls}.txt"
                if content is None:
                    target.mkdir()
                else:
                    target.write_bytes(content.encode() if isinstance(content, str) else content)
            return run_tool_main("eval", [*base, "--results", str(folder), "--output-dir", str(out)])

        return Case(f"eval --results comp4 {name}", run, where=where, outcomes=frozenset(outcomes),
                    check=_metrics_ok(out / "voc_val"))

    cases = [case("valid", valid, {"accepted"}), case("one_class_file_missing", {"circle": valid["circle"]},
                                                      {"accepted"})]
    lines = {"nan_score": f"{ids[0]} nan 10 10 30 30", "inf_coord": f"{ids[0]} 0.9 10 10 inf 30",
             "text_score": f"{ids[0]} high 10 10 30 30", "five_fields": f"{ids[0]} 0.9 10 10 30",
             "seven_fields": f"{ids[0]} 0.9 10 10 30 30 1", "unknown_image": "nosuch 0.9 10 10 30 30",
             "negative_size": f"{ids[0]} 0.9 30 30 10 10", "score_above_1": f"{ids[0]} 7.5 10 10 30 30"}
    for name, line in lines.items():
        ok = name in ("score_above_1", "negative_size")  # any score orders; boxes as the evaluator writes them
        cases.append(case(name, {**valid, "circle": valid["circle"] + line + "\n"},
                          {"accepted"} if ok else {"error"}, where=() if ok else ("comp4_det_test_circle.txt",)))
    cases.append(case("latin1_file", {**valid, "circle": b"\xe4\xf6 0.9 1 1 2 2\n"}, where=("comp4_det_test_circle",)))
    cases.append(case("empty_files", {"circle": "", "square": "", "triangle": ""}, {"accepted"}))
    cases.append(case("class_file_is_a_folder", {**valid, "square": None}, where=("comp4_det_test_square",)))
    cases.append(case("no_class_file", {}, where=("comp4_det_test_<class>.txt",)))
    return cases


def _checked_curves_instead_of_a_plot(curves, path, metrics=None) -> None:
    """Stands in for detection.visualization.plots.plot_pr_curves (matplotlib takes a second per plot):
    the curves it would draw must be finite fractions."""
    for name, (recall, precision) in curves.items():
        for values in (recall, precision):
            values = np.asarray(values, dtype=float)
            assert np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all(), (name, values)


@pytest.fixture
def no_plots(monkeypatch):
    import detection.visualization.plots

    monkeypatch.setattr(detection.visualization.plots, "plot_pr_curves", _checked_curves_instead_of_a_plot)


def test_fuzz_eval_results(tmp_path, shapes_root, caplog, no_plots):
    run_family("tools/eval.py --results", eval_results_cases(tmp_path, shapes_root), caplog)


# ============================================================================ tools/train_det.py, one iteration

def train_cases(tmp: Path, shapes_root: Path) -> list[Case]:
    """tools/train_det.py for one iteration on broken training data, config values and files."""
    from detection.engine.checkpoint import load_checkpoint
    from tests.helpers import tiny_overrides

    train_json = shapes_root / "shapes" / "annotations" / "instances_train.json"
    images = shapes_root / "shapes" / "train"
    gt = json.loads(train_json.read_text())

    def case(name: str, outcomes, *, flags: tuple = (), where: tuple = (), prepare: Callable[[Path], dict] = None,
             **extra) -> Case:
        out = tmp / f"run_{name}"

        def run():
            folder = tmp / f"data_{name}"
            folder.mkdir(exist_ok=True)
            settings = {"solver.max_iter": 1, "solver.checkpoint_period": 1, "datasets.test": [],
                        "dataloader.aspect_ratio_grouping": False, **extra,  # one batch holds both images
                        **(prepare(folder) if prepare else {})}
            argv = ["--config", str(_defaults_config(tmp)), *flags, *tiny_overrides(shapes_root, out, **settings)]
            return run_tool_main("train_det", argv)

        def check(code) -> None:
            assert load_checkpoint(out / "last.pth")["iteration"] == 1
            lines = (out / "metrics.jsonl").read_text().splitlines()
            assert all(math.isfinite(v) for v in json.loads(lines[0]).values() if isinstance(v, float))

        return Case(f"train_det {name}", run, where=where, outcomes=frozenset(outcomes), check=check)

    def coco_set(data: Any = None, raw: Optional[bytes] = None, image: Optional[bytes] = None,
                 size: tuple[int, int] = (64, 72)) -> Callable[[Path], dict]:
        """A training set of the shapes json (changed) whose first image may be replaced."""
        def prepare(folder: Path) -> dict:
            content = copy.deepcopy(gt if data is None else data)
            shutil.copytree(images, folder / "images", dirs_exist_ok=True)
            if image is not None:
                first = content["images"][0]
                first["file_name"] = "replaced.png"
                first["height"], first["width"] = size
                for a in content["annotations"]:
                    if a["image_id"] == first["id"]:
                        a["bbox"] = [0, 0, size[1], size[0]]
                (folder / "images" / "replaced.png").write_bytes(image)
            path = folder / "train.json"
            path.write_bytes(raw if raw is not None else json.dumps(content).encode())
            return {"datasets.train": [{"type": "coco", "ann_file": str(path), "image_root": str(folder / "images")}]}
        return prepare

    nan_box = copy.deepcopy(gt)
    nan_box["annotations"][0]["bbox"][2] = float("nan")
    a = _rgb(64, 72)
    truncated = _jpeg_bytes(a)[:700]
    cases = [
        case("valid", {"accepted"}),
        case("truncated_json", {"error"}, where=("train.json", "not valid json"),
             prepare=coco_set(raw=json.dumps(gt).encode()[:300])),
        case("nan_box", {"error"}, where=("train.json", "bbox"), prepare=coco_set(nan_box)),
        case("truncated_jpeg", {"error"}, where=("replaced.png", "truncated"), prepare=coco_set(image=truncated)),
        case("truncated_jpeg_skipped", {"skipped"}, prepare=coco_set(image=truncated),
             **{"dataloader.skip_bad_images": True}),
        case("16bit_png", {"accepted"}, prepare=coco_set(image=_encoded(a.astype(np.uint16) * 257, ".png"))),
        case("cmyk_jpeg", {"accepted"}, prepare=coco_set(image=_jpeg_bytes(a, "CMYK"))),
        case("rgba_png", {"accepted"}, prepare=coco_set(image=_png_bytes(a, "RGBA"))),
        case("1x1_image", {"accepted"}, prepare=coco_set(image=_png_bytes(_rgb(1, 1)), size=(1, 1))),
        case("base_lr_string", {"error"}, where=("solver.base_lr",), **{"solver.base_lr": "fast"}),
        case("max_iter_zero", {"error"}, where=("solver.max_iter",), **{"solver.max_iter": 0}),
        case("weights_truncated", {"error"}, where=("broken.pth",),
             prepare=lambda f: ((f / "broken.pth").write_bytes(b"PK\x03\x04" + b"\0" * 50),
                                {"model.weights": str(f / "broken.pth")})[1]),
    ]

    def output_is_a_file(folder: Path) -> dict:
        (tmp / "run_output_is_a_file").write_text("a file")
        return {}
    cases.append(case("output_is_a_file", {"error"}, where=("is a file",), prepare=output_is_a_file))

    def broken_last(folder: Path) -> dict:
        out = tmp / "run_resume_broken_last"
        out.mkdir(exist_ok=True)
        (out / "last.pth").write_bytes(b"PK\x03\x04" + bytes(range(200)))
        return {}
    cases.append(case("resume_broken_last", {"error"}, flags=("--resume",), where=("last.pth",),
                      prepare=broken_last))
    return cases


@pytest.mark.slow  # trains: a dozen runs of tools/train_det.py for one iteration
def test_fuzz_train_det_one_iteration(tmp_path, shapes_root, caplog, restore_logging):
    run_family("tools/train_det.py", train_cases(tmp_path, shapes_root), caplog)




# ============================================================================ known bugs elsewhere

_NON_FINITE = ("detection/config/checks.py accepts a non-finite value here: _checks has no test for this key, or one "
               "that inf (or nan) passes; the setting then yields NaN losses or boxes at run time")
_CONFIG_FILE = {
    "latin1": "detection/config/reading.py _read_yaml: path.read_text() raises UnicodeDecodeError, a message "
              "without the file name (the tools print it, but not which file)",
    "binary": "detection/config/reading.py _read_yaml: path.read_text() raises UnicodeDecodeError, a message "
              "without the file name",
    "truncated_yaml": "detection/config/reading.py _read_yaml: PyYAML's error text (several lines with a caret) "
                      "is put into the one-line message as it is",
    "tabs": "detection/config/reading.py _read_yaml: PyYAML's multi-line error text is put into the message as it is",
    "python_tag": "detection/config/reading.py _read_yaml: PyYAML's multi-line error text is put into the message "
                  "as it is (the tag is refused: safe_load runs nothing)",
    "base_is_a_number": "detection/config/reading.py _read_yaml: `_base_: 3` is iterated (TypeError); _base_ is "
                        "not checked to be a path or a list of paths",
    "base_is_null_in_a_list": "detection/config/reading.py _read_yaml: `_base_: [null]` gives path / None (TypeError)",
}
# case name -> (the function that generates its family's cases, why it fails). Each runs as a
# strict xfail (test_known_bugs): when the owner fixes it, that test says so.
KNOWN_BUGS: dict[str, tuple[str, str]] = {}  # none left: each found bug was fixed


@pytest.mark.parametrize("name", sorted(KNOWN_BUGS))
def test_known_bugs(name, tmp_path, coco_images, caplog, request, no_plots):
    family, reason = KNOWN_BUGS[name]
    request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    make = globals()[family]
    if family == "coco_cases":
        cases = make(tmp_path, coco_images)
    elif family == "eval_results_cases":
        cases = make(tmp_path, request.getfixturevalue("shapes_root"))
    else:
        cases = make(tmp_path)
    (case,) = [c for c in cases if c.name == name]
    kind, problem = outcome(case, caplog)
    assert not problem, problem


def test_fuzz_case_count(capsys):
    """The number of generated cases over all families (run after them; -p no:randomly keeps order)."""
    with capsys.disabled():
        print(f"\nfuzz total: {sum(COUNTS.values())} cases in {len(COUNTS)} families (+ {len(KNOWN_BUGS)} known "
              f"bugs as xfail): " + ", ".join(f"{k} {v}" for k, v in COUNTS.items()))
