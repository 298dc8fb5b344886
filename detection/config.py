"""Typed configuration: dataclasses <- YAML (with `_base_` inheritance) <- `key=value` overrides.

The field names below are the contract between configs, tools and tests (docs/ARCHITECTURE.md,
"Conventions"). Only `build_*` functions read a Config; every module takes
explicit keyword arguments.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names file and key."""


@dataclass
class BackboneConfig:
    depth: int = 101
    norm: str = "frozen_bn"
    freeze_at: int = 2
    stride_in_1x1: bool = False
    shortcut: str = "B"
    residual: bool = True
    weights: Union[str, None] = "torchvision:IMAGENET1K_V1"
    allow_partial_weights: bool = False  # weights covering the backbone in part are an error without it


@dataclass
class AnchorConfig:
    sizes: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    stride: int = 16


@dataclass
class RPNConfig:
    iou_thresholds: list[float] = field(default_factory=lambda: [0.3, 0.7])
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    pre_nms_topk_train: int = 12000
    post_nms_topk_train: int = 2000
    pre_nms_topk_test: int = 6000
    post_nms_topk_test: int = 300
    nms_thresh: float = 0.7
    min_size: float = 0.0
    smooth_l1_beta: float = 0.0


@dataclass
class ROIHeadsConfig:
    pooler: str = "roi_align"
    pooler_resolution: int = 14
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    iou_threshold: float = 0.5
    bbox_reg_weights: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    score_thresh_test: float = 0.05
    nms_thresh_test: float = 0.5
    detections_per_image: int = 100
    smooth_l1_beta: float = 0.0
    box_loss_weight: float = 1.0
    global_context: bool = False  # the paper's Appendix B: whole-image res5 feature beside each RoI's


@dataclass
class ModelConfig:
    num_classes: int = 80
    weights: Union[str, None] = None
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    input_format: str = "RGB"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: ROIHeadsConfig = field(default_factory=ROIHeadsConfig)
    fast_path: bool = True
    size_divisibility: int = 32
    class_names: list[str] = field(default_factory=list)


@dataclass
class InputConfig:
    min_size_train: list[int] = field(default_factory=lambda: [600])
    max_size_train: int = 1000
    min_size_test: int = 600
    max_size_test: int = 1000
    hflip_prob: float = 0.5
    jitter: bool = False
    resize_mode: str = "default"
    exif_orientation: bool = True


@dataclass
class DatasetsConfig:
    root: str = "datasets"
    train: list[Union[str, dict]] = field(
        default_factory=lambda: ["voc_2007_trainval", "voc_2012_trainval"])
    test: list[Union[str, dict]] = field(default_factory=lambda: ["voc_2007_test"])


@dataclass
class DataLoaderConfig:
    num_workers: int = 4
    aspect_ratio_grouping: bool = True
    filter_empty: bool = True
    skip_bad_images: bool = False
    use_difficult: bool = True


@dataclass
class SolverConfig:
    ims_per_batch: int = 16
    base_lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 0.0001
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    steps: list[int] = field(default_factory=lambda: [60000, 80000])
    gamma: float = 0.1
    lr_schedule: str = "multistep"
    max_iter: int = 90000
    checkpoint_period: int = 5000
    keep_checkpoints: int = 0  # the last N periodic checkpoints kept as model_{iter:07d}.pth (0: none)
    clip_grad_norm: Union[float, None] = None
    amp: bool = False


@dataclass
class TestAugConfig:
    enabled: bool = False
    min_sizes: list[int] = field(default_factory=lambda: [400, 500, 600, 700, 800, 900, 1000, 1100, 1200])
    max_size: int = 4000
    flip: bool = True


@dataclass
class BoxRefinementConfig:
    enabled: bool = False
    nms_thresh: float = 0.3
    voting: bool = True
    voting_iou: float = 0.5


@dataclass
class MultiScaleConfig:
    enabled: bool = False
    sizes: list[int] = field(default_factory=lambda: [200, 400, 600, 800, 1000])
    max_size: int = 2000


@dataclass
class TestConfig:
    eval_period: int = 0
    aug: TestAugConfig = field(default_factory=TestAugConfig)
    box_refinement: BoxRefinementConfig = field(default_factory=BoxRefinementConfig)
    multi_scale: MultiScaleConfig = field(default_factory=MultiScaleConfig)
    amp: bool = False


@dataclass
class AccelConfig:  # GPU levers of the fast path, each off until measured (docs/accel.md, "GPU levers")
    cuda_channels_last: bool = False
    sync_free_postprocess: bool = False
    compile: Union[bool, str] = False  # false | default | reduce-overhead | max-autotune
    cuda_graphs: bool = False


@dataclass
class LogConfig:
    tensorboard: Union[bool, str] = "auto"  # true | false | auto (on when the tensorboard package is installed)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    datasets: DatasetsConfig = field(default_factory=DatasetsConfig)
    dataloader: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    test: TestConfig = field(default_factory=TestConfig)
    accel: AccelConfig = field(default_factory=AccelConfig)
    output_dir: str = "output/voc_r101"
    seed: int = 0
    device: str = "auto"
    tf32: bool = True
    log_period: int = 20
    log: LogConfig = field(default_factory=LogConfig)


# ----------------------------------------------------------------------------- YAML reading

def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """Read one YAML file and merge it over its `_base_` files (paths relative to it)."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: `_base_` inheritance loops back to this file")
    if not path.is_file():
        where = f" (a `_base_` of {chain[-1]})" if chain else ""
        raise ConfigError(f"{path}: config file not found{where}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file in UTF-8 (byte {err.start}: {err.reason})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: _base_ must be a config file's path or a list of them, got {bases!r}")
    merged: dict = {}
    for base in bases:
        merged = _merge(merged, _read_yaml(path.parent / base, chain + (path,)))
    return _merge(merged, data)


def _one_line(err: Exception) -> str:
    """PyYAML's error text spans lines (with a caret under the place): one line of it."""
    return " ".join(str(err).split())


def _merge(base: dict, update: dict) -> dict:
    """Recursive dict merge: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_override(tree: dict, item: str) -> None:
    """`a.b.c=value` with the value parsed as YAML (so `[1, 2]`, `null`, `0.5` work)."""
    if "=" not in item:
        raise ConfigError(f"command line: override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"command line: override {key}: cannot parse {raw!r}: {_one_line(err)}") from None
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"command line: {key}: {part} is not a section")
    node[parts[-1]] = value


# ----------------------------------------------------------------------------- typed building

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{source}: {key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(float(value), key, source)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-4` (no dot) as a string; users mean the number
            number = float(value)
        except ValueError:
            pass
        else:
            return _finite(number, key, source)
    if tp is dict and isinstance(value, dict):
        return value
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{source}: {key}: expected {_type_name(tp)}, got {value!r}")


def _finite(value: float, key: str, source: str) -> float:
    """No setting means anything as NaN or infinity (they surface as NaN losses or boxes)."""
    if not math.isfinite(value):
        raise ConfigError(f"{source}: {key}: expected a finite number, got {value!r}")
    return value


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'top level'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{source}: unknown key {dotted}{hint}")
        kwargs[key] = _coerce(value, hints[key], dotted, source)
    return cls(**kwargs)


# ----------------------------------------------------------------------------- value checks

_CHOICES = {
    "model.input_format": ("RGB", "BGR"),
    "model.backbone.depth": (18, 34, 50, 101, 152),
    "model.backbone.norm": ("frozen_bn", "bn", "gn"),
    "model.backbone.shortcut": ("A", "B", "C"),
    "model.roi_heads.pooler": ("roi_align", "roi_pool"),
    "input.resize_mode": ("default", "detectron2"),
    "solver.lr_schedule": ("multistep", "cosine"),
    "device": ("auto", "cpu", "cuda"),
}


def _checks(cfg: Config) -> list[tuple[str, bool, str]]:
    """(dotted key, is it valid, what a valid value looks like)."""
    m, s = cfg.model, cfg.solver
    frac = lambda x: 0.0 <= x <= 1.0  # noqa: E731
    lo, hi = (m.rpn.iou_thresholds + [0, 0])[:2]
    return [
        ("model.num_classes", m.num_classes >= 1, "at least 1"),
        ("model.class_names", not m.class_names or len(m.class_names) == m.num_classes,
         f"empty or model.num_classes ({m.num_classes}) names"),
        ("model.size_divisibility", m.size_divisibility >= 0, "0 (no padding) or positive"),
        ("model.pixel_mean", len(m.pixel_mean) == 3, "3 values"),
        ("model.pixel_std", len(m.pixel_std) == 3 and min(m.pixel_std) > 0, "3 positive values"),
        ("model.backbone.freeze_at", 0 <= m.backbone.freeze_at <= 5, "0..5"),
        ("model.anchors.sizes", len(m.anchors.sizes) > 0 and min(m.anchors.sizes) > 0, "positive sizes"),
        ("model.anchors.aspect_ratios", len(m.anchors.aspect_ratios) > 0
         and min(m.anchors.aspect_ratios) > 0, "positive ratios"),
        ("model.anchors.stride", m.anchors.stride == 16, "16 (the C4 map's stride)"),
        ("model.rpn.iou_thresholds", len(m.rpn.iou_thresholds) == 2 and 0 <= lo <= hi <= 1,
         "[low, high] with 0 <= low <= high <= 1"),
        ("model.rpn.positive_fraction", frac(m.rpn.positive_fraction), "in [0, 1]"),
        ("model.rpn.nms_thresh", frac(m.rpn.nms_thresh), "in [0, 1]"),
        ("model.rpn.batch_size_per_image", m.rpn.batch_size_per_image > 0, "positive"),
        ("model.rpn.post_nms_topk_train", m.rpn.post_nms_topk_train > 0, "positive"),
        ("model.rpn.post_nms_topk_test", m.rpn.post_nms_topk_test > 0, "positive"),
        ("model.roi_heads.positive_fraction", frac(m.roi_heads.positive_fraction), "in [0, 1]"),
        ("model.roi_heads.iou_threshold", frac(m.roi_heads.iou_threshold), "in [0, 1]"),
        ("model.roi_heads.batch_size_per_image", m.roi_heads.batch_size_per_image > 0, "positive"),
        ("model.roi_heads.pooler_resolution", m.roi_heads.pooler_resolution > 0, "positive"),
        ("model.roi_heads.bbox_reg_weights", len(m.roi_heads.bbox_reg_weights) == 4, "4 values"),
        ("model.roi_heads.score_thresh_test", frac(m.roi_heads.score_thresh_test), "in [0, 1]"),
        ("model.roi_heads.nms_thresh_test", frac(m.roi_heads.nms_thresh_test), "in [0, 1]"),
        ("model.roi_heads.detections_per_image", m.roi_heads.detections_per_image > 0, "positive"),
        ("model.rpn.smooth_l1_beta", m.rpn.smooth_l1_beta >= 0, "0 or more"),
        ("model.roi_heads.smooth_l1_beta", m.roi_heads.smooth_l1_beta >= 0, "0 or more"),
        ("model.roi_heads.box_loss_weight", m.roi_heads.box_loss_weight >= 0, "0 or more"),
        ("input.min_size_train", len(cfg.input.min_size_train) > 0
         and min(cfg.input.min_size_train) > 0, "positive sizes"),
        ("input.max_size_train", cfg.input.max_size_train > 0, "positive"),
        ("input.min_size_test", cfg.input.min_size_test > 0, "positive"),
        ("input.max_size_test", cfg.input.max_size_test > 0, "positive"),
        ("input.hflip_prob", frac(cfg.input.hflip_prob), "in [0, 1]"),
        ("dataloader.num_workers", cfg.dataloader.num_workers >= 0, "0 or more"),
        ("solver.ims_per_batch", s.ims_per_batch > 0, "positive"),
        ("solver.base_lr", s.base_lr > 0, "positive"),
        ("solver.momentum", 0 <= s.momentum < 1, "in [0, 1)"),
        ("solver.weight_decay", s.weight_decay >= 0, "0 or more"),
        ("solver.warmup_iters", s.warmup_iters >= 0, "0 or more"),
        ("solver.warmup_factor", 0 < s.warmup_factor <= 1, "in (0, 1]"),
        ("solver.steps", s.steps == sorted(s.steps) and all(x > 0 for x in s.steps),
         "increasing positive iterations"),
        ("solver.gamma", 0 < s.gamma <= 1, "in (0, 1]"),
        ("solver.max_iter", s.max_iter > 0, "positive"),
        ("solver.checkpoint_period", s.checkpoint_period > 0, "positive"),
        ("solver.keep_checkpoints", s.keep_checkpoints >= 0, "0 (none) or positive"),
        ("solver.clip_grad_norm", s.clip_grad_norm is None or s.clip_grad_norm > 0, "null or positive"),
        ("test.eval_period", cfg.test.eval_period >= 0, "0 (off) or positive"),
        ("test.aug.min_sizes", len(cfg.test.aug.min_sizes) > 0 and min(cfg.test.aug.min_sizes) > 0,
         "positive sizes"),
        ("test.aug.max_size", cfg.test.aug.max_size > 0, "positive"),
        ("test.box_refinement.nms_thresh", frac(cfg.test.box_refinement.nms_thresh), "in [0, 1]"),
        ("test.box_refinement.voting_iou", frac(cfg.test.box_refinement.voting_iou), "in [0, 1]"),
        ("test.multi_scale.sizes", len(cfg.test.multi_scale.sizes) > 0 and min(cfg.test.multi_scale.sizes) > 0
         and cfg.test.multi_scale.sizes == sorted(set(cfg.test.multi_scale.sizes)),
         "increasing positive sizes, at least one"),
        ("test.multi_scale.max_size", cfg.test.multi_scale.max_size > 0, "positive"),
        ("log_period", cfg.log_period > 0, "positive"),
        ("log.tensorboard", cfg.log.tensorboard in (True, False, "auto"), "true, false or auto"),
    ]


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: Config, source: str = "config") -> Config:
    """Raise ConfigError for the first impossible value, naming its key."""
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{source}: {key}: {_get(cfg, key)!r} is not one of "
                              f"{', '.join(map(str, choices))}")
    for key, ok, expected in _checks(cfg):
        if not ok:
            raise ConfigError(f"{source}: {key}: {_get(cfg, key)!r} is invalid, expected {expected}")
    _check_dataset_entries(cfg, source)
    return cfg


def _check_dataset_entries(cfg: Config, source: str) -> None:
    """Data-set entries are free-form in the dataclass (a name or a mapping), so their fields
    are checked here, against the data layer's one table of them (no file is read)."""
    from detection.data.catalog import entry_problem  # the data layer's table; imported where used

    for split in ("train", "test"):
        for index, entry in enumerate(getattr(cfg.datasets, split)):
            problem = entry_problem(entry)
            if problem:
                raise ConfigError(f"{source}: datasets.{split}[{index}]{problem[0]}: {problem[1]}")


# ----------------------------------------------------------------------------- public API

def config_from_dict(data: dict, source: str = "config") -> Config:
    """Build and validate a Config from a plain (merged) dict; dataloader.num_workers is capped
    at the CPUs this process may use."""
    return _cap_num_workers(validate(_build(Config, data, "", source), source), source)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, as PyTorch's DataLoader counts them)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _cap_num_workers(cfg: Config, source: str) -> Config:
    """More loader processes than CPUs only compete for them (PyTorch's DataLoader warns that
    its suggested maximum is the CPU count): base.yaml's 4 on a 2-core machine becomes 2. The
    loader gives the same batches whatever the count, so this changes speed only."""
    cpus = usable_cpus()
    if cfg.dataloader.num_workers > cpus:
        logger.info("%s: dataloader.num_workers %d is more than the %d CPUs this process may use: %d used",
                    source, cfg.dataloader.num_workers, cpus, cpus)
        cfg.dataloader.num_workers = cpus
    return cfg


def _drop_inherited_class_names(tree: dict, path: Union[str, Path, None], overrides: typing.Sequence[str],
                                source: str) -> None:
    """Names inherited from a `_base_` (Detectron2's 80 COCO ones), or given by the config file
    when the command line changes model.num_classes, do not fit a fine-tune on other classes:
    they are dropped (with a message), so that training takes its data's names (saved in its
    checkpoints) and evaluation the checkpoint's. Names given with or after num_classes must fit."""
    model = tree.get("model") if isinstance(tree.get("model"), dict) else {}
    names, num_classes = model.get("class_names"), model.get("num_classes", ModelConfig.num_classes)
    if not isinstance(names, list) or not names or not isinstance(num_classes, int) or len(names) == num_classes:
        return
    own = yaml.safe_load(Path(path).read_text(encoding="utf-8")) if path is not None else None
    own = own.get("model") if isinstance(own, dict) and isinstance(own.get("model"), dict) else {}
    given = {o.split("=", 1)[0].strip() for o in overrides}

    def level(key: str) -> int:  # where the value comes from: 2 command line, 1 the file, 0 a _base_
        return 2 if {"model", f"model.{key}"} & given else 1 if key in own else 0

    if level("class_names") and level("class_names") >= level("num_classes"):
        return
    model["class_names"] = []
    logger.info("%s: model.num_classes is %d but the %d model.class_names (%s, ...) come from %s: not used; "
                "training takes its data's class names, evaluation the checkpoint's", source, num_classes,
                len(names), ", ".join(map(str, names[:3])), "the config file" if level("class_names") else
                "a _base_ config")


def load_config(path: Union[str, Path, None], overrides: typing.Sequence[str] = ()) -> Config:
    """Read `path` (None = all defaults), merge its `_base_` chain, apply `key=value` overrides."""
    tree = _read_yaml(Path(path)) if path is not None else {}
    file_tree = copy.deepcopy(tree) if overrides else tree
    for item in overrides:
        _apply_override(tree, item)
    source = str(path) if path is not None else "defaults"
    full = source + _OVERRIDDEN if overrides else source
    _drop_inherited_class_names(tree, path, overrides, full)
    try:
        return config_from_dict(tree, full)
    except ConfigError as err:
        if not overrides:
            raise
        raise _blame(err, file_tree, source) from None


_OVERRIDDEN = " (with command-line overrides)"


def _blame(err: ConfigError, file_tree: dict, source: str) -> ConfigError:
    """The error as the config file alone gives it, when the file alone has it (a typo in the
    file is the file's, whatever the command line adds); else the error with the overrides."""
    try:
        config_from_dict(file_tree, source)
    except ConfigError as alone:
        if str(alone) == str(err).replace(source + _OVERRIDDEN, source, 1):
            return alone
    return err


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    """Write the fully resolved config; `load_config(path)` gives back an equal object."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_config(cfg))
    tmp.replace(path)
