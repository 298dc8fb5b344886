"""Reading a config: YAML files with `_base_` inheritance, `key.sub=value` overrides, and the
merged tree built into the typed dataclasses of schema.py (each value checked against its
field's annotation), then validated (checks.py)."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from detection.config.checks import cap_num_workers, validate
from detection.config.errors import ConfigError, shown
from detection.config.schema import Config, ModelConfig

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- YAML reading

class RepeatedKey(yaml.YAMLError):
    """A key written twice in one mapping (YamlLoader): its message names it and its lines."""


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's octal and base-60 numbers and with no repeated
    keys. YAML 1.1 (PyYAML) reads `010` as 8 and `1:00` as 60, so a zero-padded seed or a step
    written with a colon became another number in silence; and a key written twice kept its
    second value only (a whole `solver:` block lost). Here both are strings (refused where a
    number goes: YAML 1.2 has no such numbers either) and a repeated key is one error naming its
    lines. Everything else reads as before (0x1f hexadecimal, 1e-3 a string that a float setting
    takes as the number), so config files written by earlier versions read the same."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: {...}`: merged by the parent class
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # a list as a key: the parent class says so
                continue
            if key in seen:
                line = key_node.start_mark.line
                where = f"lines {seen[key] + 1} and {line + 1}" if seen[key] != line else f"on line {line + 1}"
                raise RepeatedKey(f"key {key!r} is given twice ({where}): the second would replace the first whole; "
                                  "merge them into one")
            seen.setdefault(key, key_node.start_mark.line)
        return super().construct_mapping(node, deep=deep)


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
# YAML 1.1's ints and floats (PyYAML's patterns) without the octal `0[0-7]+` and base-60 `a:b` forms
YamlLoader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0b[0-1_]+|0x[0-9a-fA-F_]+|0|[1-9][0-9_]*)$"),
                                 list("-+0123456789"))
YamlLoader.add_implicit_resolver(
    _FLOAT, re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """A YAML document as this toolkit reads configs (YamlLoader)."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - YamlLoader is a SafeLoader


class YamlDumper(yaml.SafeDumper):
    """PyYAML's safe dumper quoting every string that YamlLoader or PyYAML's own loader would
    read as something else (a number, a bool, a date), so that a config written reads back equal
    here, in earlier versions and in a user's yaml.safe_load."""


YamlDumper.yaml_implicit_resolvers = {
    first: YamlLoader.yaml_implicit_resolvers.get(first, []) + yaml.SafeLoader.yaml_implicit_resolvers.get(first, [])
    for first in {*YamlLoader.yaml_implicit_resolvers, *yaml.SafeLoader.yaml_implicit_resolvers}}


def yaml_dump(data: Any, **options: Any) -> str:
    """`data` as YAML text that yaml_load reads back equal (YamlDumper)."""
    return yaml.dump(data, Dumper=YamlDumper, **options)

def _read_yaml(path: Path, chain: tuple[Path, ...] = (), files: list | None = None) -> dict:
    """Read one YAML file and merge it over its `_base_` files (paths relative to it); `files`
    (if given) gets (file, a copy of its own mapping) for each file read, in merge order."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: `_base_` inheritance loops back to this file")
    if not path.is_file():
        where = f" (a `_base_` of {chain[-1]})" if chain else ""
        raise ConfigError(f"{path}: config file not found{where}")
    if path.suffix == ".py":  # YAML would read `_base_ = [...]` lines as one string
        raise ConfigError(f"{path}: a Python config (MMDetection's, mmengine's) is not read here: configs are YAML "
                          "(configs/*.yaml, schema configs/base.yaml); the README maps MMDetection's settings")
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file in UTF-8 (byte {err.start}: {err.reason})"
                          + (" (it is UTF-16 text, as Windows PowerShell's '>' writes it: save it as UTF-8)"
                             if path.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff") else "")) from None
    except RepeatedKey as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(err)}") from None
    if data is None:  # an empty file would give every default (VOC, R-101, 90k iterations) in silence
        raise ConfigError(f"{path}: the file is empty (no setting); a config sets at least its _base_ or a key")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    if "_BASE_" in data:  # Detectron2's spelling: read here as an unknown key, the base never merged
        raise ConfigError(f"{path}: _BASE_: keys are lower-case here, write _base_")
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: _base_ must be a config file's path or a list of them, got {shown(bases)}")
    merged: dict = {}
    for base in bases:
        merged = _merge(merged, _read_yaml(path.parent / base, chain + (path,), files))
    if files is not None:
        files.append((path, copy.deepcopy(data)))  # a copy: the merged tree shares data's sections
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


def override_keys_of(overrides: typing.Sequence[str]) -> list[str]:
    """The dotted keys `key=value` overrides set: a section given as a mapping sets the keys in
    it ("model.roi_heads={pooler_resolution: 7}" sets model.roi_heads.pooler_resolution), as it
    merges into the config's section (a list or any other value sets its key)."""
    keys = []
    for item in overrides:
        key, _, raw = item.partition("=")
        try:
            value = yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = None  # load_config says what is wrong with it
        keys += _dotted(key.strip(), value)
    return keys


def _dotted(prefix: str, value: Any) -> list[str]:
    if isinstance(value, dict) and value:
        return [k for name, sub in value.items() for k in _dotted(f"{prefix}.{name}", sub)]
    return [prefix]


def _python_tuple(text: str, key: str) -> Any:
    """A Python tuple literal of numbers and strings ("(640, 800)", '("a",)') as a list."""
    import ast

    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text  # not a literal: the value as written (the schema then judges it)
    if isinstance(value, tuple) and all(isinstance(v, (int, float, str)) and not isinstance(v, bool)
                                        for v in value):
        return list(value)
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):  # "(600)" is 600 in Python too
        return value
    return text


def _apply_override(tree: dict, item: str) -> None:
    """`a.b.c=value` with the value parsed as YAML (so `[1, 2]`, `null`, `0.5` work)."""
    if "=" not in item:
        checkpoint = item.lower().endswith((".pth", ".pkl", ".pt"))
        raise ConfigError(f"command line: override {item!r} must look like key.sub=value " + (
            "(a checkpoint? --resume takes no path: it continues the output folder's last.pth, and an older "
            "model_NNNNNNN.pth goes on once copied to last.pth; weights to start from: model.weights=PATH; "
            "eval.py and visualize.py take --weights PATH)" if checkpoint else
            "(Detectron2's KEY VALUE pairs go last, after --opts)"))
    key, raw = item.split("=", 1)
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except RepeatedKey as err:
        raise ConfigError(f"command line: override {key}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"command line: override {key}: cannot parse {raw!r}: {_one_line(err)}") from None
    if (" #" in raw or raw.lstrip().startswith("#")) and "#" not in str(value):  # YAML's comment, gone in silence
        logger.warning("command line: %s: the text from '#' on is a YAML comment, not part of the value %r: quote "
                       "the value to keep it (%s='\"...\"')", key.strip(), value, key.strip())
    if isinstance(value, str) and value.strip().startswith("(") and value.strip().endswith(")"):
        value = _python_tuple(value, key)  # Detectron2's spelling: INPUT.MIN_SIZE_TRAIN "(640, 800)"
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            ours = DETECTRON2_NAMES.get(key.strip().lower())
            hint = f"; Detectron2's {key.strip().upper()} is {ours} here" if ours else ""
            raise ConfigError(f"command line: {key}: {part} is not a section{hint}")
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        value = _merge(node[parts[-1]], value)  # a section's keys given: the others stay, as in a config file
    node[parts[-1]] = value


# ----------------------------------------------------------------------------- typed building

def _type_name(tp: Any) -> str:
    """A field's type as YAML users read it: "str or null", not typing's "Optional"."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {type(None): "null", dict: "mapping"}.get(tp) or getattr(tp, "__name__", None) or str(tp)


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
        raise ConfigError(f"{source}: {key}: expected {_type_name(tp)}, got {shown(value)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if item_tp in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # one size, as Detectron2 takes INPUT.MIN_SIZE_TRAIN 800
        if isinstance(value, (str, dict)) and type(value) in typing.get_args(item_tp):
            value = [value]  # one data set: datasets.train=shapes_train, or one entry as a mapping
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {shown(value)} (one item is written [item])")
        flat = [v for inner in value for v in inner] if key.startswith("model.anchors.") \
            and all(isinstance(v, list) for v in value) else []
        if flat:  # Detectron2's ANCHOR_GENERATOR.SIZES [[32, 64, ...]]
            raise ConfigError(f"{source}: {key}: expected a list of {_type_name(item_tp)}, got {shown(value)}, "
                              f"Detectron2's list per feature map: the C4 detector has one map, write {shown(flat)}")
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
    raise ConfigError(f"{source}: {key}: expected {_type_name(tp)}, got {shown(value)}")


def _finite(value: float, key: str, source: str) -> float:
    """No setting means anything as NaN or infinity (they surface as NaN losses or boxes)."""
    if not math.isfinite(value):
        raise ConfigError(f"{source}: {key}: expected a finite number, got {shown(value)}")
    return value


# (an audit: named as solver.clip_grad_norm alone, as if that were Detectron2's clipping)
_CLIP = ("not a setting (Detectron2 clips each gradient element, CLIP_TYPE value, or each parameter's gradient "
         "norm, CLIP_TYPE norm); solver.clip_grad_norm clips the norm of all the gradients together (torch's "
         "clip_grad_norm_ over the model)")
# Detectron2's config keys (lower-cased, as --opts reads them) whose place differs here: an unknown
# key error names this project's key instead of listing the section's
DETECTRON2_NAMES = {
    "model.roi_heads.num_classes": "model.num_classes",
    "model.roi_heads.iou_thresholds": "model.roi_heads.iou_threshold",
    "model.roi_box_head.pooler_resolution": "model.roi_heads.pooler_resolution",
    "model.roi_box_head.pooler_type": "model.roi_heads.pooler",
    "model.roi_box_head.bbox_reg_weights": "model.roi_heads.bbox_reg_weights",
    "model.roi_box_head.smooth_l1_beta": "model.roi_heads.smooth_l1_beta",
    "model.resnets.depth": "model.backbone.depth",
    "model.resnets.norm": "model.backbone.norm",
    "model.resnets.stride_in_1x1": "model.backbone.stride_in_1x1",
    "model.anchor_generator.sizes": "model.anchors.sizes",
    "model.anchor_generator.aspect_ratios": "model.anchors.aspect_ratios",
    "model.device": "device",
    "input.format": "model.input_format",
    "test.detections_per_image": "model.roi_heads.detections_per_image",
    "solver.lr_scheduler_name": "solver.lr_schedule",
    "solver.amp.enabled": "solver.amp",
    "dataloader.filter_empty_annotations": "dataloader.filter_empty",
    "model.proposal_generator.min_size": "model.rpn.min_size",
    "model.roi_box_head.bbox_reg_loss_weight": "model.roi_heads.box_loss_weight",
    "input.random_flip": "input.hflip_prob",
    "solver.clip_gradients.enabled": _CLIP,
    "solver.clip_gradients.clip_value": _CLIP,
    "solver.clip_gradients.clip_type": _CLIP,
    "dataloader.sampler_train": "dataloader.repeat_threshold above 0 (RepeatFactorTrainingSampler, e.g. 0.001; it "
                                "alone turns it on), or 0 (TrainingSampler, the default)",
    "dataloader.repeat_sqrt": "not a setting (the square root is always taken, its default)",
    "model.rpn.loss_weight": "not a setting (the RPN's two losses count 1.0 each, Detectron2's default)",
    "model.rpn.bbox_reg_loss_weight": "not a setting (the RPN's box loss counts 1.0, Detectron2's default)",
}


# MMDetection's config keys (its Python configs' dotted paths, as --cfg-options takes them) -> here
MMDET_NAMES = {
    "model.test_cfg.rcnn.score_thr": "model.roi_heads.score_thresh_test",
    "model.test_cfg.rcnn.max_per_img": "model.roi_heads.detections_per_image",
    "model.test_cfg.rcnn.nms.iou_threshold": "model.roi_heads.nms_thresh_test",
    "model.test_cfg.rpn.nms.iou_threshold": "model.rpn.nms_thresh",
    "optimizer.lr": "solver.base_lr (for solver.ims_per_batch images, used as given)",
    "optimizer.momentum": "solver.momentum", "optimizer.weight_decay": "solver.weight_decay",
    "optim_wrapper.optimizer.lr": "solver.base_lr (for solver.ims_per_batch images, used as given)",
    "runner.max_epochs": "solver.max_iter, in iterations (an epoch of M images: M / solver.ims_per_batch)",
    "train_cfg.max_epochs": "solver.max_iter, in iterations (an epoch of M images: M / solver.ims_per_batch)",
    "runner.max_iters": "solver.max_iter", "lr_config.step": "solver.steps, in iterations",
    "lr_config.warmup_iters": "solver.warmup_iters",
    "data.samples_per_gpu": "solver.ims_per_batch, the global batch over all processes (MMDetection's is per GPU)",
    "train_dataloader.batch_size": "solver.ims_per_batch, the global batch over all processes",
    "data.workers_per_gpu": "dataloader.num_workers", "data_root": "datasets.root", "work_dir": "output_dir",
    **{key: "dataloader.repeat_threshold (ClassBalancedDataset repeats an image ceil(r) times every epoch; here r "
       "times on average, rounded at random each epoch as Detectron2 does)"
       for key in ("oversample_thr", "data.train.oversample_thr", "train_dataloader.dataset.oversample_thr")},
    "load_from": "model.weights", "resume_from": "tools/train_det.py --resume", "evaluation.interval":
    "test.eval_period, in iterations", "checkpoint_config.interval": "solver.checkpoint_period, in iterations",
    "log_config.interval": "log_period", "classes": "model.class_names (a COCO set's classes come from its json, "
    "in ascending category id; some of them: keep_classes: [...] in the data-set entry)", "img_scale": "input.min_size_* (the shorter side) and input.max_size_* (the "
    "longer side's cap): MMDetection's (1333, 800) is max 1333, min 800",
}


def _other_toolkits_name(dotted: str, value: Any) -> tuple[str, str] | None:
    """("Detectron2's KEY" or "MMDetection's key", this project's key) for an unknown key, or a
    key inside an unknown section (model.resnets: {depth: 101}; model.test_cfg: {rcnn:
    {score_thr: 0.3}}), that is their name of one here, written as they write it."""
    keys = [dotted]
    stack = [(dotted, value)]
    while stack:  # every dotted path inside the unknown section
        prefix, item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                keys.append(f"{prefix}.{k}")
                stack.append((f"{prefix}.{k}", v))
    found = next(((f"Detectron2's {k.upper()}", DETECTRON2_NAMES[k.lower()]) for k in keys
                  if k.lower() in DETECTRON2_NAMES), None)
    return found or next(((f"MMDetection's {k}", MMDET_NAMES[k]) for k in keys if k in MMDET_NAMES), None)


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'top level'}: expected a mapping, got {shown(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            ours = _other_toolkits_name(dotted, value)
            close = difflib.get_close_matches(str(key).lower(), names, n=3, cutoff=0.6)
            upper = str(key) != str(key).lower() and str(key).lower() in names
            hint = (f"; {ours[0]} is {ours[1]} here" if ours else
                    f"; keys are lower-case here ({str(key).lower()}; the command line reads upper-case ones so, "
                    "a file does not)" if upper else
                    f"; did you mean {' or '.join(close)}?" if close else f"; valid keys: {', '.join(names)}")
            raise ConfigError(f"{source}: unknown key {dotted}{hint}")
        ours = _other_toolkits_name(dotted, value) if isinstance(value, dict) else None
        if ours and not dataclasses.is_dataclass(hints[key]) and hints[key] is not dict:
            raise ConfigError(f"{source}: {dotted}: expected {_type_name(hints[key])}, got {shown(value)}; "
                              f"{ours[0]} is {ours[1]} here")  # SOLVER.AMP.ENABLED
        kwargs[key] = _coerce(value, hints[key], dotted, source)
    return cls(**kwargs)


# ----------------------------------------------------------------------------- public API

def config_from_dict(data: dict, source: str = "config") -> Config:
    """Build and validate a Config from a plain (merged) dict; dataloader.num_workers is capped
    at the CPUs this process may use."""
    return cap_num_workers(validate(_build(Config, data, "", source), source), source)


def checked_config(cfg: Config, source: str = "the Config given") -> Config:
    """A Config built or changed in Python (`cfg.solver.max_iter = "6"`), checked as a file's
    values are: a copy, or the ConfigError naming the key (train() and the Predictor call it; a
    wrong type was a TypeError deep inside, a negative lr torch's own error). What Python code
    writes for a value a file writes otherwise is taken as that value: a path (pathlib) as its
    string, a tuple as a list, a numpy number as the number, a numpy array as its list (a review:
    they trained before); a DatasetInfo where a data set's entry belongs is a ConfigError."""
    for part in ("train", "test"):
        given = getattr(cfg.datasets, part, None) or []
        for i, entry in enumerate(given if isinstance(given, (list, tuple)) else [given]):
            if dataclasses.is_dataclass(entry):  # Detectron2's DatasetCatalog.register reflex (an API trial)
                raise ConfigError(f"{source}: datasets.{part}[{i}] is a {type(entry).__name__}, not a config entry: "
                                  "a config names data sets (a known name, {type: coco, ann_file, image_root} or "
                                  "{type: voc, root, ...}); write records made in Python as a COCO json, or give "
                                  "the DatasetInfo to build_train_loader / evaluate(cfg, model, datasets=[...])")
    return config_from_dict(_as_written(dataclasses.asdict(cfg)), source)


def _as_written(value: Any) -> Any:
    """A Python value as YAML would give it: os.PathLike -> str, tuple -> list, numpy scalar -> its
    item, numpy array -> its list (`cfg.model.pixel_mean = np.array([...])` was numpy's own
    "can only convert an array of size 1" error; an API trial)."""
    if isinstance(value, dict):
        return {key: _as_written(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_written(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if type(value).__module__ == "numpy" and getattr(value, "ndim", 0) > 0 and hasattr(value, "tolist"):
        return value.tolist()
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    return value


def _drop_inherited_class_names(tree: dict, own: dict, overrides: typing.Sequence[str], source: str) -> None:
    """Names inherited from a `_base_` (Detectron2's 80 COCO ones), or given by the config file
    when the command line changes model.num_classes, do not fit a fine-tune on other classes:
    they are dropped (with a message), so that training takes its data's names (saved in its
    checkpoints) and evaluation the checkpoint's. Names given with or after num_classes must fit.
    `own`: the config file's own mapping (not its bases')."""
    model = tree.get("model") if isinstance(tree.get("model"), dict) else {}
    names, num_classes = model.get("class_names"), model.get("num_classes", ModelConfig.num_classes)
    if not isinstance(names, list) or not names or not isinstance(num_classes, int) or len(names) == num_classes:
        return
    own = own.get("model") if isinstance(own.get("model"), dict) else {}
    given = set(override_keys_of(overrides))

    def level(key: str) -> int:  # where the value comes from: 2 command line, 1 the file, 0 a _base_
        return 2 if {"model", f"model.{key}"} & given else 1 if key in own else 0

    if level("class_names") and level("class_names") >= level("num_classes"):
        return
    model["class_names"] = []
    logger.info("%s: model.num_classes is %d but the %d model.class_names (%s) come from %s: not used; "
                "training takes its data's class names, evaluation the checkpoint's", source, num_classes,
                len(names), ", ".join(map(str, names[:3])) + (", ..." if len(names) > 3 else ""), "the config file" if level("class_names") else
                "a _base_ config")


def load_config(path: Union[str, Path, None], overrides: typing.Sequence[str] = ()) -> Config:
    """Read `path` (None = all defaults), merge its `_base_` chain, apply `key=value` overrides."""
    files: list[tuple[Path, dict]] = []  # the _base_ chain's files, in merge order: the config file last
    tree = _read_yaml(Path(path), files=files) if path is not None else {}
    _as_its_version_behaved(tree, files, overrides)
    file_tree = copy.deepcopy(tree) if overrides else tree
    for item in overrides:
        _apply_override(tree, item)
    source = str(path) if path is not None else "defaults"
    full = source + _OVERRIDDEN if overrides else source
    _drop_inherited_class_names(tree, files[-1][1] if files else {}, overrides, full)
    try:
        return config_from_dict(tree, full)
    except ConfigError as err:
        blamed = _blame(err, file_tree, source) if overrides else err
        raise _in_its_file(blamed, files, source) if files else blamed from None


_OVERRIDDEN = " (with key=value overrides)"  # from the command line or the Predictor's `overrides`

# Keys added after runs were saved whose default behaves otherwise than the versions before the
# key did: key -> (what those versions did, as the key's value; the date the key came; in words).
# A run's config.yaml written before the key existed reads as its version behaved: filled with
# today's default, its checkpoint would be evaluated, drawn and resumed otherwise, in silence.
BEHAVIOUR_BEFORE = {
    "input.exif_orientation": (False, "2026-12-05", "read images as stored, their EXIF orientation tag ignored"),
}
# the sections every resolved config (save_config's, a run's config.yaml) has had since the first
# version: such a file with no _base_ lists every key its version had
_RESOLVED = ("model", "input", "datasets", "dataloader", "solver", "test", "output_dir", "seed", "device")


def _as_its_version_behaved(tree: dict, files: list[tuple[Path, dict]], overrides: typing.Sequence[str]) -> None:
    """In a resolved config (no _base_, every section: written by save_config, a run's config.yaml)
    written before a key of BEHAVIOUR_BEFORE existed, set that key as its version behaved, with a
    warning naming it (a key=value override of it decides instead). A user's own config (with a
    _base_, or a few sections) takes today's defaults as ever."""
    if len(files) != 1 or not all(key in tree for key in _RESOLVED):
        return
    given = {o.split("=", 1)[0].strip().lower() for o in overrides}
    for key, (value, since, behaved) in BEHAVIOUR_BEFORE.items():
        *sections, name = key.split(".")
        node = tree
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if not isinstance(node, dict) or name in node or key in given:
            continue
        node[name] = value
        logger.warning("%s: written before %s existed (%s): read as %s=%s, as the version that wrote it %s "
                       "(add the key to the file, or give %s=..., to choose)", files[0][0], key, since, key,
                       str(value).lower(), behaved, key)


def _in_its_file(err: ConfigError, files: list[tuple[Path, dict]], source: str) -> ConfigError:
    """An error of the config file `source` about a key a `_base_` of it sets: named in that file
    (the child was named, so a typo in a base was looked for where it is not). `files`: the chain
    as _read_yaml read it, in merge order, the config file last."""
    text = str(err)
    if not text.startswith(source + ": "):
        return err
    rest = text[len(source) + 2:]
    unknown = rest.startswith("unknown key ")
    key = rest[len("unknown key "):].split(";")[0].split()[0] if unknown else rest.split(": ")[0]
    setter = _file_setting(files, re.split(r"[\[ ]", key)[0].split("."))
    if setter is None or setter == files[-1][0]:
        return err
    return ConfigError(f"{setter} (a _base_ of {source}): {rest}")


def _file_setting(files: list[tuple[Path, dict]], parts: list[str]) -> Path | None:
    """The file whose value of the dotted key `parts` the merge keeps: the last one of `files`
    (in merge order) that sets it."""
    found = None
    for file, data in files:
        node: Any = data
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            found = file
    return found


def _blame(err: ConfigError, file_tree: dict, source: str) -> ConfigError:
    """The error as the config file alone gives it, when the file alone has it (a typo in the
    file is the file's, whatever the command line adds); else the error with the overrides."""
    try:
        validate(_build(Config, file_tree, "", source), source)  # not capped: its num_workers note would mislead
    except ConfigError as alone:
        if str(alone) == str(err).replace(source + _OVERRIDDEN, source, 1):
            return alone
    return err
