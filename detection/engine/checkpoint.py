"""Checkpoints written atomically, and the random states that make a resume exact.

With several processes every rank's random states are saved (gathered to rank 0 into the
checkpoint's "rng_per_rank", rank order) and each rank restores its own: the ranks' torch
generators differ after the first step (each samples anchors and RoIs for its own images).
"rng" keeps rank 0's states, as single-process checkpoints always had.
"""
from __future__ import annotations

import logging
import math
import random
import re
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from backbones.weights import zip_damage
from detection.utils import comm
from detection.utils.files import atomic_write, dangling_link

# what --resume needs from last.pth (model_final.pth holds only model, iteration, config, classes)
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "iteration", "rng")
# solver.keep_checkpoints: the periodic checkpoints kept besides last.pth, as Detectron2 names them
PERIODIC_NAME = "model_{:07d}.pth"
_PERIODIC = re.compile(r"model_(\d{7})\.pth")

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file."""


def save_checkpoint(state: dict, path: Union[str, Path]) -> None:
    """Write `state` to `path` so that a crash, a kill or a failing disk (OSError such as
    ENOSPC) mid-way leaves the old file intact and no temporary file behind: temporary file
    in the same folder, flush + fsync, atomic rename, fsync of the folder
    (detection.utils.files.atomic_write)."""
    with atomic_write(path, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as err:
            # torch's zip writer meets the write's own error (a full disk: OSError; a second
            # Ctrl-C: KeyboardInterrupt) and raises "enforce fail ... unexpected pos" on closing:
            # the first one is what happened, and what the callers handle
            if isinstance(err.__context__, (OSError, KeyboardInterrupt)):
                raise err.__context__ from None
            raise


def periodic_checkpoint_path(out_dir: Union[str, Path], iteration: int) -> Path:
    return Path(out_dir) / PERIODIC_NAME.format(iteration)


def periodic_checkpoints(out_dir: Union[str, Path], up_to: int) -> list[int]:
    """The iterations of the model_{iter:07d}.pth files in out_dir up to iteration `up_to`,
    ascending: on a resume, the run's own (a later one is rewritten when the run gets there)."""
    try:
        names = [p.name for p in Path(out_dir).iterdir()]
    except OSError:
        return []
    return sorted(int(m.group(1)) for m in map(_PERIODIC.fullmatch, names) if m and int(m.group(1)) <= up_to)


def prune_checkpoints(out_dir: Union[str, Path], iterations: list[int], keep: int) -> list[int]:
    """Delete the periodic checkpoints of all but the last `keep` of `iterations` (call it once
    the newest is written, so a failed save never costs an old one); returns the kept ones.
    A file that cannot be deleted is a warning, not a reason to stop training."""
    iterations = sorted(set(iterations))
    cut = max(len(iterations) - keep, 0)
    old, kept = iterations[:cut], iterations[cut:]
    for iteration in old:
        path = periodic_checkpoint_path(out_dir, iteration)
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            logger.warning("could not delete the old checkpoint %s (%s); it stays", path, err.strerror or err)
    return kept


def load_checkpoint(path: Union[str, Path]) -> dict:
    """Load a checkpoint with `weights_only=True` (no code runs from the file)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found{dangling_link(path)}")
    verify_checksums(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        text = " ".join(str(err).split())[:300]  # one line: torch's messages span many
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {text})") from None


def verify_checksums(path: Path) -> None:
    """CheckpointError for a zip whose records are cut short or whose bytes do not match their
    stored CRC-32 (backbones.weights.zip_damage: torch.load checks neither)."""
    damage = zip_damage(path)
    if damage:
        raise CheckpointError(f"{path}: a damaged checkpoint ({damage})")


def load_resume_checkpoint(path: Union[str, Path]) -> dict:
    """load_checkpoint, checked for everything an exact resume needs (RESUME_KEYS), so that a
    model_final.pth or a foreign file copied to last.pth is one error, not a KeyError later. A
    damaged one names the newest periodic checkpoint beside it (solver.keep_checkpoints), the
    way out."""
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as err:
        kept = periodic_checkpoints(Path(path).parent, up_to=2**62)
        if not kept:
            raise
        newest = periodic_checkpoint_path(Path(path).parent, kept[-1])
        raise CheckpointError(f"{err}; {newest} (solver.keep_checkpoints) is a training checkpoint too: copy it to "
                              f"{Path(path).name} to resume from iteration {kept[-1]}") from None
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


_STATE_ERRORS = (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError)


def restore_training_state(ckpt: dict, path: Union[str, Path], *, model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any) -> None:
    """Load a resume checkpoint (load_resume_checkpoint) into the run's objects; anything that
    does not fit is one CheckpointError naming the file and the part, never a torch traceback
    now or a shape error at the next step.

    The checkpoint gives the weights, the momentum buffers, the position in the lr schedule and
    the AMP scale; the hyperparameters stay those the run's objects were built with (this run's
    config): solver.base_lr, momentum and weight_decay changed deliberately on --resume take
    effect from the next iteration, as the changed schedule does. Unchanged, they are the
    checkpoint's values, and the lr is computed as the schedule computed it: the resume is exact."""
    asked = [{key: group[key] for key in _HYPERPARAMETERS if key in group} for group in optimizer.param_groups]
    base_lrs = list(scheduler.base_lrs)
    load_model_state(model, ckpt["model"], path)
    load_optimizer_state(optimizer, ckpt["optimizer"], path)
    state = ckpt["scheduler"]
    if not (isinstance(state, dict) and isinstance(state.get("last_epoch"), int)
            and not isinstance(state.get("last_epoch"), bool) and state["last_epoch"] >= 0
            and isinstance(state.get("base_lrs"), list) and len(state["base_lrs"]) == len(optimizer.param_groups)):
        raise CheckpointError(f"{path}: its lr schedule state is not one this run can continue "
                              f"(expected last_epoch >= 0 and {len(optimizer.param_groups)} base_lrs)")
    _load_part(scheduler, state, path, "lr schedule")
    _load_part(scaler, ckpt["scaler"], path, "AMP scaler")
    # the config's hyperparameters over the checkpoint's (LambdaLR's state holds its base_lrs)
    scheduler.base_lrs = base_lrs
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(base_lrs, scheduler.lr_lambdas)]
    for group, values, base, lr in zip(optimizer.param_groups, asked, base_lrs, lrs):
        group.update(values, initial_lr=base, lr=lr)
    scheduler._last_lr = lrs  # what get_last_lr() reports until the next step


# what a run's config sets in each optimizer group (the lr through the scheduler's base_lrs)
_HYPERPARAMETERS = ("momentum", "weight_decay", "dampening", "nesterov")


def non_finite_tensors(state: dict) -> list[str]:
    """The names of a state dict's floating-point tensors that hold NaN or an infinity."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def load_model_state(model: torch.nn.Module, state: Any, path: Union[str, Path]) -> None:
    """Strict load with one error listing what does not fit: missing and unexpected tensors,
    shapes, a float tensor stored as an integer one, non-finite values."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: its 'model' is a {type(state).__name__}, not a state dict of tensors")
    odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise CheckpointError(f"{path}: its 'model' holds {odd[0]}, a {type(state[odd[0]]).__name__}, not a tensor")
    own = model.state_dict()
    problems = []
    missing = [k for k in own if k not in state]
    # BatchNorm's step counter is no weight: a resume with more stages frozen (their norms FrozenBatchNorm2d) drops it
    state = {k: v for k, v in state.items() if k in own or not k.endswith("num_batches_tracked")}
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} (the model's: {tuple(own[k].shape)})"
              for k in own if k in state and state[k].shape != own[k].shape]
    kinds = [f"{k} ({state[k].dtype})" for k in own if k in state
             and state[k].is_floating_point() != own[k].is_floating_point()]
    for label, names in (("missing", missing), ("unexpected", unexpected), ("other shape", shapes),
                         ("other kind of number", kinds)):
        if names:
            problems.append(f"{len(names)} {label}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
    if problems:
        raise CheckpointError(f"{path}: does not fit this run's model ({'; '.join(problems)})")
    bad = non_finite_tensors(state)
    if bad:
        raise CheckpointError(f"{path}: holds non-finite values in {len(bad)} tensors ({', '.join(bad[:3])}): "
                              "the weights are broken; resume from an earlier checkpoint")
    model.load_state_dict(state)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Any, path: Union[str, Path]) -> None:
    """Load a checkpoint's optimizer state; what does not fit (other groups, shapes, a
    non-finite lr / momentum / weight decay) is one CheckpointError naming the file. How the
    update runs (fused kernel or not, foreach) stays this run's choice, not the checkpoint's, so
    a run resumed from an older checkpoint keeps the fused update."""
    implementation = [{key: group.get(key) for key in ("fused", "foreach")} for group in optimizer.param_groups]
    _load_part(optimizer, state, path, "optimizer")
    for group, keep in zip(optimizer.param_groups, implementation):
        group.update(keep)
    for group in optimizer.param_groups:
        for key in ("lr", "momentum", "weight_decay"):
            value = group.get(key, 0.0)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise CheckpointError(f"{path}: its optimizer state has {key}={value!r}")
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise CheckpointError(f"{path}: its optimizer state {key} has shape {tuple(value.shape)}, its "
                                          f"parameter {tuple(param.shape)}")


def _load_part(target: Any, state: Any, path: Union[str, Path], what: str) -> None:
    try:
        target.load_state_dict(state)
    except _STATE_ERRORS as err:
        text = " ".join(str(err).split())[:200]
        raise CheckpointError(f"{path}: its {what} state does not fit this run ({type(err).__name__}: {text})") \
            from None


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's random states in rank order (a collective: every rank calls it)."""
    return comm.all_gather_object(get_rng_states())


def restore_rng_states(ckpt: dict, path: Union[str, Path] = "the checkpoint") -> Optional[str]:
    """Set this rank's own random states from `ckpt`; returns None when the resume is exact,
    else the one line saying what is not (the number of processes changed)."""
    per_rank = ckpt.get("rng_per_rank")
    rank, world = comm.get_rank(), comm.get_world_size()
    if per_rank is not None and not isinstance(per_rank, list):
        raise CheckpointError(f"{path}: its per-process random states are a {type(per_rank).__name__}, not a list")
    saved_world = len(per_rank) if per_rank else 1
    try:
        set_rng_states(per_rank[rank] if per_rank and rank < len(per_rank) else ckpt["rng"])
    except _STATE_ERRORS as err:
        text = " ".join(str(err).split())[:200]
        raise CheckpointError(f"{path}: its random states cannot be restored ({type(err).__name__}: {text})") \
            from None
    if saved_world == world:
        return None
    return (f"{path} was written by {saved_world} process{'es' if saved_world > 1 else ''} and is resumed with "
            f"{world}: the data order and the random sampling of anchors and RoIs differ from an uninterrupted "
            "run's from here on, so the result is a valid continuation but not bit-identical")


def threads_note(ckpt: dict, path: Union[str, Path] = "the checkpoint") -> Optional[str]:
    """None when `ckpt` was written with as many torch intra-op threads as this process has (or
    does not say: written before 2026-12-07), else the line saying the resume is not bit-identical:
    on the CPU the threads split the sums of convolutions and reductions, so another count rounds
    otherwise (a resume on a machine with other cores, or another OMP_NUM_THREADS)."""
    saved, now = ckpt.get("threads"), torch.get_num_threads()
    if not isinstance(saved, int) or saved == now:
        return None
    return (f"{path} was written by a run with {saved} torch thread{'s' if saved != 1 else ''} and is resumed with "
            f"{now}: the CPU's sums round otherwise, so the result is a valid continuation but not bit-identical "
            f"to an uninterrupted run's (OMP_NUM_THREADS={saved} resumes exactly)")


def _to_tuple(value: Any) -> Any:
    """random.setstate needs tuples; a round trip through a checkpoint may give lists."""
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
