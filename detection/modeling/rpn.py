"""Region proposal network on the C4 map (Ren et al., Faster R-CNN).

Shapes: N images, C channels, H x W feature cells, A anchors per cell,
M = H*W*A anchors per image, k proposals kept per image.

Losses (Detectron2's normalization): binary cross-entropy over the sampled anchors and a
smooth-L1 box loss over the sampled positives, both summed and divided by
batch_size_per_image * N (the number of anchors that *would* be sampled), so an image with
few positives does not get its box loss inflated. `smooth_l1_beta=0` (default, Detectron2's
C4 setting) makes the box loss plain L1; 1/9 is the value of the original Faster R-CNN code.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, clip_boxes_to_image, nms

from detection.modeling.anchors import AnchorGenerator
from detection.modeling.box_coder import BoxCoder
from detection.modeling.precision import float32
from detection.modeling.matcher import Matcher
from detection.modeling.sampling import check_sampling, subsample_batch
from detection.modeling.structures import OtherLibraryNames


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 convs for A objectness logits and 4A anchor deltas."""

    def __init__(self, in_channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):  # Faster R-CNN's and Detectron2's init
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0.0)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(N, C, H, W) -> objectness logits (N, M) and deltas (N, M, 4), anchor order of
        AnchorGenerator (location-major)."""
        return self.outputs(F.relu(self.conv(features)))

    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The output layers on the 3x3 conv's activations."""
        with float32(x):  # the output layers in float32 under autocast (detection/modeling/precision.py)
            x = x.float()
            logits = self.objectness_logits(x)  # (N, A, H, W)
            deltas = self.anchor_deltas(x)  # (N, A*4, H, W)
        n, a, h, w = logits.shape
        logits = logits.permute(0, 2, 3, 1).reshape(n, h * w * a)  # (N, A, H, W) -> (N, H*W*A)
        deltas = deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, h * w * a, 4)
        # (N, A*4, H, W) -> (N, A, 4, H, W) -> (N, H, W, A, 4) -> (N, H*W*A, 4)
        return logits.float(), deltas.float()  # float32 under autocast: decoding and losses


class RPN(OtherLibraryNames, nn.Module):
    """Anchors + head + training targets/losses + proposal selection."""

    OTHER_NAMES = {  # torchvision's RegionProposalNetwork and Detectron2's RPN name these otherwise
        "score_thresh": "no score threshold on proposals here (torchvision's default 0.0 keeps them all): "
                        "pre_nms_topk, nms_thresh and post_nms_topk select them",
        "_pre_nms_top_n": "pre_nms_topk, a dict {True: training, False: test}",
        "_post_nms_top_n": "post_nms_topk, a dict {True: training, False: test}",
        "min_box_size": "min_size (input pixels of the resized image)",
        "pre_nms_top_n": "pre_nms_topk, a dict {True: training, False: test}",
        "post_nms_top_n": "post_nms_topk, a dict {True: training, False: test}",
        "rpn_head": "head", "proposal_matcher": "matcher (Matcher of iou_thresholds)",
        "anchor_matcher": "matcher (Matcher of iou_thresholds)", "box2box_transform": "box_coder",
        "loss_weight": "none: the RPN's two losses count 1.0 each (Detectron2's default)",
        "fg_bg_sampler": "batch_size_per_image and positive_fraction (detection.modeling.sampling)",
        "anchor_boundary_thresh": "none: anchors crossing the image border are kept in training (README, "
                                  "\"Not yet done\")",
    }

    def __init__(self, *, in_channels: int, anchor_generator: AnchorGenerator,
                 iou_thresholds: Sequence[float] = (0.3, 0.7), batch_size_per_image: int = 256,
                 positive_fraction: float = 0.5, pre_nms_topk_train: int = 12000,
                 post_nms_topk_train: int = 2000, pre_nms_topk_test: int = 6000,
                 post_nms_topk_test: int = 300, nms_thresh: float = 0.7, min_size: float = 0.0,
                 smooth_l1_beta: float = 0.0) -> None:
        super().__init__()
        check_sampling("RPN", batch_size_per_image, positive_fraction)
        self.anchor_generator = anchor_generator
        self.head = RPNHead(in_channels, anchor_generator.num_anchors)
        self.matcher = Matcher(iou_thresholds, allow_low_quality_matches=True)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.pre_nms_topk = {True: pre_nms_topk_train, False: pre_nms_topk_test}
        self.post_nms_topk = {True: post_nms_topk_train, False: post_nms_topk_test}
        self.nms_thresh = nms_thresh
        self.min_size = min_size
        self.smooth_l1_beta = smooth_l1_beta
        self.sync_free = False  # accel.sync_free_postprocess: detection/modeling/syncfree.py (set by detection.accel)

    def forward(self, features: Tensor, image_sizes: Sequence[tuple[int, int]],
                gt_boxes: Sequence[Tensor] | None = None
                ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """features (N, C, H, W) of the padded batch; image_sizes (h, w) per image;
        gt_boxes (Gi, 4) per image, required in training.

        Returns per-image proposals (ki, 4) (detached, sorted by objectness) and, in
        training, {"loss_rpn_cls", "loss_rpn_box"} (else {})."""
        anchors = self.anchor_generator(features)  # (M, 4)
        logits, deltas = self.head(features)  # (N, M), (N, M, 4)
        proposals = self.select_proposals(anchors, logits.detach(), deltas.detach(), image_sizes)
        losses: dict[str, Tensor] = {}
        if self.training:
            if gt_boxes is None:
                raise ValueError("RPN: gt_boxes are required in training mode")
            labels, matched_gt = self.label_anchors(anchors, gt_boxes)
            losses = self.losses(anchors, logits, deltas, labels, matched_gt)
        return proposals, losses

    @torch.no_grad()
    def label_anchors(self, anchors: Tensor, gt_boxes: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Sampled labels (N, M) in {-1 unused, 0 bg, 1 fg} and matched gt boxes (N, M, 4)."""
        # matching is per image (everything inside is batched over anchors), sampling per batch
        matches = [self.matcher(box_iou(gt, anchors)) for gt in gt_boxes]  # per image (M,), (M,)
        samples = subsample_batch([match_labels for _, match_labels in matches], self.batch_size_per_image,
                                  self.positive_fraction)  # the global generator: its state is in last.pth
        all_labels, all_matched = [], []
        for gt, (matched_idx, match_labels), (pos, neg) in zip(gt_boxes, matches, samples):
            labels = torch.full_like(match_labels, -1, dtype=torch.int64)
            labels[pos] = 1
            labels[neg] = 0
            all_labels.append(labels)
            # Without gt there are no positives, so any finite placeholder target works.
            all_matched.append(gt[matched_idx] if gt.numel() else torch.zeros_like(anchors))
        return torch.stack(all_labels), torch.stack(all_matched)

    def losses(self, anchors: Tensor, logits: Tensor, deltas: Tensor, labels: Tensor,
               matched_gt: Tensor) -> dict[str, Tensor]:
        """Objectness BCE over sampled anchors, box loss over sampled positives; both
        divided by batch_size_per_image * N."""
        normalizer = float(self.batch_size_per_image * labels.shape[0])
        # Both losses as masks over all anchors, not boolean indexing (a host read each, and
        # one more each in the backward): unsampled anchors weigh 0 in the BCE; the box loss
        # takes zeros on both sides off the positives (a target there may be inf: never used).
        valid, positive = labels >= 0, labels == 1  # (N, M) each
        loss_cls = F.binary_cross_entropy_with_logits(
            logits, positive.to(logits.dtype), weight=valid.to(logits.dtype), reduction="sum")
        positive = positive.unsqueeze(-1)  # (N, M, 1)
        target = self.box_coder.encode(matched_gt, anchors.unsqueeze(0).expand_as(matched_gt))  # (N, M, 4)
        target = torch.where(positive, target, torch.zeros((), dtype=target.dtype, device=target.device))
        deltas = torch.where(positive, deltas, torch.zeros((), dtype=deltas.dtype, device=deltas.device))
        loss_box = F.smooth_l1_loss(deltas, target, beta=self.smooth_l1_beta, reduction="sum")
        return {"loss_rpn_cls": loss_cls / normalizer, "loss_rpn_box": loss_box / normalizer}

    @torch.no_grad()
    def select_proposals(self, anchors: Tensor, logits: Tensor, deltas: Tensor,
                         image_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Per image: top pre-NMS-k anchors by objectness, decode, clip, drop small and
        non-finite boxes, NMS, keep the post-NMS top k. Traceable: `image_sizes` may hold
        int64 (2,) tensors (FasterRCNN.preprocess while tracing)."""
        num_images = logits.shape[0]
        k = topk_size(self.pre_nms_topk[self.training], logits, 1)
        top_logits, top_idx = logits.topk(k, dim=1)  # (N, k), sorted
        batch_idx = torch.arange(num_images, device=logits.device).unsqueeze(1)  # (N, 1)
        boxes = self.box_coder.decode(deltas[batch_idx, top_idx], anchors[top_idx])  # (N, k, 4)
        post_k = self.post_nms_topk[self.training]
        if self.sync_free and not torch.jit.is_tracing():
            from detection.modeling import syncfree  # imports this module: imported where used

            return syncfree.select_proposals(boxes, top_logits, image_sizes, min_size=self.min_size,
                                             nms_thresh=self.nms_thresh, post_k=post_k)
        proposals = []
        for boxes_i, logits_i, size in zip(boxes, top_logits, image_sizes):
            boxes_i = clip_boxes(boxes_i, size)
            # one nonzero (a host read on CUDA) for all the filters
            keep = region_mask(boxes_i, logits_i, self.min_size).nonzero().squeeze(1)
            boxes_i, logits_i = boxes_i[keep], logits_i[keep]
            keep = first_nms_survivors(boxes_i, logits_i, self.nms_thresh, post_k)
            proposals.append(boxes_i[keep])
        return proposals


def region_mask(boxes: Tensor, scores: Tensor, min_size: float) -> Tensor:
    """(..., 4) clipped boxes, (...) scores -> (...) True where the box is a region: at least
    min_size wide and high (torchvision's remove_small_boxes), non-empty (an anchor entirely
    outside the image clips to a zero-area box), finite, with a finite score."""
    widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    return ((widths >= min_size) & (heights >= min_size) & (boxes[..., 2] > boxes[..., 0])
            & (boxes[..., 3] > boxes[..., 1]) & torch.isfinite(boxes).all(dim=-1) & torch.isfinite(scores))


def first_nms_survivors(boxes: Tensor, scores: Tensor, iou_threshold: float, k: int) -> Tensor:
    """nms(boxes, scores, iou_threshold)[:k] for scores sorted from high to low, computed on as
    few of the first boxes as give k survivors. Greedy NMS keeps a box unless a kept box scored
    above it overlaps it, so the survivors among the first m boxes are the first of all the
    survivors: when m boxes give k, they are the k. Tries m = 2k, 4k, ... up to all of them
    (the demo's test: 200 of up to 3000 boxes; COCO's training: 2000 of 12000). While tracing,
    NMS over all of them: the loop's test would be frozen at the traced image's counts."""
    if torch.jit.is_tracing():
        return nms(boxes, scores, iou_threshold)[:k]
    m = 2 * k
    while True:
        keep = nms(boxes[:m], scores[:m], iou_threshold)
        if len(keep) >= k or m >= len(boxes):
            return keep[:k]
        m *= 2


def topk_size(k: int, x: Tensor, dim: int) -> int | Tensor:
    """min(k, x.shape[dim]); while tracing a tensor op, so that the graph takes the bound from
    the input's size instead of the traced one (torchvision's _topk_min)."""
    if not torch.jit.is_tracing():
        return min(k, x.shape[dim])
    size = torch._shape_as_tensor(x)[dim].unsqueeze(0)
    return torch.min(torch.cat([torch.tensor([k], dtype=size.dtype, device=size.device), size]))


def clip_boxes(boxes: Tensor, size: tuple[int, int] | Tensor) -> Tensor:
    """Boxes (..., 4) clipped to the image: x in [0, W], y in [0, H]. `size` (H, W): ints, or
    an int64 (2,) tensor while tracing, which keeps the limits dynamic in the graph."""
    if not isinstance(size, Tensor):
        return clip_boxes_to_image(boxes, size)
    limits = size.flip(0).repeat(2).to(boxes.dtype)  # (H, W) -> (4,): W, H, W, H
    return torch.minimum(boxes.clamp(min=0), limits)
