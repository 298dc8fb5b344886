"""Small typed records shared by the detector's parts.

Shapes: N images, C channels, H x W (padded) pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def host_to_device(data: Tensor, device: torch.device | str) -> Tensor:
    """A CPU tensor on `device` without making the host wait for the GPU. On CUDA a copy from
    ordinary (pageable) host memory waits for all the work queued on the stream, as a read does;
    from pinned memory with non_blocking it is queued like a kernel (PyTorch's caching host
    allocator keeps the pinned copy until the transfer is done). Elsewhere (another target, or
    data not on the CPU) a plain `.to`."""
    if torch.device(device).type != "cuda" or data.device.type != "cpu":
        return data.to(device)
    return data.pin_memory().to(device, non_blocking=True)


class OtherLibraryNames:
    """A module mixin (before nn.Module in the bases) for the attribute names torchvision's or
    Detectron2's module of the same role has and this one names otherwise (`OTHER_NAMES`: name ->
    where it is here): reading one says where to look, and setting one is refused, where
    nn.Module made a new attribute that nothing reads (an internals trial: `model.rpn.score_thresh
    = 0.9` changed nothing, without a word)."""

    OTHER_NAMES: dict[str, str] = {}

    def _other_name(self, name: str) -> str:
        return (f"{type(self).__name__} has no {name!r} (torchvision's or Detectron2's name): "
                f"{type(self).OTHER_NAMES[name]}")

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # nn.Module's: parameters, buffers, submodules
        except AttributeError:
            if name not in type(self).OTHER_NAMES:
                raise
        raise AttributeError(self._other_name(name))

    def __setattr__(self, name: str, value) -> None:
        if name in type(self).OTHER_NAMES:
            raise AttributeError(self._other_name(name))
        super().__setattr__(name, value)


@dataclass
class ImageList:
    """A padded batch of images plus the size of each image before padding.

    `tensor` is (N, C, H, W); `image_sizes[i]` is (height, width) of image i inside it
    (top-left aligned). Boxes for image i live in that unpadded frame.
    """

    tensor: Tensor
    image_sizes: list[tuple[int, int]]

    @staticmethod
    def from_tensors(tensors: Sequence[Tensor], size_divisibility: int = 32,
                     pad_value: float = 0.0) -> "ImageList":
        """Pad (C, Hi, Wi) tensors at the bottom/right to a common size divisible by
        `size_divisibility`, so that stride-16/32 feature maps line up with pixels."""
        if len(tensors) == 0:
            raise ValueError("ImageList.from_tensors: need at least one image")
        image_sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
        max_h = max(h for h, _ in image_sizes)
        max_w = max(w for _, w in image_sizes)
        if size_divisibility > 1:
            max_h = -(-max_h // size_divisibility) * size_divisibility
            max_w = -(-max_w // size_divisibility) * size_divisibility
        padded = [F.pad(t, (0, max_w - t.shape[-1], 0, max_h - t.shape[-2]), value=pad_value)
                  for t in tensors]
        return ImageList(torch.stack(padded), image_sizes)
