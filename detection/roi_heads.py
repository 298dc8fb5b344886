"""Res5 RoI heads of the ResNet C4 detector (He et al., Appendix A).

Shapes: N images, C4 channels of the trunk map, R RoIs (all images), S x S pooled size,
C5 channels after res5, K foreground classes (label 0 is background).

Losses (Detectron2's normalization): cross-entropy averaged over the sampled RoIs; the box
loss is summed over foreground RoIs (on the deltas of their gt class only) and divided by
the number of sampled RoIs, so it shrinks when there is little foreground.
`smooth_l1_beta=0` (default, Detectron2) is plain L1; Fast R-CNN used beta = 1.
`box_loss_weight` multiplies the box loss (Detectron2's BBOX_REG_LOSS_WEIGHT).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, roi_align, roi_pool

from detection.box_coder import BoxCoder
from detection.matcher import FOREGROUND, IGNORE, Matcher
from detection.sampling import subsample_labels

POOLERS = ("roi_align", "roi_pool")


class BoxPredictor(nn.Module):
    """(K+1)-way classifier and class-specific box regressor (4K outputs) on pooled vectors."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.constant_(self.cls_score.bias, 0.0)
        nn.init.constant_(self.bbox_pred.bias, 0.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(R, C5) -> class logits (R, K+1), deltas (R, 4K)."""
        return self.cls_score(x).float(), self.bbox_pred(x).float()  # float32 under autocast


class Res5ROIHeads(nn.Module):
    """Sample RoIs, pool them from the C4 map, run res5 + average pool, classify and regress."""

    def __init__(self, *, res5: nn.Module, res5_out_channels: int, num_classes: int,
                 pooler: str = "roi_align", pooler_resolution: int = 14,
                 spatial_scale: float = 1.0 / 16, batch_size_per_image: int = 512,
                 positive_fraction: float = 0.25, iou_threshold: float = 0.5,
                 bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
                 score_thresh_test: float = 0.05, nms_thresh_test: float = 0.5,
                 detections_per_image: int = 100, smooth_l1_beta: float = 0.0,
                 box_loss_weight: float = 1.0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if pooler not in POOLERS:
            raise ValueError(f"Res5ROIHeads: pooler must be one of {', '.join(POOLERS)}, got {pooler!r}")
        self.res5 = res5
        self.predictor = BoxPredictor(res5_out_channels, num_classes)
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
        self.generator = generator
        # detection.fast sets this to compute box_features faster (hoisted convs, chunks). It
        # runs self.res5's own weights and is no submodule: no new parameters or state keys.
        self.res5_runner: Callable[[Tensor, list[Tensor]], Tensor] | None = None

    def forward(self, features: Tensor, proposals: Sequence[Tensor],
                image_sizes: Sequence[tuple[int, int]],
                targets: Sequence[dict[str, Tensor]] | None = None
                ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """features (N, C4, H, W); proposals (ki, 4) per image; targets {"boxes", "labels"}
        per image (training). Training returns ([], losses {"loss_cls", "loss_box"});
        eval returns (per-image {"boxes", "scores", "labels"}, {})."""
        if self.training:
            if targets is None:
                raise ValueError("Res5ROIHeads: targets are required in training mode")
            boxes, gt_classes, gt_boxes = self.sample_proposals(proposals, targets)
            logits, deltas = self.predictor(self.box_features(features, boxes))
            return [], self.losses(logits, deltas, torch.cat(boxes), gt_classes, gt_boxes)
        logits, deltas = self.predictor(self.box_features(features, list(proposals)))
        with record_function("c4det.box_postprocess"):
            return self.inference(logits, deltas, proposals, image_sizes), {}

    def box_features(self, features: Tensor, boxes: list[Tensor]) -> Tensor:
        """(N, C4, H, W) map + per-image boxes -> (R, C5): pool, res5, average pool."""
        if self.res5_runner is not None:
            return self.res5_runner(features, boxes)
        with record_function("c4det.pool"):
            pooled = self._pool(features, boxes)
        with record_function("c4det.res5"):
            return self._res5(pooled)

    def _pool(self, features: Tensor, boxes: list[Tensor]) -> Tensor:
        """(N, C4, H, W) map + per-image boxes -> (R, C4, S, S)."""
        size = (self.pooler_resolution, self.pooler_resolution)
        if self.pooler == "roi_align":
            return roi_align(features, boxes, size, spatial_scale=self.spatial_scale,
                             sampling_ratio=0, aligned=True)
        return roi_pool(features, boxes, size, spatial_scale=self.spatial_scale)

    def _res5(self, pooled: Tensor) -> Tensor:
        """(R, C4, S, S) -> res5 (stride 2) -> global average pool -> (R, C5)."""
        return self.res5(pooled).mean(dim=(2, 3))

    @torch.no_grad()
    def sample_proposals(self, proposals: Sequence[Tensor], targets: Sequence[dict[str, Tensor]]
                         ) -> tuple[list[Tensor], Tensor, Tensor]:
        """Per image: append gt boxes, match at the IoU threshold, sample fg/bg.

        Returns sampled boxes per image, their classes (R,) (0 = bg) and matched gt boxes
        (R, 4) (meaningful for foreground only)."""
        boxes_out, classes_out, gt_out = [], [], []
        for props, target in zip(proposals, targets):
            gt_boxes, gt_labels = target["boxes"], target["labels"]
            boxes = torch.cat([props, gt_boxes.to(props.dtype)])  # gt appended: always a positive
            matched_idx, match_labels = self.matcher(box_iou(gt_boxes, boxes))  # (P,), (P,)
            classes = torch.zeros_like(matched_idx)
            if gt_boxes.numel():
                fg = match_labels == FOREGROUND
                classes[fg] = gt_labels[matched_idx[fg]].to(classes.dtype)
            classes[match_labels == IGNORE] = -1
            pos, neg = subsample_labels(classes, self.batch_size_per_image,
                                        self.positive_fraction, 0, self.generator)
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
        fg = (gt_classes > 0).nonzero().squeeze(1)  # (F,)
        fg_deltas = deltas.view(num_rois, self.num_classes, 4)[fg, gt_classes[fg] - 1]  # (F, 4)
        target = self.box_coder.encode(gt_boxes[fg], boxes[fg])
        loss_box = F.smooth_l1_loss(fg_deltas, target, beta=self.smooth_l1_beta, reduction="sum")
        return {"loss_cls": loss_cls, "loss_box": self.box_loss_weight * loss_box / num_rois}

    @torch.no_grad()
    def inference(self, logits: Tensor, deltas: Tensor, proposals: Sequence[Tensor],
                  image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Softmax, per-class decoding, clipping, score threshold, per-class NMS, top-k."""
        scores = F.softmax(logits, dim=-1)[:, 1:]  # (R, K+1) -> (R, K), background dropped
        boxes = self.box_coder.decode(deltas, torch.cat(list(proposals)))  # (R, 4K)
        boxes = boxes.view(-1, self.num_classes, 4)  # (R, 4K) -> (R, K, 4)
        counts = [len(p) for p in proposals]
        return [self._detect_image(b, s, size)
                for b, s, size in zip(boxes.split(counts), scores.split(counts), image_sizes)]

    def _detect_image(self, boxes: Tensor, scores: Tensor, image_size: tuple[int, int]
                      ) -> dict[str, Tensor]:
        """boxes (Ri, K, 4), scores (Ri, K) of one image -> its detections."""
        boxes = clip_boxes_to_image(boxes, image_size)
        keep = (scores > self.score_thresh_test) & torch.isfinite(boxes).all(dim=-1)  # (Ri, K)
        roi_idx, class_idx = keep.nonzero(as_tuple=True)
        boxes, scores = boxes[roi_idx, class_idx], scores[roi_idx, class_idx]
        labels = class_idx + 1
        keep = batched_nms(boxes, scores, labels, self.nms_thresh_test)[:self.detections_per_image]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
