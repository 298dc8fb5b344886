"""torch.distributed set-up: NCCL on GPUs, gloo on the CPU.

The helpers that work with or without a process group (rank, world size, gather, sharding,
device choice) live in detection.utils.comm, where data loading and evaluation import them
from; they are re-exported here for the engine and the tools.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from detection.utils.comm import (DeviceError, all_gather_object, broadcast_buffers, get_rank, get_world_size,
                                  is_main_process, select_device, shard_dataset, synchronize)
from detection.utils.launch import launch_problem

__all__ = ["all_gather_object", "broadcast_buffers", "get_rank", "get_world_size", "init_distributed",
           "is_main_process", "select_device", "shard_dataset", "synchronize"]


def init_distributed(device: torch.device) -> bool:
    """Join the process group that `torchrun` describes in the environment, if any (also for
    `torchrun --nproc_per_node 1`: the same DDP and NCCL code as on more GPUs). Returns True
    when running under torchrun."""
    if dist.is_available() and dist.is_initialized():
        return True
    problem = launch_problem()
    if problem:
        raise DeviceError(problem)
    if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True
