"""The one-image API, like Detectron2's DefaultPredictor.

    from detection.predictor import Predictor
    predictor = Predictor.from_config("configs/detectron2/faster_rcnn_R_50_C4_1x.yaml",
                                      weights="model_final_721ade.pkl")
    out = predictor("street.jpg")          # or an RGB uint8 (H, W, 3) numpy array
    out["boxes"], out["scores"], out["labels"], predictor.class_names[out["labels"][0] - 1]

Input convention: an image file path (read with OpenCV, any depth -> 8-bit RGB, turned by
its EXIF orientation tag as a photo app shows it unless input.exif_orientation: false), or an
RGB uint8 array (H, W, 3) with values 0..255. Note the channel order: OpenCV's cv2.imread
gives BGR; convert with cv2.cvtColor(img, cv2.COLOR_BGR2RGB) first. Float arrays are
refused: torchvision's float 0..1 convention would give wrong detections in silence.
The model resizes the image itself (input.min_size_test / max_size_test, input.resize_mode).

Output: {"boxes": float32 (N, 4) XYXY in the given image's pixels, "scores": (N,), "labels":
int64 (N,) in 1..K}, as CPU tensors, best first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from torch import Tensor

from detection.config import Config, load_config
from detection.engine.distributed import select_device
from detection.engine.loading import DetectorWeights, build_inference_model

ImageInput = Union[str, Path, np.ndarray]


class Predictor:
    """A detector ready for single images: fast path and test-time augmentation as the config says."""

    def __init__(self, cfg: Config, weights: Union[str, Path, DetectorWeights, None] = None,
                 device: str = "auto", explicit: Sequence[str] = ()) -> None:
        """explicit: config keys the caller set deliberately (they may differ from the
        settings a checkpoint of this project was trained with)."""
        weights = weights if weights is not None else cfg.model.weights
        if weights is None:
            raise ValueError("Predictor: no weights: pass weights=PATH or set model.weights in the config")
        self.cfg = cfg
        self.device = select_device(device, cfg.tf32)
        self.model, self.weights = build_inference_model(cfg, weights, self.device, explicit)
        names = self.weights.class_names or cfg.model.class_names
        self.class_names = list(names) if names else [f"class {i}" for i in range(1, cfg.model.num_classes + 1)]

    @classmethod
    def from_config(cls, config_path: Union[str, Path], weights: Union[str, Path, None] = None,
                    overrides: Sequence[str] = (), device: str = "auto") -> "Predictor":
        """Load the YAML config (with `key=value` overrides, as on the command line) and the weights."""
        keys = [item.split("=", 1)[0].strip() for item in overrides]
        return cls(load_config(config_path, list(overrides)), weights, device, explicit=keys)

    @torch.inference_mode()
    def __call__(self, image: ImageInput) -> dict[str, Tensor]:
        rgb = to_rgb_uint8(image, exif_orientation=self.cfg.input.exif_orientation)
        pixels = torch.from_numpy(rgb).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
        out = self.model([pixels.to(self.device)])[0]
        return {key: value.cpu() for key, value in out.items()}


def to_rgb_uint8(image: ImageInput, *, exif_orientation: bool = True) -> np.ndarray:
    """An image path (read as viewed: turned by its EXIF orientation tag unless
    exif_orientation is False) or an RGB uint8 (H, W, 3) array -> a contiguous RGB uint8 array."""
    if isinstance(image, (str, Path)):
        from detection.data.image_io import read_image

        return read_image(str(image), exif_orientation=exif_orientation)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"Predictor: expected an image path or a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"Predictor: the image must be RGB uint8 0..255, got dtype {image.dtype}"
                         + (" (for a float 0..1 image, pass (image * 255).round().astype(np.uint8))"
                            if image.dtype.kind == "f" else ""))
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"Predictor: the image must have shape (H, W, 3), got {image.shape}")
    return np.ascontiguousarray(image)
