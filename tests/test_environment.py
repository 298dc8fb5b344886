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


def test_the_command_under_torchrun_names_torchrun_and_its_process_counts(monkeypatch):
    """A distributed trial: log.txt and environment.json said `python tools/train_det.py ...` for
    a two-process run, the same as a one-process one's."""
    from detection.utils.environment import command_line

    for key in ("LOCAL_WORLD_SIZE", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    assert command_line(["tools/eval.py", "--weights", "a b.pth"]) == "python tools/eval.py --weights 'a b.pth'"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert command_line(["tools/train_det.py", "--config", "c.yaml"]) == \
        "torchrun --nproc_per_node=2 tools/train_det.py --config c.yaml"
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert command_line(["tools/train_det.py"]) == "torchrun --nnodes=2 --nproc_per_node=8 tools/train_det.py"
