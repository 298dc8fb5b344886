"""SGD with momentum and weight decay, linear warmup and multi-step decay (iteration based)."""
from __future__ import annotations

import bisect
from typing import Sequence

import torch
from torch import nn

NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.SyncBatchNorm)


def build_optimizer(model: nn.Module, *, base_lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.SGD:
    """SGD over the trainable parameters; norm layers get no weight decay (Detectron2's default),
    which matters when training from scratch with `bn`/`gn`."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            (no_decay if isinstance(module, NORM_TYPES) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    # fused: one kernel over all parameters, the default (foreach) update's numbers up to float
    # rounding; 3x faster on the CPU (11.8M parameters: 7.5 against 22 ms, 8% of a demo step)
    params = decay + no_decay
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.SGD(groups, lr=base_lr, momentum=momentum, fused=fused or None)


def lr_factor(iteration: int, *, warmup_iters: int, warmup_factor: float,
              steps: Sequence[int], gamma: float) -> float:
    """Multiplier of base_lr at `iteration`: linear warmup from warmup_factor to 1 over
    warmup_iters, times gamma for every step already passed."""
    decay = gamma ** bisect.bisect_right(list(steps), iteration)
    if iteration >= warmup_iters:
        return decay
    alpha = iteration / warmup_iters
    return (warmup_factor * (1 - alpha) + alpha) * decay


def build_lr_scheduler(optimizer: torch.optim.Optimizer, *, warmup_iters: int, warmup_factor: float,
                       steps: Sequence[int], gamma: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration; its state (last_epoch = iteration) goes in the checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(
        it, warmup_iters=warmup_iters, warmup_factor=warmup_factor, steps=steps, gamma=gamma))
