"""Shorter-side resizing: one rule for the size, and the resampling of each `input.resize_mode`.

Size: the shorter side becomes min_size unless the longer side would then exceed max_size,
in which case the longer side becomes max_size; each side rounded as int(x + 0.5). This is
Detectron2's ResizeShortestEdge arithmetic, step for step, so that every rounding tie falls
the same way as there. Training and test use it alike.

Resampling:
- "default": training resizes the uint8 image with OpenCV (INTER_AREA when shrinking, against
  aliasing; bilinear when enlarging, detection.data.transforms); test time interpolates the
  normalised float image bilinearly (torch, on the model's device).
- "detectron2": PIL's bilinear filter on the uint8 image before normalisation, in training and
  at test time, as Detectron2's ResizeShortestEdge does. Loading a Detectron2 model needs it
  to reproduce Detectron2's detections: PIL's filter widens with the scale factor when
  shrinking, and rounds to uint8, unlike the float interpolation.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

RESIZE_MODES = ("default", "detectron2")


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(new_h, new_w) by the rule above."""
    scale = min_size * 1.0 / min(height, width)
    new_h, new_w = (min_size * 1.0, scale * width) if height < width else (scale * height, min_size * 1.0)
    if max(new_h, new_w) > max_size:
        scale = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def resize_uint8_pil(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 with PIL's bilinear filter; size is (h, w)."""
    if image.dtype != np.uint8:
        raise ValueError(f"resize_uint8_pil: needs a uint8 image, got {image.dtype}")
    return np.array(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))  # writable copy


def resize_tensor_pil(image: Tensor, size: tuple[int, int]) -> Tensor:
    """(3, H, W) tensor of 0..255 values -> (3, h, w) float32 on the same device, resized as
    Detectron2 does (uint8, PIL bilinear). Float input is rounded to uint8 first."""
    pixels = image.detach().cpu()
    if pixels.dtype != torch.uint8:
        pixels = pixels.round().clamp(0, 255).to(torch.uint8)
    out = resize_uint8_pil(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()), size)
    return torch.from_numpy(out).permute(2, 0, 1).to(image.device, torch.float32)  # (h, w, 3) -> (3, h, w)


def resize_tensor_bilinear(image: Tensor, size: tuple[int, int]) -> Tensor:
    """(C, H, W) float -> (C, h, w): bilinear, half-pixel centres, no antialiasing."""
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
