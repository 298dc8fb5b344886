"""Faster R-CNN with a ResNet C4 trunk (He et al., Appendix A): normalize + pad -> trunk
(stem..res4, stride 16) -> RPN -> Res5 RoI heads -> boxes in each input image's frame.

Shapes: N images, 3 x H x W pixels, C4 channels of the trunk map, K foreground classes.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from detection.modeling.anchors import AnchorGenerator
from detection.modeling.multiscale import MultiScaleTest, PyramidFeatures
from detection.modeling.precision import autocast
from detection.modeling.refinement import BoxRefinement
from detection.modeling.resize import RESIZE_MODES, resize_tensor, resized_shape, squashed
from detection.modeling.roi_heads import Res5ROIHeads
from detection.modeling.rpn import RPN, clip_boxes
from detection.modeling.structures import ImageList, OtherLibraryNames, host_to_device
from detection.utils.text import PROJECT, DetectionWarning, stacklevel_outside

if TYPE_CHECKING:  # annotations only: the model needs no config at run time
    from detection.config import BackboneConfig, Config, ModelConfig

LOSS_KEYS = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box")


class TargetError(ValueError):
    """A training target that the detector cannot use; names the image and the box."""


def validate_targets(targets: Sequence[dict[str, Any]], num_images: int, num_classes: int,
                     image_sizes: Sequence[tuple[int, int]] | None = None) -> None:
    """Raise TargetError unless each target is {"boxes": float (N, 4) finite with x2 > x1 and
    y2 > y1, "labels": integer (N,) in 1..num_classes}. An empty target (N = 0) is valid. With
    `image_sizes` ((H, W) of each image, as the model gets it), also unless each box has pixels in
    its image and an image's boxes are not all within 0..1 (normalised coordinates: they train
    in silence on 1-pixel boxes in the corner; torchvision checks neither)."""
    if not isinstance(targets, (list, tuple)):  # one dict's len() is its key count: "2 targets"
        raise TargetError(f"targets must be a list of dicts, one per image, got {type(targets).__name__}"
                          + (" (one image's target: pass [target])" if isinstance(targets, dict) else ""))
    if len(targets) != num_images:
        raise TargetError(f"got {num_images} images but {len(targets)} targets")
    checks = []
    for i, target in enumerate(targets):
        if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
            raise TargetError(f"target of image {i}: must be a dict with 'boxes' and 'labels'")
        boxes, labels = target["boxes"], target["labels"]
        if not isinstance(boxes, Tensor) or not boxes.is_floating_point():
            raise TargetError(f"image {i}: boxes must be a float Tensor [N, 4], got {_described(boxes)}")
        if not (boxes.dim() == 2 and boxes.shape[1] == 4) and not (boxes.numel() == 0):
            raise TargetError(f"image {i}: boxes must have shape [N, 4], got {list(boxes.shape)}")
        boxes = boxes.reshape(-1, 4)
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool \
                or labels.is_complex() or labels.shape != (boxes.shape[0],):
            raise TargetError(f"image {i}: labels must be an integer Tensor [{boxes.shape[0]}], got "
                              f"{_described(labels)}")
        checks.append((i, boxes, labels, image_sizes[i] if image_sizes is not None else None))
    # The values' checks: one host read for the batch (a synchronisation on CUDA; one per check
    # and image before), then, only when something is wrong, the checks that name it.
    flags = [torch.stack([bad.any() for bad, _ in _problems(boxes, labels, num_classes, size)]).any()
             for _, boxes, labels, size in checks]
    if flags and bool(torch.stack([f.to(flags[0].device) for f in flags]).any()):
        for i, boxes, labels, size in checks:
            for bad, what in _problems(boxes, labels, num_classes, size):
                if bad.any():
                    j = int(bad.nonzero()[0])
                    raise TargetError(f"image {i}, box {j}: {what(j)}")


def _described(value: Any) -> str:
    """What a target's boxes or labels are: a tensor's dtype and shape; anything else's type too
    (a numpy array's "float32" alone read as if it were right), with torch.as_tensor as the fix."""
    shape = list(getattr(value, "shape", ()))
    if isinstance(value, Tensor):
        return f"{value.dtype} {shape}"
    kind = type(value).__name__ if type(value).__module__ == "builtins" else \
        f"{type(value).__module__.split('.')[0]}.{type(value).__name__}"
    dtype = f" of {value.dtype}" if hasattr(value, "dtype") else ""
    return f"a {kind}{dtype}{f' {shape}' if shape else ''} (not a Tensor: pass torch.as_tensor(...))"


def _problems(boxes: Tensor, labels: Tensor, num_classes: int, size: tuple[int, int] | None = None
              ) -> list[tuple[Tensor, Callable[[int], str]]]:
    """(N, 4) boxes, (N,) labels, the image's (H, W) or None -> (mask (N,) of the boxes with the
    problem, box j -> its message) for each problem, in the order they are reported."""
    problems = [(~torch.isfinite(boxes).all(dim=1), lambda j: f"{boxes[j].tolist()} is not finite"),
                ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]),
                 lambda j: f"{boxes[j].tolist()} is degenerate (needs x2 > x1 and y2 > y1)"),
                (((labels < 1) | (labels > num_classes)).to(boxes.device),
                 lambda j: f"label {int(labels[j])} is outside 1..{num_classes}")]
    if size is None:
        return problems
    h, w = size
    pixels = "boxes are x1, y1, x2, y2 in the pixels of the image as given to the model"
    if boxes.shape[0] and min(h, w) > _NORMALISED_MIN_SIDE:
        normalised = (boxes.abs().amax() <= 1.0).expand(boxes.shape[0])
        problems.append((normalised, lambda j: f"{boxes[j].tolist()}: every box of this {w}x{h} image lies within "
                         f"0..1 (normalised coordinates?): {pixels} (multiply by its width and height)"))
    outside = (boxes[:, 0] >= w) | (boxes[:, 1] >= h) | (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0)
    problems.append((outside, lambda j: f"{boxes[j].tolist()} lies outside the {w}x{h} image: {pixels} (resized "
                     "with it?)"))
    return problems


# An image whose shorter side is above this with every box within 0..1 has normalised boxes
# (in pixels they would be 1-pixel boxes in its corner); a tiny test image may hold such a box.
_NORMALISED_MIN_SIDE = 16


class FasterRCNN(OtherLibraryNames, nn.Module):
    """The C4 detector. `trunk` maps (N, 3, H, W) normalized images to the stride-16 map."""

    OTHER_NAMES = {  # torchvision's FasterRCNN and Detectron2's GeneralizedRCNN name these otherwise
        "backbone": "trunk (stem, res2..res4: the C4 map; res5 is roi_heads.res5)",
        "transform": "none: the model resizes in eval mode itself (min_size_test, max_size_test), normalises "
                     "with pixel_mean / pixel_std and pads to size_divisibility; preprocess() does all three",
        "proposal_generator": "rpn",
    }

    def __init__(self, *, trunk: nn.Module, rpn: RPN, roi_heads: Res5ROIHeads,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 input_format: str = "RGB", min_size_test: int = 600, max_size_test: int = 1000,
                 size_divisibility: int = 32, resize_mode: str = "default",
                 class_names: Sequence[str] | None = None,
                 multi_scale: MultiScaleTest | None = None,
                 train_sizes: tuple[Sequence[int], int] | None = None) -> None:
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"FasterRCNN: input_format must be RGB or BGR, got {input_format!r}")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"FasterRCNN: resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        self.resize_mode = resize_mode
        self.trunk, self.rpn, self.roi_heads = trunk, rpn, roi_heads
        self.num_classes = roi_heads.num_classes
        self.input_format = input_format
        self.min_size_test, self.max_size_test = min_size_test, max_size_test
        self.size_divisibility = size_divisibility
        self.multi_scale = multi_scale  # the paper's multi-scale testing (detection/modeling/multiscale.py)
        # (input.min_size_train, max_size_train): train mode does not resize, and says once when an
        # image is far from the size training's pipeline gives it (None: not checked)
        self.train_sizes = train_sizes
        self._told_size = False
        self.told_squashed = False  # an inference image shrunk far below min_size_test: said once
        self.amp = False  # test.amp: inference under autocast (detection/modeling/precision.py, set by the engine)
        self.inference_only = False  # detection.accel's inference copies: folded norms, no gradients
        self.class_names = list(class_names) if class_names is not None else None
        # Buffers so they follow .to(device); not persistent: they come from the config.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1),
                             persistent=False)
        self.built_settings = self.settings()  # as built: what was set on the model later differs from it

    # the settings a caller may change on the model as attributes (torchvision's way:
    # model.roi_heads.score_thresh = 0.5), by the config key build_model sets them from
    SETTINGS = {
        "model.roi_heads.score_thresh_test": lambda m: m.roi_heads.score_thresh_test,
        "model.roi_heads.nms_thresh_test": lambda m: m.roi_heads.nms_thresh_test,
        "model.roi_heads.detections_per_image": lambda m: m.roi_heads.detections_per_image,
        "model.rpn.pre_nms_topk_test": lambda m: m.rpn.pre_nms_topk[False],
        "model.rpn.post_nms_topk_test": lambda m: m.rpn.post_nms_topk[False],
        "model.rpn.nms_thresh": lambda m: m.rpn.nms_thresh,
        "model.rpn.min_size": lambda m: m.rpn.min_size,
        "input.min_size_test": lambda m: m.min_size_test,
        "input.max_size_test": lambda m: m.max_size_test,
    }

    def settings(self) -> dict[str, Any]:
        """SETTINGS' values now."""
        return {path: get(self) for path, get in self.SETTINGS.items()}

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
                ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Train mode: images as given (already resized) + targets -> the four losses.
        Eval mode: per image {"boxes", "scores", "labels"} in that input image's pixels.
        `images`: a list of Tensor[3, H, W] (sizes may differ), or an (N, 3, H, W) batch, in the
        channel order model.input_format names (RGB by default) with values 0..255 (uint8 or float;
        torchvision's detectors take 0..1). `targets` (train mode): per image {"boxes": float
        Tensor[N, 4] XYXY in that image's pixels, "labels": int64 Tensor[N] in 1..num_classes (0
        is the background)}. Out: "boxes" XYXY float in the input image's pixels, "scores",
        "labels" 1..num_classes. Proposals inside (the RPN's, the heads') are in the resized,
        unpadded image's pixels; the model resizes in eval mode, not in train mode (the loader does)."""
        if isinstance(images, Tensor) and images.dim() == 4:  # a batch, as torchvision's detectors take it
            images = list(images)
        _check_images(images)
        if self.training:
            if self.inference_only:
                raise RuntimeError("FasterRCNN: this is an inference copy (optimize_for_inference / "
                                   "prepare_for_inference: norms folded, no gradients), which cannot train: train "
                                   "the model it was made from (this copy was put in train mode: its .eval() runs "
                                   "it again)")
            if targets is None:
                raise TargetError("FasterRCNN: targets are required in training mode")
            validate_targets(targets, len(images), self.num_classes,
                             [(int(img.shape[-2]), int(img.shape[-1])) for img in images])
            if self.train_sizes is not None and not self._told_size:
                self._told_size = _tell_unresized(images, *self.train_sizes)
            targets = [{"boxes": t["boxes"].to(self.device, torch.float32).reshape(-1, 4),
                        "labels": t["labels"].to(self.device, torch.int64)} for t in targets]
            batch = self.preprocess(images, resize=False)
            features = self.trunk(batch.tensor)
            proposals, rpn_losses = self.rpn(features, batch.image_sizes,
                                             [t["boxes"] for t in targets])
            _, head_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
            return {**rpn_losses, **head_losses}
        return self.inference(images)

    def inference(self, images: Sequence[Tensor], min_size: int | None = None,
                  max_size: int | None = None) -> list[dict[str, Tensor]]:
        """Detections in each input image's pixels; the images are resized to min_size /
        max_size (default: min_size_test / max_size_test) on the way in."""
        with record_function("c4det.preprocess"):
            batch = self.preprocess(images, resize=True, min_size=min_size, max_size=max_size)
        detections = self.detect(batch, images)
        with record_function("c4det.postprocess"):
            return rescale_detections(detections, batch.image_sizes,
                                      [(int(img.shape[-2]), int(img.shape[-1])) for img in images])

    def detect(self, batch: ImageList, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Detections in the frame of each preprocessed image of `batch`: trunk, RPN, RoI heads
        (`images`, the originals, are read by multi-scale testing only). Traceable for one image
        (detection/export/onnx.py traces it). Eval mode only, as Detectron2's `inference`."""
        if self.training:  # checked first: the trunk in train mode moves BN's running statistics for good
            raise RuntimeError("FasterRCNN.inference / detect: the model is in train mode (its BatchNorm would "
                               "update its running statistics, and the RPN asks for targets): call model.eval() "
                               "first, as for any inference (calling the model in train mode gives the losses)")
        with autocast(self.amp, self.device):  # outputs of the RPN and box heads come back in float32
            with record_function("c4det.trunk"):
                features = self.trunk(batch.tensor)
            with record_function("c4det.rpn"):
                proposals, _ = self.rpn(features, batch.image_sizes)
            roi_features = None
            if self.multi_scale is not None:
                roi_features = self.pyramid_features(images, batch, features)
            with record_function("c4det.roi_heads"):
                detections, _ = self.roi_heads(features, proposals, batch.image_sizes, roi_features=roi_features)
        return detections

    def pyramid_features(self, images: Sequence[Tensor], batch: ImageList, features: Tensor
                         ) -> PyramidFeatures:
        """The multi-scale RoI features: one trunk map per pyramid size (computed when a RoI
        needs it; the test scale's own map reused where the sizes agree)."""
        ms, heads = self.multi_scale, self.roi_heads
        levels = []
        for size in ms.sizes:
            shapes = [resized_shape(int(img.shape[-2]), int(img.shape[-1]), size, ms.max_size) for img in images]
            factors = [(w / w0, h / h0) for (h, w), (h0, w0) in zip(shapes, batch.image_sizes)]
            if shapes == [tuple(s) for s in batch.image_sizes]:
                levels.append((lambda: features, factors))
            else:
                levels.append((self._trunk_at(images, size, ms.max_size), factors))
        canonical = (heads.pooler_resolution / heads.spatial_scale) ** 2
        return PyramidFeatures(levels, heads.box_features, canonical)

    def _trunk_at(self, images: Sequence[Tensor], size: int, max_size: int):
        def compute() -> Tensor:
            with record_function("c4det.pyramid_trunk"):
                return self.trunk(self.preprocess(images, resize=True, min_size=size, max_size=max_size).tensor)
        return compute

    def preprocess(self, images: Sequence[Tensor], resize: bool, min_size: int | None = None,
                   max_size: int | None = None) -> ImageList:
        """RGB 0..255 -> (resized, as uint8, by detection.modeling.resize) -> on the model's device
        -> (BGR if the weights want it) -> normalized -> padded. Images may come in host memory
        (the Predictor's, visualize.py's): resized there, then moved as uint8 without waiting for
        the GPU (host_to_device); a GPU image that needs resizing goes to the host and back.
        While tracing, the one image's size is a tensor."""
        min_size = self.min_size_test if min_size is None else min_size
        max_size = self.max_size_test if max_size is None else max_size
        out = []
        for i, img in enumerate(images):
            if resize:
                size = resized_shape(int(img.shape[-2]), int(img.shape[-1]), min_size, max_size)
                if not self.told_squashed and not torch.jit.is_tracing():  # said once per model
                    told = squashed(tuple(img.shape[-2:]), min_size, max_size)
                    if told:
                        warnings.warn(f"FasterRCNN: the batch's image {i} is {told}", DetectionWarning,
                                      stacklevel=stacklevel_outside(__file__, torch.__file__))
                        self.told_squashed = True
                if size != tuple(img.shape[-2:]):
                    img = resize_tensor(img, size, self.resize_mode)
            x = (img if img.device == self.device else host_to_device(img, self.device)).to(torch.float32)
            if self.input_format == "BGR":
                x = x.flip(0)
            out.append((x - self.pixel_mean) / self.pixel_std)
        if torch.jit.is_tracing():
            return _traced_batch(out, self.size_divisibility)
        return ImageList.from_tensors(out, self.size_divisibility)


def _check_images(images: Sequence[Tensor]) -> None:
    if isinstance(images, Tensor) or len(images) == 0:
        raise ValueError("FasterRCNN: images must be a non-empty list of Tensor[3, H, W] (or an (N, 3, H, W) batch)")
    for i, img in enumerate(images):
        if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3:
            shape = list(getattr(img, "shape", []))
            hint = ""
            if len(shape) == 3 and shape[-1] == 3:  # (H, W, 3): an image as read
                hint = (": an (H, W, 3) array or tensor is channels-last, give "
                        + ("torch.from_numpy(a).permute(2, 0, 1)" if not isinstance(img, Tensor)
                           else "img.permute(2, 0, 1)"))
            elif (len(shape) == 3 and shape[0] == 1) or len(shape) == 2:  # a gray image (an API trial)
                hint = ": a gray image has one channel; give it three, torch.as_tensor(img).expand(3, H, W)"
            elif len(shape) == 3 and shape[-1] == 1:  # (H, W, 1)
                hint = (": a channels-last gray image; give it three channels, "
                        "torch.as_tensor(img).permute(2, 0, 1).expand(3, H, W)")
            raise ValueError(f"FasterRCNN: image {i} must be a Tensor[3, H, W], got "
                             f"{shape or type(img).__name__}{hint}")
        if img.dtype == torch.bool or img.is_complex():  # torch's own error came from deep inside (an API trial)
            raise ValueError(f"FasterRCNN: image {i} is {img.dtype}: give values 0..255 (as uint8 or float) in the "
                             "channel order model.input_format names")
    # torchvision's detectors take float 0..1; this one 0..255. Such an image runs and gives
    # wrong detections in silence, so say so (once per process: warnings' default filter). The
    # images' maxima are read in one go (a synchronisation on CUDA; one per image before).
    floats = [(i, img) for i, img in enumerate(images) if img.is_floating_point() and img.numel()]
    if floats:
        maxima = torch.stack([img.amax().to(floats[0][1].device) for _, img in floats]).tolist()
        for (i, _), top in zip(floats, maxima):
            if 0 < top <= 1.0:
                warnings.warn(f"FasterRCNN: image {i} is float with values in 0..1, but the model takes RGB "
                              "0..255 (torchvision's detectors take 0..1): multiply by 255",
                              DetectionWarning, stacklevel=stacklevel_outside(__file__, torch.__file__))


# how far (as a scale factor) a training image may be from the pipeline's size before the model says so:
# the training loader's images are at that size (to the pixel), a user's own loop's may not be
_UNRESIZED_FACTOR = 1.5


def _tell_unresized(images: Sequence[Tensor], min_sizes: Sequence[int], max_size: int) -> bool:
    """Warn (and return True) when a train-mode image is over 1.5x larger or smaller than the
    shorter-side resize of input.min_size_train / max_size_train makes it: torchvision's
    detectors resize in train mode, so its users' own loops feed images as read (a 4000x3000
    photo trains at full size, slowly, and the model then tests at another scale)."""
    for i, img in enumerate(images):
        height, width = int(img.shape[-2]), int(img.shape[-1])
        if not height or not width:
            continue
        smallest = resized_shape(height, width, min(min_sizes), max_size)[0] / height
        largest = resized_shape(height, width, max(min_sizes), max_size)[0] / height
        if smallest > _UNRESIZED_FACTOR or largest < 1 / _UNRESIZED_FACTOR:
            target = resized_shape(height, width, min(min_sizes), max_size)
            warnings.warn(f"FasterRCNN: training image {i} is {height}x{width}, but training's data pipeline would "
                          f"resize it to {target[0]}x{target[1]} (input.min_size_train {list(min_sizes)}, "
                          f"max_size_train {max_size}): the model does not resize in train mode (torchvision's "
                          "does): resize as training does, with detection.data.transforms.build_train_transform(cfg)",
                          DetectionWarning, stacklevel=stacklevel_outside(__file__, torch.__file__))
            return True
    return False


def _traced_batch(images: list[Tensor], divisibility: int) -> ImageList:
    """ImageList.from_tensors of one image while tracing: the padding and the image's size, an
    int64 (2,) tensor (H, W), computed from its shape, so the graph follows the input's size
    (ints would be frozen at the traced one)."""
    if len(images) != 1:
        raise ValueError(f"FasterRCNN: tracing takes one image, got {len(images)}")
    x = images[0]
    size = torch._shape_as_tensor(x)[-2:]
    if divisibility > 1:
        height, width = x.shape[-2], x.shape[-1]  # traced: values in the graph, not ints
        x = F.pad(x, (0, (divisibility - width % divisibility) % divisibility,
                      0, (divisibility - height % divisibility) % divisibility))
    return ImageList(x.unsqueeze(0), [size])


def rescale_detections(detections: Sequence[dict[str, Tensor]], resized: Sequence[tuple[int, int] | Tensor],
                       original: Sequence[tuple[int, int] | Tensor]) -> list[dict[str, Tensor]]:
    """Map each image's boxes from the resized image back to the original one (separate x / y
    factors, since rounding makes them differ slightly), clipped to the original image; boxes
    left with no area are dropped (as Detectron2's detector_postprocess does). Host reads: one
    for the batch (which images lost a box?), then one per image that did (rare: a box clipped
    to nothing at the border). Sizes (H, W): ints, or int64 (2,) tensors while tracing."""
    if any(isinstance(size, Tensor) for size in resized):
        return [_rescale_traced(det, r, o) for det, r, o in zip(detections, resized, original)]
    scaled = [_scaled_boxes(det["boxes"], r, o) for det, r, o in zip(detections, resized, original)]
    keeps = [(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) for boxes in scaled]
    whole = torch.stack([keep.all() for keep in keeps]).tolist() if keeps else []  # the batch's read
    out = []
    for det, boxes, keep, all_kept in zip(detections, scaled, keeps, whole):
        if not all_kept:
            index = keep.nonzero().squeeze(1)
            det, boxes = {k: v[index] for k, v in det.items()}, boxes[index]
        out.append({**det, "boxes": boxes})
    return out


def _scaled_boxes(boxes: Tensor, resized: tuple[int, int], original: tuple[int, int]) -> Tensor:
    if resized == original:
        return boxes
    sy, sx = original[0] / resized[0], original[1] / resized[1]
    boxes = boxes * host_to_device(torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype, device="cpu"), boxes.device)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, original[1])
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, original[0])
    return boxes


def _rescale_traced(det: dict[str, Tensor], resized: Tensor, original: Tensor) -> dict[str, Tensor]:
    """rescale_detections of one image with tensor sizes: always scaled, clipped and filtered (a test of the
    sizes would be frozen at the traced ones)."""
    factors = (original.to(torch.float32) / resized.to(torch.float32)).flip(0).repeat(2)  # (4,): sx, sy, sx, sy
    boxes = clip_boxes(det["boxes"] * factors, original)
    keep = ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).nonzero().squeeze(1)
    return {**{k: v[keep] for k, v in det.items()}, "boxes": boxes[keep]}


def build_trunk(resnet: nn.Module) -> nn.Sequential:
    """stem..res4 of a backbones.ResNet as one module returning the stride-16 map
    (names kept, so checkpoint keys read trunk.res4.0.conv1.weight etc.)."""
    return nn.Sequential(OrderedDict((name, getattr(resnet, name))
                                     for name in ("stem", "res2", "res3", "res4")))


def build_model(cfg: Config) -> FasterRCNN:
    """The detector described by a detection.config.Config (the model's only reader of it; see
    docs/ARCHITECTURE.md for the other build_* functions that read one).

    The backbone weights (cfg.model.backbone.weights) are loaded into the whole ResNet first,
    then res5 moves to the RoI head, so the head starts from the pretrained conv5_x."""
    m = cfg.model
    resnet = build_backbone(m.backbone, ("res4",), m.backbone.weights)
    _warn_on_preprocessing_mismatch(getattr(resnet, "weights_info", None), m)
    anchors = AnchorGenerator(m.anchors.sizes, m.anchors.aspect_ratios, m.anchors.stride)
    r = m.rpn
    rpn = RPN(in_channels=resnet.out_channels["res4"], anchor_generator=anchors,
              iou_thresholds=r.iou_thresholds, batch_size_per_image=r.batch_size_per_image,
              positive_fraction=r.positive_fraction, pre_nms_topk_train=r.pre_nms_topk_train,
              post_nms_topk_train=r.post_nms_topk_train, pre_nms_topk_test=r.pre_nms_topk_test,
              post_nms_topk_test=r.post_nms_topk_test, nms_thresh=r.nms_thresh,
              min_size=r.min_size, smooth_l1_beta=r.smooth_l1_beta)
    h = m.roi_heads
    roi_heads = Res5ROIHeads(
        res5=resnet.res5, res5_out_channels=resnet.out_channels["res5"], num_classes=m.num_classes,
        pooler=h.pooler, pooler_resolution=h.pooler_resolution,
        spatial_scale=1.0 / m.anchors.stride, batch_size_per_image=h.batch_size_per_image,
        positive_fraction=h.positive_fraction, iou_threshold=h.iou_threshold,
        bbox_reg_weights=h.bbox_reg_weights, score_thresh_test=h.score_thresh_test,
        nms_thresh_test=h.nms_thresh_test, detections_per_image=h.detections_per_image,
        smooth_l1_beta=h.smooth_l1_beta, box_loss_weight=h.box_loss_weight,
        global_context=h.global_context, box_refinement=_box_refinement(cfg))
    ms = cfg.test.multi_scale
    return FasterRCNN(trunk=build_trunk(resnet), rpn=rpn, roi_heads=roi_heads,
                      pixel_mean=m.pixel_mean, pixel_std=m.pixel_std, input_format=m.input_format,
                      min_size_test=cfg.input.min_size_test, max_size_test=cfg.input.max_size_test,
                      size_divisibility=m.size_divisibility, resize_mode=cfg.input.resize_mode,
                      class_names=m.class_names or None,
                      multi_scale=MultiScaleTest(tuple(ms.sizes), ms.max_size) if ms.enabled else None,
                      train_sizes=(tuple(cfg.input.min_size_train), cfg.input.max_size_train))


def _box_refinement(cfg: Config) -> BoxRefinement | None:
    r = cfg.test.box_refinement
    return BoxRefinement(r.nms_thresh, r.voting, r.voting_iou) if r.enabled else None


def build_backbone(bb: BackboneConfig, out_features: tuple[str, ...], weights: str | None) -> nn.Module:
    """The ResNet of a config's model.backbone section, with `weights` loaded (or none)."""
    from backbones import build_resnet  # backbones is a lower layer; imported where used

    return build_resnet(bb.depth, out_features=out_features, weights=weights, norm=bb.norm,
                        freeze_at=bb.freeze_at, stride_in_1x1=bb.stride_in_1x1, shortcut=bb.shortcut,
                        residual=bb.residual, allow_partial_weights=bb.allow_partial_weights)


def _warn_on_preprocessing_mismatch(info: Any, model_cfg: ModelConfig) -> None:
    warn_on_preprocessing_mismatch(info, model_cfg.pixel_mean, model_cfg.pixel_std, model_cfg.input_format)


def warn_on_preprocessing_mismatch(info: Any, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                                   input_format: str) -> None:
    """The mean/std/format belong to the weights; a config that disagrees silently costs
    accuracy, so say so (the config still wins: it is the explicit contract). `info`: the
    backbone weights' weights_info (None: nothing known)."""
    if info is None:
        return
    theirs = (list(getattr(info, "pixel_mean", pixel_mean)), list(getattr(info, "pixel_std", pixel_std)),
              getattr(info, "input_format", input_format))
    ours = (list(pixel_mean), list(pixel_std), input_format)
    close = all(math.isclose(a, b, rel_tol=1e-3) for a, b in zip(theirs[0] + theirs[1], ours[0] + ours[1]))
    if not close or theirs[2] != ours[2]:
        warnings.warn(f"model.pixel_mean/pixel_std/input_format {ours} differ from what the backbone "
                      f"weights expect {theirs}; set them in the config to match the weights",
                      DetectionWarning, stacklevel=stacklevel_outside(PROJECT))  # build_model's caller
