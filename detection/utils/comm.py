"""Process-group helpers that work with or without torch.distributed.

A low module on purpose: data loading (per-rank sampling) and evaluation (sharding and
gathering) need the rank, and importing detection.engine from them would point the layers
the wrong way. detection.engine.distributed joins the process group and re-exports these.
"""
from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from typing import Any, Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def synchronize() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list when not distributed)."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm's running statistics). DistributedDataParallel
    copies them only at the start of a training forward, so after a step each rank holds the
    statistics of its own batch; an evaluation in every process must use the one model that
    rank 0 saves."""
    if get_world_size() == 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def shard_dataset(dataset: T) -> T:
    """This rank's share of a data set's records (every world_size-th, starting at rank),
    for evaluation whose results are then gathered on rank 0. `dataset` is a dataclass with
    a `records` list (detection.data.DatasetInfo)."""
    if get_world_size() == 1:
        return dataset
    return dataclasses.replace(dataset, records=dataset.records[get_rank()::get_world_size()])


class DeviceError(ValueError):
    """The config's device is not on this machine (device: cuda without a GPU)."""


def select_device(name: str, tf32: bool = True) -> torch.device:
    """`auto` = CUDA when available (this process's local GPU under torchrun), else CPU. On
    CUDA, `tf32` (config `tf32`) sets whether float32 convolutions and matrix products may
    use TF32 (set_tf32)."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was asked for (the config's device, or the Predictor's device argument) "
                          "but torch.cuda.is_available() is False; use device=cpu or device=auto")
    set_tf32(tf32)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def set_tf32(enabled: bool) -> None:
    """Whether float32 convolutions (cuDNN) and matrix products (cuBLAS) on CUDA may round
    their inputs to TF32 (10-bit mantissa) on tensor cores. PyTorch's default allows it for
    convolutions only, and Detectron2 keeps that; on an H100 it moved 0-5% of a Detectron2
    checkpoint's detections against Detectron2's float32 CPU results (100% equal without it).
    Process-wide; no effect on the CPU."""
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


@contextmanager
def tf32_set(enabled: bool, *, matmul: bool = True) -> Iterator[None]:
    """set_tf32(enabled) inside the block (matmul=False: the convolutions' flag only, which
    torch.compile does not guard on, so compiled code is not compiled again); both flags as they
    were after it. The benchmark checks detections for equality without TF32 and times with the
    config's setting."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled
    if matmul:
        torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
