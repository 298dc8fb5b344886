"""Config loading: inheritance, overrides, clear errors, round trip, shipped configs."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

import detection.config
from detection.config import Config, ConfigError, config_to_dict, load_config, save_config
from detection.config.reading import yaml_load

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_base_inheritance_nested_and_relative(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "a.yaml", "model: {num_classes: 5, rpn: {nms_thresh: 0.6}}\nseed: 3\n")
    write(tmp_path / "sub" / "b.yaml", "_base_: ../a.yaml\nmodel: {rpn: {post_nms_topk_test: 50}}\n")
    child = write(tmp_path / "c.yaml", "_base_: sub/b.yaml\nseed: 7\n")
    cfg = load_config(child)
    assert cfg.model.num_classes == 5          # from the grand-parent
    assert cfg.model.rpn.nms_thresh == 0.6     # merged key by key, not replaced
    assert cfg.model.rpn.post_nms_topk_test == 50
    assert cfg.model.rpn.pre_nms_topk_test == 6000  # untouched default
    assert cfg.seed == 7                       # child wins


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(None, ["model.rpn.nms_thresh=0.6", "input.min_size_train=[480, 512]",
                             "solver.clip_grad_norm=null", "model.backbone.weights=/x/y.pth"])
    assert cfg.model.rpn.nms_thresh == 0.6
    assert cfg.input.min_size_train == [480, 512]
    assert cfg.solver.clip_grad_norm is None
    assert cfg.model.backbone.weights == "/x/y.pth"


def test_int_accepted_for_float_but_not_string_for_int():
    assert load_config(None, ["solver.base_lr=1"]).solver.base_lr == 1.0
    # YAML 1.1 reads 1e-4 as a string; it is a float here
    assert load_config(None, ["solver.base_lr=1e-4"]).solver.base_lr == 1e-4
    with pytest.raises(ConfigError, match="solver.base_lr: expected float"):
        load_config(None, ["solver.base_lr=fast"])
    with pytest.raises(ConfigError, match="solver.max_iter: expected int"):
        load_config(None, ["solver.max_iter=lots"])


def test_the_configs_choices_are_the_librarys():
    # a resize mode, depth, norm or pooler added to the library must be accepted by the config too
    from backbones.resnet import NORM_KINDS, RESNET_SPECS, SHORTCUT_KINDS
    from detection.accel.levers import COMPILE_MODES
    from detection.config.checks import CHOICES
    from detection.data.transforms import SIZE_SAMPLINGS
    from detection.modeling.resize import RESIZE_MODES
    from detection.modeling.roi_heads import POOLERS

    assert set(CHOICES["model.backbone.depth"]) == set(RESNET_SPECS)
    assert set(CHOICES["model.backbone.norm"]) == set(NORM_KINDS)
    assert set(CHOICES["model.backbone.shortcut"]) == set(SHORTCUT_KINDS)
    assert set(CHOICES["input.resize_mode"]) == set(RESIZE_MODES)
    assert set(CHOICES["input.min_size_train_sampling"]) == set(SIZE_SAMPLINGS)
    assert set(CHOICES["model.roi_heads.pooler"]) == set(POOLERS)
    assert set(CHOICES["accel.compile"]) == {False, True, *COMPILE_MODES}


@pytest.mark.parametrize("override, message", [
    ("model.weights=5", "model.weights: expected str or null, got 5"),
    ("datasets.test=[42]", r"datasets.test\[0\]: expected str or mapping, got 42"),
    ("accel.compile=3", "accel.compile: expected bool or str, got 3"),
])
def test_a_wrong_type_names_the_types_a_yaml_user_writes(override, message):
    # typing's names (Union, Optional) mean nothing to someone editing a YAML file
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_misspelled_key_names_file_key_and_suggestion(tmp_path):
    bad = write(tmp_path / "bad.yaml", "model:\n  rpn:\n    nms_tresh: 0.6\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    msg = str(info.value)
    assert str(bad) in msg and "model.rpn.nms_tresh" in msg and "nms_thresh" in msg


@pytest.mark.parametrize("override, key", [
    ("solver.base_lr=-0.1", "solver.base_lr"),
    ("model.roi_heads.positive_fraction=1.5", "model.roi_heads.positive_fraction"),
    ("model.backbone.depth=42", "model.backbone.depth"),
    ("model.backbone.norm=batchnorm", "model.backbone.norm"),
    ("model.rpn.iou_thresholds=[0.8, 0.3]", "model.rpn.iou_thresholds"),
    ("solver.steps=[800, 400]", "solver.steps"),
    ("solver.lr_schedule=linear", "solver.lr_schedule"),
    ("model.roi_heads.box_loss_weight=-1", "model.roi_heads.box_loss_weight"),
    # accepted before (a sweep trial): no detection at all, numpy's traceback, nothing at all
    ("model.roi_heads.bbox_reg_weights=[0, 0, 0, 0]", "model.roi_heads.bbox_reg_weights"),
    ("seed=-1", "seed"),
    ("model.rpn.min_size=-5", "model.rpn.min_size"),
    ("model.anchors.sizes=[32, 16, 16]", "model.anchors.sizes"),
])
def test_impossible_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_yaml_numbers_are_read_as_written_and_a_repeated_key_is_an_error(tmp_path):
    """YAML 1.1 (PyYAML) read a zero-padded sweep seed 010 as 8 (octal), `02000` in a list of steps
    as 1024, `1:00` as 60 (base 60); a key written twice kept only its second block (a whole
    `solver:` lost); an empty file gave every default. Found in a sweep trial, all in silence."""
    cfg = load_config(None, ["seed=10", "solver.steps=[1000, 2000]", "solver.max_iter=3000",
                             "solver.base_lr=1e-3", "dataloader.num_workers=0x1"])
    assert (cfg.seed, cfg.solver.steps, cfg.solver.base_lr, cfg.dataloader.num_workers) == (10, [1000, 2000],
                                                                                            0.001, 1)
    for override, message in (("seed=010", "seed: expected int, got '010'"),
                              ("solver.steps=[1000, 02000]", r"solver.steps\[1\]: expected int, got '02000'"),
                              ("solver.checkpoint_period=1:00", "solver.checkpoint_period: expected int, got '1:00'")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    write(tmp_path / "file.yaml", "seed: 10\nsolver: {base_lr: 0.005, max_iter: 10}\nmodel: {num_classes: 3}\n"
          "solver: {warmup_iters: 2}\n")
    with pytest.raises(ConfigError, match=r"file.yaml: key 'solver' is given twice \(lines 2 and 4\): the second would "
                                          r"replace the first whole; merge them into one$"):
        load_config(tmp_path / "file.yaml")  # (PyYAML's "in <unicode string>, line 5" no longer ends it)
    with pytest.raises(ConfigError, match=r"command line: override model.rpn: key 'nms_thresh' is given twice \(on line 1\)"):
        load_config(None, ["model.rpn={nms_thresh: 0.6, nms_thresh: 0.7}"])
    write(tmp_path / "empty.yaml", "# only a comment\n")
    with pytest.raises(ConfigError, match="empty.yaml: the file is empty"):
        load_config(tmp_path / "empty.yaml")
    # YAML's merge key still merges (a review: the repeated-key check refused it); a list as a key is one line
    write(tmp_path / "merge.yaml", "solver:\n  <<: {base_lr: 0.01, max_iter: 50}\n  max_iter: 60\n")
    assert (load_config(tmp_path / "merge.yaml").solver.base_lr, load_config(tmp_path / "merge.yaml").solver.max_iter) \
        == (0.01, 60)
    write(tmp_path / "listkey.yaml", "? [a, b]\n: 1\n")
    with pytest.raises(ConfigError, match="listkey.yaml: not valid YAML"):
        load_config(tmp_path / "listkey.yaml")


def test_config_files_of_earlier_versions_read_the_same_and_new_ones_read_the_same_in_pyyaml(tmp_path):
    """Earlier versions wrote with PyYAML's dumper, which leaves strings such as 08 or 1e3
    unquoted (YAML 1.1 reads them as strings): they must read back as strings (a review: a VOC
    split 09 read as 9). And what is written now must read the same with PyYAML's own loader."""
    import yaml

    from detection.config.reading import yaml_dump

    names = ["07", "08", "1e3", "-.5", "0o7", "010", "1:00", "0b1"]
    old = yaml.safe_dump({"model": {"num_classes": len(names), "class_names": names},
                          "datasets": {"test": [{"type": "voc", "root": "VOCdevkit/VOC2007", "split": "09"}]}})
    write(tmp_path / "old.yaml", old)
    cfg = load_config(tmp_path / "old.yaml")
    assert cfg.model.class_names == names and cfg.datasets.test[0]["split"] == "09"
    assert yaml.safe_load(yaml_dump(config_to_dict(cfg)))["model"]["class_names"] == names


def test_a_section_given_as_a_mapping_on_the_command_line_merges_as_in_a_file(tmp_path):
    """"model.rpn={nms_thresh: 0.6}" replaced the config's whole rpn section with base.yaml's
    defaults (shapes_r18's 600 / 32 top-k gone), where the same mapping in a child file merges;
    "test.aug={enabled: true}" brought back base.yaml's sizes."""
    shapes = ROOT / "configs" / "shapes_r18.yaml"
    cfg = load_config(shapes, ["model.rpn={nms_thresh: 0.6}", "test.aug={enabled: true}"])
    expected = load_config(shapes, ["model.rpn.nms_thresh=0.6", "test.aug.enabled=true"])
    assert cfg == expected and (cfg.model.rpn.pre_nms_topk_train, cfg.model.rpn.post_nms_topk_train) == (600, 32)
    write(tmp_path / "child.yaml", f"_base_: {shapes}\nmodel: {{rpn: {{nms_thresh: 0.6}}}}\n")
    assert load_config(tmp_path / "child.yaml").model.rpn == cfg.model.rpn


def test_missing_file_and_base_loop(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path / "x.yaml", "_base_: y.yaml\n")
    write(tmp_path / "y.yaml", "_base_: x.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "x.yaml")


def test_a_windows_editors_config_reads_and_utf16_is_named(tmp_path):
    """A UTF-8 byte-order mark and CRLF lines (Notepad) read as the file says; UTF-16 (Windows
    PowerShell's `echo ... > my.yaml`) is said to be UTF-16, not only 'not UTF-8'."""
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbfsolver:\r\n  max_iter: 7\r\n")
    assert load_config(tmp_path / "bom.yaml").solver.max_iter == 7
    (tmp_path / "u16.yaml").write_text("solver:\n  max_iter: 7\n", encoding="utf-16")
    with pytest.raises(ConfigError, match=r"u16.yaml: not a text file in UTF-8 .* \(it is UTF-16 text, .* save it as "
                                          r"UTF-8\)$"):
        load_config(tmp_path / "u16.yaml")


def test_a_wrong_value_is_named_in_a_line_not_dumped(tmp_path):
    """Nested YAML aliases (a few hundred bytes) expand to 9**9 strings: the error showed the
    value whole, a 312 MB line after 15 s and 1.4 GB (a security trial)."""
    levels = ['    - &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefg", "bcdefgh"):
        levels.append(f"    - &{name} [{', '.join([f'*{prev}'] * 9)}]")
    write(tmp_path / "bomb.yaml", "model:\n  class_names:\n" + "\n".join(levels) + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "bomb.yaml")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'bomb.yaml'}: model.class_names[0]: expected str, got ['lol', ")
    assert len(message) < 300 and "..." in message
    with pytest.raises(ConfigError, match=r"model.class_names: expected a list, got "
                                          r"'x{50,60}\.\.\.x{50,60}' \(one item"):
        load_config(None, [f"model.class_names={'x' * 100000}"])  # a long string on the command line too


def test_detectron2s_anchor_lists_per_feature_map_say_the_flat_list_to_write():
    """A small-object trial: Detectron2's `SIZES: [[32, 64]]` said only "expected int, got [32, 64]";
    and two equal aspect ratios made two identical anchors per position (equal sizes were refused)."""
    with pytest.raises(ConfigError, match=r"model.anchors.sizes: expected a list of int, got \[\[32, 64\]\], "
                                          r"Detectron2's list per feature map: the C4 detector has one map, write "
                                          r"\[32, 64\]$"):
        load_config(None, ["model.anchors.sizes=[[32, 64]]"])
    with pytest.raises(ConfigError, match=r"write \[0.5, 1.0, 2.0\]$"):
        load_config(None, ["model.anchors.aspect_ratios=[[0.5], [1.0, 2.0]]"])
    with pytest.raises(ConfigError, match=r"model.anchors.aspect_ratios: \[1.0, 1.0\] is invalid, expected positive "
                                          r"ratios, each once"):
        load_config(None, ["model.anchors.aspect_ratios=[1.0, 1.0]"])
    assert load_config(None, ["model.anchors.sizes=[32, 64]"]).model.anchors.sizes == [32, 64]


def test_save_load_round_trip(tmp_path):
    cfg = load_config(ROOT / "configs" / "coco_r101.yaml", ["model.rpn.nms_thresh=0.65",
                      "datasets.test=[{type: coco, ann_file: a.json, image_root: imgs}]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert isinstance(again, Config)
    # names in other scripts are written as they are (readable), and read back equal
    cfg = load_config(None, ["datasets.root=/data/写真", "model.num_classes=2", "model.class_names=[猫, café]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert "/data/写真" in (tmp_path / "config.yaml").read_text(encoding="utf-8")
    assert load_config(tmp_path / "config.yaml") == cfg
    # strings this reader takes for numbers (YAML 1.1 does not) are written quoted
    cfg = load_config(None, ["output_dir='1e-3'", "datasets.root='010'", "model.num_classes=2",
                             "model.class_names=['1_000', '.5']"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg and cfg.output_dir == "1e-3"


def test_base_yaml_lists_every_default(monkeypatch):
    monkeypatch.setattr(detection.config, "usable_cpus", lambda: 64)  # no cap of num_workers on a small machine
    assert config_to_dict(load_config(ROOT / "configs" / "base.yaml")) == config_to_dict(Config())


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.num_classes >= 1


def test_paper_configs_follow_the_defaults_table():
    coco = load_config(ROOT / "configs" / "coco_r101.yaml")
    voc = load_config(ROOT / "configs" / "voc_r50.yaml")
    assert (coco.model.backbone.depth, coco.model.num_classes) == (101, 80)
    assert coco.model.anchors.sizes == [64, 128, 256, 512]
    assert voc.model.anchors.sizes == [128, 256, 512] and voc.model.backbone.depth == 50
    assert (coco.input.min_size_test, coco.input.max_size_test) == (600, 1000)
    assert coco.model.rpn.post_nms_topk_test == 300 and coco.model.roi_heads.pooler_resolution == 14


def run_tool(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "train_det.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.slow  # tools/train_det.py in a subprocess
def test_cli_print_config_applies_override():
    out = run_tool("--config", "configs/coco_r101.yaml", "--print-config", "model.rpn.nms_thresh=0.6")
    assert out.returncode == 0, out.stderr
    assert "nms_thresh: 0.6" in out.stdout and "depth: 101" in out.stdout


@pytest.mark.slow  # tools/train_det.py in a subprocess
def test_cli_bad_key_exits_2_with_suggestion_and_no_traceback():
    out = run_tool("--config", "configs/coco_r101.yaml", "model.rpn.nms_tresh=0.6")
    assert out.returncode == 2
    assert "model.rpn.nms_tresh" in out.stderr and "nms_thresh" in out.stderr
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------- data-set entries (VOC, COCO, checked)

VOC_ENTRY = "{type: voc, root: my/VOC, split: test, classes: [cat, dog], use_07_metric: false}"


@pytest.mark.parametrize("entry, key, hint", [
    ("{type: voc, root: my/VOC, split: test, clases: [cat, dog]}", "datasets.test[0].clases", "did you mean classes or keep_classes?"),
    ("{type: voc, root: my/VOC, split: test, use_07_metrc: false}", "datasets.test[0].use_07_metrc",
     "did you mean use_07_metric?"),
    ("{type: pascal, root: my/VOC, split: test}", "datasets.test[0].type", "valid types: coco (a COCO json"),
    ("{type: coco, image_root: my/images}", "datasets.test[0].ann_file", "missing; a coco entry takes type, ann_file"),
    ("{type: coco, annfile: my/a.json, image_root: my/images}", "datasets.test[0].annfile",
     "did you mean ann_file?"),
    ("{type: voc, root: my/VOC, split: test, classes: cat}", "datasets.test[0].classes",
     "expected a list of distinct class names"),
    ("voc_2007_tset", "datasets.test[0]", "unknown data set name 'voc_2007_tset' (did you mean voc_2007_test"),
])
def test_dataset_entry_typos_are_config_errors_with_the_closest_names(tmp_path, entry, key, hint):
    config = write(tmp_path / "mine.yaml", f"datasets:\n  train: [shapes_train]\n  test: [{entry}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    message = str(info.value)
    assert message.startswith(f"{config}: {key}: ") and hint in message and "\n" not in message


def test_valid_dataset_entries_load():
    cfg = load_config(None, [f"datasets.train=[voc_2007_trainval, {VOC_ENTRY}]",
                             "datasets.test=[{type: coco, ann_file: a.json, image_root: imgs, name: mine}]"])
    assert cfg.datasets.train[1]["classes"] == ["cat", "dog"]


@pytest.mark.slow  # tools/train_det.py in a subprocess
def test_cli_print_config_rejects_a_dataset_entry_typo_with_exit_2():
    out = run_tool("--config", "configs/shapes_r18.yaml", "--print-config",
                   "datasets.test=[{type: voc, root: my/VOC, split: test, clases: [cat, dog]}]")
    assert out.returncode == 2, out.stdout
    assert "datasets.test[0].clases" in out.stderr and "did you mean classes or keep_classes?" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_a_value_cut_at_a_yaml_comment_is_said(caplog):
    """output_dir=scratch/run #1 is YAML's scratch/run (the rest a comment): said, not silent (a trial)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="detection.config.reading"):
        cfg = load_config(None, ["output_dir=scratch/run #1"])
    assert cfg.output_dir == "scratch/run"
    assert "output_dir: the text from '#' on is a YAML comment, not part of the value 'scratch/run'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="detection.config.reading"):
        assert load_config(None, ["output_dir='scratch/run #1'"]).output_dir == "scratch/run #1"
    assert "YAML comment" not in caplog.text  # quoted: kept whole, no word


def test_output_dir_given_as_a_flag_is_taken_as_written(tmp_path, capsys, restore_logging):
    """train_det.py --output-dir went through YAML: "sweep/lr0.01 #2" trained into sweep/lr0.01 (a
    comment), "2024-01-05" was a date and refused (a sweep trial)."""
    from tests.helpers import load_tool, run_main

    tool = load_tool("train_det")
    for folder in (str(tmp_path / "sweep" / "lr0.01 #2"), "2024-01-05", "3", "a: b"):
        code, out, err = run_main(tool, ["--config", ROOT / "configs" / "shapes_r18.yaml", "--output-dir", folder,
                                         "--print-config"], capsys)
        assert code == 0, err
        printed = yaml_load(out)
        assert printed["output_dir"] == folder


def test_detectron2_spellings_in_a_file_and_in_the_predictors_overrides_are_named(tmp_path, capsys):
    """A sweep trial: upper-case keys in a file got 'valid keys: ...' with no word that they are
    lower-case here; _BASE_ was an unknown key; SOLVER.AMP.ENABLED's hint never showed (solver.amp
    is a value, not a section); --opts OUTPUT_DIR --overwrite trained into a folder "--overwrite";
    model.weights=None looked for a file "None"; datasets.train=NAME was refused for not a list."""
    from detection.cli import add_config_args, parse_command_line

    write(tmp_path / "d2.yaml", "SOLVER: {BASE_LR: 0.01}\n")
    with pytest.raises(ConfigError, match=r"unknown key SOLVER; keys are lower-case here \(solver;"):
        load_config(tmp_path / "d2.yaml")
    write(tmp_path / "base.yaml", "_BASE_: ../x.yaml\n")
    with pytest.raises(ConfigError, match="_BASE_: keys are lower-case here, write _base_"):
        load_config(tmp_path / "base.yaml")
    with pytest.raises(ConfigError, match="Detectron2's SOLVER.AMP.ENABLED is solver.amp here"):
        load_config(ROOT / "configs" / "shapes_r18.yaml", ["solver.amp.enabled=true"])
    import argparse

    parser = argparse.ArgumentParser()
    add_config_args(parser)
    with pytest.raises(SystemExit):
        parse_command_line(parser, ["--config", "c.yaml", "--opts", "OUTPUT_DIR", "--overwrite"])
    assert "OUTPUT_DIR's value --overwrite looks like an option" in capsys.readouterr().err
    assert load_config(None, ["datasets.train=shapes_train"]).datasets.train == ["shapes_train"]
    entry = {"type": "coco", "ann_file": "a.json", "image_root": "imgs"}
    assert load_config(None, ["datasets.train={type: coco, ann_file: a.json, image_root: imgs}"]).datasets.train \
        == [entry]
    # a section's mapping sets only its keys: the 80 inherited class names go as with model.num_classes=3
    d2 = ROOT / "configs" / "detectron2" / "faster_rcnn_R_50_C4_1x.yaml"
    assert load_config(d2, ["model={num_classes: 3}"]) == load_config(d2, ["model.num_classes=3"])
    from detection.engine.checkpoint import CheckpointError
    from detection.engine.loading import read_detector_file

    with pytest.raises(CheckpointError, match="YAML writes null"):
        read_detector_file("None")


def test_an_error_in_a_base_names_the_base(tmp_path):
    """A typo or a bad value in a `_base_` file was reported against the child that inherits it
    (a sweep trial looked for it where it is not); the key set by the child itself stays the child's."""
    write(tmp_path / "base.yaml", "solver: {max_itr: 100}\nmodel: {num_classes: 3}\n")
    write(tmp_path / "child.yaml", "_base_: base.yaml\nseed: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "child.yaml")
    assert str(err.value) == (f"{tmp_path / 'base.yaml'} (a _base_ of {tmp_path / 'child.yaml'}): unknown key "
                              "solver.max_itr; did you mean max_iter?")
    write(tmp_path / "base.yaml", "solver: {base_lr: -0.01}\n")
    with pytest.raises(ConfigError, match=r"base\.yaml \(a _base_ of .*child\.yaml\): solver\.base_lr: -0\.01 is "
                                          r"invalid"):
        load_config(tmp_path / "child.yaml")
    write(tmp_path / "child.yaml", "_base_: base.yaml\nsolver: {base_lr: -0.02}\n")  # the child's own value
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'child.yaml'))}: solver\.base_lr: -0\.02"):
        load_config(tmp_path / "child.yaml")


def test_a_config_changed_in_python_is_checked_as_a_files_values_are():
    """A notebook trial: `cfg.solver.max_iters = 2` (a typo) made an attribute nothing read, and
    train() ran the old max_iter without a word; a wrong type was a TypeError deep in training."""
    cfg = load_config(None)
    with pytest.raises(AttributeError, match=r"SolverConfig has no setting 'max_iters' \(did you mean 'max_iter'\?\)"):
        cfg.solver.max_iters = 2
    with pytest.raises(AttributeError, match="Config has no setting 'zzz'; its settings: model, input,"):
        cfg.zzz = 1
    cfg.solver.max_iter = "6"
    with pytest.raises(ConfigError, match=r"^the Config given: solver.max_iter: expected int, got '6'$"):
        detection.config.checked_config(cfg)
    cfg.solver.max_iter, cfg.solver.base_lr = 6, -0.01
    with pytest.raises(ConfigError, match="solver.base_lr"):
        detection.config.checked_config(cfg)
    cfg.solver.base_lr = 0.02
    checked = detection.config.checked_config(cfg)
    assert checked == cfg and checked is not cfg  # a copy: the caller's object is left as it is
    # what Python code writes (they trained before the check): taken as the file's values
    import numpy as np
    cfg.output_dir, cfg.datasets.root, cfg.solver.steps = Path("/tmp/out"), Path("data"), (10, 20)
    cfg.solver.max_iter, cfg.solver.base_lr = np.int64(30), np.float32(0.5)
    cfg.datasets.train = [{"type": "coco", "ann_file": Path("a.json"), "image_root": Path("imgs")}]
    checked = detection.config.checked_config(cfg)
    assert (checked.output_dir, checked.datasets.root, checked.solver.steps) == ("/tmp/out", "data", [10, 20])
    assert type(checked.solver.max_iter) is int and checked.solver.base_lr == 0.5
    assert checked.datasets.train == [{"type": "coco", "ann_file": "a.json", "image_root": "imgs"}]
    # numpy arrays as lists (numpy's own "can only convert an array of size 1" error; an API trial)
    cfg.model.pixel_mean, cfg.input.min_size_train = np.array([127.5, 127.5, 127.5]), np.array([224, 256])
    checked = detection.config.checked_config(cfg)
    assert checked.model.pixel_mean == [127.5, 127.5, 127.5] and checked.input.min_size_train == [224, 256]
    assert type(checked.input.min_size_train[0]) is int
    # records made in Python given as a data set, as Detectron2's DatasetCatalog.register takes them
    from detection.data import DatasetInfo

    cfg.datasets.train = [DatasetInfo(name="mine", kind="coco", class_names=["a"], records=[])]
    with pytest.raises(ConfigError, match=r"datasets.train\[0\] is a DatasetInfo, not a config entry: .* write "
                                          r"records made in Python as a COCO json, or give the DatasetInfo to "
                                          r"build_train_loader"):
        detection.config.checked_config(cfg)
    cfg.datasets.train = DatasetInfo(name="mine", kind="coco", class_names=["a"], records=[])  # not in a list
    with pytest.raises(ConfigError, match=r"datasets.train\[0\] is a DatasetInfo, not a config entry"):
        detection.config.checked_config(cfg)


@pytest.mark.parametrize("overrides, key", [
    (["input.min_size_test=1333", "input.max_size_test=800"], "input.min_size_test"),
    (["input.min_size_train=[1333]", "input.max_size_train=800"], "input.min_size_train")])
def test_sizes_swapped_as_mmdetection_writes_them_are_refused(overrides, key):
    """An MMDetection trial: img_scale=(1333, 800) is (longer, shorter); typed here in that order
    every image was sized by the cap, about 25% smaller than meant, without a word."""
    with pytest.raises(ConfigError, match=rf"{key}: \[?1333\]? is invalid, expected at most "
                                          r"input.max_size_\w+ \(800\): "
                                          r"min_size is the shorter side's size .*MMDetection's img_scale"):
        load_config(None, overrides)
    load_config(None, ["input.min_size_test=800", "input.max_size_test=800"])  # equal: a square cap, fine


def test_detectron2s_rpn_loss_weights_say_there_is_none():
    """An internals trial: MODEL.RPN.LOSS_WEIGHT got "unknown key" and the section's list, where
    ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT is mapped."""
    with pytest.raises(ConfigError, match=r"Detectron2's MODEL.RPN.LOSS_WEIGHT is not a setting \(the RPN's two losses "
                                          r"count 1.0 each, Detectron2's default\) here"):
        load_config(None, ["MODEL.RPN.LOSS_WEIGHT=2.0"])
    # an audit: Detectron2's gradient clipping (each element, or each parameter's norm) was named as
    # solver.clip_grad_norm alone, which clips the norm of all the gradients together
    with pytest.raises(ConfigError, match=r"Detectron2's SOLVER.CLIP_GRADIENTS.CLIP_VALUE is not a setting "
                                          r"\(Detectron2 clips each gradient element, CLIP_TYPE value, or each "
                                          r"parameter's gradient norm, CLIP_TYPE norm\); solver.clip_grad_norm clips "
                                          r"the norm of all"):
        load_config(None, ["SOLVER.CLIP_GRADIENTS.CLIP_VALUE=1.0"])


def test_the_other_toolkits_repeat_factor_sampling_keys_name_repeat_threshold():
    """A long-tail trial: Detectron2's DATALOADER.SAMPLER_TRAIN (in every repeat-factor config) and
    MMDetection's oversample_thr were unknown keys with no word of dataloader.repeat_threshold."""
    with pytest.raises(ConfigError, match=r"Detectron2's DATALOADER.SAMPLER_TRAIN is dataloader.repeat_threshold above "
                                          r"0 \(RepeatFactorTrainingSampler"):
        load_config(None, ["dataloader.sampler_train=RepeatFactorTrainingSampler"])
    with pytest.raises(ConfigError, match=r"Detectron2's DATALOADER.REPEAT_SQRT is not a setting \(the square root"):
        load_config(None, ["dataloader.repeat_sqrt=false"])
    for key in ("data.train.oversample_thr", "train_dataloader.dataset.oversample_thr", "oversample_thr"):
        with pytest.raises(ConfigError, match=rf"MMDetection's {key} is dataloader.repeat_threshold "
                                              r"\(ClassBalancedDataset repeats an image ceil\(r\) times"):
            load_config(None, [f"{key}=0.001"])
    assert load_config(None, ["dataloader.repeat_threshold=0.001"]).dataloader.repeat_threshold == 0.001
