"""The checks of a built config's values (ranges, choices, data-set entries), and the cap of
dataloader.num_workers at the CPUs this process may use."""
from __future__ import annotations

import logging
import os
from typing import Any

import detection.config
from detection.config.errors import ConfigError, shown
from detection.config.schema import Config

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- value checks

# The library's own tuples, written out (the config layer imports no model code);
# tests/test_config.py checks that they stay the same.
CHOICES = {
    "model.input_format": ("RGB", "BGR"),
    "model.backbone.depth": (18, 34, 50, 101, 152),
    "model.backbone.norm": ("frozen_bn", "bn", "gn"),
    "model.backbone.shortcut": ("A", "B", "C"),
    "model.roi_heads.pooler": ("roi_align", "roi_pool"),
    "input.resize_mode": ("default", "detectron2"),
    "input.min_size_train_sampling": ("choice", "range"),
    "solver.lr_schedule": ("multistep", "cosine"),
    "device": ("auto", "cpu", "cuda"),
    # true: torch.compile's default mode; the modes are detection.accel.levers.COMPILE_MODES
    "accel.compile": (False, True, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
}


def _as_yaml(choice: Any) -> str:
    """A choice as a config file writes it (false, not False)."""
    return str(choice).lower() if isinstance(choice, bool) else str(choice)


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
        ("model.anchors.sizes", len(m.anchors.sizes) > 0 and min(m.anchors.sizes) > 0
         and len(set(m.anchors.sizes)) == len(m.anchors.sizes), "positive sizes, each once"),
        ("model.anchors.aspect_ratios", len(m.anchors.aspect_ratios) > 0 and min(m.anchors.aspect_ratios) > 0
         and len(set(m.anchors.aspect_ratios)) == len(m.anchors.aspect_ratios), "positive ratios, each once"),
        ("model.anchors.stride", m.anchors.stride == 16, "16 (the C4 map's stride)"),
        ("model.rpn.iou_thresholds", len(m.rpn.iou_thresholds) == 2 and 0 <= lo <= hi <= 1,
         "[low, high] with 0 <= low <= high <= 1"),
        ("model.rpn.positive_fraction", frac(m.rpn.positive_fraction), "in [0, 1]"),
        ("model.rpn.nms_thresh", frac(m.rpn.nms_thresh), "in [0, 1]"),
        ("model.rpn.batch_size_per_image", m.rpn.batch_size_per_image > 0, "positive"),
        ("model.rpn.pre_nms_topk_train", m.rpn.pre_nms_topk_train > 0, "positive"),
        ("model.rpn.pre_nms_topk_test", m.rpn.pre_nms_topk_test > 0, "positive"),
        ("model.rpn.post_nms_topk_train", m.rpn.post_nms_topk_train > 0, "positive"),
        ("model.rpn.post_nms_topk_test", m.rpn.post_nms_topk_test > 0, "positive"),
        ("model.roi_heads.positive_fraction", frac(m.roi_heads.positive_fraction), "in [0, 1]"),
        ("model.roi_heads.iou_threshold", frac(m.roi_heads.iou_threshold), "in [0, 1]"),
        ("model.roi_heads.batch_size_per_image", m.roi_heads.batch_size_per_image > 0, "positive"),
        ("model.roi_heads.pooler_resolution", m.roi_heads.pooler_resolution > 0, "positive"),
        ("model.roi_heads.bbox_reg_weights", len(m.roi_heads.bbox_reg_weights) == 4
         and min(m.roi_heads.bbox_reg_weights) > 0, "4 positive values (the box deltas are divided by them)"),
        ("model.roi_heads.score_thresh_test", frac(m.roi_heads.score_thresh_test), "in [0, 1]"),
        ("model.roi_heads.nms_thresh_test", frac(m.roi_heads.nms_thresh_test), "in [0, 1]"),
        ("model.roi_heads.detections_per_image", m.roi_heads.detections_per_image > 0, "positive"),
        ("model.rpn.min_size", m.rpn.min_size >= 0, "0 (keep every proposal) or more"),
        ("model.rpn.smooth_l1_beta", m.rpn.smooth_l1_beta >= 0, "0 or more"),
        ("model.roi_heads.smooth_l1_beta", m.roi_heads.smooth_l1_beta >= 0, "0 or more"),
        ("model.roi_heads.box_loss_weight", m.roi_heads.box_loss_weight >= 0, "0 or more"),
        ("input.min_size_train", len(cfg.input.min_size_train) > 0
         and min(cfg.input.min_size_train) > 0, "positive sizes"),
        ("input.min_size_train", cfg.input.min_size_train_sampling != "range" or (
            len(cfg.input.min_size_train) == 2 and cfg.input.min_size_train[0] <= cfg.input.min_size_train[1]),
         "two sizes [smallest, largest] with input.min_size_train_sampling: range"),
        ("input.max_size_train", cfg.input.max_size_train > 0, "positive"),
        ("input.min_size_test", cfg.input.min_size_test > 0, "positive"),
        ("input.max_size_test", cfg.input.max_size_test > 0, "positive"),
        # above the cap, the shorter side's size is never reached (every image is sized by the cap): the
        # two swapped, as MMDetection's img_scale (1333, 800) writes them (a trial: 25% smaller, no word)
        ("input.min_size_train", not cfg.input.min_size_train or min(cfg.input.min_size_train)
         <= cfg.input.max_size_train, f"at most input.max_size_train ({cfg.input.max_size_train}): {_SIZES}"),
        ("input.min_size_test", cfg.input.min_size_test <= cfg.input.max_size_test,
         f"at most input.max_size_test ({cfg.input.max_size_test}): {_SIZES}"),
        ("input.hflip_prob", frac(cfg.input.hflip_prob), "in [0, 1]"),
        ("dataloader.num_workers", cfg.dataloader.num_workers >= 0, "0 or more"),
        ("solver.ims_per_batch", s.ims_per_batch > 0, "positive"),
        ("solver.base_lr", s.base_lr > 0, "positive"),
        ("solver.momentum", 0 <= s.momentum < 1, "in [0, 1)"),
        ("solver.weight_decay", s.weight_decay >= 0, "0 or more"),
        ("solver.warmup_iters", s.warmup_iters >= 0, "0 or more"),
        ("solver.warmup_factor", 0 < s.warmup_factor <= 1, "in (0, 1]"),
        ("solver.steps", s.steps == sorted(set(s.steps)) and all(x > 0 for x in s.steps),
         "increasing positive iterations"),
        ("solver.gamma", 0 < s.gamma <= 1, "in (0, 1]"),
        ("solver.max_iter", s.max_iter > 0, "positive"),
        ("solver.checkpoint_period", s.checkpoint_period > 0, "positive"),
        ("solver.keep_checkpoints", s.keep_checkpoints >= 0, "0 (none) or positive"),
        ("solver.clip_grad_norm", s.clip_grad_norm is None or s.clip_grad_norm > 0, "null or positive"),
        ("dataloader.repeat_threshold", 0 <= cfg.dataloader.repeat_threshold <= 1,
         "in [0, 1], a share of the training images, not a count (0: off; LVIS's 0.001)"),
        ("test.eval_period", cfg.test.eval_period >= 0, "0 (off) or positive"),
        ("test.coco_max_dets", cfg.test.coco_max_dets > 10, "above 10 (COCOeval's maxDets are 1, 10 and this)"),
        ("test.aug.min_sizes", len(cfg.test.aug.min_sizes) > 0 and min(cfg.test.aug.min_sizes) > 0,
         "positive sizes"),
        ("test.aug.max_size", cfg.test.aug.max_size > 0, "positive"),
        ("test.box_refinement.nms_thresh", frac(cfg.test.box_refinement.nms_thresh), "in [0, 1]"),
        ("test.box_refinement.voting_iou", frac(cfg.test.box_refinement.voting_iou), "in [0, 1]"),
        ("test.multi_scale.sizes", len(cfg.test.multi_scale.sizes) > 0 and min(cfg.test.multi_scale.sizes) > 0
         and cfg.test.multi_scale.sizes == sorted(set(cfg.test.multi_scale.sizes)),
         "increasing positive sizes, at least one"),
        ("test.multi_scale.max_size", cfg.test.multi_scale.max_size > 0, "positive"),
        ("test.tiles.size", cfg.test.tiles.size >= 0, "0 (off) or a tile's side in pixels"),
        ("test.tiles.overlap", 0 <= cfg.test.tiles.overlap < 1, "in [0, 1)"),
        ("log_period", cfg.log_period > 0, "positive"),
        ("seed", 0 <= cfg.seed < 2**32, "0..4294967295 (numpy's seeds)"),
        ("log.tensorboard", cfg.log.tensorboard in (True, False, "auto"), "true, false or auto"),
    ]


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


_SIZES = ("min_size is the shorter side's size and max_size the longer side's cap, so one above the other is "
          "never reached (MMDetection's img_scale (1333, 800) is max_size 1333, min_size 800)")


def validate(cfg: Config, source: str = "config") -> Config:
    """Raise ConfigError for the first impossible value, naming its key."""
    for key, choices in CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{source}: {key}: {shown(_get(cfg, key))} is not one of "
                              f"{', '.join(_as_yaml(c) for c in choices)}")
    for key, ok, expected in _checks(cfg):
        if not ok:
            raise ConfigError(f"{source}: {key}: {shown(_get(cfg, key))} is invalid, expected {expected}")
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


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, as PyTorch's DataLoader counts them)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cap_num_workers(cfg: Config, source: str) -> Config:
    """More loader processes than CPUs only compete for them (PyTorch's DataLoader warns that
    its suggested maximum is the CPU count): base.yaml's 4 on a 2-core machine becomes 2. The
    loader gives the same batches whatever the count, so this changes speed only."""
    # looked up on the package: `detection.config.usable_cpus` is the one name to patch for
    # another machine's CPU count (the tests do)
    cpus = detection.config.usable_cpus()
    if cfg.dataloader.num_workers > cpus:
        logger.info("%s: dataloader.num_workers %d is more than the %d CPUs this process may use: %d used",
                    source, cfg.dataloader.num_workers, cpus, cpus)
        cfg.dataloader.num_workers = cpus
    return cfg
