"""EXIF orientation: phone photos are stored as the sensor saw them, with a tag saying how to
turn them for viewing. Annotation tools (and Detectron2's `read_image`, through PIL's
`ImageOps.exif_transpose`) show the turned view, so the boxes refer to it; an image read
without the tag is sideways or upside down against its own boxes.

`orientation` reads the tag from the file header (PIL, no pixels decoded), `apply_orientation`
turns a decoded (H, W, C) array as `exif_transpose` does, and `check_image_sizes` compares
every image's size as read against its annotation when a data set is built, so a mismatch
is one error before the first iteration instead of a stop inside a loader worker.
"""
from __future__ import annotations

import io
import logging
import threading
import warnings
from collections.abc import Sequence
from typing import BinaryIO, Union

import numpy as np
from PIL import Image

from detection.data import DataError
from detection.data.dataset_info import DatasetInfo
from detection.utils.text import first_few

logger = logging.getLogger(__name__)

ORIENTATION_TAG = 0x0112  # EXIF / TIFF "Orientation"
# tag value -> how the stored image is turned for viewing (PIL's exif_transpose methods)
DESCRIPTIONS = {
    1: "upright", 2: "mirrored left-right", 3: "rotated 180 degrees", 4: "mirrored top-bottom",
    5: "transposed", 6: "rotated 90 degrees clockwise", 7: "transversed", 8: "rotated 90 degrees counter-clockwise",
}
SWAPS_SIDES = frozenset({5, 6, 7, 8})  # the viewed image is the stored one's height x width
INVERSE = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}  # the tag whose turn undoes each one's


def orientation(source: Union[str, bytes, BinaryIO]) -> int:
    """The EXIF orientation (1..8) of an image file or its bytes; 1 (as stored) when there is
    no tag, the value is out of range, or the header cannot be parsed: a broken metadata
    block must not stop an image whose pixels decode (PIL ignores such values too)."""
    opened = _open_header(source)
    if opened is None:
        return 1
    with opened as image:
        return _tag_of(image)


def header_size(path: str, *, apply_tag: bool) -> tuple[int, int, int] | None:
    """(height, width, orientation) of the image as read_image returns it (turned by the tag
    when `apply_tag`), from the header only; None when PIL cannot parse the header (the
    loader still checks the decoded size of such a file)."""
    opened = _open_header(path)
    if opened is None:
        return None
    with opened as image:
        width, height = _stored_size(image)
        tag = _tag_of(image)
    if apply_tag and tag in SWAPS_SIDES:
        width, height = height, width
    return int(height), int(width), tag


def _stored_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as the file stores the pixels. PIL reports that, except for TIFF in
    recent Pillow (13 here): its reader gives the size already turned by the orientation tag
    (5-8 swap the sides) and turns the pixels on load; the TIFF's own ImageWidth / ImageLength
    tags (256, 257) hold the stored size in every version."""
    if image.format == "TIFF":
        stored = (image.tag_v2.get(256), image.tag_v2.get(257))
        if all(isinstance(v, int) and v > 0 for v in stored):
            return stored
    return image.size


def apply_orientation(img: np.ndarray, tag: int) -> np.ndarray:
    """Turn a stored (H, W, C) array to its viewed orientation, as ImageOps.exif_transpose."""
    if tag == 2:
        return img[:, ::-1]  # FLIP_LEFT_RIGHT
    if tag == 3:
        return img[::-1, ::-1]  # ROTATE_180
    if tag == 4:
        return img[::-1]  # FLIP_TOP_BOTTOM
    if tag == 5:
        return img.transpose(1, 0, 2)  # TRANSPOSE: mirror about the main diagonal
    if tag == 6:
        return np.rot90(img, k=-1)  # ROTATE_270 (counter-clockwise) = 90 degrees clockwise
    if tag == 7:
        return np.rot90(img, k=2).transpose(1, 0, 2)  # TRANSVERSE: mirror about the other diagonal
    if tag == 8:
        return np.rot90(img, k=1)  # ROTATE_90 counter-clockwise
    return img


def _open_header(source: Union[str, bytes, BinaryIO]) -> Image.Image | None:
    """PIL's lazy open (header only), or None for what PIL cannot parse. Nothing here may warn
    or fail: the pixels are OpenCV's business (a header PIL finds corrupt: a JPEG's EXIF block
    is parsed on opening already). A very large image's header is read too: PIL refuses to open
    one over twice its pixel limit (179 MP by default: a 200 MP phone photo), which lost the tag
    of such a photo (read sideways, in silence), though OpenCV decodes its pixels."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    start = source.tell() if hasattr(source, "tell") else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return Image.open(source)
            except Image.DecompressionBombError:
                if start is not None:
                    source.seek(start)
                with _PIXEL_LIMIT_LIFTED:  # PIL's limit is a module global: put back at once
                    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                    try:
                        return Image.open(source)  # the header only: no pixel is decoded here
                    finally:
                        Image.MAX_IMAGE_PIXELS = limit
    except Exception:  # noqa: BLE001 - OSError, SyntaxError, struct.error, ...
        return None


# held while PIL's pixel limit is lifted to read a very large image's header (one at a time)
_PIXEL_LIMIT_LIFTED = threading.Lock()


def _tag_of(image: Image.Image) -> int:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns of a corrupt EXIF block: the tag is then taken as absent
            return _parse_tag(image)
    except Exception:  # noqa: BLE001 - any malformed metadata block: read the pixels as stored
        return 1


def _parse_tag(image: Image.Image) -> int:
    if image.format == "PNG":
        # PNG's getexif() decodes every pixel to look for an eXIf chunk after them: the chunk
        # is taken from the header, else found by walking the chunks' headers past the pixels
        raw = image.info.get("exif") or _png_exif_after_pixels(image.fp)
        exif = Image.Exif()
        if raw:
            exif.load(raw)
    else:
        exif = image.getexif()
    value = exif.get(ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and value in DESCRIPTIONS else 1


def _png_exif_after_pixels(fp: BinaryIO | None) -> bytes | None:
    """A PNG's eXIf chunk written after its image data (some writers put it there; PIL's
    exif_transpose finds it), as PIL keeps a header's ("Exif\\0\\0" + the chunk): each chunk's
    8-byte header is read and its data skipped, so no pixel is read or decoded."""
    if fp is None:
        return None
    start = fp.tell()
    try:
        fp.seek(8)  # past the PNG signature
        while True:
            head = fp.read(8)
            if len(head) < 8:
                return None
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind == b"eXIf":
                data = fp.read(length)
                return b"Exif\x00\x00" + data if len(data) == length else None
            if kind == b"IEND":
                return None
            fp.seek(length + 4, io.SEEK_CUR)  # the data and its CRC
    finally:
        fp.seek(start)


def check_image_sizes(info: DatasetInfo, *, skip: bool) -> None:
    """Every image's size as read (the EXIF tag applied when info.exif_orientation) against
    its annotation's width and height, from the headers. Mismatches are one DataError listing
    them (with `skip`: left out, one warning). Tags found are reported in one line: as info
    when applied, as a warning when input.exif_orientation: false ignores them."""
    mismatched, tagged = [], []
    for record in info.records:
        size = header_size(record["file_name"], apply_tag=info.exif_orientation)
        if size is None:
            continue
        height, width, tag = size
        if tag != 1:
            tagged.append(record["file_name"])
        if (height, width) != (record["height"], record["width"]):
            mismatched.append((record, width, height, tag))
    _report_tags(info, tagged)
    if not mismatched:
        return
    message = (f"{info.name}: {len(mismatched)} of {len(info.records)} images are not the size their annotation "
               f"({info.ann_file or info.root or info.name}) gives: {_first_mismatches(mismatched, info)}; "
               f"{_mismatch_hint(mismatched, info.exif_orientation)}")
    if not skip:
        raise DataError(f"{message}; or set dataloader.skip_bad_images: true to leave them out")
    logger.warning("%s; left out (dataloader.skip_bad_images)", message)
    bad = {id(m[0]) for m in mismatched}
    info.records = [r for r in info.records if id(r) not in bad]


def _report_tags(info: DatasetInfo, tagged: Sequence[str]) -> None:
    if not tagged:
        return
    listing = first_few(tagged, 3)
    if info.exif_orientation:
        logger.info("%s: %d images carry an EXIF orientation tag; they are read turned as it says, as viewed "
                    "(input.exif_orientation): %s", info.name, len(tagged), listing)
    else:
        logger.warning("%s: %d images carry an EXIF orientation tag that input.exif_orientation: false ignores: "
                       "their boxes must refer to the stored pixels, not the view a photo app shows: %s",
                       info.name, len(tagged), listing)


def _first_mismatches(mismatched: Sequence[tuple], info: DatasetInfo, limit: int = 5) -> str:
    parts = []
    for record, width, height, tag in mismatched[:limit]:
        how = f" ({'as viewed, ' if info.exif_orientation else 'as stored, '}EXIF orientation {tag}: " \
              f"{DESCRIPTIONS[tag]})" if tag != 1 else ""
        parts.append(f"{record['file_name']} is {width}x{height} (WxH){how}, annotated "
                     f"{record['width']}x{record['height']}")
    more = f", ... ({len(mismatched) - limit} more)" if len(mismatched) > limit else ""
    return ", ".join(parts) + more


def _mismatch_hint(mismatched: Sequence[tuple], applied: bool) -> str:
    """What to change: the setting when every mismatch is a side-swapping tag the other
    setting would resolve, else the annotation."""
    swapped = all(tag in SWAPS_SIDES and (record["height"], record["width"]) == (width, height)
                  for record, width, height, tag in mismatched)
    if swapped and applied:
        return ("the annotation gives the stored (unturned) size: if its boxes refer to the stored pixels too, "
                "set input.exif_orientation: false")
    if swapped:
        return "the annotation gives the size as viewed with the EXIF tag: set input.exif_orientation: true"
    return "boxes would be misplaced; fix the annotation's width and height (or the image file)"


