"""Drawn frames written as a video (MPEG-4 Part 2 in an .mp4: the codec OpenCV's own FFmpeg
writes everywhere without extra libraries), whole or not at all: frames go to a hidden file in
the same folder, renamed to the video's name when the last is written (a killed run leaves no
half video under that name, and a link there is replaced, not written through)."""
from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Optional, Union

import cv2
import numpy as np

from detection.utils.files import WriteError


class DrawnVideo:
    """`with DrawnVideo(path, fps) as video: video.write(rgb)` for each frame (RGB, the first's size);
    `path` appears when the block ends without an exception. WriteError when OpenCV cannot open
    the file for writing or the rename fails."""

    def __init__(self, path: Union[str, os.PathLike], fps: float) -> None:
        self.path, self.fps = Path(path), float(fps)
        self.partial = self.path.with_name(f".{self.path.stem}.part{self.path.suffix}")  # FFmpeg: by its suffix
        self.writer: Optional[cv2.VideoWriter] = None
        self.size: Optional[tuple[int, int]] = None  # (width, height): the first frame's
        self.frames = 0

    def __enter__(self) -> "DrawnVideo":
        self.partial.unlink(missing_ok=True)
        return self

    def write(self, rgb: np.ndarray) -> None:
        """One frame; every frame the first's size (OpenCV drops a frame of another size without a word)."""
        height, width = rgb.shape[:2]
        if self.writer is None:  # opened at the first frame: its size as decoded (a phone video turned)
            self.size = (width, height)
            self.writer = cv2.VideoWriter(str(self.partial), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self.size)
            if not self.writer.isOpened():
                raise WriteError(f"could not write video {self.path}: OpenCV cannot open it for writing (the folder "
                                 "is not writable, or its FFmpeg lacks the mp4v codec)")
        if (width, height) != self.size:
            raise ValueError(f"video {self.path}: a frame of {width}x{height}, the video is {self.size[0]}x"
                             f"{self.size[1]}")
        self.writer.write(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
        self.frames += 1

    def __exit__(self, kind: Optional[type], error: Optional[BaseException], trace: Optional[TracebackType]) -> None:
        if self.writer is not None:
            self.writer.release()
        if error is not None:
            self.partial.unlink(missing_ok=True)
            return
        if not self.frames or not self.partial.is_file() or not self.partial.stat().st_size:
            self.partial.unlink(missing_ok=True)  # FFmpeg's errors (a full disk) reach no caller
            raise WriteError(f"could not write video {self.path}: nothing was written ({self.frames} frames given; "
                             "is the disk full?)")
        try:
            os.replace(self.partial, self.path)
        except OSError as err:
            self.partial.unlink(missing_ok=True)
            raise WriteError(f"could not write video {self.path}: {err.strerror or err}", err.errno,
                             err.strerror) from None
