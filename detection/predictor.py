"""The one-image API, like Detectron2's DefaultPredictor.

    from detection.predictor import Predictor
    predictor = Predictor.from_config("configs/detectron2/faster_rcnn_R_50_C4_1x.yaml",
                                      weights="model_final_721ade.pkl")
    out = predictor("street.jpg")          # or an RGB uint8 (H, W, 3) numpy array, or a file's bytes
    out["boxes"], out["scores"], out["labels"], predictor.class_names[out["labels"][0] - 1]
    outs = predictor(["a.jpg", "b.jpg"])   # a list: one padded batch, a list of outputs

Input convention: an image file path or its bytes (an upload; decoded with OpenCV, any depth ->
8-bit RGB, turned by its EXIF orientation tag as a photo app shows it unless
input.exif_orientation: false), or a uint8
array (H, W, 3) with values 0..255 whose channel order is the Predictor's `input_format`:
"RGB" (the default) or "BGR" (what OpenCV's cv2.imread gives, and what Detectron2's
DefaultPredictor takes: `Predictor.from_config(..., input_format="BGR")`). It is the arrays'
order only: files are decoded to RGB, and the order the weights want (model.input_format) is
the model's own business. The two orders cannot be told apart from the pixels, hence an
argument rather than a warning. Float arrays are refused: torchvision's float 0..1 convention
would give wrong detections in silence. The model resizes the image itself
(input.min_size_test / max_size_test, input.resize_mode).

A list (or tuple) of images runs as one batch, padded to the largest resized image as in
training (ImageList); an image's detections can then differ from its own run (its padding is
larger: the trunk's border and the RPN's anchors see more zeros), most near its right and
bottom border and the more the list's sizes differ, without a bound (README: scores moved by
up to 0.024 on the Detectron2 fixture, a weak model's border detection by 0.27). Call it one
image at a time for detections that do not depend on the other images.

Output: {"boxes": float32 (N, 4) XYXY in the given image's pixels, "scores": (N,), "labels":
int64 (N,) in 1..K}, as CPU tensors, best first; for a list, a list of these.

A process forked after a Predictor was built (gunicorn --preload, multiprocessing's fork) runs
it with one torch thread: PyTorch's OpenMP threads, started in the parent (building the
Predictor already runs parallel ops), cannot run in a forked child (GNU libgomp: its first
parallel op hangs forever), as PyTorch's own DataLoader workers run with one thread. A child
that wants more threads must not be forked (multiprocessing's "spawn" builds its own).
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from collections.abc import Mapping
from typing import Sequence, Union

import numpy as np
import torch
from torch import Tensor

from detection.config import Config, ConfigError, checked_config, load_config
from detection.engine.distributed import DeviceError, select_device
from detection.engine.loading import DetectorWeights
from detection.engine.run_config import config_beside
from detection.engine.inference_model import build_inference_model
from detection.utils.images import rgb_uint8

ImageInput = Union[str, Path, bytes, np.ndarray]
INPUT_FORMATS = ("RGB", "BGR")


def _device(device: str | torch.device | None, cfg: Config) -> torch.device:
    """The Predictor's device argument, checked (anything but "cpu" and "auto" was taken as CUDA's
    first GPU: torch.device("cpu") and "mps" ran on the GPU, "cuda:1" on cuda:0; an API trial)."""
    if device is None:
        return select_device(cfg.device, cfg.tf32)
    found = re.fullmatch(r"(auto|cpu|cuda)(?::(\d+))?", str(device))
    if found is None or (found.group(2) is not None and found.group(1) != "cuda"):
        raise ValueError(f"Predictor: device must be 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device of those, "
                         f"got {device!r}")
    chosen = select_device(found.group(1), cfg.tf32)
    if found.group(2) is None:
        return chosen
    index, count = int(found.group(2)), torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"Predictor: device {str(device)!r}, but this machine has {count} GPU"
                          f"{'s' if count != 1 else ''} (cuda:0 .. cuda:{count - 1})")
    return torch.device("cuda", index)


def _current(device: torch.device) -> contextlib.AbstractContextManager:
    """`device` as CUDA's current device inside (cuda:1: what the current stream, CUDA graphs'
    capture and new allocations follow, not cuda:0); nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class Predictor:
    """A detector ready for single images: fast path and test-time augmentation as the config says."""

    def __init__(self, cfg: Config, weights: Union[str, Path, DetectorWeights, Mapping, torch.nn.Module, None] = None,
                 device: str | torch.device | None = None, explicit: Sequence[str] = (),
                 input_format: str = "RGB") -> None:
        """device: "auto", "cpu", "cuda", "cuda:N" or a torch.device of those; None takes the
        config's `device` (as Detectron2's DefaultPredictor takes MODEL.DEVICE). explicit: config keys
        the caller set deliberately (they may differ from the settings a checkpoint of this project
        was trained with).
        input_format: the channel order of the arrays you pass, "RGB" or "BGR" (cv2.imread's).
        weights: a checkpoint's path (default: the config's model.weights), or weights in memory: a
        state dict, a checkpoint dict ({"model": ..., "class_names": [...]}) or a trained model."""
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"Predictor: input_format must be 'RGB' or 'BGR' (the channel order of the arrays "
                             f"you pass; cv2.imread gives BGR), got {input_format!r}")
        self.input_format = input_format
        _one_thread_in_forked_children()
        self.cfg = cfg = checked_config(cfg, "the Config given to the Predictor")  # set in Python: checked
        weights = weights if weights is not None else cfg.model.weights
        if weights is None:
            raise ValueError("Predictor: no weights: pass weights=PATH or set model.weights in the config")
        self.device = _device(device, cfg)
        with _current(self.device):
            self.model, self.weights = build_inference_model(cfg, weights, self.device, explicit)
        names = self.weights.class_names or cfg.model.class_names
        self.class_names = list(names) if names else [f"class {i}" for i in range(1, cfg.model.num_classes + 1)]

    @classmethod
    def from_config(cls, config_path: Union[str, Path, None], weights: Union[str, Path, None] = None,
                    overrides: Sequence[str] = (), device: str | torch.device | None = None,
                    input_format: str = "RGB") -> "Predictor":
        """Load the YAML config (with `key=value` overrides, as on the command line) and the weights.
        config_path None: the config.yaml training saved beside `weights`, as the tools take it."""
        if config_path is None:
            config_path = _config_beside(weights)
        from detection.cli import lower_case_key

        from detection.config import override_keys_of

        overrides = [lower_case_key(item) for item in overrides]  # MODEL.X=v as the tools read it
        keys = override_keys_of(overrides)
        return cls(load_config(config_path, list(overrides)), weights, device, explicit=keys,
                   input_format=input_format)

    @torch.no_grad()  # not inference_mode: its tensors refuse a caller's in-place `out["boxes"] *= s`
    def __call__(self, image: Union[ImageInput, Sequence[ImageInput]]
                 ) -> Union[dict[str, Tensor], list[dict[str, Tensor]]]:
        """One image -> its detections; a list or tuple of images -> a list, run as one batch."""
        if isinstance(image, (list, tuple)):
            return self._run(list(image)) if image else []
        return self._run([image])[0]

    def _run(self, images: list[ImageInput]) -> list[dict[str, Tensor]]:
        # (H, W, 3) -> (3, H, W), in host memory: the model resizes a photo there and moves it to
        # its device at the size it runs at (a photo sent to the GPU first would come back to be resized)
        pixels = [torch.from_numpy(self._rgb(image)).permute(2, 0, 1) for image in images]
        with _current(self.device):
            return [{key: value.cpu() for key, value in out.items()} for out in self.model(pixels)]

    def _rgb(self, image: ImageInput) -> np.ndarray:
        rgb = to_rgb_uint8(image, exif_orientation=self.cfg.input.exif_orientation)
        if self.input_format == "BGR" and isinstance(image, np.ndarray):  # files and bytes are decoded to RGB
            rgb = np.ascontiguousarray(rgb[:, :, ::-1])
        return rgb


def to_rgb_uint8(image: ImageInput, *, exif_orientation: bool = True) -> np.ndarray:
    """An image path or an image file's bytes (an upload; read as viewed: turned by its EXIF
    orientation tag unless exif_orientation is False) or an RGB uint8 (H, W, 3) array -> a
    contiguous, writable RGB uint8 array. Anything else is one error saying how to pass it."""
    if isinstance(image, (str, Path)):
        from detection.data.image_io import read_image

        return read_image(str(image), exif_orientation=exif_orientation)
    if isinstance(image, (bytes, bytearray, memoryview)):
        from detection.data.image_io import decode_image

        return decode_image(image, exif_orientation=exif_orientation)
    return rgb_uint8(image, "Predictor", accepted="an image path, an image file's bytes or a numpy array")


def _config_beside(weights: Union[str, Path, None]) -> Path:
    if weights is None:
        raise ConfigError("Predictor.from_config: no config_path and no weights to find the config.yaml of")
    saved = config_beside(weights)
    if not saved.is_file():
        raise ConfigError(f"Predictor.from_config: no config_path, and no {saved} (the config.yaml training "
                          f"writes beside its checkpoints): pass the YAML config {weights} was trained with "
                          "(configs/detectron2/<its name>.yaml for a Detectron2 model-zoo file)")
    return saved


_FORK_HOOK: list[bool] = []  # registered once per process


def _one_thread_in_forked_children() -> None:
    """torch.set_num_threads(1) in every process forked from this one from now on (the module
    docstring says why: a forked child's first parallel op hung forever, found serving a
    preloaded Predictor)."""
    if not _FORK_HOOK and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=lambda: torch.set_num_threads(1))
        _FORK_HOOK.append(True)
