"""Shorter-side resizing: one rule for the size and one resampling function, used alike in
training (detection.data.transforms) and at test time (FasterRCNN.preprocess).

Size: the shorter side becomes min_size unless the longer side would then exceed max_size,
in which case the longer side becomes max_size; each side rounded as int(x + 0.5). This is
Detectron2's ResizeShortestEdge arithmetic, step for step, so that every rounding tie falls
the same way as there.

Resampling, always of the uint8 image before normalisation (`input.resize_mode`):
- "default": OpenCV, INTER_AREA when shrinking (it averages the source pixels each output
  pixel covers: no aliasing) and bilinear (INTER_LINEAR) when enlarging.
- "detectron2": PIL's bilinear filter, as Detectron2's ResizeShortestEdge. Loading a Detectron2
  model needs it to reproduce Detectron2's detections exactly.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported where used: the ONNX pre-processing needs no PyTorch
    from torch import Tensor

RESIZE_MODES = ("default", "detectron2")
# how far below min_size an image's shorter side may be shrunk (max_size capping its longer side)
# before the inference routes say so (squashed)
SQUASHED_FACTOR = 4


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(new_h, new_w) by the rule above."""
    scale = min_size * 1.0 / min(height, width)
    new_h, new_w = (min_size * 1.0, scale * width) if height < width else (scale * height, min_size * 1.0)
    if max(new_h, new_w) > max_size:
        scale = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def squashed(shape: tuple[int, int], min_size: int, max_size: int, tiles: bool = True) -> str | None:
    """What to tell about an image of `shape` (H, W) at test time when max_size caps its longer
    side so far that its shorter side ends under a quarter of min_size: a panorama (8000x300, WxH,
    at 600/1000: 1000x38) whose objects are then a few pixels high, and no detection says why
    (Detectron2's and torchvision's detectors resize it the same way, in silence). None when not.
    `tiles`: whether test.tiles can do the cutting (not for an exported model)."""
    height, width = int(shape[0]), int(shape[1])
    size = resized_shape(height, width, min_size, max_size)
    if min(size) * SQUASHED_FACTOR >= min_size:
        return None
    return (f"{width}x{height} (WxH): input.max_size_test {max_size} caps its longer side, so it is resized to "
            f"{size[1]}x{size[0]}, its shorter side {min(size)} px where input.min_size_test asks {min_size}: its "
            f"objects come out {min_size / min(size):.0f}x smaller than at that scale and may not be detected; cut "
            f"it into tiles whose longer side is at most {max_size / min_size:.3g}x their shorter side"
            + (" (test.tiles does at inference)" if tiles else "") + ", or raise input.max_size_test (said once)")


def resize_uint8(image: np.ndarray, size: tuple[int, int], mode: str = "default") -> np.ndarray:
    """(H, W, C) uint8 -> (h, w, C) uint8 by `mode`'s resampling (above); size is (h, w)."""
    if image.dtype != np.uint8:
        raise ValueError(f"resize_uint8: needs a uint8 image, got {image.dtype}")
    if mode == "detectron2":
        return np.array(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))  # writable copy
    shrink = size[0] < image.shape[0]
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_tensor(image: Tensor, size: tuple[int, int], mode: str = "default") -> Tensor:
    """(3, H, W) tensor of 0..255 values -> (3, h, w) uint8 in host memory, resized as
    resize_uint8 does (on the CPU: OpenCV's INTER_AREA is the data loader's resampling, so the
    test-time image is the training-time one). Float input is rounded to uint8 first. The caller
    moves the result (FasterRCNN.preprocess: as uint8, a quarter of float32's bytes); an image
    already on a GPU goes to the host and back, so give the model host images to resize."""
    import torch

    pixels = image.detach().cpu()
    if pixels.dtype != torch.uint8:
        pixels = pixels.round().clamp(0, 255).to(torch.uint8)
    out = resize_uint8(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()), size, mode)
    return torch.from_numpy(out).permute(2, 0, 1)  # (h, w, 3) -> (3, h, w)
