"""Tiled inference (test.tiles, SAHI's sliced prediction): where the tiles go, how their
detections come back to the image, and that each object is found once, whole."""
import numpy as np
import pytest
import torch
from torch import nn

from detection.modeling.tiles import DetectorWithTiles
from detection.utils.tiling import tile_starts, tile_windows


def test_tiles_step_by_size_times_one_minus_overlap_and_the_last_ends_at_the_edge():
    assert tile_starts(2000, 500, 0.25) == [0, 375, 750, 1125, 1500]
    assert tile_starts(1000, 500, 0.25) == [0, 375, 500]
    assert tile_starts(500, 500, 0.25) == [0] and tile_starts(300, 500, 0.25) == [0]
    assert tile_windows(700, 300, 500, 0.5) == [(0, 0, 300, 500), (0, 200, 300, 700)]


# objects in a 2000 x 1000 image: (x1, y1, x2, y2), label, score
OBJECTS = [([100, 100, 160, 160], 1, 0.91),   # inside the first tile
           ([480, 200, 540, 260], 2, 0.92),   # across the first tiles' border: whole in the second
           ([860, 600, 920, 660], 1, 0.93),   # whole in two rows of tiles: found twice, kept once
           ([1950, 10, 2000, 70], 2, 0.94),   # at the image's right edge: a tile's outer edge, kept
           ([100, 300, 1900, 950], 3, 0.95)]  # larger than any tile: the whole image's pass only


class SizeBlindOracle(nn.Module):
    """Finds the objects inside what it is given (a tile knows where it is from its pixels: x and
    y encoded in the channels) that are at least a twentieth of its width, as a detector resizing
    its input would: the small ones in a tile, not in the whole image."""

    def __init__(self):
        super().__init__()
        self.roi_heads = type("Heads", (), {"nms_thresh_test": 0.5, "detections_per_image": 100})()
        self.class_names = ["a", "b", "c"]
        self.calls = []

    def forward(self, images):
        out = []
        for image in images:
            code = image[:, 0, 0].long()
            x0, y0 = int(code[0] + 256 * (code[2] // 16)), int(code[1] + 256 * (code[2] % 16))
            h, w = image.shape[-2:]
            self.calls.append((x0, y0, int(w), int(h)))
            boxes, labels, scores = [], [], []
            for (x1, y1, x2, y2), label, score in OBJECTS:
                box = [max(x1, x0) - x0, max(y1, y0) - y0, min(x2, x0 + w) - x0, min(y2, y0 + h) - y0]
                if box[2] > box[0] and box[3] > box[1] and (box[2] - box[0]) >= w / 20:
                    boxes.append(box), labels.append(label), scores.append(score)
            out.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.tensor(labels, dtype=torch.int64), "scores": torch.tensor(scores)})
        return out


def coded_image(height=1000, width=2000):
    y, x = np.mgrid[0:height, 0:width]
    return torch.from_numpy(np.stack([x % 256, y % 256, (x // 256) * 16 + y // 256]).astype(np.uint8))


def test_each_object_is_found_once_whole_and_in_the_images_pixels():
    oracle = SizeBlindOracle()
    found = DetectorWithTiles(oracle, 500, 0.25, full_image=True).eval()([coded_image()])[0]
    got = sorted(zip(found["scores"].tolist(), found["boxes"].tolist(), found["labels"].tolist()))
    assert got == [(pytest.approx(score), [float(v) for v in box], label) for box, label, score in OBJECTS]
    assert len(oracle.calls) == 5 * 3 + 1 and oracle.calls[-1] == (0, 0, 2000, 1000)  # 15 tiles, the whole image
    # without the whole image's pass the object larger than a tile is not found (its cut pieces are dropped)
    found = DetectorWithTiles(SizeBlindOracle(), 500, 0.25, full_image=False).eval()([coded_image()])[0]
    assert sorted(found["scores"].tolist()) == pytest.approx([0.91, 0.92, 0.93, 0.94])
    # an image no larger than a tile is run as it is
    small = SizeBlindOracle()
    DetectorWithTiles(small, 500, 0.25).eval()([coded_image(400, 500)])
    assert small.calls == [(0, 0, 500, 400)]


def test_tiles_run_with_a_trained_model_through_the_tools_model(tmp_path):
    """build_inference_model wraps the detector when test.tiles.size is set: the Predictor, eval.py
    and visualize.py take it. A tile as large as the image gives the detections without tiles."""
    from detection.config import ConfigError, load_config
    from detection.engine.inference_model import build_inference_model
    from detection.modeling.model import build_model
    from tests.helpers import tiny_overrides

    overrides = tiny_overrides(tmp_path, tmp_path / "out", **{"model.roi_heads.score_thresh_test": 0.0})
    torch.manual_seed(0)
    weights = build_model(load_config(None, overrides)).state_dict()
    image = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)
    plain, _ = build_inference_model(load_config(None, overrides), weights, torch.device("cpu"))
    whole, _ = build_inference_model(load_config(None, [*overrides, "test.tiles.size=128"]), weights,
                                     torch.device("cpu"))
    tiled, _ = build_inference_model(load_config(None, [*overrides, "test.tiles.size=64"]), weights,
                                     torch.device("cpu"))
    assert isinstance(tiled, DetectorWithTiles) and tiled.class_names == plain.class_names
    with torch.inference_mode():
        expected, same, cut = plain([image])[0], whole([image])[0], tiled([image])[0]
    assert torch.equal(expected["boxes"], same["boxes"]) and torch.equal(expected["scores"], same["scores"])
    boxes = cut["boxes"]
    assert len(boxes) and (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 128).all() and (boxes[:, 3] <= 96).all()
    with pytest.raises(ConfigError, match=r"test.tiles.overlap: 1.0 is invalid, expected in \[0, 1\)"):
        load_config(None, [*overrides, "test.tiles.size=64", "test.tiles.overlap=1"])


def test_make_tiles_cuts_the_images_and_their_boxes_as_test_tiles_cuts_them(tmp_path, capsys):
    """tools/make_tiles.py (SAHI's slice_coco): each tile an image of its own, its objects' boxes
    clipped to it when at least --min-visible of each is inside, loadable as a COCO set."""
    import json

    import cv2

    from detection.data.catalog import get_dataset
    from tests.helpers import ROOT, load_tool, run_main, tiny_overrides

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (60, 100, 3), dtype=np.uint8)
    (tmp_path / "img").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "a.png"), pixels[:, :, ::-1])
    objects = [(5, [10, 10, 20, 20]), (9, [45, 20, 20, 20]), (5, [80, 45, 20, 15])]  # (category, xywh)
    (tmp_path / "a.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 60}],
        "annotations": [{"id": n + 1, "image_id": 1, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                        for n, (c, b) in enumerate(objects)],
        "categories": [{"id": 5, "name": "car"}, {"id": 9, "name": "van"}]}))
    entry = "{type: coco, ann_file: a.json, image_root: img}"
    code, out, err = run_main(load_tool("make_tiles"), [
        "--config", ROOT / "configs" / "base.yaml", *tiny_overrides(tmp_path, tmp_path / "out"),
        "--dataset", entry, "--size", "50", "--overlap", "0.2", "--output", tmp_path / "tiles"], capsys)
    assert code == 0, err
    assert out.strip().endswith(f"wrote 6 tiles of 1 image of coco:a to {tmp_path / 'tiles' / 'images'} and "
                                f"{tmp_path / 'tiles' / 'annotations.json'} (50 px, overlap 0.2; 3 objects)")
    tiles = get_dataset({"type": "coco", "ann_file": str(tmp_path / "tiles" / "annotations.json"),
                         "image_root": str(tmp_path / "tiles" / "images")}, str(tmp_path))
    assert tiles.class_names == ["car", "van"]
    got = {}
    for record in tiles.records:  # tiles at x 0, 40, 50 and y 0, 10 (stride 40, the last at the edge)
        name = record["file_name"].rsplit("/", 1)[-1]  # 000000_a_x<X>_y<Y>.png
        x0, y0 = (int(part[1:]) for part in name[:-4].split("_")[2:])
        tile = cv2.imread(record["file_name"])[:, :, ::-1]
        np.testing.assert_array_equal(tile, pixels[y0:y0 + 50, x0:x0 + 50])  # PNG: the pixels as they were
        got[(x0, y0)] = sorted(zip(record["labels"].tolist(), record["boxes"].tolist()))
    assert sorted(got) == [(0, 0), (0, 10), (40, 0), (40, 10), (50, 0), (50, 10)]
    assert got[(0, 0)] == [(1, [10.0, 10.0, 30.0, 30.0])]  # the van at x 45-65 has 5 of 20 px inside: left out
    assert got[(0, 10)] == [(1, [10.0, 0.0, 30.0, 20.0])]
    assert got[(40, 0)] == [(2, [5.0, 20.0, 25.0, 40.0])]  # whole; the car at x 80-100, y 45-60: 5 of 15 px
    assert got[(40, 10)] == [(1, [40.0, 35.0, 50.0, 50.0]), (2, [5.0, 10.0, 25.0, 30.0])]  # the car: half inside
    assert got[(50, 0)] == [(2, [0.0, 20.0, 15.0, 40.0])]  # 15 of 20 px of the van
    assert got[(50, 10)] == [(1, [30.0, 35.0, 50.0, 50.0]), (2, [0.0, 10.0, 15.0, 30.0])]


def test_make_tiles_keeps_every_source_and_region_and_never_writes_over_the_data(tmp_path, capsys):
    """A review: two sources named 001.png in two folders wrote one tile file (the second over the
    first), a COCO crowd region was lost, and --output at the source's folder replaced its
    annotations.json."""
    import json

    import cv2

    from tests.helpers import ROOT, load_tool, run_main, tiny_overrides

    for sub in ("a", "b"):
        (tmp_path / "img" / sub).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "img" / sub / "001.png"), np.full((40, 40, 3), 9 if sub == "a" else 200, np.uint8))
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 40, 40], "area": 1600, "iscrowd": 1,
             "segmentation": {"counts": [0, 1600], "size": [40, 40]}}]
    (tmp_path / "annotations.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a/001.png", "width": 40, "height": 40},
                   {"id": 2, "file_name": "b/001.png", "width": 40, "height": 40}],
        "annotations": anns, "categories": [{"id": 1, "name": "car"}]}))
    base = ["--config", ROOT / "configs" / "base.yaml", *tiny_overrides(tmp_path, tmp_path / "out"), "--dataset",
            "{type: coco, ann_file: annotations.json, image_root: img}", "--size", "40"]
    code, _, err = run_main(load_tool("make_tiles"), [*base, "--output", tmp_path / "tiles"], capsys)
    assert code == 0, err
    written = json.loads((tmp_path / "tiles" / "annotations.json").read_text())
    assert [image["file_name"] for image in written["images"]] == ["000000_001_x0_y0.png", "000001_001_x0_y0.png"]
    assert cv2.imread(str(tmp_path / "tiles" / "images" / "000001_001_x0_y0.png"))[0, 0, 0] == 200  # its own pixels
    assert [(a["image_id"], a.get("iscrowd")) for a in written["annotations"]] == [(1, 0), (2, 1)]  # the crowd kept
    code, _, err = run_main(load_tool("make_tiles"), [*base, "--output", tmp_path / "tiles"], capsys)
    assert code == 2 and "already holds a tiled set" in err  # an earlier --size's tiles would stay among these
    before = (tmp_path / "annotations.json").read_bytes()
    code, _, err = run_main(load_tool("make_tiles"), [*base, "--output", tmp_path], capsys)
    assert code == 2 and "holds the data set's own images or annotations.json" in err
    assert (tmp_path / "annotations.json").read_bytes() == before
    # VOC difficult objects: trained (objects) with dataloader.use_difficult, else iscrowd (neither trained nor scored)
    from detection.data.dataset_info import DatasetInfo
    from detection.data.tiling import write_tiled_dataset

    record = {"image_id": "x", "file_name": str(tmp_path / "img" / "a" / "001.png"), "height": 40, "width": 40,
              "boxes": np.array([[1, 1, 9, 9], [20, 20, 30, 30]], np.float32), "labels": np.array([1, 1]),
              "difficult": np.array([False, True])}
    voc = DatasetInfo(name="voc", kind="voc", class_names=["car"], records=[record])
    for use_difficult, crowd in ((True, [0, 0]), (False, [0, 1])):
        out = tmp_path / f"voc_{use_difficult}"
        write_tiled_dataset(voc, out, 40, 0.25, 0.5, read=lambda path: np.zeros((40, 40, 3), np.uint8),
                            write=lambda path, pixels: None, use_difficult=use_difficult)
        assert [a["iscrowd"] for a in json.loads((out / "annotations.json").read_text())["annotations"]] == crowd
    # an object a quarter inside each of four tiles (no overlap) is in none by half its box: counted left out
    corner = DatasetInfo(name="corner", kind="voc", class_names=["car"], records=[
        {**record, "boxes": np.array([[15, 15, 25, 25], [2, 2, 8, 8]], np.float32), "difficult": np.zeros(2, bool)}])
    counts = write_tiled_dataset(corner, tmp_path / "corner", 20, 0.0, 0.5, read=lambda path: np.zeros((40, 40, 3),
                                 np.uint8), write=lambda path, pixels: None)
    assert counts == {"images": 1, "tiles": 4, "objects": 2, "objects_left_out": 1}


def test_the_whole_image_pass_beside_tiles_is_not_warned_of_as_a_squashed_panorama():
    """The model warns that a panorama squashed to a strip should be cut into tiles; under
    test.tiles its whole-image pass was warned of too (a trial). The bare model after the tiled run
    still warns."""
    import warnings

    from tests.helpers import make_model

    model = make_model().eval()  # min_size_test 96, max_size_test 256
    panorama = torch.full((3, 30, 600), 90, dtype=torch.uint8)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error")
        DetectorWithTiles(model, size=64, overlap=0.25, full_image=True)([panorama])  # 64x30 tiles: not squashed
    assert model.told_squashed is False
    with torch.inference_mode(), pytest.warns(UserWarning, match=r"the batch's image 0 is 600x30 \(WxH\).*"
                                                                  r"cut it into tiles .*test.tiles"):
        model([panorama])
