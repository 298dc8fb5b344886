"""The HTML evaluation report (detection/evaluation/report.py, tools/eval.py's
inference/report.html): what it counts, what it holds, and that a real browser (headless
Chromium) renders it."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from detection.data.catalog import get_dataset
from detection.data.shapes import generate_shapes
from detection.evaluation.image_errors import coco_image_errors, confusion_counts, voc_image_errors
from detection.evaluation.voc_metric import devkit_iou, to_devkit
from detection.evaluation.report import section_for_test_set, write_report

pytest.importorskip("jinja2", reason="the HTML report needs the report extra: pip install -e '.[report]'")

ROOT = Path(__file__).resolve().parents[1]


def test_false_positives_and_missed_objects_of_an_image():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], float)
    labels = np.array([1, 1, 2])
    ignored = np.array([False, False, True])  # a difficult / crowd region
    dets = {"boxes": np.array([[0, 0, 10, 10], [0, 0, 10, 11], [60, 60, 70, 70], [40, 40, 50, 50],
                               [20, 20, 30, 30]], float),
            "scores": np.array([0.9, 0.8, 0.7, 0.95, 0.3]), "labels": np.array([1, 1, 1, 2, 1])}
    fp, missed = voc_image_errors(gt, labels, ignored, dets, score_thresh=0.5)
    # class 1: a match, a duplicate and a box on nothing (2 false positives); [20,20,30,30] is
    # found only at 0.3, below the threshold: missed. Class 2: on the ignored region, neither.
    assert fp == {1: 2, 2: 0} and missed == {1: 1, 2: 0}


def test_coco_sets_are_counted_as_cocoeval_matches():
    """A helper's two cases where the devkit's rule (the report's only one before) differs from
    COCOeval's: a prediction inside a crowd region (COCOeval ignores it; it was a false
    positive), and two overlapping objects whose second prediction's best box is taken (COCOeval
    gives it the other box: AP50 100; the report said 1 false positive and 1 missed)."""
    crowd = np.array([[0, 0, 93, 93]], float)
    inside = {"boxes": np.array([[10, 10, 40, 40]], float), "scores": np.array([0.9]), "labels": np.array([2])}
    assert coco_image_errors(crowd, np.array([2]), np.array([True]), inside, 0.5) == ({2: 0}, {2: 0})
    assert voc_image_errors(crowd, np.array([2]), np.array([False]), inside, 0.5) == ({2: 1}, {2: 1})
    squares = np.array([[0, 0, 100, 100], [0, 30, 100, 130]], float)
    dets = {"boxes": np.array([[0, 0, 100, 100], [0, 10, 100, 110]], float), "scores": np.array([0.9, 0.8]),
            "labels": np.array([1, 1])}
    squares_xywh = np.array([[0, 0, 100, 100], [0, 30, 100, 100]], float)  # COCO's ground truth as written
    assert coco_image_errors(squares_xywh, np.array([1, 1]), np.array([False, False]), dets, 0.5) == ({1: 0}, {1: 0})
    assert voc_image_errors(squares, np.array([1, 1]), np.array([False, False]), dets, 0.5) == ({1: 1}, {1: 1})


def test_overlaps_on_the_threshold_are_rounded_as_the_metrics_round_them():
    """An evaluation trial: pycocotools' IoU of these boxes (XYWH as written) is 0.4999999999999996,
    a false positive and a miss for COCOeval, where XYXY arithmetic made 0.5, a match in the
    report's counts. VOC: the devkit's +1 arithmetic, as the metric does it."""
    gt = np.array([[114.67940267441257, 31.62337270512139, 4.9140727561427315, 243.36424350725594]])
    det = np.array([[114.67940267441257, 31.62337270512139, 2.4570363780713658, 243.36424350725594]])
    xyxy = np.concatenate([det[:, :2], det[:, :2] + det[:, 2:]], axis=1)
    found = {"boxes": xyxy, "xywh": det, "scores": np.array([0.9]), "labels": np.array([1])}
    assert coco_image_errors(gt, np.array([1]), np.array([False]), found, 0.5) == ({1: 1}, {1: 1})
    from pycocotools import mask

    assert mask.iou(det, gt, [0])[0, 0] < 0.5  # what COCOeval computes
    # VOC: 0.5 by the devkit's arithmetic (a match in the metric), 0.49999999999999944 in XYXY's
    gt = np.array([[127.39233746429086, 53.95734275277406, 140.64342112121307, 59.89910577580426]])
    found = {"boxes": np.array([[127.39233746429086, 53.95734275277406, 134.01787929275196, 59.89910577580426]]),
             "scores": np.array([0.9]), "labels": np.array([1])}
    assert devkit_iou(to_devkit(found["boxes"]), to_devkit(gt))[0, 0] == 0.5
    assert voc_image_errors(gt, np.array([1]), np.array([False]), found, 0.5) == ({1: 0}, {1: 0})


def test_coco_counts_equal_pycocotools_on_random_images(tmp_path):
    """False positives and missed objects of every image and class against COCOeval.evaluateImg
    itself (IoU 0.5, area all, 100 detections): unmatched, not-ignored predictions and objects."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    images, annotations, results, ours = [], [], [], {}
    for image_id in range(1, 41):
        images.append({"id": image_id, "width": 200, "height": 200, "file_name": f"{image_id}.jpg"})
        n_gt, n_dt = rng.integers(0, 6), rng.integers(0, 9)
        xy, wh = rng.uniform(0, 120, (n_gt, 2)), rng.uniform(10, 80, (n_gt, 2))
        gt_labels, crowd = rng.integers(1, 3, n_gt), rng.random(n_gt) < 0.2
        for k in range(n_gt):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(gt_labels[k]),
                                "bbox": [*xy[k], *wh[k]], "area": float(np.prod(wh[k])), "iscrowd": int(crowd[k])})
        near = xy[rng.integers(0, max(n_gt, 1), n_dt)] if n_gt else rng.uniform(0, 120, (n_dt, 2))
        d_xy, d_wh = near + rng.normal(0, 8, (n_dt, 2)), rng.uniform(10, 80, (n_dt, 2))
        scores, labels = rng.uniform(0.5, 1.0, n_dt).round(3), rng.integers(1, 3, n_dt)
        for k in range(n_dt):
            results.append({"image_id": image_id, "category_id": int(labels[k]), "bbox": [*d_xy[k], *d_wh[k]],
                            "score": float(scores[k])})
        dets = {"boxes": np.concatenate([d_xy, d_xy + d_wh], axis=1), "xywh": np.concatenate([d_xy, d_wh], axis=1),
                "scores": scores, "labels": labels}
        ours[image_id] = coco_image_errors(np.concatenate([xy, wh], axis=1), gt_labels, crowd, dets, score_thresh=0.5)
    (tmp_path / "gt.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                  "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    gt = COCO(str(tmp_path / "gt.json"))
    evaluation = COCOeval(gt, gt.loadRes(results), "bbox")
    evaluation.params.iouThrs, evaluation.params.maxDets = np.array([0.5]), [100]
    evaluation.params.areaRng, evaluation.params.areaRngLbl = [[0, 1e10]], ["all"]
    evaluation.evaluate()
    checked = 0
    for e in evaluation.evalImgs:
        if e is None:
            continue
        fp = int(((e["dtMatches"][0] == 0) & ~e["dtIgnore"][0].astype(bool)).sum())
        missed = int(((e["gtMatches"][0] == 0) & ~np.asarray(e["gtIgnore"], bool)).sum())
        their_fp, their_missed = ours[e["image_id"]]
        assert (their_fp.get(e["category_id"], 0), their_missed.get(e["category_id"], 0)) == (fp, missed), e["image_id"]
        checked += 1
    assert checked > 50


def test_report_counts_the_ground_truth_the_voc_evaluation_scores():
    """A VOC box reaching past its image is clipped for training and one wholly outside dropped
    (the record's `boxes`), but the devkit scores them as annotated (`annotated`): the report's
    objects and missed counts are the metrics' (it counted the clipped set: 1 object, 0 missed)."""
    from detection.data.dataset_info import DatasetInfo

    record = {"image_id": "000001", "file_name": "/nowhere/000001.jpg", "height": 50, "width": 60,
              "boxes": np.array([[10, 10, 60, 40]], np.float32), "labels": np.array([1]),
              "difficult": np.array([False]),
              "annotated": {"boxes": np.array([[10, 10, 75, 40], [70, 5, 90, 20]], np.float64),
                            "labels": np.array([1, 2]), "difficult": np.array([False, False])}}
    dataset = DatasetInfo(name="voc_edge", kind="voc", class_names=["cat", "dog"], records=[record])
    found = {"000001": {"boxes": np.array([[10, 10, 75, 40]], float), "scores": np.array([0.9]),
                        "labels": np.array([1])}}
    section = section_for_test_set(dataset, {"AP-cat": 100.0, "AP-dog": 0.0}, found)
    assert [(c["name"], c["gt"], c["fp"], c["missed"]) for c in section.per_class] == [("cat", 1, 0, 0),
                                                                                        ("dog", 1, 0, 1)]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    generate_shapes(str(root / "shapes"), num_train=1, num_val=5, seed=3, image_size=(64, 80))
    return get_dataset("shapes_val", str(root))


def predictions(dataset):
    """The ground truth shifted by 2 px, one spurious box on the first image, the last image's
    objects missed."""
    out = {}
    for i, record in enumerate(dataset.records):
        boxes = np.asarray(record["boxes"], float) + 2
        labels = np.asarray(record["labels"])
        if i == 0:
            boxes, labels = np.vstack([boxes, [[1, 1, 20, 20]]]), np.append(labels, 1)
        if i == len(dataset.records) - 1:
            boxes, labels = boxes[:0], labels[:0]
        out[record["image_id"]] = {"boxes": boxes, "scores": np.linspace(0.9, 0.6, len(boxes)), "labels": labels}
    return out


def write(tmp_path, dataset, with_curves=True):
    metrics = {"AP": 61.25, "AP50": 88.5, **{f"AP-{name}": 50.0 + i for i, name in enumerate(dataset.class_names)},
               **{f"AP50-{name}": 70.0 + i for i, name in enumerate(dataset.class_names)}}
    section = section_for_test_set(dataset, metrics, predictions(dataset))
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("".join(json.dumps({"iteration": i, "loss_cls": 1.0 / i, "lr": 0.01}) + "\n"
                             for i in range(1, 6)))
    return write_report(tmp_path / "report.html", [section], source="/runs/x/model_final.pth",
                        command="python tools/eval.py --weights /runs/x/model_final.pth",
                        config_text="model:\n  num_classes: 3  # <not a tag>\n",
                        metrics_jsonl=jsonl if with_curves else None)


@pytest.mark.slow  # matplotlib plots the training curves
def test_report_holds_the_tables_curves_gallery_config_and_command(tmp_path, shapes):
    html = write(tmp_path, shapes).read_text()
    assert "<td>AP</td><td>61.25</td>" in html and "<td>AP50</td><td>88.50</td>" in html
    assert shapes.kind == "coco"
    for i, name in enumerate(shapes.class_names):  # the per-class table: AP and (a COCO-type set) AP50
        assert re.search(rf"<td>{name}</td><td>{50 + i:.2f}</td><td>{70 + i:.2f}</td>", html)
        assert f"<td>AP50-{name}</td>" not in html  # not among the summary numbers
    assert "Most false positives" in html and ": 1 false positives, 0 missed" in html
    last = Path(shapes.records[-1]["file_name"]).name
    assert f"{last}: 0 false positives, {len(shapes.records[-1]['boxes'])} missed" in html
    assert "Training curves" in html and "python tools/eval.py --weights /runs/x/model_final.pth" in html
    assert "# &lt;not a tag&gt;" in html  # autoescaped
    # self-contained: every image is embedded, nothing is fetched
    sources = re.findall(r'src="([^"]*)"', html)
    assert len(sources) >= 3 and all(s.startswith("data:image/") for s in sources)
    assert "href=" not in html and "http" not in html


def test_report_without_metrics_jsonl_says_so(tmp_path, shapes):
    html = write(tmp_path, shapes, with_curves=False).read_text()
    assert "Training curves" not in html and "no metrics.jsonl beside the checkpoint" in html


def chromium() -> str:
    """The browser: the one `make test` found or installed (C4DET_BROWSER, which must then be
    there: the test runs, never skips), else on PATH; skips only when there is none."""
    given = os.environ.get("C4DET_BROWSER")
    if given:
        assert os.access(given, os.X_OK), f"C4DET_BROWSER={given} (from make test) is not an executable"
        return given
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("headless Chromium is not installed (make test installs Debian's chromium with apt-get "
                    "when it can): the browser test of the HTML report is skipped")
    return found


@pytest.mark.slow  # starts a browser
def test_chromium_renders_the_report(tmp_path, shapes):
    browser = chromium()
    page = write(tmp_path, shapes).resolve()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    out = subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert shot.is_file(), out.stderr[-2000:]
    import cv2

    image = cv2.imread(str(shot))
    assert image is not None and image.shape[:2] == (1600, 1200)
    assert image.std() > 10 and len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # not blank: text, tables, plots
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert "<td>AP</td><td>61.25</td>" in dom and "Per class" in dom
    assert all(f"<td>{name}</td>" in dom for name in shapes.class_names)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny model trained 2 iterations on shapes (score threshold 0: detections on every
    image), its folder and overrides; each test evaluates a copy or its own folder of results."""
    from tests.helpers import train_tiny_run

    root = tmp_path_factory.mktemp("report_run")
    overrides = train_tiny_run(root, num_train=4, max_iter=2)
    return root, overrides


def eval_tool(capsys, *args) -> str:
    """tools/eval.py's command line, run by its main() in this process; it must exit 0. -> stdout."""
    from tests.helpers import load_tool, run_main

    code, out, err = run_main(load_tool("eval"), list(args), capsys)
    assert code == 0, err[-3000:]
    return out


@pytest.mark.slow  # trains a tiny model and runs tools/eval.py
def test_eval_writes_the_report_beside_the_results(tiny_run, tmp_path, capsys, restore_logging):
    root, overrides = tiny_run
    weights = tmp_path / "out" / "model_final.pth"  # a copy beside its training's files: a folder of its own
    shutil.copytree(root / "out", tmp_path / "out")
    out = eval_tool(capsys, "--weights", weights, *overrides)
    report = tmp_path / "out" / "inference" / "report.html"
    assert f"report written to {report}" in out
    html = report.read_text()
    metrics = json.loads((tmp_path / "out" / "inference" / "shapes_val" / "metrics.json").read_text())
    assert f"<td>AP50</td><td>{metrics['AP50']:.2f}</td>" in html
    assert "Precision-recall curves" in html and "Training curves" in html and "Most missed objects" in html
    assert "solver.max_iter" in html and str(weights) in html  # the config and the command
    # under the set's heading, the settings that made its numbers (the precision inference ran in)
    settings = re.search(r"Evaluated with test size \d+ \(longer side at most \d+\); scores over 0.0, at most 100 "
                         r"detections an image after NMS at IoU 0.5; inference in float32 "
                         r"\(test.amp: (true|false)\)</p>",
                         html)
    assert settings
    # re-scoring the saved results writes the page too (no training curves: no checkpoint), with
    # the settings of the evaluation that made the results
    eval_tool(capsys, "--config", tmp_path / "out" / "config.yaml", "--results", tmp_path / "out" / "inference",
              "--output-dir", tmp_path / "rescored", "input.min_size_test=95", "test.aug.enabled=true")
    rescored = (tmp_path / "rescored" / "report.html").read_text()
    assert f"<td>AP50</td><td>{metrics['AP50']:.2f}</td>" in rescored and settings.group(0) in rescored
    # the same from the set's results file or its folder (the heading gave this command's TTA, which
    # did not make them); a results file from elsewhere: the settings are said to be unknown
    results = tmp_path / "out" / "inference" / "shapes_val" / "coco_results.json"
    shutil.copy(results, tmp_path / "theirs.json")
    for given, said in ((results, settings.group(0)), (results.parent, settings.group(0)),
                        (tmp_path / "theirs.json", f"Evaluated with test settings not known: the results read from "
                                                   f"{tmp_path} have no report_section.json")):
        eval_tool(capsys, "--config", tmp_path / "out" / "config.yaml", "--results", given, "--overwrite",
                  "--output-dir", tmp_path / "again", "test.aug.enabled=true")
        again = (tmp_path / "again" / "report.html").read_text()
        assert said in again and "TTA at" not in again, given
    # --report-images: more or fewer gallery images than the default 4 (a curator's trial: 5 of 9 planted
    # errors ranked past the 4 shown)
    galleries = {}
    for n in (0, 1, 4):
        eval_tool(capsys, "--config", tmp_path / "out" / "config.yaml", "--results", results, "--overwrite",
                  "--output-dir", tmp_path / "n", "--report-images", str(n))
        galleries[n] = (tmp_path / "n" / "report.html").read_text().count("data:image/jpeg")
    assert galleries == {0: 0, 1: 1, 4: 3}  # the tiny model's 3 images all have missed objects at score 0.5


def test_the_settings_line_names_every_test_time_extra():
    """Two sets, or two runs into one folder, evaluated otherwise (TTA, Appendix B's extras,
    bfloat16) showed the same heading: the settings are said where the numbers are."""
    from detection.config import config_to_dict, load_config
    from detection.evaluation.report import evaluated_with

    plain = config_to_dict(load_config(None, ["input.min_size_test=600", "input.max_size_test=1000"]))
    assert evaluated_with(plain) == ("test size 600 (longer side at most 1000); scores over 0.05, at most 100 "
                                     "detections an image after NMS at IoU 0.5; test.amp: false")
    extras = config_to_dict(load_config(None, [
        "test.aug.enabled=true", "test.aug.min_sizes=[400,600]", "test.multi_scale.enabled=true",
        "test.box_refinement.enabled=true", "model.roi_heads.global_context=true", "test.amp=true"]))
    assert evaluated_with(extras, "bfloat16 (test.amp: true)") == (
        "test size 600 (longer side at most 1000); scores over 0.05, at most 100 detections an image after NMS at "
        "IoU 0.3; TTA at [400, 600], mirrored too; multi-scale features "
        "[200, 400, 600, 800, 1000]; box refinement with voting; global context; inference in bfloat16 (test.amp: true)")


# --- what the folder holds is what the page shows; the checkpoint's time -----------------------

def test_the_page_shows_every_test_set_saved_in_the_folder_and_each_runs_command(tmp_path, shapes):
    from detection.evaluation.report import load_sections, save_section

    for name, command in (("first_set", "eval.py datasets.test=[a]"), ("second_set", "eval.py datasets.test=[b]")):
        section = section_for_test_set(shapes, {"AP": 10.0 if name == "first_set" else 20.0}, predictions(shapes))
        section.name, section.command, section.config_text = name, command, f"config of {name}\n"
        save_section(section, tmp_path / name)
    (tmp_path / "older_set").mkdir()
    (tmp_path / "older_set" / "metrics.json").write_text("{}")  # results with no section
    (tmp_path / "cut_set").mkdir()
    (tmp_path / "cut_set" / "report_section.json").write_text('{"name": "cut')  # cut short: no part, no crash
    sections, without = load_sections(tmp_path, order=["second_set"])
    assert [s.name for s in sections] == ["second_set", "first_set"] and without == ["cut_set", "older_set"]
    assert sections[1].most_false_positives[0].title == section_for_test_set(
        shapes, {}, predictions(shapes)).most_false_positives[0].title  # the gallery comes back whole
    html = write_report(tmp_path / "report.html", sections, source="/runs/x/model_final.pth", command="unused",
                        config_text="unused", source_time=0.0).read_text()
    assert "<td>AP</td><td>20.00</td>" in html and "<td>AP</td><td>10.00</td>" in html
    assert "<h2>Command (first_set)</h2>" in html and "eval.py datasets.test=[b]" in html
    assert "config of first_set" in html and "unused" not in html
    stamp = __import__("datetime").datetime.fromtimestamp(0.0).astimezone().strftime("%Y-%m-%d %H:%M")
    assert f"(modified {stamp}" in html  # the checkpoint's time, not only the page's


@pytest.mark.slow  # trains a tiny model and runs tools/eval.py twice
def test_a_second_evaluation_into_the_folder_adds_its_test_set_to_the_page(tiny_run, tmp_path, capsys,
                                                                             restore_logging):
    root, overrides = tiny_run
    weights = tmp_path / "out" / "model_final.pth"  # a copy beside its training's files: a folder of its own
    shutil.copytree(root / "out", tmp_path / "out")
    mine = {"type": "coco", "ann_file": "shapes/annotations/instances_val.json", "image_root": "shapes/val",
            "name": "my photos"}
    for test in (["shapes_val"], [mine]):
        out = eval_tool(capsys, "--weights", weights, *overrides, f"datasets.test={json.dumps(test)}")
    folder = tmp_path / "out" / "inference"
    assert "(2 test sets: shapes_val, my photos)" in out
    assert json.loads((folder / "source.json").read_text())["test_sets"] == ["shapes_val", "my_photos"]
    html = (folder / "report.html").read_text()
    for name, sub in (("shapes_val", "shapes_val"), ("my photos", "my_photos")):
        metrics = json.loads((folder / sub / "metrics.json").read_text())
        assert re.search(rf"<h2 id=\"set-\d\">{name} .*?<td>AP50</td><td>{metrics['AP50']:.2f}</td>", html, re.S)
    assert "Command (shapes_val)" in html and "Command (my photos)" in html


def test_coco_report_counts_the_ground_truth_cocoeval_scores(tmp_path):
    """COCOeval reads the json as written: an `ignore: 1` object is an object (its `ignore` is
    `iscrowd`), and a box reaching past the image is scored unclipped. The report counted the
    training records (the ignored object left out, the box clipped): 'circle 0 objects, 0 missed'
    where the metrics said circle AP 0."""
    ann = {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 100}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400,
                            "iscrowd": 0, "ignore": 1},
                           {"id": 2, "image_id": 1, "category_id": 2, "bbox": [60, 60, 80, 80], "area": 6400,
                            "iscrowd": 0}],
           "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "img").mkdir()
    dataset = get_dataset({"type": "coco", "ann_file": str(tmp_path / "ann.json"), "image_root": str(tmp_path / "img")},
                          str(tmp_path), check_images=False)
    # a prediction on the square's visible part: IoU with the annotated [60, 60, 140, 140] is 0.25
    detections = {1: {"boxes": np.array([[60.0, 60.0, 100.0, 100.0]]), "scores": np.array([0.9]),
                      "labels": np.array([2])}}
    section = section_for_test_set(dataset, {}, detections)
    counts = {c["name"]: (c["gt"], c["fp"], c["missed"]) for c in section.per_class}
    assert counts == {"circle": (1, 0, 1), "square": (1, 1, 1)}


def test_a_gallery_without_its_image_files_says_so(tmp_path):
    """Re-scoring saved results needs no images; the gallery then said 'None at score >= 0.5'
    beside a table of false positives."""
    ann = {"images": [{"id": 1, "file_name": "gone.jpg", "width": 100, "height": 100}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400,
                            "iscrowd": 0}],
           "categories": [{"id": 1, "name": "circle"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "img").mkdir()
    dataset = get_dataset({"type": "coco", "ann_file": str(tmp_path / "ann.json"), "image_root": str(tmp_path / "img")},
                          str(tmp_path), check_images=False)
    far = {1: {"boxes": np.array([[60.0, 60.0, 90.0, 90.0]]), "scores": np.array([0.9]), "labels": np.array([1])}}
    section = section_for_test_set(dataset, {"AP": 0.0}, far)
    assert section.per_class[0]["fp"] == 1 and section.most_false_positives == [] and section.images_missing == 1
    write_report(tmp_path / "report.html", [section], source="x", command="c", config_text="")
    page = (tmp_path / "report.html").read_text()
    assert "Left out: the image files of 1\nimages with false positives or missed objects are not there" in page


def test_the_voc_metric_is_named_not_listed_as_a_number(tmp_path):
    # metrics.json keeps use_07_metric (0/1) for the record; the page said "use_07_metric 0.00"
    from detection.evaluation.report import TestSetSection

    for flag, name in ((1.0, "VOC2007 11-point interpolated AP"), (0.0, "VOC2010+ area under the interpolated")):
        section = TestSetSection("voc", 2, {"mAP": 50.0, "AP": 50.0, "use_07_metric": flag})
        write_report(tmp_path / "r.html", [section], source="x", command="c", config_text="")
        page = (tmp_path / "r.html").read_text()
        assert f"VOC metric: {name}" in page and "<td>use_07_metric</td>" not in page and "<td>mAP</td>" in page


def test_a_voc_box_of_no_area_is_counted_as_its_metric_counts_it(tmp_path):
    """The VOC devkit scores every box as annotated, one of no area too (a miss no detection can
    match); the drawing's "no area" tag made the report take it for an ignored region (a review)."""
    from detection.data.dataset_info import DatasetInfo

    record = {"file_name": str(tmp_path / "none.jpg"), "image_id": "1", "height": 40, "width": 60,
              "boxes": np.array([[1, 1, 10, 10]], np.float32), "labels": np.array([1]), "difficult": np.zeros(1, bool),
              "annotated": {"boxes": np.array([[1.0, 1, 10, 10], [30, 5, 20, 15]]), "labels": np.array([1, 1]),
                            "difficult": np.zeros(2, bool)}}
    dataset = DatasetInfo(name="voc", kind="voc", class_names=["cat"], records=[record])
    section = section_for_test_set(dataset, {}, {})
    assert section.per_class == [{"name": "cat", "ap": None, "gt": 2, "fp": 0, "missed": 2}]


def test_confusion_counts_split_false_positives_by_the_object_they_are_on():
    """MMDetection's confusion_matrix.py for this project's matching: found on the diagonal, a
    detection of the wrong class on an object in that object's row, duplicates and background in
    "no object", missed objects in the last column; a difficult or crowd object counts nowhere."""
    cat1, dog, cat2, hard = [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]
    gt = np.array([cat1, dog, cat2, hard], np.float64)
    gt_labels, ignored = np.array([1, 2, 1, 1]), np.array([False, False, False, True])
    detections = {"boxes": np.array([cat1, dog, dog, cat1, [80, 80, 90, 90], hard, dog], np.float64),
                  "scores": np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.95, 0.1]),
                  "labels": np.array([1, 1, 2, 1, 1, 1, 2])}
    expected = [[1, 0, 1],   # cat: found once, cat2 missed
                [1, 1, 0],   # dog: found, and detected as a cat once
                [2, 0, 0]]   # no object: a second cat on cat1, a cat on the background
    for kind in ("voc", "coco"):
        boxes = gt if kind == "voc" else np.concatenate([gt[:, :2], gt[:, 2:] - gt[:, :2]], axis=1)
        counts = confusion_counts(kind, boxes, gt_labels, ignored, detections, 0.5, 2)
        assert counts.tolist() == expected, kind
        # as the false positives and missed objects of the report's table
        errors = voc_image_errors if kind == "voc" else coco_image_errors
        fp, missed = errors(boxes, gt_labels, ignored, detections, 0.5)
        assert [counts[:, k].sum() - counts[k, k] for k in range(2)] == [fp.get(1, 0), fp.get(2, 0)]
        assert counts[:2, 2].tolist() == [missed.get(1, 0), missed.get(2, 0)]


def test_the_report_draws_the_confusion_table(tmp_path, shapes):
    found = predictions(shapes)
    second = found[shapes.records[1]["image_id"]]
    truth = int(second["labels"][0])
    second["labels"] = np.array([truth % 3 + 1, *second["labels"][1:]])  # its first object taken for another class
    section = section_for_test_set(shapes, {"AP": 50.0}, found)
    n = len(shapes.class_names)
    names = shapes.class_names
    assert section.most_confused() == [(names[truth - 1], names[truth % 3], 1)]
    assert len(section.confusion) == n + 1 and all(len(row) == n + 1 for row in section.confusion)
    assert [section.confusion[k][k] + section.confusion[k][n] for k in range(n)] == \
        [c["gt"] for c in section.per_class]  # every object found or missed
    html = write_report(tmp_path / "report.html", [section], source="x", command="c", config_text="").read_text()
    assert "<h3>Confusion</h3>" in html and "<th>object \\ detected as</th>" in html
    table = html[html.index('<table class="confusion">'):]
    table = table[:table.index("</table>")]
    rows = re.findall(r"<tr><th>([^<]*)</th>((?:<td>\d*</td>)*)</tr>", table)
    assert [name for name, _ in rows] == [*names, "no object"]
    assert [re.findall(r"<td>(\d*)</td>", cells) for _, cells in rows] == \
        [[str(v) for v in row] for row in section.confusion[:n]] + [[str(v) for v in section.confusion[n][:n]] + [""]]
    assert f"Most confused: {names[truth - 1]} detected as {names[truth % 3]} (1)" in html
