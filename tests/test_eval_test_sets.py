"""The one test-set loop (detection.evaluation.evaluate_test_sets): during training
(test.eval_period) and from saved results, as tools/eval.py calls it."""
import json
from pathlib import Path

import pytest
import torch

from detection.config import load_config
from detection.data.catalog import get_datasets
from detection.data.shapes import generate_shapes
from detection.engine.trainer import evaluate, train
from detection.evaluation import evaluate_test_sets, flatten_metrics, inference_on_dataset, test_sets
from detection.modeling.resize import resized_shape
from tests.helpers import CrossDeviceCopies, make_model, run_forked_processes, tiny_overrides

VAL_COPY = {"type": "coco", "name": "val_copy", "ann_file": "shapes/annotations/instances_val.json",
            "image_root": "shapes/val"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three iterations with an evaluation on two test sets every 2 iterations (and at the end)."""
    root = tmp_path_factory.mktemp("sets")
    generate_shapes(root / "shapes", num_train=6, num_val=3, seed=0, image_size=(64, 80))
    cfg = load_config(None, tiny_overrides(root, root / "out", **{
        "solver.max_iter": 3, "test.eval_period": 2, "datasets.test": ["shapes_val", VAL_COPY]}))
    return cfg, train(cfg)


@pytest.mark.slow  # uses the module's trained run
def test_evaluation_during_training_logs_each_test_set(trained):
    cfg, model = trained
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "shapes_val/AP" in r]
    assert [r["iteration"] for r in evaluated] == [2, 3]  # every test.eval_period, and the end as Detectron2
    assert all(r["shapes_val/AP"] == r["val_copy/AP"] for r in evaluated)  # the same images and boxes
    assert model.class_names == ["circle", "square", "triangle"]  # set from the training data


@pytest.mark.slow  # uses the module's trained run
def test_trainer_evaluate_is_the_test_set_loop(trained, tmp_path):
    cfg, model = trained
    datasets = get_datasets(cfg.datasets.test, cfg.datasets.root)
    per_set = evaluate_test_sets(datasets, model=model, output_dir=tmp_path)
    assert flatten_metrics(per_set) == evaluate(cfg, model)
    for folder in ("shapes_val", "val_copy"):  # one folder per test set, as tools/eval.py writes it
        assert json.loads((tmp_path / folder / "metrics.json").read_text())["AP"] == pytest.approx(
            per_set[folder]["AP"], nan_ok=True)
    rescored = evaluate_test_sets(datasets, results=str(tmp_path))  # its own results, no model
    assert rescored["val_copy"]["AP"] == pytest.approx(per_set["val_copy"]["AP"], nan_ok=True)


def test_flatten_and_arguments():
    assert flatten_metrics({"a": {"AP": 1.0}}) == {"AP": 1.0}
    assert flatten_metrics({"a": {"AP": 1.0}, "b": {"AP": 2.0}}) == {"a/AP": 1.0, "b/AP": 2.0}
    assert flatten_metrics({}) == {}
    with pytest.raises(ValueError, match="a model or saved results"):
        evaluate_test_sets([])


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str, datasets: list, model) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's thread pool
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    seen = []

    def counting(model, loader, evaluator, **options):  # how many images ran here, and were scored here
        metrics = inference_on_dataset(model, loader, evaluator, **options)
        seen.append((len(loader), len(evaluator.predictions)))
        return metrics

    test_sets.inference_on_dataset = counting  # this forked process only
    try:
        per_set = evaluate_test_sets(datasets, model=model)
        with open(f"{out_file}.{rank}", "w") as f:
            json.dump({"metrics": per_set, "seen": seen}, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # uses the module's trained run
def test_two_processes_share_the_images_and_rank_0_scores_them_all(trained, tmp_path):
    cfg, model = trained
    datasets = get_datasets(cfg.datasets.test[:1], cfg.datasets.root)
    out = str(tmp_path / "metrics")
    run_forked_processes(_ddp_worker, (2, str(tmp_path / "init"), out, datasets, model))
    with open(f"{out}.1") as f:
        assert json.load(f) == {"metrics": {"shapes_val": {}}, "seen": [[1, 0]]}  # ran 1 of 3 images
    with open(f"{out}.0") as f:
        rank0 = json.load(f)
    assert rank0["seen"] == [[2, 3]]  # ran 2 images, scored all 3
    alone = evaluate_test_sets(datasets, model=model)
    assert rank0["metrics"]["shapes_val"].keys() == alone["shapes_val"].keys()
    assert rank0["metrics"]["shapes_val"]["AP50"] == pytest.approx(alone["shapes_val"]["AP50"], nan_ok=True)


class _DetectorOnMeta(torch.nn.Module):
    """A detector on `meta` (standing in for one on a GPU) that preprocesses its images as
    FasterRCNN does and finds nothing; it records what it was given and what crossed devices."""

    def __init__(self):
        super().__init__()
        self.detector = make_model().to("meta")  # test size 96, at most 256
        self.given, self.moved, self.sizes = [], [], []

    def forward(self, images):
        self.given.extend((image.device.type, image.dtype, tuple(image.shape)) for image in images)
        with CrossDeviceCopies() as copies:
            batch = self.detector.preprocess(images, resize=True)
        self.moved.extend(copies.copies)
        self.sizes.extend(batch.image_sizes)
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
                for _ in images]


def test_evaluation_hands_the_model_the_test_images_in_host_memory(tmp_path):
    """The loop gives the model the loader's images as they are, at their own size in host
    memory: the model resizes each there and moves it to its device once, at the test size, as
    uint8. (The loop used to move each full-size image to the device its caller named, the
    model's; on a GPU it then came back to the host to be resized and went again. A loop that
    moved them to the model's device would fail here: this model's parameters are on `meta`.)"""
    generate_shapes(tmp_path / "shapes", num_train=1, num_val=2, seed=0, image_size=(150, 200))
    datasets = get_datasets(["shapes_val"], str(tmp_path))
    model = _DetectorOnMeta()
    evaluate_test_sets(datasets, model=model)
    records = datasets[0].records
    assert model.given == [("cpu", torch.uint8, (3, r["height"], r["width"])) for r in records]
    assert model.moved == [("cpu", torch.uint8)] * len(records)
    assert model.sizes == [resized_shape(r["height"], r["width"], 96, 256) for r in records]
    assert all(size != (r["height"], r["width"]) for size, r in zip(model.sizes, records))  # resized on the host


class _Oracle(torch.nn.Module):
    """Each image's ground truth as its detections (score 1), labelled by `class_names`, the
    model's own order: the test loader gives the images in the records' order."""

    def __init__(self, records, set_classes, class_names=None):
        super().__init__()
        self.answers = iter(records)
        self.set_classes = list(set_classes)
        if class_names is not None:
            self.class_names = list(class_names)
        self.labels_as = class_names or self.set_classes

    def forward(self, images):
        out = []
        for _ in images:
            record = next(self.answers)
            labels = [self.labels_as.index(self.set_classes[int(k) - 1]) + 1 for k in record["labels"]]
            out.append({"boxes": torch.as_tensor(record["boxes"], dtype=torch.float32).reshape(-1, 4),
                        "scores": torch.ones(len(labels)), "labels": torch.tensor(labels, dtype=torch.int64)})
        return out


def test_a_models_own_class_names_score_a_set_numbering_its_categories_otherwise_by_name(tmp_path, caplog):
    """A Python caller's evaluate_test_sets(datasets, model=...) matched labels by number when
    model_classes was not passed, though the model carries its names (the Predictor's, a
    training's): a COCO json numbering [circle, square, triangle] as 7, 3, 12 scored each of
    circle and square against the other's boxes (a Python-API trial: AP 27.66 where eval.py
    gave 79.51), with no word. A model with no names is scored by number, with a warning."""
    generate_shapes(tmp_path / "shapes", num_train=1, num_val=4, seed=0, image_size=(64, 80))
    ann = tmp_path / "shapes" / "annotations" / "instances_val.json"
    coco = json.loads(ann.read_text())
    new_id = {c["id"]: {"circle": 7, "square": 3, "triangle": 12}[c["name"]] for c in coco["categories"]}
    for c in coco["categories"]:
        c["id"] = new_id[c["id"]]
    for a in coco["annotations"]:
        a["category_id"] = new_id[a["category_id"]]
    ann.write_text(json.dumps(coco))
    datasets = get_datasets(["shapes_val"], str(tmp_path))
    records, set_classes = datasets[0].records, datasets[0].class_names
    assert set_classes == ["square", "circle", "triangle"]  # by category id
    assert {k for r in records for k in r["labels"].tolist()} >= {1, 2}  # squares and circles to confuse
    model = _Oracle(records, set_classes, ["circle", "square", "triangle"])
    assert evaluate_test_sets(datasets, model=model)["shapes_val"]["AP"] == pytest.approx(100.0)
    with caplog.at_level("WARNING", logger="detection.evaluation.test_sets"):
        unnamed = evaluate_test_sets(datasets, model=_Oracle(records, set_classes))  # labels in the set's order
    assert unnamed["shapes_val"]["AP"] == pytest.approx(100.0)
    assert ("the model's class names are not known (the model has no class_names, nor were they given): each test "
            "set is scored by label number, label k as its k-th class (shapes_val: square, circle, triangle)"
            ) in caplog.text


def test_images_with_more_objects_than_the_model_keeps_are_said_once(tmp_path, caplog):
    """model.roi_heads.detections_per_image (100) caps recall on crowded images: a many-class
    trial's AP fell from 23.3 to 11.1 on images of 150-500 objects, with no word. One warning per
    set and cap, not one per evaluation of a training."""
    generate_shapes(tmp_path / "shapes", num_train=1, num_val=4, seed=0, image_size=(64, 80))
    entry = {"type": "coco", "name": "crowded", "ann_file": "shapes/annotations/instances_val.json",
             "image_root": "shapes/val"}
    datasets = get_datasets([entry], str(tmp_path))
    counts = [len(r["boxes"]) for r in datasets[0].records]
    assert max(counts) > 1
    model = _Oracle(datasets[0].records * 2, datasets[0].class_names)
    model.roi_heads = type("Heads", (), {"detections_per_image": 1})()
    with caplog.at_level("WARNING", logger="detection.evaluation.test_sets"):
        for _ in range(2):
            evaluate_test_sets(datasets, model=model)
    said = [r.getMessage() for r in caplog.records if "more objects than" in r.getMessage()]
    assert said == [f"test set crowded: {sum(c > 1 for c in counts)} of its 4 images hold more objects than the model "
                    f"keeps detections (model.roi_heads.detections_per_image=1; up to {max(counts)} objects): recall "
                    "and AP are capped there; raise it for such images (Detectron2's LVIS configs use 300 detections)"]
    model = _Oracle(datasets[0].records, datasets[0].class_names)
    model.roi_heads = type("Heads", (), {"detections_per_image": 100})()
    caplog.clear()
    evaluate_test_sets(datasets, model=model)
    assert not [r for r in caplog.records if "more objects than" in r.getMessage()]


def test_a_test_set_that_cannot_be_scored_stops_training_before_its_first_iteration(tmp_path, monkeypatch):
    # a data-set kind without an evaluator (a new reader's) was found at the first evaluation,
    # test.eval_period iterations into the run
    from detection.data import DataError
    from detection.engine.startup import build_test_datasets

    generate_shapes(tmp_path / "shapes", num_train=2, num_val=2, seed=0, image_size=(64, 80))
    cfg = load_config(None, tiny_overrides(tmp_path, tmp_path / "out"))
    assert [d.name for d in build_test_datasets(cfg, ["circle", "square", "triangle"])] == ["shapes_val"]
    monkeypatch.delitem(test_sets.EVALUATORS, "coco")
    with pytest.raises(DataError, match="data set shapes_val: unknown kind 'coco'"):
        build_test_datasets(cfg, ["circle", "square", "triangle"])


def _dense_set(tmp_path, name):
    """One 400x400 image with 150 circles (20 px, a grid) and 10 squares, as a COCO json: the set
    `name` (each test its own: a set's crowd warning is said once per process)."""
    import cv2
    import numpy as np

    (tmp_path / "dense").mkdir()
    cv2.imwrite(str(tmp_path / "dense" / "a.png"), np.zeros((400, 400, 3), np.uint8))
    boxes = [[x * 30.0, y * 30.0, 20.0, 20.0] for y in range(13) for x in range(13)][:160]
    anns = [{"id": n + 1, "image_id": 1, "category_id": 1 if n < 150 else 2, "bbox": box, "area": 400.0,
             "iscrowd": 0} for n, box in enumerate(boxes)]
    (tmp_path / "dense.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 400, "height": 400}], "annotations": anns,
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]}))
    entry = {"type": "coco", "name": name, "ann_file": "dense.json", "image_root": "dense"}
    return get_datasets([entry], str(tmp_path)), anns


def test_crowded_images_are_scored_whole_with_coco_max_dets_and_the_cap_is_said(tmp_path, caplog):
    """A dense-scene trial: perfect detections of 150 circles in an image scored AP-circle 66.3,
    COCOeval counting 100 detections per image and class, with no word. The cap is said, and
    test.coco_max_dets raises it (Detectron2's COCOEvaluator max_dets_per_image)."""
    from detection.evaluation.report import read_detections, section_for_test_set

    datasets, anns = _dense_set(tmp_path, "dense")
    results = [{"image_id": 1, "category_id": a["category_id"], "bbox": a["bbox"], "score": 1 - n * 1e-3}
               for n, a in enumerate(anns)]
    (tmp_path / "coco_results.json").write_text(json.dumps(results))
    with caplog.at_level("WARNING", logger="detection.evaluation.test_sets"):
        capped = evaluate_test_sets(datasets, results=str(tmp_path / "coco_results.json"))["dense"]
    # 100 of 150 found at precision 1: 67 of COCOeval's 101 recall points (0, 0.01, ..., 0.66)
    assert capped["AP-circle"] == pytest.approx(100 * 67 / 101) and capped["AP-square"] == 100
    assert "test set dense: 1 of its 1 images hold more than 100 objects of one class (up to 150), and COCOeval " \
        "counts 100 detections per image and class (test.coco_max_dets): AP and AR are capped there" in caplog.text
    whole = evaluate_test_sets(datasets, results=str(tmp_path / "coco_results.json"), coco_max_dets=1000)["dense"]
    assert whole["AP"] == whole["AP-circle"] == whole["AR1000"] == 100 and "AR100" not in whole
    assert whole["AR10"] == pytest.approx(100 * (10 / 150 + 10 / 10) / 2)  # AR1 and AR10 keep their counts
    # the report counts as the metric does: 50 circles missed at 100, none at 1000
    detections = read_detections(datasets[0], str(tmp_path / "coco_results.json"))
    for max_dets, missed in ((100, 50), (1000, 0)):
        section = section_for_test_set(datasets[0], capped, detections, coco_max_dets=max_dets)
        assert {c["name"]: c["missed"] for c in section.per_class} == {"circle": missed, "square": 0}


def test_fewer_proposals_than_objects_is_said_as_the_cap(tmp_path, caplog):
    """A dense-scene trial: detections_per_image raised to 400 silenced the warning while the RPN's
    200 proposals still capped recall (AP 31.3 against 37.4 at 1000 proposals): the smaller cap is said."""
    datasets, _ = _dense_set(tmp_path, "dense_proposals")
    model = _Oracle(datasets[0].records, datasets[0].class_names)
    model.roi_heads = type("Heads", (), {"detections_per_image": 400})()
    model.rpn = type("RPN", (), {"post_nms_topk": {True: 2000, False: 120}})()
    with caplog.at_level("WARNING", logger="detection.evaluation.test_sets"):
        evaluate_test_sets(datasets, model=model, coco_max_dets=1000)
    said = [r.getMessage() for r in caplog.records if "more objects than" in r.getMessage()]
    assert said == ["test set dense_proposals: 1 of its 1 images hold more objects than the model takes proposals "
                    "(each image's detections come from them) (model.rpn.post_nms_topk_test=120; up to 160 objects): "
                    "recall and AP are capped there; raise it for such images (Detectron2 tests with 1000 "
                    "proposals)"]
    assert "COCOeval counts" not in caplog.text  # 150 of one class under 1000
