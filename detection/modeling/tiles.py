"""Tiled ("sliced") inference for large images of small objects (config `test.tiles`; SAHI's
sliced prediction, which wraps Detectron2's and MMDetection's detectors for this).

An image larger than a tile is cut into tiles of `size` x `size` pixels of the image as given,
neighbours overlapping by `overlap` of a tile (the last row and column moved in to end at the
image's edge). Each tile goes through the detector as an image of its own, resized as any image
is (input.min_size_test): a tile of about min_size_test pixels keeps its objects at their size,
where the whole 4000x3000 image would be shrunk 5x and its 10 px objects with it. Each tile's
boxes are moved back to the image's pixels. A box touching a tile's edge where the image goes
on was cut there: it is dropped, the neighbouring tile holding the object whole (an object up
to overlap x size wide fits whole in some tile). With `full_image` the whole image also goes
through once, as without tiles (objects larger than that). All detections are merged by
per-class NMS at model.roi_heads.nms_thresh_test, the best detections_per_image kept.

Shapes: an image (3, H, W); T tiles of (3, <= size, <= size), run `batch` at a time; boxes
(D, 4) XYXY in the image's pixels.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from detection.utils.tiling import tile_windows

if TYPE_CHECKING:
    from detection.config import Config

EDGE_PIXELS = 2  # a box within this many pixels of a tile's inner edge was cut by it


def inner_detector(model: nn.Module) -> nn.Module:
    """The detector inside the inference wrappers (tiles, test-time augmentation): the one with roi_heads."""
    while not hasattr(model, "roi_heads") and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model
    return model


class DetectorWithTiles(nn.Module):
    """Wraps a detector (or its test-time augmentation) for inference only."""

    def __init__(self, model: nn.Module, size: int, overlap: float, full_image: bool = True, batch: int = 4) -> None:
        super().__init__()
        if size <= 0 or not 0 <= overlap < 1:
            raise ValueError(f"DetectorWithTiles: size {size} must be positive and overlap {overlap} in [0, 1)")
        self.model = model
        self.size, self.overlap, self.full_image, self.batch = int(size), float(overlap), bool(full_image), batch
        self.train(model.training)

    @property
    def class_names(self) -> list[str] | None:
        """The wrapped model's (what its labels mean), so a wrapped model reads like a bare one."""
        return self.model.class_names

    def forward(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        if self.training:
            raise RuntimeError("DetectorWithTiles is for inference; train the wrapped model")
        return [self.detect(image) for image in images]

    def detect(self, image: Tensor) -> dict[str, Tensor]:
        """One image's detections, tiled when it is larger than a tile."""
        height, width = int(image.shape[-2]), int(image.shape[-1])
        if height <= self.size and width <= self.size:
            return self.model([image])[0]
        windows = tile_windows(height, width, self.size, self.overlap)
        found = []
        for first in range(0, len(windows), self.batch):
            chunk = windows[first:first + self.batch]
            tiles = [image[..., y0:y1, x0:x1] for x0, y0, x1, y1 in chunk]
            for window, det in zip(chunk, self.model(tiles)):
                found.append(_whole_objects(det, window, height, width))
        if self.full_image:
            found.append(self._whole_image(image))
        heads = inner_detector(self.model).roi_heads
        merged = {key: torch.cat([det[key] for det in found]) for key in ("boxes", "scores", "labels")}
        keep = batched_nms(merged["boxes"], merged["scores"], merged["labels"], heads.nms_thresh_test)
        keep = keep[:heads.detections_per_image]
        return {key: value[keep] for key, value in merged.items()}

    def _whole_image(self, image: Tensor) -> dict[str, Tensor]:
        """The whole image's pass beside its tiles, without the model's warning that a panorama is
        squashed at its scale (which advises tiles: these are they; a trial found it said anyway)."""
        inner = inner_detector(self.model)
        told = getattr(inner, "told_squashed", None)
        if told is not None:
            inner.told_squashed = True
        try:
            return self.model([image])[0]
        finally:
            if told is not None:
                inner.told_squashed = told


def _whole_objects(det: dict[str, Tensor], window: tuple[int, int, int, int], height: int, width: int
                   ) -> dict[str, Tensor]:
    """A tile's detections in the image's pixels, without those its inner edges cut."""
    x0, y0, x1, y1 = window
    boxes = det["boxes"]
    cut = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    if x0 > 0:
        cut |= boxes[:, 0] <= EDGE_PIXELS
    if y0 > 0:
        cut |= boxes[:, 1] <= EDGE_PIXELS
    if x1 < width:
        cut |= boxes[:, 2] >= (x1 - x0) - EDGE_PIXELS
    if y1 < height:
        cut |= boxes[:, 3] >= (y1 - y0) - EDGE_PIXELS
    keep = ~cut
    shift = torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype, device=boxes.device)
    return {"boxes": boxes[keep] + shift, "scores": det["scores"][keep], "labels": det["labels"][keep]}


def build_tiles(cfg: Config, model: nn.Module) -> nn.Module:
    """The model wrapped in DetectorWithTiles when the config's test.tiles.size is set, else as is."""
    tiles = cfg.test.tiles
    if not tiles.size:
        return model
    return DetectorWithTiles(model, tiles.size, tiles.overlap, tiles.full_image)

