"""A ready detector from a config and a checkpoint: the one way eval.py, visualize.py, export.py,
ablate.py and the Predictor get their model, and the preparation that training's evaluation and
the benchmark share, so each times and scores what the tools run.

    model, weights = build_inference_model(cfg, "model_final.pth", device)   # checked, loaded, prepared
    model = prepare_for_inference(cfg, model, device)                          # a built model, as tools run it

Reading and loading the weights is detection/engine/loading.py's; this module checks the config
against the weights' own training config, builds the model, and applies the test-time settings
(device, eval mode, test.amp, the fast path and its accel levers, test-time augmentation).
"""
from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

import torch
from torch import nn

from detection.engine.checkpoint import CheckpointError
from detection.engine.loading import DetectorWeights, detector_weights, load_detector_weights, read_detector_file
from detection.utils.text import PROJECT, DetectionWarning, stacklevel_outside

if TYPE_CHECKING:
    from detection.accel import Levers
    from detection.config import Config

logger = logging.getLogger(__name__)


# The settings that make a trained model what it is (not test-time settings): a checkpoint
# of this project saves its training config, and evaluating it with other values of these
# runs and gives wrong numbers (e.g. RGB ImageNet normalisation on a BGR MSRA-trained model).
SHAPE_KEYS = ("model.num_classes", "model.backbone.depth")  # MODEL_KEYS that the weights' shapes hold
MODEL_KEYS = ("model.num_classes", "model.input_format", "model.pixel_mean", "model.pixel_std",
              "model.backbone.depth", "model.backbone.norm", "model.backbone.stride_in_1x1",
              "model.backbone.shortcut", "model.backbone.residual", "model.anchors.sizes",
              "model.anchors.aspect_ratios", "model.anchors.stride", "model.roi_heads.pooler",
              "model.roi_heads.pooler_resolution", "model.roi_heads.bbox_reg_weights",
              "model.roi_heads.global_context")


# The test-time settings a run's own evaluations used (its config, saved in the checkpoint): an
# evaluation with other values is valid, but its numbers are not the run's: said once, not refused
# (tools/ablate.py with the README's --config took another test size in silence: AP 0.6 against
# eval.py's 2.9). test.aug, box refinement and multi-scale are left out: ablate.py's rows vary them,
# and eval.py's command names them. input.exif_orientation: a photo read as stored is another image
# (a run written before the key has none in its checkpoint: not compared).
TEST_KEYS = ("input.min_size_test", "input.max_size_test", "input.resize_mode", "model.rpn.pre_nms_topk_test",
             "model.rpn.post_nms_topk_test", "model.roi_heads.score_thresh_test", "model.roi_heads.nms_thresh_test",
             "model.roi_heads.detections_per_image", "test.amp", "input.exif_orientation", "test.tiles.size",
             "test.tiles.overlap", "test.tiles.full_image")
_TOLD: set[str] = set()


def test_settings_note(cfg: Config, weights: DetectorWeights, explicit: Sequence[str] = ()) -> str | None:
    """The line saying where the config's test-time settings (TEST_KEYS) differ from those of the
    run that trained `weights`, except keys in `explicit` (set on the command line: deliberate);
    None when they do not, or the checkpoint has no config (a Detectron2 file)."""
    if not weights.config:
        return None
    differ = [(key, _lookup(weights.config, key), _lookup(cfg, key)) for key in TEST_KEYS if key not in explicit]
    differ = [(key, saved, ours) for key, saved, ours in differ if saved is not None and not _same(saved, ours)]
    if not differ:
        return None
    return (f"{weights.path}: its run evaluated with {', '.join(f'{k}={s!r}' for k, s, _ in differ)}; this config has "
            f"{', '.join(f'{k}={o!r}' for k, _, o in differ)}: detections and metrics as valid, but not those the "
            "run's own evaluation gave (its metrics.jsonl, eval.py with its config.yaml); give the run's config, or "
            "set the keys on the command line to say it is deliberate (in Python: Predictor.from_config(..., "
            "overrides=['KEY=VALUE']), "
            "or Predictor(..., explicit=['KEY']))")


def check_model_settings(cfg: Config, weights: DetectorWeights, explicit: Sequence[str] = ()) -> None:
    """CheckpointError when the config's model settings differ from those the checkpoint was
    trained with, except for keys in `explicit` (set on the command line: deliberate)."""
    if not weights.config:
        return
    for key in MODEL_KEYS:
        saved, ours = _lookup(weights.config, key), _lookup(cfg, key)
        if (key in explicit and key not in SHAPE_KEYS) or saved is None or _same(saved, ours):
            continue
        if key in SHAPE_KEYS:  # its weights' shapes: no deliberate change loads them (an API trial was told to)
            raise CheckpointError(f"{weights.path} was trained with {key}={saved!r} but the config has {ours!r}, and "
                                  "its weights' shapes are of the first: use the config it was trained with "
                                  "(config.yaml beside it)" + ("; for other classes, train from these weights "
                                                               "(model.weights: its class layers start afresh)"
                                                               if key == "model.num_classes" else ""))
        raise CheckpointError(f"{weights.path} was trained with {key}={saved!r} but the config has {ours!r}: "
                              f"use the config it was trained with (config.yaml beside it), or give "
                              f"{key}=... on the command line to change it deliberately (in Python: "
                              f"Predictor.from_config(..., overrides=['{key}=...']), or Predictor(..., "
                              f"explicit=['{key}']))")


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else getattr(tree, part, None)
        if tree is None:
            return None
    return tree


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(a)))
    return a == b


def _settings_not_taken(cfg: Config, model: nn.Module) -> list[str]:
    """The settings set on `model` after it was built (FasterRCNN.SETTINGS: torchvision's way,
    model.roi_heads.score_thresh = 0.5) that the config does not have: a model given as weights
    is built again from the config, so they are lost (an internals trial: Predictor(cfg,
    weights=model) gave 100 detections from 0.12 of a model set to 3 at 0.5, without a word)."""
    from detection.modeling.model import FasterRCNN

    if not isinstance(model, FasterRCNN):
        return []
    return [f"{key} {now} on the model, {_lookup(cfg, key)} in the config" for key, now in model.settings().items()
            if not _same(now, model.built_settings[key]) and not _same(now, _lookup(cfg, key))]


def warn_settings_not_taken(cfg: Config, model: nn.Module) -> None:
    """The warning, at the caller's line, of settings set on `model` that a model rebuilt from
    `cfg` (the Predictor's, evaluate()'s) does not have (_settings_not_taken)."""
    unlike = _settings_not_taken(cfg, model)
    if unlike:
        warnings.warn(f"the model given (the Predictor's weights, evaluate()'s model): its weights and class names "
                      f"are taken, and the config's settings, not those set on the model: {'; '.join(unlike)}; set "
                      "them on the config to run with them", DetectionWarning, stacklevel=stacklevel_outside(PROJECT))


def check_not_inference_copy(model: nn.Module) -> None:
    """ValueError for an inference copy (a Predictor's model with the fast path: norms folded into
    the convolutions) given where a model's weights are read: its weights are not the detector's
    (a follow-up trial: Predictor(cfg, predictor.model) blamed the config; evaluate() failed in
    load_state_dict)."""
    if getattr(model, "inference_only", False):
        raise ValueError("an inference copy of a model (a Predictor's .model, or optimize_for_inference's: its norms "
                         "are folded into the convolutions, so its weights are not the detector's) cannot be given "
                         "as a model's weights: give the checkpoint, or the model it was made from")


def build_inference_model(cfg: Config, weights: Union[str, Path, DetectorWeights, Mapping, nn.Module],
                          device: torch.device, explicit: Sequence[str] = ()) -> tuple[nn.Module, DetectorWeights]:
    """The config's detector with `weights` loaded, on device, in eval mode: with
    model.fast_path its detection.accel copy (same detections, faster); with test.aug.enabled
    wrapped in detection.modeling.tta.DetectorWithTTA. The one way tools and the Predictor get a model.
    The config's model settings must be those the checkpoint was trained with, except the keys
    in `explicit` (given on the command line, so changed deliberately). `weights`: a checkpoint
    file's path, or one in memory (loading.detector_weights: a state dict, a checkpoint dict,
    a model: your own training loop's, its weights and class names; settings set on it as
    attributes are not taken, and a warning names those that differ from the config's)."""
    from detection.modeling.model import build_model
    from detection.modeling.tiles import inner_detector

    if not isinstance(weights, DetectorWeights):
        if isinstance(weights, (str, Path)):
            read = read_detector_file(weights)
        elif isinstance(weights, (Mapping, nn.Module)):
            if isinstance(weights, nn.Module):  # under DistributedDataParallel, or the TTA and tiles wrappers
                weights = inner_detector(getattr(weights, "module", weights))
                check_not_inference_copy(weights)
                warn_settings_not_taken(cfg, weights)
            read = detector_weights(dict(weights) if isinstance(weights, Mapping) else weights)
        else:
            raise TypeError(f"weights: a checkpoint's path, a state dict, a checkpoint dict or a model, "
                            f"got {type(weights).__name__}")
        if read is None:
            raise CheckpointError(f"{weights if isinstance(weights, (str, Path)) else 'the weights given'}: holds no "
                                  "detector (backbone weights?); evaluation needs a trained detector: a "
                                  "model_final.pth of tools/train_det.py or a Detectron2 model-zoo file")
        weights = read
    check_model_settings(cfg, weights, explicit)
    note = test_settings_note(cfg, weights, explicit)
    if note and note not in _TOLD:  # once per process: ablate.py builds a model per row
        _TOLD.add(note)
        logger.warning("%s", note)
    cfg = copy.deepcopy(cfg)
    cfg.model.backbone.weights = None  # the checkpoint holds every weight; no ImageNet file needed
    model = build_model(cfg)
    load_detector_weights(model, weights)
    if weights.class_names:
        model.class_names = list(weights.class_names)
    unused = levers_without_fast_path(cfg)
    if unused:
        logger.warning("%s", unused)
    return prepare_for_inference(cfg, model, device), weights


def prepare_for_inference(cfg: Config, model: nn.Module, device: torch.device,
                          chunk_size: int | str = "auto") -> nn.Module:
    """A built detector as the tools run it: on device, in eval mode, `test.amp` set, the
    fast copy with model.fast_path (`chunk_size` RoIs per res5 call; "auto": by the pooler
    resolution, detection.accel.CHUNK_BINS), wrapped for test-time
    augmentation with test.aug.enabled, and in tiles with test.tiles.size. build_inference_model ends here; so does
    tools/benchmark.py's evaluation timing, so it times what tools/eval.py runs."""
    from detection.modeling.precision import inference_amp
    from detection.modeling.tiles import build_tiles
    from detection.modeling.tta import build_tta

    model = model.to(device).eval()
    model.amp = inference_amp(cfg.test.amp, device)
    if cfg.model.fast_path:
        from detection.accel import optimize_for_inference

        model = optimize_for_inference(model, chunk_size=chunk_size, levers=accel_levers(cfg))
    return build_tiles(cfg, build_tta(cfg, model))


def levers_without_fast_path(cfg: Config) -> str | None:
    """A warning when the config turns on accel levers that model.fast_path: false leaves unused."""
    if cfg.model.fast_path:
        return None
    on = [f"accel.{name}" for name, value in vars(cfg.accel).items() if value]
    return (f"{', '.join(on)}: levers of the fast path, which model.fast_path: false turns off: they do nothing"
            if on else None)


def accel_levers(cfg: Config) -> Levers:
    """The config's `accel` group (checked by the config's validate) as the fast path's Levers."""
    from detection.accel import Levers

    a = cfg.accel
    mode = ("default" if a.compile else None) if isinstance(a.compile, bool) else a.compile  # true: the default mode
    return Levers(cuda_channels_last=a.cuda_channels_last, sync_free_postprocess=a.sync_free_postprocess,
                  compile=mode, cuda_graphs=a.cuda_graphs, cuda_hoist=a.cuda_hoist, cuda_fused_relu=a.cuda_fused_relu)
