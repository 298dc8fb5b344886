"""The README's own-data walkthrough, run as written: its shell commands, its config file and its
Python lines, taken from README.md itself (between the walkthrough markers), so the README
cannot drift from what works. Only the training length is shortened, on the command line."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from tests.helpers import write_photo

pytestmark = pytest.mark.slow  # trains, evaluates and draws through the command lines
ROOT = Path(__file__).resolve().parents[1]
SHORT = ["solver.max_iter=2", "solver.checkpoint_period=2", "solver.warmup_iters=1", "solver.steps=[100]"]


def walkthrough_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("<!-- walkthrough:start -->", 1)[1].split("<!-- walkthrough:end -->", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


def shell_commands(block: str) -> list[list[str]]:
    joined = block.replace("\\\n", " ")
    return [shlex.split(line.split("#", 1)[0]) for line in joined.splitlines() if line.split("#", 1)[0].strip()]


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    assert argv[0] == "python" and argv[1].startswith("tools/"), argv
    extra = SHORT if argv[1] == "tools/train_det.py" else []
    out = subprocess.run([sys.executable, str(ROOT / argv[1]), *argv[2:], *extra], cwd=cwd,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(argv)}\n{out.stdout[-1500:]}\n{out.stderr[-1500:]}"
    return out


def as_phone_photos(data: Path) -> tuple[int, int]:
    """The user's images come from a phone (README "Phone photos"): rewrite some as a phone
    stores them (turned back, with the EXIF orientation tag; the annotation as viewed).
    -> the viewed (height, width) of val_000000.jpg, the image the README's Predictor reads."""
    from detection.data import read_image

    for path, tag in ((data / "val" / "val_000000.jpg", 6), (data / "val" / "val_000001.jpg", 3),
                      (data / "train" / "train_000000.jpg", 8), (data / "train" / "train_000001.jpg", 6)):
        viewed = read_image(str(path))
        path.unlink()  # make_shapes links the VOC folder's copy to the same file
        write_photo(path, viewed, tag)
        if path.name == "val_000000.jpg":
            shape = viewed.shape[:2]
    assert shape[0] != shape[1]  # so that a sideways reading shows in the size
    return shape


def test_own_data_walkthrough_runs_as_written(tmp_path, monkeypatch):
    blocks = walkthrough_blocks()
    assert [kind for kind, _ in blocks] == ["bash", "yaml", "bash", "python"]
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # the config sits "beside configs/"
    monkeypatch.delenv("DETECTION_DATASETS", raising=False)
    for argv in shell_commands(blocks[0][1]):
        run(argv, tmp_path)
    viewed = as_phone_photos(tmp_path / "my_data")
    (tmp_path / "my_config.yaml").write_text(blocks[1][1])
    outputs = [run(argv, tmp_path) for argv in shell_commands(blocks[2][1])]
    run_dir = tmp_path / "output" / "my_run"
    assert (run_dir / "model_final.pth").is_file() and (run_dir / "config.yaml").is_file()
    assert "AP50" in outputs[1].stdout and list((run_dir / "inference").rglob("metrics.json"))
    assert len(list((run_dir / "vis").glob("*.jpg"))) == 4
    drawn = cv2.imread(str(run_dir / "vis" / "00000_val_000000.jpg"))
    assert drawn.shape[:2] == viewed  # the phone photo drawn as viewed, not as stored
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[3][1], "README walkthrough", "exec"), namespace)  # noqa: S102 - the README's own lines
    assert set(namespace["out"]) == {"boxes", "scores", "labels"}
    assert namespace["predictor"].class_names == ["circle", "square", "triangle"]
    boxes = namespace["out"]["boxes"]  # the phone photo's detections are in its viewed frame
    assert len(boxes) == 0 or (float(boxes[:, 2].max()) <= viewed[1] and float(boxes[:, 3].max()) <= viewed[0])
    assert os.getcwd() == str(tmp_path)
