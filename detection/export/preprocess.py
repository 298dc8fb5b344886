"""The exported ONNX file's pre-processing, read from the file itself: needs numpy, OpenCV and
PIL (and onnxruntime or onnx to open the file), not PyTorch, so a runtime can use it alone.

    import cv2
    import onnxruntime
    from detection.export.preprocess import preprocess, read_metadata

    session = onnxruntime.InferenceSession("model.onnx")
    metadata = read_metadata(session)                  # the file's metadata_props, parsed
    inputs = preprocess(cv2.imread("street.jpg"), metadata, input_format="BGR")
    boxes, scores, labels = session.run(None, inputs)  # XYXY in the image's pixels; labels 1..K
    names = [metadata["class_names"][k - 1] for k in labels]

The file (detection/export/onnx.py) holds the whole inference except the resize, which has no exact
ONNX op (OpenCV's area filter; PIL's bilinear with resize_mode "detectron2"). `preprocess`
resizes as the model does (detection.modeling.resize: shorter side min_size_test, longer at most
max_size_test, each side rounded as int(x + 0.5); resampled by resize_mode), with the sizes and
mode the file says, so the file's detections are the PyTorch model's.

Metadata keys (ONNX metadata_props; values are strings, numbers and lists written as JSON):
see METADATA below. The channel flip the weights want, the mean / std normalisation, the
padding to size_divisibility, the score threshold and NMS are inside the graph: their values
are there for the record; a runtime needs only the resize and the channel order.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from detection.modeling.resize import RESIZE_MODES, resize_uint8, resized_shape
from detection.utils.images import rgb_uint8

METADATA_VERSION = "1"
# key -> (type, what it says); every key is written by detection.export.onnx.runtime_metadata
METADATA: dict[str, tuple[type, str]] = {
    "c4det_metadata_version": (str, "this table's version"),
    "min_size_test": (int, "the resize: shorter side to this many pixels (input.min_size_test)"),
    "max_size_test": (int, "... unless the longer side would exceed this (input.max_size_test)"),
    "resize_mode": (str, "resampling: default = OpenCV area (shrink) / bilinear (enlarge); "
                         "detectron2 = PIL bilinear (input.resize_mode)"),
    "input_format": (str, "channel order of the `image` input: always RGB"),
    "weights_input_format": (str, "channel order the weights take (model.input_format); the flip is in the graph"),
    "pixel_mean": (list, "per RGB-or-BGR channel as the weights take it (model.pixel_mean); in the graph"),
    "pixel_std": (list, "(model.pixel_std); in the graph"),
    "size_divisibility": (int, "padding of the resized image to multiples of this (in the graph)"),
    "class_names": (list, "the names of labels 1..K, in order"),
    "score_thresh_test": (float, "detections at or below this score are dropped (in the graph)"),
    "nms_thresh_test": (float, "per-class NMS IoU (in the graph)"),
    "detections_per_image": (int, "at most this many detections (in the graph)"),
    "exif_orientation": (bool, "the model's images were turned by their EXIF tag as they were read "
                               "(input.exif_orientation): read yours alike (image_io.read_image)"),
}
NEEDED = ("min_size_test", "max_size_test", "resize_mode")


class OnnxMetadataError(ValueError):
    """An ONNX file without this project's metadata, or with a malformed value: names the file
    and the key."""


def read_metadata(source: Any, name: str | None = None) -> dict[str, Any]:
    """The file's metadata, parsed (METADATA's types). `source`: a path, an
    onnxruntime.InferenceSession, an onnx.ModelProto or a mapping of strings (a session's
    get_modelmeta().custom_metadata_map). Keys not in METADATA are kept as strings."""
    raw, name = _raw_metadata(source, name)
    missing = [key for key in NEEDED if key not in raw]
    if missing:
        raise OnnxMetadataError(f"{name}: no {', '.join(missing)} in the file's metadata_props (exported before "
                                "the file carried its pre-processing): re-export it with tools/export.py, or "
                                "give the sizes and resize mode yourself")
    parsed: dict[str, Any] = {}
    for key, value in raw.items():
        kind = METADATA.get(key, (str, ""))[0]
        try:
            parsed[key] = value if kind is str else kind(json.loads(value))
        except (ValueError, TypeError):
            raise OnnxMetadataError(f"{name}: metadata {key}={value!r} is not a {kind.__name__}") from None
    if parsed["resize_mode"] not in RESIZE_MODES:
        raise OnnxMetadataError(f"{name}: metadata resize_mode={parsed['resize_mode']!r}, expected one of "
                                f"{RESIZE_MODES}")
    return parsed


def preprocess(image: np.ndarray, metadata: Mapping[str, Any], input_format: str = "RGB") -> dict[str, np.ndarray]:
    """The file's inputs for one image: `image` uint8 (H, W, 3) in `input_format` channel order
    (OpenCV's cv2.imread gives BGR) -> {"image": uint8 (1, 3, h, w) RGB resized as the model
    resizes, "original_size": int64 (2,) (H, W)}. `metadata`: read_metadata's dict (or the raw
    strings)."""
    if input_format not in ("RGB", "BGR"):
        raise ValueError(f"preprocess: input_format must be 'RGB' or 'BGR', got {input_format!r}")
    image = rgb_uint8(image, "preprocess")  # in input_format order; the check is of dtype and shape
    if input_format == "BGR":
        image = image[:, :, ::-1]
    return resize_to_inputs(image, int(metadata["min_size_test"]), int(metadata["max_size_test"]),
                            str(metadata["resize_mode"]))


def resize_to_inputs(image: np.ndarray, min_size: int, max_size: int, resize_mode: str = "default"
                     ) -> dict[str, np.ndarray]:
    """An RGB uint8 (H, W, 3) array -> the file's inputs, resized by detection.modeling.resize (the
    model's rule and resampling)."""
    image = rgb_uint8(image, "resize_to_inputs")
    height, width = image.shape[:2]
    size = resized_shape(height, width, min_size, max_size)
    if size != (height, width):
        image = resize_uint8(image, size, resize_mode)
    return {"image": np.ascontiguousarray(image.transpose(2, 0, 1)[None]),  # (h, w, 3) -> (1, 3, h, w)
            "original_size": np.array([height, width], dtype=np.int64)}


def _raw_metadata(source: Any, name: str | None) -> tuple[dict[str, str], str]:
    if isinstance(source, (str, Path)):
        try:
            import onnx
        except ImportError:  # a runtime with onnxruntime alone
            import onnxruntime

            return _raw_metadata(onnxruntime.InferenceSession(str(source), providers=["CPUExecutionProvider"]),
                                 name or str(source))
        return {p.key: p.value for p in onnx.load(str(source)).metadata_props}, name or str(source)
    if hasattr(source, "get_modelmeta"):  # onnxruntime.InferenceSession
        return dict(source.get_modelmeta().custom_metadata_map), name or "the ONNX session's model"
    if hasattr(source, "metadata_props"):  # onnx.ModelProto
        return {p.key: p.value for p in source.metadata_props}, name or "the ONNX model"
    if isinstance(source, Mapping):
        return {str(k): str(v) for k, v in source.items()}, name or "the ONNX metadata"
    raise TypeError(f"read_metadata: expected a path, an onnxruntime session, an onnx model or a mapping, "
                    f"got {type(source).__name__}")
