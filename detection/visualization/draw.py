"""Draw boxes, class names and scores on RGB images with OpenCV.

Each class has a fixed colour (the same in every image and run); a label is drawn on a
filled box of its class colour with black or white text, whichever contrasts more, so it
reads on any background. Labels are kept inside the image and placed so as not to cover
one another where there is room (`place_label`: above the box, inside its top, below it,
...); the highest-scoring box is drawn last and its label placed first. Ground truth that the metrics
ignore (VOC `difficult` objects, COCO crowd regions) is drawn dashed, its label tagged
"difficult" / "crowd", so it is not mistaken for an object a detector must find.
"""
from __future__ import annotations

import colorsys
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from detection.utils.files import USER_TEXT_ENCODING, WriteError, atomic_write
from detection.utils.images import rgb_uint8

# 20 well-separated colours (RGB) for labels 1..20; later labels get golden-ratio hues
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
)
_FONT = cv2.FONT_HERSHEY_SIMPLEX
# ground truth the metrics neither count as missed nor as matched: drawn dashed. COCO's "ignore": 1
# without "iscrowd" is left out of training but scored as an object: tagged "not trained", drawn solid
IGNORED_TAGS = ("difficult", "crowd")
NOT_TRAINED_TAG = "not trained"
NO_AREA_TAG = "no area"  # a box of no width or height, as annotated: left out of training, scored


def color_for_label(label: int) -> tuple[int, int, int]:
    """The fixed RGB colour of a class label (1..K); every label gets its own colour."""
    label = int(label)
    if 1 <= label <= len(PALETTE):
        return PALETTE[label - 1]
    hue = (label * 0.618033988749895) % 1.0  # golden-ratio steps never repeat a hue
    value = 0.95 if label % 2 else 0.75
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, value)
    return int(r * 255), int(g * 255), int(b * 255)


def text_color_for(background: Sequence[int]) -> tuple[int, int, int]:
    """Black or white, whichever has the higher WCAG contrast ratio on `background` (RGB)."""
    luminance = _relative_luminance(background)
    contrast_black = (luminance + 0.05) / 0.05
    contrast_white = 1.05 / (luminance + 0.05)
    return (0, 0, 0) if contrast_black >= contrast_white else (255, 255, 255)


def _relative_luminance(rgb: Sequence[int]) -> float:
    channels = [c / 255.0 for c in rgb]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def draw_detections(image_rgb: np.ndarray, boxes: Any, labels: Any, scores: Any | None,
                    class_names: Sequence[str], score_thresh: float = 0.5,
                    tags: Sequence[str] | None = None, labelled: bool = True) -> np.ndarray:
    """A copy of `image_rgb` (uint8[H,W,3]) with the boxes and their labels drawn.

    boxes: [N,4] XYXY 0-based pixels (tensor or array); labels: [N] in 1..K; scores: [N]
    or None (ground truth: names only, nothing filtered). Boxes scoring below
    `score_thresh` are skipped; higher scores are drawn last, i.e. on top, and choose their
    label's place first (ground truth: in the given order). tags: [N] strings or None; a
    non-empty tag ends the box's label, and a box the metrics ignore (IGNORED_TAGS: "difficult",
    "crowd") is drawn dashed. labelled False: boxes only, in their class colours (hundreds of
    small objects: the labels, sized for the image, covered every box).
    """
    image = rgb_uint8(image_rgb, "draw_detections").copy()
    boxes = _as_array(boxes, np.float64).reshape(-1, 4)
    labels = _as_array(labels, np.int64).reshape(-1)
    tags = [""] * len(boxes) if tags is None else [str(t or "") for t in tags]
    if len(labels) != len(boxes) or len(tags) != len(boxes):
        raise ValueError(f"draw_detections: {len(boxes)} boxes but {len(labels)} labels and {len(tags)} tags")
    if scores is None:
        order = np.arange(len(boxes))
    else:
        scores = _as_array(scores, np.float64).reshape(-1)
        if len(scores) != len(boxes):
            raise ValueError(f"draw_detections: {len(boxes)} boxes but {len(scores)} scores")
        order = [i for i in np.argsort(scores, kind="stable") if scores[i] >= score_thresh]
    order = [i for i in order if np.isfinite(boxes[i]).all()]
    height, width = image.shape[:2]
    font = label_font(height, width)
    thickness = max(1, round(min(height, width) / 320))
    corners = {i: _pixel_corners(boxes[i], width, height) for i in order}
    for i in order:  # all boxes first, so that no box line crosses a label
        draw = _dashed_rectangle if tags[i] in IGNORED_TAGS else cv2.rectangle
        draw(image, *corners[i], color_for_label(labels[i]), thickness)  # axis-aligned: crisp, no AA
    if not labelled:
        return image
    texts = {i: " ".join(t for t in (_class_name(int(labels[i]), class_names),
                                     None if scores is None else f"{scores[i]:.2f}", tags[i]) if t)
             for i in order}
    spots: dict[int, tuple[int, int, int, int]] = {}
    for i in (order if scores is None else order[::-1]):  # the highest score picks its place first
        spots[i] = place_label(label_size(texts[i], *font), corners[i], (height, width), list(spots.values()))
    for i in order:  # and is drawn last, on top of any label it could not avoid
        _draw_label(image, texts[i], spots[i], color_for_label(labels[i]), *font)
    return image


def _dashed_rectangle(image: np.ndarray, p1: tuple[int, int], p2: tuple[int, int],
                      color: tuple[int, int, int], thickness: int) -> None:
    """cv2.rectangle's outline in dashes (OpenCV has no dashed lines): segments of `dash`
    pixels with gaps of the same length along each edge, starting at each corner."""
    dash = 3 * thickness + 2
    (x1, y1), (x2, y2) = p1, p2
    for (ax, ay), (bx, by) in (((x1, y1), (x2, y1)), ((x1, y2), (x2, y2)), ((x1, y1), (x1, y2)),
                               ((x2, y1), (x2, y2))):
        length = max(bx - ax, by - ay)
        for start in range(0, length + 1, 2 * dash):
            end = min(start + dash - 1, length)
            horizontal = by == ay
            cv2.line(image, (ax + start, ay) if horizontal else (ax, ay + start),
                     (ax + end, ay) if horizontal else (ax, ay + end), color, thickness)


def _pixel_corners(box: np.ndarray, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Continuous [x1, x2) -> the first and last pixel it covers, clipped to the image."""
    x1, y1 = int(np.floor(box[0])), int(np.floor(box[1]))
    x2, y2 = int(np.ceil(box[2])) - 1, int(np.ceil(box[3])) - 1
    x1, x2 = np.clip([x1, max(x1, x2)], 0, width - 1)
    y1, y2 = np.clip([y1, max(y1, y2)], 0, height - 1)
    return (int(x1), int(y1)), (int(x2), int(y2))


_LABEL_PAD = 2  # pixels between the label's text and the edge of its filled box


def label_font(height: int, width: int) -> tuple[float, int]:
    """(font scale, stroke in pixels) of the labels on an image of (height, width): in proportion
    to its shorter side (scale 1 at 900 px, text about 2.4% of it high), so that a 12-megapixel
    phone photo shown whole on a screen has labels as legible as a 900-px image (a fixed size
    would shrink to a few screen pixels); at least 0.35 (text about 8 px) on small images."""
    scale = max(0.35, min(height, width) / 900.0)
    return scale, max(1, round(scale))


def label_size(text: str, font_scale: float, stroke: int = 1) -> tuple[int, int]:
    """(width, height) in pixels of the filled box `_draw_label` draws for `text`."""
    (text_w, text_h), baseline = cv2.getTextSize(text, _FONT, font_scale, stroke)
    return text_w + 2 * _LABEL_PAD, text_h + baseline + 2 * _LABEL_PAD


def place_label(size: tuple[int, int], corners: tuple[tuple[int, int], tuple[int, int]],
                image_size: tuple[int, int], placed: Sequence[tuple[int, int, int, int]]
                ) -> tuple[int, int, int, int]:
    """Where a label of `size` (w, h) goes for the box with pixel `corners` ((x1, y1), (x2, y2),
    last pixels included) in an image of `image_size` (H, W), as (left, top, right, bottom),
    right and bottom exclusive. Places inside the image are tried in this order: above the box,
    inside its top, below it, inside its bottom, then rows further out (above, inside, below),
    each at the box's left edge, then the same at its right edge. The first that overlaps no
    `placed` label wins; else the one overlapping them least (the earliest of equals)."""
    (w, h), (height, width) = size, image_size
    (x1, y1), (x2, y2) = corners
    tops = [y1 - h, y1, y2 + 1, y2 + 1 - h]
    for k in range(1, max(1, height // max(h, 1)) + 1):  # rows further from the box's edges
        tops += [y1 - (k + 1) * h] + ([y1 + k * h] if y1 + (k + 1) * h <= y2 + 1 else []) + [y2 + 1 + k * h]
    tops = list(dict.fromkeys(t for t in tops if 0 <= t and t + h <= height))
    if not tops:  # a label taller than the image: at its top
        tops = [0]
    lefts = list(dict.fromkeys(max(0, min(x, width - w)) for x in (x1, x2 + 1 - w)))
    candidates = np.array([(left, top, left + w, top + h) for left in lefts for top in tops], np.int64)
    overlap = _overlaps(candidates, np.asarray(placed, np.int64).reshape(-1, 4)).sum(axis=1)
    # argmin takes the first of equals: the first place without overlap if there is one
    left, top, right, bottom = (int(v) for v in candidates[int(np.argmin(overlap))])
    return left, top, right, bottom


def _overlaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] pixels shared by (left, top, right, bottom) rectangles, right and bottom exclusive."""
    width = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    height = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return np.clip(width, 0, None) * np.clip(height, 0, None)


def _draw_label(image: np.ndarray, text: str, rect: tuple[int, int, int, int], color: tuple[int, int, int],
                font_scale: float, stroke: int) -> None:
    """The filled label box `rect` (from place_label) in the class colour, with its text."""
    left, top, right, bottom = rect
    (_, text_h), _ = cv2.getTextSize(text, _FONT, font_scale, stroke)
    cv2.rectangle(image, (left, top), (right - 1, bottom - 1), color, thickness=cv2.FILLED)
    cv2.putText(image, text, (left + _LABEL_PAD, top + _LABEL_PAD + text_h), _FONT, font_scale,
                text_color_for(color), stroke, lineType=cv2.LINE_AA)


def _class_name(label: int, class_names: Sequence[str]) -> str:
    return class_names[label - 1] if 1 <= label <= len(class_names) else f"class {label}"


def side_by_side(left: np.ndarray, right: np.ndarray, titles: Sequence[str] | None = None,
                 gap: int = 8) -> np.ndarray:
    """Two RGB images next to each other (top-aligned, on a white canvas), each with its title
    on a dark bar above it, e.g. titles=("ground truth", "predictions")."""
    left, right = rgb_uint8(left, "side_by_side"), rgb_uint8(right, "side_by_side")
    bar = 0
    if titles is not None:
        if len(titles) != 2:
            raise ValueError(f"side_by_side: need 2 titles, got {len(titles)}")
        font_scale, stroke = label_font(max(left.shape[0], right.shape[0]), max(left.shape[1], right.shape[1]))
        (_, text_h), baseline = cv2.getTextSize("Ag", _FONT, font_scale, stroke)
        bar = text_h + baseline + 8
    height = bar + max(left.shape[0], right.shape[0])
    canvas = np.full((height, left.shape[1] + gap + right.shape[1], 3), 255, dtype=np.uint8)
    for image, x0, k in ((left, 0, 0), (right, left.shape[1] + gap, 1)):
        canvas[bar:bar + image.shape[0], x0:x0 + image.shape[1]] = image
        if titles is not None:
            canvas[:bar, x0:x0 + image.shape[1]] = (40, 40, 40)
            cv2.putText(canvas, str(titles[k]), (x0 + 4, bar - baseline - 4), _FONT, font_scale,
                        (255, 255, 255), stroke, lineType=cv2.LINE_AA)
    return canvas


def _as_array(x: Any, dtype: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def ground_truth_boxes(record: Mapping[str, Any], extra: tuple[np.ndarray, np.ndarray, list[str]] | None = None
                       ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A data-set record's (boxes, labels, tags) for draw_detections: its objects as annotated
    (a record's `annotated` ones where training clipped or dropped a box: what the evaluation
    scores, so the report draws what the metrics count), tagged "difficult" where the record says
    so (VOC) and "no area" for a box of no width or height, then `extra` regions such as the
    image's crowd regions from `read_crowd_regions` (COCO records leave those out)."""
    truth = record.get("annotated", record)
    boxes = np.asarray(truth["boxes"], np.float64).reshape(-1, 4)
    labels = np.asarray(truth["labels"], np.int64).reshape(-1)
    difficult = np.asarray(truth.get("difficult", np.zeros(len(boxes))), bool).reshape(-1)
    no_area = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])  # scored as annotated: a line, named
    tags = ["difficult" if d else NO_AREA_TAG if n else "" for d, n in zip(difficult, no_area)]
    if extra is not None and len(extra[0]):
        boxes = np.concatenate([boxes, np.asarray(extra[0], np.float64).reshape(-1, 4)])
        labels = np.concatenate([labels, np.asarray(extra[1], np.int64).reshape(-1)])
        tags = tags + list(extra[2])
    return boxes, labels, tags


def read_crowd_regions(ann_file: str | Path, label_to_category_id: Mapping[int, int]
                       ) -> dict[Any, tuple[np.ndarray, np.ndarray, list[str]]]:
    """image id -> (XYXY boxes, labels, tags) of a COCO json's regions that are not training
    objects, to draw: `iscrowd` regions (tagged "crowd"; pycocotools counts neither misses nor
    false positives there) and `ignore` annotations (tagged "not trained"; left out of training, but
    pycocotools scores them as objects: its `ignore` is `iscrowd`)."""
    with open(ann_file, encoding=USER_TEXT_ENCODING) as f:  # as the reader: UTF-8 whatever the locale
        annotations = json.load(f).get("annotations", [])
    label_of = {int(c): int(label) for label, c in label_to_category_id.items()}
    found: dict[Any, list[tuple[list[float], int, str]]] = {}
    for ann in annotations:
        tag = "crowd" if ann.get("iscrowd") else NOT_TRAINED_TAG if ann.get("ignore") else ""
        if tag and ann.get("category_id") in label_of:
            x, y, w, h = (float(v) for v in ann["bbox"])  # XYWH -> XYXY, already 0-based
            found.setdefault(ann["image_id"], []).append(([x, y, x + w, y + h], label_of[ann["category_id"]], tag))
    return {image_id: (np.array([r[0] for r in regions], np.float64), np.array([r[1] for r in regions], np.int64),
                       [r[2] for r in regions]) for image_id, regions in found.items()}


def write_drawing(path: str | Path, image_rgb: np.ndarray) -> None:
    """Write an RGB drawing as the file its name says (.jpg, .png), whole or not at all, through a
    temporary file renamed over `path`: a link at `path` is replaced, not written through (into
    whatever file it named), and a kill leaves no half image. WriteError when it cannot be written
    (the folder not writable, the disk full: its errno tells, and the tools' exit code with it)."""
    ok, encoded = cv2.imencode(Path(path).suffix or ".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise WriteError(f"could not write {path}: OpenCV cannot encode it as {Path(path).suffix or '.jpg'}")
    with atomic_write(path, "wb", durable=False) as f:  # an OSError there is a WriteError naming it
        f.write(encoded.tobytes())
