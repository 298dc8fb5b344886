"""The models tools/benchmark.py compares.

- ours: detection.modeling.model.build_model(cfg) with random but sane weights
  (detection.testing.make_sane: each residual branch's last norm scaled down, so
  activations stay O(1); see docs/ARCHITECTURE.md). It is timed through its public entry
  point, `model(images)`, and its stages are read from the profiler labels it carries
  (detection/benchmarking/profiling.py): nothing here re-stages it or touches its private
  members, so the benchmark times the code that runs. bench_config and build_bench_model
  give it the tool's config and weights (--weights, or random).
- torchvision's generic FasterRCNN assembled as C4, holding the same weights and doing the
  same work: ResNet conv1..layer3 (FrozenBatchNorm2d) as the trunk, RoIAlign with
  aligned=True (ours; torchvision's MultiScaleRoIAlign uses aligned=False), layer4 + average
  pool as the box head, our exact anchors (torchvision rounds its own to whole pixels), the
  same padding, proposal counts, thresholds and image size. It gives our detections
  (tests/test_benchmark.py); what still differs is listed at build_torchvision_c4.
  `staged_torchvision` runs its eval forward split into the benchmark's six stages, each
  inside `meter(stage)` (a profiler label or a FLOP counter).

`train_step` times one SGD iteration through the trainer's own forward_losses and
optimizer_step.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import OrderedDict
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import Tensor, nn

from backbones.errors import WeightsError
from detection.cli import config_from_args
from detection.config import Config, ConfigError
from detection.engine.optim import build_optimizer
from detection.engine.train_state import amp_scaler
from detection.engine.trainer import TrainState, forward_losses, optimizer_step
from detection.modeling.model import FasterRCNN, build_model
from detection.testing import make_sane

Meter = Callable[[str], ContextManager]
STAGES = ("preprocess", "trunk", "rpn", "roi_pool", "res5_head", "postprocess")


def build_ours(cfg: Any, seed: int = 0) -> FasterRCNN:
    """Our detector from the config, seeded random weights made sane, in eval mode."""
    torch.manual_seed(seed)
    model = make_sane(build_model(cfg)).eval()
    model.train_sizes = None  # training steps are timed at --image-size as given: no warning about its size
    return model


def bench_config(args: argparse.Namespace, extra: Sequence[str] = ()) -> Config:
    """The tool's config with random weights (unless --pretrained) and test size = the image
    size; without --image-size, sets args.image_size to min_size_test x 4/3 (within
    max_size_test)."""
    weights = [] if args.pretrained else ["model.backbone.weights=null"]
    if args.image_size is None:
        cfg = config_from_args(args, weights)
        side = cfg.input.min_size_test
        args.image_size = [side, min(cfg.input.max_size_test, round(side * 4 / 3))]
    h, w = args.image_size
    return config_from_args(args, [*weights, f"input.min_size_test={min(h, w)}",
                                   f"input.max_size_test={max(h, w)}", *extra])


def build_bench_model(cfg: Config, args: argparse.Namespace) -> FasterRCNN:
    """Seeded random sane weights, or the detector in --weights."""
    model = build_ours(cfg)
    if args.weights:
        from detection.engine.loading import load_detector_weights, read_detector_file

        weights = read_detector_file(args.weights)
        if weights is None:
            raise WeightsError(f"{args.weights}: holds no detector (backbone weights?); --weights takes a "
                               "detector checkpoint")
        load_detector_weights(model, weights)
    return model


# ---- torchvision's generic Faster R-CNN as C4 ------------------------------------------


def _backbone_state(ours: FasterRCNN) -> dict[str, Tensor]:
    """Our trunk + res5 tensors under backbones.ResNet names (stem.conv1.weight, res5.0...)."""
    state = dict(ours.trunk.state_dict())
    state.update({f"res5.{k}": v for k, v in ours.roi_heads.res5.state_dict().items()})
    return {k.replace("to_channels_last.", ""): v for k, v in state.items()}


def _torchvision_resnet(ours: FasterRCNN, depth: int) -> nn.Module:
    import torchvision
    from torchvision.ops import FrozenBatchNorm2d

    from backbones.keymap import TORCHVISION_RULES, map_keys

    resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=FrozenBatchNorm2d)
    mapped, _, unknown = map_keys(list(resnet.state_dict()), TORCHVISION_RULES)  # ours -> theirs
    ours_state = _backbone_state(ours)
    missing = sorted(set(mapped) - set(ours_state))
    if unknown or missing:
        raise WeightsError(f"cannot copy weights into torchvision's resnet{depth}: unknown {unknown[:3]}, "
                           f"missing {missing[:3]}")
    resnet.load_state_dict({theirs: ours_state[name] for name, theirs in mapped.items()}, strict=False)
    trainable = {name: p.requires_grad for name, p in list(ours.trunk.named_parameters())
                 + [(f"res5.{n}", p) for n, p in ours.roi_heads.res5.named_parameters()]}
    params = dict(resnet.named_parameters())
    for name, theirs in mapped.items():  # the same stages frozen (freeze_at)
        if name in trainable:
            params[theirs].requires_grad_(trainable[name])
    return resnet


def _anchor_permutation(num_sizes: int, num_ratios: int) -> list[int]:
    """torchvision orders a cell's anchors ratio-major, ours size-major: theirs[i] = ours[perm[i]]."""
    return [s * num_ratios + r for r in range(num_ratios) for s in range(num_sizes)]


def _copy_rpn_head(ours: FasterRCNN, head: nn.Module, num_sizes: int, num_ratios: int) -> None:
    perm = torch.tensor(_anchor_permutation(num_sizes, num_ratios))
    box_perm = (perm[:, None] * 4 + torch.arange(4)).reshape(-1)  # (A, 4) channel blocks
    src = ours.rpn.head
    with torch.no_grad():
        head.conv[0][0].weight.copy_(src.conv.weight)
        head.conv[0][0].bias.copy_(src.conv.bias)
        head.cls_logits.weight.copy_(src.objectness_logits.weight[perm])
        head.cls_logits.bias.copy_(src.objectness_logits.bias[perm])
        head.bbox_pred.weight.copy_(src.anchor_deltas.weight[box_perm])
        head.bbox_pred.bias.copy_(src.anchor_deltas.bias[box_perm])


def _torchvision_cell_anchors(ours: FasterRCNN, num_sizes: int, num_ratios: int) -> Tensor:
    """Our cell anchors in torchvision's ratio-major order. torchvision rounds its own to whole
    pixels (ours and Detectron2's are exact), which moves proposals by up to half a pixel."""
    gen = ours.rpn.anchor_generator
    cell = gen.cell_anchors + gen.offset * gen.stride  # torchvision has no offset: shift the cell
    return cell[torch.tensor(_anchor_permutation(num_sizes, num_ratios))].clone()


def _torchvision_rpn(ours: FasterRCNN, cfg: Any, channels: int) -> tuple[nn.Module, nn.Module]:
    """torchvision's RPNHead with our RPN head's weights and its AnchorGenerator with our anchors."""
    from torchvision.models.detection.rpn import AnchorGenerator, RPNHead

    sizes, ratios = tuple(cfg.model.anchors.sizes), tuple(cfg.model.anchors.aspect_ratios)
    rpn_head = RPNHead(channels, len(sizes) * len(ratios))
    _copy_rpn_head(ours, rpn_head, len(sizes), len(ratios))
    anchors = AnchorGenerator((sizes,), (ratios,))
    anchors.cell_anchors = [_torchvision_cell_anchors(ours, len(sizes), len(ratios))]
    return rpn_head, anchors


def _torchvision_predictor(ours: FasterRCNN, num_classes: int) -> nn.Module:
    """torchvision's FastRCNNPredictor with our classifier; class 0 (background) gets zero box
    deltas (torchvision predicts them, ours does not)."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    src = ours.roi_heads.predictor
    predictor = FastRCNNPredictor(src.cls_score.in_features, num_classes + 1)
    with torch.no_grad():
        predictor.cls_score.load_state_dict(src.cls_score.state_dict())
        predictor.bbox_pred.weight.zero_()[4:].copy_(src.bbox_pred.weight)
        predictor.bbox_pred.bias.zero_()[4:].copy_(src.bbox_pred.bias)
    return predictor


class AlignedRoIPool(nn.Module):
    """torchvision's box_roi_pool interface (features dict, proposals, image sizes) around
    torchvision.ops.roi_align with aligned=True, as ours (Detectron2's ROIAlignV2).
    MultiScaleRoIAlign pools with aligned=False: a half-pixel shift, other detections."""

    def __init__(self, resolution: int, spatial_scale: float) -> None:
        super().__init__()
        self.resolution, self.spatial_scale = resolution, spatial_scale

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor],
                image_sizes: list[tuple[int, int]]) -> Tensor:
        from torchvision.ops import roi_align

        return roi_align(features["0"], proposals, self.resolution, spatial_scale=self.spatial_scale,
                         sampling_ratio=0, aligned=True)


def _check_c4_compatible(cfg: Any) -> None:
    bb = cfg.model.backbone
    if (bb.stride_in_1x1 or bb.shortcut != "B" or not bb.residual or cfg.model.roi_heads.pooler != "roi_align"
            or cfg.model.input_format != "RGB"):
        raise ConfigError("--compare-torchvision needs torchvision's ResNet layout and input: model.backbone."
                          "stride_in_1x1=false, shortcut=B, residual=true, roi_heads.pooler=roi_align, "
                          "input_format=RGB")
    if bb.norm != "frozen_bn":  # torchvision's ResNet keeps its BN in FrozenBatchNorm2d buffers
        raise ConfigError(f"--compare-torchvision: torchvision's C4 assembly has frozen BN, the config's "
                          f"model.backbone.norm is {bb.norm!r}: give model.backbone.norm=frozen_bn (the same "
                          "network at inference; a trainable norm would not compare like with like)")
    appendix_b = {"model.roi_heads.global_context": cfg.model.roi_heads.global_context,
                  "test.box_refinement.enabled": cfg.test.box_refinement.enabled,
                  "test.multi_scale.enabled": cfg.test.multi_scale.enabled}
    if any(appendix_b.values()):
        raise ConfigError("--compare-torchvision: torchvision's Faster R-CNN has none of the paper's Appendix B "
                          f"parts; turn off {', '.join(k for k, v in appendix_b.items() if v)}")


def build_torchvision_c4(ours: FasterRCNN, cfg: Any) -> nn.Module:
    """torchvision.models.detection.FasterRCNN assembled as C4 with `ours`' weights. It expects
    images in 0..1, so its mean/std are ours / 255; its min/max size are ours.

    Made to do our work: our unrounded anchors, RoIAlign aligned=True, our padding
    (size_divisibility), our proposal counts and thresholds. What still differs, all of it at
    the edge of float precision on the benchmark's inputs (tests/test_benchmark.py checks the
    detections are equal):
    - the RPN drops proposals with a side below max(min_size, 1e-3) px (torchvision's floor);
      ours those below min_size and those with no area: they differ for a side in (0, 1e-3);
    - torchvision's proposal NMS ranks by sigmoid(logit), ours by the logit: the same order
      unless float32 rounds two logits' sigmoids to one value (logits above about 17);
    - torchvision drops detections with a side below 0.01 px before NMS, ours keeps them;
      mapping back to the input image, ours clips and drops boxes without area (with the
      benchmark's image at the test size the scale is 1, and nothing changes);
    - resizing: torchvision interpolates the float image, ours resamples the uint8 one
      (detection.modeling.resize); at the test size both are the identity;
    - anchor stride: ours is 16, torchvision's (padded size // feature size): the same when
      the padded size is a multiple of 16 (size_divisibility 16 or 32; base.yaml pads to 32).
    The benchmark compares the detections on every run and reports unequal work.
    """
    from torchvision.models.detection import FasterRCNN as TVFasterRCNN
    from torchvision.ops import MultiScaleRoIAlign

    _check_c4_compatible(cfg)
    m = cfg.model
    resnet = _torchvision_resnet(ours, m.backbone.depth)
    trunk = nn.Sequential(OrderedDict((k, getattr(resnet, k)) for k in
                                      ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")))
    trunk.out_channels = ours.rpn.head.conv.in_channels
    box_head = nn.Sequential(resnet.layer4, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    rpn_head, anchors = _torchvision_rpn(ours, cfg, trunk.out_channels)
    predictor = _torchvision_predictor(ours, m.num_classes)
    r, h = m.rpn, m.roi_heads
    model = TVFasterRCNN(
        trunk, num_classes=None, min_size=ours.min_size_test, max_size=ours.max_size_test,
        image_mean=[v / 255 for v in m.pixel_mean], image_std=[v / 255 for v in m.pixel_std],
        rpn_anchor_generator=anchors, rpn_head=rpn_head, size_divisible=max(ours.size_divisibility, 1),
        rpn_pre_nms_top_n_train=r.pre_nms_topk_train, rpn_pre_nms_top_n_test=r.pre_nms_topk_test,
        rpn_post_nms_top_n_train=r.post_nms_topk_train, rpn_post_nms_top_n_test=r.post_nms_topk_test,
        rpn_nms_thresh=r.nms_thresh, rpn_fg_iou_thresh=r.iou_thresholds[1],
        rpn_bg_iou_thresh=r.iou_thresholds[0], rpn_batch_size_per_image=r.batch_size_per_image,
        rpn_positive_fraction=r.positive_fraction,
        box_roi_pool=MultiScaleRoIAlign(["0"], h.pooler_resolution, sampling_ratio=0),
        box_head=box_head, box_predictor=predictor, box_score_thresh=h.score_thresh_test,
        box_nms_thresh=h.nms_thresh_test, box_detections_per_img=h.detections_per_image,
        box_fg_iou_thresh=h.iou_threshold, box_bg_iou_thresh=h.iou_threshold,
        box_batch_size_per_image=h.batch_size_per_image, box_positive_fraction=h.positive_fraction,
        bbox_reg_weights=tuple(h.bbox_reg_weights))
    model.rpn.min_size = max(r.min_size, 1e-3)  # torchvision's floor: it keeps zero-area boxes at 0
    # the constructor accepts only a MultiScaleRoIAlign (aligned=False); swapped afterwards
    model.roi_heads.box_roi_pool = AlignedRoIPool(h.pooler_resolution, 1 / m.anchors.stride)
    return model.eval()


# ---- one inference, stage by stage ------------------------------------------------------


class ProposalRecorder:
    """Records the proposals that reach our box head, through a public forward pre-hook on
    model.roi_heads: `with ProposalRecorder(model) as rec: model(images)`, then `rec.proposals`
    (one (Ri, 4) tensor per image of the last call), `rec.count`, and `rec.images`: the images
    through the box head over all calls, one per image per inference pass (test-time
    augmentation runs each image through several)."""

    def __init__(self, model: FasterRCNN) -> None:
        self.model, self.proposals, self.handle = model, [], None
        self.images = 0

    @property
    def count(self) -> int:
        return sum(len(p) for p in self.proposals)

    def hook(self, module: nn.Module, args: tuple) -> None:
        self.proposals = list(args[1])  # args = (features, proposals, image_sizes)
        self.images += len(self.proposals)

    def __enter__(self) -> "ProposalRecorder":
        self.handle = self.model.roi_heads.register_forward_pre_hook(self.hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def staged_torchvision(model: nn.Module, images: list[Tensor], meter: Meter) -> tuple[list[dict], list[Tensor]]:
    """torchvision's GeneralizedRCNN.forward (eval) split into the same stages; returns the
    detections and the proposals, one (Ri, 4) tensor per image."""
    heads = model.roi_heads
    original_sizes = [tuple(img.shape[-2:]) for img in images]
    with meter("preprocess"):
        batch, _ = model.transform(images)
    with meter("trunk"):
        features = OrderedDict([("0", model.backbone(batch.tensors))])
    with meter("rpn"):
        proposals, _ = model.rpn(batch, features)
    with meter("roi_pool"):
        pooled = heads.box_roi_pool(features, proposals, batch.image_sizes)
    with meter("res5_head"):
        logits, deltas = heads.box_predictor(heads.box_head(pooled))
    with meter("postprocess"):
        boxes, scores, labels = heads.postprocess_detections(logits, deltas, proposals, batch.image_sizes)
        dets = [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)]
        dets = model.transform.postprocess(dets, batch.image_sizes, original_sizes)
    return dets, list(proposals)


# Proposals are "the same" when each is within this many pixels of one of the other model's in
# every coordinate: float32 noise of decoding through exp() on 1000 px images is below 0.01 px
# (0.0074 px between ours and torchvision's at 800x1088, 1000 proposals, on the CPU); one RoI that
# differs at all differs by far more (torchvision's rounded anchors: 0.5 px). Not IoU: a clipped
# proposal 0.3 px thin has IoU 0.997 at 0.001 px.
PROPOSAL_TOLERANCE_PX = 0.05


def compare_proposals(ref: list[Tensor], other: list[Tensor]) -> dict[str, Any]:
    """Two models' proposals for the same images, as sets (near-equal objectness may order them
    differently): the counts, the largest distance (px, in the worst coordinate) from a reference
    proposal to its nearest one in `other`, and the lowest IoU of a reference proposal with its
    best match; `equal`: the same counts and that distance within PROPOSAL_TOLERANCE_PX."""
    from torchvision.ops import box_iou

    pairs = [(a.cpu().float(), b.cpu().float()) for a, b in zip(ref, other) if len(a) and len(b)]
    worst = min((float(box_iou(a, b).max(dim=1).values.min()) for a, b in pairs), default=1.0)
    farthest = max((float((a[:, None] - b[None]).abs().amax(dim=2).min(dim=1).values.max()) for a, b in pairs),
                   default=0.0)
    same = len(ref) == len(other) and all(len(a) == len(b) for a, b in zip(ref, other))
    return {"proposals": sum(len(a) for a in ref), "other_proposals": sum(len(b) for b in other),
            "max_diff_px": farthest, "min_best_iou": worst, "equal": same and farthest <= PROPOSAL_TOLERANCE_PX}


# ---- training -----------------------------------------------------------------------------


def synthetic_batch(num_images: int, size: tuple[int, int], num_classes: int, seed: int = 0,
                    device: torch.device | str = "cpu") -> tuple[list[torch.Tensor], list[dict]]:
    """Noise images (0..255 float) with 5 random boxes each, drawn on the CPU (seeded: the same
    batch on every device) and moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    images = [torch.randint(0, 256, (3, h, w), generator=g).float() for _ in range(num_images)]
    targets = []
    for _ in range(num_images):
        xy = torch.rand(5, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = (torch.rand(5, 2, generator=g) * 0.5 + 0.1) * torch.tensor([w * 0.3, h * 0.3]) + 8
        boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]).float())], 1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, num_classes + 1, (5,), generator=g)})
    return [img.to(device) for img in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def bench_state(model: torch.nn.Module, momentum: float, weight_decay: float, ours: bool = True,
                amp: bool = False) -> TrainState:
    """The trainer's state for `model` at lr 0 (the same arithmetic as training, but the weights
    stay put, so every timed run does the same work): SGD, a constant schedule, and with `amp`
    the trainer's loss scaler (train_state.amp_scaler: on CUDA, as solver.amp trains there, and as
    torchvision's reference scripts train with --amp; its unscale and inf check are part of the
    step). ours: our trainer's optimizer (build_optimizer: fused update); else torch's default
    SGD, as torchvision's detection reference scripts build it."""
    if ours:
        optimizer = build_optimizer(model, base_lr=0.0, momentum=momentum, weight_decay=weight_decay)
    else:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0,
                                    momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    device = next(model.parameters()).device
    return TrainState(model, optimizer, scheduler, amp_scaler(amp, device))


def settle_loss_scale(state: TrainState, step: Callable[[], Any], most: int = 30) -> int:
    """With a loss scaler (float16 on CUDA), steps until its scale stops changing: at its first
    scale (65536) float16 gradients may overflow, and such a step skips the optimizer's update
    and halves the scale, a cheaper step than training's; the timed steps must not be those.
    -> the steps taken (0 without a scaler)."""
    taken = 0
    while state.scaler.is_enabled() and taken < most:
        before = state.scaler.get_scale()
        step()
        taken += 1
        if state.scaler.get_scale() == before:
            break
    return taken


def train_step(state: TrainState, images: list, targets: list, meter: Callable,
               amp: bool = False) -> None:
    """The trainer's step, through its own functions, timed in two parts; amp: solver.amp's
    autocast (the state's loss scaler, bench_state's `amp`, does the rest of what solver.amp does)."""
    with meter("forward"):
        losses = forward_losses(state.model, images, targets, amp=amp, device=images[0].device)
        total = sum(losses.values())
    with meter("backward_step"):
        optimizer_step(state, total)


class TimedModel:
    """A detector with the wall time of each forward pass recorded: what evaluation spends in
    the model, apart from reading images and scoring. Passes train()/eval() and class_names
    through, so the evaluation loop takes it as the model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.seconds: list[float] = []  # per forward call
        self.images: list[int] = []
        self.class_names = getattr(model, "class_names", None)

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True) -> "TimedModel":
        self.model.train(mode)
        return self

    def eval(self) -> "TimedModel":
        return self.train(False)

    def __call__(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        start = time.perf_counter()
        outputs = self.model(images)
        self.seconds.append(time.perf_counter() - start)
        self.images.append(len(images))
        return outputs

    def total_seconds(self) -> float:
        return sum(self.seconds)

    def median_seconds_per_image(self) -> float:
        per_image = [s / max(1, n) for s, n in zip(self.seconds, self.images)]
        return statistics.median(per_image) if per_image else float("nan")
