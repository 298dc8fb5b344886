"""The ResNet paper's central experiment as a detection study: plain against residual nets
(the degradation problem, the paper's Figures 1 and 4) and shortcut options A/B/C (Table 3).

A study is a list of variants of one config that differ only in `model.backbone.*` (depth,
`residual`, `shortcut`); everything else (seed, data, schedule, trainable BN) is the config's.
Each variant is trained by the project's trainer (`detection.engine.trainer.train`) into
`<runs dir>/<folder>/` (the folder named by its settings: plain-34, residual-34-A; the runs dir
is the output dir unless given) and evaluated on the config's test sets by the project's
evaluation (`detection.engine.trainer.evaluate`); its result goes to `<folder>/result.json`. A
variant whose result.json exists (made with the same settings) is not trained again; one with a
`last.pth` and no result resumes (`train(resume=True)`: exactly where it stopped). The study then writes `study.json`,
`study.md` (a table in the style of the paper's Table 3) and `study.png` (Figure 4's style:
training-loss curves, plain nets on the left, residual nets on the right).

Parameters and FLOPs are the backbone's (stem..res5, the paper's conv1..conv5_x) and need no
training (`backbone_cost`): FLOPs are counted by `torch.utils.flop_counter` on one
3x224x224 image, as the paper's Table 1, and reported as multiply-adds (FLOPs / 2) like the
paper's "3.6 x 10^9" for ResNet-34.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from backbones.resnet import build_resnet
from detection.modeling.model import LOSS_KEYS
from detection.visualization.plots import read_metrics_jsonl
from detection.utils.files import atomic_write, strict_json

logger = logging.getLogger(__name__)

STUDIES = ("degradation", "shortcuts")
FLOPS_IMAGE_SIZE = 224  # the paper's Table 1 counts FLOPs at 224x224
FINAL_LOSS_FRACTION = 0.1  # "final training loss": mean total_loss over the last 10% of the logged iterations
RESULT_FILE = "result.json"


class StudyError(ValueError):
    """A study that cannot run as asked (names the option or the folder and what is wrong)."""


@dataclass
class Variant:
    """One network of a study: its folder name, the panel of the plot it is drawn in, and the
    backbone options that make it (the only settings that differ between variants)."""

    name: str
    panel: str
    depth: int
    residual: bool
    shortcut: str

    @property
    def folder(self) -> str:
        """The run's folder, named by its settings: a net two studies share (degradation's
        residual-34 is the shortcut study's A-34) is trained once when they share --runs-dir."""
        return f"residual-{self.depth}-{self.shortcut}" if self.residual else f"plain-{self.depth}"

    def overrides(self) -> list[str]:
        return [f"model.backbone.depth={self.depth}", f"model.backbone.residual={str(self.residual).lower()}",
                f"model.backbone.shortcut={self.shortcut}"]


def study_variants(study: str, depths: Sequence[int] = (18, 34)) -> list[Variant]:
    """degradation: plain-d and residual-d for each depth; the residual nets use option A (identity
    shortcuts, zero-padding where the shape changes) so that they have exactly the plain nets'
    parameters, as in the paper's Figure 4. shortcuts: options A, B, C at the deepest depth."""
    if study not in STUDIES:
        raise StudyError(f"--study must be one of {list(STUDIES)}, got {study!r}")
    if not depths or len(set(depths)) != len(depths):
        raise StudyError(f"--depths must be distinct depths, got {list(depths)}")
    depths = sorted(depths)
    if study == "degradation":
        return [Variant(f"plain-{d}", "plain", d, False, "A") for d in depths] + \
               [Variant(f"residual-{d}", "residual", d, True, "A") for d in depths]
    return [Variant(f"{option}-{depths[-1]}", f"ResNet-{depths[-1]}", depths[-1], True, option)
            for option in ("A", "B", "C")]


# ---- what needs no training -----------------------------------------------------------------


def backbone_cost(variant: Variant, norm: str = "bn", image_size: int = FLOPS_IMAGE_SIZE) -> dict[str, float]:
    """Parameters of the variant's whole backbone (stem..res5) and its multiply-adds on one
    3 x image_size x image_size image (torch.utils.flop_counter; a multiply-add is 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = build_resnet(variant.depth, out_features=("res5",), norm=norm, freeze_at=0,
                       residual=variant.residual, shortcut=variant.shortcut).eval()
    params = sum(p.numel() for p in net.parameters())
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(torch.zeros(1, 3, image_size, image_size))
    return {"params": params, "macs": counter.get_total_flops() / 2, "flops_image_size": image_size}


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path) as f:  # a kill during the write leaves the previous file
        f.write(text)


# ---- one variant's run ----------------------------------------------------------------------



def read_loss_curves(metrics_path: Path) -> dict[str, list[list[float]]]:
    """{"total_loss" and each of LOSS_KEYS: [[iteration, loss], ...]} from a run's metrics.jsonl
    (evaluation lines have no losses)."""
    series = read_metrics_jsonl(metrics_path)
    return {key: [[it, loss] for it, loss in zip(*series.get(key, ([], [])))] for key in ("total_loss", *LOSS_KEYS)}


def final_loss(curve: Sequence[Sequence[float]], fraction: float = FINAL_LOSS_FRACTION) -> float:
    """Mean training loss over the last `fraction` of the logged points (at least one): a
    single batch-of-2 loss is too noisy to compare nets by."""
    if not curve:
        return math.nan
    tail = curve[-max(1, round(len(curve) * fraction)):]
    return sum(loss for _, loss in tail) / len(tail)


def loss_summary(metrics_path: Path) -> dict[str, Any]:
    """The run's training-loss curves (total and RPN) and their final values.

    The RPN's targets (anchors against the ground truth) do not depend on the net; the head's do
    (its RoIs are the net's own proposals, so its loss rises while the RPN learns to propose
    objects): the RPN loss is the cleaner "training error" to compare nets by."""
    curves = read_loss_curves(metrics_path)
    rpn = [[it, cls + box] for (it, cls), (_, box) in zip(curves["loss_rpn_cls"], curves["loss_rpn_box"])]
    return {"loss_curve": curves["total_loss"], "rpn_loss_curve": rpn,
            "final_train_loss": final_loss(curves["total_loss"]), "final_rpn_loss": final_loss(rpn),
            "final_losses": {key: final_loss(curves[key]) for key in LOSS_KEYS}}


def _train_and_evaluate(cfg: Any, run_dir: Path) -> tuple[dict[str, float], float, float, bool]:
    """Train the variant's run (resume an unfinished one; one stopped before its first checkpoint
    starts again) and evaluate the final model: (metrics, train s, eval s, resumed)."""
    from detection.engine.trainer import evaluate, train

    resume = (run_dir / "last.pth").is_file()
    again = not resume and any((run_dir / name).exists() for name in ("metrics.jsonl", "model_final.pth"))
    if resume:
        logger.info("%s: resuming the unfinished run", run_dir)
    elif again:
        logger.info("%s: the run stopped before its first checkpoint: training it from the start", run_dir)
    start = time.perf_counter()
    model = train(cfg, resume=resume, overwrite=again, explicit=[])  # a resume must not change the config
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluate(cfg, model.eval())
    return metrics, train_seconds, time.perf_counter() - start, resume


def _check_same_config(cfg, run_dir: Path, result_path: Path) -> None:
    """A finished run is reused only for the config it was trained with: the same overrides on
    another --config (or an edited config file) would report its numbers as this config's."""
    from detection.config import load_config
    from detection.engine.run_config import config_differences

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise StudyError(f"{result_path}: the run has no config.yaml saying what it was trained with; choose another "
                         f"--output-dir (or --runs-dir) or remove {run_dir}")
    before = load_config(saved)
    changes = config_differences(before, cfg)
    # where the initial weights come from changes what is trained (a resume's check leaves it out)
    changes += [(key, old, new) for key, old, new in (
        ("model.weights", before.model.weights, cfg.model.weights),
        ("model.backbone.weights", before.model.backbone.weights, cfg.model.backbone.weights)) if old != new]
    if changes:
        shown = ", ".join(f"{key} (the run: {json.dumps(old)}, now: {json.dumps(new)})" for key, old, new in changes[:3])
        raise StudyError(f"{result_path} was trained with another config than this study's ({len(changes)} "
                         f"key{'s' if len(changes) > 1 else ''} differ{'' if len(changes) > 1 else 's'}: "
                         f"{shown}{', ...' if len(changes) > 3 else ''}); choose another --output-dir (or --runs-dir) "
                         f"or remove {run_dir}")


def run_variant(variant: Variant, config_path: Optional[str], overrides: Sequence[str], runs_dir: Path) -> dict:
    """The variant's result (from its result.json when it was already finished)."""
    from detection.config import load_config

    run_dir = runs_dir / variant.folder
    settings = [*overrides, *variant.overrides()]
    variant_overrides = [*settings, f"output_dir={json.dumps(str(run_dir))}"]  # quoted: a path, not YAML
    result_path = run_dir / RESULT_FILE
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        if result.get("settings") != settings:
            raise StudyError(f"{result_path} was made with other settings ({' '.join(result.get('settings') or [])}); "
                             f"choose another --output-dir (or --runs-dir) or remove {run_dir}")
        _check_same_config(load_config(config_path, variant_overrides), run_dir, result_path)
        logger.info("%s: finished earlier (%s), not trained again", variant.name, result_path)
        # the name and panel are this study's; the curves are read again from the run's record
        return {**result, **loss_summary(run_dir / "metrics.jsonl"), **asdict(variant)}
    cfg = load_config(config_path, variant_overrides)
    if (run_dir / "config.yaml").is_file():  # an unfinished run of this variant: only with the same config
        _check_same_config(cfg, run_dir, run_dir)
    metrics, train_seconds, eval_seconds, resumed = _train_and_evaluate(cfg, run_dir)
    (ap, headline_set), (ap50, _) = _headline(metrics, "AP"), _headline(metrics, "AP50")
    result = {**asdict(variant), "folder": variant.folder, "settings": settings,
              **loss_summary(run_dir / "metrics.jsonl"), "iterations": cfg.solver.max_iter,
              "test_sets": list(cfg.datasets.test), "AP": ap, "AP50": ap50, "AP_test_set": headline_set,
              "metrics": metrics,
              "train_seconds": train_seconds, "eval_seconds": eval_seconds,
              "resumed": resumed,  # then train_seconds is the resumed part's only
              "torch_threads": torch.get_num_threads()}
    _write_text(result_path, json.dumps(result, indent=1))
    return result


def _headline(metrics: dict[str, float], key: str) -> tuple[float, Optional[str]]:
    """The table's `key` (AP, AP50): the one test set's, else the first test set's (several
    sets' keys are "<set>/AP") and that set's name."""
    if key in metrics:
        return metrics[key], None
    for name, value in metrics.items():
        if name.endswith("/" + key):
            return value, name[: -len(key) - 1]
    return math.nan, None


# ---- the whole study ------------------------------------------------------------------------


@dataclass
class StudyOptions:
    study: str
    config: Optional[str]
    output_dir: Path
    depths: list[int] = field(default_factory=lambda: [18, 34])
    overrides: list[str] = field(default_factory=list)
    max_iter: Optional[int] = None
    train: bool = True
    runs_dir: Optional[Path] = None  # where the variants' runs go (default: output_dir)


def schedule_overrides(config_path: Optional[str], overrides: Sequence[str], max_iter: Optional[int]) -> list[str]:
    """--max-iter N as overrides: solver.max_iter=N, and the lr steps and the warmup scaled to the
    same fractions of the schedule, the warmup ending at the first step at the latest: a short
    run warms up, trains at base_lr and drops it where the full run does (an unscaled warmup of
    100 would leave a 40-step run below base_lr throughout)."""
    if max_iter is None:
        return []
    if max_iter < 1:
        raise StudyError(f"--max-iter must be >= 1, got {max_iter}")
    from detection.config import load_config

    solver = load_config(config_path, overrides).solver
    scale = max_iter / solver.max_iter
    # a step the short run never reaches, or one it would repeat, is left out (not listed as a drop)
    steps = sorted({max(1, round(step * scale)) for step in solver.steps if round(step * scale) < max_iter})
    warmup = min(round(solver.warmup_iters * scale), max_iter)
    if solver.lr_schedule == "multistep" and steps:
        warmup = min(warmup, steps[0])  # base_lr is reached before the first drop
    return [f"solver.max_iter={max_iter}", f"solver.steps={json.dumps(steps)}", f"solver.warmup_iters={warmup}"]


SCHEDULE_KEYS = ("base_lr", "lr_schedule", "max_iter", "steps", "gamma", "warmup_iters", "warmup_factor")


def solver_schedule(cfg: Any) -> dict[str, Any]:
    """The learning-rate schedule a config trains with (study.json records it)."""
    return {key: getattr(cfg.solver, key) for key in SCHEDULE_KEYS}


def run_study(options: StudyOptions) -> dict:
    """Train and evaluate every variant (skipping finished ones), then write study.json,
    study.md and study.png into options.output_dir; returns what study.json holds."""
    from detection.config import load_config

    variants = study_variants(options.study, options.depths)
    overrides = [*options.overrides, *schedule_overrides(options.config, options.overrides, options.max_iter)]
    cfg = load_config(options.config, overrides)
    norm = cfg.model.backbone.norm
    # what the variants train with, and what --max-iter scaled it from
    schedule = {**solver_schedule(cfg), "scaled_from": solver_schedule(load_config(options.config, options.overrides))
                if options.max_iter is not None else None}
    out_dir = Path(options.output_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way, read-only, a name too long
        raise StudyError(f"--output-dir {out_dir}: cannot create the folder ({err.strerror or err})") from None
    results = []
    for variant in variants:
        entry = {**asdict(variant), **backbone_cost(variant, norm)}
        if options.train:
            logger.info("study %s: variant %s (%s)", options.study, variant.name, " ".join(variant.overrides()))
            entry.update(run_variant(variant, options.config, overrides, Path(options.runs_dir or out_dir)))
        results.append(entry)
        write_outputs(options, overrides, results, out_dir, schedule)  # after each variant: progress is visible
    return json.loads((out_dir / "study.json").read_text())


def write_outputs(options: StudyOptions, overrides: Sequence[str], results: list[dict], out_dir: Path,
                  schedule: Optional[dict] = None) -> None:
    from detection.study.report import markdown_table, plot_study

    study = {"study": options.study, "config": options.config, "overrides": list(overrides),
             "depths": list(options.depths), "trained": options.train, "schedule": schedule,
             "runs_dir": str(options.runs_dir or out_dir), "torch_threads": torch.get_num_threads(),
             "flops_note": f"multiply-adds of the backbone (stem..res5) on one 3x{FLOPS_IMAGE_SIZE}x"
                           f"{FLOPS_IMAGE_SIZE} image (torch.utils.flop_counter FLOPs / 2)",
             "final_loss_note": f"mean total_loss (RPN loss: loss_rpn_cls + loss_rpn_box) over the last "
                                f"{FINAL_LOSS_FRACTION:.0%} of the logged iterations",
             "variants": results}
    _write_text(out_dir / "study.json", json.dumps(strict_json(study), indent=1, allow_nan=False))  # NaN: null
    _write_text(out_dir / "study.md", markdown_table(study))
    if options.train and any(r.get("loss_curve") for r in results):
        plot_study(study, out_dir / "study.png")
