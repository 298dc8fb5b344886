"""tools/train_det.py protecting its user: an existing run is never replaced
unless asked, the data are checked before anything is written, Ctrl-C and errors end in one
line of their own, the run says what it trains on, and the data-set root has a fixed order."""
import argparse
import json
import shutil
from pathlib import Path

import pytest

from detection.cli import DATASETS_ENV, config_from_args
from detection.engine.checkpoint import load_checkpoint

from tests.helpers import load_tool, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
train_det = load_tool("train_det")
pytestmark = pytest.mark.usefixtures("restore_logging")




def run(data_root, out, *flags, **extra):
    """train_det.main in this process; -> (exit code, stderr lines split at newlines only)."""
    extra = {"solver.max_iter": 2, "solver.checkpoint_period": 1, **extra}
    argv = ["--config", str(ROOT / "configs" / "base.yaml"), *flags, *tiny_overrides(data_root, out, **extra)]
    try:
        code = train_det.main(argv)
    except SystemExit as err:
        code = err.code
    return code


def stderr_lines(capsys) -> list[str]:
    # "\n" only: the progress bar redraws itself with "\r" on one line
    return capsys.readouterr().err.split("\n")


def iterations(out: Path) -> list[int]:
    return [json.loads(x)["iteration"] for x in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- the output folder

@pytest.mark.slow  # trains through train_det.main
def test_a_new_run_in_a_folder_that_holds_a_run_is_refused(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(data_root, out, **{"solver.max_iter": 3}) == 0
    before = {n: (out / n).read_bytes() for n in ("last.pth", "model_final.pth", "metrics.jsonl")}
    capsys.readouterr()
    assert run(data_root, out, **{"solver.max_iter": 1}) == 2
    errors = [x for x in stderr_lines(capsys) if x.startswith("error:")]
    assert len(errors) == 1 and str(out) in errors[0]
    assert "--resume" in errors[0] and "--overwrite" in errors[0]
    assert {n: (out / n).read_bytes() for n in before} == before  # the old run is untouched


@pytest.mark.slow  # trains through train_det.main
def test_overwrite_replaces_the_old_run_and_says_so(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(data_root, out, **{"solver.max_iter": 3}) == 0
    (out / "inference").mkdir()
    (out / "inference" / "metrics.json").write_text("{}")
    for leftover in ("model_0000002.pth", "events.out.tfevents.1.host"):  # keep_checkpoints, TensorBoard
        (out / leftover).write_bytes(b"old")
    capsys.readouterr()
    assert run(data_root, out, "--overwrite", **{"solver.max_iter": 1}) == 0
    removed = [x for x in stderr_lines(capsys) if "--overwrite: removed" in x]
    assert len(removed) == 1 and "last.pth" in removed[0] and "inference" in removed[0]
    assert "model_0000002.pth" in removed[0] and not (out / "model_0000002.pth").exists()
    assert not (out / "events.out.tfevents.1.host").exists()
    assert iterations(out) == [1]  # not appended to the old 1..3
    assert load_checkpoint(out / "model_final.pth")["iteration"] == 1
    assert not (out / "inference").exists()


def test_resume_and_overwrite_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as err:
        train_det.main(["--config", str(ROOT / "configs" / "base.yaml"), "--resume", "--overwrite"])
    assert err.value.code == 2 and "not allowed with argument --resume" in capsys.readouterr().err


# ----------------------------------------------------------------------------- data checked first

@pytest.mark.parametrize("num_classes", [2, 5])
def test_num_classes_that_disagrees_with_the_data_stops_before_any_step(data_root, tmp_path, capsys, num_classes):
    out = tmp_path / "run"
    assert run(data_root, out, **{"model.num_classes": num_classes}) == 2
    errors = [x for x in stderr_lines(capsys) if x.startswith("error:")]
    assert len(errors) == 1, errors
    assert f"model.num_classes is {num_classes}" in errors[0]
    assert "shapes_train" in errors[0] and "3 classes" in errors[0]
    assert not out.exists()  # no half-made output folder


@pytest.mark.slow  # trains through train_det.main
def test_a_run_that_fails_on_its_data_leaves_no_folder_and_keeps_the_old_run(data_root, tmp_path, capsys):
    missing = {"type": "coco", "ann_file": str(tmp_path / "nowhere.json"), "image_root": str(tmp_path)}
    out = tmp_path / "new"
    assert run(data_root, out, **{"datasets.train": [missing]}) == 2
    assert "nowhere.json" in capsys.readouterr().err
    assert not out.exists()
    # --overwrite removes nothing when the new run's data are wrong
    old = tmp_path / "old"
    assert run(data_root, old, **{"solver.max_iter": 1}) == 0
    assert run(data_root, old, "--overwrite", **{"model.num_classes": 4}) == 2
    assert load_checkpoint(old / "model_final.pth")["iteration"] == 1 and iterations(old) == [1]


# ----------------------------------------------------------------------------- errors and Ctrl-C

def _fail_at_forward(monkeypatch, call: int, exc: BaseException) -> None:
    from detection.modeling.model import FasterRCNN

    calls = {"n": 0}
    real_forward = FasterRCNN.forward

    def forward(self, images, targets=None):
        calls["n"] += 1
        if self.training and calls["n"] == call:
            raise exc
        return real_forward(self, images, targets)

    monkeypatch.setattr(FasterRCNN, "forward", forward)


@pytest.mark.slow  # trains through train_det.main
def test_ctrl_c_ends_with_one_line_naming_the_last_checkpoint(data_root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _fail_at_forward(monkeypatch, 4, KeyboardInterrupt())
    assert run(data_root, out, **{"solver.max_iter": 6, "solver.checkpoint_period": 2}) == 130
    err = stderr_lines(capsys)
    assert f"interrupted at iteration 3; last checkpoint: {out / 'last.pth'} (iteration 2)" in err
    assert not any("Traceback" in x for x in err)
    assert load_checkpoint(out / "last.pth")["iteration"] == 2


def test_ctrl_c_before_the_first_checkpoint_says_so(data_root, tmp_path, capsys, monkeypatch):
    _fail_at_forward(monkeypatch, 2, KeyboardInterrupt())
    assert run(data_root, tmp_path / "run", **{"solver.checkpoint_period": 5}) == 130
    assert "interrupted at iteration 1; no checkpoint written yet" in stderr_lines(capsys)


def test_an_error_during_training_prints_on_a_line_of_its_own(data_root, tmp_path, capsys, monkeypatch):
    from detection.data import DataError

    _fail_at_forward(monkeypatch, 2, DataError("some.jpg: cannot be read"))
    assert run(data_root, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "train" in err  # the progress bar was drawn ...
    # ... and the error starts a line after it, saying which checkpoint the run left
    last = tmp_path / "run" / "last.pth"
    assert (f"\nerror: some.jpg: cannot be read; training stopped at iteration 1, the last good checkpoint {last} "
            "(iteration 1) is kept: --resume continues it\n") in err


# ----------------------------------------------------------------------------- what the run says

def test_the_run_starts_with_a_summary_of_data_device_and_output(data_root, tmp_path, capsys):
    # one more image without boxes in the training json: filter_empty drops it, the summary counts it
    ann = json.loads((data_root / "shapes" / "annotations" / "instances_train.json").read_text())
    images = tmp_path / "images"  # the set's images, and one of them once more under another name
    shutil.copytree(data_root / "shapes" / "train", images)
    shutil.copy(images / ann["images"][0]["file_name"], images / "no_boxes.jpg")
    ann["images"].append({**ann["images"][0], "id": 10_000, "file_name": "no_boxes.jpg"})
    (tmp_path / "train.json").write_text(json.dumps(ann))
    entry = {"type": "coco", "ann_file": str(tmp_path / "train.json"), "image_root": str(images), "name": "mine"}
    out = tmp_path / "run"
    assert run(data_root, out, **{"datasets.train": [entry], "solver.max_iter": 1}) == 0
    err = stderr_lines(capsys)
    counts = {c["name"]: sum(a["category_id"] == c["id"] for a in ann["annotations"]) for c in ann["categories"]}
    per_class = ", ".join(f"{name} {count}" for name, count in counts.items())
    with_boxes = len({a["image_id"] for a in ann["annotations"]})
    assert (f"training set mine: {with_boxes} images ({len(ann['images']) - with_boxes} without boxes "
            f"dropped: dataloader.filter_empty), 3 classes, objects per class: {per_class}") in err
    assert len(ann["images"]) - with_boxes >= 1
    # named as the training set is, not by its path; with its objects per class, as Detectron2 prints every set's
    val = json.loads((data_root / "shapes" / "annotations" / "instances_val.json").read_text())
    val_counts = ", ".join(f"{c['name']} {sum(a['category_id'] == c['id'] for a in val['annotations'])}"
                           for c in val["categories"])
    assert f"test set shapes_val: 2 images, 3 classes, objects per class: {val_counts}" in err
    assert any(x.startswith("device: cpu, torch threads: ") and "AMP: off, fast path: on" in x for x in err)  # on by default
    assert f"datasets.root: {data_root.resolve()}" in err and f"output folder: {out.resolve()}" in err


@pytest.mark.slow  # trains through train_det.main
def test_resume_shows_where_it_resumed_and_never_repeats_a_metrics_iteration(data_root, tmp_path, capsys,
                                                                               monkeypatch):
    out = tmp_path / "run"
    extra = {"solver.max_iter": 5, "solver.checkpoint_period": 2}
    with monkeypatch.context() as patch:
        _fail_at_forward(patch, 4, KeyboardInterrupt())
        assert run(data_root, out, **extra) == 130  # metrics 1..3 logged, last.pth at 2
    assert iterations(out) == [1, 2, 3]
    capsys.readouterr()
    assert run(data_root, out, "--resume", **extra) == 0
    assert "resumed at iteration 2" in stderr_lines(capsys)  # a library message, shown by the tool
    assert iterations(out) == [1, 2, 3, 4, 5]
    final = (out / "model_final.pth").stat().st_mtime_ns
    # a finished run says so and trains no more
    assert run(data_root, out, "--resume", **extra) == 0
    assert any("the run is finished (iteration 5" in x for x in stderr_lines(capsys))
    assert (out / "log.txt").read_text().splitlines()[-1].endswith(
        f"{out}: the run is finished (iteration 5, solver.max_iter 5): nothing to train")  # log.txt has it too
    assert iterations(out) == [1, 2, 3, 4, 5] and (out / "model_final.pth").stat().st_mtime_ns == final
    # a finished run resumed with other settings trains nothing with them: refused, config.yaml kept (it
    # was rewritten, and eval.py then refused the weights for the config beside them; a sweep trial)
    saved = (out / "config.yaml").read_text()
    assert run(data_root, out, "--resume", **extra, **{"model.roi_heads.pooler_resolution": 7}) == 2
    assert any("the run is finished (iteration 5), so --resume with model.roi_heads.pooler_resolution changed"
               in x for x in stderr_lines(capsys))
    assert (out / "config.yaml").read_text() == saved
    # a copy of the run folder resumed through its config.yaml (which names the original folder) trained on
    # in the original (a trial); refused, naming both folders
    import shutil

    shutil.copytree(out, tmp_path / "copy")
    before = (out / "metrics.jsonl").read_text()
    try:
        code = train_det.main(["--config", str(tmp_path / "copy" / "config.yaml"), "--resume", "solver.max_iter=6"])
    except SystemExit as err:
        code = err.code
    assert code == 2 and (out / "metrics.jsonl").read_text() == before
    assert any(f"sits in a run folder ({tmp_path / 'copy'}, with its last.pth) but names output_dir {out}" in x
               for x in stderr_lines(capsys))
    # test-time and logging keys change nothing training made: taken (the demo's re-evaluation with another
    # score threshold resumes so; a review)
    assert run(data_root, out, "--resume", **extra, **{"model.roi_heads.score_thresh_test": 0.3, "log_period": 5}) == 0
    assert "score_thresh_test: 0.3" in (out / "config.yaml").read_text()


# ----------------------------------------------------------------------------- the data-set root

def _root(config: Path, *overrides: str) -> str:
    return config_from_args(argparse.Namespace(config=str(config), overrides=list(overrides))).datasets.root


def test_data_root_order_command_line_then_config_file_then_environment_then_default(tmp_path, monkeypatch):
    base = ROOT / "configs" / "base.yaml"
    own = tmp_path / "own.yaml"
    own.write_text(f"_base_: {base}\ndatasets:\n  root: /from/file\n")
    child = tmp_path / "child.yaml"  # inherits the root from its _base_ chain
    child.write_text("_base_: own.yaml\n")
    plain = tmp_path / "plain.yaml"  # sets no root (base.yaml's is the default)
    plain.write_text(f"_base_: {base}\n")
    monkeypatch.delenv(DATASETS_ENV, raising=False)
    assert _root(plain) == "datasets"
    monkeypatch.setenv(DATASETS_ENV, "/from/env")
    assert _root(plain) == "/from/env"
    assert _root(own) == "/from/file" and _root(child) == "/from/file"
    assert _root(own, "datasets.root=/from/cli") == "/from/cli"
    assert _root(plain, "datasets.root=/from/cli") == "/from/cli"
