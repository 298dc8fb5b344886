"""A video's frames as RGB images, read by OpenCV (its FFmpeg): what tools/visualize.py runs a
model on when --input names a video (Detectron2's demo --video-input).

Frames come as np.uint8[H, W, 3] RGB, as read_image gives an image; OpenCV turns a phone's
video as its rotation tag says (its CAP_PROP_ORIENTATION_AUTO default, as a player shows it).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from detection.data import DataError
from detection.utils.files import opencv_name_problem

# what --input takes as a video (OpenCV's FFmpeg reads these containers)
VIDEO_EXTS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv")
DEFAULT_FPS = 30.0  # a video whose header gives no frame rate is written at this one


def is_video(path: Union[str, os.PathLike]) -> bool:
    """A file named as a video (by its extension)."""
    return Path(path).suffix.lower() in VIDEO_EXTS


@dataclass
class Frame:
    index: int  # from 0, in the order played
    time_s: float  # the frame's time in the video (its index / fps where the container gives none)
    image: np.ndarray  # np.uint8[H, W, 3] RGB


class VideoFrames:
    """`for frame in VideoFrames(path)`: its frames in order, each a Frame. `fps`, `width`,
    `height` from the video's header; `frame_count` its count (the container's figure: FFmpeg's is
    an estimate for some formats, so `read` says how many came). A file OpenCV cannot open as a
    video, or one that gives no frame, is a DataError naming it."""

    def __init__(self, path: Union[str, os.PathLike], limit: int = 0) -> None:
        import cv2  # imported where used: OpenCV is slow to import, and tools/visualize.py imports VIDEO_EXTS

        self.path, self.limit = str(path), limit
        if not os.path.isfile(self.path):
            raise DataError(f"video file not found: {self.path}")
        problem = opencv_name_problem(self.path)
        if problem:
            raise DataError(f"could not read video {self.path}: {problem}")
        self.capture = cv2.VideoCapture(self.path)
        if not self.capture.isOpened():
            raise DataError(f"could not read video {self.path}: OpenCV (its FFmpeg) cannot open it: not a video, "
                            "damaged, or a codec it lacks")
        fps = self.capture.get(cv2.CAP_PROP_FPS)
        self.fps_given = math.isfinite(fps) and 0 < fps < 1000  # some containers give 0 or 90000
        self.fps = fps if self.fps_given else DEFAULT_FPS
        self.width = int(self.capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        self.height = int(self.capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        count = self.capture.get(cv2.CAP_PROP_FRAME_COUNT)
        self.frame_count = int(count) if math.isfinite(count) and count > 0 else 0
        self.read = 0

    def __iter__(self) -> Iterator[Frame]:
        import cv2

        try:
            while not self.limit or self.read < self.limit:
                ok, bgr = self.capture.read()
                if not ok:
                    break
                if bgr.ndim == 2:  # a grey video
                    bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
                # the frame's own time stamp where the container gives one (0 past the first frame: none)
                msec = self.capture.get(cv2.CAP_PROP_POS_MSEC)
                given = math.isfinite(msec) and (msec > 0 or self.read == 0)
                time_s = msec / 1000.0 if given else self.read / self.fps
                yield Frame(self.read, time_s, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                self.read += 1
        finally:
            self.capture.release()
        if not self.read:
            raise DataError(f"could not read video {self.path}: OpenCV opened it but gave no frame (empty, damaged, "
                            "or a codec it lacks)")
