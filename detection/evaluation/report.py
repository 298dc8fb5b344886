"""The evaluation report: one self-contained HTML page (inference/report.html) a person can
look at instead of reading metrics.json.

    sets = [section_for_test_set(dataset, metrics, detections, pr_curves_png) for each test set]
    write_report("out/inference/report.html", sets, source=..., command=..., config_text=...,
                 metrics_jsonl="out/metrics.jsonl")

The page holds, per test set, the metrics table, the per-class AP table (with each class's
false positives and missed objects at the gallery's score threshold), the PR curves and a
gallery of the images with the most false positives and the most missed objects (ground truth
and predictions side by side); then the training curves (when training's metrics.jsonl is
given), the config and the command. Images are embedded (base64 PNG / JPEG): the file can be
mailed or moved alone. The page is a Jinja2 template (autoescaped); jinja2 and matplotlib are
the `report` extra.

The evaluation layer: everything comes in as data (no config, no model, no engine).
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import logging
import math
import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from detection.data import DataError
from detection.evaluation.coco import COCO_MAX_DETS, read_results_json, scored_by_name
from detection.evaluation.image_errors import IOU_THRESH, confusion_counts, read_coco_ground_truth
from detection.evaluation.outputs import SECTION_FILE, recorded_test_sets, results_subfolder
from detection.evaluation.voc_results import read_comp4_dir
from detection.utils.files import atomic_write

if TYPE_CHECKING:
    from detection.data.dataset_info import DatasetInfo

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
SCORE_THRESH = 0.5  # a prediction counts (drawn, false positive) from this score, as visualize.py draws
GALLERY_SIZE = 4  # images per gallery (most false positives; most missed objects)
PANEL_WIDTH, MIN_PANEL_WIDTH = 480, 320  # px: each side of a gallery image is scaled into this range


@dataclass
class GalleryImage:
    title: str
    jpeg: str  # base64
    false_positives: int
    missed: int


@dataclass
class TestSetSection:
    name: str
    num_images: int
    metrics: dict[str, float]
    per_class: list[dict[str, Any]] = field(default_factory=list)
    pr_curves: str | None = None  # base64 PNG
    most_false_positives: list[GalleryImage] = field(default_factory=list)
    most_missed: list[GalleryImage] = field(default_factory=list)
    command: str = ""  # the evaluation that wrote this set's results (runs into one folder may differ)
    config_text: str = ""
    skipped: int = 0  # images the metrics leave out (unreadable: dataloader.skip_bad_images)
    images_missing: int = 0  # gallery candidates whose file is not there (re-scored saved results)
    settings: str = ""  # the test-time settings that made the numbers (evaluated_with), under the heading
    # image_errors.confusion_counts summed over the images: rows the objects' classes then "no object",
    # columns the predictions' classes then "missed"; `confusion_names` the classes' names
    confusion: list[list[int]] = field(default_factory=list)
    confusion_names: list[str] = field(default_factory=list)

    def most_confused(self, limit: int = 10) -> list[tuple[str, str, int]]:
        """(object's class, detected as, count) of the largest class confusions, most first."""
        n = len(self.confusion_names)
        pairs = [(self.confusion_names[g], self.confusion_names[c], self.confusion[g][c])
                 for g in range(n) for c in range(n) if g != c and self.confusion[g][c]]
        return sorted(pairs, key=lambda p: -p[2])[:limit]


def evaluated_with(config: Mapping[str, Any], precision: str | None = None, scored_at: int | None = None) -> str:
    """The test-time settings of a config (a config file's mapping) in one line for a section's
    heading: two sets, or two runs into one folder, evaluated otherwise (TTA, Appendix B's
    extras, bfloat16) are told apart where their numbers are. `precision`: what inference ran in
    (environment.json's), else test.amp as asked. `scored_at`: a COCO-type set's COCOeval maxDets,
    said when not COCO's 100 (the scoring's own: re-scored results may be scored otherwise than
    the config that made them)."""
    def get(dotted: str) -> Any:
        node: Any = config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        return node

    # box refinement's own NMS replaces the head's (roi_heads' refined postprocess)
    nms_key = "test.box_refinement.nms_thresh" if get("test.box_refinement.enabled") else \
        "model.roi_heads.nms_thresh_test"
    parts = [f"test size {get('input.min_size_test')} (longer side at most {get('input.max_size_test')})",
             # what AP counts: COCO's own figure is 100 an image and no score threshold
             f"scores over {get('model.roi_heads.score_thresh_test')}, at most "
             f"{get('model.roi_heads.detections_per_image')} detections an image after NMS at IoU "
             f"{get(nms_key)}"]
    if get("test.aug.enabled"):
        parts.append(f"TTA at {get('test.aug.min_sizes')}{', mirrored too' if get('test.aug.flip') else ''}")
    if get("test.tiles.size"):
        parts.append(f"tiles of {get('test.tiles.size')} px overlapping by {get('test.tiles.overlap')}"
                     + (" and the whole image" if get("test.tiles.full_image") else ""))
    if get("test.multi_scale.enabled"):
        parts.append(f"multi-scale features {get('test.multi_scale.sizes')}")
    if get("test.box_refinement.enabled"):
        parts.append("box refinement" + (" with voting" if get("test.box_refinement.voting") else ""))
    if get("model.roi_heads.global_context"):
        parts.append("global context")
    parts.append(f"inference in {precision}" if precision else f"test.amp: {str(get('test.amp')).lower()}")
    if scored_at is not None and scored_at != COCO_MAX_DETS:
        parts.append(f"COCOeval counting {scored_at} detections per image and class (test.coco_max_dets)")
    return "; ".join(parts)


def save_section(section: TestSetSection, folder: str | Path) -> Path:
    """The section as folder/report_section.json (beside the set's metrics.json), so that a
    later evaluation of another test set into the same results folder can show this one too."""
    path = Path(folder) / SECTION_FILE
    with atomic_write(path) as f:
        json.dump(dataclasses.asdict(section), f)
    return path


def load_sections(results_folder: str | Path, order: Sequence[str] = ()) -> tuple[list[TestSetSection], list[str]]:
    """Every test set's saved section in `results_folder` (its subfolders' report_section.json),
    the folders named in `order` first; and the test-set folders holding results but no section
    (written by an older version, or without the report extra)."""
    root = Path(results_folder)
    subfolders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: (
        list(order).index(p.name) if p.name in order else len(order), p.name)) if root.is_dir() else []
    sections, without = [], []
    for sub in subfolders:
        try:
            data = json.loads((sub / SECTION_FILE).read_text(encoding="utf-8"))
            for key in ("most_false_positives", "most_missed"):
                data[key] = [GalleryImage(**g) for g in data.get(key, [])]
            sections.append(TestSetSection(**data))
        except FileNotFoundError:
            if (sub / "metrics.json").is_file() or any(sub.glob("*_det_test_*.txt")) or (sub / "results").is_dir():
                without.append(sub.name)
        except (OSError, ValueError, TypeError, AttributeError):  # cut short or of another version: no part
            without.append(sub.name)
    return sections, without


def read_detections(dataset: DatasetInfo, results: str) -> dict[Any, dict[str, np.ndarray]]:
    """image id -> {"boxes" XYXY 0-based, "scores", "labels" 1..K} from a results file as
    evaluation writes it: a coco_results.json (COCO-type; with "xywh", its boxes as written, which
    the counts score as COCOeval does) or a folder of comp4 files (VOC-type)."""
    if dataset.kind == "voc":
        return read_comp4_dir(results, dataset.class_names, [r["image_id"] for r in dataset.records])
    label_of = {int(c): int(label) for label, c in dataset.label_to_category_id.items()}
    rows: dict[Any, list] = {}
    for r in scored_by_name(read_results_json(results), results, dataset, say=False):
        if int(r["category_id"]) not in label_of:  # a class the set's keep_classes leaves out: not scored
            continue
        x, y, w, h = (float(v) for v in r["bbox"])  # COCO's XYWH -> XYXY
        rows.setdefault(r["image_id"], []).append((float(r["score"]), x, y, x + w, y + h,
                                                   label_of[int(r["category_id"])], w, h))
    out = {}
    for image_id, items in rows.items():
        array = np.asarray(items, np.float64).reshape(-1, 8)
        out[image_id] = {"boxes": array[:, 1:5], "scores": array[:, 0], "labels": array[:, 5].astype(np.int64),
                         "xywh": np.concatenate([array[:, 1:3], array[:, 6:8]], axis=1)}
    return out


def section_for_test_set(dataset: DatasetInfo, metrics: Mapping[str, float], detections: Mapping[Any, Mapping],
                     pr_curves_png: str | Path | None = None, crowd: Mapping[Any, tuple] | None = None,
                     score_thresh: float = SCORE_THRESH, gallery_size: int = GALLERY_SIZE,
                     skipped: Collection[Any] = (), coco_max_dets: int = COCO_MAX_DETS) -> TestSetSection:
    """One test set's part of the report. `detections`: read_detections(); `crowd`: COCO
    crowd regions (detection.visualization.draw.read_crowd_regions), drawn in the galleries;
    `skipped`: the ids of images the metrics leave out (unreadable: outputs.read_skipped_images),
    left out of the counts and galleries too. The counts match predictions to ground truth as
    the set's metric does (detection/evaluation/image_errors.py; a COCO-type set's with COCOeval's
    `coco_max_dets`, test.coco_max_dets)."""
    from detection.visualization.draw import IGNORED_TAGS, ground_truth_boxes

    names = list(dataset.class_names)
    scored = []  # (false positives, missed, record)
    empty = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)}
    records = [r for r in dataset.records if r["image_id"] not in skipped]
    coco_truth = read_coco_ground_truth(dataset.ann_file, dataset.label_to_category_id) \
        if dataset.kind == "coco" and dataset.ann_file else None
    # labels past the set's classes (a model's own) get rows and columns "class k"
    num = max([len(names), *(int(np.max(d["labels"])) for d in detections.values() if len(d["labels"]))])
    confusion = np.zeros((num + 1, num + 1), np.int64)
    objects = np.zeros(num + 1, np.int64)  # per label 1..num
    for record in records:
        found = detections.get(record["image_id"], empty)
        if coco_truth is not None:  # the json's boxes, as COCOeval scores them
            boxes, labels, ignored = coco_truth.get(record["image_id"], (np.zeros((0, 4)), np.zeros(0, np.int64),
                                                                         np.zeros(0, bool)))
        else:
            boxes, labels, tags = ground_truth_boxes(record)  # VOC: as annotated, difficult tagged
            ignored = np.array([t in IGNORED_TAGS for t in tags], bool)  # "no area" is scored: a miss
        counts = confusion_counts(dataset.kind if coco_truth is not None else "voc", boxes, labels, ignored, found,
                                  score_thresh, num, max_dets=coco_max_dets)
        confusion += counts
        objects += np.bincount(labels[~ignored], minlength=num + 1)[: num + 1]
        false_pos = int(counts[:, :num].sum() - np.trace(counts[:num, :num]))
        scored.append((false_pos, int(counts[:num, num].sum()), record))
    found_fp = confusion[:, :num].sum(axis=0) - np.diag(confusion[:num, :num])
    totals = {k: {"gt": int(objects[k]), "fp": int(found_fp[k - 1]), "missed": int(confusion[k - 1, num])}
              for k in range(1, num + 1) if k <= len(names) or objects[k] or found_fp[k - 1]}
    per_class = [{"name": names[k - 1] if 0 < k <= len(names) else f"class {k}",
                  "ap": _number(metrics.get(f"AP-{names[k - 1]}")) if 0 < k <= len(names) else None,
                  **({"ap50": _number(metrics.get(f"AP50-{names[k - 1]}")) if 0 < k <= len(names) else None}
                     if dataset.kind == "coco" else {}), **totals[k]}
                 for k in sorted(totals)]
    summary = {k: v for k, v in metrics.items() if not k.startswith(("AP-", "AP50-"))}
    section = TestSetSection(dataset.name, len(records), summary, per_class,
                             skipped=len(dataset.records) - len(records), confusion=confusion.tolist(),
                             confusion_names=[names[k - 1] if k <= len(names) else f"class {k}"
                                              for k in range(1, num + 1)])
    if pr_curves_png is not None and Path(pr_curves_png).is_file():
        section.pr_curves = base64.b64encode(Path(pr_curves_png).read_bytes()).decode()
    found = [Path(s[2]["file_name"]).is_file() for s in scored]  # re-scoring saved results needs no images
    section.images_missing = sum(1 for s, ok in zip(scored, found) if (s[0] or s[1]) and not ok)
    scored = [s for s, ok in zip(scored, found) if ok]
    by_fp = sorted((s for s in scored if s[0] > 0), key=lambda s: -s[0])[:gallery_size]
    by_missed = sorted((s for s in scored if s[1] > 0), key=lambda s: -s[1])[:gallery_size]
    def draw(s):
        try:
            return _gallery_image(s[2], s[0], s[1], detections.get(s[2]["image_id"], empty), names, crowd,
                                  score_thresh, dataset.exif_orientation)
        except DataError as err:  # an image the evaluation skipped (dataloader.skip_bad_images)
            logger.warning("report: %s left out of the gallery (%s)", s[2]["file_name"], err)
            return None

    section.most_false_positives = [g for g in map(draw, by_fp) if g is not None]
    section.most_missed = [g for g in map(draw, by_missed) if g is not None]
    return section


def _gallery_image(record: Mapping, false_positives: int, missed: int, detections: Mapping, names: Sequence[str],
                   crowd: Mapping | None, score_thresh: float, exif_orientation: bool = True) -> GalleryImage:
    """Ground truth | predictions (score >= score_thresh) of one image (as the data set reads
    it: turned by its EXIF orientation tag unless exif_orientation is False), as a JPEG."""
    from detection.data.image_io import read_image
    from detection.visualization.draw import draw_detections, ground_truth_boxes, side_by_side

    image = read_image(record["file_name"], exif_orientation=exif_orientation)
    # each panel MIN_PANEL_WIDTH..PANEL_WIDTH wide (a light page, legible labels), drawn at that scale
    scale = min(max(image.shape[1], MIN_PANEL_WIDTH), PANEL_WIDTH) / image.shape[1]
    if scale != 1:
        size = (round(image.shape[1] * scale), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    boxes, labels, tags = ground_truth_boxes(record, (crowd or {}).get(record["image_id"]))
    left = draw_detections(image, boxes * scale, labels, None, names, 0.0, tags=tags)
    right = draw_detections(image, np.asarray(detections["boxes"], np.float64) * scale, detections["labels"],
                            detections["scores"], names, score_thresh)
    canvas = side_by_side(left, right, ("ground truth", f"predictions (score >= {score_thresh:g})"))
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    title = f"{Path(record['file_name']).name}: {false_positives} false positives, {missed} missed"
    return GalleryImage(title, base64.b64encode(jpeg.tobytes()).decode(), false_positives, missed)


def training_curves_png(metrics_jsonl: str | Path) -> str | None:
    """Base64 PNG of detection.visualization.plots.plot_training_curves, or None when there is nothing to plot."""
    from detection.visualization.plots import plot_training_curves

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "curves.png"
        try:
            plot_training_curves(metrics_jsonl, out)
        except ValueError:  # no file, or no loss / lr / AP in it
            return None
        return base64.b64encode(out.read_bytes()).decode()


CONFUSION_TABLE_CLASSES = 20  # the report draws the confusion table up to this many classes (else the pairs only)


def render_report(sections: Sequence[TestSetSection], *, source: str, command: str, config_text: str,
                  training_curves: str | None = None, notes: Sequence[str] = (),
                  source_time: float | None = None) -> str:
    import jinja2  # the `report` extra

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _format_number
    return env.from_string(TEMPLATE).render(
        sections=sections, source=source, notes=list(notes), runs=_runs(sections, command, config_text),
        training_curves=training_curves, score_thresh=SCORE_THRESH, iou_thresh=IOU_THRESH,
        CONFUSION_TABLE_CLASSES=CONFUSION_TABLE_CLASSES,
        source_time=_local_time(source_time) if source_time is not None else None,
        created=_local_time(datetime.datetime.now().timestamp()))


def _runs(sections: Sequence[TestSetSection], command: str, config_text: str) -> list[dict[str, Any]]:
    """The evaluations whose results the page shows: one per distinct (command, config), with
    the names of the test sets each wrote (a section without its own is this run's)."""
    runs: dict[tuple[str, str], list[str]] = {}
    for s in sections:
        runs.setdefault((s.command or command, s.config_text or config_text), []).append(s.name)
    if not runs:
        runs[(command, config_text)] = []
    return [{"command": c, "config_text": t, "sets": names} for (c, t), names in runs.items()]


def _local_time(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M %Z")


def write_report(path: str | Path, sections: Sequence[TestSetSection], *, source: str, command: str,
                 config_text: str, metrics_jsonl: str | Path | None = None, source_time: float | None = None,
                 notes: Sequence[str] = ()) -> Path:
    """Render and write the page (atomically); the training curves when metrics_jsonl exists.
    `source_time`: the checkpoint's (or results') modification time, shown beside the page's."""
    notes = list(notes)
    curves = None
    if metrics_jsonl is not None and Path(metrics_jsonl).is_file():
        curves = training_curves_png(metrics_jsonl)
    else:
        notes.append("No training curves: no metrics.jsonl beside the checkpoint.")
    html = render_report(sections, source=source, command=command, config_text=config_text,
                         training_curves=curves, notes=notes, source_time=source_time)
    with atomic_write(path, encoding="utf-8") as f:
        f.write(html)
    return Path(path)


def write_folder_report(results_folder: str | Path, *, source: Path, command: str, config_text: str,
                        metrics_jsonl: str | Path | None = None) -> tuple[Path, list[str]]:
    """results_folder/report.html of every test set the folder holds (their saved sections, in
    the order source.json lists them), not only this run's; a note names the sets whose results
    have no readable section. -> (the page, the names of the sets it shows)."""
    order = [results_subfolder(name) for name in recorded_test_sets(results_folder)]
    sections, without = load_sections(results_folder, order=order)
    notes = [f"This folder also holds results of {', '.join(without)} without a readable part of this page "
             "(written by an older version or without the report extra): evaluate them again to add them."] \
        if without else []
    path = write_report(Path(results_folder) / REPORT_FILE, sections, source=str(source), command=command,
                        config_text=config_text, metrics_jsonl=metrics_jsonl, notes=notes,
                        source_time=source.stat().st_mtime if source.exists() else None)
    return path, [s.name for s in sections]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _format_number(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Evaluation report: {{ sections | map(attribute="name") | join(", ") }}</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
  h1 { font-size: 1.6em; } h2 { border-bottom: 2px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
  table { border-collapse: collapse; margin: .5em 0 1.5em; }
  th, td { border: 1px solid #ccc; padding: .25em .7em; text-align: right; }
  th:first-child, td:first-child { text-align: left; }
  thead th { background: #f0f0f0; }
  .muted { color: #777; }
  figure { margin: 1em 0; } figcaption { font-size: .9em; color: #555; }
  img { max-width: 100%; border: 1px solid #ddd; }
  pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: .85em; }
</style>
</head>
<body>
<h1>Evaluation report</h1>
<p>Evaluated: <code>{{ source }}</code>{% if source_time %} (modified {{ source_time }}){% endif %}<br>
<span class="muted">this page written {{ created }}</span></p>
{% for note in notes %}<p class="muted">{{ note }}</p>{% endfor %}
{% for s in sections %}
<h2 id="set-{{ loop.index }}">{{ s.name }} <span class="muted">({{ s.num_images }} images{% if s.skipped %};
{{ s.skipped }} more unreadable, left out of the metrics and this page (dataloader.skip_bad_images){% endif %})</span></h2>
{% if s.settings %}<p class="muted">Evaluated with {{ s.settings }}</p>{% endif %}
{% if not s.metrics %}
<p>No annotations: no metrics (the files for the evaluation server are in this folder).</p>
{% else %}
<h3>Metrics</h3>
{% if "use_07_metric" in s.metrics %}
<p class="muted">VOC metric: {{ "VOC2007 11-point interpolated AP" if s.metrics.use_07_metric else
"VOC2010+ area under the interpolated precision-recall curve" }}</p>
{% endif %}
<table class="metrics">
<thead><tr><th>metric</th><th>value</th></tr></thead>
<tbody>
{% for key, value in s.metrics.items() if key != "use_07_metric" %}
<tr><td>{{ key }}</td><td>{{ value | num }}</td></tr>
{% endfor %}
</tbody>
</table>
<h3>Per class</h3>
<table class="per-class">
{% set at_50 = s.per_class and "ap50" in s.per_class[0] %}
<thead><tr><th>class</th><th>AP</th>{% if at_50 %}<th>AP50</th>{% endif %}<th>objects</th><th>false positives</th>\
<th>missed</th></tr></thead>
<tbody>
{% for c in s.per_class %}
<tr><td>{{ c.name }}</td><td>{{ c.ap | num }}</td>{% if at_50 %}<td>{{ c.ap50 | num }}</td>{% endif %}\
<td>{{ c.gt }}</td><td>{{ c.fp }}</td><td>{{ c.missed }}</td></tr>
{% endfor %}
</tbody>
</table>
<p class="muted">AP: each class's AP-&lt;class&gt; of metrics.json (COCO-type sets: IoU 0.50:0.95, and
AP50-&lt;class&gt; at IoU 0.5; VOC-type: IoU 0.5).
False positives and missed objects count the predictions scoring at least {{ score_thresh }},
matched by score to ground truth of their class at IoU &ge; {{ iou_thresh }} as the set's metric matches
them (COCO-type: COCOeval's rule, crowd regions neither; VOC-type: the devkit's, difficult objects neither).</p>
{% if s.confusion %}
<h3>Confusion</h3>
{% set n = s.confusion_names | length %}
{% if n <= CONFUSION_TABLE_CLASSES %}
<table class="confusion">
<thead><tr><th>object \\ detected as</th>{% for name in s.confusion_names %}<th>{{ name }}</th>{% endfor %}\
<th>missed</th></tr></thead>
<tbody>
{% for row in s.confusion %}{% set g = loop.index0 %}
<tr><th>{{ s.confusion_names[g] if g < n else "no object" }}</th>{% for v in row %}\
<td>{{ "" if g == n and loop.index0 == n else v }}</td>{% endfor %}</tr>
{% endfor %}
</tbody>
</table>
{% endif %}
{% set pairs = s.most_confused() %}
{% if pairs %}<p>Most confused: {% for g, c, count in pairs %}{{ g }} detected as {{ c }} ({{ count }})\
{{ "; " if not loop.last }}{% endfor %}</p>{% endif %}
<p class="muted">Counts at score &ge; {{ score_thresh }}, matched as the false positives and missed objects above:
rows the objects' classes, columns the classes they were detected as (the diagonal: found); a false positive on an
object of another class (IoU &ge; {{ iou_thresh }}, the most overlapped) counts in that object's row, other false
positives (background, or a second detection of a found object) in "no object"; the last column, objects missed.
{% if n > CONFUSION_TABLE_CLASSES %}The table of {{ n }} classes is in report_section.json ("confusion").{% endif %}</p>
{% endif %}
{% if s.pr_curves %}
<h3>Precision-recall curves</h3>
<figure><img alt="precision-recall curves of {{ s.name }}" src="data:image/png;base64,{{ s.pr_curves }}"></figure>
{% endif %}
{% for title, images in [("Most false positives", s.most_false_positives), ("Most missed objects", s.most_missed)] %}
<h3>{{ title }}</h3>
{% if not images and s.images_missing %}<p class="muted">Left out: the image files of {{ s.images_missing }}
images with false positives or missed objects are not there (scored from saved results).</p>
{% elif not images %}<p class="muted">None at score &ge; {{ score_thresh }}.</p>{% endif %}
{% for g in images %}
<figure><img alt="{{ g.title }}" src="data:image/jpeg;base64,{{ g.jpeg }}">
<figcaption>{{ g.title }}</figcaption></figure>
{% endfor %}
{% endfor %}
{% endif %}
{% endfor %}
{% if training_curves %}
<h2>Training curves</h2>
<figure><img alt="training curves" src="data:image/png;base64,{{ training_curves }}"></figure>
{% endif %}
{% for run in runs %}
<h2>Command{% if runs | length > 1 %} ({{ run.sets | join(", ") }}){% endif %}</h2>
<pre>{{ run.command }}</pre>
<h2>Config{% if runs | length > 1 %} ({{ run.sets | join(", ") }}){% endif %}</h2>
<pre>{{ run.config_text }}</pre>
{% endfor %}
</body>
</html>
"""
