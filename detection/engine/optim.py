"""SGD with momentum and weight decay, linear warmup and multi-step or cosine decay (iteration based)."""
from __future__ import annotations

import bisect
import math
from typing import Sequence

import torch
from torch import nn
from torch.optim.sgd import sgd as sgd_update  # the functional update torch.optim.SGD runs

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
    # rounding; 3x faster on the CPU (11.8M contiguous parameters: 7.5 against 22 ms). SGD below
    # keeps it in place on channels_last weights (the demo's step: 5% faster than torch's fused)
    params = decay + no_decay
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return SGD(groups, lr=base_lr, momentum=momentum, fused=fused or None)


class SGD(torch.optim.SGD):
    """torch.optim.SGD (same update, state and checkpoints) whose fused update runs on
    channels_last weights in place. PyTorch's fused kernel makes each non-contiguous parameter,
    gradient and momentum buffer contiguous and copies them back: for the fast path's
    channels_last 3x3 weights (most of ResNet's parameters) that is five copies of each per step.
    Given as the contiguous (O, kh, kw, I) views they are, the kernel updates them where they lie."""

    @torch.no_grad()
    def step(self, closure=None):
        if (not all(group.get("fused") for group in self.param_groups)
                or getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None):
            return super().step(closure)  # the AMP grad scaler's path, and the non-fused updates
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            owners = [p for p in group["params"] if p.grad is not None]
            with_momentum = group["momentum"] != 0
            buffers = [self.state[p].get("momentum_buffer") for p in owners] if with_momentum else []
            orders = [_dense_order(p, p.grad, buffers[i] if with_momentum else None) for i, p in enumerate(owners)]
            views = [[t.permute(order) if order else t for t in (p, p.grad)] for p, order in zip(owners, orders)]
            buffer_views = [b.permute(order) if order and b is not None else b for b, order in zip(buffers, orders)]
            sgd_update([v[0] for v in views], [v[1] for v in views], buffer_views,
                       weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                       dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
                       fused=True)
            for p, buffer, order in zip(owners, buffer_views, orders):  # buffers made on the first step
                self.state[p]["momentum_buffer"] = buffer.permute(_inverse(order)) if order else buffer
        return loss


def _dense_order(param: torch.Tensor, grad: torch.Tensor, buffer: "torch.Tensor | None") -> "list[int] | None":
    """The dimension order in which param (and its gradient and momentum buffer, laid out alike)
    is contiguous, when it is not already; None when no permutation makes all three contiguous."""
    if param.is_contiguous() or grad.stride() != param.stride() or (buffer is not None and buffer.stride() != param.stride()):
        return None
    order = sorted(range(param.dim()), key=lambda d: -param.stride(d))
    return order if param.permute(order).is_contiguous() else None


def _inverse(order: list[int]) -> list[int]:
    return sorted(range(len(order)), key=order.__getitem__)


def lr_factor(iteration: int, *, warmup_iters: int, warmup_factor: float,
              steps: Sequence[int] = (), gamma: float = 0.1, schedule: str = "multistep",
              max_iter: int = 0) -> float:
    """Multiplier of base_lr at `iteration`: linear warmup from warmup_factor to 1 over
    warmup_iters, times the decay. "multistep": gamma for every step already passed.
    "cosine": half a cosine from 1 at iteration 0 to 0 at max_iter (Detectron2's
    WarmupCosineLR with BASE_LR_END 0; steps and gamma unused)."""
    if schedule == "cosine":
        if max_iter <= 0:
            raise ValueError(f"lr_factor: the cosine schedule needs max_iter > 0, got {max_iter}")
        decay = 0.5 * (1.0 + math.cos(math.pi * min(iteration, max_iter) / max_iter))
    else:
        decay = gamma ** bisect.bisect_right(list(steps), iteration)
    if iteration >= warmup_iters:
        return decay
    alpha = iteration / warmup_iters
    return (warmup_factor * (1 - alpha) + alpha) * decay


def build_lr_scheduler(optimizer: torch.optim.Optimizer, *, warmup_iters: int, warmup_factor: float,
                       steps: Sequence[int] = (), gamma: float = 0.1, schedule: str = "multistep",
                       max_iter: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration; its state (last_epoch = iteration) goes in the checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(
        it, warmup_iters=warmup_iters, warmup_factor=warmup_factor, steps=steps, gamma=gamma,
        schedule=schedule, max_iter=max_iter))
