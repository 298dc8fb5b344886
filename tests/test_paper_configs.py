"""configs/paper/: the ResNet paper's detection experiments (Appendix A/B, Tables 7-11) as
configs. Every shipped config loads; the paper configs hold the papers' stated values; their
data-set names are known and resolve to the standard files; the fine-tunes start from the
detector their COCO config writes, with the model settings that file will have."""
import json
import re
from fractions import Fraction
from pathlib import Path

import pytest

from detection.config import config_to_dict, load_config
from detection.data.catalog import KNOWN_DATASETS, entry_problem, get_dataset
from detection.engine.inference_model import MODEL_KEYS
from tests.helpers import ROOT

ALL_CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
PAPER = ROOT / "configs" / "paper"
PAPER_CONFIGS = sorted(p for p in PAPER.glob("*.yaml") if p.name != "base.yaml")
VOC = ["voc0712_r101", "voc0712_r50", "voc07++12_r101", "voc0712_r101_from_coco", "voc0712_r101_plus3",
       "voc07++12_r101_plus3"]
COCO = ["coco2014_r101", "coco2014_r50", "coco2014_r101_plus3", "coco2014trainval_r101_plus3"]
# config -> the published numbers its header must state (ResNet paper, Tables 7-11)
PUBLISHED = {
    "voc0712_r101": ["76.4"], "voc07++12_r101": ["73.8"], "coco2014_r101": ["48.4", "27.2"],
    "coco2014_r101_plus3": ["53.8", "32.5"], "coco2014trainval_r101_plus3": ["55.7", "34.9"],
    "voc0712_r101_plus3": ["85.6"], "voc07++12_r101_plus3": ["83.8"],
}
UNPUBLISHED = ["voc0712_r50", "coco2014_r50", "voc0712_r101_from_coco"]


def paper(name):
    return load_config(PAPER / f"{name}.yaml")


def header(path):
    """The comment lines before the first key, as one line of words (phrases may wrap)."""
    lines = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def get(cfg, key):
    value = config_to_dict(cfg)
    for part in key.split("."):
        value = value[part]
    return value


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in ALL_CONFIGS])
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.num_classes >= 1


def test_the_paper_configs_are_the_ones_described():
    assert sorted(p.stem for p in PAPER_CONFIGS) == sorted(VOC + COCO)
    assert sorted(PUBLISHED) + sorted(UNPUBLISHED) and set(PUBLISHED) | set(UNPUBLISHED) == set(VOC + COCO)


@pytest.mark.parametrize("name", VOC + COCO)
def test_paper_values_shared_by_every_experiment(name):
    cfg = paper(name)
    m = cfg.model
    assert (cfg.solver.base_lr, cfg.solver.momentum, cfg.solver.weight_decay) == (0.001, 0.9, 0.0005)
    assert (cfg.solver.gamma, cfg.solver.warmup_iters) == (0.1, 0)
    assert (m.roi_heads.pooler, m.roi_heads.pooler_resolution, m.roi_heads.nms_thresh_test) == ("roi_pool", 14, 0.3)
    assert (m.roi_heads.batch_size_per_image, m.roi_heads.positive_fraction, m.roi_heads.iou_threshold) == (
        128, 0.25, 0.5)
    assert (m.rpn.post_nms_topk_test, m.rpn.post_nms_topk_train, m.rpn.nms_thresh) == (300, 2000, 0.7)
    assert (m.rpn.batch_size_per_image, m.rpn.positive_fraction, m.rpn.iou_thresholds) == (256, 0.5, [0.3, 0.7])
    # py-faster-rcnn's RPN sigma 3 (beta 1/sigma^2), Fast R-CNN's smooth L1 in the head
    assert m.rpn.smooth_l1_beta == pytest.approx(1 / 9, rel=1e-15) and m.roi_heads.smooth_l1_beta == 1.0
    assert (cfg.input.min_size_train, cfg.input.max_size_train) == ([600], 1000)
    assert (cfg.input.min_size_test, cfg.input.max_size_test) == (600, 1000)
    assert m.backbone.norm == "frozen_bn" and m.anchors.aspect_ratios == [0.5, 1.0, 2.0]
    # MSRA's ImageNet models (the paper's): BGR, mean only, stride in the 1x1
    assert (m.input_format, m.pixel_std, m.backbone.stride_in_1x1) == ("BGR", [1.0, 1.0, 1.0], True)
    assert m.backbone.weights == f"pretrained/R-{m.backbone.depth}.pkl"
    assert cfg.output_dir == f"output/paper_{name}"


@pytest.mark.parametrize("name", VOC)
def test_voc_schedule_and_data(name):
    cfg = paper(name)
    assert (cfg.solver.steps, cfg.solver.max_iter, cfg.solver.ims_per_batch) == ([60000], 80000, 1)
    assert cfg.model.num_classes == 20
    assert cfg.dataloader.use_difficult is False  # py-faster-rcnn's use_diff False
    if "++" in name:  # 07++12 -> VOC 2012 test (evaluation server)
        assert cfg.datasets.train == ["voc_2007_trainval", "voc_2007_test", "voc_2012_trainval"]
        assert cfg.datasets.test == ["voc_2012_test"]
    else:  # 07+12 -> VOC 2007 test
        assert cfg.datasets.train == ["voc_2007_trainval", "voc_2012_trainval"]
        assert cfg.datasets.test == ["voc_2007_test"]
    from_coco = "from_coco" in name or "plus3" in name
    assert cfg.model.anchors.sizes == ([64, 128, 256, 512] if from_coco else [128, 256, 512])


@pytest.mark.parametrize("name", COCO)
def test_coco_schedule_and_data(name):
    cfg = paper(name)
    assert (cfg.solver.steps, cfg.solver.max_iter, cfg.solver.ims_per_batch) == ([240000], 320000, 8)
    assert cfg.model.num_classes == 80 and cfg.model.anchors.sizes == [64, 128, 256, 512]
    if "trainval" in name:
        assert (cfg.datasets.train, cfg.datasets.test) == (["coco_2014_train", "coco_2014_val"], [])
    else:
        assert (cfg.datasets.train, cfg.datasets.test) == (["coco_2014_train"], ["coco_2014_val"])


@pytest.mark.parametrize("name", VOC + COCO)
def test_the_three_improvements_are_on_exactly_in_the_plus3_configs(name):
    cfg = paper(name)
    on = "plus3" in name
    assert cfg.model.roi_heads.global_context is on
    assert cfg.test.box_refinement.enabled is on and cfg.test.multi_scale.enabled is on
    if on:
        assert (cfg.test.box_refinement.nms_thresh, cfg.test.box_refinement.voting,
                cfg.test.box_refinement.voting_iou) == (0.3, True, 0.5)
        assert cfg.test.multi_scale.sizes == [200, 400, 600, 800, 1000]
    assert not cfg.test.aug.enabled


@pytest.mark.parametrize("name, source", [
    ("voc0712_r101_from_coco", "coco2014_r101"),
    ("voc0712_r101_plus3", "coco2014trainval_r101_plus3"),  # the paper fine-tunes its trainval model
    ("voc07++12_r101_plus3", "coco2014trainval_r101_plus3"),
])
def test_fine_tunes_start_from_the_detector_their_coco_config_writes(name, source):
    cfg, coco = paper(name), paper(source)
    assert cfg.model.weights == f"{coco.output_dir}/model_final.pth"
    # everything that makes the checkpoint what it is, except the label set, must be the same
    differing = [key for key in MODEL_KEYS if get(cfg, key) != get(coco, key)]
    assert differing == ["model.num_classes"]


@pytest.mark.parametrize("path", [PAPER / "base.yaml", *PAPER_CONFIGS], ids=lambda p: p.stem)
def test_headers_state_source_and_number(path):
    text = header(path)
    if path.name == "base.yaml":
        assert "end to end" in text and "alternating" in text and "silent" in text
        return
    for number in PUBLISHED.get(path.stem, []):
        assert number in text
    if path.stem in UNPUBLISHED:
        assert "no published" in text
    assert "ResNet" in text or "resnet" in text


# "key = value" in a header: a claim about the config's value, checked below (a fraction like
# 1/9 is compared to 1e-15; `key=value` without spaces is a command-line example, not a claim)
CLAIM = re.compile(r"\b((?:model|solver|input|dataloader|test|datasets)\.[a-z0-9_.]+) = "
                   r"(true|false|-?\d+(?:\.\d+)?(?:/\d+)?)\b")


def base_chain(path):
    """The file and the configs/paper/ files it is built on (`_base_:`), nearest first."""
    chain = [Path(path)]
    while True:
        base = re.search(r"^_base_: (\S+)$", chain[-1].read_text(), re.M)
        parent = (chain[-1].parent / base.group(1)).resolve() if base else None
        if parent is None or parent.parent != PAPER.resolve():
            return chain
        chain.append(parent)


def claims(path):
    """(file, key, value) of every claim in the headers of the file and of those it builds on."""
    return [(p.name, key, value) for p in base_chain(path) for key, value in CLAIM.findall(header(p))]


@pytest.mark.parametrize("path", [PAPER / "base.yaml", *PAPER_CONFIGS], ids=lambda p: p.stem)
def test_header_claims_hold_for_the_config_and_those_built_on_it(path):
    cfg = load_config(path)
    for source, key, text in claims(path):
        value = get(cfg, key)
        if text in ("true", "false"):
            assert value is (text == "true"), (source, key, value)
        else:
            assert value == pytest.approx(float(Fraction(text)), rel=1e-15), (source, key, value)


def test_the_choices_taken_from_py_faster_rcnn_are_named_with_their_source():
    base = header(PAPER / "base.yaml")
    chosen = base[base.index("Chosen from code"):base.index("Where the papers are silent")]
    assert "py-faster-rcnn" in chosen and "sigma 3" in chosen
    assert ("base.yaml", "model.rpn.smooth_l1_beta", "1/9") in claims(PAPER / "base.yaml")
    assert ("base.yaml", "model.roi_heads.smooth_l1_beta", "1") in claims(PAPER / "base.yaml")
    assert "use_diff False" in chosen and "voc0712_r101.yaml" in chosen
    voc = header(PAPER / "voc0712_r101.yaml")
    assert "py-faster-rcnn" in voc and "use_diff False" in voc
    for name in VOC:  # every VOC config inherits the claim and its value
        assert ("voc0712_r101.yaml", "dataloader.use_difficult", "false") in claims(PAPER / f"{name}.yaml")
    for name in COCO:
        assert not [c for c in claims(PAPER / f"{name}.yaml") if c[1] == "dataloader.use_difficult"]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*_r*.yaml")), ids=lambda p: p.stem)
def test_detectron2_recipe_configs_do_not_claim_to_be_the_paper(path):
    if path.stem.startswith("shapes"):
        return
    text = header(path)
    assert "Detectron2" in text and "configs/paper/" in text
    assert "paper's COCO experiment" not in text and "paper's PASCAL VOC experiment" not in text


def test_every_data_set_name_of_every_config_is_known():
    for path in ALL_CONFIGS:
        cfg = load_config(path)
        for entry in [*cfg.datasets.train, *cfg.datasets.test]:
            assert entry_problem(entry) is None, (path, entry)
    assert KNOWN_DATASETS["voc_2012_test"] == {"type": "voc", "root": "VOCdevkit/VOC2012", "split": "test",
                                                "annotations": False}


COCO_2014 = {  # name -> (annotation file, image folder), Detectron2's layout
    "coco_2014_train": ("instances_train2014.json", "train2014"),
    "coco_2014_val": ("instances_val2014.json", "val2014"),
    "coco_2014_minival": ("instances_minival2014.json", "val2014"),
    "coco_2014_valminusminival": ("instances_valminusminival2014.json", "val2014"),
}


@pytest.mark.parametrize("name", COCO_2014)
def test_coco_2014_names_resolve_to_detectron2s_files(tmp_path, name):
    ann_name, folder = COCO_2014[name]
    ann = tmp_path / "coco" / "annotations" / ann_name
    ann.parent.mkdir(parents=True)
    (tmp_path / "coco" / folder).mkdir()
    ann.write_text(json.dumps({
        "images": [{"id": 7, "file_name": f"COCO_{folder}_000000000007.jpg", "height": 20, "width": 30}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 18, "bbox": [2, 3, 10, 5], "iscrowd": 0}],
        "categories": [{"id": 18, "name": "dog"}]}))
    info = get_dataset(name, str(tmp_path), check_images=False)
    assert info.name == name and info.ann_file == str(ann)
    assert info.records[0]["file_name"] == str(tmp_path / "coco" / folder / f"COCO_{folder}_000000000007.jpg")
    assert info.records[0]["boxes"].tolist() == [[2.0, 3.0, 12.0, 8.0]]
