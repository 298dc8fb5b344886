"""Video in and out (tools/visualize.py --input clip.mp4): frames read in order with their times,
drawn frames written as a video whole or not at all."""
from __future__ import annotations

import numpy as np
import pytest

from detection.data import DataError
from detection.data.video import VideoFrames, is_video
from detection.utils.files import WriteError
from detection.visualization.video import DrawnVideo


def _frames(count: int, size=(80, 64)) -> list[np.ndarray]:
    """Flat RGB frames, each a colour of its own (a lossy codec keeps a flat colour close)."""
    return [np.full((size[1], size[0], 3), (40 * i % 256, 255 - 30 * i, 90), np.uint8) for i in range(count)]


def test_frames_come_in_order_as_rgb_with_their_times_and_the_video_is_whole(tmp_path):
    path = tmp_path / "clip.mp4"
    frames = _frames(5)
    with DrawnVideo(path, fps=4) as video:
        for frame in frames:
            video.write(frame)
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no partial file left
    read = VideoFrames(path)
    assert (read.width, read.height, read.fps, read.frame_count) == (80, 64, 4.0, 5)
    got = list(read)
    assert [f.index for f in got] == [0, 1, 2, 3, 4] and [f.time_s for f in got] == pytest.approx([0, .25, .5, .75, 1])
    for frame, expected in zip(got, frames):  # RGB, not OpenCV's BGR: the red channel is the first
        assert frame.image.shape == (64, 80, 3) and np.abs(frame.image.astype(int) - expected).max() <= 6
    assert [f.index for f in VideoFrames(path, limit=2)] == [0, 1]


def test_a_run_that_fails_midway_leaves_no_video_under_the_name(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"an earlier run's video")
    with pytest.raises(RuntimeError, match="killed"):
        with DrawnVideo(path, fps=4) as video:
            video.write(_frames(1)[0])
            raise RuntimeError("killed")
    assert path.read_bytes() == b"an earlier run's video" and [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]
    with pytest.raises(ValueError, match="a frame of 40x64, the video is 80x64"):  # OpenCV drops it in silence
        with DrawnVideo(path, fps=4) as video:
            video.write(_frames(1)[0])
            video.write(_frames(1, size=(40, 64))[0])
    # a stop (Ctrl-C, SIGTERM) keeps the frames drawn so far, when asked: a long clip's work is not lost
    with pytest.raises(KeyboardInterrupt):
        with DrawnVideo(tmp_path / "stopped.mp4", fps=4, keep_on=(KeyboardInterrupt,)) as video:
            for frame in _frames(3):
                video.write(frame)
            raise KeyboardInterrupt
    assert VideoFrames(tmp_path / "stopped.mp4").frame_count == 3
    (tmp_path / "stopped.mp4").unlink()
    with pytest.raises(WriteError, match="nothing was written"):
        with DrawnVideo(tmp_path / "empty.mp4", fps=4):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_a_file_that_is_not_a_video_is_one_error_naming_it(tmp_path):
    bad = tmp_path / "holiday.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(DataError, match=f"could not read video {bad}"):
        list(VideoFrames(bad))
    with pytest.raises(DataError, match="video file not found"):
        VideoFrames(tmp_path / "missing.mp4")
    assert is_video("a/b.MP4") and is_video("x.mov") and not is_video("x.jpg")


def test_an_odd_frame_size_is_padded_not_cut(tmp_path):
    """MPEG-4's colour takes even sizes: OpenCV cut a 185x161 frame's last column and row without a
    word (a trial: the README said "the input's size"). A black column and row are added at the
    right and bottom instead, where no box's coordinates move."""
    path = tmp_path / "odd.mp4"
    frame = np.zeros((161, 185, 3), np.uint8)
    frame[:, -1] = frame[-1, :] = 255  # the last column and row: white, the ones that were cut
    with DrawnVideo(path, fps=4) as video:
        video.write(frame)
    assert video.padded and video.size == (186, 162)
    back = next(iter(VideoFrames(path))).image
    assert back.shape == (162, 186, 3)
    assert back[80, 184].mean() > 200 and back[160, 90].mean() > 200  # kept
    assert back[80, 185].mean() < 40 and back[161, 90].mean() < 40  # the pixels added


def test_a_name_that_is_not_utf8_is_one_error_not_a_crash(tmp_path):
    """An old archive's Latin-1 "café.mp4": OpenCV given such a name crashes the whole process (a
    segmentation fault, no message); here it is one error naming the file, read or written."""
    import os

    latin = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9.mp4"))
    with DrawnVideo(tmp_path / "clip.mp4", fps=4) as video:
        video.write(_frames(1)[0])
    os.rename(tmp_path / "clip.mp4", latin)
    with pytest.raises(DataError, match=r"could not read video .*caf.*\.mp4: its name is not UTF-8, which OpenCV "
                                        r"cannot open by name: rename it in UTF-8"):
        VideoFrames(latin)
    with pytest.raises(WriteError, match=r"could not write video .*: its name is not UTF-8"):
        with DrawnVideo(latin.replace(".mp4", "_drawn.mp4"), fps=4) as video:
            video.write(_frames(1)[0])
