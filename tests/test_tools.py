"""tools/eval.py and tools/visualize.py through their command lines (main(argv) in this process:
the same parsing and error mapping, without a new Python per call), on a tiny trained model."""
import json
import os
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detection.config import load_config
from detection.data.shapes import generate_shapes

from tests.helpers import load_tool, run_main, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
TOOLS = {"eval.py": load_tool("eval"), "visualize.py": load_tool("visualize")}
pytestmark = pytest.mark.usefixtures("restore_logging")  # main() sets up logging: take it back after


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few iterations on shapes, and its overrides."""
    from tests.helpers import train_tiny_run

    root = tmp_path_factory.mktemp("tools")
    overrides = train_tiny_run(root, num_train=8, max_iter=3)
    return root, overrides


@pytest.fixture
def run(capsys):
    """run(tool, *args): the tool's command line with --config configs/base.yaml; it must exit 0.
    -> (stdout, stderr)."""
    def run_tool(tool, *args, config=True):
        code, out, err = run_main(TOOLS[tool], [*(["--config", ROOT / "configs" / "base.yaml"] if config else []),
                                                *args], capsys)
        assert code == 0, err[-3000:]
        return out, err
    return run_tool


@pytest.mark.slow
def test_eval_prints_table_and_matches_cocoeval_on_its_results(trained, run, capsys):
    root, overrides = trained
    out, _ = run("eval.py", "--weights", str(root / "out" / "model_final.pth"),
              "--output-dir", str(root / "eval"), *overrides)
    metrics = json.loads((root / "eval" / "shapes_val" / "metrics.json").read_text())
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"} <= set(metrics)
    assert "AP-circle" in metrics and "AP50" in out
    # the printed AP is what pycocotools gives directly on the written results file
    gt = COCO(str(root / "data" / "shapes" / "annotations" / "instances_val.json"))
    results = json.loads((root / "eval" / "shapes_val" / "coco_results.json").read_text())
    assert results, "score_thresh_test 0 on a trained model gives detections"
    ev = COCOeval(gt, gt.loadRes(results), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert metrics["AP"] == pytest.approx(100 * ev.stats[0], abs=1e-6)
    # what the numbers come from (a reproducibility trial: the folder named the checkpoint by path,
    # size and date only, and not the precision test.amp really ran in)
    import hashlib

    import torch
    import torchvision

    from detection.config import load_config
    from detection.modeling.precision import bfloat16_is_slow

    env = json.loads((root / "eval" / "shapes_val" / "environment.json").read_text())
    weights = root / "out" / "model_final.pth"
    assert env["checkpoint sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    # which iteration: last.pth and model_final.pth do not say it in their names (a long-run trial)
    assert env["checkpoint iteration"] == 3 and f"checkpoint {weights}: iteration 3 of its run's 3" in out
    assert env["torch threads"] == torch.get_num_threads()  # another count moves the last digits (an automation trial)
    assert env["command"].startswith("python tools/eval.py --config ") and "--weights" in env["command"]
    assert env["environment"]["torch"] == torch.__version__
    assert env["environment"]["torchvision"] == torchvision.__version__
    assert len(env["environment"]["code"]) == 16 and "(" in env["environment"]["cpu"]
    asked = load_config(ROOT / "configs" / "base.yaml", overrides).test.amp
    assert env["inference precision"] == ("bfloat16" if asked and not bfloat16_is_slow("cpu") else "float32") + \
        f" (test.amp: {str(asked).lower()})"
    # --results scores the saved file without a model and gives the same numbers
    run("eval.py", "--results", str(root / "eval" / "shapes_val" / "coco_results.json"),
        "--output-dir", str(root / "eval2"), *overrides)
    again = json.loads((root / "eval2" / "shapes_val" / "metrics.json").read_text())
    assert again["AP"] == pytest.approx(metrics["AP"], abs=1e-9)
    # a results folder without the asked set's results says which it holds (was: "cannot read the
    # results file (Is a directory)")
    code, _, err = run_main(TOOLS["eval.py"], ["--config", ROOT / "configs" / "base.yaml", "--results", root / "eval",
                                               "--output-dir", root / "eval3", *overrides,
                                               "datasets.test=[shapes_train]"], capsys)
    assert code == 2 and f"{root / 'eval'}: holds no results for the test set of folder 'shapes_train' (it holds: " \
        "shapes_val)" in err, err
    # re-scoring the folder in place keeps the page's record of how the results were made: the
    # checkpoint, and the command and config of the evaluation that wrote them (it put its own)
    section = root / "eval" / "shapes_val" / "report_section.json"
    made_by = json.loads(section.read_text())["command"] if section.is_file() else None
    run("eval.py", "--results", str(root / "eval"), "--output-dir", str(root / "eval"), *overrides)
    assert json.loads((root / "eval" / "shapes_val" / "environment.json").read_text()) == env  # the run's that made them
    if made_by is not None:  # (the report extra is installed)
        assert json.loads(section.read_text())["command"] == made_by and "--weights" in made_by
        page = (root / "eval" / "report.html").read_text()
        assert str((root / "out" / "model_final.pth").resolve()) in page
    # another test set evaluated into the folder with other settings has its own (one file for the
    # folder described the last evaluation only: a trial)
    run("eval.py", "--weights", str(weights), "--output-dir", str(root / "eval"), *overrides,
        "datasets.test=[shapes_train]", "model.roi_heads.score_thresh_test=0.5")
    assert json.loads((root / "eval" / "shapes_val" / "environment.json").read_text()) == env
    assert "score_thresh_test=0.5" in json.loads((root / "eval" / "shapes_train" / "environment.json").read_text()
                                                 )["command"]


@pytest.mark.slow
def test_eval_bad_checkpoint_is_one_clear_line(trained, tmp_path, capsys):
    root, overrides = trained
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    code, _, err = run_main(TOOLS["eval.py"], ["--config", ROOT / "configs" / "base.yaml", "--weights", bad,
                                               *overrides], capsys)
    assert code == 2 and "bad.pth" in err and "Traceback" not in err  # (a traceback would have raised here)


@pytest.mark.slow
def test_eval_without_test_sets_says_so(trained, capsys):
    """The README's quick fine-tune leaves datasets.test empty; eval.py then wrote a report of
    zero test sets and exited 0."""
    root, overrides = trained
    code, out, err = run_main(TOOLS["eval.py"], ["--config", ROOT / "configs" / "base.yaml", "--weights",
                                                 root / "out" / "model_final.pth", *overrides, "datasets.test=[]"],
                              capsys)
    assert code == 2 and "error: datasets.test is empty: nothing to evaluate; give the test sets" in err
    assert "results go to" not in out  # nothing made


@pytest.mark.slow
def test_checkpoint_of_another_model_is_one_clear_line(trained, capsys):
    """A checkpoint trained with another config (here ResNet-18 loaded as ResNet-34) names the file."""
    root, overrides = trained
    weights = str(root / "out" / "model_final.pth")
    for tool in ("eval.py", "visualize.py"):
        extra = ["--compare", "--output", str(root / "vis_bad")] if tool == "visualize.py" else []
        code, _, err = run_main(TOOLS[tool], ["--config", ROOT / "configs" / "base.yaml", "--weights", weights,
                                              *extra, *overrides, "model.backbone.depth=34"], capsys)
        assert code == 2, err[-2000:]
        assert "model_final.pth was trained with model.backbone.depth=18 but the config has 34, and its weights' " \
            "shapes are of the first: use the config it was trained with" in err  # given deliberately: no matter
        assert "Traceback" not in err


@pytest.mark.slow
def test_visualize_predictions_gt_and_compare(trained, tmp_path, run):
    root, overrides = trained
    weights = str(root / "out" / "model_final.pth")
    image = root / "data" / "shapes" / "val" / sorted(p.name for p in (root / "data" / "shapes" / "val").iterdir())[0]
    run("visualize.py", "--weights", weights, "--input", str(image), "--output", str(tmp_path / "pred"),
        "--score-thresh", "0.0", *overrides)
    drawn = cv2.imread(str(tmp_path / "pred" / f"00000_{image.stem}.jpg"))
    original = cv2.imread(str(image))
    assert drawn.shape == original.shape
    assert np.abs(drawn.astype(int) - original.astype(int)).max() > 100   # boxes were drawn
    run("visualize.py", "--gt", "--output", str(tmp_path / "gt"), "--limit", "2", *overrides)
    assert len(list((tmp_path / "gt").glob("*.jpg"))) == 2
    run("visualize.py", "--weights", weights, "--compare", "--output", str(tmp_path / "cmp"), "--limit", "1",
        *overrides)
    (cmp_file,) = (tmp_path / "cmp").glob("*.jpg")
    assert cv2.imread(str(cmp_file)).shape[1] > 2 * original.shape[1]   # two panels side by side
    # a folder as input: one output per image
    run("visualize.py", "--weights", weights, "--input", str(root / "data" / "shapes" / "val"),
        "--output", str(tmp_path / "folder"), *overrides)
    assert len(list((tmp_path / "folder").glob("*.jpg"))) == 3


@pytest.mark.slow
def test_visualize_draws_every_readable_image_and_then_names_the_unreadable_one(trained, tmp_path, capsys):
    """One corrupt file in a folder of photos: the images after it are drawn too (the run stopped
    at it), a warning names it as it happens, and the run ends with one error (exit 2) naming it."""
    import shutil

    root, overrides = trained
    photos = tmp_path / "photos"
    shutil.copytree(root / "data" / "shapes" / "val", photos)
    names = sorted(p.name for p in photos.iterdir())
    (photos / f"{Path(names[0]).stem}_corrupt.jpg").write_bytes(b"\xff\xd8" + bytes(range(256)) * 4)
    code, out, err = run_main(TOOLS["visualize.py"], ["--config", ROOT / "configs" / "base.yaml", "--weights",
                                                      root / "out" / "model_final.pth", "--input", photos,
                                                      "--output", tmp_path / "vis", *overrides], capsys)
    assert code == 2, err[-2000:]
    drawn = sorted(p.name for p in (tmp_path / "vis").iterdir() if p.suffix == ".jpg")  # and detections.jsonl
    assert drawn == [f"{i:05d}_{Path(n).stem}.jpg" for i, n in zip((0, 2, 3), names)]
    assert "not drawn:" in err and f"{Path(names[0]).stem}_corrupt.jpg" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: wrote 3 images to {tmp_path / 'vis'}") and \
        "1 of the 4 images were not drawn" in last and "_corrupt.jpg" in last, last
    assert last.endswith("(dataloader.skip_bad_images=true skips them, as eval.py does)")
    # asked to skip them, as eval.py: the same drawing, the same line, exit 0
    code, out, err = run_main(TOOLS["visualize.py"], ["--config", ROOT / "configs" / "base.yaml", "--weights",
                                                      root / "out" / "model_final.pth", "--input", photos,
                                                      "--output", tmp_path / "vis2", *overrides,
                                                      "dataloader.skip_bad_images=true"], capsys)
    assert code == 0, err[-2000:]
    assert sorted(p.name for p in (tmp_path / "vis2").iterdir() if p.suffix == ".jpg") == drawn
    assert "1 of the 4 images were not drawn" in out and "(skipped: dataloader.skip_bad_images)" in out


def test_visualize_with_nothing_drawn_names_the_threshold_that_removed_the_detections(trained, tmp_path, capsys):
    """The model drops scores at or below model.roi_heads.score_thresh_test before --score-thresh sees
    them: "--score-thresh sets it" sent a user lowering a flag that could draw nothing more."""
    root, overrides = trained
    args = ["--config", ROOT / "configs" / "base.yaml", "--weights", root / "out" / "model_final.pth", "--input",
            root / "data" / "shapes" / "val", "--output", tmp_path / "vis", "--no-draw", *overrides]
    code, out, err = run_main(TOOLS["visualize.py"], [*args, "--score-thresh", "0.2",
                                                      "model.roi_heads.score_thresh_test=0.9999"], capsys)
    assert code == 0, err[-2000:]
    assert out.strip().endswith("0 detections listed (score >= 0.2; the model itself drops scores <= "
                                "model.roi_heads.score_thresh_test=0.9999: lower both to see weaker detections)")
    code, out, err = run_main(TOOLS["visualize.py"], [*args, "--score-thresh", "1"], capsys)
    assert code == 0 and out.strip().endswith("0 detections listed (score >= 1, --score-thresh sets it)"), out


def test_visualize_results_draws_saved_detections_on_the_sets_images_without_a_model(tmp_path, capsys):
    """Detectron2's visualize_json_results.py: eval.py's saved results drawn beside the ground truth,
    each detection where the results file put it (COCO's x, y, w, h), at --score-thresh."""
    from detection.data.catalog import get_dataset
    from detection.data.image_io import read_image
    from detection.visualization.draw import draw_detections, ground_truth_boxes, side_by_side

    generate_shapes(tmp_path / "data" / "shapes", num_train=1, num_val=3, seed=1, image_size=(64, 80))
    overrides = tiny_overrides(tmp_path / "data", tmp_path / "out")
    dataset = get_dataset("shapes_val", str(tmp_path / "data"), check_images=False)
    first, second = dataset.records[0], dataset.records[1]
    category = dataset.label_to_category_id[2]
    results = [{"image_id": first["image_id"], "category_id": category, "bbox": [10, 20, 30, 25], "score": 0.9},
               {"image_id": first["image_id"], "category_id": category, "bbox": [40, 5, 20, 20], "score": 0.3},
               {"image_id": 999, "category_id": category, "bbox": [1, 1, 5, 5], "score": 0.9}]
    (tmp_path / "coco_results.json").write_text(json.dumps(results))
    args = ["--config", ROOT / "configs" / "base.yaml", "--results", tmp_path / "coco_results.json", *overrides]
    code, out, err = run_main(TOOLS["visualize.py"], [*args, "--compare", "--output", tmp_path / "vis"], capsys)
    assert code == 0, err[-2000:]
    assert "detections of 1 of data set shapes_val's 3 images; 1 image in the results is not in it (not drawn)" in out
    assert out.strip().splitlines()[-1] == f"wrote 3 images to {tmp_path / 'vis'}: 1 detection drawn (score >= 0.5)"
    image = read_image(first["file_name"])
    truth = draw_detections(image, *ground_truth_boxes(first)[:2], None, dataset.class_names, 0.0,
                            tags=ground_truth_boxes(first)[2])
    expected = side_by_side(truth, draw_detections(image, [[10, 20, 40, 45]], [2], [0.9], dataset.class_names),
                            ("ground truth", "predictions"))
    drawing = cv2.cvtColor(cv2.imread(str(tmp_path / "vis" / f"00000_{Path(first['file_name']).stem}.jpg")),
                           cv2.COLOR_BGR2RGB)
    assert drawing.shape == expected.shape

    def away(other, where):  # JPEG's noise on a small noisy image: compared where the drawings differ
        return np.abs(drawing.astype(int) - other)[where].mean()
    nothing = side_by_side(truth, image, ("ground truth", "predictions"))
    drawn = (expected != nothing).any(axis=2)  # the box and its label
    assert away(expected, drawn) < 0.3 * away(nothing, drawn)
    # not its x, y, w, h read as x1, y1, x2, y2
    as_xyxy = side_by_side(truth, draw_detections(image, [[10, 20, 30, 25]], [2], [0.9], dataset.class_names),
                           ("ground truth", "predictions"))
    wrong = (as_xyxy != nothing).any(axis=2) & ~drawn
    assert away(nothing, wrong) < 0.3 * away(as_xyxy, wrong)
    # the second image has no saved detection: its right panel is the image as it is
    drawing = cv2.imread(str(tmp_path / "vis" / f"00001_{Path(second['file_name']).stem}.jpg"))
    image = read_image(second["file_name"])
    right = cv2.cvtColor(drawing, cv2.COLOR_BGR2RGB)[-image.shape[0]:, -image.shape[1]:]
    assert np.abs(right.astype(int) - image).mean() < 5  # JPEG's noise (3.4); with the box drawn: 18
    # alone (no ground truth): the detections on the image, at the threshold asked
    code, out, err = run_main(TOOLS["visualize.py"], [*args, "--score-thresh", "0.2", "--limit", "1",
                                                      "--output", tmp_path / "alone"], capsys)
    assert code == 0 and out.strip().endswith("wrote 1 image to " f"{tmp_path / 'alone'}: 2 detections drawn "
                                              "(score >= 0.2)"), (out, err)
    # --no-labels: the boxes alone (dense scenes)
    code, out, err = run_main(TOOLS["visualize.py"], [*args, "--limit", "1", "--no-labels", "--output",
                                                      tmp_path / "bare"], capsys)
    assert code == 0, err
    drawing = cv2.cvtColor(cv2.imread(str(tmp_path / "bare" / f"00000_{Path(first['file_name']).stem}.jpg")),
                           cv2.COLOR_BGR2RGB)
    image = read_image(first["file_name"])
    bare = draw_detections(image, [[10, 20, 40, 45]], [2], [0.9], dataset.class_names, labelled=False)
    labelled = draw_detections(image, [[10, 20, 40, 45]], [2], [0.9], dataset.class_names)
    label = (bare != labelled).any(axis=2)
    assert np.abs(drawing.astype(int) - bare)[label].mean() < 0.3 * np.abs(drawing.astype(int) - labelled)[label].mean()
    # results of another set: refused, not drawn as if the model had found nothing
    (tmp_path / "other.json").write_text(json.dumps(results[2:]))
    code, out, err = run_main(TOOLS["visualize.py"], [*args[:3], tmp_path / "other.json", *overrides, "--output",
                                                      tmp_path / "other"], capsys)
    assert code == 2 and "its detections are of 1 image, none of data set shapes_val's (ids 999): results of " \
        "another test set? --dataset NAME names the set they were made on" in err, err
    # a model and saved results at once: one usage line
    code, _, err = run_main(TOOLS["visualize.py"], [*args, "--weights", tmp_path / "m.pth", "--output",
                                                    tmp_path / "x"], capsys)
    assert code == 2 and "--results draws saved detections on the data set's images (with --compare, beside its " \
        "ground truth): not with --weights" in err


def test_visualize_says_when_images_reach_the_models_cap_of_detections(trained, tmp_path, capsys):
    """A dense-scene trial: a shelf of 343 objects drew exactly 100 detections (the lowest scoring
    0.81) without a word; a counting user read 100 as the count."""
    root, overrides = trained
    args = ["--config", ROOT / "configs" / "base.yaml", "--weights", root / "out" / "model_final.pth", "--input",
            root / "data" / "shapes" / "val", "--output", tmp_path / "vis", "--no-draw", *overrides,
            "model.roi_heads.detections_per_image=3"]
    code, out, err = run_main(TOOLS["visualize.py"], [*args, "--score-thresh", "0"], capsys)
    assert code == 0, err[-2000:]
    lines = [json.loads(line) for line in (tmp_path / "vis" / "detections.jsonl").read_text().splitlines()]
    assert [len(line["detections"]) for line in lines] == [3, 3, 3]
    assert "note: 3 images gave the model's cap of detections (model.roi_heads.detections_per_image=3), every one " \
        "scoring at least 0: they may hold more objects than drawn; raise it (and model.rpn.post_nms_topk_test, " \
        "the proposals they come from) for crowded images" in out
    # a threshold above each image's lowest score: each has one below it, so what is drawn is all there is
    above = max(min(d["score"] for d in line["detections"]) for line in lines) + 1e-4
    code, out, err = run_main(TOOLS["visualize.py"], [*args, "--score-thresh", f"{above:.6f}"], capsys)
    assert code == 0 and "cap of detections" not in out, out


def test_eval_and_training_say_when_the_resize_makes_most_objects_too_small_for_the_anchors(trained, tmp_path,
                                                                                            capsys, caplog):
    from detection.engine.trainer import train
    from tests.helpers import tiny_cfg

    root, overrides = trained
    code, out, err = run_main(TOOLS["eval.py"], ["--config", ROOT / "configs" / "base.yaml", "--weights",
                                                 root / "out" / "model_final.pth", "--output-dir", tmp_path / "e",
                                                 *overrides, "input.min_size_test=16"], capsys)
    assert code == 0, err[-2000:]
    assert "test set shapes_val: half its objects are under" in err and "at input.min_size_test 16, under half the " \
        "smallest anchor (model.anchors.sizes: 16)" in err, err
    code, out, err = run_main(TOOLS["eval.py"], ["--config", ROOT / "configs" / "base.yaml", "--weights",
                                                 root / "out" / "model_final.pth", "--output-dir", tmp_path / "f",
                                                 *overrides], capsys)
    assert code == 0 and "half its objects" not in err  # at the size it was trained at
    caplog.set_level("WARNING")
    caplog.clear()
    train(tiny_cfg(root / "data", tmp_path / "run", **{"solver.max_iter": 1, "input.min_size_train": [16]}))
    assert "training set shapes_train: half its objects are under" in caplog.text
    assert "test set shapes_val: half its objects" not in caplog.text  # tested at 64


def test_rescored_results_say_the_coco_max_dets_they_were_scored_at(trained, tmp_path, capsys):
    """A review: results made at COCOeval's 100 and re-scored with test.coco_max_dets=300 were
    headed with the saved config's 100 (and the reverse with 300): the heading says this scoring's."""
    root, overrides = trained
    base = ["--config", ROOT / "configs" / "base.yaml", *overrides]
    code, _, err = run_main(TOOLS["eval.py"], [*base, "--weights", root / "out" / "model_final.pth", "--output-dir",
                                               tmp_path / "a"], capsys)
    assert code == 0, err
    code, _, err = run_main(TOOLS["eval.py"], [*base, "--results", tmp_path / "a", "--output-dir", tmp_path / "b",
                                               "test.coco_max_dets=300"], capsys)
    assert code == 0, err
    assert "AR300" in json.loads((tmp_path / "b" / "shapes_val" / "metrics.json").read_text())
    section = json.loads((tmp_path / "b" / "shapes_val" / "report_section.json").read_text())
    assert section["settings"].endswith("; COCOeval counting 300 detections per image and class (test.coco_max_dets)")
    first = json.loads((tmp_path / "a" / "shapes_val" / "report_section.json").read_text())
    assert "COCOeval counting" not in first["settings"]  # COCO's own 100: not said
    # the folder of an eval.py --results keeps no copy of what it scored: visualize.py --results says which to give
    code, _, err = run_main(TOOLS["visualize.py"], [*base, "--results", tmp_path / "b", "--output", tmp_path / "v"],
                            capsys)
    assert code == 2 and f"{tmp_path / 'b'}: the folder of an evaluation of saved results, which keeps no copy of " \
        f"them: give the results it scored, {tmp_path / 'a'}" in err, err
    # a folder of comp4 files given for a COCO-type set: which it holds and what to give
    (tmp_path / "comp4").mkdir()
    (tmp_path / "comp4" / "comp4_det_test_circle.txt").write_text("")
    code, _, err = run_main(TOOLS["eval.py"], [*base, "--results", tmp_path / "comp4", "--output-dir",
                                               tmp_path / "c"], capsys)
    assert code == 2 and f"{tmp_path / 'comp4'}: a folder without coco_results.json (it holds VOC comp4 files), and " \
        "the test set of folder 'shapes_val' is COCO-type" in err, err


def test_visualize_stops_with_an_error_when_its_output_cannot_be_written(trained, tmp_path, capsys, monkeypatch):
    """A file-system trial: a read-only or full output folder was counted with the unreadable
    inputs, so skip_bad_images made it "wrote 0 images ... 25 detections drawn", exit 0."""
    import contextlib
    import errno

    import detection.visualization.draw
    from detection.utils.files import WriteError

    @contextlib.contextmanager
    def full_disk(path, *args, **kwargs):
        raise WriteError(f"could not write {path} (No space left on device); nothing was written", errno.ENOSPC,
                         "No space left on device")
        yield

    root, overrides = trained
    monkeypatch.setattr(detection.visualization.draw, "atomic_write", full_disk)
    code, out, err = run_main(TOOLS["visualize.py"], ["--config", ROOT / "configs" / "base.yaml", "--weights",
                                                      root / "out" / "model_final.pth", "--input",
                                                      root / "data" / "shapes" / "val", "--output", tmp_path / "vis",
                                                      *overrides, "dataloader.skip_bad_images=true"], capsys)
    assert code == 75 and "wrote" not in out  # a full disk: try again later
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: wrote 0 images to {tmp_path / 'vis'}: 0 detections drawn") and \
        "3 of the 3 images were not drawn: " \
        f"could not write {tmp_path / 'vis'}/00000_" in last and \
        last.endswith("(the folder is not writable, or the disk is full)"), last
    monkeypatch.undo()
    # detections.jsonl itself on a read-only folder, or a disk full under it: one line, not an OSError
    # traceback (a trial: at its unlink, or at the flush after some lines)
    base = ["--config", ROOT / "configs" / "base.yaml", "--weights", root / "out" / "model_final.pth", "--input",
            root / "data" / "shapes" / "val", *overrides]
    real_unlink, real_open = Path.unlink, open

    def read_only(path, missing_ok=False):
        if path.name == "detections.jsonl":
            raise OSError(errno.EROFS, "Read-only file system")
        return real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", read_only)
    code, out, err = run_main(TOOLS["visualize.py"], [*base, "--output", tmp_path / "ro"], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: could not create {tmp_path / 'ro' / 'detections.jsonl'}: Read-only file system (the folder is not "
        "writable, or the disk is full); the lines written before are kept") and "Traceback" not in err
    monkeypatch.undo()

    class FullAfterOneLine:
        def __init__(self, f):
            self.f, self.lines = f, 0

        def write(self, text):
            self.lines += 1
            if self.lines > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(TOOLS["visualize.py"], "open", lambda *a, **k: FullAfterOneLine(real_open(*a, **k)),
                        raising=False)
    code, out, err = run_main(TOOLS["visualize.py"], [*base, "--output", tmp_path / "full", "--no-draw"], capsys)
    assert code == 75 and "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        f"error: could not write to {tmp_path / 'full' / 'detections.jsonl'}: No space left on device")
    assert len((tmp_path / "full" / "detections.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_visualize_gt_with_a_limit_checks_only_the_images_it_draws(trained, tmp_path, capsys):
    """--gt --limit 2 read every header of the set first (about 20 s on COCO's 118k training
    images): now only the two drawn are checked, so a missing image past the limit does not stop
    it, and one within the limit is still one error naming it."""
    import shutil

    root, overrides = trained
    shutil.copytree(root / "data", tmp_path / "data")
    val = tmp_path / "data" / "shapes" / "val"
    names = sorted(p.name for p in val.iterdir())
    (val / names[-1]).unlink()
    args = ["--config", ROOT / "configs" / "base.yaml", "--gt", "--output", tmp_path / "gt", *overrides,
            f"datasets.root={tmp_path / 'data'}"]
    code, out, err = run_main(TOOLS["visualize.py"], [*args, "--limit", "2"], capsys)
    assert code == 0, err[-2000:]
    assert sorted(p.name for p in (tmp_path / "gt").iterdir()) == [f"0000{i}_{Path(n).stem}.jpg"
                                                                   for i, n in enumerate(names[:2])]
    code, _, err = run_main(TOOLS["visualize.py"], [*args, "--limit", "3"], capsys)
    assert code == 2 and "1 of 3 images" in err and names[-1] in err, err[-2000:]


def test_visualize_names_the_earlier_runs_drawings_it_did_not_draw_over(trained, tmp_path, capsys):
    """A second run into the same --output with fewer images left the first run's extra drawings
    among its own, unmarked (a rerun with other weights looked like it drew them): a note now names
    them. They stay (the user's files are not removed), and the user's own files are not named."""
    root, overrides = trained
    out = tmp_path / "drawn"
    args = ["--config", ROOT / "configs" / "base.yaml", "--gt", "--output", out, *overrides]
    code, stdout, err = run_main(TOOLS["visualize.py"], [*args, "--limit", "3"], capsys)
    assert code == 0 and "already holds" not in stdout, err[-2000:]
    first = sorted(p.name for p in out.iterdir())
    assert len(first) == 3
    (out / "holiday.jpg").write_bytes(b"the user's own")
    (out / "notes.txt").write_text("mine")
    code, stdout, err = run_main(TOOLS["visualize.py"], [*args, "--limit", "1"], capsys)
    assert code == 0, err[-2000:]
    note = [line for line in stdout.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "already holds 2 drawings" in note[0], stdout
    assert first[1] in note[0] and first[2] in note[0] and first[0] not in note[0], note
    assert "holiday.jpg" not in note[0] and "notes.txt" not in note[0]
    assert sorted(p.name for p in out.iterdir()) == sorted([*first, "holiday.jpg", "notes.txt"])
    code, stdout, err = run_main(TOOLS["visualize.py"], [*args, "--limit", "3"], capsys)
    assert code == 0 and "already holds" not in stdout, stdout  # drawn over: nothing earlier is left


@pytest.mark.slow
def test_visualize_dataset_takes_a_test_sets_name_or_a_yaml_entry(trained, tmp_path, capsys):
    """--dataset took known names only: the `name:` of a configured test set, or an entry written
    as YAML, were 'unknown data set name' though the error offered 'a mapping'; so was the name
    eval.py prints for an unnamed entry (coco:instances_val, a contributor trial)."""
    root, overrides = trained
    shapes = root / "data" / "shapes"
    entry = f"{{name: my val, type: coco, ann_file: {shapes / 'annotations' / 'instances_val.json'}, " \
            f"image_root: {shapes / 'val'}}}"
    base = ["--config", ROOT / "configs" / "base.yaml", "--gt", "--limit", "1", *overrides]
    unnamed = entry.replace("name: my val, ", "")  # printed as coco:instances_val (eval.py, training)
    train_entry = f"{{type: coco, ann_file: {shapes / 'annotations' / 'instances_train.json'}, " \
                  f"image_root: {shapes / 'train'}}}"
    # ... and a training set's, as training prints it (a curator's trial: "unknown data set name")
    for case, (given, extra) in enumerate((("my val", [f"datasets.test=[{entry}]"]), (entry, []),
                                           ("coco:instances_val", [f"datasets.test=[{unnamed}]"]),
                                           ("coco:instances_train", [f"datasets.train=[{train_entry}]"]))):
        out_dir = tmp_path / str(case)
        code, out, err = run_main(TOOLS["visualize.py"], [*base, *extra, "--dataset", given, "--output", out_dir],
                                  capsys)
        assert code == 0, err[-2000:]
        assert len(list(out_dir.iterdir())) == 1
    code, _, err = run_main(TOOLS["visualize.py"], [*base, "--dataset", "{type: coco", "--output", tmp_path / "x"],
                            capsys)
    assert code == 2 and "--dataset '{type: coco': not a YAML mapping" in err


@pytest.mark.slow
def test_visualize_never_draws_over_the_photos_and_says_what_it_could_not_write(trained, tmp_path, capsys):
    """--output the input folder could replace a photo named like a drawing (00001_b.jpg); a drawing
    OpenCV could not write (cv2.imwrite returns False, no exception) was counted as written; a long
    name pushed past 255 bytes by the NNNNN_ prefix was one of those."""
    import shutil

    root, overrides = trained
    photos = tmp_path / "photos"
    shutil.copytree(root / "data" / "shapes" / "val", photos)
    first = sorted(photos.iterdir())[0]
    long_name = photos / ("L" * 250 + ".jpg")
    shutil.copy(first, long_name)
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    base = ["--config", ROOT / "configs" / "base.yaml", "--weights", root / "out" / "model_final.pth", *overrides]
    code, _, err = run_main(TOOLS["visualize.py"], [*base, "--input", photos, "--output", photos], capsys)
    assert code == 2 and "the images drawn are in that folder, and the drawings could replace them" in err
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before
    code, _, err = run_main(TOOLS["visualize.py"], [*base, "--input", photos, "--output", tmp_path / "vis"],
                            capsys)
    assert code == 0, err[-2000:]
    assert f"00000_{'L' * 200}.jpg" in {p.name for p in (tmp_path / "vis").iterdir()}
    blocked = tmp_path / "vis2" / f"00001_{sorted(p.stem for p in photos.iterdir())[1]}.jpg"
    blocked.mkdir(parents=True)  # OpenCV cannot write there: imwrite returns False
    code, _, err = run_main(TOOLS["visualize.py"], [*base, "--input", photos, "--output", tmp_path / "vis2"],
                            capsys)
    assert code == 2 and f"could not write {blocked}" in err and f"1 of the {len(before)} images were not drawn" in err
    # a link where a drawing goes is replaced, not written through (it overwrote the file it named)
    victim = tmp_path / "victim.txt"
    victim.write_text("someone's file")
    linked = tmp_path / "vis3" / blocked.name
    linked.parent.mkdir()
    linked.symlink_to(victim)
    code, _, err = run_main(TOOLS["visualize.py"], [*base, "--input", photos, "--output", tmp_path / "vis3"],
                            capsys)
    assert code == 0, err[-2000:]
    assert victim.read_text() == "someone's file" and not linked.is_symlink()
    assert linked.read_bytes()[:2] == b"\xff\xd8" and not list((tmp_path / "vis3").glob(".*.tmp"))  # a JPEG, whole
    (tmp_path / "vis_file").write_text("not a folder")
    code, _, err = run_main(TOOLS["visualize.py"], [*base, "--input", photos, "--output", tmp_path / "vis_file"],
                            capsys)
    assert code == 2 and "cannot create the folder" in err and "Traceback" not in err


def test_visualize_input_folder_names_images_in_its_subfolders_and_globs_reach_them(tmp_path, capsys):
    """A user's folder of photos with a subfolder: the folder's own images are drawn and a note
    names one image below it (no silent skip); "DIR/**/*" reaches them; a folder whose images
    are all in subfolders is one error saying where they are."""
    find_images = TOOLS["visualize.py"].find_images
    photos = tmp_path / "photos"
    (photos / "2024" / "june").mkdir(parents=True)
    for name in ("b.jpg", "a.PNG", "notes.txt", "2024/c.jpg", "2024/june/d.jpeg"):
        (photos / name).write_bytes(b"x")
    assert find_images(str(photos)) == [photos / "a.PNG", photos / "b.jpg"]
    subfolders, left_out = capsys.readouterr().out.splitlines()
    assert str(photos / "2024" / "c.jpg") in subfolders and f"'{photos / '**' / '*'}'" in subfolders
    assert f"1 file left out, not named as images ({photos / 'notes.txt'})" in left_out
    assert find_images(str(photos / "**" / "*")) == [photos / "2024" / "c.jpg", photos / "2024" / "june" / "d.jpeg",
                                                     photos / "a.PNG", photos / "b.jpg"]
    assert "1 file left out" in capsys.readouterr().out
    assert find_images(str(photos / "*.jpg")) == [photos / "b.jpg"] and capsys.readouterr().out == ""
    from detection.data import DataError
    scans = tmp_path / "scans"
    (scans / "box1").mkdir(parents=True)
    (scans / "box1" / "e.tif").write_bytes(b"x")
    with pytest.raises(DataError, match=r"no images found.*subfolders hold images \(e\.g\. .*e\.tif\)"):
        find_images(str(scans))
    with pytest.raises(DataError, match=r"no images found \(expected an image, a folder or a glob\)$"):
        find_images(str(photos / "2024" / "june" / "nothing"))


def test_visualize_folder_and_glob_take_the_same_entries_and_name_what_they_leave_out(tmp_path, capsys):
    """An own-photos trial: a folder dropped .jfif and .gif files OpenCV reads (Windows saves web
    JPEGs as .jfif) and a broken link without a word, where a glob listed them; a glob listed a
    folder named x.jpg as an image that failed. Both take the same entries now, and say what
    they leave out."""
    find_images = TOOLS["visualize.py"].find_images
    photos = tmp_path / "photos"
    (photos / "x.jpg").mkdir(parents=True)  # a folder with an image's name
    for name in ("a.jfif", "b.gif", "c.jpe", "d.heic", "e.JPG", "f.pgm"):  # .pgm: an industrial camera's
        (photos / name).write_bytes(b"x")
    (photos / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    images = [photos / name for name in ("a.jfif", "b.gif", "c.jpe", "e.JPG", "f.pgm", "gone.jpg")]
    assert find_images(str(photos)) == images
    assert f"1 file left out, not named as images ({photos / 'd.heic'})" in capsys.readouterr().out
    assert find_images(str(photos / "*")) == images
    (photos / "a.jfif").unlink()
    for name in ("b.gif", "c.jpe", "e.JPG", "f.pgm", "gone.jpg"):
        (photos / name).unlink()
    from detection.data import DataError
    with pytest.raises(DataError, match=r"no images found .*; 1 file left out, not named as images \(.*d\.heic\)"):
        find_images(str(photos))

@pytest.mark.slow  # runs a model over a folder, twice
def test_visualize_lists_the_detections_it_draws_in_a_jsonl_file_and_no_draw_writes_only_that(trained, tmp_path,
                                                                                             capsys):
    """A batch-inference trial: nothing wrote the detections of unlabelled images for another
    program (drawings only), nor mapped a drawing back to its input."""
    import shutil

    from detection.predictor import Predictor

    root, overrides = trained
    photos = tmp_path / "photos"
    shutil.copytree(root / "data" / "shapes" / "val", photos)
    (photos / "broken.jpg").write_bytes(b"not an image")
    base = ["--config", ROOT / "configs" / "base.yaml", "--weights", root / "out" / "model_final.pth",
            "--input", photos, "--score-thresh", "0.0", *overrides, "dataloader.skip_bad_images=true"]
    code, out, err = run_main(TOOLS["visualize.py"], [*base, "--output", tmp_path / "vis"], capsys)
    assert code == 0, err[-2000:]
    assert f"their detections in {tmp_path / 'vis' / 'detections.jsonl'}" in out
    lines = [json.loads(line) for line in (tmp_path / "vis" / "detections.jsonl").read_text().splitlines()]
    images = sorted(p for p in photos.iterdir())
    assert [line["image"] for line in lines] == [str(p) for p in images]  # one line per input, in order
    assert lines[0]["error"].startswith(f"could not read image {photos / 'broken.jpg'}")
    predictor = Predictor(load_config(ROOT / "configs" / "base.yaml", overrides),
                          weights=root / "out" / "model_final.pth")
    for line in lines[1:]:
        assert (tmp_path / "vis" / line["drawing"]).is_file()
        expected = predictor(line["image"])  # the same model and settings: the same detections
        assert [d["score"] for d in line["detections"]] == pytest.approx(expected["scores"].tolist(), abs=1e-6)
        assert [v for d in line["detections"] for v in d["box"]] == pytest.approx(
            expected["boxes"].flatten().tolist(), abs=0.01)
        assert [d["class"] for d in line["detections"]] == [predictor.class_names[k - 1] for k in expected["labels"]]
        assert [line["height"], line["width"]] == list(cv2.imread(line["image"]).shape[:2])
    code, out, err = run_main(TOOLS["visualize.py"], [*base, "--output", tmp_path / "listed", "--no-draw"], capsys)
    assert code == 0, err[-2000:]
    assert sorted(p.name for p in (tmp_path / "listed").iterdir()) == ["detections.jsonl", "detections.source.json"]
    again = [json.loads(line) for line in (tmp_path / "listed" / "detections.jsonl").read_text().splitlines()]
    assert [{**line, "drawing": None} if "drawing" in line else line for line in lines] == again
    assert f"listed the detections of {len(images) - 1} images in {tmp_path / 'listed' / 'detections.jsonl'}" in out
    # the list as a training json (tools/pseudo_labels.py): the model's classes, every detection a box
    source = json.loads((tmp_path / "listed" / "detections.source.json").read_text())
    assert source["class_names"] == predictor.class_names
    assert source["finished"] is True and source["images"] == len(images)  # a whole list
    code, out, err = run_main(load_tool("pseudo_labels"), [tmp_path / "listed" / "detections.jsonl", "--output",
                                                           tmp_path / "pseudo.json"], capsys)
    assert code == 0, err[-2000:]
    from detection.data.catalog import get_dataset
    pseudo = get_dataset({"type": "coco", "name": "pseudo", "ann_file": str(tmp_path / "pseudo.json"),
                          "image_root": str(photos)}, str(tmp_path), check_images=True)
    assert [r["file_name"] for r in pseudo.records] == [line["image"] for line in again[1:]]
    for record, line in zip(pseudo.records, again[1:]):
        np.testing.assert_allclose(record["boxes"], [d["box"] for d in line["detections"]], atol=1e-4)
    # a file name that is not UTF-8 (an old archive's Latin-1 "café") stopped the run with a traceback
    latin = tmp_path / "latin"
    latin.mkdir()
    for name in (b"a.jpg", b"caf\xe9.jpg", b"z.jpg"):
        shutil.copy(images[1], os.path.join(os.fsencode(latin), name))
    code, out, err = run_main(TOOLS["visualize.py"], [*base[:4], "--input", latin, *base[6:], "--output",
                                                      tmp_path / "latin_vis"], capsys)
    assert code == 0, err[-2000:]
    assert sorted(p.name for p in (tmp_path / "latin_vis").iterdir()) == [
        "00000_a.jpg", "00001_caf\ufffd.jpg", "00002_z.jpg", "detections.jsonl", "detections.source.json"]
    names = [os.fsencode(json.loads(line)["image"]) for line in (tmp_path / "latin_vis" / "detections.jsonl")
             .read_text(encoding="utf-8").splitlines()]
    assert names == [os.path.join(os.fsencode(latin), name) for name in (b"a.jpg", b"caf\xe9.jpg", b"z.jpg")]
    # nothing drawn: the images' own folder may take the list (a drawing could replace a photo)
    code, _, err = run_main(TOOLS["visualize.py"], [*base[:4], "--input", latin, *base[6:], "--output", latin,
                                                    "--no-draw"], capsys)
    assert code == 0 and (latin / "detections.jsonl").is_file(), err[-2000:]


def test_visualize_takes_each_image_once_through_folder_links_and_survives_link_loops(tmp_path, capsys):
    """A batch-inference trial: a link back up a tree (cam2/day0/loop -> ../..) made a "**" glob
    list every image about 41 times (each drawn again under another NNNNN_ name, a 31-minute job
    21 hours); two file links naming each other stopped the run with a RuntimeError traceback."""
    visualize = TOOLS["visualize.py"]
    tree = tmp_path / "imgs"
    (tree / "a" / "b").mkdir(parents=True)
    for name in ("a/x.jpg", "a/b/y.jpg"):
        (tree / name).write_bytes(b"x")
    (tree / "a" / "b" / "loop").symlink_to("../..")
    (tree / "a" / "l1.jpg").symlink_to("l2.jpg")
    (tree / "a" / "l2.jpg").symlink_to("l1.jpg")
    found = visualize.find_images(str(tree / "**" / "*"))
    assert found == [tree / "a" / "b" / "y.jpg", tree / "a" / "l1.jpg", tree / "a" / "l2.jpg", tree / "a" / "x.jpg"]
    assert "paths name images already listed (through links to folders: " in capsys.readouterr().out
    assert visualize.output_folder(str(tmp_path / "out"), [str(p) for p in found]) == tmp_path / "out"
    from detection.data import DataError, read_image
    with pytest.raises(DataError, match=r"image file not found: .*l1.jpg \(a link to l2.jpg in a loop of links "
                                        r"that never reaches a file\)"):
        read_image(str(tree / "a" / "l1.jpg"))


def test_visualize_says_its_input_has_no_images_before_loading_the_model(tmp_path, monkeypatch, capsys):
    """A trial: a folder of subfolders was said to hold no images only after the model had loaded
    (seconds to minutes, with its messages first)."""
    import detection.engine.inference_model

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before --input was checked")

    monkeypatch.setattr(detection.engine.inference_model, "build_inference_model", loaded)
    (tmp_path / "photos" / "june").mkdir(parents=True)
    (tmp_path / "photos" / "june" / "a.jpg").write_bytes(b"x")
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"x")
    code, _, err = run_main(load_tool("visualize"), ["--config", str(ROOT / "configs" / "shapes_r18.yaml"),
                                                     "--weights", str(weights), "--input", str(tmp_path / "photos"),
                                                     "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and "no images found" in err and "subfolders hold images" in err


def test_visualize_class_names_come_from_the_checkpoint_then_the_data_then_numbers(tmp_path):
    tool = load_tool("visualize")
    data = tmp_path / "data"
    generate_shapes(data / "shapes", num_train=2, num_val=1, seed=0, image_size=(64, 80))
    cfg = load_config(None, tiny_overrides(data, tmp_path / "out"))
    saved = SimpleNamespace(class_names=["cat", "dog", "cow"], path="ckpt.pth")
    assert tool.class_names_to_draw(cfg, saved) == ["cat", "dog", "cow"]
    detectron2 = SimpleNamespace(class_names=None, path="model_final_721ade.pkl")  # names not saved
    assert tool.class_names_to_draw(cfg, detectron2) == ["circle", "square", "triangle"]  # shapes_val's names
    cfg.datasets.root = str(tmp_path / "nowhere")
    assert tool.class_names_to_draw(cfg, detectron2) == ["class 1", "class 2", "class 3"]
    cfg.model.class_names = ["a", "b", "c"]
    assert tool.class_names_to_draw(cfg, detectron2) == ["a", "b", "c"]


@pytest.mark.slow
def test_eval_and_visualize_with_test_time_augmentation(trained, tmp_path, run):
    root, overrides = trained
    weights = str(root / "out" / "model_final.pth")

    def results(name, *aug):
        out, _ = run("eval.py", "--weights", weights, "--output-dir", str(tmp_path / name), *overrides, *aug)
        assert ("test-time augmentation" in out) == bool(aug)   # the table says how it was made
        return json.loads((tmp_path / name / "shapes_val" / "coco_results.json").read_text())

    plain = results("plain")
    # one pass at the test size, unmirrored: exactly the plain model's detections
    assert results("one", "test.aug.enabled=true", "test.aug.min_sizes=[64]", "test.aug.max_size=96",
                   "test.aug.flip=false") == plain
    tta = results("tta", "test.aug.enabled=true", "test.aug.min_sizes=[64,80]", "test.aug.max_size=120")
    assert tta != plain
    # the metrics are those of the merged detections: pycocotools on the written file agrees
    metrics = json.loads((tmp_path / "tta" / "shapes_val" / "metrics.json").read_text())
    gt = COCO(str(root / "data" / "shapes" / "annotations" / "instances_val.json"))
    ev = COCOeval(gt, gt.loadRes(tta), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert metrics["AP50"] == pytest.approx(100 * ev.stats[1], abs=1e-6)
    assert metrics["AP"] == pytest.approx(100 * ev.stats[0], abs=1e-6)
    per_image = [sum(r["image_id"] == i for r in tta) for i in {r["image_id"] for r in tta}]
    assert max(per_image) <= 100   # merged down to detections_per_image
    run("visualize.py", "--weights", weights, "--compare", "--output", str(tmp_path / "vis"), "--limit", "1",
        *overrides, "test.aug.enabled=true", "test.aug.min_sizes=[64,80]")
    assert len(list((tmp_path / "vis").glob("*.jpg"))) == 1


@pytest.mark.slow
def test_eval_and_visualize_take_the_config_saved_beside_the_checkpoint(trained, tmp_path, run):
    """--weights output/x/model_final.pth without --config: training's config.yaml there, with
    the command line's overrides applied on top."""
    root, _ = trained
    weights = str(root / "out" / "model_final.pth")
    assert (root / "out" / "config.yaml").is_file()

    def tool(name, *args):
        out, _ = run(name, "--weights", weights, *args, config=False)
        assert f"config: {root / 'out' / 'config.yaml'} (saved beside the checkpoint)" in out
        return out

    # the saved config has score_thresh_test 0 and 100 detections per image: one each, so the override applied
    tool("eval.py", "--output-dir", str(tmp_path / "one"), "model.roi_heads.detections_per_image=1")
    one = json.loads((tmp_path / "one" / "shapes_val" / "coco_results.json").read_text())
    assert len(one) == len({r["image_id"] for r in one}) == 3
    tool("visualize.py", "--compare", "--output", str(tmp_path / "cmp"), "--limit", "1")
    assert len(list((tmp_path / "cmp").glob("*.jpg"))) == 1


def test_config_is_required_without_one_beside_the_checkpoint(tmp_path, capsys):
    # a checkpoint path that names no file: that is the mistake to name (it said "there is no config.yaml")
    with pytest.raises(SystemExit) as exit_info:
        load_tool("eval").parse_args(["--weights", str(tmp_path / "modle_final.pth")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--weights {tmp_path / 'modle_final.pth'}: file not found" in err and "config.yaml" not in err
    (tmp_path / "model_final.pth").write_bytes(b"")
    for name, extra in (("eval", []), ("visualize", ["--output", str(tmp_path / "vis"), "--compare"])):
        with pytest.raises(SystemExit) as exit_info:
            load_tool(name).parse_args(["--weights", str(tmp_path / "model_final.pth"), *extra])
        assert exit_info.value.code == 2
        assert f"--config is required unless --weights has the config.yaml of its training beside it: there is " \
               f"no {tmp_path / 'config.yaml'}" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("model: {num_classes: 3}\n")
    args = load_tool("eval").parse_args(["--weights", str(tmp_path / "model_final.pth"), "input.min_size_test=64"])
    assert args.config == str(tmp_path / "config.yaml") and args.overrides == ["input.min_size_test=64"]
    # a link to a run's checkpoint (best.pth -> run/model_final.pth) finds the config beside the file it names
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "best.pth").symlink_to(tmp_path / "model_final.pth")
    assert load_tool("eval").parse_args(["--weights", str(tmp_path / "links" / "best.pth")]).config == \
        str(tmp_path / "config.yaml")
    with pytest.raises(SystemExit):  # --results has no checkpoint to look beside
        load_tool("eval").parse_args(["--results", str(tmp_path)])
    # every other tool still requires --config
    for name, extra in (("train_det", []), ("export", ["--output", "m.onnx"]), ("ablate", []),
                        ("benchmark", [])):
        with pytest.raises(SystemExit) as exit_info:
            load_tool(name).parse_args(["--weights", str(tmp_path / "model_final.pth"), *extra])
        assert exit_info.value.code == 2 and "--config" in capsys.readouterr().err


def test_visualize_train_batches_draws_what_the_training_loader_gives(tmp_path, capsys):
    """Detectron2's visualize_data.py --source dataloader: the images and target boxes training
    gets, after the resize, the flip and the jitter (a helper's trial had to read the trainer to
    find them). training_samples gives the loader's own batches (2 workers), and the tool draws
    them: one file per image, named after its source, at the size the model gets."""
    import torch

    from detection.data.loader import training_samples
    from detection.engine.startup import build_train_data_loader, build_train_datasets

    generate_shapes(tmp_path / "data" / "shapes", num_train=6, num_val=2, seed=1, image_size=(64, 80))
    overrides = tiny_overrides(tmp_path / "data", tmp_path / "out", **{
        "input.hflip_prob": 0.5, "input.jitter": True, "input.min_size_train": [48, 64, 80],
        "solver.ims_per_batch": 2, "dataloader.num_workers": 2})
    cfg = load_config(ROOT / "configs" / "base.yaml", overrides)
    datasets = build_train_datasets(cfg)
    loaded = iter(build_train_data_loader(cfg, datasets))
    samples = list(training_samples(build_train_data_loader(cfg, datasets), 3))
    assert [number for number, *_ in samples] == [0, 0, 1, 1, 2, 2]
    for number in range(3):
        images, targets = next(loaded)
        ours = [s for s in samples if s[0] == number]
        for image, target, (_, sample_image, sample_target, _) in zip(images, targets, ours):
            assert torch.equal(image, sample_image)
            assert torch.equal(target["boxes"], sample_target["boxes"])
            assert torch.equal(target["labels"], sample_target["labels"])
    code, out, err = run_main(TOOLS["visualize.py"], ["--config", ROOT / "configs" / "base.yaml", *overrides,
                                                      "--train-batches", "3", "--output", tmp_path / "vis"], capsys)
    assert code == 0, err
    assert "wrote 6 images" in out and "the first 3 training batches of 2" in out
    drawn = sorted((tmp_path / "vis").iterdir())
    assert [p.name for p in drawn] == [f"{i:05d}_{Path(s[3]['file_name']).stem}.jpg" for i, s in enumerate(samples)]
    for path, (_, image, _, _) in zip(drawn, samples):
        assert cv2.imread(str(path)).shape[:2] == tuple(image.shape[1:])
    code, out, err = run_main(TOOLS["visualize.py"], ["--config", ROOT / "configs" / "base.yaml", *overrides,
                                                      "--train-batches", "2", "--output", tmp_path / "vis"], capsys)
    assert code == 0 and f"already holds 2 drawings this run did not draw over ({drawn[4].name}, " \
                         f"{drawn[5].name})" in out, out  # batch 3's, from the run before
    code, _, err = run_main(TOOLS["visualize.py"], ["--config", ROOT / "configs" / "base.yaml", *overrides,
                                                    "--train-batches", "1", "--gt", "--output", tmp_path / "v"], capsys)
    assert code == 2 and "not with --gt" in err


@pytest.mark.slow
def test_visualize_draws_a_video_frame_by_frame_and_lists_each_frames_detections(trained, tmp_path, capsys):
    """Detectron2's demo takes --video-input; visualize.py took a video for an image it could not
    read. Each frame's detections are the Predictor's on that frame (decoded here by OpenCV
    itself), the drawn video has the input's frames, size and rate."""
    from detection.predictor import Predictor

    root, overrides = trained
    frames = [cv2.resize(cv2.imread(str(p)), (80, 64)) for p in sorted((root / "data" / "shapes" / "val").iterdir())]
    clip = tmp_path / "in" / "clip.mp4"
    clip.parent.mkdir()
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 4, (80, 64))
    for frame in frames:
        writer.write(frame)
    writer.release()
    base = ["--config", ROOT / "configs" / "base.yaml", "--weights", root / "out" / "model_final.pth",
            "--input", clip, "--score-thresh", "0.0", *overrides]
    code, out, err = run_main(TOOLS["visualize.py"], [*base, "--output", tmp_path / "vis"], capsys)
    assert code == 0, err[-2000:]
    assert f"wrote {tmp_path / 'vis' / 'clip.mp4'} ({len(frames)} frames): " in out
    lines = [json.loads(line) for line in (tmp_path / "vis" / "detections.jsonl").read_text().splitlines()]
    assert [(line["frame"], line["time"], line["drawing"]) for line in lines] == [
        (i, i / 4, "clip.mp4") for i in range(len(frames))]
    predictor = Predictor(load_config(ROOT / "configs" / "base.yaml", overrides),
                          weights=root / "out" / "model_final.pth")
    decoded = cv2.VideoCapture(str(clip))
    for line in lines:
        ok, bgr = decoded.read()
        expected = predictor(np.ascontiguousarray(bgr[:, :, ::-1]))
        assert [d["score"] for d in line["detections"]] == pytest.approx(expected["scores"].tolist(), abs=1e-6)
        assert [v for d in line["detections"] for v in d["box"]] == pytest.approx(
            expected["boxes"].flatten().tolist(), abs=0.01)
        assert (line["width"], line["height"]) == (80, 64)
    assert any(line["detections"] for line in lines)
    drawn = cv2.VideoCapture(str(tmp_path / "vis" / "clip.mp4"))
    assert (drawn.get(cv2.CAP_PROP_FRAME_COUNT), drawn.get(cv2.CAP_PROP_FPS)) == (len(frames), 4)
    assert (drawn.get(cv2.CAP_PROP_FRAME_WIDTH), drawn.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (80, 64)
    # --no-draw and --limit: the first two frames' lines alone
    code, out, err = run_main(TOOLS["visualize.py"], [*base, "--output", tmp_path / "listed", "--no-draw",
                                                      "--limit", "2"], capsys)
    assert code == 0, err[-2000:]
    assert sorted(p.name for p in (tmp_path / "listed").iterdir()) == ["detections.jsonl"]
    listed = [json.loads(line) for line in (tmp_path / "listed" / "detections.jsonl").read_text().splitlines()]
    assert listed == [{**line, "drawing": None} for line in lines[:2]]
    # --output NAME.mp4: that file, its list beside it (Detectron2's demo --output takes a file)
    code, out, err = run_main(TOOLS["visualize.py"], [*base, "--output", tmp_path / "named.mp4", "--limit", "1"],
                              capsys)
    assert code == 0, err[-2000:]
    assert f"wrote {tmp_path / 'named.mp4'} (1 frame): " in out and (tmp_path / "named.mp4").is_file()
    assert [json.loads(x) for x in (tmp_path / "named.jsonl").read_text().splitlines()] == [
        {**lines[0], "drawing": "named.mp4"}]
    code, out, err = run_main(TOOLS["visualize.py"], [*base, "--output", clip], capsys)
    assert code == 2 and "is the input video: give another name" in err and clip.stat().st_size > 0
    # the folder the video is in: the drawn video would replace it
    code, out, err = run_main(TOOLS["visualize.py"], [*base, "--output", clip.parent], capsys)
    assert code == 2 and "the video drawn is in that folder" in err and clip.stat().st_size > 0
    # in a folder a video is not an image: named, with how to draw it
    code, out, err = run_main(TOOLS["visualize.py"], [*base[:-len(overrides) - 4], "--input", clip.parent,
                                                      "--output", tmp_path / "x", *overrides], capsys)
    assert code == 2 and f"a video is drawn when --input names it: --input {clip}" in err
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video" * 100)
    code, out, err = run_main(TOOLS["visualize.py"], [*base[:-len(overrides) - 4], "--input", broken,
                                                      "--output", tmp_path / "y", *overrides], capsys)
    assert code == 2 and f"could not read video {broken}" in err


@pytest.mark.slow
def test_visualize_resume_goes_on_from_a_killed_runs_list(trained, tmp_path, capsys, monkeypatch):
    """A batch of unlabelled images killed at 80% started again from the first image (README's "not
    yet done"). --resume takes the images its list holds (and whose drawing is there) as they were,
    does the others, and refuses a list made with other weights or settings."""
    import shutil

    root, overrides = trained
    photos = tmp_path / "photos"
    shutil.copytree(root / "data" / "shapes" / "val", photos)
    base = ["--config", ROOT / "configs" / "base.yaml", "--weights", root / "out" / "model_final.pth",
            "--input", photos, "--score-thresh", "0.0", "--output", tmp_path / "vis", *overrides]
    code, out, err = run_main(TOOLS["visualize.py"], base, capsys)
    assert code == 0, err[-2000:]
    listed = tmp_path / "vis" / "detections.jsonl"
    whole = listed.read_text()
    lines = whole.splitlines()
    assert len(lines) == 3
    # as a kill leaves it: two lines written, the second cut short; the third image's drawing not yet there
    listed.write_text(lines[0] + "\n" + lines[1][:40])
    third = tmp_path / "vis" / json.loads(lines[2])["drawing"]
    third.unlink()
    drawn = []
    real_draw = TOOLS["visualize.py"]._draw
    monkeypatch.setattr(TOOLS["visualize.py"], "_draw", lambda path, *a, **k: drawn.append(Path(path).name) or
                        real_draw(path, *a, **k))
    code, out, err = run_main(TOOLS["visualize.py"], [*base, "--resume"], capsys)
    assert code == 0, err[-2000:]
    assert drawn == [json.loads(lines[1])["image"].rsplit("/", 1)[1], third.name.split("_", 1)[1]]  # not the first
    assert f"--resume: 1 of the 3 images taken from the earlier run's {listed}" in out
    assert listed.read_text() == whole and third.is_file()  # the list a whole run writes
    # a new image sorting first: every drawing's name (its position) moves, so none is taken as it was
    # (a review: a resumed line named a drawing the new order gave to another image)
    shutil.copy(photos / "val_000000.jpg", photos / "a_first.jpg")
    code, out, err = run_main(TOOLS["visualize.py"], [*base, "--resume"], capsys)
    assert code == 0 and "--resume: 0 of the 4 images taken" in out, err[-2000:]
    for i, line in enumerate(map(json.loads, listed.read_text().splitlines())):
        assert line["drawing"] == f"{i:05d}_{Path(line['image']).stem}.jpg"
    (photos / "a_first.jpg").unlink()
    code, out, err = run_main(TOOLS["visualize.py"], [*base], capsys)  # the three again, for what follows
    assert code == 0 and listed.read_text() == whole
    # a stop midway (Ctrl-C; SIGTERM alike): the list says so, and pseudo_labels.py refuses it (a trial's
    # killed run became a json of a third of the images, without a word); --resume finishes it
    last = Path(json.loads(lines[2])["image"]).name

    def stopped_at_the_last(path, *a, **k):
        if Path(path).name == last:
            raise KeyboardInterrupt
        return real_draw(path, *a, **k)

    monkeypatch.setattr(TOOLS["visualize.py"], "_draw", stopped_at_the_last)
    code, out, err = run_main(TOOLS["visualize.py"], [*base, "--output", tmp_path / "stopped"], capsys)
    assert code == 130 and json.loads((tmp_path / "stopped" / "detections.source.json").read_text())["finished"] \
        is False
    code, out, err = run_main(load_tool("pseudo_labels"), [tmp_path / "stopped", "--output", tmp_path / "p.json"],
                              capsys)
    assert code == 2 and "visualize.py stopped before the end of its list (2 of its 3 images listed): run the same " \
        "visualize.py command with --resume to finish it" in err, err
    monkeypatch.setattr(TOOLS["visualize.py"], "_draw", real_draw)
    code, out, err = run_main(TOOLS["visualize.py"], [*base, "--output", tmp_path / "stopped", "--resume"], capsys)
    assert code == 0 and json.loads((tmp_path / "stopped" / "detections.source.json").read_text())["finished"]
    code, out, err = run_main(load_tool("pseudo_labels"), [tmp_path / "stopped", "--output", tmp_path / "p.json"],
                              capsys)  # the folder visualize.py wrote is taken for its list
    assert code == 0 and len(json.loads((tmp_path / "p.json").read_text())["images"]) == 3, err
    # another threshold (or weights, or test settings): the list would mix two runs' detections
    code, out, err = run_main(TOOLS["visualize.py"], [*base, "--resume", "--score-thresh", "0.5"], capsys)
    assert code == 2 and f"--resume: {listed} was made with other score_thresh than this run's" in err
    code, out, err = run_main(TOOLS["visualize.py"], [*base, "--resume", "test.aug.enabled=true"], capsys)
    assert code == 2 and "was made with other test settings than this run's" in err
    assert listed.read_text() == whole  # refused before anything was written
    code, out, err = run_main(TOOLS["visualize.py"], [*base[:-len(overrides) - 2], "--output", tmp_path / "new",
                                                      *overrides, "--resume"], capsys)
    assert code == 0 and "does not exist: every image is done" in out
    code, out, err = run_main(TOOLS["visualize.py"], ["--gt", "--resume", "--output", tmp_path / "x", *overrides,
                                                      "--config", ROOT / "configs" / "base.yaml"], capsys)
    assert code == 2 and "--resume goes on with --input's images" in err


def test_visualize_resume_from_another_folder_is_refused_when_the_list_is_relative(tmp_path, monkeypatch):
    """--input photos/ in folder a, then --resume in folder b: the list's "photos/x.jpg" lines were
    taken for b's photos/x.jpg, and pseudo_labels.py then labelled b's files with a's detections (a
    review). An absolute list, or the folder it was begun in, goes on."""
    from detection.utils.files import OutputFolderError

    visualize = TOOLS["visualize.py"]
    out, a, b = tmp_path / "vis", tmp_path / "a", tmp_path / "b"
    for folder in (out, a, b):
        folder.mkdir()
    source = {"weights": {"path": "m.pth"}, "score_thresh": 0.5, "drawn": False, "settings": {}, "cwd": str(a)}
    (out / "detections.source.json").write_text(json.dumps(source))
    line = {"image": "photos/x.jpg", "detections": []}
    (out / "detections.jsonl").write_text(json.dumps(line) + "\n")
    args = SimpleNamespace(no_draw=True)
    monkeypatch.chdir(a)
    assert list(visualize.done_before(out, {**source}, args)) == ["photos/x.jpg"]
    monkeypatch.chdir(b)
    with pytest.raises(OutputFolderError, match=rf"--resume: .*detections.jsonl was begun in {a}, and its relative "
                                                rf"image paths \(photos/x.jpg\) name other files from {b}: resume "
                                                rf"it from {a}, or run without --resume"):
        visualize.done_before(out, {**source, "cwd": str(b)}, args)
    (out / "detections.jsonl").write_text(json.dumps({**line, "image": str(a / "photos/x.jpg")}) + "\n")
    assert list(visualize.done_before(out, {**source, "cwd": str(b)}, args)) == [str(a / "photos/x.jpg")]


@pytest.mark.slow
def test_eval_fail_below_gates_on_metrics_json_after_writing_everything(trained, tmp_path, capsys):
    """An automation trial: no way to make eval.py fail a CI build below an AP (every team wrote its
    own jq over metrics.json). --fail-below KEY=VALUE exits 3 (as demo.py --strict) once every file is
    written, naming each target missed."""
    root, overrides = trained
    base = ["--config", ROOT / "configs" / "base.yaml", "--weights", root / "out" / "model_final.pth", *overrides]
    code, out, err = run_main(TOOLS["eval.py"], [*base, "--output-dir", tmp_path / "a"], capsys)
    assert code == 0, err[-2000:]
    metrics = json.loads((tmp_path / "a" / "shapes_val" / "metrics.json").read_text())
    ap = metrics["AP"]
    code, out, err = run_main(TOOLS["eval.py"], [*base, "--output-dir", tmp_path / "b", "--fail-below",
                                                 f"AP={ap - 1}", "--fail-below", f"shapes_val/AP50={ap + 200}"],
                              capsys)
    assert code == 3, err[-2000:]
    assert [x for x in err.splitlines() if x.startswith("error:")] == [
        f"error: target missed (--fail-below): shapes_val AP50 {metrics['AP50']:.2f} < {ap + 200:g}"]
    assert json.loads((tmp_path / "b" / "shapes_val" / "metrics.json").read_text()) == metrics  # written first
    assert (tmp_path / "b" / "shapes_val" / "environment.json").is_file()
    code, out, err = run_main(TOOLS["eval.py"], [*base, "--output-dir", tmp_path / "c", "--fail-below",
                                                 f"AP={ap - 1}"], capsys)
    assert code == 0, err[-2000:]
    code, out, err = run_main(TOOLS["eval.py"], [*base, "--output-dir", tmp_path / "d", "--fail-below", "APx=1"],
                              capsys)
    assert code == 2 and "test set shapes_val has no metric 'APx'" in err
    assert not (tmp_path / "d" / "shapes_val" / "metrics.json").exists()  # said before the work (a trial)
    code, out, err = run_main(TOOLS["eval.py"], [*base, "--output-dir", tmp_path / "f", "--fail-below", "AR100=1",
                                                 "test.coco_max_dets=300"], capsys)
    assert code == 2 and "has no metric 'AR100' (its metrics: AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR300" in err
    code, out, err = run_main(TOOLS["eval.py"], [*base, "--output-dir", tmp_path / "e", "--fail-below", "AP"],
                              capsys)
    assert code == 2 and "expected KEY=VALUE" in err
