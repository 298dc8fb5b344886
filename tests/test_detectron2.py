"""Detectron2 model-zoo C4 checkpoints: they load (both file formats, strictly) and reproduce the
detections that real Detectron2 computed with the same file (tests/fixtures/detectron2_c4)."""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from detection.config import load_config
from detection.data.image_io import read_image
from detection.engine.checkpoint import CheckpointError
from detection.engine.detectron2 import background_first, detectron2_name
from detection.engine.loading import load_detector_weights, read_detector_file
from detection.modeling.model import build_model
from detection.predictor import Predictor
from tests.helpers import (DETECTRON2_CASE, DETECTRON2_FIXTURE, DETECTRON2_R50, TEST_CORES, load_tool,
                           matched_to_detectron2, run_main)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE, CASE, R50 = DETECTRON2_FIXTURE, DETECTRON2_CASE, DETECTRON2_R50
CONFIGS = ROOT / "configs" / "detectron2"
TRAINING = CASE / "training"  # Detectron2's losses and gradients of one step (make_training_reference.py)


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    """ResNet-50 at 800 px with 1000 RoIs is the one heavy computation of the suite, and nothing
    runs beside it: both cores (conftest sets one thread for the small tests), or one where
    tests/parallel.py runs another pytest process beside this one."""
    before = torch.get_num_threads()
    torch.set_num_threads(TEST_CORES)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def predictor(d2_files):
    return Predictor.from_config(R50, weights=d2_files[0], device="cpu")


@pytest.fixture(scope="session")
def reference():
    return json.loads((CASE / "d2_outputs.json").read_text())


@pytest.fixture(scope="session")
def run_case(predictor):
    """name -> the Predictor's detections on that fixture image, and what its model's RPN was
    given and gave on the way (the trunk's input size, image_sizes, proposals): each image runs
    once for the detection and the proposal tests (800 px ResNet-50, seconds a run)."""
    runs: dict = {}

    def run(name: str) -> tuple[dict, dict]:
        if name not in runs:
            seen: dict = {}
            model = predictor.model
            hooks = [model.trunk.register_forward_pre_hook(lambda m, args: seen.update(padded=args[0].shape[-2:])),
                     model.rpn.register_forward_hook(
                         lambda m, args, out: seen.update(image_sizes=args[1], proposals=out[0]))]
            try:
                detections = predictor(str(CASE / "images" / f"{name}.png"))
            finally:
                for hook in hooks:
                    hook.remove()
            runs[name] = detections, seen
        return runs[name]
    return run


def assert_same_detections(ours: dict, theirs: dict, max_unmatched: int = 1) -> None:
    """Same labels (Detectron2's class + 1), boxes within 0.01 px, scores within 1e-3; the order
    may differ only among near-equal scores, and at most `max_unmatched` detections (an NMS tie
    decided the other way) may be missing on each side."""
    boxes, scores, labels = (torch.tensor(theirs[k]) for k in ("boxes", "scores", "classes"))
    labels = labels + 1
    assert abs(len(ours["boxes"]) - len(boxes)) <= max_unmatched
    unmatched = 0
    for box, score, label in zip(boxes, scores, labels):
        close = ((ours["boxes"] - box).abs().max(dim=1).values <= 0.01) & \
                ((ours["scores"] - score).abs() <= 1e-3) & (ours["labels"] == label)
        unmatched += int(not close.any())
    assert unmatched <= max_unmatched, f"{unmatched} of {len(boxes)} Detectron2 detections not reproduced"
    assert torch.all(ours["scores"][:-1] >= ours["scores"][1:] - 1e-6)  # best first


@pytest.mark.slow  # the fixture checkpoint: ResNet-50, 135 MB, 800 px images
@pytest.mark.parametrize("name", ["exact_0", "exact_1", "resize_0", "resize_1"])
def test_predictor_reproduces_detectron2_detections(run_case, reference, name):
    """exact_*: no resize; resize_*: 480x640 up and 1000x750 down to Detectron2's 800 px with
    its uint8 PIL resize (input.resize_mode detectron2)."""
    ours, _ = run_case(name)
    assert_same_detections(ours, reference[name])
    assert matched_to_detectron2(ours, reference[name]) >= 0.99
    assert len(ours["boxes"]) == 100 and ours["labels"].min() >= 1 and ours["labels"].max() <= 80


@pytest.mark.slow  # the fixture checkpoint: ResNet-50, 135 MB, 800 px images
@pytest.mark.parametrize("name", ["exact_0", "exact_1"])
def test_rpn_proposals_equal_detectron2s(run_case, reference, name):
    """The proposals of the Predictor's own run (its model's RPN, observed by run_case)."""
    _, seen = run_case(name)
    assert tuple(seen["image_sizes"][0]) == (reference[name]["height"], reference[name]["width"])
    assert tuple(seen["padded"]) == tuple(seen["image_sizes"][0])  # size_divisibility 0: no padding
    theirs = torch.tensor(reference[name]["proposals"])
    ours = seen["proposals"][0]
    assert len(ours) == len(theirs) == 1000
    differ = ((ours - theirs).abs().max(dim=1).values > 0.01).nonzero().flatten().tolist()
    # Neighbours whose objectness is tied to 1e-4 (1e-5 relative: the float rounding of the fast
    # path's Winograd convolutions) may come out in either order; apart from such swaps an NMS
    # tie may change the last kept box or two, nothing more.
    logits = reference[name]["objectness"]
    swapped = [i for i in differ if any(0 <= j < len(theirs) and abs(logits[i] - logits[j]) < 1e-4
                                        and float((ours[i] - theirs[j]).abs().max()) <= 0.01 for j in (i - 1, i + 1))]
    assert len(swapped) <= 8 and len(differ) - len(swapped) <= 2, differ[:10]


@pytest.mark.slow  # the fixture checkpoint: ResNet-50, 135 MB, 800 px images
def test_both_file_formats_give_the_same_weights(d2_files):
    pkl, pth = (read_detector_file(p) for p in d2_files)
    assert pkl.format == pth.format == "detectron2"
    assert pkl.state.keys() == pth.state.keys() and not pkl.unknown
    assert all(torch.equal(pkl.state[k], pth.state[k]) for k in pkl.state)
    raw = pickle.load(open(d2_files[0], "rb"))["model"]
    # background row moved from last (Detectron2) to first (ours); bbox_pred untouched
    cls = raw["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(pkl.state["roi_heads.predictor.cls_score.weight"][0], torch.from_numpy(cls[80]))
    assert torch.equal(pkl.state["roi_heads.predictor.cls_score.weight"][1:], torch.from_numpy(cls[:80]))
    assert torch.equal(pkl.state["roi_heads.predictor.bbox_pred.weight"],
                       torch.from_numpy(raw["roi_heads.box_predictor.bbox_pred.weight"]))


def test_name_mapping_and_background_row():
    assert detectron2_name("backbone.stem.conv1.norm.running_var") == "trunk.stem.norm1.running_var"
    assert detectron2_name("backbone.res4.5.conv2.norm.bias") == "trunk.res4.5.norm2.bias"
    assert detectron2_name("backbone.res2.0.shortcut.weight") == "trunk.res2.0.shortcut.0.weight"
    assert detectron2_name("roi_heads.res5.0.shortcut.norm.weight") == "roi_heads.res5.0.shortcut.1.weight"
    assert detectron2_name("proposal_generator.rpn_head.anchor_deltas.bias") == "rpn.head.anchor_deltas.bias"
    assert detectron2_name("roi_heads.box_predictor.bbox_pred.weight") == "roi_heads.predictor.bbox_pred.weight"
    assert detectron2_name("roi_heads.mask_head.deconv.weight") is None
    assert background_first(torch.tensor([1.0, 2.0, 3.0, 0.0])).tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.fixture(scope="module")
def r50_model_and_weights(d2_files):
    cfg = load_config(R50)
    return build_model(cfg), read_detector_file(d2_files[0])


@pytest.mark.slow  # the fixture checkpoint: ResNet-50, 135 MB, 800 px images
@pytest.mark.parametrize("change, message", [
    (lambda w: w.unknown.append("roi_heads.box_predictor.extra.weight"),
     "1 tensors of the file have no place in the model (roi_heads.box_predictor.extra.weight)"),
    (lambda w: w.state.pop("trunk.res3.1.norm2.running_var"),
     "1 model tensors are not in the file (trunk.res3.1.norm2.running_var)"),
    (lambda w: w.state.update({"rpn.head.conv.bias": torch.zeros(5)}),
     "1 shapes differ (rpn.head.conv.bias (5,) in the file, (1024,) in the model)"),
    (lambda w: [w.state.pop(k) for k in sorted(w.state) if k.startswith("trunk.res2.")],  # a whole stage
     "model tensors are not in the file (trunk.res2.0.conv1.weight, trunk.res2.0.conv2.weight, "
     "trunk.res2.0.conv3.weight, trunk.res2.0.norm1.bias, trunk.res2.0.norm1.running_mean, "
     "trunk.res2.0.norm1.running_var, ... ("),
])
def test_a_checkpoint_that_does_not_fit_is_one_error_naming_the_tensors(r50_model_and_weights, change, message):
    model, weights = r50_model_and_weights
    bad = type(weights)(weights.path, weights.format, dict(weights.state), unknown=list(weights.unknown))
    change(bad)
    with pytest.raises(CheckpointError) as err:
        load_detector_weights(model, bad)
    assert message in str(err.value) and str(weights.path) in str(err.value)


def test_a_file_that_is_no_checkpoint_is_named(tmp_path):
    bad = tmp_path / "model_final.pkl"
    bad.write_bytes(b"\x80\x04 this is not a pickle at all")
    with pytest.raises(CheckpointError, match=r"model_final.pkl: not a readable checkpoint"):
        read_detector_file(bad)
    zoo = tmp_path / "other.pkl"
    zoo.write_bytes(pickle.dumps({"model": {"fc.weight": np.zeros((2, 2), np.float32)}}))
    assert read_detector_file(zoo) is None  # weights, but no detector's: the caller says what it needed


@pytest.mark.slow  # the fixture checkpoint: ResNet-50, 135 MB, 800 px images
def test_old_zoo_buffers_are_checked_against_the_config(r50_model_and_weights):
    """Older model-zoo files carry pixel_mean/std and cell anchors: they must agree with the config."""
    model, weights = r50_model_and_weights
    ok = type(weights)(weights.path, weights.format, weights.state, extra={
        "pixel_mean": torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1),
        "proposal_generator.anchor_generator.cell_anchors.0": model.rpn.anchor_generator.cell_anchors.clone()})
    load_detector_weights(model, ok)
    bad = type(weights)(weights.path, weights.format, weights.state,
                        extra={"pixel_mean": torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)})
    with pytest.raises(CheckpointError, match="differs from the config's model.pixel_mean"):
        load_detector_weights(model, bad)


def _d2_keys(depth: int, num_classes: int) -> list[tuple[str, list[int]]]:
    """Detectron2's C4 parameter names and shapes for another depth / class count, derived from
    the R50 COCO list: ResNet-101 has 23 res4 blocks instead of 6; the predictor has K+1 / 4K rows."""
    keys = json.loads((FIXTURE / "keys_R_50_C4_coco.json").read_text())
    blocks = {50: 6, 101: 23}[depth]
    out = []
    for name, shape in keys:
        if name.startswith("backbone.res4.5."):
            out += [(name.replace("res4.5.", f"res4.{i}."), shape) for i in range(5, blocks)]
            continue
        if name.startswith("roi_heads.box_predictor.cls_score"):
            shape = [num_classes + 1] + shape[1:]
        if name.startswith("roi_heads.box_predictor.bbox_pred"):
            shape = [4 * num_classes] + shape[1:]
        out.append((name, shape))
    return out


@pytest.mark.slow  # builds ResNet-50 and ResNet-101 detectors at full size
@pytest.mark.parametrize("config, depth, classes", [
    ("faster_rcnn_R_50_C4_1x.yaml", 50, 80), ("faster_rcnn_R_50_C4_3x.yaml", 50, 80),
    ("faster_rcnn_R_101_C4_3x.yaml", 101, 80), ("faster_rcnn_R_50_C4_voc.yaml", 50, 20)])
def test_every_detectron2_config_takes_its_zoo_checkpoint_exactly(tmp_path, config, depth, classes):
    """No fixture of their own: a checkpoint with Detectron2's names and shapes for that model
    must fill the config's model with nothing missing, nothing left over."""
    state = {name: np.zeros(shape, np.float32) for name, shape in _d2_keys(depth, classes)}
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": state, "__author__": "Detectron2 Model Zoo"}))
    cfg = load_config(CONFIGS / config)
    model = build_model(cfg)
    load_detector_weights(model, read_detector_file(path))
    assert len(cfg.model.class_names) == cfg.model.num_classes == classes


def test_configs_use_detectron2s_model_and_test_settings():
    """Each setting that decides Detectron2's detections, against its resolved config."""
    d2 = yaml.safe_load((CASE / "d2_config.yaml").read_text())
    m, i, rpn, heads = d2["MODEL"], d2["INPUT"], d2["MODEL"]["RPN"], d2["MODEL"]["ROI_HEADS"]
    for config in sorted(CONFIGS.glob("faster_rcnn_*.yaml")):
        c = load_config(config)
        assert (c.input.min_size_test, c.input.max_size_test) == (i["MIN_SIZE_TEST"], i["MAX_SIZE_TEST"])
        assert c.input.resize_mode == "detectron2" and c.model.size_divisibility == 0
        assert (c.model.input_format, c.model.pixel_mean, c.model.pixel_std) == \
            (i["FORMAT"], m["PIXEL_MEAN"], m["PIXEL_STD"])
        assert c.model.backbone.stride_in_1x1 is m["RESNETS"]["STRIDE_IN_1X1"]
        assert c.model.backbone.freeze_at == m["BACKBONE"]["FREEZE_AT"]
        assert c.model.anchors.sizes == m["ANCHOR_GENERATOR"]["SIZES"][0]
        assert c.model.anchors.aspect_ratios == m["ANCHOR_GENERATOR"]["ASPECT_RATIOS"][0]
        assert (c.model.rpn.pre_nms_topk_test, c.model.rpn.post_nms_topk_test, c.model.rpn.nms_thresh) == \
            (rpn["PRE_NMS_TOPK_TEST"], rpn["POST_NMS_TOPK_TEST"], rpn["NMS_THRESH"])
        assert (c.model.rpn.pre_nms_topk_train, c.model.rpn.post_nms_topk_train) == \
            (rpn["PRE_NMS_TOPK_TRAIN"], rpn["POST_NMS_TOPK_TRAIN"])
        assert (c.model.roi_heads.score_thresh_test, c.model.roi_heads.nms_thresh_test,
                c.model.roi_heads.detections_per_image) == \
            (heads["SCORE_THRESH_TEST"], heads["NMS_THRESH_TEST"], d2["TEST"]["DETECTIONS_PER_IMAGE"])
        assert c.model.roi_heads.pooler_resolution == m["ROI_BOX_HEAD"]["POOLER_RESOLUTION"]
        assert c.model.roi_heads.bbox_reg_weights == m["ROI_BOX_HEAD"]["BBOX_REG_WEIGHTS"]
        assert c.model.roi_heads.batch_size_per_image == heads["BATCH_SIZE_PER_IMAGE"]
        assert c.input.max_size_train == i["MAX_SIZE_TRAIN"]
        assert (c.solver.base_lr, c.solver.ims_per_batch) == (d2["SOLVER"]["BASE_LR"], d2["SOLVER"]["IMS_PER_BATCH"])
    coco = load_config(R50)
    assert coco.input.min_size_train == i["MIN_SIZE_TRAIN"]
    assert (coco.solver.steps, coco.solver.max_iter) == (d2["SOLVER"]["STEPS"], d2["SOLVER"]["MAX_ITER"])


@pytest.mark.slow  # the fixture checkpoint: ResNet-50, forward and backward on two small images
@pytest.mark.parametrize("fast_path", [False, True])
def test_one_training_step_gives_detectron2s_losses_and_gradients(d2_files, fast_path):
    """Real Detectron2 computed one train-mode pass of the fixture checkpoint on two small images
    (make_training_reference.py): its four losses and its gradients. The project's model from
    the same file and configs/detectron2 gives the same, on the plain path and on the fast path
    as the trainer sets it up: it trains what Detectron2 trains, not only detects the same. The
    sampling takes every labelled anchor and every proposal, so nothing random decides it."""
    from detection.accel import optimize_for_training

    reference = json.loads((TRAINING / "d2_training.json").read_text())
    s = reference["sampling"]
    cfg = load_config(R50, [f"model.rpn.batch_size_per_image={s['rpn_batch_size_per_image']}",
                            f"model.rpn.positive_fraction={s['rpn_positive_fraction']}",
                            f"model.roi_heads.batch_size_per_image={s['roi_batch_size_per_image']}",
                            f"model.roi_heads.positive_fraction={s['roi_positive_fraction']}",
                            f"model.rpn.pre_nms_topk_train={s['pre_nms_topk_train']}",
                            f"model.rpn.post_nms_topk_train={s['post_nms_topk_train']}"])
    model = build_model(cfg)
    load_detector_weights(model, read_detector_file(d2_files[0]))
    model.train()
    if fast_path:
        optimize_for_training(model, channels_last=True)  # as the trainer does
    images = [torch.from_numpy(read_image(str(TRAINING / name))).permute(2, 0, 1).float()
              for name in reference["images"]]
    targets = [{"boxes": torch.tensor(v["boxes"]), "labels": torch.tensor(v["labels"])}
               for v in reference["images"].values()]
    losses = model(images, targets)
    sum(losses.values()).backward()
    for theirs, ours in {"loss_rpn_cls": "loss_rpn_cls", "loss_rpn_loc": "loss_rpn_box", "loss_cls": "loss_cls",
                         "loss_box_reg": "loss_box"}.items():
        assert float(losses[ours].detach()) == pytest.approx(reference["losses"][theirs], rel=1e-4), (theirs, losses)
    params = dict(model.named_parameters())
    for name, norms in reference["gradient_channel_norms"].items():  # Detectron2's names
        grad = params[detectron2_name(name)].grad
        ours = grad.flatten(1).norm(dim=1) if grad.dim() > 1 else grad.abs()
        theirs = torch.tensor(norms)
        theirs = background_first(theirs) if ".cls_score." in name else theirs
        assert ours.shape == theirs.shape and (ours - theirs).norm() <= 1e-3 * theirs.norm(), name
        # the direction too: the whole gradient against three fixed waves, in Detectron2's layout
        if ".cls_score." in name:
            grad = torch.cat([grad[1:], grad[:1]])  # background row last, as Detectron2 has it
        flat = grad.detach().double().flatten()
        index = torch.arange(flat.numel(), dtype=torch.float64)
        ours = torch.stack([(flat * torch.cos(index * (0.61803 * k))).sum() for k in (1, 2, 3)])
        theirs = torch.tensor(reference["gradient_projections"][name], dtype=torch.float64)
        assert (ours - theirs).abs().max() <= 1e-3 * float(torch.tensor(norms).norm()), (name, ours, theirs)


@pytest.mark.slow  # the fixture checkpoint: ResNet-50, 135 MB, 800 px images
def test_predictor_input_convention(predictor):
    image = read_image(str(CASE / "images" / "resize_0.png"))
    with pytest.raises(ValueError, match="Predictor: the image must be uint8 0..255, got dtype float32"):
        predictor(image.astype(np.float32) / 255)
    with pytest.raises(ValueError, match=r"shape \(H, W, 3\)"):
        predictor(image[:, :, 0])
    assert predictor.class_names[:3] == ["person", "bicycle", "car"] and len(predictor.class_names) == 80


@pytest.mark.slow  # the fixture checkpoint: ResNet-50, 135 MB, 800 px images
def test_fine_tuning_from_a_zoo_checkpoint_on_other_classes(d2_files, tmp_path, caplog):
    """The paper's COCO-then-VOC recipe: model.weights is an 80-class Detectron2 detector, the
    config has 3 classes. Everything but cls_score / bbox_pred starts from the file, those two
    start fresh, and the run says so. No ImageNet backbone file is asked for."""
    from detection.data.shapes import generate_shapes
    from detection.engine.trainer import train

    generate_shapes(tmp_path / "data" / "shapes", num_train=2, num_val=1, seed=0, image_size=(64, 80))
    overrides = {
        "model.weights": str(d2_files[0]), "model.num_classes": 3, "model.class_names": [],
        # not in this machine's torch hub cache: it must not be asked for when model.weights is a detector
        "model.backbone.weights": "torchvision:IMAGENET1K_V1",
        "model.rpn.pre_nms_topk_train": 100, "model.rpn.post_nms_topk_train": 20,
        "model.roi_heads.batch_size_per_image": 8, "input.min_size_train": [64], "input.max_size_train": 96,
        "datasets.root": str(tmp_path / "data"), "datasets.train": ["shapes_train"], "datasets.test": ["shapes_val"],
        "dataloader.num_workers": 0, "solver.ims_per_batch": 1, "solver.base_lr": 1e-12, "solver.momentum": 0.0,
        "solver.max_iter": 1, "output_dir": str(tmp_path / "out"), "device": "cpu"}
    cfg = load_config(R50, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    with caplog.at_level("INFO"):
        model = train(cfg)
    start = read_detector_file(d2_files[0]).state
    state = model.state_dict()
    assert state["roi_heads.predictor.cls_score.weight"].shape == (4, 2048)
    assert state["roi_heads.predictor.bbox_pred.weight"].shape == (12, 2048)
    for key in ("trunk.stem.conv1.weight", "trunk.res4.5.conv3.weight", "rpn.head.objectness_logits.bias",
                "roi_heads.res5.2.norm3.weight"):
        assert torch.allclose(state[key], start[key], atol=1e-6), key
    assert "80 classes, the config 3" in caplog.text and "roi_heads.predictor.cls_score.weight" in caplog.text


COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]


@pytest.mark.slow  # the fixture checkpoint: ResNet-50, 135 MB, 800 px images
def test_readme_commands_with_a_zoo_file(d2_files, predictor, tmp_path, capsys, restore_logging):
    """The README's "Use a published detector" commands, with the fixture file standing in for the
    download: draw detections on your own image, evaluate on a COCO-format set (real COCO ids,
    non-contiguous: results must carry them). Smaller test size here, for speed."""
    names = predictor.class_names
    image = CASE / "images" / "resize_0.png"
    ann = {"images": [{"id": 7, "file_name": image.name, "height": 480, "width": 640}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [100, 100, 50, 80], "area": 4000,
                            "iscrowd": 0}],
           "categories": [{"id": i, "name": n} for i, n in zip(COCO_IDS, names)]}
    (tmp_path / "val.json").write_text(json.dumps(ann))
    small = ["input.min_size_test=320", "input.max_size_test=480", "model.rpn.post_nms_topk_test=100",
             "dataloader.num_workers=0", "device=cpu"]
    config = str(R50)

    def run(tool, *args):  # the command line, run by the tool's main() in this process
        code, out, err = run_main(load_tool(tool), list(args), capsys)
        assert code == 0, err[-2000:]
        return out

    run("visualize", "--config", config, "--weights", str(d2_files[0]), "--input", str(image),
        "--output", str(tmp_path / "vis"), *small)
    assert len(list((tmp_path / "vis").glob("*.jpg"))) == 1
    test_set = json.dumps([{"type": "coco", "ann_file": str(tmp_path / "val.json"), "image_root": str(image.parent)}])
    out = run("eval", "--config", config, "--weights", str(d2_files[1]), "--output-dir",
              str(tmp_path / "eval"), f"datasets.test={test_set}", *small)
    assert "AP50" in out
    results = json.loads(next((tmp_path / "eval").rglob("coco_results.json")).read_text())
    same = Predictor.from_config(R50, weights=d2_files[0], overrides=small[:3], device="cpu")(str(image))
    assert {r["image_id"] for r in results} == {7} and len(results) == len(same["labels"]) > 0
    # label k (1..80) is written as the k-th COCO id: 24 is "zebra", 62 "chair" (ids 12, 26, ... unused)
    assert sorted(r["category_id"] for r in results) == sorted(COCO_IDS[k - 1] for k in same["labels"].tolist())


@pytest.mark.slow  # the fixture checkpoint: ResNet-50, 135 MB, 800 px images
def test_bfloat16_inference_on_detectron2_weights(d2_files, reference, monkeypatch):
    """test.amp on Detectron2's weights: the share of (real Detectron2's, float32) detections
    found again (IoU >= 0.9, same label). The fixture's weights are random, so its scores are
    close together (the best three 0.664 / 0.655 / 0.649) and bfloat16's rounding reorders them:
    measured 78-94% per image, below the 95% that would make test.amp a default (it is off).
    This guards that figure. bfloat16 numerics are forced, also on a CPU without bfloat16
    instructions (where test.amp would fall back to float32)."""
    from torchvision.ops import box_iou

    from detection.modeling import precision

    if not precision.cpu_bf16_flags():
        pytest.skip("this CPU has no bfloat16 instructions: test.amp runs float32 here, and emulating bfloat16 "
                    "for this figure took 300 s (77-92% per image, mean 84.5%, on an AVX2-only AMD EPYC)")
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    amp = Predictor.from_config(R50, weights=d2_files[0], overrides=["test.amp=true"], device="cpu")
    assert amp.model.amp
    shares = []
    for name in ("exact_0", "exact_1", "resize_0", "resize_1"):
        ours = amp(str(CASE / "images" / f"{name}.png"))
        theirs = reference[name]
        boxes, labels = torch.tensor(theirs["boxes"]), torch.tensor(theirs["classes"]) + 1
        iou = box_iou(boxes, ours["boxes"])  # (D2, ours)
        matched = ((iou >= 0.9) & (labels[:, None] == ours["labels"][None, :])).any(dim=1)
        shares.append(float(matched.float().mean()))
        assert ours["scores"].dtype == torch.float32
    print(f"bfloat16: share of float32 detections matched per image: {shares}")
    assert min(shares) >= 0.75 and sum(shares) / len(shares) >= 0.85, shares
