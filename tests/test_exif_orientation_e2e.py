"""Phone photos end to end: the shapes set rewritten as a phone writes it
(each image stored turned back, with an EXIF orientation tag, 1..8 in turn; the annotation as
the viewer sees it), next to its pre-rotated copy (PNGs with exactly the pixels the photos are
read as). Training, tools/eval.py, tools/visualize.py (predictions and --gt) and the Predictor
must treat each photo exactly as its copy."""
import json

import cv2
import numpy as np
import pytest
import torch

from detection.config import load_config
from detection.data import build_train_loader, build_transforms, get_dataset, read_image
from detection.data.orientation import orientation
from detection.data.shapes import generate_shapes
from detection.engine.trainer import train
from tests.helpers import load_tool, tiny_overrides, write_photo

pytestmark = pytest.mark.slow  # trains, and runs eval.py and visualize.py


def _as_phone_photos(shapes, split: str, upright) -> dict:
    """Rewrite shapes/<split> as phone photos (tag i % 8 + 1) and write their upright copies
    under upright/<split>, listed in upright/<split>.json; -> the copies' data-set entry."""
    ann_file = shapes / "annotations" / f"instances_{split}.json"
    coco = json.loads(ann_file.read_text())
    (upright / split).mkdir(parents=True)
    for i, image in enumerate(coco["images"]):
        path = shapes / split / image["file_name"]
        viewed = read_image(str(path))
        path.unlink()  # the VOC folder links the same file: write a new one
        write_photo(path, viewed, i % 8 + 1)
        image["file_name"] = image["file_name"].replace(".jpg", ".png")
        cv2.imwrite(str(upright / split / image["file_name"]), cv2.cvtColor(read_image(str(path)), cv2.COLOR_RGB2BGR))
    (upright / f"{split}.json").write_text(json.dumps(coco))
    return {"type": "coco", "ann_file": str(upright / f"{split}.json"), "image_root": str(upright / split),
            "name": f"upright_{split}"}


@pytest.fixture(scope="module")
def phone(tmp_path_factory):
    """(data root, the upright copies' entries, the overrides of a run trained on the photos)."""
    root = tmp_path_factory.mktemp("phone")
    generate_shapes(root / "shapes", num_train=8, num_val=8, seed=3, image_size=(64, 80))
    upright = {split: _as_phone_photos(root / "shapes", split, root / "upright") for split in ("train", "val")}
    # 4 iterations of 2 images: every photo of the epoch, 90-degree ones included (they used to stop training)
    overrides = tiny_overrides(root, root / "run", **{"solver.max_iter": 4, "solver.checkpoint_period": 4,
                                                       "model.roi_heads.score_thresh_test": 0.0})
    train(load_config(None, overrides))
    return root, upright, overrides


def test_the_photos_carry_all_8_tags_and_training_ran_on_them(phone):
    root, _, _ = phone
    photos = sorted((root / "shapes" / "val").glob("*.jpg"))
    assert [orientation(str(p)) for p in photos] == list(range(1, 9))
    assert (root / "run" / "model_final.pth").is_file()


def test_training_batches_of_photos_are_those_of_their_upright_copies(phone):
    root, upright, _ = phone
    photos = get_dataset("shapes_train", str(root))
    copies = get_dataset(upright["train"], str(root))
    batches = []
    for info in (photos, copies):
        loader = build_train_loader([info], transform=build_transforms(min_sizes=[64], max_size=96, hflip_prob=0.5),
                                    images_per_batch=2, num_workers=0, aspect_ratio_grouping=True,
                                    filter_empty=True, seed=5)
        batches.append([batch for _, batch in zip(range(4), loader)])
    for (images, targets), (images_copy, targets_copy) in zip(*batches):
        for a, b in zip(images, images_copy):
            assert a.shape == b.shape and bool((a == b).all())
        for a, b in zip(targets, targets_copy):
            assert bool((a["boxes"] == b["boxes"]).all()) and bool((a["labels"] == b["labels"]).all())


def _results(folder) -> list:
    return sorted(json.loads((folder / "coco_results.json").read_text()), key=lambda d: (d["image_id"], -d["score"]))


def test_eval_scores_photos_as_their_upright_copies(phone, capsys, restore_logging):
    root, upright, overrides = phone
    test_sets = json.dumps(["shapes_val", upright["val"]])
    code = load_tool("eval").main(["--weights", str(root / "run" / "model_final.pth"), *overrides,
                                   f"datasets.test={test_sets}", "--output-dir", str(root / "eval")])
    assert code == 0, capsys.readouterr().err
    photos, copies = _results(root / "eval" / "shapes_val"), _results(root / "eval" / "upright_val")
    assert photos and photos == copies
    metrics = [json.loads((root / "eval" / name / "metrics.json").read_text()) for name in ("shapes_val",
                                                                                          "upright_val")]
    assert metrics[0] == metrics[1]


@pytest.mark.parametrize("mode", ["predictions", "gt"])
def test_visualize_draws_photos_as_viewed(phone, tmp_path, capsys, restore_logging, mode):
    root, upright, overrides = phone
    tool = load_tool("visualize")
    drawn = []
    for which, folder, entry in (("photos", "shapes", "shapes_val"), ("copies", "upright", upright["val"])):
        # --gt draws the config's first test set; the predictions, the folder's images
        source = ["--gt"] if mode == "gt" else ["--input", str(root / folder / "val")]
        out = tmp_path / which
        code = tool.main(["--weights", str(root / "run" / "model_final.pth"), *overrides,
                          f"datasets.test={json.dumps([entry])}", *source, "--score-thresh", "0", "--output", str(out)])
        assert code == 0, capsys.readouterr().err
        drawn.append([cv2.imread(str(p)) for p in sorted(out.glob("*.jpg"))])
    assert len(drawn[0]) == len(drawn[1]) == 8
    for index, (photo, copy) in enumerate(zip(*drawn)):
        viewed = read_image(str(sorted((root / "upright" / "val").glob("*.png"))[index]))
        assert photo.shape == copy.shape and photo.shape[:2] == viewed.shape[:2], index  # the view's size
        np.testing.assert_array_equal(photo, copy)


def test_the_predictor_sees_each_photo_as_its_upright_copy(phone):
    from detection.predictor import Predictor

    root, _, _ = phone
    predictor = Predictor.from_config(str(root / "run" / "config.yaml"), weights=str(root / "run" / "model_final.pth"),
                                      overrides=["model.roi_heads.score_thresh_test=0.0"], device="cpu")
    photos = sorted((root / "shapes" / "val").glob("*.jpg"))
    copies = sorted((root / "upright" / "val").glob("*.png"))
    for photo, copy in zip(photos, copies):
        a, b = predictor(str(photo)), predictor(str(copy))
        assert len(a["boxes"]) > 0
        for key in ("boxes", "scores", "labels"):
            assert bool((a[key] == b[key]).all()), (photo.name, key)
        boxes = a["boxes"]
        height, width = read_image(str(copy)).shape[:2]
        assert float(boxes[:, 2].max()) <= width and float(boxes[:, 3].max()) <= height  # the view's frame
    # input.exif_orientation: false gives the stored frame: a 90-degree photo is seen sideways
    stored = Predictor.from_config(str(root / "run" / "config.yaml"), weights=str(root / "run" / "model_final.pth"),
                                   overrides=["model.roi_heads.score_thresh_test=0.0", "input.exif_orientation=false"],
                                   device="cpu")
    assert orientation(str(photos[5])) == 6
    assert not torch.equal(stored(str(photos[5]))["boxes"], predictor(str(photos[5]))["boxes"])


def test_annotations_of_the_stored_frame_stop_training_before_the_first_iteration(tmp_path):
    """An export from a tool that ignored the tag (width and height of the stored pixels):
    every such photo in one error when training starts, not a worker's stop at iteration 6."""
    from detection.data import DataError

    generate_shapes(tmp_path / "shapes", num_train=6, num_val=2, seed=0, image_size=(64, 80))
    ann_file = tmp_path / "shapes" / "annotations" / "instances_train.json"
    coco = json.loads(ann_file.read_text())
    for image in coco["images"][1:3]:
        path = tmp_path / "shapes" / "train" / image["file_name"]
        viewed = read_image(str(path))
        path.unlink()
        write_photo(path, viewed, 6)
        image["width"], image["height"] = image["height"], image["width"]  # the stored frame's
    ann_file.write_text(json.dumps(coco))
    names = [image["file_name"] for image in coco["images"][1:3]]
    with pytest.raises(DataError, match=rf"2 of 6 images .*{names[0]} is .*EXIF orientation 6.*{names[1]} is .*"
                                        r"set input\.exif_orientation: false"):
        train(load_config(None, tiny_overrides(tmp_path, tmp_path / "out")))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
