"""Res5 RoI heads of the ResNet C4 detector (He et al., Appendix A).

Shapes: N images, C4 channels of the trunk map, R RoIs (all images), S x S pooled size,
C5 channels after res5, K foreground classes (label 0 is background).

Losses (Detectron2's normalization): cross-entropy averaged over the sampled RoIs; the box
loss is summed over foreground RoIs (on the deltas of their gt class only) and divided by
the number of sampled RoIs, so it shrinks when there is little foreground.
`smooth_l1_beta=0` (default, Detectron2) is plain L1; Fast R-CNN used beta = 1.
`box_loss_weight` multiplies the box loss (Detectron2's BBOX_REG_LOSS_WEIGHT).

The paper's Appendix B, both off by default:
- `global_context`: the whole image (its own valid region, not the padding) is pooled from
  the C4 map like a RoI and run through res5; that (N, C5) vector is concatenated to each of
  the image's RoI vectors, so the predictor reads 2 x C5 (trained end to end).
- `box_refinement` (inference; detection/modeling/refinement.py): a second classification and
  regression from each RoI's regressed box, NMS over the union, box voting.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function
from torchvision.ops import batched_nms, box_iou, roi_align, roi_pool

from detection.modeling import syncfree
from detection.modeling.box_coder import BoxCoder
from detection.modeling.matcher import FOREGROUND, Matcher
from detection.modeling.precision import float32
from detection.modeling.refinement import BoxRefinement, box_voting
from detection.modeling.rpn import clip_boxes
from detection.modeling.sampling import check_sampling, subsample_batch
from detection.modeling.structures import OtherLibraryNames, host_to_device

POOLERS = ("roi_align", "roi_pool")


class BoxPredictor(OtherLibraryNames, nn.Module):
    """(K+1)-way classifier and class-specific box regressor (4K outputs) on pooled vectors."""

    OTHER_NAMES = {  # Detectron2's FastRCNNOutputLayers keeps the test settings; here the RoI heads do
        "test_score_thresh": "roi_heads.score_thresh_test", "test_nms_thresh": "roi_heads.nms_thresh_test",
        "test_topk_per_image": "roi_heads.detections_per_image", "box2box_transform": "roi_heads.box_coder",
        "smooth_l1_beta": "roi_heads.smooth_l1_beta", "loss_weight": "roi_heads.box_loss_weight (the box loss's; "
        "the classification loss counts 1.0)",
    }

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)
        # Faster R-CNN's and Detectron2's initialisation: small random scores, near-zero box deltas
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.constant_(self.cls_score.bias, 0.0)
        nn.init.constant_(self.bbox_pred.bias, 0.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(R, C5) -> class logits (R, K+1), deltas (R, 4K), in float32 also under autocast
        (bfloat16 would reorder close scores; these layers cost little)."""
        with float32(x):
            x = x.float()
            return self.cls_score(x), self.bbox_pred(x)


class Res5ROIHeads(OtherLibraryNames, nn.Module):
    """Sample RoIs, pool them from the C4 map, run res5 + average pool, classify and regress."""

    OTHER_NAMES = {  # torchvision's RoIHeads and Detectron2's Res5ROIHeads name these otherwise
        "box_predictor": "predictor (cls_score: K+1 logits, the background in column 0, not last as in "
                         "Detectron2; bbox_pred: 4K deltas)",
        "box_head": "res5 (conv5_x, then the average pool)", "box_roi_pool": "pooler (its name), "
        "pooler_resolution and spatial_scale", "proposal_matcher": "matcher",
        "fg_bg_sampler": "batch_size_per_image and positive_fraction (detection.modeling.sampling)",
        "test_score_thresh": "score_thresh_test", "test_nms_thresh": "nms_thresh_test",
        "test_topk_per_image": "detections_per_image",
    }

    def __init__(self, *, res5: nn.Module, res5_out_channels: int, num_classes: int,
                 pooler: str = "roi_align", pooler_resolution: int = 14,
                 spatial_scale: float = 1.0 / 16, batch_size_per_image: int = 512,
                 positive_fraction: float = 0.25, iou_threshold: float = 0.5,
                 bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
                 score_thresh_test: float = 0.05, nms_thresh_test: float = 0.5,
                 detections_per_image: int = 100, smooth_l1_beta: float = 0.0,
                 box_loss_weight: float = 1.0, global_context: bool = False,
                 box_refinement: BoxRefinement | None = None) -> None:
        super().__init__()
        if pooler not in POOLERS:
            raise ValueError(f"Res5ROIHeads: pooler must be one of {', '.join(POOLERS)}, got {pooler!r}")
        check_sampling("Res5ROIHeads", batch_size_per_image, positive_fraction)
        self.res5 = res5
        self.global_context = global_context
        self.box_refinement = box_refinement
        self.predictor = BoxPredictor(res5_out_channels * (2 if global_context else 1), num_classes)
        self.num_classes = num_classes
        self.pooler = pooler
        self.pooler_resolution = pooler_resolution
        self.spatial_scale = spatial_scale
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.matcher = Matcher([iou_threshold], allow_low_quality_matches=False)
        self.box_coder = BoxCoder(bbox_reg_weights)
        self.score_thresh_test = score_thresh_test
        self.nms_thresh_test = nms_thresh_test
        self.detections_per_image = detections_per_image
        self.smooth_l1_beta = smooth_l1_beta
        self.box_loss_weight = box_loss_weight
        # detection.accel sets this to compute box_features faster (hoisted convs, chunks). It
        # runs self.res5's own weights and is no submodule: no new parameters or state keys.
        self.res5_runner: Callable[[Tensor, list[Tensor]], Tensor] | None = None
        self.sync_free = False  # accel.sync_free_postprocess (detection/modeling/syncfree.py), set by detection.accel

    # torchvision's RoIHeads names for the same settings: a torchvision user sets
    # `model.roi_heads.score_thresh = 0.9`, which made a new attribute nothing read (a trial)
    score_thresh = property(lambda self: self.score_thresh_test,
                            lambda self, value: setattr(self, "score_thresh_test", value))
    nms_thresh = property(lambda self: self.nms_thresh_test, lambda self, value: setattr(self, "nms_thresh_test", value))
    detections_per_img = property(lambda self: self.detections_per_image,
                                  lambda self, value: setattr(self, "detections_per_image", value))

    def forward(self, features: Tensor, proposals: Sequence[Tensor],
                image_sizes: Sequence[tuple[int, int]],
                targets: Sequence[dict[str, Tensor]] | None = None,
                roi_features: Callable[[list[Tensor]], Tensor] | None = None
                ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """features (N, C4, H, W); proposals (ki, 4) per image; targets {"boxes", "labels"}
        per image (training). Training returns ([], losses {"loss_cls", "loss_box"});
        eval returns (per-image {"boxes", "scores", "labels"}, {})."""
        if self.training:
            if targets is None:
                raise ValueError("Res5ROIHeads: targets are required in training mode")
            boxes, gt_classes, gt_boxes = self.sample_proposals(proposals, targets)
            logits, deltas = self.predictor(self.training_features(features, boxes, image_sizes))
            return [], self.losses(logits, deltas, torch.cat(boxes), gt_classes, gt_boxes)
        return self.detect(features, proposals, image_sizes, roi_features), {}

    def detect(self, features: Tensor, proposals: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]],
               roi_features: Callable[[list[Tensor]], Tensor] | None = None) -> list[dict[str, Tensor]]:
        """Eval: per-image detections. roi_features(per-image boxes) -> (R, C5) gives the RoI
        vectors (default: box_features on `features`; multi-scale testing passes its own)."""
        if roi_features is None:
            roi_features = lambda boxes: self.box_features(features, boxes)  # noqa: E731
        context = self.context_features(features, image_sizes) if self.global_context else None
        scores, boxes = self.predict(roi_features, list(proposals), image_sizes, context)
        nms_thresh = self.nms_thresh_test
        if self.box_refinement is not None:
            with record_function("c4det.box_refinement"):
                scores, boxes = self.refine(roi_features, scores, boxes, image_sizes, context)
            nms_thresh = self.box_refinement.nms_thresh
        with record_function("c4det.box_postprocess"):
            voting = self.box_refinement is not None and self.box_refinement.voting
            if self.sync_free and not voting and not torch.jit.is_tracing():  # voting reads each image's candidates
                return syncfree.detect(boxes, scores, score_thresh=self.score_thresh_test, nms_thresh=nms_thresh,
                                       detections_per_image=self.detections_per_image)
            return [self.detect_image(b, s, nms_thresh) for b, s in zip(boxes, scores)]

    def predict(self, roi_features: Callable[[list[Tensor]], Tensor], boxes: list[Tensor],
                image_sizes: Sequence[tuple[int, int]], context: Tensor | None
                ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: class scores (Ri, K) and clipped class-specific boxes (Ri, K, 4) of the
        RoIs `boxes` (Ri, 4)."""
        counts = [len(b) for b in boxes]
        features = roi_features(boxes)
        if context is not None:
            features = self.with_context(features, context, counts)
        logits, deltas = self.predictor(features)
        with record_function("c4det.box_postprocess"):
            scores = F.softmax(logits, dim=-1)[:, 1:]  # (R, K+1) -> (R, K), background dropped
            decoded = self.box_coder.decode(deltas, torch.cat(boxes)).view(-1, self.num_classes, 4)  # (R, 4K) -> (R, K, 4)
            return _per_image(scores, counts), [clip_boxes(b, size) for b, size
                                                in zip(_per_image(decoded, counts), image_sizes)]

    def refine(self, roi_features: Callable[[list[Tensor]], Tensor], scores: list[Tensor],
               boxes: list[Tensor], image_sizes: Sequence[tuple[int, int]], context: Tensor | None
               ) -> tuple[list[Tensor], list[Tensor]]:
        """Box refinement: each RoI's regressed box of its top-scoring class is classified and
        regressed again; per image the union (2 Ri, K) / (2 Ri, K, 4) of both rounds."""
        refined = [b[torch.arange(len(b), device=b.device), s.argmax(dim=1)] if len(b) else b[:, 0]
                   for b, s in zip(boxes, scores)]  # (Ri, K, 4) -> (Ri, 4)
        new_scores, new_boxes = self.predict(roi_features, refined, image_sizes, context)
        return ([torch.cat(pair) for pair in zip(scores, new_scores)],
                [torch.cat(pair) for pair in zip(boxes, new_boxes)])

    def context_features(self, features: Tensor, image_sizes: Sequence[tuple[int, int]]) -> Tensor:
        """(N, C5): each image's whole valid region (not the padding) pooled like a RoI, res5."""
        return self.box_features(features, _whole_image_boxes(features, image_sizes))

    @staticmethod
    def with_context(roi_features: Tensor, context: Tensor, counts: Sequence[int]) -> Tensor:
        """(R, C5) RoI vectors + (N, C5) image vectors -> (R, 2 C5), each RoI with its image's."""
        if len(counts) == 1:  # no count read: a traced graph follows the input's number of RoIs
            per_roi = context.expand_as(roi_features)  # (1, C5) -> (R, C5)
        else:
            repeats = host_to_device(torch.tensor(counts, device="cpu"), context.device)
            per_roi = context.repeat_interleave(repeats, dim=0, output_size=sum(counts))  # (N, C5) -> (R, C5)
        return torch.cat([roi_features, per_roi.to(roi_features.dtype)], dim=1)

    def training_features(self, features: Tensor, boxes: list[Tensor],
                          image_sizes: Sequence[tuple[int, int]]) -> Tensor:
        """The predictor's input for the sampled RoIs. With global context the image boxes go
        through res5 in the same call as the RoIs, so trainable norms see one batch."""
        if not self.global_context:
            return self.box_features(features, boxes)
        whole = _whole_image_boxes(features, image_sizes)
        joint = self.box_features(features, [torch.cat([b, w]) for b, w in zip(boxes, whole)])
        counts = [len(b) for b in boxes]
        parts = joint.split([c + 1 for c in counts])  # per image: its RoIs, then its whole box
        rois = torch.cat([p[:-1] for p in parts])
        return self.with_context(rois, torch.cat([p[-1:] for p in parts]), counts)

    def box_features(self, features: Tensor, boxes: list[Tensor]) -> Tensor:
        """(N, C4, H, W) map + per-image boxes -> (R, C5): pool, res5, average pool."""
        if self.res5_runner is not None:
            return self.res5_runner(features, boxes)
        with record_function("c4det.pool"):
            pooled = self.pool(features, boxes)
        with record_function("c4det.res5"):
            return self.res5_head(pooled)

    def pool(self, features: Tensor, boxes: list[Tensor]) -> Tensor:
        """(N, C4, H, W) map + per-image boxes -> (R, C4, S, S)."""
        size = (self.pooler_resolution, self.pooler_resolution)
        if self.pooler == "roi_align":
            return roi_align(features, boxes, size, spatial_scale=self.spatial_scale,
                             sampling_ratio=0, aligned=True)
        return roi_pool(features, boxes, size, spatial_scale=self.spatial_scale)

    def res5_head(self, pooled: Tensor) -> Tensor:
        """(R, C4, S, S) -> res5 (stride 2) -> global average pool -> (R, C5)."""
        return self.res5(pooled).mean(dim=(2, 3))

    @torch.no_grad()
    def sample_proposals(self, proposals: Sequence[Tensor], targets: Sequence[dict[str, Tensor]]
                         ) -> tuple[list[Tensor], Tensor, Tensor]:
        """Per image: append gt boxes, match at the IoU threshold, sample fg/bg.

        Returns sampled boxes per image, their classes (R,) (0 = bg) and matched gt boxes
        (R, 4) (meaningful for foreground only)."""
        matched = []  # per image: boxes, matched gt index, classes (0 bg; one threshold: no RoI is ignored)
        for props, target in zip(proposals, targets):
            gt_boxes, gt_labels = target["boxes"], target["labels"]
            boxes = torch.cat([props, gt_boxes.to(props.dtype)])  # gt appended: always a positive
            matched_idx, match_labels = self.matcher(box_iou(gt_boxes, boxes))  # (P,), (P,)
            classes = torch.zeros_like(matched_idx)
            if gt_boxes.numel():  # torch.where, not classes[fg] = ...: a mask index reads the device
                classes = torch.where(match_labels == FOREGROUND, gt_labels[matched_idx].to(classes.dtype), classes)
            matched.append((boxes, matched_idx, classes))
        samples = subsample_batch([classes for _, _, classes in matched], self.batch_size_per_image,
                                  self.positive_fraction)  # one host read; the global generator (in last.pth)
        boxes_out, classes_out, gt_out = [], [], []
        for target, (boxes, matched_idx, classes), (pos, neg) in zip(targets, matched, samples):
            gt_boxes = target["boxes"]
            keep = torch.cat([pos, neg])
            boxes_out.append(boxes[keep])
            classes_out.append(classes[keep])
            gt_out.append(gt_boxes[matched_idx[keep]] if gt_boxes.numel() else boxes[keep])
        return boxes_out, torch.cat(classes_out), torch.cat(gt_out)

    def losses(self, logits: Tensor, deltas: Tensor, boxes: Tensor, gt_classes: Tensor,
               gt_boxes: Tensor) -> dict[str, Tensor]:
        """Cross-entropy over the R sampled RoIs; box loss over fg RoIs / R."""
        num_rois = gt_classes.numel()
        if num_rois == 0:  # keeps the graph (zero gradients) instead of a NaN mean
            zero = logits.sum() * 0.0 + deltas.sum() * 0.0
            return {"loss_cls": zero, "loss_box": zero.clone()}
        loss_cls = F.cross_entropy(logits, gt_classes, reduction="mean")
        # The box loss over the fg RoIs, as a mask over all R (no nonzero: no host read): each
        # RoI's deltas of its gt class (bg: class 1's, masked out), its target where fg, and
        # zeros on both sides elsewhere (a bg RoI's target may be inf or NaN: never reaches the loss).
        fg = (gt_classes > 0).unsqueeze(1)  # (R, 1)
        cls = (gt_classes - 1).clamp(min=0).view(num_rois, 1, 1).expand(num_rois, 1, 4)
        class_deltas = deltas.view(num_rois, self.num_classes, 4).gather(1, cls).squeeze(1)  # (R, 4)
        target = self.box_coder.encode(gt_boxes, boxes)  # (R, 4) float32
        target = torch.where(fg, target, torch.zeros((), dtype=target.dtype, device=target.device))
        class_deltas = torch.where(fg, class_deltas, torch.zeros((), dtype=class_deltas.dtype,
                                                                 device=class_deltas.device))
        loss_box = F.smooth_l1_loss(class_deltas, target, beta=self.smooth_l1_beta, reduction="sum")
        return {"loss_cls": loss_cls, "loss_box": self.box_loss_weight * loss_box / num_rois}

    def detect_image(self, boxes: Tensor, scores: Tensor, nms_thresh: float) -> dict[str, Tensor]:
        """Clipped boxes (Ri, K, 4), scores (Ri, K) of one image -> its detections: score
        threshold, per-class NMS, top-k (and box voting when refining). Traced, batched_nms
        takes torchvision's coordinate trick (the classes' boxes shifted apart, one NMS)."""
        keep = (scores > self.score_thresh_test) & torch.isfinite(boxes).all(dim=-1)  # (Ri, K)
        roi_idx, class_idx = keep.nonzero(as_tuple=True)
        boxes, scores = boxes[roi_idx, class_idx], scores[roi_idx, class_idx]
        labels = class_idx + 1
        keep = batched_nms(boxes, scores, labels, nms_thresh)[:self.detections_per_image]
        kept = boxes[keep]
        if self.box_refinement is not None and self.box_refinement.voting:
            kept = box_voting(kept, labels[keep], boxes, scores, labels, self.box_refinement.voting_iou)
        return {"boxes": kept, "scores": scores[keep], "labels": labels[keep]}


def _whole_image_boxes(features: Tensor, image_sizes: Sequence[tuple[int, int] | Tensor]) -> list[Tensor]:
    """Per image a (1, 4) box (0, 0, w, h): its valid region of the padded batch. A size that is
    an int64 (2,) tensor (tracing) stays one, so the box follows the input's size."""
    return [_whole_image_box(features, size) for size in image_sizes]


def _whole_image_box(features: Tensor, size: tuple[int, int] | Tensor) -> Tensor:
    if isinstance(size, Tensor):
        return torch.cat([size.new_zeros(2), size.flip(0)]).to(torch.float32).unsqueeze(0)
    height, width = size
    return host_to_device(torch.tensor([[0.0, 0.0, float(width), float(height)]], dtype=torch.float32, device="cpu"),
                          features.device)


def _per_image(x: Tensor, counts: list[int]) -> list[Tensor]:
    """Rows (R, ...) split into the images' (Ri, ...). One image takes all rows without reading
    its count, which tracing would freeze at the traced image's."""
    return [x] if len(counts) == 1 else list(x.split(counts))
