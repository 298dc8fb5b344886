"""ONNX export of the detector's inference, and ONNX Runtime to run it.

Shapes: H x W the resized image, M anchors, k proposals, R = k RoIs, K foreground classes,
D detections.

The graph (`export_onnx`) is the plain path of `FasterRCNN.inference` for one image:

    image    uint8 (1, 3, H, W): RGB, already resized (`detection.export.preprocess.preprocess`
             from the file's metadata; `prepare_image` below for a tensor)
    original_size  int64 (2,): (height, width) of the image before resizing
 -> boxes  float32 (D, 4) XYXY in the original image's pixels, scores float32 (D,),
    labels int64 (D,) in 1..K

Inside: BGR flip if the weights want it, normalisation, padding to size_divisibility, trunk,
RPN (top-k, decode, clip, drop small / empty / non-finite boxes, NMS), RoI pooling, res5,
predictor, softmax, decode, clip, score threshold, per-class NMS, top detections, scaling back
to the original pixels. Height and width are dynamic. Resizing stays outside, as the one
pre-processing step: OpenCV's area filter (and PIL's bilinear, `input.resize_mode: detectron2`)
have no exact ONNX op. The file's metadata_props say how to do it (`runtime_metadata`: test
sizes, resize mode, channel order, mean / std, size divisibility, class names, thresholds), and
`detection.export.preprocess.preprocess` reads them and resizes as the model does, without PyTorch;
`OnnxDetector` does both.

Ops, as torchvision exports its Faster R-CNN (torchvision/ops/_register_onnx_ops.py):
`torchvision.ops.nms` becomes ONNX NonMaxSuppression; per-class NMS is torchvision's
`batched_nms` coordinate trick (boxes of each class shifted apart, one NMS), which torchvision
uses whenever it is traced; `roi_align` (aligned, sampling ratio 0) becomes RoiAlign with
coordinate_transformation_mode half_pixel (opset 16+); `roi_pool` MaxRoiPool. The fast path
(detection/accel/: folded BN, gather pooling, hoisted res5 convolutions) is not exported:
its gather pooling is not an ONNX op, so the export takes the plain path's layers, which give
the same detections; ONNX Runtime does its own fusions.

Not exported (refused with an ExportError): test-time augmentation, the paper's multi-scale
testing and box refinement (tools run these in Python around the model).

The graph is traced from the model's own code (`ExportableDetector` only adapts the inputs
and outputs). That code follows torchvision's tracing rules where `torch.jit.is_tracing()`:
every size comes from a tensor's shape, never a Python int (which the tracer would freeze at
the export size), `min(top-k, M)` is a tensor op, and no step branches on a count.
"""
from __future__ import annotations

import io
import json
import numbers
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from detection.data.image_io import decode_image, read_image
from detection.modeling.model import FasterRCNN, rescale_detections
from detection.export.preprocess import METADATA_VERSION, preprocess, read_metadata, resize_to_inputs
from detection.modeling.resize import RESIZE_MODES, resized_shape, squashed
from detection.testing import compare_detections
from detection.utils.images import rgb_uint8
from detection.utils.files import atomic_write
from detection.utils.text import DetectionWarning, stacklevel_outside

OPSET = 17  # RoiAlign's half_pixel mode (torchvision's aligned=True) needs 16
INPUT_NAMES = ("image", "original_size")
OUTPUT_NAMES = ("boxes", "scores", "labels")


class ExportError(ValueError):
    """A model or setting the ONNX export cannot represent; says which and what to do."""


class ExportableDetector(nn.Module):
    """The ONNX graph's interface around the model's own inference (FasterRCNN.preprocess,
    detect and rescale_detections, which take their sizes from tensors while traced):
    one resized uint8 image and its original size in, boxes, scores and labels out."""

    def __init__(self, model: FasterRCNN) -> None:
        super().__init__()
        _check_exportable(model)
        self.model = model

    def forward(self, image: Tensor, original_size: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """image uint8 (1, 3, H, W), original_size int64 (2,) -> boxes (D, 4), scores (D,),
        labels (D,)."""
        images = [image[0]]  # (1, 3, H, W) -> one (3, H, W)
        batch = self.model.preprocess(images, resize=False)
        detections = self.model.detect(batch, images)[0]
        original = original_size if torch.jit.is_tracing() else (int(original_size[0]), int(original_size[1]))
        detections = rescale_detections([detections], batch.image_sizes[:1], [original])[0]
        return detections["boxes"], detections["scores"], detections["labels"]


def export_onnx(model: FasterRCNN, path: str | Path, example_size: tuple[int, int] | None = None,
                opset: int = OPSET, *, exif_orientation: bool = True) -> Path:
    """Write `model`'s inference (the plain path, eval mode, on the CPU) to an ONNX file with
    dynamic height and width, by the TorchScript-based exporter (`torch.onnx.export(...,
    dynamo=False)`), which traces the torchvision ops to their ONNX symbolics as torchvision's
    own detection models do. `example_size` is the traced image's (H, W) (default: the test
    size of a 4:3 image); the file works at any size. The file carries runtime_metadata(model)
    in its metadata_props and is written whole or not at all. `exif_orientation`: how the
    model's images were read (the config's input.exif_orientation), recorded for the runtime."""
    model = model.cpu().eval()
    wrapper = ExportableDetector(model).eval()
    if example_size is None:
        example_size = resized_shape(3 * model.min_size_test, 4 * model.min_size_test,
                                     model.min_size_test, model.max_size_test)
    image = torch.randint(0, 256, (1, 3, *example_size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    path, buffer = Path(path), io.BytesIO()
    dynamic = {"image": {2: "height", 3: "width"}, **{name: {0: "detections"} for name in OUTPUT_NAMES}}
    with warnings.catch_warnings(), torch.no_grad():
        # the legacy exporter's deprecation notice and the tracer's notes on values it treats as
        # constants (the config's thresholds and counts: constants indeed)
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (image, torch.tensor(example_size, dtype=torch.int64)), buffer,
                          dynamo=False, opset_version=opset, input_names=list(INPUT_NAMES),
                          output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic, do_constant_folding=True)
    _write_with_metadata(buffer.getvalue(), path, runtime_metadata(model, exif_orientation))
    return path


def runtime_metadata(model: FasterRCNN, exif_orientation: bool = True) -> dict[str, str]:
    """What a runtime needs to feed the file, as ONNX metadata_props (strings; numbers and
    lists as JSON): the keys of detection.export.preprocess.METADATA."""
    heads = model.roi_heads
    names = model.class_names or [f"class {i}" for i in range(1, model.num_classes + 1)]
    values = {"min_size_test": model.min_size_test, "max_size_test": model.max_size_test,
              "pixel_mean": model.pixel_mean.flatten().tolist(), "pixel_std": model.pixel_std.flatten().tolist(),
              "size_divisibility": model.size_divisibility, "class_names": list(names),
              "score_thresh_test": heads.score_thresh_test, "nms_thresh_test": heads.nms_thresh_test,
              "detections_per_image": heads.detections_per_image, "exif_orientation": bool(exif_orientation)}
    return {"c4det_metadata_version": METADATA_VERSION, "resize_mode": model.resize_mode, "input_format": "RGB",
            "weights_input_format": model.input_format, **{k: json.dumps(v) for k, v in values.items()}}


def _write_with_metadata(data: bytes, path: Path, metadata: dict[str, str]) -> None:
    """The exporter's bytes with `metadata` added to metadata_props, written atomically."""
    import onnx  # the export extra

    proto = onnx.load_from_string(data)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_write(path, "wb") as f:
        f.write(proto.SerializeToString())


def prepare_image(image: Tensor | np.ndarray, min_size: int, max_size: int, resize_mode: str = "default"
                  ) -> dict[str, np.ndarray]:
    """The ONNX model's inputs for one RGB image (uint8 (3, H, W) tensor or (H, W, 3) array,
    values 0..255): resized as FasterRCNN.preprocess does (detection.modeling.resize, shorter side
    min_size, longer at most max_size; the model's min_size_test / max_size_test /
    resize_mode), as uint8 (1, 3, h, w), and the original (H, W)."""
    return resize_to_inputs(_channels_last(image, "prepare_image"), min_size, max_size, resize_mode)


def _channels_last(image: Tensor | np.ndarray, where: str) -> np.ndarray:
    """A (3, H, W) tensor as the (H, W, 3) array the pre-processing takes; an array as it is."""
    if not isinstance(image, Tensor):
        return image
    if image.dim() != 3 or image.shape[0] != 3:
        hint = " (channels last: pass image.permute(2, 0, 1) or image.numpy())" \
            if image.dim() == 3 and image.shape[2] == 3 else ""
        raise ValueError(f"{where}: a tensor image must be (3, H, W), got {tuple(image.shape)}{hint}")
    return image.detach().cpu().permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)


class OnnxDetector:
    """An exported file run by ONNX Runtime: `detector(image)` -> {"boxes", "scores",
    "labels"} as tensors, like the model's output for that image. The pre-processing (test
    sizes, resize mode) is the file's own, from its metadata (detection.export.preprocess);
    min_size / max_size / resize_mode replace the file's values (a file exported before it
    carried them needs all three). `metadata`: the file's, parsed; `class_names`: the names of
    labels 1..K (None for such an older file)."""

    def __init__(self, path: str | Path, min_size: int | None = None, max_size: int | None = None,
                 resize_mode: str | None = None, threads: int | None = None) -> None:
        import onnxruntime  # the `export` extra

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        if resize_mode is not None and resize_mode not in RESIZE_MODES:  # the caller's, not the file's
            raise ValueError(f"OnnxDetector: resize_mode={resize_mode!r}, expected one of {RESIZE_MODES}")
        for name, value in (("min_size", min_size), ("max_size", max_size)):
            if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"OnnxDetector: {name}={value!r}, expected a positive int (pixels)")
        given = {"min_size_test": min_size, "max_size_test": max_size, "resize_mode": resize_mode}
        raw = {**self.session.get_modelmeta().custom_metadata_map,
               **{key: str(value) for key, value in given.items() if value is not None}}
        self.metadata = read_metadata(raw, name=str(path))
        self.class_names: list[str] | None = self.metadata.get("class_names")
        self.told_squashed = False  # a panorama shrunk to a strip: said once, as the model says it

    def __call__(self, image: Tensor | np.ndarray | str | Path | bytes, input_format: str = "RGB"
                 ) -> dict[str, Tensor]:
        """image: uint8 (H, W, 3) array or (3, H, W) tensor, channels in `input_format` order
        (cv2.imread gives "BGR"); or an image file's path or bytes, read as the model's images
        were (turned by its EXIF tag unless the file's metadata says exif_orientation false), as
        the Predictor reads them."""
        if isinstance(image, (str, Path)):
            image, input_format = read_image(str(image), exif_orientation=self.exif_orientation), "RGB"
        elif isinstance(image, (bytes, bytearray, memoryview)):
            image, input_format = decode_image(image, exif_orientation=self.exif_orientation), "RGB"
        return self.run(self.prepare(image, input_format))

    @property
    def exif_orientation(self) -> bool:
        """How the model's images were read; a file exported before it said so: true (the default)."""
        return bool(self.metadata.get("exif_orientation", True))

    def prepare(self, image: Tensor | np.ndarray, input_format: str = "RGB") -> dict[str, np.ndarray]:
        """The file's inputs for `image` (detection.export.preprocess.preprocess)."""
        image = rgb_uint8(_channels_last(image, "OnnxDetector"), "OnnxDetector")  # errors name the caller
        if not self.told_squashed:
            told = squashed(image.shape[:2], self.metadata["min_size_test"], self.metadata["max_size_test"],
                            tiles=False)  # an exported model has no test.tiles
            if told:
                warnings.warn(f"OnnxDetector: the image is {told}", DetectionWarning,
                              stacklevel=stacklevel_outside(__file__))
                self.told_squashed = True
        return preprocess(image, self.metadata, input_format)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, Tensor]:
        """The session on prepared inputs (prepare)."""
        outputs = self.session.run(list(OUTPUT_NAMES), inputs)
        return {name: torch.from_numpy(value) for name, value in zip(OUTPUT_NAMES, outputs)}


BOX_TOLERANCE, SCORE_TOLERANCE = 1e-2, 1e-4  # pixels; probability


def check_with_onnxruntime(model: FasterRCNN, path: str | Path, images: list[Tensor]) -> list[dict[str, Any]]:
    """ONNX Runtime's detections of the file against the model's own (eval mode, CPU), one
    compare_detections() per image (uint8 RGB (3, H, W)). The file is fed as a runtime feeds
    it, from its own metadata, so wrong metadata shows as differing detections."""
    model = model.cpu().eval()
    detector = OnnxDetector(path)
    results = []
    for image in images:
        with torch.no_grad():
            ref = model([image])[0]
        inputs = detector.prepare(image)
        results.append({"input_size": list(image.shape[-2:]), "model_size": list(inputs["image"].shape[-2:]),
                        **compare_detections(ref, detector.run(inputs), box_tolerance=BOX_TOLERANCE,
                                             score_tolerance=SCORE_TOLERANCE)})
    return results


def _check_exportable(model: nn.Module) -> None:
    if not isinstance(model, FasterRCNN):
        raise ExportError("ONNX export takes the plain FasterRCNN (detection.modeling.model), got "
                          f"{type(model).__name__}: export the model before wrapping it for test-time augmentation")
    if model.roi_heads.res5_runner is not None:
        raise ExportError("ONNX export takes the plain path: build the model without model.fast_path "
                          "(its gather pooling has no ONNX op; the plain path gives the same detections)")
    if model.multi_scale is not None:
        raise ExportError("ONNX export: the paper's multi-scale testing (test.multi_scale.enabled) is not "
                          "exported; set test.multi_scale.enabled=false")
    if model.roi_heads.box_refinement is not None:
        raise ExportError("ONNX export: box refinement (test.box_refinement.enabled) is not exported; "
                          "set test.box_refinement.enabled=false")
