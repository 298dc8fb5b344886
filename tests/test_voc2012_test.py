"""voc_2012_test: a VOC split without annotations is read, cannot be trained on or scored, and
evaluation writes the PASCAL evaluation server's files (results/VOC2012/Main/comp4_det_test_*.txt,
the devkit's 1-based pixels) instead of a metric."""
import json

import cv2
import numpy as np
import pytest
import torch

from detection.data import DataError, concat_datasets, get_dataset
from detection.data.voc import VOC_CLASSES, load_voc
from detection.evaluation import evaluate_test_sets
from detection.evaluation.outputs import ResultsSource, claim_results_folder
from tests.helpers import ROOT, load_tool

SIZES = {"2008_000001": (60, 40), "2008_000002": (50, 70)}  # id -> (width, height)


def make_unannotated_voc(devkit, sizes=SIZES):
    """VOC2012 as the test tarball lays it out: ImageSets/Main/test.txt and JPEGImages only."""
    root = devkit / "VOC2012"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{i}\n" for i in sizes))
    for image_id, (width, height) in sizes.items():
        cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.jpg"), np.full((height, width, 3), 90, np.uint8))
    return root


class FixedDetector(torch.nn.Module):
    """Returns the same detections for every image of a given size (the model is passed in)."""

    def __init__(self, by_size):
        super().__init__()
        self.by_size = by_size

    def forward(self, images):
        return [self.by_size[tuple(image.shape[1:])] for image in images]


# 0-based continuous XYXY, as the library's boxes are; labels 1..20
DETECTIONS = {
    (40, 60): {"boxes": torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.5, 2.0, 30.25, 39.0]]),
               "scores": torch.tensor([0.9, 0.25]), "labels": torch.tensor([12, 1])},  # dog, aeroplane
    (70, 50): {"boxes": torch.tensor([[3.0, 4.0, 50.0, 70.0]]), "scores": torch.tensor([0.5]),
               "labels": torch.tensor([12])},
}


def test_known_name_reads_images_without_annotations(tmp_path):
    make_unannotated_voc(tmp_path / "VOCdevkit")
    info = get_dataset("voc_2012_test", str(tmp_path))
    assert info.has_annotations is False and info.kind == "voc" and info.split == "test"
    assert info.class_names == list(VOC_CLASSES) and info.use_07_metric is False
    assert [r["image_id"] for r in info.records] == list(SIZES)
    for record, (width, height) in zip(info.records, SIZES.values()):
        assert (record["width"], record["height"]) == (width, height)  # from the JPEG header
        images = tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages"
        assert record["file_name"] == str(images / f"{record['image_id']}.jpg")
        assert record["boxes"].shape == (0, 4) and record["labels"].shape == (0,)
    with pytest.raises(DataError, match="cannot train on voc_2012_test: it has no annotations"):
        concat_datasets([info])


def test_missing_image_of_the_test_split_is_reported_with_the_split_file(tmp_path):
    root = make_unannotated_voc(tmp_path / "VOCdevkit")
    (root / "JPEGImages" / "2008_000002.jpg").unlink()
    with pytest.raises(DataError, match=r"1 of 2 images listed in .*ImageSets/Main/test\.txt are missing"):
        get_dataset("voc_2012_test", str(tmp_path))


def test_a_split_that_needs_annotations_names_the_missing_folder(tmp_path):
    root = make_unannotated_voc(tmp_path / "VOCdevkit")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("2008_000001\n")
    with pytest.raises(DataError) as info:
        get_dataset("voc_2012_trainval", str(tmp_path))
    message = str(info.value)
    assert message.startswith(f"VOC annotations folder not found: {root / 'Annotations'} (split trainval")
    assert "annotations: false" in message and "\n" not in message
    # the same folder read as a custom entry without annotations is fine
    custom = get_dataset({"type": "voc", "root": "VOCdevkit/VOC2012", "split": "trainval", "annotations": False},
                         str(tmp_path))
    assert custom.has_annotations is False and len(custom.records) == 1


def read_class_files(folder):
    return {name: (folder / f"comp4_det_test_{name}.txt").read_text().splitlines() for name in VOC_CLASSES}


def test_evaluation_writes_the_servers_files_in_1_based_pixels_and_no_metric(tmp_path):
    make_unannotated_voc(tmp_path / "VOCdevkit")
    info = get_dataset("voc_2012_test", str(tmp_path))
    messages = []
    out = tmp_path / "inference"
    per_set = evaluate_test_sets([info], model=FixedDetector(DETECTIONS), output_dir=out, echo=messages.append)
    assert per_set == {"voc_2012_test": {}}  # nothing to score: no (fake) mAP
    main = out / "voc_2012_test" / "results" / "VOC2012" / "Main"
    assert sorted(p.name for p in main.iterdir()) == sorted(f"comp4_det_test_{c}.txt" for c in VOC_CLASSES)
    lines = read_class_files(main)
    # x1 + 1, y1 + 1, x2, y2: the devkit's 1-based inclusive pixels
    assert lines["dog"] == ["2008_000001 0.900000 1.0 1.0 10.0 20.0", "2008_000002 0.500000 4.0 5.0 50.0 70.0"]
    assert lines["aeroplane"] == ["2008_000001 0.250000 6.5 3.0 30.2 39.0"]
    assert all(lines[c] == [] for c in VOC_CLASSES if c not in ("dog", "aeroplane"))
    assert not (out / "voc_2012_test" / "metrics.json").exists()
    said = "\n".join(messages)
    assert "no annotations, so no AP is computed" in said and str(main) in said and "mAP" not in said


def test_border_boxes_are_clipped_and_sub_pixel_ones_left_out_never_inverted(tmp_path):
    """A box 0.2 px wide at the right border of a 60 px wide image was written as x1 60.8 > x2
    60.0 (the devkit's x1 is ours + 1); one reaching past the image was written past it."""
    make_unannotated_voc(tmp_path / "VOCdevkit")
    info = get_dataset("voc_2012_test", str(tmp_path))
    detections = {
        (40, 60): {"boxes": torch.tensor([[59.8, 10.0, 60.0, 30.0],   # sub-pixel, at the border: left out
                                          [-2.0, 30.0, 20.0, 45.0],   # past the left and bottom edges: clipped
                                          [10.0, 39.5, 30.0, 40.0],   # half a pixel high at the bottom: left out
                                          [5.0, 6.0, 59.5, 39.5]]),   # inside: as before
                   "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]), "labels": torch.tensor([12, 12, 12, 12])},
        (70, 50): {"boxes": torch.tensor([[49.0, 0.0, 52.0, 70.0]]), "scores": torch.tensor([0.5]),
                   "labels": torch.tensor([12])},  # one pixel wide after clipping: kept
    }
    out = tmp_path / "inference"
    evaluate_test_sets([info], model=FixedDetector(detections), output_dir=out)
    lines = read_class_files(out / "voc_2012_test" / "results" / "VOC2012" / "Main")
    assert lines["dog"] == ["2008_000001 0.800000 1.0 31.0 20.0 40.0", "2008_000001 0.600000 6.0 7.0 59.5 39.5",
                            "2008_000002 0.500000 50.0 1.0 50.0 70.0"]
    for line in lines["dog"]:
        x1, y1, x2, y2 = map(float, line.split()[2:])
        assert x1 <= x2 and y1 <= y2
    # VOCEvaluator (annotated sets) writes and scores every box as given, as the devkit would
    from detection.evaluation.voc_results import format_comp4_lines

    prediction = {"image_id": "a", "boxes": np.array([[59.8, 10.0, 60.0, 30.0]]), "scores": np.array([0.9]),
                  "labels": np.array([1])}
    assert format_comp4_lines([prediction], 20)[1] == ["a 0.900000 60.8 11.0 60.0 30.0"]


@pytest.mark.slow  # runs tools/eval.py (no model: saved results)
def test_eval_tool_rewrites_saved_detections_as_a_submission(tmp_path, capsys):
    make_unannotated_voc(tmp_path / "VOCdevkit")
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "comp4_det_test_cat.txt").write_text("2008_000002 0.700000 1.0 1.0 25.0 35.0\n")
    out = tmp_path / "out"
    code = load_tool("eval").main([
        "--config", str(ROOT / "configs" / "voc_r50.yaml"), "--results", str(saved), "--output-dir", str(out),
        f"datasets.root={json.dumps(str(tmp_path))}", "datasets.test=[voc_2012_test]"])
    printed = capsys.readouterr().out
    assert code == 0
    main = out / "voc_2012_test" / "results" / "VOC2012" / "Main"
    lines = read_class_files(main)
    assert lines["cat"] == ["2008_000002 0.700000 1.0 1.0 25.0 35.0"]  # 1-based in, 1-based out
    assert sum(len(v) for v in lines.values()) == 1
    assert f"written to {main}" in printed and "mAP" not in printed and "AP50" not in printed


def test_overwrite_removes_an_old_submission_and_its_folders(tmp_path):
    old = tmp_path / "inference" / "voc_2012_test" / "results" / "VOC2012" / "Main"
    old.mkdir(parents=True)
    (old / "comp4_det_test_dog.txt").write_text("2008_000001 0.9 1 1 10 20\n")
    (tmp_path / "inference" / "source.json").write_text(json.dumps({"kind": "weights", "path": "/other.pth"}))
    weights = tmp_path / "new.pth"
    weights.write_bytes(b"x")
    with pytest.raises(ValueError, match="holds the results of the checkpoint /other.pth"):
        claim_results_folder(tmp_path / "inference", ResultsSource.of("weights", weights), ["voc_2012_test"])
    claim_results_folder(tmp_path / "inference", ResultsSource.of("weights", weights), ["voc_2012_test"],
                         overwrite=True)
    assert list((tmp_path / "inference" / "voc_2012_test").iterdir()) == []  # made anew, for this run's files


def test_load_voc_without_annotations_reads_no_xml(tmp_path):
    root = make_unannotated_voc(tmp_path)
    (root / "Annotations").mkdir()
    (root / "Annotations" / "2008_000001.xml").write_text("not xml at all")  # would be an error if read
    info = load_voc(str(root), "test", annotations=False)
    assert info.name == "voc:VOC2012_test" and len(info.records) == 2


def _write_annotations(root, boxes_by_id):
    """Annotations/<id>.xml for each image: 1-based devkit boxes of class dog."""
    (root / "Annotations").mkdir()
    for image_id, (width, height) in SIZES.items():
        objects = "".join(f"<object><name>dog</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                          f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
                          for x1, y1, x2, y2 in boxes_by_id.get(image_id, []))
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>{objects}"
            "</annotation>")


def test_a_submission_goes_to_voc2012_and_is_scored_as_written_once_annotations_are_at_hand(tmp_path):
    """A test folder renamed VOC2012test wrote results/VOC2012test/Main, which the server does not
    read; --results on a submission folder found no class file (they are in results/VOC2012/Main)."""
    root = make_unannotated_voc(tmp_path)
    root = root.rename(tmp_path / "VOC2012test")
    entry = {"type": "voc", "root": str(root), "split": "test", "annotations": False}
    out = tmp_path / "inference"
    evaluate_test_sets([get_dataset(entry, str(tmp_path))], model=FixedDetector(DETECTIONS), output_dir=out)
    main = out / "voc_VOC2012test_test" / "results" / "VOC2012" / "Main"
    assert read_class_files(main)["dog"][0] == "2008_000001 0.900000 1.0 1.0 10.0 20.0"

    # the ground truth published later: the submission folder scores as the model itself does
    _write_annotations(root, {"2008_000001": [(1, 1, 10, 20)], "2008_000002": [(20, 20, 40, 40)]})
    annotated = get_dataset({**entry, "annotations": True}, str(tmp_path))
    direct = evaluate_test_sets([annotated], model=FixedDetector(DETECTIONS))[annotated.name]
    saved = evaluate_test_sets([annotated], results=str(out))[annotated.name]
    assert saved["AP-dog"] == direct["AP-dog"] == pytest.approx(50.0)  # one of two dogs found, first
