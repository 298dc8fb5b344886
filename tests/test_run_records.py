"""What a Detectron2 user expects of a run's records and settings: --resume keeps the run's config
unless a key is changed on the command line (and keeps the history), log.txt in the output
folder, metrics.jsonl's `time` and `lr` as the iterations had them, inherited class names that
do not fit a fine-tune, `--config-file` / `--opts`, num_workers capped at the CPUs, and
visualize.py saying what it drew."""
from __future__ import annotations

import json
import re
import logging
from pathlib import Path

import pytest
import torch
import yaml

import detection.config
import detection.visualization.draw
from detection.config import ConfigError, config_to_dict, load_config, save_config
from detection.engine import trainer
from detection.engine.checkpoint import load_checkpoint, save_checkpoint
from detection.engine.run_config import check_resume_config, record_resume_changes, schedule_jump
from detection.modeling.model import LOSS_KEYS, build_model
from tests.helpers import load_tool, tiny_cfg, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
train_det, visualize = load_tool("train_det"), load_tool("visualize")
pytestmark = pytest.mark.usefixtures("restore_logging")


def tool_argv(data_root, out, *flags, leave_out=(), **extra) -> list[str]:
    """train_det's command line: base.yaml, the tiny settings as KEY=VALUE (minus `leave_out`)."""
    items = [x for x in tiny_overrides(data_root, out, **extra) if x.split("=", 1)[0] not in leave_out]
    return ["--config", str(ROOT / "configs" / "base.yaml"), *flags, *items]


def main_code(tool, argv) -> int:
    try:
        return tool.main(argv)
    except SystemExit as err:
        return err.code


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- resume keeps its config

RUN_SETTINGS = {"model.roi_heads.batch_size_per_image": 8, "model.rpn.post_nms_topk_train": 30}


@pytest.mark.slow  # trains through train_det.main
def test_resume_without_the_runs_overrides_is_refused_and_a_deliberate_change_is_recorded(data_root, tmp_path,
                                                                                          capsys):
    out = tmp_path / "run"
    assert main_code(train_det, tool_argv(data_root, out, **RUN_SETTINGS, **{"solver.max_iter": 2})) == 0
    saved = {n: (out / n).read_bytes() for n in ("config.yaml", "last.pth", "metrics.jsonl", "log.txt")}
    capsys.readouterr()
    # resumed to extend the run but without its two overrides: base.yaml's 512 and 2000 differ from the run's
    argv = tool_argv(data_root, out, "--resume", leave_out=tuple(RUN_SETTINGS), **{"solver.max_iter": 4})
    assert main_code(train_det, argv) == 2
    errors = [x for x in capsys.readouterr().err.split("\n") if x.startswith("error:")]
    assert len(errors) == 1, errors
    assert f"differs from the run's {out / 'config.yaml'} in 2 keys" in errors[0]
    assert "model.roi_heads.batch_size_per_image (the run: 8, now: 512)" in errors[0]
    assert "model.rpn.post_nms_topk_train (the run: 30, now: 2000)" in errors[0]
    assert "solver.max_iter" not in errors[0]  # given on the command line: deliberate
    assert {n: (out / n).read_bytes() for n in saved} == saved  # nothing trained, nothing rewritten
    assert not list(out.glob("config_resumed_*"))
    # with the run's settings, extending the run is deliberate: it trains on, and the change is kept
    assert main_code(train_det, tool_argv(data_root, out, "--resume", **RUN_SETTINGS,
                                          **{"solver.max_iter": 4})) == 0
    assert load_checkpoint(out / "last.pth")["iteration"] == 4
    now = load_config(out / "config.yaml")
    assert (now.solver.max_iter, now.model.roi_heads.batch_size_per_image, now.model.rpn.post_nms_topk_train) \
        == (4, 8, 30)
    assert yaml.safe_load((out / "config_resumed_0000002.yaml").read_text()) == {
        "resumed_at_iteration": 2, "changed": {"solver.max_iter": {"before": 2, "after": 4}}}
    # the remedy the error names: the run's own config.yaml, plus the deliberate change
    assert main_code(train_det, ["--config", str(out / "config.yaml"), "--resume", "solver.max_iter=5"]) == 0
    assert load_checkpoint(out / "last.pth")["iteration"] == 5
    assert yaml.safe_load((out / "config_resumed_0000004.yaml").read_text())["changed"] == {
        "solver.max_iter": {"before": 4, "after": 5}}


@pytest.mark.slow  # trains through train_det.main
def test_weights_given_to_a_resume_are_said_not_to_be_read_and_config_yaml_keeps_the_runs(data_root, tmp_path,
                                                                                          capsys):
    """torchvision's `--resume model_N.pth` spelled `--resume model.weights=model_N.pth` resumed
    last.pth in silence, and config.yaml then named the file it did not read (a trial)."""
    out = tmp_path / "run"
    assert main_code(train_det, tool_argv(data_root, out, **{"solver.max_iter": 2})) == 0
    before = load_config(out / "config.yaml").model.weights
    older = tmp_path / "model_0000001.pth"
    older.write_bytes((out / "last.pth").read_bytes())
    capsys.readouterr()
    assert main_code(train_det, tool_argv(data_root, out, "--resume", **{"solver.max_iter": 3,
                                                                         "model.weights": str(older)})) == 0
    err = capsys.readouterr().err
    assert f"--resume: model.weights={older} is not read: the run continues from {out / 'last.pth'}" in err
    assert "copy it to last.pth" in err
    assert load_config(out / "config.yaml").model.weights == before != str(older)


@pytest.mark.slow  # trains through train_det.main
def test_a_deliberate_change_of_lr_momentum_or_weight_decay_on_resume_is_the_one_trained_with(data_root, tmp_path):
    """The checkpoint restores the momentum buffers and where the schedule is; the optimizer's
    hyperparameters are the resumed run's config (they were the checkpoint's: recorded as
    changed, and silently trained with the old values)."""
    out = tmp_path / "run"
    assert main_code(train_det, tool_argv(data_root, out, **{"solver.max_iter": 2})) == 0
    changed = {"solver.base_lr": 0.002, "solver.momentum": 0.5, "solver.weight_decay": 0.01}
    assert main_code(train_det, tool_argv(data_root, out, "--resume", **{"solver.max_iter": 4}, **changed)) == 0
    lrs = {row["iteration"]: row["lr"] for row in metrics(out) if "lr" in row}
    assert lrs[2] == pytest.approx(0.01 * (0.001 * 0.5 + 0.5))  # warmup (2 iterations) at the old base_lr
    assert lrs[3] == pytest.approx(0.002) and lrs[4] == pytest.approx(0.002)  # then the new one
    groups = load_checkpoint(out / "last.pth")["optimizer"]["param_groups"]
    assert [(g["momentum"], g["weight_decay"], g["initial_lr"]) for g in groups] == [(0.5, 0.01, 0.002),
                                                                                    (0.5, 0.0, 0.002)]
    assert yaml.safe_load((out / "config_resumed_0000002.yaml").read_text())["changed"]["solver.base_lr"] == {
        "before": 0.01, "after": 0.002}


@pytest.mark.slow  # trains through train_det.main
def test_resume_to_a_max_iter_at_or_below_where_the_run_is(data_root, tmp_path, capsys):
    """solver.max_iter lowered on --resume: to where last.pth is, the run ends there and the
    change is recorded as any other; below it, one error (a run cannot go back)."""
    out = tmp_path / "run"
    assert main_code(train_det, tool_argv(data_root, out, **{"solver.max_iter": 3})) == 0
    # as if it had been started for 6 iterations and stopped at 3
    saved = yaml.safe_load((out / "config.yaml").read_text())
    saved["solver"]["max_iter"] = 6
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    (out / "model_final.pth").unlink()
    capsys.readouterr()
    assert main_code(train_det, tool_argv(data_root, out, "--resume", **{"solver.max_iter": 2})) == 2
    error = capsys.readouterr().err
    assert f"solver.max_iter=2: {out / 'last.pth'} is at iteration 3 and a run cannot go back" in error
    assert main_code(train_det, tool_argv(data_root, out, "--resume", **{"solver.max_iter": 3})) == 0
    assert load_checkpoint(out / "model_final.pth")["iteration"] == 3
    assert load_config(out / "config.yaml").solver.max_iter == 3
    assert yaml.safe_load((out / "config_resumed_0000003.yaml").read_text())["changed"] == {
        "solver.max_iter": {"before": 6, "after": 3}}
    assert "the run is finished (iteration 3, solver.max_iter 3)" in (out / "log.txt").read_text()


def test_a_folder_with_a_run_but_no_last_pth_is_not_offered_to_resume(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"iteration": 1, "total_loss": 2.0}\n')  # stopped before a checkpoint
    assert main_code(train_det, tool_argv(data_root, out)) == 2
    error = capsys.readouterr().err
    assert "with no last.pth to continue: --overwrite replaces it" in error and "--resume" not in error


@pytest.mark.slow  # trains, then evaluates
def test_a_runs_relative_folders_are_kept_absolute_so_its_tools_work_from_anywhere(data_root, tmp_path, monkeypatch,
                                                                                   capsys):
    """datasets.root=data and output_dir='my run' relative to where training ran: config.yaml keeps
    them absolute, so eval.py --weights and --resume from another working directory read the run's
    data and folder (not a `data` that happens to be there); the closing eval command is quoted."""
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "data").symlink_to(data_root, target_is_directory=True)
    monkeypatch.chdir(tmp_path / "work")
    assert main_code(train_det, tool_argv("data", "my run", **{"solver.max_iter": 1})) == 0
    out = tmp_path / "work" / "my run"
    # quoted, and absolute: the command works from any folder (a CLI audit)
    assert f"--weights '{out / 'model_final.pth'}' evaluates it" in capsys.readouterr().err
    saved = load_config(out / "config.yaml")
    assert (saved.output_dir, saved.datasets.root) == (str(out), str(tmp_path / "work" / "data"))
    # elsewhere, a `data` folder without the shapes set: the run's config still finds the run's
    (tmp_path / "elsewhere" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere")
    code = main_code(load_tool("eval"), ["--weights", str(out / "model_final.pth"), "--output-dir", "ev"])
    out_text, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    assert f"shapes_val (2 images, {tmp_path / 'work' / 'data' / 'shapes' / 'annotations'}" in out_text
    assert (tmp_path / "elsewhere" / "ev" / "shapes_val" / "metrics.json").is_file()
    # and --resume with the run's config continues the run in its folder, not a new one here
    assert main_code(train_det, ["--config", str(out / "config.yaml"), "--resume", "solver.max_iter=2"]) == 0
    assert load_checkpoint(out / "last.pth")["iteration"] == 2 and not (tmp_path / "elsewhere" / "my run").exists()


def test_resume_check_names_every_differing_key_but_not_where_things_are(tmp_path):
    cfg = tiny_cfg(tmp_path / "data", tmp_path / "run")
    save_config(cfg, tmp_path / "run" / "config.yaml")
    moved = tiny_cfg(tmp_path / "elsewhere", tmp_path / "run", **{
        "dataloader.num_workers": 1, "model.backbone.weights": "R-18.pkl",  # where / how fast: not compared
        "solver.max_iter": 12, "solver.base_lr": 0.02, "model.rpn.nms_thresh": 0.6})
    with pytest.raises(ConfigError) as err:
        check_resume_config(moved, tmp_path / "run", explicit=["solver"])  # a section covers its keys
    assert "in 1 key: model.rpn.nms_thresh (the run: 0.7, now: 0.6)" in str(err.value)
    # a caller passing its own Config (explicit=None) changes deliberately; the history is kept
    changes = check_resume_config(moved, tmp_path / "run", explicit=None)
    assert [key for key, _, _ in changes] == ["model.rpn.nms_thresh", "solver.base_lr", "solver.max_iter"]
    record_resume_changes(tmp_path / "run", 6, changes)
    record_resume_changes(tmp_path / "run", 6, [("solver.max_iter", 12, 20)])  # resumed at 6 once more
    changed = yaml.safe_load((tmp_path / "run" / "config_resumed_0000006.yaml").read_text())["changed"]
    assert changed["solver.max_iter"] == {"before": 6, "after": 20}  # the first value before survives
    assert changed["solver.base_lr"] == {"before": 0.01, "after": 0.02}
    assert check_resume_config(cfg, tmp_path / "run", explicit=[]) == []  # the same config: nothing


def test_a_run_config_written_before_exif_orientation_existed_reads_as_its_version_read_images(tmp_path, caplog):
    """input.exif_orientation came on 2026-12-05 with the default true; before it, images were
    read as stored. A run's config.yaml from before lacks the key, and today's default filled in
    turned its 180-degree-tagged test images (same size: nothing refused): its checkpoint scored AP
    0.00 where its version measured 5.16, exit 0 (an upgrade trial). Such a resolved config (every
    section, no _base_) now reads as its version behaved, with a warning naming the key; a user's
    own config keeps today's default, and --resume with it says the key differs."""
    cfg = tiny_cfg(tmp_path / "data", tmp_path / "run")
    saved = tmp_path / "run" / "config.yaml"
    save_config(cfg, saved)
    text = saved.read_text()
    assert text.count("  exif_orientation: true\n") == 1
    saved.write_text(text.replace("  exif_orientation: true\n", ""))
    with caplog.at_level(logging.WARNING, logger="detection"):
        assert load_config(saved).input.exif_orientation is False
    assert caplog.messages == [f"{saved}: written before input.exif_orientation existed (2026-12-05): read as "
                               "input.exif_orientation=false, as the version that wrote it read images as stored, "
                               "their EXIF orientation tag ignored (add the key to the file, or give "
                               "input.exif_orientation=..., to choose)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="detection"):
        assert load_config(saved, ["input.exif_orientation=true"]).input.exif_orientation is True
        own = tmp_path / "mine.yaml"  # a user's config: a few sections, today's defaults for the rest
        own.write_text("model: {num_classes: 3}\nsolver: {max_iter: 10}\ninput: {min_size_test: 64}\n")
        assert load_config(own).input.exif_orientation is True
        (tmp_path / "child.yaml").write_text(f"_base_: {saved}\nseed: 3\n")
        assert load_config(tmp_path / "child.yaml").input.exif_orientation is True
    assert caplog.messages == []
    with pytest.raises(ConfigError, match=r"in 1 key: input.exif_orientation \(the run: false, now: true\)"):
        check_resume_config(cfg, tmp_path / "run", explicit=[])


# ----------------------------------------------------------------------------- log.txt, metrics' time

@pytest.mark.slow  # trains
def test_metrics_time_is_the_windows_median_and_log_txt_holds_the_run(data_root, tmp_path, monkeypatch):
    clock = type("Clock", (), {"now": 0.0, "perf_counter": lambda self: self.now})()
    durations = iter([1.0, 2.0, 30.0, 4.0, 5.0, 6.0])  # the third iteration is slow (say, an evaluation)

    def step(cfg, state, model, images, targets, device):
        clock.now += next(durations)
        return {k: 1.0 for k in LOSS_KEYS}

    monkeypatch.setattr(trainer, "time", clock)  # the trainer's clock only
    monkeypatch.setattr(trainer, "run_step", step)
    out = tmp_path / "run"
    trainer.train(tiny_cfg(data_root, out, **{"solver.max_iter": 6, "log_period": 3}))
    lines = metrics(out)
    assert [(x["iteration"], x["time"], x["data_time"]) for x in lines] == [(3, 2.0, 0.0), (6, 5.0, 0.0)]
    log = (out / "log.txt").read_text()
    assert "INFO detection.engine.trainer: training set shapes_train: 6 images" in log  # the start summary
    # the batch and the schedule in a torchvision user's terms too (its --batch-size is per GPU, in epochs)
    assert "INFO detection.engine.trainer: batch: 2 images an iteration, base_lr 0.01, 6 iterations: 2 epochs of " \
        "the 6 training images" in log
    assert f"output folder: {out.resolve()}" in log
    assert "iter 3/6: total_loss 4 (" in log and "time 2.000 s/it" in log and "eta 0:00:06" in log
    # a run refused by its checks leaves no log.txt (nor a folder)
    with pytest.raises(ValueError, match="model.num_classes is 2"):
        trainer.train(tiny_cfg(data_root, tmp_path / "refused", **{"model.num_classes": 2}))
    assert not (tmp_path / "refused").exists()


def test_two_runs_trained_in_threads_of_one_process_keep_their_own_log_txt(data_root, tmp_path, monkeypatch,
                                                                          capsys):
    """A notebook trial: two train() in threads wrote each other's lines into their log.txt, and
    tqdm's logging redirect put a finished run's handler back on the root logger, where it held
    every later message of the process in memory. The shorter run's end put the logging levels
    back under the longer one (its log.txt stopped there), and with no logging set up neither
    run's lines were printed (a review of the fix)."""
    import threading
    import time

    def step(cfg, state, model, images, targets, device):
        time.sleep(0.05)  # the two runs' iterations interleave
        return {k: 1.0 for k in LOSS_KEYS}

    monkeypatch.setattr(trainer, "run_step", step)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # a notebook with no logging set up
    level = logging.getLogger("detection").level  # as the tests before left it
    lengths = {"A": 2, "B": 6}
    runs = [threading.Thread(target=trainer.train, args=(tiny_cfg(data_root, tmp_path / name, **{
        "solver.max_iter": lengths[name], "datasets.test": [], "seed": seed}),)) for seed, name in enumerate("AB")]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    err = capsys.readouterr().err
    for name, other in ("A", "B"), ("B", "A"):
        log = (tmp_path / name / "log.txt").read_text()
        assert len([line for line in log.splitlines() if ": iter " in line]) == lengths[name], log
        assert f"output folder: {(tmp_path / name).resolve()}" in log and str(tmp_path / other) not in log
        assert f"training finished at iteration {lengths[name]}: the model is {(tmp_path / name).resolve()}" in log
        assert err.count(f"iter {lengths[name]}/{lengths[name]}: ") == 1  # printed once, by its own run
    assert not logging.getLogger().handlers and logging.getLogger("detection").level == level  # put back


def test_a_train_call_with_no_logging_set_up_shows_the_runs_lines(data_root, tmp_path, monkeypatch, capsys):
    """A notebook with no logging set up saw the run's iteration lines only through tqdm's logging
    redirect (and never the start summary); with the redirect under a drawn bar only, they are
    printed as the command line prints them."""
    def step(cfg, state, model, images, targets, device):
        return {k: 1.0 for k in LOSS_KEYS}

    monkeypatch.setattr(trainer, "run_step", step)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # a fresh process: no handler (pytest's removed)
    trainer.train(tiny_cfg(data_root, tmp_path / "run", **{"solver.max_iter": 2, "datasets.test": []}))
    err = capsys.readouterr().err
    assert "training set shapes_train: 6 images" in err and "iter 2/2: total_loss 4 (" in err
    assert "training finished at iteration 2" in err and not logging.getLogger().handlers


def test_class_names_in_another_order_than_the_data_say_how_a_coco_set_numbers_its_classes(data_root, tmp_path):
    """An MMDetection trial: its classes follow the json's order (or classes=(...)); here a COCO
    set's labels follow ascending category id, and the refusal did not say so."""
    with pytest.raises(ConfigError, match=r"model.class_names is \['square', 'circle', 'triangle'\] but the training "
                                          r"set shapes_train has the classes \['circle', 'square', 'triangle'\]; a "
                                          r"COCO json's classes are numbered 1..K in ascending category id"):
        trainer.train(tiny_cfg(data_root, tmp_path / "run", **{"model.class_names": ["square", "circle", "triangle"]}))
    assert not (tmp_path / "run").exists()


def test_train_and_the_predictor_check_a_config_changed_in_python(data_root, tmp_path):
    """`cfg.input.min_size_train = "64"` in a notebook failed deep in the model (a TypeError); an int
    there is one size, as in a file (Detectron2's INPUT.MIN_SIZE_TRAIN 800)."""
    from detection.predictor import Predictor

    cfg = tiny_cfg(data_root, tmp_path / "run")
    cfg.input.min_size_train = "64"
    with pytest.raises(ConfigError, match=r"^the Config given to train\(\): input.min_size_train: expected a list, "
                                          r"got '64' \(one item is written \[item\]\)$"):
        trainer.train(cfg)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"^the Config given to the Predictor: input.min_size_train"):
        Predictor(cfg, weights=tmp_path / "not_read.pth")


def test_python_warnings_of_a_run_reach_log_txt_and_are_still_shown(data_root, tmp_path, monkeypatch):
    """README: log.txt holds every message of the run, warnings too; warnings.warn's (test.amp's
    float32 fallback, PyTorch's) reached only the console. Now both, and the previous warnings
    display is put back after the run."""
    import warnings

    def step(cfg, state, model, images, targets, device):
        warnings.warn("a library's warning in the loop", RuntimeWarning)
        return {k: 1.0 for k in LOSS_KEYS}

    monkeypatch.setattr(trainer, "run_step", step)
    shown_before = warnings.showwarning
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="a library's warning in the loop") as shown:  # shown as before
        trainer.train(tiny_cfg(data_root, out, **{"solver.max_iter": 2, "datasets.test": []}))
    lines = [x for x in (out / "log.txt").read_text().splitlines() if "a library's warning" in x]
    assert len(lines) == len(shown) == 2 and " WARNING py.warnings: a library's warning in the loop (RuntimeWarning, " in lines[0]
    assert f"{Path(__file__).name}:" in lines[0]  # where it was raised
    assert warnings.showwarning == shown_before


@pytest.mark.slow  # trains
def test_logged_lr_is_the_one_the_iteration_ran_at(data_root, tmp_path):
    """metrics.jsonl's lr is the one each iteration ran at: with solver.steps=[3], iteration 3
    runs at the base lr, iteration 4 at a tenth."""
    out = tmp_path / "run"
    trainer.train(tiny_cfg(data_root, out, **{"solver.max_iter": 4, "solver.steps": [3],
                                              "solver.warmup_iters": 0, "solver.base_lr": 0.01}))
    assert [x["lr"] for x in metrics(out)] == pytest.approx([0.01, 0.01, 0.01, 0.001])


# ----------------------------------------------------------------------------- Detectron2 habits

def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_inherited_class_names_give_way_to_a_fine_tunes_num_classes(tmp_path, caplog):
    base = write(tmp_path / "base.yaml", "model: {num_classes: 4, class_names: [a, b, c, d]}\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\nmodel: {num_classes: 3}\n")
    caplog.set_level(logging.INFO, logger="detection")
    assert load_config(child).model.class_names == []
    assert "model.num_classes is 3 but the 4 model.class_names (a, b, c, ...) come from a _base_ " \
           "config: not used; training takes its data's class names" in caplog.text
    assert load_config(base, ["model.num_classes=2"]).model.class_names == []  # the command line's change
    assert "the 4 model.class_names (a, b, c, ...) come from the config file: not used" in caplog.text
    two = write(tmp_path / "two.yaml", "model: {num_classes: 2, class_names: [a, b]}\n")
    load_config(two, ["model.num_classes=3"])
    assert "the 2 model.class_names (a, b) come from the config file" in caplog.text  # no "..." after all of them
    # a Detectron2 config's 80 COCO names, fine-tuned to 3 classes: the names are dropped
    d2 = ROOT / "configs" / "detectron2" / "faster_rcnn_R_50_C4_1x.yaml"
    assert load_config(d2, ["model.num_classes=3"]).model.class_names == []
    assert len(load_config(d2).model.class_names) == 80  # unchanged when they fit
    # names the file itself or the command line gives must still fit
    own = write(tmp_path / "own.yaml", "_base_: base.yaml\nmodel: {num_classes: 3, class_names: [x, y]}\n")
    with pytest.raises(ConfigError, match="model.class_names"):
        load_config(own)
    with pytest.raises(ConfigError, match="model.class_names"):
        load_config(child, ["model.class_names=[x, y]"])


def test_num_workers_is_capped_at_the_cpus(monkeypatch, caplog):
    monkeypatch.setattr(detection.config, "usable_cpus", lambda: 2)
    caplog.set_level(logging.INFO, logger="detection")
    assert load_config(ROOT / "configs" / "base.yaml").dataloader.num_workers == 2  # base.yaml says 4
    assert "dataloader.num_workers 4 is more than the 2 CPUs this process may use: 2 used" in caplog.text
    assert [load_config(None, [f"dataloader.num_workers={n}"]).dataloader.num_workers for n in (0, 1, 2)] \
        == [0, 1, 2]
    # a command line with an error is not also told of the file's 4 workers it set to 0
    caplog.clear()
    with pytest.raises(ConfigError, match="unknown key model.bogus"):
        load_config(ROOT / "configs" / "base.yaml", ["dataloader.num_workers=0", "model.bogus=1"])
    assert "num_workers" not in caplog.text


def test_detectron2_spellings_config_file_and_opts(capsys):
    code = main_code(train_det, ["--config-file", str(ROOT / "configs" / "base.yaml"), "--print-config",
                                 "--opts", "SOLVER.MAX_ITER", "7", "model.rpn.nms_thresh=0.6", "output_dir", "x"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert code == 0
    assert (printed["solver"]["max_iter"], printed["model"]["rpn"]["nms_thresh"], printed["output_dir"]) \
        == (7, 0.6, "x")
    args = train_det.parse_args(["--config-file", "c.yaml", "model.num_classes=3", "--opts", "solver.max_iter", "9"])
    assert args.overrides == ["model.num_classes=3", "solver.max_iter=9"]  # deliberate keys for --resume
    assert main_code(train_det, ["--config-file", "c.yaml", "--opts", "solver.max_iter"]) == 2
    assert "--opts: solver.max_iter has no value" in capsys.readouterr().err
    assert main_code(train_det, ["--opts", "solver.max_iter", "9", "--config-file", "c.yaml"]) == 2
    assert "put --config-file before it" in capsys.readouterr().err


# ----------------------------------------------------------------------------- visualize's closing line

@pytest.mark.slow  # runs tools/visualize.py's main
def test_visualize_says_how_many_detections_it_drew_and_above_which_score(data_root, tmp_path, capsys,
                                                                           monkeypatch):
    cfg = tiny_cfg(data_root, tmp_path, **{"model.roi_heads.score_thresh_test": 0.0})
    weights = tmp_path / "model_final.pth"
    save_checkpoint({"model": build_model(cfg).state_dict(), "iteration": 0, "config": config_to_dict(cfg),
                     "class_names": ["circle", "square", "triangle"]}, weights)
    drawn = []
    real = detection.visualization.draw.draw_detections

    def spy(image, boxes, labels, scores, names, thresh=0.5, tags=None, **kwargs):
        if scores is not None:
            drawn.append(int((torch.as_tensor(scores) >= thresh).sum()))
        return real(image, boxes, labels, scores, names, thresh, tags=tags, **kwargs)

    monkeypatch.setattr(detection.visualization.draw, "draw_detections", spy)
    images = data_root / "shapes" / "val"
    for thresh in ("0.0", "1.0"):
        argv = ["--config", str(ROOT / "configs" / "base.yaml"), "--weights", str(weights), "--input", str(images),
                "--output", str(tmp_path / "vis"), "--score-thresh", thresh,
                *tiny_overrides(data_root, tmp_path, **{"model.roi_heads.score_thresh_test": 0.0})]
        assert main_code(visualize, argv) == 0
        assert len(drawn) == 2
        count = sum(drawn)
        drawn.clear()
        expected = f"wrote 2 images to {tmp_path / 'vis'}: {count} detection{'' if count == 1 else 's'} drawn " \
                   f"(score >= {float(thresh):g}"
        assert capsys.readouterr().out.strip().startswith(expected)
        assert (count > 0) == (thresh == "0.0")  # random weights still score above 0, never 1


def test_config_yaml_on_a_full_disk_is_one_error_and_the_old_file_is_kept(tmp_path, monkeypatch):
    """A file-system trial: config.yaml was written by hand (no fsync, no clean-up): a full disk
    left config.yaml.tmp and a traceback. Now atomic_write's one error, the old file kept."""
    import tempfile

    from detection.config import load_config
    from detection.engine.run_folder import prepare_output_dir
    from detection.utils.files import WriteError

    cfg = load_config(None, [f"output_dir={tmp_path}"])
    prepare_output_dir(cfg, tmp_path, remove=[], resumed_at=None)
    before = (tmp_path / "config.yaml").read_text()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", full_disk)
    with pytest.raises(WriteError, match=rf"{tmp_path / 'config.yaml'}.*No space left on device"):
        prepare_output_dir(load_config(None, [f"output_dir={tmp_path}", "seed=3"]), tmp_path, remove=[],
                           resumed_at=None)
    assert (tmp_path / "config.yaml").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_a_resume_that_moves_the_learning_rate_at_once_says_so():
    """`--resume solver.max_iter=16` on a 12-iteration cosine run (a training trial): the cosine is
    stretched over 16 and the next step ran at 0.00293 where the run had reached 0; only "changed
    deliberately" was said. Extending a multistep run, or moving a step still ahead, changes
    nothing now: no warning."""
    cosine = load_config(None, ["solver.lr_schedule=cosine", "solver.base_lr=0.02", "solver.warmup_iters=0",
                                "solver.max_iter=16"])
    assert schedule_jump(cosine, [("solver.max_iter", 12, 16)], 12) == (
        "--resume at iteration 12: changing solver.max_iter moves the learning rate at once from 0 (the run's) to "
        "0.00293 (the cosine is now over the new solver.max_iter)")  # 0.02 * (1 + cos(3pi/4)) / 2
    assert schedule_jump(cosine, [("solver.max_iter", 24, 16)], 6) == (
        "--resume at iteration 6: changing solver.max_iter moves the learning rate at once from 0.0171 (the run's) "
        "to 0.0138 (0.81x) (the cosine is now over the new solver.max_iter)")
    # base_lr changed with it: the run's lr is the old base_lr's (a review: the jump was understated)
    assert schedule_jump(cosine, [("solver.max_iter", 24, 16), ("solver.base_lr", 0.01, 0.02)], 6) == (
        "--resume at iteration 6: changing solver.max_iter, solver.base_lr moves the learning rate at once from "
        "0.00854 (the run's) to 0.0138 (1.6x) (the cosine is now over the new solver.max_iter)")
    steps = load_config(None, ["solver.base_lr=0.02", "solver.warmup_iters=0", "solver.steps=[60, 80]",
                               "solver.max_iter=100"])
    assert schedule_jump(steps, [("solver.max_iter", 90, 100)], 40) is None
    assert schedule_jump(steps, [("solver.steps", [70, 80], [60, 80])], 40) is None  # still ahead
    assert schedule_jump(steps, [("solver.steps", [30, 80], [60, 80])], 40) == (
        "--resume at iteration 40: changing solver.steps moves the learning rate at once from 0.002 (the run's) to "
        "0.02 (10x)")
    assert schedule_jump(steps, [("solver.base_lr", 0.01, 0.02)], 40) is None  # says itself


def test_a_resume_says_when_it_drops_damaged_metrics_lines_other_than_a_kills_last_one(tmp_path, caplog):
    """A logs trial: lines edited or damaged in the middle of metrics.jsonl went on a resume without a
    word; the last line cut short by a kill is the usual case and stays unsaid."""
    from detection.engine.run_folder import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"iteration": i, "total_loss": 1.0}) for i in (5, 10, 15)]
    path.write_text("\n".join([good[0], '{"iteration": "ten"}', "GARBAGE", good[1], good[2], '{"itera']) + "\n")
    with caplog.at_level("WARNING"):
        truncate_metrics(path, 10)
    assert path.read_text() == good[0] + "\n" + good[1] + "\n"
    assert f"{path}: 2 lines that are not a JSON object with an \"iteration\" dropped on this resume (and the last " \
           "line, cut short by the kill)" in caplog.text
    path.write_text("\n".join(good + ['{"itera']) + "\n")
    caplog.clear()
    with caplog.at_level("WARNING"):
        truncate_metrics(path, 15)
    assert path.read_text() == "".join(line + "\n" for line in good) and not caplog.text


def test_a_resume_that_changes_the_anchors_count_is_refused_and_other_anchors_are_said(tmp_path, caplog):
    """A follow-up trial: `--resume model.anchors.sizes=[8,16]` on a run of 3 sizes failed on
    last.pth's shapes, naming neither the anchors nor a way; other anchors of the same count
    went on with the generic "changed deliberately" line only."""
    cfg = tiny_cfg(tmp_path / "data", tmp_path / "run")  # anchors [16, 32, 64] x 3 ratios (tiny_overrides)
    save_config(cfg, tmp_path / "run" / "config.yaml")
    fewer = tiny_cfg(tmp_path / "data", tmp_path / "run", **{"model.anchors.sizes": [16]})
    with pytest.raises(ConfigError, match=re.escape(
            "--resume: model.anchors changed from 9 anchors per position")
            + r" .* to 3: the RPN's output layers have one channel per anchor, so a resume cannot change their "
              r"count; start a new run from its weights"):
        check_resume_config(fewer, tmp_path / "run", explicit=["model.anchors.sizes"])
    other = tiny_cfg(tmp_path / "data", tmp_path / "run", **{"model.anchors.sizes": [8, 16, 64]})
    with caplog.at_level("WARNING"):
        assert [c[0] for c in check_resume_config(other, tmp_path / "run", explicit=["model.anchors.sizes"])] == \
            ["model.anchors.sizes"]
    assert "--resume: model.anchors changed, as many per position: each of the RPN's output channels goes on" \
        in caplog.text


def test_a_resume_that_changes_the_repeat_threshold_says_what_that_does_and_one_process_says_it(
        tmp_path, caplog, monkeypatch):
    """A distributed trial: `--resume dataloader.repeat_threshold=0.1` on a run at 0.3 was said as
    changed (by every process, twice under two), while the epoch in progress is drawn anew and the
    start line's epochs are the new threshold's over the whole run, unsaid."""
    import detection.engine.distributed as du
    from detection.engine.run_config import data_order_change

    assert data_order_change([("dataloader.repeat_threshold", 0.3, 0.1)], 40) == (
        "--resume at iteration 40: dataloader.repeat_threshold changed (the run: 0.3, now: 0.1): from here the epochs "
        "are drawn at the new threshold (the plain order where no image's factor is above 1), so images of the epoch "
        "in progress may be skipped or seen again, and the start line's epochs count the whole run at the new "
        "threshold")
    assert data_order_change([("solver.max_iter", 40, 50)], 40) is None
    cfg = tiny_cfg(tmp_path / "data", tmp_path / "run")
    save_config(cfg, tmp_path / "run" / "config.yaml")
    changed = tiny_cfg(tmp_path / "data", tmp_path / "run", **{"solver.max_iter": 12})
    for main, said in ((True, 1), (False, 0)):
        monkeypatch.setattr(du, "is_main_process", lambda: main)
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert len(check_resume_config(changed, tmp_path / "run", explicit=["solver.max_iter"])) == 1
        assert len([r for r in caplog.records if "changed deliberately" in r.getMessage()]) == said


@pytest.mark.slow  # trains 2 + 1 + 1 iterations
def test_a_resume_on_other_training_images_says_so_and_on_moved_ones_does_not(data_root, tmp_path, caplog):
    """A long-run trial: `--resume datasets.root=<other data>` (the root is not compared: data
    moves) went on, on 30 other images, without a word, and no longer resumed exactly."""
    import shutil

    from detection.data.shapes import generate_shapes

    out = tmp_path / "run"
    trainer.train(tiny_cfg(data_root, out, **{"solver.max_iter": 2, "solver.checkpoint_period": 2}))
    assert load_checkpoint(out / "last.pth")["train_data"]["images"] == 6
    moved = tmp_path / "moved"
    shutil.copytree(data_root, moved)
    caplog.clear()
    trainer.train(tiny_cfg(moved, out, **{"solver.max_iter": 3, "solver.checkpoint_period": 3}), resume=True)
    assert "training images are not those" not in caplog.text  # the same images elsewhere
    other = tmp_path / "other"
    generate_shapes(other / "shapes", num_train=7, num_val=2, seed=5, image_size=(64, 80))
    caplog.clear()
    trainer.train(tiny_cfg(other, out, **{"solver.max_iter": 4, "solver.checkpoint_period": 4}), resume=True)
    assert f"--resume: the training images are not those {out / 'last.pth'} was trained on (6 images then, 7 " \
           "now): the run goes on, on today's data" in caplog.text
    # the repeat threshold changed on the resume: training says what that does (a distributed trial)
    caplog.clear()
    trainer.train(tiny_cfg(other, out, **{"solver.max_iter": 5, "solver.checkpoint_period": 5,
                                          "dataloader.repeat_threshold": 0.5}), resume=True)
    assert "--resume at iteration 4: dataloader.repeat_threshold changed (the run: 0, now: 0.5): from here the " \
           "epochs are drawn at the new threshold" in caplog.text
    # a new export of the same images whose categories are numbered otherwise (square 1, circle 2): the
    # classifier's rows would go on as the other class (a growing-data trial: every name swapped, unsaid)
    ann = other / "shapes" / "annotations" / "instances_train.json"
    coco = json.loads(ann.read_text())
    swap = {1: 2, 2: 1, 3: 3}
    coco["categories"] = [{**c, "id": swap[c["id"]]} for c in coco["categories"]]
    coco["annotations"] = [{**a, "category_id": swap[a["category_id"]]} for a in coco["annotations"]]
    ann.write_text(json.dumps(coco))
    before = (out / "last.pth").read_bytes()
    with pytest.raises(ConfigError, match=re.escape(
            f"--resume: {out / 'last.pth'} was trained on circle, square, triangle (its classifier's rows, in that "
            "order) but the training set shapes_train has square, circle, triangle: the same classes in another "
            "order. A resume cannot change what the rows mean (each would go on training as another class); start "
            f"a new run from its weights, which matches the classes by name (the same ones reordered, others start "
            f"fresh): model.weights={out / 'last.pth'} and a new output_dir, without --resume")):
        trainer.train(tiny_cfg(other, out, **{"solver.max_iter": 6}), resume=True)
    assert (out / "last.pth").read_bytes() == before
    # a class added: model.num_classes changed on a resume says the same way out
    with pytest.raises(ConfigError, match=r"--resume: model.num_classes changed from 3 \(the run's .*config.yaml\) "
                                          r"to 4: a resume cannot change the classes .* start a new run from its "
                                          r"weights"):
        trainer.train(tiny_cfg(other, out, **{"solver.max_iter": 6, "model.num_classes": 4}), resume=True)
