"""The typed config tree: one dataclass per section, with its defaults.

The field names below are the contract between configs, tools and tests (docs/ARCHITECTURE.md,
"Conventions"). In the core (modeling, accel) and data only `build_*` functions read a
Config, and evaluation never does; their other functions take explicit keyword arguments.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Union


class _Section:
    """A config section refuses an attribute it has no field for: in Python (a notebook),
    `cfg.solver.max_iters = 2` made a new attribute nothing read, and the run trained its old
    max_iter without a word (the command line's `solver.max_iters=2` was always refused)."""

    def __setattr__(self, name: str, value: object) -> None:
        fields = self.__dataclass_fields__  # type: ignore[attr-defined]
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            raise AttributeError(f"{type(self).__name__} has no setting {name!r}"
                                 + (f" (did you mean {close[0]!r}?)" if close else
                                    f"; its settings: {', '.join(fields)}"))
        object.__setattr__(self, name, value)


@dataclass
class BackboneConfig(_Section):
    depth: int = 101
    norm: str = "frozen_bn"
    freeze_at: int = 2
    stride_in_1x1: bool = False
    shortcut: str = "B"
    residual: bool = True
    weights: Union[str, None] = "torchvision:IMAGENET1K_V1"
    allow_partial_weights: bool = False  # weights covering the backbone in part are an error without it


@dataclass
class AnchorConfig(_Section):
    sizes: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    stride: int = 16


@dataclass
class RPNConfig(_Section):
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
class ROIHeadsConfig(_Section):
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
class ModelConfig(_Section):
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
class InputConfig(_Section):
    min_size_train: list[int] = field(default_factory=lambda: [600])
    min_size_train_sampling: str = "choice"
    max_size_train: int = 1000
    min_size_test: int = 600
    max_size_test: int = 1000
    hflip_prob: float = 0.5
    jitter: bool = False
    resize_mode: str = "default"
    exif_orientation: bool = True


@dataclass
class DatasetsConfig(_Section):
    root: str = "datasets"
    train: list[Union[str, dict]] = field(
        default_factory=lambda: ["voc_2007_trainval", "voc_2012_trainval"])
    test: list[Union[str, dict]] = field(default_factory=lambda: ["voc_2007_test"])


@dataclass
class DataLoaderConfig(_Section):
    num_workers: int = 4
    aspect_ratio_grouping: bool = True
    filter_empty: bool = True
    skip_bad_images: bool = False
    use_difficult: bool = True
    repeat_threshold: float = 0.0


@dataclass
class SolverConfig(_Section):
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
class TestAugConfig(_Section):
    enabled: bool = False
    min_sizes: list[int] = field(default_factory=lambda: [400, 500, 600, 700, 800, 900, 1000, 1100, 1200])
    max_size: int = 4000
    flip: bool = True


@dataclass
class BoxRefinementConfig(_Section):
    enabled: bool = False
    nms_thresh: float = 0.3
    voting: bool = True
    voting_iou: float = 0.5


@dataclass
class MultiScaleConfig(_Section):
    enabled: bool = False
    sizes: list[int] = field(default_factory=lambda: [200, 400, 600, 800, 1000])
    max_size: int = 2000


@dataclass
class TilesConfig(_Section):
    size: int = 0
    overlap: float = 0.25
    full_image: bool = True


@dataclass
class TestConfig(_Section):
    eval_period: int = 0
    save_best: Union[str, None] = None
    coco_max_dets: int = 100
    aug: TestAugConfig = field(default_factory=TestAugConfig)
    box_refinement: BoxRefinementConfig = field(default_factory=BoxRefinementConfig)
    multi_scale: MultiScaleConfig = field(default_factory=MultiScaleConfig)
    tiles: TilesConfig = field(default_factory=TilesConfig)
    amp: bool = False


@dataclass
class AccelConfig(_Section):  # GPU levers of the fast path, each off until measured (docs/accel.md, "GPU levers")
    cuda_channels_last: bool = False
    sync_free_postprocess: bool = False
    compile: Union[bool, str] = False  # false | true (= default) | one of accel.levers.COMPILE_MODES
    cuda_graphs: bool = False
    cuda_hoist: bool = False
    cuda_fused_relu: bool = False


@dataclass
class LogConfig(_Section):
    tensorboard: Union[bool, str] = "auto"  # true | false | auto (on when the tensorboard package is installed)


@dataclass
class Config(_Section):
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
