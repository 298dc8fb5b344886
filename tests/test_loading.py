"""Detector weights of this project: recognised by content, loaded strictly, checked against the
settings they were trained with, and re-used across label sets for fine-tuning."""
import copy
import dataclasses

import pytest
import torch

from detection.config import config_to_dict, load_config
from detection.engine.checkpoint import CheckpointError, save_checkpoint
from detection.engine.loading import DetectorWeights, load_detector_weights, load_initial_weights, read_detector_file
from detection.engine.inference_model import build_inference_model, check_model_settings
from detection.modeling.model import build_model

TINY = ["model.num_classes=3", "model.backbone.depth=18", "model.backbone.norm=gn", "model.backbone.weights=null",
        "model.anchors.sizes=[16,32]", "model.roi_heads.pooler_resolution=6", "device=cpu"]


def tiny_cfg(*extra):
    return load_config(None, [*TINY, *extra])


@pytest.fixture
def trained(tmp_path):
    """A checkpoint as training writes it: model, config, class names (a .pth under another suffix)."""
    cfg = tiny_cfg("model.input_format=BGR", "model.pixel_std=[1,1,1]")
    model = build_model(cfg)
    path = tmp_path / "detector.weights"
    save_checkpoint({"model": model.state_dict(), "config": config_to_dict(cfg),
                     "class_names": ["disc", "box", "cross"]}, path)
    return path, model


def test_our_checkpoint_is_recognised_by_content(trained):
    path, model = trained
    weights = read_detector_file(path)
    assert weights.format == "c4det" and weights.num_classes == 3
    assert weights.class_names == ["disc", "box", "cross"] and weights.config["model"]["input_format"] == "BGR"
    assert weights.state.keys() == model.state_dict().keys()
    # loaded as the README shows: the model knows what its labels mean (a growing-data trial: evaluate(cfg,
    # model) scored by label number a test set listing the classes in another order)
    fresh = build_model(tiny_cfg("model.input_format=BGR", "model.pixel_std=[1,1,1]"))
    assert fresh.class_names is None
    load_detector_weights(fresh, weights)
    assert fresh.class_names == ["disc", "box", "cross"]
    named = build_model(tiny_cfg("model.input_format=BGR", "model.pixel_std=[1,1,1]"))
    named.class_names = ["a", "b", "c"]  # a caller's own names are theirs
    load_detector_weights(named, weights)
    assert named.class_names == ["a", "b", "c"]


def test_a_checkpoint_in_torchs_format_before_1_6_is_read(trained, tmp_path):
    """torch.save(..., _use_new_zipfile_serialization=False), as torch < 1.6 and older model zoos
    wrote: it was refused as "holds a int, not a checkpoint" (its first pickle, torch's magic number)."""
    path, model = trained
    legacy = tmp_path / "legacy.pth"
    torch.save(torch.load(path, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    assert legacy.read_bytes()[:4] != b"PK\x03\x04"  # not a zip
    weights = read_detector_file(legacy)
    assert weights.format == "c4det" and weights.class_names == ["disc", "box", "cross"]
    assert all(torch.equal(weights.state[k], v) for k, v in model.state_dict().items())


def test_a_model_setting_given_in_a_sections_mapping_is_deliberate(trained):
    """eval.py refused "model.roi_heads={pooler_resolution: 7}" with "give
    model.roi_heads.pooler_resolution=... on the command line", which the user had done (a review)."""
    from detection.config.reading import override_keys_of

    path, _ = trained
    overrides = ["model.input_format=BGR", "model.pixel_std=[1,1,1]", "model.roi_heads={pooler_resolution: 7}"]
    cfg = tiny_cfg(*overrides)
    assert override_keys_of(overrides[2:]) == ["model.roi_heads.pooler_resolution"]
    check_model_settings(cfg, read_detector_file(path), override_keys_of(overrides))
    with pytest.raises(CheckpointError, match="model.roi_heads.pooler_resolution"):
        check_model_settings(cfg, read_detector_file(path), override_keys_of(overrides[:2]))


def test_class_names_one_per_class_or_the_file_is_refused(trained, tmp_path):
    """torchvision's category lists start with "__background__": saved so beside a 3-class model,
    4 names were read as its classes, so eval.py took the test set for "a subset", dropped class 1's
    detections and scored square as circle (AP50 8.4 against 18.1; a helper's trial), and the
    Predictor's class_names[label - 1] named a square "circle"."""
    path, model = trained
    for names, hint in ((["__background__", "disc", "box", "cross"], True), (["disc", "box"], False)):
        bad = tmp_path / f"{len(names)}.pth"
        torch.save({"model": model.state_dict(), "class_names": names}, bad)
        with pytest.raises(CheckpointError) as err:
            read_detector_file(bad)
        assert f"its class_names list {len(names)} names" in str(err.value)
        assert "its classifier has 3 classes (cls_score's 4 rows, background included)" in str(err.value)
        assert ("the background is no class here" in str(err.value)) == hint


def test_a_config_that_changes_a_model_setting_is_an_error(trained):
    """Evaluating an MSRA-style (BGR, std 1) checkpoint with an RGB config ran and scored 0.02 mAP."""
    path, _ = trained
    cfg = tiny_cfg()  # RGB, ImageNet std
    with pytest.raises(CheckpointError, match=r"trained with model.input_format='BGR' but the config has 'RGB'"):
        build_inference_model(cfg, path, torch.device("cpu"))
    model, weights = build_inference_model(cfg, path, torch.device("cpu"),
                                           explicit=["model.input_format", "model.pixel_std"])
    assert model.input_format == "RGB" and weights.class_names == ["disc", "box", "cross"]
    model, _ = build_inference_model(tiny_cfg("model.input_format=BGR", "model.pixel_std=[1,1,1]",
                                              "model.roi_heads.score_thresh_test=0.5"), path, torch.device("cpu"))
    assert model.roi_heads.score_thresh_test == 0.5  # test-time settings come from the config


def test_test_settings_other_than_the_runs_are_said_once(trained, caplog):
    """tools/ablate.py with the README's --config evaluated at that file's test size, not the
    run's, in silence (a trial: its baseline AP 0.6 against eval.py's 2.9 on the same checkpoint).
    A test-time setting other than the run's is said once, naming both values; one set on the
    command line, test.aug (ablate's rows vary it) and a file without a config say nothing."""
    from detection.engine.inference_model import test_settings_note

    path, _ = trained
    run = ["model.input_format=BGR", "model.pixel_std=[1,1,1]"]
    weights = read_detector_file(path)
    other = tiny_cfg(*run, "input.min_size_test=352", "model.roi_heads.score_thresh_test=0.2")
    with caplog.at_level("WARNING", logger="detection.engine.inference_model"):
        for _ in range(2):
            build_inference_model(other, path, torch.device("cpu"))
    told = [r.getMessage() for r in caplog.records if "its run evaluated with" in r.getMessage()]
    assert told == [f"{path}: its run evaluated with input.min_size_test=600, model.roi_heads.score_thresh_test=0.05; "
                    "this config has input.min_size_test=352, model.roi_heads.score_thresh_test=0.2: detections and "
                    "metrics as valid, but not those the run's own evaluation gave (its metrics.jsonl, eval.py with "
                    "its config.yaml); give "
                    "the run's config, or set the keys on the command line to say it is deliberate (in Python: "
                    "Predictor.from_config(..., overrides=['KEY=VALUE']), or Predictor(..., explicit=['KEY']))"]
    assert test_settings_note(other, weights, ["input.min_size_test", "model.roi_heads.score_thresh_test"]) is None
    assert test_settings_note(tiny_cfg(*run, "test.aug.enabled=true"), weights) is None
    assert test_settings_note(other, dataclasses.replace(weights, config=None)) is None
    # photos read as stored (EXIF orientation ignored) are other images than the run's; a run
    # written before the key existed has none to compare
    note = test_settings_note(tiny_cfg(*run, "input.exif_orientation=false"), weights)
    assert "its run evaluated with input.exif_orientation=True; this config has input.exif_orientation=False" in note
    older = copy.deepcopy(weights.config)
    del older["input"]["exif_orientation"]
    assert test_settings_note(tiny_cfg(*run, "input.exif_orientation=false"),
                              dataclasses.replace(weights, config=older)) is None


def test_model_settings_compare_by_value():
    weights = DetectorWeights("x.pth", "c4det", {}, config={"model": {"pixel_mean": [1, 2, 3.0000001],
                                                                      "anchors": {"sizes": [16, 32]}}})
    check_model_settings(tiny_cfg("model.pixel_mean=[1.0,2.0,3.0]"), weights)
    with pytest.raises(CheckpointError, match=r"model.anchors.sizes=\[16, 32\] but the config has \[32, 64\]: use "
                                              r".*deliberately \(in Python: Predictor.from_config\(\.\.\., overrides="
                                              r"\['model.anchors.sizes=\.\.\.'\]\), or Predictor\(\.\.\., explicit="):
        check_model_settings(tiny_cfg("model.anchors.sizes=[32,64]", "model.pixel_mean=[1,2,3]"), weights)
    # a key the weights' shapes hold: no deliberate change loads them (an API trial was told to try)
    weights.config["model"]["num_classes"] = 3
    with pytest.raises(CheckpointError, match=r"trained with model.num_classes=3 but the config has 5, and its "
                                              r"weights' shapes are of the first: use the config it was trained "
                                              r"with \(config.yaml beside it\); for other classes, train from these "
                                              r"weights"):
        check_model_settings(tiny_cfg("model.num_classes=5", "model.pixel_mean=[1,2,3]",
                                      "model.anchors.sizes=[16,32]"), weights, ["model.num_classes"])


def test_fine_tuning_from_our_detector_on_another_label_set(trained, caplog):
    path, source = trained
    model = build_model(tiny_cfg("model.num_classes=5", "model.input_format=BGR", "model.pixel_std=[1,1,1]"))
    fresh = model.roi_heads.predictor.cls_score.weight.clone()
    with caplog.at_level("INFO"):
        load_initial_weights(model, str(path), None)
    state = model.state_dict()
    assert torch.equal(state["trunk.res4.1.conv2.weight"], source.state_dict()["trunk.res4.1.conv2.weight"])
    assert torch.equal(model.roi_heads.predictor.cls_score.weight, fresh)  # (6, C) left as initialised
    assert "3 classes, the config 5" in caplog.text
    # a fine-tune whose other tensors do not fit either (trainable BN's statistics): the error names
    # those, not the class count, which a fine-tune may change
    other = build_model(tiny_cfg("model.num_classes=5", "model.input_format=BGR", "model.pixel_std=[1,1,1]",
                                 "model.backbone.norm=bn"))
    with pytest.raises(CheckpointError, match="running_mean") as err:
        load_initial_weights(other, str(path), None)
    assert "classes" not in str(err.value)


@pytest.mark.parametrize("data_classes, said", [
    (["box", "disc", "cross", "owl"], "box, disc, cross are kept by name, and the background's; those of owl start "
                                      "from fresh initial values"),
    (["disk", "box", "cross"], "box, cross are kept by name, and the background's; those of disk start from fresh "
                               "initial values; those of disc are left out"),
    (["disc", "cross"], "disc, cross are kept by name, and the background's; those of box are left out")])
def test_fine_tuning_keeps_the_rows_of_the_classes_the_file_names_too(trained, caplog, data_classes, said):
    """A growing-data trial: a class added to a run's classes (or one renamed: a typo fixed) made
    every class-specific row start fresh, the known classes' too; now the rows of each class the
    file names are kept by name, the background's as well, and only the new ones start fresh."""
    path, source = trained  # disc, box, cross
    cfg = tiny_cfg("model.input_format=BGR", "model.pixel_std=[1,1,1]", f"model.num_classes={len(data_classes)}")
    model = build_model(cfg)
    fresh = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("roi_heads.predictor.")}
    with caplog.at_level("INFO"):
        load_initial_weights(model, str(path), None, class_names=data_classes)
    old, new = source.roi_heads.predictor, model.roi_heads.predictor
    trained_on = ["disc", "box", "cross"]
    for layer in ("weight", "bias"):
        assert torch.equal(getattr(new.cls_score, layer)[0], getattr(old.cls_score, layer)[0])  # the background
        for k, name in enumerate(data_classes):
            cls_row = getattr(new.cls_score, layer)[k + 1]
            box_rows = getattr(new.bbox_pred, layer)[4 * k:4 * k + 4]
            if name in trained_on:
                j = trained_on.index(name)
                assert torch.equal(cls_row, getattr(old.cls_score, layer)[j + 1])
                assert torch.equal(box_rows, getattr(old.bbox_pred, layer)[4 * j:4 * j + 4])
            else:
                assert torch.equal(cls_row, fresh[f"roi_heads.predictor.cls_score.{layer}"][k + 1])
                assert torch.equal(box_rows, fresh[f"roi_heads.predictor.bbox_pred.{layer}"][4 * k:4 * k + 4])
    assert f"was trained on disc, box, cross, the data has {', '.join(data_classes)}: the class-specific rows of " \
           f"{said}\n" in caplog.text + "\n"


def test_a_new_run_takes_the_configs_anchors_and_starts_the_rpn_outputs_fresh_for_another_count(trained, caplog):
    """A small-object trial: fine-tuning with smaller anchors (Detectron2's usual recipe on a zoo
    model) was refused over the RPN head's shapes; Detectron2 skips those layers with a warning.
    Evaluation stays strict and now says the anchors differ; the same count with other sizes is said."""
    path, source = trained  # anchors [16, 32] x 3 aspect ratios: 6 per position
    cfg = tiny_cfg("model.input_format=BGR", "model.pixel_std=[1,1,1]", "model.anchors.sizes=[4,8,16,32]")
    model = build_model(cfg)
    fresh = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("rpn.head.")}
    with caplog.at_level("INFO"):
        load_initial_weights(model, str(path), None)
    state = model.state_dict()
    for name in ("objectness_logits.weight", "objectness_logits.bias", "anchor_deltas.weight", "anchor_deltas.bias"):
        assert torch.equal(state[f"rpn.head.{name}"], fresh[f"rpn.head.{name}"])  # (12, ...), as initialised
    assert torch.equal(state["rpn.head.conv.weight"], source.state_dict()["rpn.head.conv.weight"])
    assert torch.equal(state["trunk.res4.1.conv2.weight"], source.state_dict()["trunk.res4.1.conv2.weight"])
    assert "its RPN was trained with 6 anchors per position, the config's model.anchors make 12: " \
           "rpn.head.objectness_logits.weight, rpn.head.objectness_logits.bias, " in caplog.text
    with pytest.raises(CheckpointError, match=r"its RPN was trained with 6 anchors per position, the config's "
                                              r"model.anchors make 12 \(sizes x aspect_ratios\); a new run"):
        load_detector_weights(build_model(cfg), read_detector_file(path))  # strict, as evaluation loads
    # as many anchors, other sizes: kept, and said
    caplog.clear()
    model = build_model(tiny_cfg("model.input_format=BGR", "model.pixel_std=[1,1,1]", "model.anchors.sizes=[8,16]"))
    with caplog.at_level("INFO"):
        load_initial_weights(model, str(path), None)
    assert torch.equal(model.state_dict()["rpn.head.anchor_deltas.weight"],
                       source.state_dict()["rpn.head.anchor_deltas.weight"])
    assert "its RPN was trained with other anchors (sizes [16, 32], aspect_ratios [0.5, 1.0, 2.0]) than the " \
           "config's model.anchors, as many per position" in caplog.text
    # an older zoo file stores its cell anchors (and no config): a new run takes the config's, and says so
    from detection.modeling.anchors import generate_cell_anchors

    zoo = dataclasses.replace(read_detector_file(path), config=None, extra={
        "proposal_generator.anchor_generator.cell_anchors.0": generate_cell_anchors([16, 32], [0.5, 1.0, 2.0])})
    caplog.clear()
    with caplog.at_level("INFO"):
        load_initial_weights(model, str(path), None, zoo)
    assert "its RPN was trained with other anchors than the config's model.anchors" in caplog.text
    with pytest.raises(CheckpointError, match=r"cell_anchors.0 .* differs from the config's model.anchors"):
        load_detector_weights(model, zoo)
    caplog.clear()
    with caplog.at_level("INFO"):  # the same anchors: nothing said
        load_initial_weights(build_model(tiny_cfg("model.input_format=BGR", "model.pixel_std=[1,1,1]")), str(path),
                             None)
    assert "anchors" not in caplog.text


@pytest.mark.parametrize("data_classes", [["cross", "disc", "box"], ["cat", "dog", "bird"], ["disc", "box", "cross"]])
def test_fine_tuning_on_as_many_classes_matches_them_by_name(trained, caplog, data_classes):
    """A 3-class checkpoint fine-tuned on 3 classes named otherwise kept its classifier rows under
    the new names in silence (a helper's trial: AP 0.6 against 7.3). The same classes in another
    order are now reordered by name; other names start fresh, as another count does, and say so."""
    path, source = trained
    model = build_model(tiny_cfg("model.input_format=BGR", "model.pixel_std=[1,1,1]"))
    fresh = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("roi_heads.predictor.")}
    with caplog.at_level("INFO"):
        load_initial_weights(model, str(path), None, class_names=data_classes)
    old, new = source.roi_heads.predictor, model.roi_heads.predictor
    trained_on = ["disc", "box", "cross"]
    if sorted(data_classes) == sorted(trained_on):
        for k, name in enumerate(data_classes):  # row k + 1 (background first) is the class of that name
            j = trained_on.index(name)
            assert torch.equal(new.cls_score.weight[k + 1], old.cls_score.weight[j + 1])
            assert torch.equal(new.bbox_pred.weight[4 * k:4 * k + 4], old.bbox_pred.weight[4 * j:4 * j + 4])
        assert torch.equal(new.cls_score.bias[0], old.cls_score.bias[0])  # background stays first
        said = "reordered to the data's" in caplog.text
        assert said == (data_classes != trained_on)
    else:
        assert all(torch.equal(model.state_dict()[k], v) for k, v in fresh.items())
        assert "was trained on other classes (disc, box, cross) than the data's (cat, dog, bird)" in caplog.text
    # a file that names no classes (Detectron2's): its rows are taken in order, and said so
    caplog.clear()
    unnamed = dataclasses.replace(read_detector_file(path), class_names=None)
    with caplog.at_level("INFO"):
        load_initial_weights(model, str(path), None, unnamed, class_names=data_classes)
    assert torch.equal(model.roi_heads.predictor.cls_score.weight, old.cls_score.weight)
    assert "names no classes: its class-specific rows are taken in order as the data's" in caplog.text
    assert torch.equal(model.state_dict()["trunk.res4.1.conv2.weight"], source.state_dict()["trunk.res4.1.conv2.weight"])


def test_evaluation_needs_the_class_count_of_the_checkpoint(trained):
    path, _ = trained
    cfg = tiny_cfg("model.num_classes=4", "model.input_format=BGR", "model.pixel_std=[1,1,1]")
    with pytest.raises(CheckpointError, match="model.num_classes=3 but the config has 4"):
        build_inference_model(cfg, path, torch.device("cpu"))
    with pytest.raises(CheckpointError, match="model.num_classes=3 but the config has 4, and its weights' shapes are "
                                              "of the first"):  # given deliberately too: no change loads them
        build_inference_model(cfg, path, torch.device("cpu"), explicit=["model.num_classes"])


def test_backbone_weights_are_no_detector(tmp_path):
    import torchvision

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    assert read_detector_file(path) is None
    with pytest.raises(CheckpointError, match="holds no detector"):
        build_inference_model(tiny_cfg(), path, torch.device("cpu"))
    with pytest.raises(CheckpointError, match="weights file not found"):
        read_detector_file(tmp_path / "missing.pth")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))  # an image given as weights
    with pytest.raises(CheckpointError, match=r"photo.png: a PNG image, not a weights file"):
        read_detector_file(tmp_path / "photo.png")
    (tmp_path / "run").mkdir()  # the run's folder given for its checkpoint
    (tmp_path / "run" / "model_final.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"run: a folder, not a weights file \(the checkpoint in it: .*run/"
                                              r"model_final.pth\)"):
        read_detector_file(tmp_path / "run")


def test_a_batchnorm_detector_loads_into_frozen_norms(tmp_path):
    """BatchNorm's step counters (num_batches_tracked) have no place in FrozenBatchNorm2d: a
    detector trained with norm bn was refused as model.weights of a run with frozen stages or
    frozen norms ("5 tensors of the file have no place"), and a resume with freeze_at raised the
    same (a trial). Detectron2 drops them; so does this loader, and the weights load."""
    from detection.engine.checkpoint import load_model_state

    trained = build_model(tiny_cfg("model.backbone.norm=bn"))
    path = tmp_path / "bn.pth"
    torch.save({"model": trained.state_dict()}, path)
    assert any(k.endswith("num_batches_tracked") for k in trained.state_dict())
    for frozen in (["model.backbone.norm=frozen_bn"], ["model.backbone.norm=bn", "model.backbone.freeze_at=2"]):
        model = build_model(tiny_cfg(*frozen))
        load_initial_weights(model, str(path), tiny_cfg(*frozen).model.backbone)
        assert torch.equal(model.state_dict()["trunk.stem.conv1.weight"], trained.state_dict()["trunk.stem.conv1.weight"])
        load_model_state(model, trained.state_dict(), path)  # a resume's strict load
