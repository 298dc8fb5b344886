"""The one check of an image array a caller passes (the Predictor, the ONNX pre-processing,
the drawing functions): RGB uint8 (H, W, 3), values 0..255. What else people pass (a failed
cv2.imread's None, a tensor, a PIL image, float 0..1, gray, RGBA, channels first, a batch) is
one error saying how to pass it instead; numpy only, so the ONNX runtime side needs no torch."""
from __future__ import annotations

from typing import Any

import numpy as np


def rgb_uint8(image: Any, where: str, accepted: str = "a uint8 (H, W, 3) numpy array") -> np.ndarray:
    """`image` as a contiguous, writable uint8 (H, W, 3) array (a copy only where it is not);
    TypeError (not an array) or ValueError (the wrong array) beginning with `where`;
    `accepted`: what the caller takes, for the message."""
    if image is None:
        raise ValueError(f"{where}: got None, not an image: cv2.imread returns None for a file it cannot read "
                         "(a missing path, or a format or orientation OpenCV fails on: "
                         "detection.data.image_io.read_image reads it as RGB)")
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{where}: expected {accepted}, got {type(image).__name__}"
                        + _how_to_pass(image))
    if image.dtype != np.uint8:
        raise ValueError(f"{where}: the image must be uint8 0..255, got dtype {image.dtype}"
                         + _how_to_convert(image))
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: the image must have shape (H, W, 3), got {image.shape}" + _how_to_shape(image))
    if image.size == 0:
        raise ValueError(f"{where}: the image is empty, shape {image.shape}")
    if not image.flags.writeable:  # torch.from_numpy warns of a read-only array
        return image.copy()
    return np.ascontiguousarray(image)


def _how_to_pass(image: object) -> str:
    kind = type(image).__module__.split(".")[0]
    if kind == "torch":
        return (" (a tensor: pass image.numpy() of an (H, W, 3) uint8 image; channels first: "
                "image.permute(1, 2, 0).numpy())")
    if kind == "PIL":  # turned as the project's reader turns files, or boxes land elsewhere on phone photos
        return " (a PIL image: pass np.asarray(ImageOps.exif_transpose(image).convert('RGB')))"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _ENCODED
    return ""


def float_image_scale(image: np.ndarray) -> float:
    """What a float image's values are multiplied by to read them as 0..255: 255 for 0..1 values,
    1 for 0..255 ones. 0..1 when most pixels (the median) are at most 1 and the pixels over 1 are
    highlights (their median at most 8: an HDR merge's, clipped to white when read); 0..255 when
    most pixels are over 1, or the pixels over 1 are far over it (objects of a 0..255 image on a
    black ground). The maximum decided it first (one highlight pixel read a 0..1 photo as 0..255,
    near black), then the median alone (a 0..255 frame more than half black, as a fluorescence or
    night image, was read as 0..1: every object white), then with the brightest 1% (objects on
    under 1% of a black frame, as stars or sparse cells, still read white)."""
    sample = image[::4, ::4] if image.ndim >= 2 and image.size > (1 << 20) else image  # a guess, not a sum
    values = np.nan_to_num(np.asarray(sample, dtype=np.float32))
    if values.size == 0:
        return 255.0
    if float(np.median(values)) > 1.0:
        return 1.0
    over = values[values > 1.0]
    return 255.0 if over.size == 0 or float(np.median(over)) <= 8.0 else 1.0


def _how_to_convert(image: np.ndarray) -> str:
    if image.dtype == np.uint16:  # the project's reader maps 16-bit files so
        return " (a 16-bit image: pass (image / 257 + 0.5).astype(np.uint8), as 16-bit files are read)"
    if image.dtype.kind != "f" or image.size == 0:
        return ""
    if float_image_scale(image) == 255.0:  # as float files are read: 0..1, highlights clipped
        return " (a float 0..1 image: pass (image.clip(0, 1) * 255).round().astype(np.uint8))"
    return " (a float image of 0..255 values: pass image.round().clip(0, 255).astype(np.uint8))"


def _how_to_shape(image: np.ndarray) -> str:
    shape = image.shape
    if image.ndim == 2 or (image.ndim == 3 and shape[2] == 1):
        return " (a gray image: pass np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2))"
    if image.ndim == 3 and shape[2] == 4:
        return " (with an alpha channel: pass image[:, :, :3])"
    if image.ndim == 3 and shape[0] in (1, 3):
        return " (channels first: pass image.transpose(1, 2, 0))"
    if image.ndim == 4:
        return " (a batch: pass a list of (H, W, 3) images)"
    if image.ndim == 1 and image.dtype == np.uint8:
        return _ENCODED
    return ""


_ENCODED = (" (an image file's encoded bytes: decode them with detection.data.image_io.decode_image, as files "
            "are read; the Predictor takes the bytes themselves)")
