"""tools/pseudo_labels.py: visualize.py's detections.jsonl as a COCO training json (a
pseudo-labelling trial joined eval.py's results with an images json by hand)."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from detection.data import DataError
from detection.data.catalog import concat_datasets, get_dataset
from tests.helpers import load_tool, run_main

TOOL = load_tool("pseudo_labels")
pytestmark = pytest.mark.usefixtures("restore_logging")  # main() sets up logging: take it back after


def unlabelled(tmp_path):
    """Three images in unl/ (one in a sub-folder), their detections.jsonl as visualize.py writes it
    (a fourth image not read), and its source record naming the model's classes."""
    folder = tmp_path / "unl"
    (folder / "sub").mkdir(parents=True)
    for name, (h, w) in (("a.png", (40, 60)), ("b.png", (50, 30)), ("sub/c.png", (20, 20))):
        cv2.imwrite(str(folder / name), np.full((h, w, 3), 128, np.uint8))
    lines = [
        {"image": str(folder / "a.png"), "drawing": None, "width": 60, "height": 40, "detections": [
            {"label": 2, "class": "square", "score": 0.91, "box": [10.5, 5.0, 30.25, 25.0]},
            {"label": 1, "class": "circle", "score": 0.62, "box": [0.0, 0.0, 12.0, 8.0]}]},
        {"image": str(folder / "broken.png"), "error": "could not read image"},
        {"image": str(folder / "b.png"), "drawing": None, "width": 30, "height": 50, "detections": [
            {"label": 1, "class": "circle", "score": 0.4, "box": [1.0, 2.0, 3.0, 4.0]}]},
        {"image": str(folder / "sub" / "c.png"), "drawing": None, "width": 20, "height": 20, "detections": []},
    ]
    out = tmp_path / "pl"
    out.mkdir()
    (out / "detections.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (out / "detections.source.json").write_text(json.dumps({"class_names": ["circle", "square", "triangle"],
                                                            "score_thresh": 0.3, "cwd": str(tmp_path)}))
    return folder, out / "detections.jsonl"


def test_detections_become_a_coco_json_the_reader_trains_on_beside_a_labelled_set(tmp_path, capsys):
    folder, listing = unlabelled(tmp_path)
    code, out, err = run_main(TOOL, [listing, "--output", tmp_path / "pseudo.json", "--score-thresh", "0.5"], capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "pseudo.json").read_text())
    assert data["categories"] == [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"},
                                  {"id": 3, "name": "triangle"}]  # every class, none detected too
    assert data["images"] == [{"id": 1, "file_name": "a.png", "width": 60, "height": 40},
                              {"id": 2, "file_name": "b.png", "width": 30, "height": 50},
                              {"id": 3, "file_name": "sub/c.png", "width": 20, "height": 20}]
    assert data["annotations"] == [  # the 0.4 circle is under --score-thresh
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [10.5, 5.0, 19.75, 20.0], "area": 395.0, "iscrowd": 0,
         "segmentation": [], "score": 0.91},  # an empty segmentation: CVAT's importer warns of each one without
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 12.0, 8.0], "area": 96.0, "iscrowd": 0,
         "segmentation": [], "score": 0.62}]
    lines = out.strip().splitlines()
    assert lines[0] == f"{tmp_path / 'pseudo.json'}: 3 images, 2 boxes at score >= 0.5 (circle 1, square 1, triangle 0)"
    assert lines[1].startswith("note: 2 images have no detection at that score: training drops them")
    assert lines[2] == f"note: 1 images of the list have an error line and are left out ({folder / 'broken.png'}): " \
        "not read, or their drawing not written (its \"error\" says which)"
    assert lines[3].startswith("train on it beside your labelled set: datasets.train='[<your set>, {type: coco, ")
    # the entry as printed is one shell word the config reads, its paths quoted (a ', ' in a path split it)
    import shlex

    from detection.config import load_config

    word = shlex.split(lines[3].split(": ", 1)[1])[0]
    entry = word.replace("<your set>, ", "")
    assert load_config(None, [entry]).datasets.train == [
        {"type": "coco", "name": "pseudo", "ann_file": str(tmp_path / "pseudo.json"), "image_root": str(folder)}]
    # read back as training reads it (image sizes checked against the files), the boxes as detected
    pseudo = get_dataset({"type": "coco", "name": "pseudo", "ann_file": str(tmp_path / "pseudo.json"),
                          "image_root": str(folder)}, str(tmp_path), check_images=True)
    np.testing.assert_array_equal(pseudo.records[0]["boxes"], [[10.5, 5.0, 30.25, 25.0], [0.0, 0.0, 12.0, 8.0]])
    assert pseudo.records[0]["labels"].tolist() == [2, 1] and pseudo.class_names == ["circle", "square", "triangle"]
    # beside a labelled set whose json numbers the classes otherwise: matched by name
    labelled = {"images": [{"id": 7, "file_name": "b.png", "width": 30, "height": 50}],
                "annotations": [{"id": 1, "image_id": 7, "category_id": 30, "bbox": [1, 1, 5, 5], "iscrowd": 0}],
                "categories": [{"id": 10, "name": "triangle"}, {"id": 20, "name": "circle"},
                               {"id": 30, "name": "square"}]}
    (tmp_path / "labelled.json").write_text(json.dumps(labelled))
    mine = get_dataset({"type": "coco", "name": "mine", "ann_file": str(tmp_path / "labelled.json"),
                        "image_root": str(folder)}, str(tmp_path))
    both = concat_datasets([mine, pseudo])
    assert both.class_names == ["triangle", "circle", "square"]
    assert both.records[1]["labels"].tolist() == [3, 2]  # square, circle in the labelled set's order
    # a second run is not written over the first
    code, _, err = run_main(TOOL, [listing, "--output", tmp_path / "pseudo.json"], capsys)
    assert code != 0 and "pseudo.json exists: give another --output" in err


def test_relative_paths_start_where_visualize_ran_and_the_lists_threshold_is_the_least(tmp_path, monkeypatch,
                                                                                     capsys):
    """visualize.py writes "image" as its --input gave it: read from another folder, the json named
    a root that did not exist (a review). Below the list's own --score-thresh there is nothing more."""
    folder, listing = unlabelled(tmp_path)
    lines = [json.loads(line) for line in listing.read_text().splitlines()]
    for line in lines:
        line["image"] = str(Path(line["image"]).relative_to(tmp_path))  # "unl/a.png": visualize ran in tmp_path
    listing.write_text("".join(json.dumps(line) + "\n" for line in lines))
    monkeypatch.chdir(folder / "sub")
    code, out, err = run_main(TOOL, [listing, "--output", tmp_path / "p.json", "--score-thresh", "0.1"], capsys)
    assert code == 0, err
    assert f"image_root: \"{folder}\"" in out and "boxes at score >= 0.3 (circle 2, square 1" in out
    assert "note: the list holds detections at score >= 0.3 only (visualize.py's --score-thresh)" in out
    assert [i["file_name"] for i in json.loads((tmp_path / "p.json").read_text())["images"]] == \
        ["a.png", "b.png", "sub/c.png"]
    # without --score-thresh the list's own is taken and not noted: nothing lower was asked for (a review)
    code, out, err = run_main(TOOL, [listing, "--output", tmp_path / "q.json"], capsys)
    assert code == 0 and "boxes at score >= 0.3 (circle 2, square 1" in out and "note: the list holds" not in out


def test_what_cannot_be_labelled_is_one_clear_error(tmp_path, capsys):
    from detection.data.pseudo_labels import write_pseudo_labels

    folder, listing = unlabelled(tmp_path)
    with pytest.raises(DataError, match=r"no detection at score >= 0.95 on its 3 images: nothing to train on"):
        write_pseudo_labels(listing, tmp_path / "x.json", 0.95)
    text = listing.read_text()
    listing.write_text(text + text.splitlines()[0] + "\n")  # two lists joined
    with pytest.raises(DataError, match=r"detections.jsonl, line 5: .*a.png is listed again \(line 1\)"):
        write_pseudo_labels(listing, tmp_path / "x.json", 0.5)
    listing.write_text(text)
    (folder / "b.png").unlink()
    with pytest.raises(DataError, match=r"1 of its 3 images are not there \(.*b.png\): moved or deleted"):
        write_pseudo_labels(listing, tmp_path / "x.json", 0.5)
    cv2.imwrite(str(folder / "b.png"), np.full((50, 30, 3), 128, np.uint8))
    with pytest.raises(DataError, match=r"a.png is not under the image root .*other: give --image-root a folder"):
        write_pseudo_labels(listing, tmp_path / "x.json", 0.5, image_root=tmp_path / "other")
    source = (listing.parent / "detections.source.json").read_text()
    (listing.parent / "detections.source.json").write_text(json.dumps({"score_thresh": 0.5}))  # an older list's
    with pytest.raises(DataError, match=r"detections.source.json: no class names of the model that made .* run "
                                        r"visualize.py --no-draw again"):
        write_pseudo_labels(listing, tmp_path / "x.json", 0.5)
    (listing.parent / "detections.source.json").write_text(source)
    listing.write_text('{"image": "a.png", "frame": 0, "time": 0.0, "width": 2, "height": 2, "detections": []}\n')
    with pytest.raises(DataError, match=r"detections.jsonl, line 1: a video's frame"):
        write_pseudo_labels(listing, tmp_path / "x.json", 0.5)
    listing.write_text('{"image": "a.png", "width": 2, "hei')
    with pytest.raises(DataError, match=r"detections.jsonl, line 1: not JSON"):
        write_pseudo_labels(listing, tmp_path / "x.json", 0.5)
    assert not (tmp_path / "x.json").exists()


def test_a_stopped_list_a_changed_image_or_another_file_is_refused_and_widths_are_as_listed(tmp_path, capsys):
    """A pre-annotation trial: a killed visualize.py run's list became a json of a third of the
    images, and a file replaced since kept its old size, both without a word; the list's folder,
    its detections.source.json or a COCO json given were misread; widths had float noise."""
    from detection.data.pseudo_labels import pseudo_label_json, read_detections

    folder, listing = unlabelled(tmp_path)
    source_path = listing.parent / "detections.source.json"
    source = json.loads(source_path.read_text())
    images, failed, _ = read_detections(listing.parent)  # the folder visualize.py wrote: its list
    assert [Path(e["image"]).name for e in images] == ["a.png", "b.png", "c.png"] and len(failed) == 1
    for wrong in (source_path, tmp_path / "coco.json"):
        if wrong.name == "coco.json":
            wrong.write_text(json.dumps({"images": [], "annotations": [], "categories": []}, indent=1))
        with pytest.raises(DataError, match=rf"{wrong}: one JSON document \(a COCO json\? detections.source.json\?\), "
                                            r"not visualize.py's detections.jsonl \(a line per image\)"):
            read_detections(wrong)
    with pytest.raises(DataError, match=rf"{folder}: a folder without detections.jsonl: give the list visualize.py"):
        read_detections(folder)  # the images' folder, given by mistake
    source_path.write_text(json.dumps({**source, "images": 7, "finished": False}))
    with pytest.raises(DataError, match=r"visualize.py stopped before the end of its list \(4 of its 7 images "
                                        r"listed\): run the same visualize.py command with --resume to finish it"):
        read_detections(listing)
    source_path.write_text(json.dumps({**source, "images": 4, "finished": True}))
    assert len(read_detections(listing)[0]) == 3
    cv2.imwrite(str(folder / "b.png"), np.full((50, 31, 3), 128, np.uint8))  # replaced since it was listed
    with pytest.raises(DataError, match=r"1 of its 3 images changed since visualize.py listed them \(.*b.png is "
                                        r"31x50, listed 30x50\): its detections are of the old files"):
        read_detections(listing)
    # a phone photo listed as viewed (60x40, stored 40x60): not "changed"; a list made with
    # input.exif_orientation false lists it as stored, and is compared so (a review)
    from tests.helpers import write_photo

    write_photo(folder / "b.png", np.full((40, 60, 3), 128, np.uint8), 6)  # a JPEG under b.png's name
    lines = [json.loads(line) for line in listing.read_text().splitlines()]
    lines[2].update(width=60, height=40)
    listing.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert len(read_detections(listing)[0]) == 3
    source_path.write_text(json.dumps({**source, "settings": {"input": {"exif_orientation": False}}}))
    with pytest.raises(DataError, match=r"b.png is 40x60, listed 60x40"):
        read_detections(listing)
    source_path.write_text(json.dumps(source))
    (folder / "b.png").unlink()
    with pytest.raises(DataError, match=r"not there .* --image-root only sets the folder the json's file names "
                                        r"start from"):
        read_detections(listing)
    # a width as the list's two decimals give it (x2 - x1 was 30.199999999999996)
    entry = {"image": str(folder / "a.png"), "width": 60, "height": 40,
             "detections": [{"label": 1, "score": 0.9, "box": [60.71, 8.67, 90.91, 36.91]}]}
    assert pseudo_label_json([entry], ["circle"], folder, 0.5)["annotations"][0]["bbox"] == [60.71, 8.67, 30.2, 28.24]


def test_a_file_name_that_is_not_utf8_is_noted(tmp_path):
    """An old archive's Latin-1 "café.png": the json keeps it as a lone surrogate, which training
    here opens and CVAT or Label Studio match no file to (a pre-annotation trial): said."""
    import os

    from detection.data.pseudo_labels import summary, write_pseudo_labels

    folder, listing = unlabelled(tmp_path)
    latin = os.path.join(os.fsencode(folder), b"caf\xe9.png")
    with open(latin, "wb") as f:  # (cv2.imwrite given such a name as str crashes the process)
        f.write(cv2.imencode(".png", np.full((40, 60, 3), 128, np.uint8))[1].tobytes())
    line = {"image": os.fsdecode(latin), "width": 60, "height": 40,
            "detections": [{"label": 1, "score": 0.9, "box": [1.0, 2.0, 10.0, 12.0]}]}
    with open(listing, "a", encoding="utf-8", errors="surrogateescape") as f:
        f.write(json.dumps(line) + "\n")
    counts = write_pseudo_labels(listing, tmp_path / "p.json", 0.5)
    assert counts["not_utf8"] == ["caf\udce9.png"]
    assert summary({**counts, "images": 1, "annotations": 1, "empty": 1}, "p.json", None)[:2] == [
        "p.json: 1 image, 1 box at score >= 0.5 (circle 2, square 1, triangle 0)",  # not "1 images, 1 boxes"
        "note: 1 image has no detection at that score: training drops them (dataloader.filter_empty); with "
        "filter_empty: false they would teach that nothing is there"]
    assert "note: 1 file names are not UTF-8 (caf\ufffd.png): training here reads them, but CVAT, Label Studio " \
        "and other programs match no file to them" in "\n".join(summary(counts, tmp_path / "p.json", None))
    pseudo = get_dataset({"type": "coco", "name": "pseudo", "ann_file": str(tmp_path / "p.json"),
                          "image_root": str(folder)}, str(tmp_path), check_images=True)
    assert os.fsencode(pseudo.records[-1]["file_name"]) == latin  # training reads it
