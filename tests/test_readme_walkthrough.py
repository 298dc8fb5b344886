"""The README's own-data walkthrough, run as written: its shell commands, its config file and its
Python lines, taken from README.md itself (between the walkthrough markers), so the README
cannot drift from what works. Only the training length is shortened, on the command line."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_own_data_walkthrough_runs_as_written(tmp_path, monkeypatch):
    blocks = walkthrough_blocks()
    assert [kind for kind, _ in blocks] == ["bash", "yaml", "bash", "python"]
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # the config sits "beside configs/"
    monkeypatch.delenv("DETECTION_DATASETS", raising=False)
    for argv in shell_commands(blocks[0][1]):
        run(argv, tmp_path)
    (tmp_path / "my_config.yaml").write_text(blocks[1][1])
    outputs = [run(argv, tmp_path) for argv in shell_commands(blocks[2][1])]
    run_dir = tmp_path / "output" / "my_run"
    assert (run_dir / "model_final.pth").is_file() and (run_dir / "config.yaml").is_file()
    assert "AP50" in outputs[1].stdout and list((run_dir / "inference").rglob("metrics.json"))
    assert len(list((run_dir / "vis").glob("*.jpg"))) == 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[3][1], "README walkthrough", "exec"), namespace)  # noqa: S102 - the README's own lines
    assert set(namespace["out"]) == {"boxes", "scores", "labels"}
    assert namespace["predictor"].class_names == ["circle", "square", "triangle"]
    assert os.getcwd() == str(tmp_path)
