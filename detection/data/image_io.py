"""Image reading with OpenCV: any file OpenCV decodes -> 8-bit RGB (H, W, 3).

`IMREAD_UNCHANGED` keeps the stored depth and channel count so that 16-bit,
grayscale and RGBA files are recognised and converted explicitly instead of
being coerced by OpenCV's defaults. It also ignores the EXIF orientation tag,
which is then applied here (`orientation.py`), for every format PIL reads the tag
of, exactly as PIL's `ImageOps.exif_transpose` (Detectron2's `read_image`): phone
photos come out as viewed, which is what annotation tools show and boxes refer to.
`exif_orientation=False` (config `input.exif_orientation`) returns the stored pixels.
"""
from __future__ import annotations

import logging
import os
import re

import cv2
import numpy as np

from detection.data import DataError
from detection.data.orientation import INVERSE, apply_orientation, orientation
from detection.utils.files import dangling_link
from detection.utils.images import float_image_scale

logger = logging.getLogger(__name__)

# BGR(A) / gray layouts OpenCV returns -> the conversion to RGB
_TO_RGB = {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # little / big endian, classic / BigTIFF


def read_image(path: str, *, exif_orientation: bool = True) -> np.ndarray:
    """Read `path` as np.uint8[H, W, 3] RGB, turned as its EXIF orientation tag says unless
    `exif_orientation` is False; DataError naming the path on failure."""
    if os.path.isdir(path):
        raise DataError(f"image {path} is a folder, not an image file")
    if not os.path.isfile(path):
        raise DataError(f"image file not found: {path}{dangling_link(path)}")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"could not read image {path}: {e.strerror or e}") from None
    return decode_image(data, exif_orientation=exif_orientation, name=path)


def decode_image(data: bytes | np.ndarray, *, exif_orientation: bool = True, name: str = "given as bytes"
                 ) -> np.ndarray:
    """An image file's encoded bytes (what a web service receives, as `bytes` or a uint8 array)
    -> np.uint8[H, W, 3] RGB, decoded as read_image decodes files; DataError naming `name`."""
    data = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if data.size == 0:
        raise DataError(f"image {name} is an empty file")
    if _is_truncated_jpeg(data):
        # libjpeg decodes what is there and fills the rest with grey, with only a note on stderr
        raise DataError(f"image {name} is a truncated JPEG (no end-of-image marker): the file was cut short")
    try:
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as err:  # OpenCV raises for a size past its limits, or a damaged header, as well
        raise DataError(f"could not read image {name}: {_opencv_reason(err)}") from None
    if img is None:
        raise DataError(f"could not read image {name}: unreadable, corrupt or not an image format OpenCV decodes")
    img = _to_uint8(img, name)
    if img.ndim == 2:
        img = img[:, :, None]
    channels = img.shape[2]
    if channels not in _TO_RGB:
        raise DataError(f"image {name} has {channels} channels; expected 1 (gray), 3 (color) or 4 (with alpha)")
    if channels == 4:
        _say_if_transparent(img, name)
    # cvtColor drops the alpha channel of RGBA (as PIL's convert("RGB") does)
    img = cv2.cvtColor(img, _TO_RGB[channels])
    return np.ascontiguousarray(_as_asked(img, data, exif_orientation))


def _opencv_reason(err: Exception) -> str:
    """cv2.error's one useful line, and how to lift OpenCV's pixel limit when it is that."""
    text = " ".join(str(err).split())
    found = re.search(r"error: \([^)]*\) (.*)", text)  # after OpenCV's 'file:line: error: (-215:Assertion failed)'
    reason = found.group(1) if found else text
    limit = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS")
    if "CV_IO_MAX_IMAGE" in text and limit:  # a service's own cap
        reason += f" (the image is larger than this process decodes: OPENCV_IO_MAX_IMAGE_PIXELS={limit})"
    elif "CV_IO_MAX_IMAGE" in text:
        reason += (" (the image is larger than OpenCV decodes by default, 2^30 pixels or 2^20 a side: the "
                   "environment variable OPENCV_IO_MAX_IMAGE_PIXELS raises the limit, or tile the image)")
    return reason


def _as_asked(img: np.ndarray, data: np.ndarray, exif_orientation: bool) -> np.ndarray:
    """The decoded pixels turned by the file's orientation tag, or as stored. OpenCV's TIFF
    decoder (libtiff) turns the pixels itself whatever the flags: that one is undone instead."""
    tag = orientation(data.tobytes())
    if tag == 1:
        return img
    if data[:4].tobytes() in _TIFF_MAGIC:
        return img if exif_orientation else apply_orientation(img, INVERSE[tag])
    return apply_orientation(img, tag) if exif_orientation else img


# the file the 12-bit warning named: once per process (each data loader worker is one)
LOW_BIT_DEPTH_SAID: list[str] = []


def _say_if_low_bit_depth(img: np.ndarray, path: str) -> None:
    """A warning, once per process, for a 16-bit image whose values all fit 12 bits (Mono12 or
    RGB12 from an industrial or scientific camera, stored in a 16-bit PNG or TIFF): scaled by the
    full 16-bit range (/257) as the file's depth says, its brightest pixel is at most 16 of 255,
    and the model trains or runs on an almost black image (a formats trial; nothing said)."""
    if LOW_BIT_DEPTH_SAID or img.size == 0:
        return
    peak = int(img.max())
    if 0 < peak <= 4095:
        LOW_BIT_DEPTH_SAID.append(path)
        logger.warning("image %s is 16-bit with no value above %d (12-bit camera data?): read by the full 16-bit "
                       "range (/257), as every 16-bit file is, it is almost black (its brightest pixel %d of "
                       "255); scale such files to the full range (x16 for 12 bits) or to 8 bits before training "
                       "or inference (said once)", path, peak, round(peak / 257))


# the file the transparency warning named: once per process (each data loader worker is one)
TRANSPARENCY_SAID: list[str] = []


def _say_if_transparent(img: np.ndarray, path: str) -> None:
    """A warning, once per process, for an image with transparent pixels: its alpha channel is
    dropped (as PIL's convert("RGB") and Detectron2's read_image drop it), so a transparent pixel
    reads as the colour stored under it, most often black, not the background a viewer shows
    (an extreme-inputs trial: a square on transparent pixels scored 0.33, on grey 0.99, nothing said)."""
    if TRANSPARENCY_SAID or img.size == 0:
        return
    alpha = img[:, :, 3]
    opaque = np.iinfo(alpha.dtype).max
    share = float(np.count_nonzero(alpha < opaque)) / alpha.size
    if share > 0:
        TRANSPARENCY_SAID.append(path)
        logger.warning("image %s has transparent pixels (%.3g%% of it, alpha below opaque): the alpha channel is "
                       "dropped, as Detectron2 and PIL's convert('RGB') drop it, so they read as the colour stored "
                       "under them (often black), not as the background a viewer shows; flatten such images onto "
                       "the background you mean before training or inference (said once)", path, 100 * share)


def _is_truncated_jpeg(data: np.ndarray) -> bool:
    """A JPEG (starts with SOI, FF D8) cut short: no end-of-image marker (FF D9) after its first
    scan. The segments before the scan are stepped over by their lengths, so an EXIF thumbnail's
    own marker does not count; inside the scan's data FF is followed only by 00 or a restart
    marker, so the first FF D9 there is the image's end, and whatever follows it (a phone's
    motion-photo video, an editor's trailer) is not the image's business."""
    raw = data.tobytes()
    if len(raw) < 4 or raw[:2] != b"\xff\xd8":
        return False
    pos = 2
    while pos + 4 <= len(raw):
        if raw[pos] != 0xFF:
            return False  # not the marker that belongs here: the decoder says what is wrong
        marker = raw[pos + 1]
        if marker == 0xFF:  # a fill byte before a marker
            pos += 1
        elif marker == 0xD9:
            return False  # the end before any scan: the decoder says what is wrong
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
        elif marker == 0xDA:  # start of scan
            return raw.find(b"\xff\xd9", pos + 2 + int.from_bytes(raw[pos + 2:pos + 4], "big")) < 0
        else:
            pos += 2 + int.from_bytes(raw[pos + 2:pos + 4], "big")
    return True  # cut before the image data


def _to_uint8(img: np.ndarray, path: str) -> np.ndarray:
    """Map the stored depth to 0..255 by its full range (16-bit: /257, float: [0,1] -> [0,255]).
    A float image is 0..1 or 0..255 by `float_image_scale` (values over 1 of a 0..1 image, an
    HDR merge's highlights, clipped to white). A 16-bit image with no value above 4095 (12-bit
    camera data in a 16-bit file) reads almost black by the full range: said once per process."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        _say_if_low_bit_depth(img, path)
        # 65535 / 257 == 255 exactly: full-range scaling, independent of the image content
        return (img.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    if img.dtype in (np.float32, np.float64):
        img = np.nan_to_num(img.astype(np.float32))
        return np.clip(img * float_image_scale(img) + 0.5, 0, 255).astype(np.uint8)
    raise DataError(f"image {path} has unsupported pixel type {img.dtype}; expected 8-bit, 16-bit or float")
