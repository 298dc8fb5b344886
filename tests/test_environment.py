"""detection/utils/environment.py: what a run's records name as its code and machine."""
import subprocess

import torch

from detection.utils.environment import cpu_name, environment, environment_line, git_commit


def test_git_commit_names_the_checkout_and_its_uncommitted_changes(tmp_path):
    assert git_commit(tmp_path) is None  # not a checkout
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert git_commit(tmp_path) == head
    (tmp_path / "b.py").write_text("")  # untracked: not a change of the code that ran
    assert git_commit(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == f"{head} with uncommitted changes"


def test_the_environment_line_names_versions_processor_and_code():
    env = environment("cpu")
    assert list(env) == ["python", "torch", "torchvision", "numpy", "cpu", "code", "git"]
    assert env["torch"] == torch.__version__
    assert env["cpu"] == cpu_name() and env["cpu"].endswith(f"({torch.backends.cpu.get_cpu_capability()})")
    assert environment_line({"torch": "2.14.1", "cpu": "X (AVX2)"}) == "environment: torch 2.14.1, cpu X (AVX2)"
