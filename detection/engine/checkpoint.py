"""Checkpoints written atomically, and the random states that make a resume exact.

With several processes every rank's random states are saved (gathered to rank 0 into the
checkpoint's "rng_per_rank", rank order) and each rank restores its own: the ranks' torch
generators differ after the first step (each samples anchors and RoIs for its own images).
"rng" keeps rank 0's states, as single-process checkpoints always had.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from detection.utils import comm
from detection.utils.files import atomic_write

# what --resume needs from last.pth (model_final.pth holds only model, iteration, config, classes)
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "iteration", "rng")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file."""


def save_checkpoint(state: dict, path: Union[str, Path]) -> None:
    """Write `state` to `path` so that a crash, a kill or a failing disk (OSError such as
    ENOSPC) mid-way leaves the old file intact and no temporary file behind: temporary file
    in the same folder, flush + fsync, atomic rename, fsync of the folder
    (detection.utils.files.atomic_write)."""
    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: Union[str, Path]) -> dict:
    """Load a checkpoint with `weights_only=True` (no code runs from the file)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        text = " ".join(str(err).split())[:300]  # one line: torch's messages span many
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {text})") from None


def load_resume_checkpoint(path: Union[str, Path]) -> dict:
    """load_checkpoint, checked for everything an exact resume needs (RESUME_KEYS), so that a
    model_final.pth or a foreign file copied to last.pth is one error, not a KeyError later."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a training checkpoint")
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: cannot resume from it, it lacks {', '.join(missing)} (a training "
                              "checkpoint as last.pth holds them; model.weights=PATH starts a new run from weights)")
    if not isinstance(ckpt["iteration"], int) or isinstance(ckpt["iteration"], bool) or ckpt["iteration"] < 0:
        raise CheckpointError(f"{path}: 'iteration' is {ckpt['iteration']!r}, not an iteration number")
    return ckpt


def get_rng_states() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and, where present, CUDA) generator states, in types
    that `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(_to_tuple(states["python"]))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's random states in rank order (a collective: every rank calls it)."""
    return comm.all_gather_object(get_rng_states())


def restore_rng_states(ckpt: dict, path: Union[str, Path] = "the checkpoint") -> Optional[str]:
    """Set this rank's own random states from `ckpt`; returns None when the resume is exact,
    else the one line saying what is not (the number of processes changed)."""
    per_rank = ckpt.get("rng_per_rank")
    rank, world = comm.get_rank(), comm.get_world_size()
    saved_world = len(per_rank) if per_rank else 1
    if per_rank and rank < len(per_rank):
        set_rng_states(per_rank[rank])
    else:
        set_rng_states(ckpt["rng"])
    if saved_world == world:
        return None
    return (f"{path} was written by {saved_world} process{'es' if saved_world > 1 else ''} and is resumed with "
            f"{world}: the data order and the random sampling of anchors and RoIs differ from an uninterrupted "
            "run's from here on, so the result is a valid continuation but not bit-identical")


def _to_tuple(value: Any) -> Any:
    """random.setstate needs tuples; a round trip through a checkpoint may give lists."""
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
