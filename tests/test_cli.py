"""The tools' shared entry (detection/cli.py): KEY=VALUE overrides anywhere on the command
line, the project's errors as one `error:` line and an exit code, any other exception left
with its traceback, Ctrl-C and SIGTERM as 130 and 143, logging set up for every tool."""
from __future__ import annotations

import ast
import importlib
import signal
from pathlib import Path

import pytest

from detection.cli import FAILURES, PROJECT_ERRORS, run_tool
import detection.config
from detection.config import ConfigError
from tests.helpers import ROOT, load_tool

pytestmark = pytest.mark.usefixtures("restore_logging")  # run_tool sets up logging: take it back after each test

TOOLS_WITH_CONFIG = {  # tool -> its required arguments besides --config
    "train_det": [], "eval": ["--weights", "w.pth"], "visualize": ["--weights", "w.pth", "--input", "x.jpg",
                                                                   "--output", "vis"],
    "export": ["--weights", "w.pth", "--output", "m.onnx"], "ablate": ["--weights", "w.pth"],
    "study": ["--study", "degradation", "--output-dir", "study"], "benchmark": [],
}


def test_overrides_anywhere_among_the_options_and_opts_last():
    train_det = load_tool("train_det")
    args = train_det.parse_args(["--config", "C.yaml", "solver.max_iter=40", "--output-dir", "D", "--resume",
                                 "solver.base_lr=0.1", "--opts", "SOLVER.IMS_PER_BATCH", "4", "seed=3"])
    assert args.config == "C.yaml" and args.output_dir == "D" and args.resume
    assert args.overrides == ["solver.max_iter=40", "solver.base_lr=0.1", "solver.ims_per_batch=4", "seed=3"]
    assert not hasattr(args, "opts")
    # Detectron2's upper-case keys read lower-case without --opts too; values keep their case
    args = train_det.parse_args(["--config", "C.yaml", "MODEL.WEIGHTS=Zoo/R50.pkl", "output_dir=Out"])
    assert args.overrides == ["model.weights=Zoo/R50.pkl", "output_dir=Out"]


def test_detectron2s_freeze_at_5_is_refused_as_it_means_another_freezing_here(capsys):
    """A review: `--opts MODEL.BACKBONE.FREEZE_AT 5` was taken, and 5 here freezes res5, the box
    head Detectron2's C4 keeps training at 5 (its backbone ends at res4): a frozen head, in silence."""
    from detection.cli import lower_case_key
    from detection.config import ConfigError

    train_det = load_tool("train_det")
    for argv in (["--opts", "MODEL.BACKBONE.FREEZE_AT", "5"], ["MODEL.BACKBONE.FREEZE_AT=5"]):
        with pytest.raises(SystemExit) as stop:
            train_det.parse_args(["--config", "C.yaml", *argv])
        assert stop.value.code == 2
        assert "MODEL.BACKBONE.FREEZE_AT 5: Detectron2's 5 freezes the stem and res2..res4 (its C4 box head holds " \
               "res5); here 5 freezes res5 too, the box head: give model.backbone.freeze_at=4 for Detectron2's " \
               "meaning" in capsys.readouterr().err
    assert train_det.parse_args(["--config", "C.yaml", "--opts", "MODEL.BACKBONE.FREEZE_AT", "4"]).overrides == \
        ["model.backbone.freeze_at=4"]  # the same meaning in both
    assert train_det.parse_args(["--config", "C.yaml", "model.backbone.freeze_at=5"]).overrides == \
        ["model.backbone.freeze_at=5"]  # this project's spelling, its meaning
    with pytest.raises(ConfigError, match="freeze_at=4 for Detectron2's meaning"):  # the Predictor's overrides
        lower_case_key("MODEL.BACKBONE.FREEZE_AT=5")


@pytest.mark.parametrize("flag, says", [
    (["--num-gpus", "8"], "torchrun --nproc_per_node N tools/train_det.py"),
    (["--num-gpus=8"], "torchrun --nproc_per_node N tools/train_det.py"),
    (["--num-machines", "2"], "torchrun --nnodes N"),
    (["--eval-only"], "tools/eval.py --weights CKPT"),
])
def test_detectron2_launcher_flags_say_what_does_the_same_here(flag, says, capsys):
    with pytest.raises(SystemExit) as stop:
        load_tool("train_det").parse_args(["--config", "C.yaml", *flag])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and f"{flag[0].split('=')[0]} is Detectron2's flag: " in err and says in err


@pytest.mark.parametrize("tool, flag, says", [
    ("train_det", ["--epochs", "26"], "solver.max_iter=N, in iterations of solver.ims_per_batch images"),
    ("train_det", ["--batch-size", "2"], "solver.ims_per_batch=N, the global batch over all processes "
                                         "(torchvision's is per GPU)"),
    ("train_det", ["--lr=0.02"], "solver.base_lr=X"),
    ("train_det", ["--test-only"], "tools/eval.py --weights CKPT"),
    ("train_det", ["--sync-bn"], "there is no synchronised BatchNorm here"),
    ("train_det", ["--weights", "m.pth"], "model.weights=PATH"),
    ("train_det", ["--trainable-backbone-layers", "3"], "model.backbone.freeze_at=5-N"),
    ("eval", ["--weights", "w.pth", "--resume"], "tools/train_det.py --resume continues the output folder's "
                                                 "last.pth (it takes no path)"),
    # argparse's abbreviations read torchvision's --opt as --opts ("sgd has no value")
    ("train_det", ["--opt", "sgd"], "SGD with momentum is the optimizer here"),
])
def test_torchvision_reference_flags_say_what_does_the_same_here(tool, flag, says, capsys):
    """A torchvision-references user's flags got only "unrecognized arguments" (a trial);
    Detectron2's got the setting that does the same here."""
    with pytest.raises(SystemExit) as stop:
        load_tool(tool).parse_args(["--config", "C.yaml", *flag])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and "is a flag of torchvision's detection references; here: " in err and says in err
    assert any(f"error: {f.split('=')[0]} is a flag" in err for f in flag), err


def test_a_checkpoint_path_given_where_an_override_goes_says_what_resume_does():
    from detection.config import load_config

    with pytest.raises(ConfigError, match=r"override 'output/x/model_5.pth' must look like key.sub=value \(a "
                                          r"checkpoint\? --resume takes no path: it continues the output folder's "
                                          r"last.pth"):
        load_config(None, ["output/x/model_5.pth"])


def test_num_gpus_1_is_one_process_as_here_and_other_tools_say_they_run_in_one(capsys):
    args = load_tool("train_det").parse_args(["--config", "C.yaml", "--num-gpus", "1", "seed=3"])
    assert args.overrides == ["seed=3"]
    assert load_tool("train_det").parse_args(["--config", "C.yaml", "--num-gpus=1"]).overrides == []
    with pytest.raises(SystemExit):
        load_tool("visualize").parse_args(["--config", "C.yaml", "--weights", "w.pth", "--num-gpus", "2"])
    err = capsys.readouterr().err
    assert "--num-gpus is Detectron2's flag: this tool runs in one process here" in err and "train_det" not in err
    # eval.py --weights shares its images among processes as training does (it was told "one process")
    with pytest.raises(SystemExit):
        load_tool("eval").parse_args(["--config", "C.yaml", "--weights", "w.pth", "--num-gpus", "2"])
    err = capsys.readouterr().err
    assert "torchrun --nproc_per_node N tools/eval.py ..." in err and "one process" not in err


def test_eval_and_visualize_take_detectron2s_model_weights_as_their_weights(capsys):
    """Also the tools whose --weights is required (export, ablate): MODEL.WEIGHTS gives it."""
    for tool, extra in (("eval", []), ("visualize", ["--input", "x.jpg", "--output", "vis"]),
                        ("export", ["--output", "m.onnx"]), ("ablate", [])):
        args = load_tool(tool).parse_args(["--config", "C.yaml", *extra, "--opts", "MODEL.WEIGHTS", "zoo.pkl"])
        assert args.weights == "zoo.pkl" and args.overrides == []
        with pytest.raises(SystemExit):
            load_tool(tool).parse_args(["--config", "C.yaml", "--weights", "a.pth", *extra, "model.weights=b.pth"])
        assert "--weights a.pth and model.weights=b.pth name two files" in capsys.readouterr().err
    for tool, extra in (("export", ["--output", "m.onnx"]), ("ablate", [])):  # still required, either way
        with pytest.raises(SystemExit) as exit_info:
            load_tool(tool).parse_args(["--config", "C.yaml", *extra])
        assert exit_info.value.code == 2
        assert "required: --weights (or model.weights=PATH, Detectron2's MODEL.WEIGHTS)" in capsys.readouterr().err


def test_detectron2_key_value_pairs_without_opts_are_one_error_naming_opts():
    from detection.config import load_config

    with pytest.raises(ConfigError, match=r"override 'model.weights' must look like key.sub=value "
                                          r"\(Detectron2's KEY VALUE pairs go last, after --opts\)"):
        load_config(None, ["model.weights", "zoo.pkl"])


def test_train_det_prints_the_config_with_an_override_between_options(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("seed: 0\n")
    code = load_tool("train_det").main(["--config", str(config), "solver.max_iter=40", "--output-dir",
                                        str(tmp_path / "out"), "--print-config"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "max_iter: 40" in printed and f"output_dir: {tmp_path / 'out'}" in printed


def test_a_project_error_is_one_line_with_its_notes_and_exit_2(capsys):
    def work():
        err = ConfigError("c.yaml: unknown key solver.max_iters")
        err.add_note("the run's last.pth is kept")
        raise err

    with pytest.raises(SystemExit) as stop:
        run_tool(work)
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: c.yaml: unknown key solver.max_iters; the run's last.pth is kept\n"


def test_a_training_failure_exits_1(capsys):
    from detection.engine.trainer import TrainingError

    def work():
        raise TrainingError("iteration 7: the loss is nan")

    with pytest.raises(SystemExit) as stop:
        run_tool(work)
    assert stop.value.code == 1
    assert capsys.readouterr().err == "error: iteration 7: the loss is nan\n"


@pytest.mark.parametrize("error", [ValueError("a bug"), KeyError("a bug"), RuntimeError("a bug")])
def test_any_other_exception_keeps_its_traceback(error):
    def work():
        raise error

    with pytest.raises(type(error)):
        run_tool(work)


def test_ctrl_c_exits_130_and_a_stopped_run_143(capsys):
    from detection.engine.trainer import TrainingStopped

    def interrupted():
        raise KeyboardInterrupt

    def stopped():
        raise TrainingStopped("stopped at iteration 5 by SIGTERM; last.pth saved", signal.SIGTERM)

    assert run_tool(interrupted, interrupted="interrupted before training started") == 130
    assert capsys.readouterr().err == "interrupted before training started\n"
    assert run_tool(stopped, hint="run it again to resume") == 143
    assert capsys.readouterr().err == "stopped at iteration 5 by SIGTERM; last.pth saved; run it again to resume\n"


def test_the_projects_warnings_are_one_line_in_a_tool_and_other_libraries_keep_their_place(capsys, monkeypatch):
    """A tool printed test.amp's float32 fallback as Python's raw warning (file, line, and the
    source line), where every other message of it is one line; another library's warning keeps
    where it was raised."""
    import warnings

    from detection.modeling import precision

    monkeypatch.setattr(precision, "WARNED", set())
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())  # a CPU without bfloat16 instructions

    def work():
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            assert precision.inference_amp(True, "cpu") is False
            warnings.warn("a library's own warning", RuntimeWarning)

    with pytest.warns(RuntimeWarning) as passed_on:  # to the display there was (here pytest's record)
        assert run_tool(work) == 0
    assert capsys.readouterr().err == (
        "warning: test.amp: this CPU has no bfloat16 instructions (avx512_bf16 or amx_bf16), where PyTorch emulates "
        "bfloat16, several times slower than float32: running inference in float32\n")
    assert [(str(w.message), Path(w.filename).name) for w in passed_on] == [("a library's own warning", "test_cli.py")]

def test_the_list_names_every_error_type_of_the_project():
    """Every public *Error class in detection/ and backbones/ is in PROJECT_ERRORS, and every
    entry is an exception class of that module: a new or moved error type fails here."""
    defined = set()
    for path in [*sorted((ROOT / "detection").rglob("*.py")), *sorted((ROOT / "backbones").rglob("*.py"))]:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and not node.name.startswith("_"):
                defined.add((module, node.name))
    assert defined == set(PROJECT_ERRORS)
    assert set(FAILURES) <= set(PROJECT_ERRORS)
    for module, name in PROJECT_ERRORS:
        assert issubclass(getattr(importlib.import_module(module), name), Exception)


@pytest.mark.parametrize("tool", sorted(TOOLS_WITH_CONFIG))
def test_every_tool_reports_a_bad_config_as_one_line(tool, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = None
    try:
        code = load_tool(tool).main(["--config", "missing.yaml", *TOOLS_WITH_CONFIG[tool], "seed=1"])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2
    assert len(errors) == 1 and "missing.yaml" in errors[0] and "Traceback" not in err


def test_every_tool_shows_the_library_messages(tmp_path, monkeypatch, capsys):
    """eval never set up logging before: the data-set root's info line now shows, before its
    error (a --weights file that is not there, a WeightsError: exit 2)."""
    config = tmp_path / "c.yaml"
    config.write_text("seed: 0\n")
    monkeypatch.setenv("DETECTION_DATASETS", str(tmp_path / "data"))
    with pytest.raises(SystemExit) as stop:
        load_tool("eval").main(["--config", str(config), "--weights", str(tmp_path / "none.pth")])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert f"datasets.root: {tmp_path / 'data'} (from the environment variable DETECTION_DATASETS)" in err
    assert f"error: {tmp_path / 'none.pth'}: --weights file not found" in err


def test_every_tool_main_goes_through_the_shared_entry():
    """Each tools/*.py main() hands its work to run_tool (or is the benchmark's child process):
    none catches exceptions itself."""
    for path in sorted((ROOT / "tools").glob("*.py")):
        main = next(node for node in ast.parse(path.read_text()).body
                    if isinstance(node, ast.FunctionDef) and node.name == "main")
        calls = {n.func.id for n in ast.walk(main) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert "run_tool" in calls, path.name
        assert not any(isinstance(n, ast.Try) for n in ast.walk(main)), path.name


def test_detectron2_amp_key_and_zero_pre_nms_proposals_are_named():
    from detection.config import load_config

    with pytest.raises(ConfigError, match=r"solver\.amp: expected bool, got \{'enabled': True\}; Detectron2's "
                                          r"SOLVER\.AMP\.ENABLED is solver\.amp here"):
        load_config(None, ["solver.amp.enabled=true"])
    with pytest.raises(ConfigError, match=r"model\.rpn\.pre_nms_topk_test: 0 is invalid, expected positive"):
        load_config(None, ["model.rpn.pre_nms_topk_test=0"])  # no proposals at all, in silence


@pytest.mark.parametrize("key, ours", [("MODEL.ROI_HEADS.NUM_CLASSES", "model.num_classes"),
                                       ("TEST.DETECTIONS_PER_IMAGE", "model.roi_heads.detections_per_image"),
                                       ("MODEL.RESNETS.DEPTH", "model.backbone.depth"),
                                       ("INPUT.FORMAT", "model.input_format"),
                                       # a review: these gave the section's keys, or a hint to a wrong place
                                       ("MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", "model.roi_heads.box_loss_weight"),
                                       ("MODEL.PROPOSAL_GENERATOR.MIN_SIZE", "model.rpn.min_size"),
                                       ("INPUT.RANDOM_FLIP", "input.hflip_prob")])
def test_a_detectron2_key_named_otherwise_here_is_named_in_the_error(key, ours):
    from detection.config import load_config

    with pytest.raises(ConfigError, match=f"unknown key .*; Detectron2's {key} is {ours} here"):
        load_config(None, [f"{key.lower()}=3"])


def test_detectron2_single_training_size_and_range_sampling(tmp_path):
    """Detectron2 takes INPUT.MIN_SIZE_TRAIN 800 as one size, and samples it from a range."""
    from detection.cli import lower_case_key
    from detection.config import load_config

    cfg = load_config(None, ["input.min_size_train=600", "solver.steps=5"])
    assert cfg.input.min_size_train == [600] and cfg.solver.steps == [5]
    config = tmp_path / "one_size.yaml"
    config.write_text("input:\n  min_size_train: 300\n")
    assert load_config(config).input.min_size_train == [300]
    # one data set as one size: a list of it (it was refused, unlike a size: a sweep trial)
    assert load_config(None, ["datasets.test=coco_2017_val"]).datasets.test == ["coco_2017_val"]
    with pytest.raises(ConfigError, match=r"model\.class_names: expected a list, got 'cat' \(one item is "
                                          r"written \[item\]\)"):
        load_config(None, ["model.num_classes=1", "model.class_names=cat"])
    # Detectron2's range sampling, as its configs write it (it was "not done here")
    cfg = load_config(None, [lower_case_key("INPUT.MIN_SIZE_TRAIN_SAMPLING=range"),
                             lower_case_key("INPUT.MIN_SIZE_TRAIN=(640, 800)")])
    assert (cfg.input.min_size_train_sampling, cfg.input.min_size_train) == ("range", [640, 800])
    with pytest.raises(ConfigError, match=r"input\.min_size_train: .*two sizes \[smallest, largest\] with "
                                          r"input\.min_size_train_sampling: range"):
        load_config(None, ["input.min_size_train_sampling=range", "input.min_size_train=[640, 672, 800]"])
    with pytest.raises(ConfigError, match=r"input\.min_size_train_sampling.*choice.*range"):
        load_config(None, ["input.min_size_train_sampling=uniform"])


def test_detectron2_tuple_values_and_weights_urls(tmp_path):
    from detection.config import load_config
    from detection.engine.checkpoint import CheckpointError
    from detection.engine.loading import read_detector_file

    cfg = load_config(None, ["input.min_size_train=(200,)", "input.min_size_test=(300)",
                             'datasets.test=("shapes_val", "shapes_test")', "output_dir=(not a tuple"])
    assert cfg.input.min_size_train == [200] and cfg.input.min_size_test == 300
    assert cfg.datasets.test == ["shapes_val", "shapes_test"] and cfg.output_dir == "(not a tuple"
    with pytest.raises(CheckpointError, match=r"^detectron2://COCO-Detection/x.pkl: a URL; .*nothing is downloaded"):
        read_detector_file("detectron2://COCO-Detection/x.pkl")


def test_a_one_process_tool_started_by_torchrun_as_several_is_refused(monkeypatch, capsys, tmp_path):
    """torchrun --nproc_per_node 2 tools/eval.py --results (the other one-process tools likewise)
    would run two whole scorings writing the same files: the first process says so once, every
    process exits 2 before any work; training and eval.py --weights, which share their work among
    processes, are not refused (tests/test_eval_outputs.py runs eval.py in two processes)."""
    from tests.helpers import run_main

    weights = tmp_path / "model_final.pth"
    weights.write_bytes(b"x")
    monkeypatch.setattr("sys.argv", ["tools/eval.py"])
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)  # as torchrun sets them
    config = ["--config", ROOT / "configs" / "base.yaml"]
    code, out, err = run_main(load_tool("eval"), [*config, "--results", tmp_path], capsys)  # nothing to share
    assert code == 2 and out == ""
    assert err == ("error: eval.py runs in one process, but torchrun started 2: each would do all of the work and "
                   "write the same files; run it with python (only training, tools/train_det.py, and evaluating a "
                   "checkpoint, tools/eval.py --weights, share their work among processes)\n")
    monkeypatch.setenv("RANK", "1")
    assert run_main(load_tool("visualize"), [*config, "--weights", weights, "--input", tmp_path, "--output",
                                             tmp_path], capsys) == (2, "", "")
    monkeypatch.setenv("RANK", "0")
    code, out, _ = run_main(load_tool("train_det"), [*config, "--print-config"], capsys)
    assert code == 0 and "solver:" in out
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1: one process, as asked
    code, _, err = run_main(load_tool("eval"), [*config, "--weights", tmp_path / "missing.pth"], capsys)
    assert code == 2 and "missing.pth: --weights file not found" in err


def test_a_tilde_in_a_path_is_the_home_folder_everywhere(tmp_path, monkeypatch):
    """'~/runs/r1' given quoted (or as --output-dir=~/runs) reached the tools unexpanded: training
    wrote into a folder named "~" in the working directory, then printed an eval command a shell
    expands to another folder. --weights expanded it already; now every path option and the
    config's output_dir and datasets.root do."""
    from detection.cli import config_from_args

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "cfg.yaml").write_text(f"_base_: {ROOT / 'configs' / 'base.yaml'}\n")
    args = load_tool("eval").parse_args(["--config", "~/cfg.yaml", "--weights", "~/w.pth", "--output-dir=~/ev",
                                         "datasets.root=~/data"])
    assert (args.config, args.weights, args.output_dir) == (str(tmp_path / "cfg.yaml"), str(tmp_path / "w.pth"),
                                                            str(tmp_path / "ev"))
    cfg = config_from_args(args, ["output_dir=~/runs/r1"])
    assert (cfg.output_dir, cfg.datasets.root) == (str(tmp_path / "runs" / "r1"), str(tmp_path / "data"))
    vis = load_tool("visualize").parse_args(["--config", "~/cfg.yaml", "--weights", "~/w.pth", "--input", "~/photos",
                                             "--output", "~/vis"])
    assert (vis.input, vis.output) == (str(tmp_path / "photos"), str(tmp_path / "vis"))


def test_a_launchers_variables_left_in_the_environment_are_one_line(monkeypatch, capsys):
    """A container trial: WORLD_SIZE (and MASTER_ADDR) exported by a job script without torchrun
    made training die in torch's traceback ("environment variable RANK expected, but not set"),
    and a one-process tool say "torchrun started 2"."""
    import torch

    from detection.cli import refuse_several_processes
    from detection.engine.distributed import init_distributed
    from detection.utils.comm import DeviceError

    for name in ("RANK", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    with pytest.raises(DeviceError, match=r"^the environment sets WORLD_SIZE=2 but not RANK, MASTER_PORT: torchrun "
                                          r"sets them all .* unset WORLD_SIZE to run in one process$"):
        init_distributed(torch.device("cpu"))
    with pytest.raises(SystemExit) as stopped:
        refuse_several_processes()
    assert stopped.value.code == 2 and "but not RANK, MASTER_PORT" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(DeviceError, match="WORLD_SIZE=1 but not RANK, MASTER_PORT"):  # a group of one named
        init_distributed(torch.device("cpu"))
    monkeypatch.delenv("MASTER_ADDR")  # one process, and no group named: nothing to join
    assert init_distributed(torch.device("cpu")) is False


def test_mmdetections_flags_keys_and_python_configs_name_what_does_it_here(tmp_path, capsys):
    """An MMDetection trial: --work-dir, --cfg-options model.test_cfg.rcnn.score_thr=0.3 and a .py
    config got argparse's bare "unrecognized arguments", a list of valid keys, and "the top level
    must be a mapping, got str"."""
    from tests.helpers import run_main

    train = load_tool("train_det")
    config = ["--config", ROOT / "configs" / "base.yaml"]
    code, _, err = run_main(train, [*config, "--work-dir", tmp_path], capsys)
    assert code == 2 and "--work-dir is MMDetection's flag; here: --output-dir DIR" in err
    code, _, err = run_main(load_tool("eval"), [*config, "--weights", tmp_path / "x.pth", "--show-dir", tmp_path],
                            capsys)
    assert code == 2 and "--show-dir is MMDetection's flag; here: tools/visualize.py" in err
    with pytest.raises(ConfigError, match=r"unknown key model.test_cfg; MMDetection's model.test_cfg.rcnn.score_thr "
                                          r"is model.roi_heads.score_thresh_test here"):
        detection.config.load_config(None, ["model.test_cfg.rcnn.score_thr=0.3"])
    with pytest.raises(ConfigError, match=r"unknown key data; MMDetection's data.samples_per_gpu is "
                                          r"solver.ims_per_batch, the global batch"):
        detection.config.load_config(None, ["data.samples_per_gpu=2"])
    with pytest.raises(ConfigError, match=r"some of them: keep_classes: \[...\] in the data-set entry"):
        detection.config.load_config(None, ["classes=[person]"])  # MMDetection's subset of a set's classes
    with pytest.raises(ConfigError, match=r"unknown key model.resnets; Detectron2's MODEL.RESNETS.DEPTH is "
                                          r"model.backbone.depth here"):  # Detectron2's as before
        detection.config.load_config(None, ["model.resnets.depth=101"])
    python_config = tmp_path / "faster_rcnn_r50_c4.py"
    python_config.write_text("_base_ = ['../_base_/models/faster-rcnn_r50-caffe-c4.py']\n")
    with pytest.raises(ConfigError, match=r"faster_rcnn_r50_c4.py: a Python config \(MMDetection's, mmengine's\) is "
                                          r"not read here: configs are YAML"):
        detection.config.load_config(python_config)


def test_the_tools_refuse_what_they_would_ignore_or_misread_in_one_line(tmp_path, capsys):
    """A CLI audit: each of these ran on (a negative --limit drew all but the last image; --gt with
    --input drew the test set; --weights beside --results was ignored; an empty "$OUT" trained into
    the config's folder) or ended in a traceback (an output path through a file; --json's folder
    missing, after the whole benchmark; an empty datasets.test in ablate.py and visualize.py --gt)."""
    from tests.helpers import run_main

    config = ["--config", ROOT / "configs" / "base.yaml"]
    weights = tmp_path / "model_final.pth"
    weights.write_bytes(b"x")
    cases = [
        ("train_det", [*config, "--output-dir", ""], "--output-dir is an empty path (an unset shell variable?)"),
        ("visualize", [*config, "--gt", "--limit", "-1", "--output", tmp_path / "v"], "--limit is a number of images"),
        ("visualize", [*config, "--weights", weights, "--input", tmp_path, "--score-thresh", "2", "--output",
                       tmp_path / "v"], "--score-thresh 2.0: a score in [0, 1]"),
        ("visualize", [*config, "--gt", "--input", tmp_path, "--output", tmp_path / "v"], "--gt and --input: give one"),
        ("eval", [*config, "--weights", weights, "--results", tmp_path], "--weights runs a checkpoint and --results"),
        ("make_shapes", ["--output", "/dev/null/shapes", "--num-train", "1"],
         "--output /dev/null/shapes: cannot create the folder (Not a directory)"),
        ("benchmark", [*config, "--json", tmp_path / "missing" / "b.json"], "its folder does not exist"),
        ("ablate", [*config, "--weights", weights, "--output-dir", tmp_path / "a", "datasets.test=[]"],
         "datasets.test is empty: nothing to ablate on"),
        ("visualize", [*config, "--gt", "--output", tmp_path / "v", "datasets.test=[]"],
         "--gt draws the first of datasets.test, which is empty"),
    ]
    for tool, args, said in cases:
        code, _, err = run_main(load_tool(tool), args, capsys)
        assert code == 2 and said in err and "Traceback" not in err, (tool, args, err[-1500:])
    assert not (tmp_path / "a").exists()


def test_a_tool_whose_reader_goes_away_finishes_its_work(tmp_path):
    """`eval.py ... | grep -m1 AP` (an automation trial): the reader gone, the next print raised
    BrokenPipeError and the tool stopped half-way (no environment.json nor report). The rest of
    the output is dropped and the work goes on to its end, exit 0."""
    import subprocess
    import sys

    done = tmp_path / "done"
    script = ("import sys, time\n"
              "from detection.cli import run_tool\n"
              "def work():\n"
              "    print('AP 50.0', flush=True)\n"
              "    time.sleep(0.5)\n"  # the reader has read its line and gone
              "    for i in range(2000):\n"
              "        print('metrics written to ...', i)\n"
              f"    open({str(done)!r}, 'w').write('ok')\n"
              "sys.exit(run_tool(work))\n")
    tool = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert tool.stdout.readline() == b"AP 50.0\n"
    tool.stdout.close()  # as grep -m1 does
    _, err = tool.communicate(timeout=60)
    assert tool.returncode == 0, err.decode()[-2000:]
    assert done.read_text() == "ok" and b"BrokenPipeError" not in err


def test_a_cause_that_may_pass_exits_75_for_a_scheduler_to_retry():
    """An automation trial: a full disk and a folder in use exited 2, as a bad config (a wrapper gave
    up on them), and training's full disk 1, as a diverged run. 75 (BSD's EX_TEMPFAIL) says: the same
    command may succeed later."""
    import errno

    from detection.cli import EXIT_TRY_AGAIN, project_error_code
    from detection.engine.errors import TrainingError
    from detection.utils.files import FolderInUseError, OutputFolderError, WriteError

    assert EXIT_TRY_AGAIN == 75
    assert project_error_code(WriteError("full", errno.ENOSPC, "No space left on device")) == 75
    assert project_error_code(WriteError("quota", errno.EDQUOT, "Disk quota exceeded")) == 75
    assert project_error_code(WriteError("read-only", errno.EROFS, "Read-only file system")) == 2  # not by waiting
    assert project_error_code(FolderInUseError("in use")) == 75
    assert project_error_code(OutputFolderError("holds another run")) == 2
    assert project_error_code(TrainingError("full", transient=True)) == 75
    assert project_error_code(TrainingError("loss is not finite")) == 1
    assert project_error_code(ConfigError("bad")) == 2 and project_error_code(ValueError("a bug")) is None


@pytest.mark.parametrize("tool", ["eval", "visualize", "make_shapes", "export"])
def test_every_tools_help_says_its_exit_codes(tool, capsys):
    with pytest.raises(SystemExit):
        load_tool(tool).parse_args(["--help"])
    assert "75 try again later (a full disk or quota" in capsys.readouterr().out


def test_a_tool_without_any_stdout_still_runs(tmp_path):
    """`tool >&-` or a service without a stdout (sys.stdout is None): the pipe guard must not crash
    where print() does nothing (a review: AttributeError, exit 120)."""
    import subprocess
    import sys

    done = tmp_path / "done"
    script = (f"import sys\nfrom detection.cli import run_tool\n"
              f"sys.exit(run_tool(lambda: print('hi') or open({str(done)!r}, 'w').write('ok') and None))\n")
    out = subprocess.run(["sh", "-c", f'"{sys.executable}" -c "$0" >&-', script], cwd=ROOT, capture_output=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert done.read_text() == "ok"


def test_the_config_beside_the_weights_is_said_once_under_torchrun(tmp_path, capsys, monkeypatch):
    """`torchrun --nproc_per_node 2 tools/eval.py --weights run/model_final.pth` printed "config:
    ... (saved beside the checkpoint)" once per process (a distributed trial)."""
    import argparse

    from detection.cli import resolve_config_beside_weights

    (tmp_path / "model_final.pth").write_bytes(b"")
    (tmp_path / "config.yaml").write_text("{}\n")
    for rank, lines in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        args = argparse.Namespace(config=None, weights=str(tmp_path / "model_final.pth"))
        resolve_config_beside_weights(argparse.ArgumentParser(), args)
        assert args.config == str(tmp_path / "config.yaml")  # every process takes it
        assert capsys.readouterr().out.count("(saved beside the checkpoint)") == lines
