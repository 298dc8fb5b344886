"""Training transforms: shorter-side resize (detection.modeling.resize: the size rule and the
resampling that test time uses too) + flip / photometric jitter (albumentations).

The resize is not albumentations' because no albumentations transform does exactly
"shorter side = min_size, longer side <= max_size" (SmallestMaxSize ignores the
cap, LongestMaxSize upscales small images to the cap).
Boxes follow the image exactly: x *= new_w / w, y *= new_h / h with the rounded output size.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

# The import-time update check is a network call: off on offline machines and in every worker.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402

from detection.data import DataError  # noqa: E402
from detection.modeling.resize import RESIZE_MODES, resize_uint8, resized_shape  # noqa: E402,F401 (re-exported)

# input.min_size_train_sampling: one of the sizes listed, or any size between the two given
SIZE_SAMPLINGS = ("choice", "range")


def resize_shorter_side(img: np.ndarray, boxes: np.ndarray, min_size: int, max_size: int,
                        mode: str = "default") -> tuple[np.ndarray, np.ndarray]:
    """Resize img (H, W, C) and boxes float[N, 4] XYXY by the shorter-side rule of
    detection.modeling.resize, resampled by its resize_uint8; `mode` is input.resize_mode."""
    height, width = img.shape[:2]
    new_h, new_w = resized_shape(height, width, min_size, max_size)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if (new_h, new_w) == (height, width):
        return img, boxes.copy()
    out = resize_uint8(img, (new_h, new_w), mode)
    scale = np.array([new_w / width, new_h / height, new_w / width, new_h / height], dtype=np.float32)
    return out, boxes * scale


class TrainTransform:
    """Callable (img uint8[H,W,3], boxes float32[N,4], labels int64[N]) -> the same, transformed.

    One of `min_sizes` is picked per image (multi-scale training); with `sampling` "range",
    `min_sizes` is [smallest, largest] and each image's size is drawn uniformly from the
    integers between them, both included (Detectron2's ResizeShortestEdge "range"). Random
    state is owned by the transform; `set_seed` makes it reproducible (the training loader
    reseeds it before every sample from that sample's seed: TrainDataset.reseed).
    """

    def __init__(self, min_sizes: Sequence[int], max_size: int, hflip_prob: float, jitter: bool,
                 seed: int | None = None, resize_mode: str = "default", sampling: str = "choice") -> None:
        self.min_sizes = [int(s) for s in min_sizes]
        self.sampling = sampling
        self.resize_mode = resize_mode
        self.max_size = int(max_size)
        self.hflip_prob = float(hflip_prob)
        self.jitter = bool(jitter)
        self._albu = A.Compose(
            _albu_ops(self.hflip_prob, self.jitter),
            # min_area / min_visibility 0: a box is only ever removed when it becomes degenerate
            bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], min_area=0.0,
                                     min_visibility=0.0, clip=True),
        )
        self.set_seed(seed)

    def set_seed(self, seed: int | None) -> None:
        """Reseed the scale choice and the albumentations pipeline (independent streams)."""
        seq = np.random.SeedSequence(seed)
        scale_seed, albu_seed = (int(s) for s in seq.generate_state(2))
        self._rng = np.random.default_rng(scale_seed)
        self._albu.set_random_seed(albu_seed)

    def __call__(self, img: np.ndarray, boxes: np.ndarray,
                 labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        # albumentations rejects degenerate boxes, so they are removed first (the readers never emit any)
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, labels = boxes[valid], labels[valid]
        min_size = self.min_size()
        img, boxes = resize_shorter_side(img, boxes, min_size, self.max_size, self.resize_mode)
        out = self._albu(image=img, bboxes=boxes, labels=labels)
        out_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        out_labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        return np.ascontiguousarray(out["image"]), out_boxes, out_labels

    def min_size(self) -> int:
        """The next image's shorter side."""
        if self.sampling == "range":
            return int(self._rng.integers(self.min_sizes[0], self.min_sizes[1] + 1))
        return self.min_sizes[int(self._rng.integers(len(self.min_sizes)))]

    def __repr__(self) -> str:
        return (f"TrainTransform(min_sizes={self.min_sizes}, sampling={self.sampling!r}, max_size={self.max_size}, "
                f"hflip_prob={self.hflip_prob}, jitter={self.jitter}, resize_mode={self.resize_mode!r})")


def build_transforms(*, min_sizes: Sequence[int] | int, max_size: int, hflip_prob: float,
                     jitter: bool = False, seed: int | None = None, resize_mode: str = "default",
                     sampling: str = "choice") -> TrainTransform:
    """The training transform from the input.* settings (min_size_train, min_size_train_sampling,
    max_size_train, hflip_prob, jitter, resize_mode)."""
    sizes = [min_sizes] if isinstance(min_sizes, int) else list(min_sizes)
    if not sizes or any(int(s) <= 0 for s in sizes):
        raise DataError(f"input.min_size_train must be a non-empty list of positive sizes, got {min_sizes!r}")
    if sampling not in SIZE_SAMPLINGS:
        raise DataError(f"input.min_size_train_sampling must be {' or '.join(SIZE_SAMPLINGS)}, got {sampling!r}")
    if sampling == "range" and (len(sizes) != 2 or int(sizes[0]) > int(sizes[1])):
        raise DataError("input.min_size_train_sampling: range needs input.min_size_train as two sizes "
                        f"[smallest, largest], got {min_sizes!r}")
    if int(max_size) <= 0:
        raise DataError(f"input.max_size_train must be positive, got {max_size!r}")
    if not 0.0 <= float(hflip_prob) <= 1.0:
        raise DataError(f"input.hflip_prob must be in [0, 1], got {hflip_prob!r}")
    if resize_mode not in RESIZE_MODES:
        raise DataError(f"input.resize_mode must be one of {', '.join(RESIZE_MODES)}, got {resize_mode!r}")
    return TrainTransform(sizes, max_size, hflip_prob, jitter, seed=seed, resize_mode=resize_mode, sampling=sampling)


def build_train_transform(cfg: Any) -> TrainTransform:
    """The training transform of a detection.config.Config (its input.* settings)."""
    i = cfg.input
    return build_transforms(min_sizes=i.min_size_train, max_size=i.max_size_train, hflip_prob=i.hflip_prob,
                            jitter=i.jitter, resize_mode=i.resize_mode, sampling=i.min_size_train_sampling)


def _albu_ops(hflip_prob: float, jitter: bool) -> list:
    ops: list = [A.HorizontalFlip(p=hflip_prob)]
    if jitter:
        # mild: colour is informative for some classes, and boxes are unaffected
        ops.append(A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.8))
    return ops
