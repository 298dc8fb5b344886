"""Where tools/eval.py writes, and what eval.py / visualize.py refuse, as users ran into it:
results beside the checkpoint and never silently replaced, one folder per test set,
class lists checked against the checkpoint, one output-name scheme."""
import json
import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

import detection.visualization.draw
from detection.config import load_config
from detection.data.shapes import generate_shapes
from detection.engine.run_folder import EVAL_LOCK_FILE, RunLock
from detection.engine.trainer import train
from detection.evaluation.classes import check_class_names, model_class_names
from detection.evaluation.outputs import (ResultsSource, check_results_folder, claim_results_folder, results_subfolder,
                                         results_subfolders)

from tests.helpers import load_tool, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]

SHAPES = ["circle", "square", "triangle"]


EVAL, VISUALIZE = load_tool("eval"), load_tool("visualize")


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """A run folder with a tiny model trained for 1 iteration on shapes, and its overrides."""
    root = tmp_path_factory.mktemp("eval_outputs")
    generate_shapes(root / "data" / "shapes", num_train=4, num_val=2, seed=1, image_size=(64, 80))
    overrides = tiny_overrides(root / "data", root / "run_a", **{
        "solver.max_iter": 1, "solver.checkpoint_period": 1, "model.roi_heads.score_thresh_test": 0.0})
    train(load_config(None, overrides))
    return root, overrides


def call(tool, capsys, *args) -> tuple[int, str, str]:
    """Run a tool's main in this process: (exit code, stdout, stderr)."""
    try:
        code = tool.main(["--config", str(ROOT / "configs" / "base.yaml"), *args])
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _voc_entry(classes):
    return {"type": "voc", "root": "shapes/VOC", "split": "val", "classes": classes}


# --- results beside the checkpoint, never silently replaced ----------------------------------

@pytest.mark.slow  # evaluates through eval.main
def test_eval_writes_beside_the_weights_not_into_the_configs_output_dir(run_a, capsys):
    """The config's output_dir is another run's folder (a shared config): its results stay."""
    root, overrides = run_a
    weights = root / "run_a" / "model_final.pth"
    other = root / "other_run"
    code, out, err = call(EVAL, capsys, "--weights", str(weights), *overrides,
                          f"output_dir={json.dumps(str(other))}")
    assert code == 0, err
    assert "\r" not in err  # no progress bar off a terminal
    results = root / "run_a" / "inference"
    assert out.startswith(f"results go to {results}\n")  # said before anything runs
    assert (results / "shapes_val" / "metrics.json").is_file() and not other.exists()
    assert not (results / EVAL_LOCK_FILE).exists()  # released at the end
    source = json.loads((results / "source.json").read_text())
    stat = weights.resolve().stat()
    assert source["path"] == str(weights.resolve())
    assert (source["size"], source["mtime"]) == (stat.st_size, stat.st_mtime)
    # `eval.py --results <run>/inference` re-scores the folder's own results: the same AP
    metrics = json.loads((results / "shapes_val" / "metrics.json").read_text())
    code, out, err = call(EVAL, capsys, "--results", str(results), *overrides,
                          f"output_dir={json.dumps(str(root / 'run_a'))}")
    assert code == 0, err
    assert "replacing" not in out  # its own results, re-scored
    assert json.loads((results / "shapes_val" / "metrics.json").read_text()) == metrics
    assert json.loads((results / "source.json").read_text()) == source  # still names the checkpoint
    code, _, err = call(EVAL, capsys, "--weights", str(root / "nothing.pth"), *overrides)
    assert code == 2 and "nothing.pth: --weights file not found" in _error_line(err)


def test_a_second_evaluation_into_a_folder_in_use_is_refused_naming_the_first(run_a, tmp_path, capsys):
    """A job array evaluating a run's checkpoints at once: all wrote into <run>/inference, the
    files of both mixed and source.json naming one checkpoint for the other's numbers."""
    root, overrides = run_a
    shared = tmp_path / "inference"
    first = RunLock(shared, EVAL_LOCK_FILE, "evaluation").acquire()  # as a live eval.py holds it
    try:
        code, _, err = call(EVAL, capsys, "--weights", str(root / "run_a" / "model_final.pth"),
                            "--output-dir", str(shared), *overrides)
        line = _error_line(err)
        assert code == 75 and f"{shared} is in use by another evaluation (pid {os.getpid()} on " in line, line
        assert "--output-dir" in line
        assert sorted(p.name for p in shared.iterdir()) == [EVAL_LOCK_FILE]  # nothing of the second written
    finally:
        first.release()


def test_sigterm_stops_an_evaluation_in_one_line_and_releases_its_folder(run_a, tmp_path, capsys, monkeypatch):
    """A container trial: a scheduler's SIGTERM ended eval.py without a word (Python's default),
    leaving its lock file; now as Ctrl-C: its clean-ups run and one line says so, exit 143."""
    import signal

    from detection.modeling.model import FasterRCNN

    root, overrides = run_a
    real = FasterRCNN.forward

    def forward(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FasterRCNN, "forward", forward)
    out = tmp_path / "inference"
    code, _, err = call(EVAL, capsys, "--weights", str(root / "run_a" / "model_final.pth"), "--output-dir",
                        str(out), *overrides)
    assert code == 143 and err.strip().splitlines()[-1] == "stopped by SIGTERM", err[-2000:]
    assert not (out / EVAL_LOCK_FILE).exists() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.slow  # evaluates through eval.main
def test_eval_refuses_a_folder_holding_another_checkpoints_results(run_a, tmp_path, capsys):
    root, overrides = run_a
    weights_a = root / "run_a" / "model_final.pth"
    weights_b = tmp_path / "run_b" / "model_final.pth"  # another run's checkpoint
    weights_b.parent.mkdir()
    shutil.copy(weights_a, weights_b)
    shared = tmp_path / "shared"
    code, out, err = call(EVAL, capsys, "--weights", str(weights_a), "--output-dir", str(shared), *overrides)
    assert code == 0 and "replacing" not in out, err  # a new folder: nothing to replace
    metrics = (shared / "shapes_val" / "metrics.json").read_bytes()

    code, out, err = call(EVAL, capsys, "--weights", str(weights_b), "--output-dir", str(shared), *overrides)
    line = _error_line(err)
    assert code == 2 and str(weights_a.resolve()) in line and str(weights_b.resolve()) in line
    assert "--output-dir" in line and "--overwrite" in line
    assert (shared / "shapes_val" / "metrics.json").read_bytes() == metrics  # untouched
    # the same checkpoint again (say with other test settings) replaces its results, saying so once;
    # the same path rewritten (a new training) is another checkpoint
    code, out, err = call(EVAL, capsys, "--weights", str(weights_a), "--output-dir", str(shared), *overrides)
    assert code == 0, err
    replacing = [line for line in out.splitlines() if "replacing" in line]
    assert len(replacing) == 1 and str(shared / "shapes_val") in replacing[0] and "--output-dir" in replacing[0], out
    stat = weights_a.stat()
    os.utime(weights_a, (stat.st_atime, stat.st_mtime + 60))
    try:
        code, _, err = call(EVAL, capsys, "--weights", str(weights_a), "--output-dir", str(shared), *overrides)
        assert code == 2 and "an earlier version of the checkpoint" in _error_line(err)
    finally:
        os.utime(weights_a, (stat.st_atime, stat.st_mtime))
    # --overwrite replaces them and records the new checkpoint
    code, _, err = call(EVAL, capsys, "--weights", str(weights_b), "--output-dir", str(shared), "--overwrite",
                        *overrides)
    assert code == 0, err
    assert json.loads((shared / "source.json").read_text())["path"] == str(weights_b.resolve())


@pytest.mark.slow  # evaluates through eval.main
def test_an_unreadable_test_image_skipped_is_counted_and_left_out_of_the_report(run_a, tmp_path, capsys):
    """dataloader.skip_bad_images with a truncated test image: the metrics say how many images
    they cover, and report.html is written without it (its gallery read the image: exit 2)."""
    root, overrides = run_a
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    victim = sorted((data / "shapes" / "val").glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:-400])  # cut short: no end-of-image marker
    code, out, err = call(EVAL, capsys, "--weights", str(root / "run_a" / "model_final.pth"), "--output-dir",
                          str(tmp_path / "out"), *overrides, f"datasets.root={json.dumps(str(data))}",
                          "dataloader.skip_bad_images=true")
    assert code == 0, err
    assert ("shapes_val (1 of its 2 images: 1 unreadable, skipped (dataloader.skip_bad_images), "
            f"{data / 'shapes' / 'annotations' / 'instances_val.json'})") in out  # which data: the copy
    assert (tmp_path / "out" / "report.html").is_file() and (tmp_path / "out" / "shapes_val" / "metrics.json").is_file()
    # the report counts the objects of the image the metrics cover, not the skipped one's as missed
    section = json.loads((tmp_path / "out" / "shapes_val" / "report_section.json").read_text())
    kept = json.loads((data / "shapes" / "annotations" / "instances_val.json").read_text())
    kept_id = next(i["id"] for i in kept["images"] if i["file_name"] != victim.name)
    assert section["num_images"] == 1 and section["skipped"] == 1
    page = (tmp_path / "out" / "report.html").read_text()  # the page says so too, not only the console
    assert "1 images;\n1 more unreadable, left out of the metrics and this page (dataloader.skip_bad_images)" in page
    assert sum(c["gt"] for c in section["per_class"]) == sum(a["image_id"] == kept_id for a in kept["annotations"])
    # re-scoring the saved results leaves the skipped image out as the run did: the same numbers
    skipped = json.loads((tmp_path / "out" / "shapes_val" / "skipped_images.json").read_text())["images"]
    assert [Path(e["file_name"]).name for e in skipped] == [victim.name]
    code, again, err = call(EVAL, capsys, "--results", str(tmp_path / "out"), "--output-dir", str(tmp_path / "re"),
                            *overrides, f"datasets.root={json.dumps(str(data))}")
    assert code == 0, err
    assert "shapes_val (1 of its 2 images: 1 unreadable, skipped" in again
    assert json.loads((tmp_path / "re" / "shapes_val" / "metrics.json").read_text()) == \
        json.loads((tmp_path / "out" / "shapes_val" / "metrics.json").read_text())


def _eval_as_torchrun_starts_it(rank: int, world: int, port: int, argv: list, out_file: str) -> None:
    """tools/eval.py's main in one of `world` forked processes with the environment torchrun
    gives each (RANK, WORLD_SIZE, MASTER_ADDR, ...): the tool joins the group itself (gloo on the
    CPU); its exit code goes to out_file.<rank>."""
    import torch

    torch.set_num_threads(1)  # a forked child must not reuse the parent's thread pool
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        code = EVAL.main(argv)
    except SystemExit as stop:
        code = stop.code
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    Path(f"{out_file}.{rank}").write_text(str(code))


@pytest.mark.slow  # evaluates in one process and in two
def test_eval_under_torchrun_shares_the_images_and_writes_what_one_process_writes(run_a, tmp_path, capsys):
    """torchrun --nproc_per_node 2 tools/eval.py --weights CKPT (Detectron2's --eval-only --num-gpus 2):
    each process runs every other image, the first scores them all and writes the folder; the
    metrics are one process's, to the last digit (5 images: shares of 3 and 2)."""
    from tests.helpers import run_forked_processes

    root, overrides = run_a
    generate_shapes(tmp_path / "data" / "shapes", num_train=1, num_val=5, seed=3, image_size=(64, 80))
    argv = ["--config", str(ROOT / "configs" / "base.yaml"), "--weights", str(root / "run_a" / "model_final.pth"),
            *overrides, f"datasets.root={json.dumps(str(tmp_path / 'data'))}"]
    code, _, err = call(EVAL, capsys, *argv[2:], "--output-dir", str(tmp_path / "one"))
    assert code == 0, err
    with socket.socket() as probe:  # a free port for the group's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run_forked_processes(_eval_as_torchrun_starts_it, (2, port, [*argv, "--output-dir", str(tmp_path / "two")],
                                                       str(tmp_path / "code")), timeout=180)
    assert [(tmp_path / f"code.{rank}").read_text() for rank in (0, 1)] == ["0", "0"]
    one, two = (json.loads((tmp_path / d / "shapes_val" / "metrics.json").read_text()) for d in ("one", "two"))
    assert one == two and one["AP"] > 0
    assert json.loads((tmp_path / "two" / "shapes_val" / "coco_results.json").read_text()) == \
        json.loads((tmp_path / "one" / "shapes_val" / "coco_results.json").read_text())
    assert (tmp_path / "two" / "report.html").is_file()


def test_results_folder_of_an_older_version_without_source_json_is_not_overwritten(tmp_path):
    legacy = tmp_path / "inference"
    legacy.mkdir()
    (legacy / "metrics.json").write_text("{}")  # the one-test-set layout before source.json
    ckpt = tmp_path / "model_final.pth"
    ckpt.write_bytes(b"x")
    with pytest.raises(ValueError, match="no source.json"):
        check_results_folder(legacy, ResultsSource.of("weights", ckpt))
    check_results_folder(legacy, ResultsSource.of("weights", ckpt), overwrite=True)
    check_results_folder(tmp_path / "new", ResultsSource.of("weights", ckpt))  # nothing there: fine
    # --overwrite leaves no file of the old results next to the new ones (a test set since removed too)
    (legacy / "voc_old").mkdir()
    (legacy / "voc_old" / "comp4_det_test_cat.txt").write_text("")
    (legacy / "notes.txt").write_text("mine")
    claim_results_folder(legacy, ResultsSource.of("weights", ckpt), ["shapes_val"], overwrite=True)
    assert sorted(p.name for p in legacy.iterdir()) == ["notes.txt", "shapes_val", "source.json"]  # the new set's


# --- a test set's classes against the checkpoint's -------------------------------------------

@pytest.mark.slow  # uses the module's trained run
def test_visualize_draws_a_test_set_in_another_class_order_with_each_sides_names(run_a, tmp_path, capsys):
    """Checkpoint [circle, square, triangle], VOC test set [square, circle, triangle] (eval's
    scoring by name: tests/test_own_data_checks.py): drawn, predictions with the model's names."""
    root, overrides = run_a
    code, _, err = call(VISUALIZE, capsys, "--weights", str(root / "run_a" / "model_final.pth"), "--compare",
                        "--output", str(tmp_path / "vis"), *overrides,
                        f"datasets.test={json.dumps([_voc_entry(['square', 'circle', 'triangle'])])}")
    assert code == 0 and len(list((tmp_path / "vis").glob("*.jpg"))) == 2, err


@pytest.mark.slow  # uses the module's trained run
def test_test_set_with_other_class_names_is_refused(run_a, tmp_path, capsys):
    root, overrides = run_a
    data = json.loads((root / "data" / "shapes" / "annotations" / "instances_val.json").read_text())
    for cat, name in zip(data["categories"], ["disc", "box", "cross"]):
        cat["name"] = name
    ann = tmp_path / "renamed.json"
    ann.write_text(json.dumps(data))
    entry = {"type": "coco", "ann_file": str(ann), "image_root": str(root / "data" / "shapes" / "val")}
    code, _, err = call(EVAL, capsys, "--weights", str(root / "run_a" / "model_final.pth"), "--output-dir",
                        str(tmp_path / "eval"), *overrides, f"datasets.test={json.dumps([entry])}")
    line = _error_line(err)
    assert code == 2 and "['disc', 'box', 'cross']" in line and str(SHAPES) in line


def test_class_check_without_saved_names_uses_the_config_then_the_count(caplog):
    detectron2 = type("W", (), {"class_names": None, "path": "model_final_721ade.pkl"})()
    saved = type("W", (), {"class_names": SHAPES, "path": "ckpt.pth"})()
    with caplog.at_level("WARNING"):  # a growing-data trial: a typo fixed in model.class_names did nothing, unsaid
        assert model_class_names(saved, ["a", "b", "c"]) == (SHAPES, "the checkpoint ckpt.pth was trained on")
    assert f"model.class_names (a, b, c) is not used: the checkpoint ckpt.pth names the classes it was trained on " \
           f"({', '.join(SHAPES)}), in its label order, and those are taken; to rename them" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        model_class_names(saved, list(SHAPES))
    assert not caplog.text
    assert model_class_names(detectron2, ["a", "b", "c"]) == (["a", "b", "c"], "model.class_names is")
    assert model_class_names(detectron2, []) == (None, "")
    check_class_names("d", SHAPES, None, 3)  # names unknown: the count matches
    with pytest.raises(ValueError, match=r"has 3 classes .* detects 2 \(model.num_classes"):
        check_class_names("d", SHAPES, None, 2)
    with pytest.raises(ValueError, match="another order"):
        check_class_names("d", ["b", "a", "c"], *model_class_names(detectron2, ["a", "b", "c"])[:1], 3)


# --- one folder per test set, safe names -----------------------------------------------------

@pytest.mark.slow  # evaluates through eval.main
def test_one_folder_per_test_set_whatever_their_number(run_a, tmp_path, capsys):
    root, overrides = run_a
    weights = str(root / "run_a" / "model_final.pth")
    assert call(EVAL, capsys, "--weights", weights, "--output-dir", str(tmp_path / "one"), *overrides)[0] == 0
    assert (tmp_path / "one" / "shapes_val" / "metrics.json").is_file()
    assert not (tmp_path / "one" / "metrics.json").exists()
    two = f"datasets.test={json.dumps(['shapes_val', _voc_entry(SHAPES)])}"
    code, _, err = call(EVAL, capsys, "--weights", weights, "--output-dir", str(tmp_path / "two"), *overrides, two)
    assert code == 0, err
    folders = sorted(p.name for p in (tmp_path / "two").iterdir() if p.is_dir())
    assert folders == ["shapes_val", "voc_VOC_val"]  # "voc:VOC_val" without the colon
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in folders)
    for folder in folders:
        assert (tmp_path / "two" / folder / "metrics.json").is_file()
    # the results folder reads back as --results: each test set finds its own results
    code, _, err = call(EVAL, capsys, "--results", str(tmp_path / "two"), "--output-dir", str(tmp_path / "again"),
                        *overrides, two)
    assert code == 0, err
    for folder in folders:
        assert (json.loads((tmp_path / "again" / folder / "metrics.json").read_text())
                == json.loads((tmp_path / "two" / folder / "metrics.json").read_text()))


def test_folder_names_are_file_system_safe_and_distinct():
    assert results_subfolder("voc:MyVOC_val") == "voc_MyVOC_val"
    assert results_subfolder("coco:instances val/2017") == "coco_instances_val_2017"
    assert results_subfolder("..") == "test_set" and results_subfolder(".hidden") == "hidden"
    with pytest.raises(ValueError, match="'voc:a' and 'voc/a' would share the results folder 'voc_a'"):
        results_subfolders(["voc:a", "voc/a"])
    # names in other scripts keep their letters: two sets evaluated into one folder in two runs
    # became "_" both, and the second replaced the first's results as if the same set
    assert (results_subfolder("日本"), results_subfolder("中国"), results_subfolder("café val")) == \
        ("日本", "中国", "café_val")


def test_a_results_folder_that_cannot_be_created_is_one_error(tmp_path):
    """A results folder under a file (or read-only, or a name too long) was an OSError traceback."""
    from detection.utils.files import OutputFolderError

    (tmp_path / "a_file").write_text("x")
    source = ResultsSource.of("results", str(tmp_path / "a_file"))
    with pytest.raises(OutputFolderError, match=r"a_file/inference: cannot create the results folder \(Not a "
                                                r"directory\); --output-dir DIR gives another"):
        claim_results_folder(tmp_path / "a_file" / "inference", source, ["shapes_val"])


def test_a_source_json_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    """A file-system trial: a full disk failing source.json's write said "report.html: cannot be
    replaced" (no report.html existed)."""
    import tempfile

    from detection.evaluation.outputs import claim_for_every_process
    from detection.utils.files import OutputFolderError

    (tmp_path / "model.pth").write_bytes(b"x")
    source = ResultsSource.of("weights", str(tmp_path / "model.pth"))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", full_disk)
    with pytest.raises(OutputFolderError) as err:
        claim_for_every_process(tmp_path / "inference", source, ["shapes_val"], echo=lambda *a: None)
    assert str(tmp_path / "inference" / "source.json") in str(err.value) and "No space left" in str(err.value)
    assert "report.html" not in str(err.value)


def test_a_test_sets_old_results_go_before_its_new_ones_are_written(tmp_path):
    """The same checkpoint evaluated again into its folder: the sets evaluated now lose their old
    files first, so a run stopped half-way leaves no old metrics or report section beside its new
    results (report.html would show them); other sets and re-scoring the folder's own results
    keep theirs. A file where a set's folder goes is one error; a folder an evaluation left
    without results (stopped before writing any) is not "another checkpoint's results"."""
    from detection.utils.files import OutputFolderError

    folder, ckpt = tmp_path / "inference", tmp_path / "model_final.pth"
    ckpt.write_bytes(b"x")
    source = ResultsSource.of("weights", ckpt)
    claim_results_folder(folder, source, ["shapes_val", "shapes_test"])
    for name in ("shapes_val", "shapes_test"):
        for file in ("metrics.json", "pr_curves.png", "report_section.json", "coco_results.json"):
            (folder / name / file).write_text("old")
    claim_results_folder(folder, source, ["shapes_val"])
    assert list((folder / "shapes_val").iterdir()) == [] and len(list((folder / "shapes_test").iterdir())) == 4
    # --results of the folder's own set into the folder: its files are the input, kept
    claim_results_folder(folder, ResultsSource.of("results", folder / "shapes_test" / "coco_results.json"),
                         ["shapes_test"])
    assert len(list((folder / "shapes_test").iterdir())) == 4
    (folder / "voc_x").write_text("a file")
    with pytest.raises(OutputFolderError, match=r"inference/voc_x: cannot create the test set's results folder"):
        claim_results_folder(folder, source, ["voc_x"])
    # another checkpoint's evaluation stopped before it wrote a result: the folder holds nothing to lose
    stopped = tmp_path / "stopped"
    other = tmp_path / "other.pth"
    other.write_bytes(b"y")
    claim_results_folder(stopped, ResultsSource.of("weights", other), ["shapes_val"])
    check_results_folder(stopped, source)


def test_eval_help_describes_the_layout(capsys):
    with pytest.raises(SystemExit):
        EVAL.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "one folder per test set" in text and "source.json" in text and "voc_MyVOC_val" in text
    assert "<folder of the checkpoint>/inference" in text and "--overwrite" in text


# --- pictures --------------------------------------------------------------------------------

def _spy_tags(monkeypatch) -> list:
    calls = []
    real = detection.visualization.draw.draw_detections

    def spy(image, boxes, labels, scores, names, thresh=0.5, tags=None, **kwargs):
        calls.append((scores is None, list(tags or [])))
        return real(image, boxes, labels, scores, names, thresh, tags=tags, **kwargs)

    monkeypatch.setattr(detection.visualization.draw, "draw_detections", spy)
    return calls


@pytest.mark.slow  # uses the module's trained run
def test_gt_marks_difficult_objects_and_crowd_regions(run_a, tmp_path, capsys, monkeypatch):
    root, overrides = run_a
    voc = tmp_path / "VOC"  # the shapes VOC view with its first object difficult
    shutil.copytree(root / "data" / "shapes" / "VOC", voc)  # follows the image links
    xml = voc / "Annotations" / "val_000000.xml"
    xml.write_text(xml.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1))
    calls = _spy_tags(monkeypatch)
    entry = {"type": "voc", "root": str(voc), "split": "val", "classes": SHAPES}
    code, _, err = call(VISUALIZE, capsys, "--gt", "--output", str(tmp_path / "voc_gt"), "--limit", "1",
                        *overrides, f"datasets.test={json.dumps([entry])}")
    assert code == 0, err
    assert calls[0][1][0] == "difficult" and calls[0][1].count("difficult") == 1
    # a COCO crowd region: not in the records, still drawn (from the json), tagged "crowd"
    data = json.loads((root / "data" / "shapes" / "annotations" / "instances_val.json").read_text())
    first = data["images"][0]["id"]
    data["annotations"].append({"id": 999, "image_id": first, "category_id": 2, "bbox": [2, 2, 20, 20],
                                "area": 400, "iscrowd": 1})
    ann = tmp_path / "crowd.json"
    ann.write_text(json.dumps(data))
    calls.clear()
    entry = {"type": "coco", "ann_file": str(ann), "image_root": str(root / "data" / "shapes" / "val")}
    code, _, err = call(VISUALIZE, capsys, "--weights", str(root / "run_a" / "model_final.pth"), "--compare",
                        "--output", str(tmp_path / "coco_cmp"), "--limit", "1", *overrides,
                        f"datasets.test={json.dumps([entry])}")
    assert code == 0, err
    gt_tags = [tags for is_gt, tags in calls if is_gt]
    assert gt_tags[0][-1] == "crowd" and gt_tags[0].count("crowd") == 1


@pytest.mark.slow  # uses the module's trained run
def test_output_names_are_one_scheme_and_never_collide(run_a, tmp_path, capsys):
    """Two inputs named img.jpg in different folders; --gt writes under the same scheme."""
    root, overrides = run_a
    image = sorted((root / "data" / "shapes" / "val").glob("*.jpg"))[0]
    for sub in ("a", "b"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        shutil.copy(image, tmp_path / "in" / sub / "img.jpg")
    code, _, err = call(VISUALIZE, capsys, "--weights", str(root / "run_a" / "model_final.pth"), "--input",
                        str(tmp_path / "in" / "*" / "img.jpg"), "--output", str(tmp_path / "pred"), *overrides)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["00000_img.jpg", "00001_img.jpg",
                                                                      "detections.jsonl", "detections.source.json"]
    listed = [json.loads(line)["image"] for line in (tmp_path / "pred" / "detections.jsonl").read_text().splitlines()]
    assert listed == [str(tmp_path / "in" / sub / "img.jpg") for sub in ("a", "b")]  # the way back to the inputs
    assert call(VISUALIZE, capsys, "--gt", "--output", str(tmp_path / "gt"), "--limit", "1", *overrides)[0] == 0
    assert [p.name for p in (tmp_path / "gt").iterdir()] == [f"00000_{image.stem}.jpg"]
    assert "NNNNN_STEM.jpg" in " ".join(VISUALIZE.__doc__.split())


def test_ground_truth_boxes_and_crowd_regions(tmp_path):
    record = {"boxes": np.array([[0, 0, 5, 5], [1, 1, 4, 4]], np.float32), "labels": np.array([1, 2]),
              "difficult": np.array([False, True])}
    boxes, labels, tags = detection.visualization.draw.ground_truth_boxes(record)
    assert tags == ["", "difficult"] and labels.tolist() == [1, 2]
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({"annotations": [
        {"image_id": 7, "category_id": 40, "bbox": [1, 2, 3, 4], "iscrowd": 1},
        {"image_id": 7, "category_id": 40, "bbox": [0, 0, 1, 1], "iscrowd": 0}]}))
    crowd = detection.visualization.draw.read_crowd_regions(ann, {1: 10, 2: 40})  # label 2 is category 40
    assert list(crowd) == [7] and crowd[7][0].tolist() == [[1, 2, 4, 6]] and crowd[7][1].tolist() == [2]
    boxes, labels, tags = detection.visualization.draw.ground_truth_boxes(record, crowd[7])
    assert tags == ["", "difficult", "crowd"] and labels.tolist() == [1, 2, 2] and boxes.shape == (3, 4)


def test_a_full_disk_when_the_results_folder_is_claimed_exits_75(tmp_path, monkeypatch):
    """source.json not written for a full disk: the same command may succeed later (75), not a bad
    input (2) (a review of the exit codes)."""
    import contextlib
    import errno

    from detection.cli import EXIT_TRY_AGAIN, project_error_code
    from detection.evaluation import outputs
    from detection.utils.files import OutputFolderError, WriteError

    @contextlib.contextmanager
    def full(path, *args, **kwargs):
        raise WriteError(f"could not write {path} (No space left on device)", errno.ENOSPC, "No space left on device")
        yield

    monkeypatch.setattr(outputs, "atomic_write", full)
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"x")
    with pytest.raises(OutputFolderError, match="No space left on device") as err:
        outputs.claim_for_every_process(tmp_path / "out", outputs.ResultsSource.of("weights", weights), ["a"],
                                        echo=lambda *a: None)
    assert project_error_code(err.value) == EXIT_TRY_AGAIN
