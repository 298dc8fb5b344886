"""The command-line plumbing every tool shares: `--config CFG` plus `KEY=VALUE` overrides
anywhere on the line (parse_command_line), the data-set root's order of precedence, and one
entry for a tool's work (run_tool): logging set up, the project's errors as one `error:`
line and an exit code, Ctrl-C as exit 130."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Sequence

from detection.config import Config, DatasetsConfig, load_config
from detection.engine.run_config import SAVED_CONFIG, config_beside  # the config training saves beside its checkpoints
from detection.utils.text import DetectionWarning

DATASETS_ENV = "DETECTION_DATASETS"
logger = logging.getLogger(__name__)


def add_config_args(parser: argparse.ArgumentParser, beside_weights: bool = False) -> None:
    """--config CFG and KEY=VALUE overrides. --config is required, unless `beside_weights`
    (tools that take a trained --weights): then resolve_config_beside_weights() fills it in.
    Detectron2's spellings work too: --config-file for --config, and --opts KEY VALUE ...
    (or KEY=VALUE ...) for the overrides; parse_command_line puts both in args.overrides."""
    help_text = "YAML config file (configs/*.yaml); --config-file is the same (Detectron2's name)"
    if beside_weights:
        help_text += f"; default: the {SAVED_CONFIG} training saved beside --weights"
    parser.add_argument("--config", "--config-file", dest="config", required=not beside_weights, metavar="CFG",
                        help=help_text)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", default=[],
                        help="config overrides, anywhere among the options, e.g. solver.base_lr=0.01 "
                             "model.rpn.nms_thresh=0.6")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", action=_DetectronOpts,
                        default=[],
                        help="Detectron2's spelling of the overrides, last on the command line: "
                             "--opts solver.max_iter 100 model.weights PATH (KEY=VALUE items too; upper-case "
                             "keys are read lower-case: SOLVER.MAX_ITER is solver.max_iter)")


# Detectron2's launcher flags (its tools/train_net.py), which this project leaves to torchrun and to
# tools/eval.py: a Detectron2 user who types them is told what does the same here.
DETECTRON2_FLAGS = {
    "--num-gpus": "processes are started by torchrun here: torchrun --nproc_per_node N tools/train_det.py ...",
    "--num-machines": "torchrun --nnodes N --rdzv_backend c10d --rdzv_endpoint HOST:PORT tools/train_det.py ...",
    "--machine-rank": "torchrun's rendezvous gives each machine its rank (--rdzv_endpoint HOST:PORT)",
    "--dist-url": "torchrun --rdzv_endpoint HOST:PORT",
    "--eval-only": "tools/eval.py --weights CKPT evaluates a checkpoint on datasets.test (on N GPUs: "
                   "torchrun --nproc_per_node N tools/eval.py --weights CKPT)",
}

# torchvision's detection references (references/detection/train.py) -> what does it here
TORCHVISION_FLAGS = {
    "--data-path": "datasets.root=DIR (and datasets.train / datasets.test: names or {type: coco, ann_file, "
                   "image_root} entries)",
    "--dataset": "datasets.train=[...] and datasets.test=[...] (coco_2017_train, voc_2007_trainval, your own "
                 "{type: coco, ...} entries)",
    "--model": "the config file decides the model (--config configs/...yaml; model.backbone.depth=50 or 101)",
    "--epochs": "solver.max_iter=N, in iterations of solver.ims_per_batch images (an epoch of M images is "
                "M / ims_per_batch iterations)",
    "--lr-steps": "solver.steps=[...], in iterations",
    "--lr": "solver.base_lr=X (for solver.ims_per_batch images; used as given)",
    "--batch-size": "solver.ims_per_batch=N, the global batch over all processes (torchvision's is per GPU)",
    "-b": "solver.ims_per_batch=N, the global batch over all processes (torchvision's is per GPU)",
    "--workers": "dataloader.num_workers=N",
    "-j": "dataloader.num_workers=N",
    "--opt": "SGD with momentum is the optimizer here (solver.momentum, solver.weight_decay)",
    "--momentum": "solver.momentum=X",
    "--wd": "solver.weight_decay=X",
    "--weight-decay": "solver.weight_decay=X",
    "--lr-scheduler": "solver.lr_schedule=multistep|cosine",
    "--lr-gamma": "solver.gamma=X",
    "--print-freq": "log_period=N",
    "--aspect-ratio-group-factor": "dataloader.aspect_ratio_grouping=true|false (landscape and portrait groups)",
    "--test-only": "tools/eval.py --weights CKPT",
    "--sync-bn": "there is no synchronised BatchNorm here: model.backbone.norm=frozen_bn or gn train alike on any "
                 "number of processes",
    "--amp": "solver.amp=true (and test.amp=true for inference)",
    "--weights-backbone": "model.backbone.weights=torchvision:IMAGENET1K_V1 (or a local .pth)",
    "--trainable-backbone-layers": "model.backbone.freeze_at=5-N (0: nothing frozen; 2: Detectron2's stem + res2)",
    "--data-augmentation": "input.* (min_size_train, random_flip, ...: configs/base.yaml)",
    "--device": "device=cpu|cuda|auto",
    "--world-size": "torchrun --nproc_per_node N tools/train_det.py ...",
    "--use-deterministic-algorithms": "no such setting yet (seed=N gives the same run on the CPU)",
    "--weights": "model.weights=PATH (a checkpoint or model-zoo file to start from)",
    "--resume": "tools/train_det.py --resume continues the output folder's last.pth (it takes no path); "
                "tools/eval.py --weights CKPT evaluates one",
}


# MMDetection's tools/train.py and tools/test.py -> what does it here
MMDET_FLAGS = {
    "--work-dir": "--output-dir DIR",
    "--cfg-options": "KEY=VALUE items after the flags (solver.base_lr=0.01 model.roi_heads.score_thresh_test=0.3)",
    "--auto-scale-lr": "no automatic scaling: solver.base_lr is used as given, for solver.ims_per_batch images",
    "--resume-from": "tools/train_det.py --resume continues the output folder's last.pth (copy a checkpoint there)",
    "--launcher": "processes are started by torchrun here: torchrun --nproc_per_node N tools/train_det.py ...",
    "--seed": "seed=N",
    "--eval": "tools/eval.py --weights CKPT scores datasets.test (COCO-style AP, and the VOC metric for VOC sets)",
    "--out": "tools/eval.py writes coco_results.json / comp4 files into its results folder (--output-dir DIR)",
    "--format-only": "a test set without annotations (a COCO json without an annotations list) gets only "
                     "coco_results.json",
    "--show-dir": "tools/visualize.py --weights CKPT --input IMAGES --output DIR",
    "--show-score-thr": "tools/visualize.py --score-thresh X (the model's own: model.roi_heads.score_thresh_test=X)",
    "--score-thr": "model.roi_heads.score_thresh_test=X (tools/visualize.py: --score-thresh X)",
    "--gpu-ids": "device=cuda (one GPU a process; several: torchrun --nproc_per_node N)",
}


EXIT_CODES = ("exit codes: 0 done, 1 the run failed, 2 bad config, output folder or data (fix the input),\n"
              "3 a target missed (eval.py --fail-below, demo.py --strict),\n"
              "75 try again later (a full disk or quota, the output folder in use by a live run),\n"
              "130 interrupted (Ctrl-C), 143 stopped by SIGTERM (138 by SIGUSR1)")


def parse_command_line(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None, *,
                       torchrun_tool: str | None = None) -> argparse.Namespace:
    """parser's arguments with positional ones (the KEY=VALUE overrides) anywhere among the
    options: `--config C solver.max_iter=40 --output-dir D` (argparse's intermixed parsing).
    --opts items follow the KEY=VALUE ones in args.overrides. Upper-case keys are read
    lower-case, as after --opts (MODEL.WEIGHTS=x is model.weights=x). `torchrun_tool`: the
    tool's path ("tools/eval.py") when torchrun may start it as several processes (what
    Detectron2's --num-gpus N is told to do instead); None for the tools that run in one."""
    parser.allow_abbrev = False  # torchvision's --opt was read as --opts ("sgd has no value")
    if parser.epilog is None:  # every tool's --help says them (only train_det.py's did)
        parser.epilog = EXIT_CODES
    argv = _detectron2_flags(parser, list(sys.argv[1:] if argv is None else argv), torchrun_tool)
    weights = parser._option_string_actions.get("--weights")
    required = weights is not None and weights.required
    try:  # a required --weights may come as model.weights=PATH (Detectron2's MODEL.WEIGHTS): checked below
        if required:
            weights.required = False
        args = parser.parse_intermixed_args(argv)
    finally:
        if required:
            weights.required = True
    if hasattr(args, "overrides"):
        try:
            args.overrides = [lower_case_key(item) for item in args.overrides]
        except ValueError as err:  # ConfigError: Detectron2's FREEZE_AT 5
            parser.error(str(err))
    if hasattr(args, "opts"):
        args.overrides = [*args.overrides, *args.opts]
        del args.opts
    if "--weights" in parser._option_string_actions and hasattr(args, "overrides"):
        _weights_from_overrides(parser, args)
    if required and not args.weights:
        parser.error("the following arguments are required: --weights (or model.weights=PATH, Detectron2's "
                     "MODEL.WEIGHTS)")
    for name in PATH_OPTIONS:  # a quoted '~/runs' (or --output-dir=~/runs) reaches us unexpanded
        if getattr(args, name, None) == "":
            # a quoted unset shell variable ("$OUT"): training took the config's folder, others the current one
            parser.error(f"--{name.replace('_', '-')} is an empty path (an unset shell variable?)")
        if isinstance(getattr(args, name, None), str):
            setattr(args, name, os.path.expanduser(getattr(args, name)))
    return args


# The tools' options that name files or folders: `~` is the home folder in each, as in a shell.
PATH_OPTIONS = ("config", "weights", "results", "output_dir", "output", "input", "context_weights", "json")


def _weights_from_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A tool that takes --weights (eval.py, visualize.py, ...) given Detectron2's way, as
    model.weights=PATH (MODEL.WEIGHTS PATH after --opts): that is its --weights, not a config
    value; naming another file than --weights is a usage error."""
    from detection.config import yaml_load

    named = [item for item in args.overrides if item.partition("=")[0].strip() == "model.weights"]
    if not named:
        return
    value = yaml_load(named[-1].partition("=")[2])
    if value is None:
        return
    if args.weights and args.weights != str(value):
        parser.error(f"--weights {args.weights} and model.weights={value} name two files: give one")
    args.weights = args.weights or str(value)
    args.overrides = [item for item in args.overrides if item not in named]


def _detectron2_flags(parser: argparse.ArgumentParser, argv: list[str], torchrun_tool: str | None) -> list[str]:
    """argv without Detectron2's `--num-gpus 1` (one process: what every tool here runs as);
    a usage error saying what does the same here for its other launcher flags, and for the
    flags of torchvision's detection references (TORCHVISION_FLAGS) and MMDetection's tools
    (MMDET_FLAGS) this tool does not have."""
    out, rest = [], list(argv)
    while rest:
        item = rest.pop(0)
        flag, _, inline = item.partition("=")
        if flag in TORCHVISION_FLAGS and flag not in parser._option_string_actions:
            parser.error(f"{flag} is a flag of torchvision's detection references; here: {TORCHVISION_FLAGS[flag]}")
        if flag in MMDET_FLAGS and flag not in parser._option_string_actions:
            parser.error(f"{flag} is MMDetection's flag; here: {MMDET_FLAGS[flag]}")
        if flag not in DETECTRON2_FLAGS or flag in parser._option_string_actions:
            out.append(item)
            continue
        value = inline or (rest[0] if rest and flag != "--eval-only" else "")
        if flag == "--num-gpus" and value == "1":
            if not inline:
                rest.pop(0)
            continue
        if flag == "--num-gpus" and torchrun_tool is None:  # training and eval.py share their work among processes
            parser.error("--num-gpus is Detectron2's flag: this tool runs in one process here, on the config's "
                         "device (device=cuda for a GPU)")
        tool = torchrun_tool or "tools/train_det.py"
        parser.error(f"{flag} is Detectron2's flag: {DETECTRON2_FLAGS[flag]}".replace("tools/train_det.py", tool))
    return out


def lower_case_key(item: str) -> str:
    """KEY=VALUE with an upper-case KEY (Detectron2's spelling) -> key=VALUE; others unchanged.
    Detectron2's MODEL.BACKBONE.FREEZE_AT 5 is refused (ConfigError): its C4 keeps res5, the box
    head, out of the backbone, so 5 freezes up to res4 there and res5 too here."""
    key, sep, value = item.partition("=")
    if sep and key == "MODEL.BACKBONE.FREEZE_AT" and value.strip() == "5":
        from detection.config import ConfigError

        raise ConfigError("MODEL.BACKBONE.FREEZE_AT 5: Detectron2's 5 freezes the stem and res2..res4 (its C4 box "
                          "head holds res5); here 5 freezes res5 too, the box head: give "
                          "model.backbone.freeze_at=4 for Detectron2's meaning, or model.backbone.freeze_at=5 to "
                          "freeze res5 as well")
    return f"{key.lower()}{sep}{value}" if sep and key.isupper() else item


class _DetectronOpts(argparse.Action):
    """--opts KEY VALUE [KEY VALUE ...] (Detectron2's form) or KEY=VALUE items -> KEY=VALUE."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items, rest = [], list(values or [])
        while rest:
            item = rest.pop(0)
            if item.startswith("-"):
                parser.error(f"--opts takes the rest of the command line as KEY VALUE pairs: put {item} before it")
            if "=" not in item:
                if not rest:
                    parser.error(f"--opts: {item} has no value: give KEY VALUE pairs (or KEY=VALUE)")
                if rest[0].startswith("--"):  # OUTPUT_DIR --overwrite: the output folder "--overwrite"
                    parser.error(f"--opts: {item}'s value {rest[0]} looks like an option: give {item} its value, "
                                 f"and put {rest[0]} before --opts")
                item = f"{item}={rest.pop(0)}"
            try:
                items.append(lower_case_key(item))  # SOLVER.MAX_ITER=7 -> solver.max_iter=7
            except ValueError as err:  # ConfigError: Detectron2's FREEZE_AT 5
                parser.error(str(err))
        setattr(namespace, self.dest, items)


def resolve_config_beside_weights(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Without --config, take the config.yaml that tools/train_det.py saved beside the
    checkpoint in --weights (overrides still apply); with neither, a usage error (exit 2)."""
    if args.config:
        return
    weights = getattr(args, "weights", None)
    saved = config_beside(weights) if weights else None
    if weights and "://" not in weights and not Path(weights).expanduser().exists():  # the checkpoint's path is the mistake, not the config
        parser.error(f"--weights {weights}: file not found")
    if saved is None or not saved.is_file():
        where = f": there is no {saved}" if saved else ""
        if saved and Path(weights).suffix == ".pkl":  # a model-zoo file: its config is one of ours
            where += " (a Detectron2 model-zoo file: --config configs/detectron2/<its name>.yaml)"
        parser.error(f"--config is required unless --weights has the {SAVED_CONFIG} of its training "
                     f"beside it{where}")
    args.config = str(saved)
    if os.environ.get("RANK", "0") == "0":  # once under torchrun (every process printed it)
        print(f"config: {saved} (saved beside the checkpoint)")


def config_from_args(args: argparse.Namespace, extra: Sequence[str] = ()) -> Config:
    """Load the config (a bad one: ConfigError, which run_tool reports as one line, exit 2).

    `datasets.root`, first found: a `datasets.root=...` on the command line; a root the config
    file (or its `_base_` chain) sets to other than the default `datasets`; the environment
    variable DETECTION_DATASETS; the default `datasets`. (configs/base.yaml restates the
    default, so the environment variable still applies to the configs built on it.)
    """
    overrides = list(args.overrides) + list(extra)
    cfg = load_config(args.config, overrides)
    # `~` in the config's folders (datasets.root=~/data, output_dir: ~/runs/x) is the home folder,
    # not a folder named "~" in the working directory
    cfg.output_dir, cfg.datasets.root = os.path.expanduser(cfg.output_dir), os.path.expanduser(cfg.datasets.root)
    on_command_line = any(o.split("=", 1)[0].strip() == "datasets.root" for o in overrides)
    env_root = os.environ.get(DATASETS_ENV)
    if env_root and not on_command_line and cfg.datasets.root == DatasetsConfig().root:
        cfg.datasets.root = env_root
        logger.info("datasets.root: %s (from the environment variable %s)", env_root, DATASETS_ENV)
    elif env_root and cfg.datasets.root != env_root:
        where = "the command line" if on_command_line else "the config file"
        logger.info("datasets.root: %s (from %s; %s=%s is not used)", cfg.datasets.root, where,
                    DATASETS_ENV, env_root)
    return cfg


def refuse_several_processes() -> None:
    """Under torchrun with several processes each would do the whole of a one-process tool's work
    and write the same files: one error (from the first process; the others exit with it)."""
    from detection.utils.launch import launch_problem

    problem = launch_problem()
    if problem:  # no torchrun ran: its variables are left over
        fail(problem)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return
    if os.environ.get("RANK", "0") != "0":
        raise SystemExit(2)
    tool = Path(sys.argv[0]).name
    fail(f"{tool} runs in one process, but torchrun started {world}: each would do all of the work and write the "
         f"same files; run it with python (only training, tools/train_det.py, and evaluating a checkpoint, "
         "tools/eval.py --weights, share their work among processes)")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one clear line to stderr and exit (2: bad input, 1: failure at run time)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


class _LineFormatter(logging.Formatter):
    """Info as the bare message; warnings and errors say what they are."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def override_keys(args: argparse.Namespace) -> list[str]:
    """The config keys given on the command line (`KEY=VALUE`; a section's mapping gives the keys
    in it): changed deliberately."""
    from detection.config import override_keys_of

    return override_keys_of(args.overrides)


class _StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment (a test's capture, or a redirected one)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _OneLineWarnings:
    """warnings.showwarning for the tools: this project's warnings (DetectionWarning: a precision
    this CPU cannot run, an image's range) as one `warning:` line on stderr, like the tools' other
    messages; any other library's as Python shows them (`shown`), with the file and line."""

    def __init__(self, shown: Callable) -> None:
        self.shown = shown

    def __call__(self, message, category, filename, lineno, file=None, line=None) -> None:
        if file is None and issubclass(category, DetectionWarning):
            print(f"warning: {message}", file=sys.stderr, flush=True)
        else:
            self.shown(message, category, filename, lineno, file, line)


def setup_logging(level: int = logging.INFO) -> None:
    """Show this project's messages ("loaded ...", "resumed at iteration N", the training
    summary) and warnings on stderr, one line each; other libraries' only from warnings up.
    Under torchrun only rank 0 shows info. Calling it again adds no second handler."""
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler(sys.stderr)
        handler.setFormatter(_LineFormatter())
        root.addHandler(handler)
    if not isinstance(warnings.showwarning, _OneLineWarnings):
        warnings.showwarning = _OneLineWarnings(warnings.showwarning)
    for name in ("detection", "backbones"):
        logging.getLogger(name).setLevel(level if os.environ.get("RANK", "0") == "0" else logging.WARNING)


# The project's error types, (module, class): what a user gave is wrong, or a run cannot go on.
# A tool reports them as one `error:` line, exit 2 (bad input) or 1 (FAILURES: the run failed);
# anything else is a bug and keeps its traceback. Named rather than imported, so that a tool
# reads its arguments before torch is loaded (an error's class is loaded once it is raised).
PROJECT_ERRORS = (
    ("detection.config.errors", "ConfigError"),
    ("detection.data", "DataError"),
    ("backbones.errors", "WeightsError"),
    ("backbones.resnet", "BackboneError"),
    ("detection.engine.checkpoint", "CheckpointError"),
    ("detection.modeling.model", "TargetError"),
    ("detection.engine.errors", "TrainingError"),
    ("detection.export.onnx", "ExportError"),
    ("detection.export.preprocess", "OnnxMetadataError"),
    ("detection.study.run", "StudyError"),
    ("detection.utils.files", "WriteError"),
    ("detection.utils.files", "OutputFolderError"),
    ("detection.utils.files", "FolderInUseError"),
    ("detection.utils.comm", "DeviceError"),
)
FAILURES = (("detection.engine.errors", "TrainingError"),)


EXIT_TRY_AGAIN = 75  # BSD's EX_TEMPFAIL: the same command may succeed later (a full disk, a folder in use)


def project_error_code(err: BaseException) -> Optional[int]:
    """The exit code of one of PROJECT_ERRORS (or a subclass); None for any other exception.
    One whose cause may pass (its `transient`: a full disk or quota, an output folder a live run
    holds) is EXIT_TRY_AGAIN, so that a scheduler retries it and not a bad config (2) or a
    failed run (1); an automation trial found the two kinds under one code."""
    names = {(cls.__module__, cls.__qualname__) for cls in type(err).__mro__}
    if not names & (set(FAILURES) | set(PROJECT_ERRORS)):
        return None
    if getattr(err, "transient", False):
        return EXIT_TRY_AGAIN
    return 1 if names & set(FAILURES) else 2


def run_tool(work: Callable[[], Optional[int]], *, interrupted: str = "interrupted", hint: str = "",
             processes: str = "one") -> int:
    """A tool's work after its arguments are parsed, -> the exit code (None from work: 0).
    Logging is set up first; one of PROJECT_ERRORS exits as one `error:` line (with the
    error's notes, e.g. the checkpoint a stopped run left); Ctrl-C prints the interrupt's
    message (the trainer's says where it stopped), else `interrupted`, then `hint`, and exits
    128 + the signal (130; the trainer's SIGTERM stop: 143). A tool that runs in one process
    (`processes="one"`: all but training and eval.py --weights) started by torchrun as several
    exits 2 at once."""
    setup_logging()
    if processes == "one":
        refuse_several_processes()
    previous = _sigterm_as_interrupt()
    stdout = sys.stdout
    if stdout is not None and not isinstance(stdout, _ReaderMayLeave):  # None: no stdout (>&-, a service)
        sys.stdout = _ReaderMayLeave(stdout)
    try:
        return work() or 0
    except KeyboardInterrupt as err:
        print("; ".join(part for part in (str(err) or interrupted, hint) if part), file=sys.stderr)
        return 128 + int(getattr(err, "signum", signal.SIGINT))
    except Exception as err:
        code = project_error_code(err)
        if code is None:
            raise
        fail("; ".join([str(err), *getattr(err, "__notes__", [])]), code=code)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if sys.stdout is not stdout:
            sys.stdout.flush()  # what is buffered, while a gone reader is still caught
            sys.stdout = stdout


class _ReaderMayLeave:
    """sys.stdout while a tool runs: when the reader of its pipe goes away (`| head -1`,
    `| grep -m1 AP`), the rest of the output goes to /dev/null and the work goes on to its end;
    a BrokenPipeError stopped eval.py half-way (an automation trial: no environment.json nor
    report, a partial results folder), and at exit Python's own flush failed (exit 120)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())  # the stream's buffer, and Python's flush at exit, go there
        except (OSError, ValueError):  # a stream without a descriptor of its own: write to /dev/null instead
            self._stream = open(os.devnull, "w")
        finally:
            os.close(devnull)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class StoppedBySignal(KeyboardInterrupt):
    """SIGTERM outside training's own handling (eval.py, visualize.py, export...): taken as Ctrl-C
    is, so the tool's clean-ups run (eval.lock released, a temporary file removed) and it says
    so in one line, exit 143; Python's default ended it without a word (a scheduler's log showed
    nothing). The trainer installs its own handlers for its run (a graceful stop)."""

    signum = signal.SIGTERM


def _sigterm_as_interrupt():
    """Install the SIGTERM handler of run_tool (main thread only); -> the previous one, or None."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    pid = os.getpid()

    def stop(signum, frame):
        if os.getpid() != pid:  # a forked worker (a data loader's): as without this handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise StoppedBySignal("stopped by SIGTERM")

    return signal.signal(signal.SIGTERM, stop)


def dataset_entry(given: str, configured: list) -> Any:
    """A tool's --dataset (visualize.py, make_tiles.py): a test or training set of the config named
    so (the name training and eval.py print: its entry's `name`, or its type's, coco:<json stem> /
    voc:<folder>_<split>), a YAML mapping, or the name as given (a known data set; the catalog says
    what is wrong with it)."""
    import yaml

    from detection.config import ConfigError, yaml_load
    from detection.data.catalog import entry_name

    for entry in configured:
        if entry_name(entry) == given:
            return entry
    if given.lstrip().startswith("{"):
        try:
            return yaml_load(given)
        except yaml.YAMLError as err:
            raise ConfigError(f"--dataset {given!r}: not a YAML mapping ({str(err).splitlines()[0]})") from None
    return given
