"""What a run ran on, for its records: the command line, the library versions, the processor and
the code's version. Training logs them at its start (log.txt); tools/eval.py writes them to its
test-set folders' environment.json; tools/ablate.py keys its saved rows by the code's version.
A number with these beside it can be run again (Detectron2's log starts with its
collect_env_info and command line)."""
from __future__ import annotations

import hashlib
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

PACKAGES = (Path(__file__).resolve().parents[1], Path(__file__).resolve().parents[2] / "backbones")


def code_version(roots: tuple[Path, ...] | None = None) -> str:
    """A hash of the toolkit's Python sources (the `detection` and `backbones` packages, each
    file's path in its package and its bytes): an edit of the code, or a checkout of another
    commit, changes it (setup.py's version does not change with them)."""
    digest = hashlib.sha256()
    for root in PACKAGES if roots is None else roots:
        for path in sorted(Path(root).rglob("*.py")):
            digest.update(f"{Path(root).name}/{path.relative_to(root).as_posix()}\0".encode("utf-8"))
            digest.update(path.read_bytes())
    return digest.hexdigest()


def git_commit(folder: Path = PACKAGES[0]) -> str | None:
    """The commit of the checkout holding `folder` ("<hash> with uncommitted changes" when the
    tracked files differ from it); None outside a git checkout or without git."""
    try:
        run = [subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
               for args in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"])]
    except (OSError, subprocess.SubprocessError):
        return None
    if any(r.returncode != 0 for r in run):
        return None
    return run[0].stdout.strip() + (" with uncommitted changes" if run[1].stdout.strip() else "")


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo on Linux) and the instruction set PyTorch's CPU
    kernels use (AVX2, AVX512, ...): which decides, e.g., whether bfloat16 runs."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def environment(device: torch.device | str | None = None) -> dict[str, str]:
    """The versions and the machine a run's numbers come from."""
    import torchvision

    out = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "numpy": np.__version__, "cpu": cpu_name()}
    if device is not None and torch.device(device).type == "cuda":
        out["gpu"] = f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"
    out["code"] = code_version()[:16]
    out["git"] = git_commit() or "not a git checkout"
    return out


def environment_line(env: dict[str, str]) -> str:
    return "environment: " + ", ".join(f"{key} {value}" for key, value in env.items())


def command_line(argv: list[str] | None = None) -> str:
    """The command that started this process, as a shell would take it back; under torchrun
    (its environment: LOCAL_WORLD_SIZE, WORLD_SIZE) as torchrun with its process counts (its
    other options, the rendezvous, are not known here)."""
    env = os.environ
    launcher = ["python"]
    if "LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env and "TORCHELASTIC_RUN_ID" in env:
        local, world = int(env["LOCAL_WORLD_SIZE"]), int(env["WORLD_SIZE"])
        launcher = ["torchrun", *([f"--nnodes={world // max(local, 1)}"] if world != local else []),
                    f"--nproc_per_node={local}"]
    return shlex.join([*launcher, *(sys.argv if argv is None else argv)])
