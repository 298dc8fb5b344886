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

from detection.utils.files import WriteError, opencv_name_problem, unwritten_errno


class DrawnVideo:
    """`with DrawnVideo(path, fps) as video: video.write(rgb)` for each frame (RGB, the first's size);
    `path` appears when the block ends without an exception. WriteError when OpenCV cannot open
    the file for writing or the rename fails."""

    def __init__(self, path: Union[str, os.PathLike], fps: float,
                 keep_on: tuple[type[BaseException], ...] = ()) -> None:
        """`keep_on`: exceptions (a Ctrl-C, a stop by a signal) that end the block with the frames
        written so far kept as the video, not removed."""
        self.path, self.fps, self.keep_on = Path(path), float(fps), keep_on
        self.partial = self.path.with_name(f".{self.path.stem}.part{self.path.suffix}")  # FFmpeg: by its suffix
        self.writer: Optional[cv2.VideoWriter] = None
        self.frame_size: Optional[tuple[int, int]] = None  # (width, height): the first frame's
        self.size: Optional[tuple[int, int]] = None  # the video's: frame_size made even
        self.padded = False  # an odd frame size got a black row or column (the codec takes even sizes only)
        self.frames = 0

    def __enter__(self) -> "DrawnVideo":
        self.partial.unlink(missing_ok=True)
        return self

    def write(self, rgb: np.ndarray) -> None:
        """One frame; every frame the first's size (OpenCV drops a frame of another size without a word)."""
        height, width = rgb.shape[:2]
        if self.writer is None:  # opened at the first frame: its size as decoded (a phone video turned)
            self.frame_size = (width, height)
            # MPEG-4's 4:2:0 colour takes even sizes: OpenCV cut an odd one's last row and column in silence
            self.size = (width + width % 2, height + height % 2)
            self.padded = self.size != self.frame_size
            problem = opencv_name_problem(self.partial)
            if problem:
                raise WriteError(f"could not write video {self.path}: {problem}")
            self.writer = cv2.VideoWriter(str(self.partial), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self.size)
            if not self.writer.isOpened():
                raise WriteError(f"could not write video {self.path}: OpenCV cannot open it for writing (the folder "
                                 "is not writable, or its FFmpeg lacks the mp4v codec)",
                                 unwritten_errno(self.path.parent))
        if (width, height) != self.frame_size:
            raise ValueError(f"video {self.path}: a frame of {width}x{height}, the video is {self.frame_size[0]}x"
                             f"{self.frame_size[1]}")
        bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
        if self.padded:  # at the bottom and right: the boxes' pixel coordinates stay as they are
            bgr = cv2.copyMakeBorder(bgr, 0, self.size[1] - height, 0, self.size[0] - width, cv2.BORDER_CONSTANT)
        self.writer.write(bgr)
        self.frames += 1

    def __exit__(self, kind: Optional[type], error: Optional[BaseException], trace: Optional[TracebackType]) -> None:
        if self.writer is not None:
            self.writer.release()
        if error is not None and not (isinstance(error, self.keep_on) and self.frames):
            self.partial.unlink(missing_ok=True)
            return
        if not self.frames or not self.partial.is_file() or not self.partial.stat().st_size:
            self.partial.unlink(missing_ok=True)  # FFmpeg's errors (a full disk) reach no caller
            raise WriteError(f"could not write video {self.path}: nothing was written ({self.frames} frames given; "
                             "is the disk full?)", unwritten_errno(self.path.parent))
        try:
            os.replace(self.partial, self.path)
        except OSError as err:
            self.partial.unlink(missing_ok=True)
            raise WriteError(f"could not write video {self.path}: {err.strerror or err}", err.errno,
                             err.strerror) from None
