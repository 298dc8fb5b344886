"""Synthetic shapes: circles, squares and triangles on textured / noisy backgrounds.

The CPU demo and test data set. Everything is drawn from numpy Generators seeded
by (seed, split, image index), so a seed fixes every byte written, and adding
images keeps the earlier ones unchanged; each split (train, val, test) has its
own stream, so writing a test split changes no train or val file. Boxes are the
tight boxes of each object's *visible* pixels (0-based, x2 = last column + 1); a
placement that would hide more than 40% of an earlier object is rejected, so
every annotated object is clearly visible. Output (also readable as a VOC-layout folder):

  DIR/{train,val,test}/<split>_NNNNNN.jpg
  DIR/annotations/instances_{train,val,test}.json       (COCO, category ids 1..3)
  DIR/VOC/{Annotations,JPEGImages,ImageSets/Main}       (VOC XML, 1-based pixels)
"""
from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from detection.data import DataError
from detection.utils.files import WriteError, unwritten_errno

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle")
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}  # the seed streams: never renumber
_MAX_OCCLUDED = 0.4  # an earlier object may lose at most this fraction of its pixels
_PLACEMENT_TRIES = 25


@dataclass
class ShapeObject:
    label: int  # 1..3, index into SHAPE_CLASSES + 1
    box: tuple[int, int, int, int]  # XYXY of the visible pixels, x2/y2 exclusive
    area: int  # visible pixel count


def generate_shapes(output_dir: str, num_train: int, num_val: int, seed: int,
                    image_size: int | tuple[int, int] = (128, 192), max_objects: int = 6,
                    min_object_size: int = 16, num_test: int = 0,
                    splits: Sequence[str] | None = None) -> dict[str, str]:
    """Write the data set; returns {"voc": VOC root, <split>: json path} for each split written.

    image_size: an int (square images) or (min, max) range for each of height and width.
    splits: the splits to write, from train, val, test (default: train and val, and test when
    num_test > 0); ("test",) adds a test split to an existing data set, leaving the rest alone.
    """
    size_range = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size_range) != 2 or not 2 * min_object_size <= size_range[0] <= size_range[1]:
        raise DataError(f"image_size {image_size!r} must be >= 2 * min_object_size ({2 * min_object_size})"
                        " and given as an int or (min, max)")
    if seed < 0 or num_train < 0 or num_val < 0 or num_test < 0:
        raise DataError(f"seed, num_train, num_val and num_test must be >= 0, got {seed}, {num_train}, "
                        f"{num_val}, {num_test}")
    if splits is None:
        splits = ("train", "val", "test") if num_test > 0 else ("train", "val")
    elif isinstance(splits, str):
        splits = (splits,)
    unknown = [s for s in splits if s not in _SPLIT_CODES]
    if unknown:
        raise DataError(f"unknown split(s) {', '.join(map(str, unknown))}; the splits are {', '.join(_SPLIT_CODES)}")
    if max_objects < 1:
        raise DataError(f"max_objects must be >= 1, got {max_objects}")
    voc_root = os.path.join(output_dir, "VOC")
    for sub in ("annotations", *splits, "VOC/Annotations", "VOC/JPEGImages", "VOC/ImageSets/Main"):
        os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
    paths = {"voc": voc_root}
    counts = {"train": num_train, "val": num_val, "test": num_test}
    for split in (s for s in _SPLIT_CODES if s in splits):  # a fixed order, whatever the order of `splits`
        paths[split] = _write_split(output_dir, split, counts[split], seed, size_range, max_objects,
                                    min_object_size)
    return paths


def _write_split(output_dir: str, split: str, count: int, seed: int, size_range: tuple[int, int],
                 max_objects: int, min_object_size: int) -> str:
    images, annotations, stems = [], [], []
    for index in range(count):
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
        height, width = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
        img, objects = render_image(rng, height, width, max_objects, min_object_size)
        stem = f"{split}_{index:06d}"
        image_path = os.path.join(output_dir, split, stem + ".jpg")
        if not cv2.imwrite(image_path, cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92]):
            # OpenCV says only False: the set was reported written with its images missing (a docs audit)
            raise WriteError(f"could not write {image_path} (OpenCV's imwrite failed: the folder is not writable, or "
                             "the disk is full)", unwritten_errno(os.path.dirname(image_path)))
        images.append({"id": index + 1, "file_name": stem + ".jpg", "height": height, "width": width})
        for obj in objects:
            x1, y1, x2, y2 = obj.box
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": obj.label,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": obj.area, "iscrowd": 0})
        _write_voc_xml(os.path.join(output_dir, "VOC"), stem, height, width, objects)
        _link_image(image_path, os.path.join(output_dir, "VOC", "JPEGImages", stem + ".jpg"))
        stems.append(stem)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPE_CLASSES)]
    json_path = os.path.join(output_dir, "annotations", f"instances_{split}.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    with open(os.path.join(output_dir, "VOC", "ImageSets", "Main", f"{split}.txt"), "w", encoding="utf-8") as f:
        f.write("".join(s + "\n" for s in stems))
    return json_path


def render_image(rng: np.random.Generator, height: int, width: int, max_objects: int,
                 min_object_size: int, background: np.ndarray | None = None) -> tuple[np.ndarray, list[ShapeObject]]:
    """-> (uint8[H, W, 3] RGB, objects in drawing order with boxes of their visible pixels).
    The shapes are drawn on `background` (float[H, W, 3] RGB 0..255) when given, else on a
    random gradient, stripes or blotches."""
    img = _background(rng, height, width) if background is None else np.array(background, np.float32)
    masks, labels = _place_objects(rng, height, width, int(rng.integers(1, max_objects + 1)), min_object_size)
    for mask in masks:
        img[mask] = _pick_color(rng, img[mask].mean(axis=0))
    img += rng.normal(0.0, rng.uniform(2.0, 8.0), size=img.shape).astype(np.float32)  # sensor-like noise
    objects = [ShapeObject(label, box, area) for label, (box, area) in zip(labels, visible_boxes(masks))]
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), objects


def visible_boxes(masks: list[np.ndarray]) -> list[tuple[tuple[int, int, int, int], int]]:
    """Masks in drawing order (later ones on top) -> (tight XYXY box of visible pixels, visible count)."""
    out = []
    for i, mask in enumerate(masks):
        visible = mask & ~np.any(masks[i + 1:], axis=0) if i + 1 < len(masks) else mask
        ys, xs = np.nonzero(visible)
        # pixel (x, y) covers [x, x+1) x [y, y+1) in continuous coordinates
        out.append(((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), int(visible.sum())))
    return out


def _place_objects(rng: np.random.Generator, height: int, width: int, count: int,
                   min_size: int) -> tuple[list[np.ndarray], list[int]]:
    """Random shapes, each rejected if it would hide > 40% of an earlier one or shrink its box too far."""
    masks: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(count):
        for _ in range(_PLACEMENT_TRIES):
            label = int(rng.integers(1, len(SHAPE_CLASSES) + 1))
            mask = _shape_mask(rng, label, height, width, min_size)
            if keeps_others_visible(mask, masks, min_size):
                masks.append(mask)
                labels.append(label)
                break
    return masks, labels


def keeps_others_visible(new: np.ndarray, masks: list[np.ndarray], min_size: int) -> bool:
    """Whether the shape `new` (bool[H, W]) may be drawn over `masks` (drawing order): every
    earlier shape keeps at least 60% of its pixels and a visible box of at least 0.75 *
    min_size on each side, so no object of the data set is hidden beyond recognition."""
    for i, mask in enumerate(masks):
        visible = mask & ~new
        for later in masks[i + 1:]:
            visible &= ~later
        if visible.sum() < (1.0 - _MAX_OCCLUDED) * mask.sum():
            return False
        ys, xs = np.nonzero(visible)
        if xs.max() - xs.min() + 1 < 0.75 * min_size or ys.max() - ys.min() + 1 < 0.75 * min_size:
            return False
    return True


def _shape_mask(rng: np.random.Generator, label: int, height: int, width: int, min_size: int) -> np.ndarray:
    """bool[H, W] of one shape lying fully inside the image, of size in [min_size, min(H, W) / 2].

    A circle or square spans `size` pixels. A triangle's vertices lie on the circle of diameter
    `size`, so its box spans 0.75-0.87 of that on each side (depending on its rotation) and it
    covers about half its box: triangles are the smallest objects of the set.
    """
    size = int(rng.integers(min_size, max(min_size, min(height, width) // 2) + 1))
    half = size / 2.0
    cx = rng.uniform(half, width - half)
    cy = rng.uniform(half, height - half)
    mask = np.zeros((height, width), np.uint8)
    name = SHAPE_CLASSES[label - 1]
    if name == "circle":
        cv2.circle(mask, (int(round(cx)), int(round(cy))), int(half), 1, thickness=-1)
    elif name == "square":
        x0, y0 = int(round(cx - half)), int(round(cy - half))
        cv2.rectangle(mask, (x0, y0), (x0 + size - 1, y0 + size - 1), 1, thickness=-1)
    else:  # triangle: equilateral, random rotation, vertices on the circle of radius `half`
        angle = rng.uniform(0.0, 2.0 * np.pi) + np.arange(3) * 2.0 * np.pi / 3.0
        pts = np.stack([cx + half * np.cos(angle), cy + half * np.sin(angle)], axis=1)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask.astype(bool)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float32[H, W, 3]: a colour gradient, stripes or blotches, plus noise."""
    base = rng.uniform(40, 215, size=3).astype(np.float32)
    kind = int(rng.integers(3))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == 0:  # linear gradient between two colours
        theta = rng.uniform(0, 2 * np.pi)
        t = (np.cos(theta) * xx / width + np.sin(theta) * yy / height)[..., None]
        field = t * rng.uniform(-60, 60, size=3).astype(np.float32)
    elif kind == 1:  # stripes / checks from two sinusoids
        fx, fy = rng.uniform(0.05, 0.4, size=2)
        wave = np.sin(fx * xx + rng.uniform(0, 6.3)) * np.sin(fy * yy + rng.uniform(0, 6.3))
        field = wave[..., None] * rng.uniform(-35, 35, size=3).astype(np.float32)
    else:  # blotches: coarse noise upsampled
        coarse = rng.normal(0, 30, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.float32)
        field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    noise = rng.normal(0, rng.uniform(4, 14), size=(height, width, 3)).astype(np.float32)
    return np.clip(base + field + noise, 0, 255).astype(np.float32)


def _pick_color(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A saturated colour far (>= 90 in RGB distance) from the local background; best of a few tries."""
    best, best_dist = None, -1.0
    for _ in range(8):
        color = rng.uniform(0, 255, size=3).astype(np.float32)
        color[int(rng.integers(3))] = rng.choice([rng.uniform(0, 50), rng.uniform(205, 255)])
        dist = float(np.linalg.norm(color - background))
        if dist > best_dist:
            best, best_dist = color, dist
        if dist >= 90:
            break
    return best


def _write_voc_xml(voc_root: str, stem: str, height: int, width: int, objects: list[ShapeObject]) -> None:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC"
    ET.SubElement(root, "filename").text = stem + ".jpg"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = SHAPE_CLASSES[obj.label - 1]
        for tag, value in (("pose", "Unspecified"), ("truncated", "0"), ("difficult", "0")):
            ET.SubElement(node, tag).text = value
        box = ET.SubElement(node, "bndbox")
        x1, y1, x2, y2 = obj.box
        # 0-based [x1, x2) pixels -> VOC 1-based inclusive: xmin = x1 + 1, xmax = x2
        for tag, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(root)
    ET.ElementTree(root).write(os.path.join(voc_root, "Annotations", stem + ".xml"), encoding="utf-8")


def _link_image(src: str, dst: str) -> None:
    """Relative symlink so the VOC view shares the JPEGs; a copy where symlinks are unavailable."""
    if os.path.lexists(dst):
        os.remove(dst)
    try:
        os.symlink(os.path.relpath(src, os.path.dirname(dst)), dst)
    except OSError:
        shutil.copyfile(src, dst)
