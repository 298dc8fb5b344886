"""Pretrained weights for backbones.resnet.ResNet, from three sources:

- "torchvision:<NAME>" (e.g. "torchvision:IMAGENET1K_V1"): torchvision's ImageNet
  weights for the model's depth, resolved through torchvision's weights API and read
  from the torch hub cache. Nothing is ever downloaded: a missing file is a
  WeightsError saying which file to fetch and where to put it.
- a local torchvision-format state dict (any suffix but .pkl/.pickle), read with
  torch.load(weights_only=True).
- a Caffe2/Detectron pickle ("R-50.pkl", suffix .pkl/.pickle): the MSRA models of the
  paper, read with a restricted unpickler (backbones.pickle_io).

Each source brings its preprocessing (pixel mean/std in 0..255 units and the channel
order), returned in WeightsInfo so the detector normalises its input to match.

Caffe2 files hold only a norm's scale `_bn_s` and shift `_bn_b`: y = s * x + b. They
load as weight/bias with running_mean 0 and running_var 1; FrozenBatchNorm2d then
computes weight / sqrt(1 + eps), so its eps is set to 0 for those layers to keep
y = s * x + b exactly. Trainable nn.BatchNorm2d keeps its eps (a zero eps could
divide by zero in training) and gets running_var = 1 - eps instead.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from backbones.errors import NULL_LOOKALIKES, WeightsError
from backbones.keymap import CAFFE2_RULES, TORCHVISION_RULES, Rule, map_keys
from backbones.pickle_io import load_numpy_pickle

__all__ = ["WeightsError", "WeightsInfo", "load_weights", "torchvision_weights_path"]

logger = logging.getLogger(__name__)

# Preprocessing per weight source, in 0..255 pixel units.
IMAGENET_RGB_MEAN = (123.675, 116.28, 103.53)  # torchvision: 255 * (0.485, 0.456, 0.406)
IMAGENET_RGB_STD = (58.395, 57.12, 57.375)  # 255 * (0.229, 0.224, 0.225)
MSRA_BGR_MEAN = (103.53, 116.28, 123.675)  # the MSRA Caffe models: BGR, mean only
MSRA_BGR_STD = (1.0, 1.0, 1.0)
CAFFE2_SUFFIXES = (".pkl", ".pickle")
# Where Detectron publishes MSRA's ImageNet models (the configs/paper/ headers name these), by file name
MSRA_DOWNLOADS = {name: f"https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/MSRA/{name}"
                  for name in ("R-50.pkl", "R-101.pkl")}


@dataclass
class WeightsInfo:
    """What was loaded from where, and the input the weights expect."""

    source: str  # as given to load_weights
    path: str  # the file that was read
    format: str  # "torchvision" | "caffe2"
    pixel_mean: tuple[float, float, float]  # 0..255 units, in input_format channel order
    pixel_std: tuple[float, float, float]
    input_format: str  # "RGB" | "BGR"
    stride_in_1x1: bool  # where the bottleneck stride sat when the weights were trained
    loaded_keys: list[str] = field(default_factory=list)  # our names
    missing_keys: list[str] = field(default_factory=list)  # our names the file did not provide
    unexpected_keys: list[str] = field(default_factory=list)  # file names with no place in the model
    ignored_keys: list[str] = field(default_factory=list)  # file names dropped on purpose (fc, ...)


def load_weights(model: nn.Module, source: str | os.PathLike[str], *, allow_partial: bool = False,
                 ) -> WeightsInfo:
    """Load `source` into `model` (a backbones ResNet; `model.depth` picks torchvision's
    file, `model.norm` is checked against the file's norm). A shape mismatch raises
    WeightsError naming the key. So does a partial load (model tensors the file lacks, or
    file tensors with no place in the model, e.g. R-50 weights into a ResNet-101), unless
    `allow_partial`: then the model keeps its initial values there, with a warning."""
    info, tensors, non_arrays = _read_source(model, os.fspath(source))
    caffe2 = info.format == "caffe2"
    _check_norm(model, "gn" if caffe2 and any("_gn_" in name for name in tensors) else "bn", info.path)
    state = _match(model, tensors, CAFFE2_RULES if caffe2 else TORCHVISION_RULES, info)
    if caffe2:
        info.ignored_keys += non_arrays  # e.g. a Detectron "cfg" string
        state.update(_caffe2_statistics(model, state))
    _finish(model, state, info, allow_partial)
    return info


def _read_source(model: nn.Module, source: str) -> tuple[WeightsInfo, dict[str, Tensor], list[str]]:
    """-> (WeightsInfo without keys yet, the file's tensors by their own names, names of
    entries that are not tensors)."""
    if source.startswith("torchvision:"):
        path, mean, std = _resolve_torchvision(model, source.split(":", 1)[1])
        info = WeightsInfo(source, str(path), "torchvision", mean, std, "RGB", stride_in_1x1=False)
        return info, _read_state_dict(path), []
    path = Path(source).expanduser()
    if not path.is_file():
        raise WeightsError(_missing_file_message(path))
    if path.suffix.lower() in CAFFE2_SUFFIXES:
        info = WeightsInfo(source, str(path), "caffe2", MSRA_BGR_MEAN, MSRA_BGR_STD, "BGR",
                           stride_in_1x1=True)
        return info, *_read_caffe2(path)
    info = WeightsInfo(source, str(path), "torchvision", IMAGENET_RGB_MEAN, IMAGENET_RGB_STD, "RGB",
                       stride_in_1x1=False)
    return info, _read_state_dict(path), []


def _missing_file_message(path: Path) -> str:
    """Says where a relative path was looked for (a config's pretrained/R-101.pkl is relative to
    the working directory, not to the config) and, for an MSRA model, where to download it."""
    message = f"weights file {path} does not exist"
    if not path.is_absolute():
        message += f" (a relative path is taken from the working directory: {Path.cwd() / path})"
    if path.name in MSRA_DOWNLOADS:
        message += f"; download it from {MSRA_DOWNLOADS[path.name]} to that path (or give the path of a copy)"
    if str(path) in NULL_LOOKALIKES:
        message += "; for no weights YAML writes null (model.backbone.weights=null)"
    return message


def torchvision_weights_path(depth: int, name: str) -> tuple[Path, str]:
    """(where torchvision's resnet{depth} weights `name` live in the torch hub cache, their URL)."""
    weights = _torchvision_enum(depth, name)
    filename = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename, weights.url


def _torchvision_enum(depth: int, name: str) -> Any:
    try:
        enum = torchvision.models.get_model_weights(f"resnet{depth}")
    except (KeyError, ValueError) as error:
        raise WeightsError(f"torchvision has no weights for resnet{depth}: {error}") from error
    weights = enum.__members__.get(name.removeprefix(enum.__name__ + "."))
    if weights is None:
        raise WeightsError(f"torchvision has no resnet{depth} weights named {name!r}; "
                           f"choose one of {list(enum.__members__)}")
    return weights


def _resolve_torchvision(model: nn.Module, name: str) -> tuple[Path, tuple, tuple]:
    depth = getattr(model, "depth", None)
    if depth is None:
        raise WeightsError("torchvision weights need a model with a `depth` attribute (a backbones ResNet)")
    path, url = torchvision_weights_path(depth, name)
    if not path.is_file():
        raise WeightsError(f"torchvision weights {name} for ResNet-{depth} are not in the torch hub cache "
                           f"and nothing is downloaded here: download {url} and put it at {path}")
    transform = _torchvision_enum(depth, name).transforms()
    mean = tuple(round(255 * v, 4) for v in getattr(transform, "mean", np.divide(IMAGENET_RGB_MEAN, 255)))
    std = tuple(round(255 * v, 4) for v in getattr(transform, "std", np.divide(IMAGENET_RGB_STD, 255)))
    return path, mean, std


def zip_damage(path: str | os.PathLike) -> str | None:
    """Why the zip file at `path` (torch.save's format) is damaged, None when it is whole or not
    a zip. torch.load does not check the CRC-32 its zip format stores for each record, so a bit
    flipped on a disk or in a copy loads as a wrong weight; zipfile checks them (about 1 GB/s)."""
    import zipfile

    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return None  # not a zip (an old or foreign file): its reader judges it
    try:
        with zipfile.ZipFile(path) as archive:
            # checked from the directory before a byte is inflated: testzip inflates every record (a
            # 2 MB file of one deflated record took 17 s to refuse; overlapping records, far longer)
            records = archive.infolist()
            if sum(r.compress_size for r in records) > os.path.getsize(path):
                return "its records overlap (their sizes add up to more than the file): not torch.save's zip"
            for r in records:
                if r.compress_type != zipfile.ZIP_STORED and r.file_size > 20 * r.compress_size + (1 << 20):
                    return (f"its record {r.filename} inflates {r.compress_size} bytes to {r.file_size} (torch.save "
                            "stores its records uncompressed): not read")
            damaged = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, RuntimeError) as err:
        return f"cut short or corrupt: {err}"
    if damaged is not None:
        return f"the bytes of its record {damaged} do not match their stored checksum (a disk or copy error)"
    return None


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    damage = zip_damage(path)
    if damage:
        raise WeightsError(f"{path}: damaged weights ({damage})")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, or a pickle weights_only refuses
        raise WeightsError(f"cannot read {path} with torch.load(weights_only=True): {error}") from error
    # Training checkpoints wrap the state dict: {"model": {...}, "epoch": ...}.
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping):
        raise WeightsError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    # DataParallel/DistributedDataParallel prefix every name with "module.".
    return {str(k).removeprefix("module."): v for k, v in loaded.items() if isinstance(v, Tensor)}


def _read_caffe2(path: Path) -> tuple[dict[str, Tensor], list[str]]:
    """-> (numeric arrays as tensors, names of the entries that are not numeric arrays)."""
    blobs = load_numpy_pickle(path)
    if isinstance(blobs, Mapping) and isinstance(blobs.get("blobs"), Mapping):
        blobs = blobs["blobs"]  # Detectron checkpoints: {"blobs": {...}, "cfg": "..."}
    elif isinstance(blobs, Mapping) and isinstance(blobs.get("model"), Mapping):
        blobs = blobs["model"]  # a Detectron2 model-zoo detector: its names tell (_match's error)
    if not isinstance(blobs, Mapping):
        raise WeightsError(f"{path} holds a {type(blobs).__name__}, not a dict of numpy arrays")
    tensors, others = {}, []
    for name, value in blobs.items():
        if isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
            dtype = np.float32 if value.dtype.kind == "f" else value.dtype
            tensors[str(name)] = torch.from_numpy(np.ascontiguousarray(value, dtype=dtype))
        else:
            others.append(str(name))
    return tensors, others


def _check_norm(model: nn.Module, source_norm: str, path: str) -> None:
    model_norm = getattr(model, "norm", None)
    if model_norm is not None and (model_norm == "gn") != (source_norm == "gn"):
        file_norm = "GroupNorm" if source_norm == "gn" else "BatchNorm"
        raise WeightsError(f"{path} holds {file_norm} parameters, which do not fit a model built with "
                           f"norm={model_norm!r}")


def _match(model: nn.Module, tensors: dict[str, Tensor], rules: list[Rule], info: WeightsInfo,
           ) -> dict[str, Tensor]:
    """Rename the file's tensors to ours, check shapes; fills info's unexpected/ignored."""
    path = info.path
    ours_to_theirs, info.ignored_keys, info.unexpected_keys = map_keys(list(tensors), rules)
    own = model.state_dict()
    state = {}
    for ours, theirs in ours_to_theirs.items():
        if ours not in own:
            # FrozenBatchNorm2d keeps no batch counter; that is bookkeeping, not a weight.
            if not ours.endswith("num_batches_tracked"):
                info.unexpected_keys.append(theirs)
            continue
        if tuple(tensors[theirs].shape) != tuple(own[ours].shape):
            raise WeightsError(f"{path}: {theirs} has shape {tuple(tensors[theirs].shape)} but the model's "
                               f"{ours} has shape {tuple(own[ours].shape)}")
        state[ours] = tensors[theirs]
    if not state:
        detector = any(name.startswith(("backbone.", "roi_heads.", "proposal_generator.", "trunk.", "rpn."))
                       for name in tensors)
        hint = (": it holds a whole detector (Detectron2's or this project's); give it as model.weights, which "
                "loads a detector, not as model.backbone.weights") if detector else \
            f": it is not a {info.format}-format ResNet"
        raise WeightsError(f"no tensor in {path} matches the model{hint}")
    return state


def _caffe2_statistics(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Running statistics for the norms whose Caffe2 scale/shift were loaded without
    them, so that the norm computes exactly scale * x + shift (module docstring)."""
    extra = {}
    for name, module in model.named_modules():
        if not isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d)) or f"{name}.weight" not in state:
            continue
        channels = module.running_mean.shape
        if f"{name}.running_mean" not in state:
            extra[f"{name}.running_mean"] = torch.zeros(channels, device="cpu")  # as the file's
        if f"{name}.running_var" not in state:
            if isinstance(module, FrozenBatchNorm2d):
                module.eps = 0.0
            extra[f"{name}.running_var"] = torch.full(channels, 1.0 - module.eps, device="cpu")
    return extra


def _finish(model: nn.Module, state: dict[str, Tensor], info: WeightsInfo, allow_partial: bool) -> None:
    own = model.state_dict()
    info.loaded_keys = sorted(state)
    info.missing_keys = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if not allow_partial and (info.missing_keys or info.unexpected_keys):
        # Checked before loading: a refused file leaves the model untouched.
        raise WeightsError(_partial_message(model, info))
    model.load_state_dict(state, strict=False)
    logger.info("loaded %d tensors from %s (%s weights)", len(state), info.path, info.format)
    if info.missing_keys:
        logger.warning("%d model tensors not in %s, left at their initial values: %s",
                       len(info.missing_keys), info.path, _shorten(info.missing_keys))
    if info.unexpected_keys:
        logger.warning("%d tensors of %s have no place in the model: %s",
                       len(info.unexpected_keys), info.path, _shorten(info.unexpected_keys))
    model_stride = getattr(model, "stride_in_1x1", info.stride_in_1x1)
    if getattr(model, "depth", 0) >= 50 and model_stride != info.stride_in_1x1:
        logger.warning("%s was trained with stride_in_1x1=%s but the model uses %s",
                       info.path, info.stride_in_1x1, model_stride)


def _partial_message(model: nn.Module, info: WeightsInfo) -> str:
    """One line: what does not fit, and the switch that accepts it."""
    depth = getattr(model, "depth", None)
    target = f"the ResNet-{depth}" if depth else "the model"
    parts = []
    if info.missing_keys:
        parts.append(f"{len(info.missing_keys)} tensors of {target} are not in the file "
                     f"({_shorten(info.missing_keys, 4)})")
    if info.unexpected_keys:
        parts.append(f"{len(info.unexpected_keys)} tensors of the file have no place in {target} "
                     f"({_shorten(info.unexpected_keys, 4)})")
    return (f"{info.path} does not fit {target}: {'; '.join(parts)}. Weights of another depth or "
            "shortcut option? To load the matching part anyway, leaving the rest at its initial "
            "values, pass allow_partial_weights=True (config: model.backbone.allow_partial_weights: true)")


def _shorten(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
