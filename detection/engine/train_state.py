"""What a training run carries from iteration to iteration (TrainState), built from the config
or restored from last.pth: everything a resume needs to go on exactly."""
from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from detection.config import Config
from detection.data.loader import DATA_ORDER
from detection.engine import distributed as du
from detection.engine.checkpoint import CheckpointError, restore_rng_states, restore_training_state, threads_note
from detection.engine.optim import build_lr_scheduler, build_optimizer

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    iteration: int = 0
    class_names: tuple[str, ...] = ()  # stored in checkpoints for tools/visualize.py
    checkpoint_iteration: Optional[int] = None  # the iteration last.pth holds, if any
    start_iteration: int = 0  # the iteration this process's run started from (a resume's checkpoint)
    periodic: list[int] = field(default_factory=list)  # the iterations of this run's model_{iter:07d}.pth
    # how the run's epochs follow from its seed (detection.data.loader.DATA_ORDER): a resumed
    # run keeps the one it began with (its checkpoint's; 1 when it has none: written before 2)
    data_order: int = DATA_ORDER
    # the training images (startup.training_data_id: their count and a digest of their ids): saved in
    # last.pth; a resume compares the run's (`resumed_data`) with today's
    train_data: dict = field(default_factory=dict)
    resumed_data: Optional[dict] = None
    # test.save_best's best evaluation so far ({"metric", "value", "iteration"}): model_best.pth holds it
    best: Optional[dict] = None
    best_undefined_said: bool = False  # its metric was said to be undefined at an evaluation (once a run)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_train_state(cfg: Config, device: torch.device, backbone_needed: bool = True) -> TrainState:
    """The config's model (in train mode, on `device`), optimizer, lr schedule and AMP scaler at
    iteration 0. Without `backbone_needed` (a resume, or model.weights) the model.backbone.weights
    file is neither read nor required."""
    from detection.modeling.model import build_model

    if not backbone_needed:
        cfg = copy.deepcopy(cfg)
        cfg.model.backbone.weights = None
    model = build_model(cfg).to(device)
    model.train()
    s = cfg.solver
    optimizer = build_optimizer(model, base_lr=s.base_lr, momentum=s.momentum, weight_decay=s.weight_decay)
    scheduler = build_lr_scheduler(optimizer, warmup_iters=s.warmup_iters, warmup_factor=s.warmup_factor,
                                   steps=s.steps, gamma=s.gamma, schedule=s.lr_schedule, max_iter=s.max_iter)
    return TrainState(model, optimizer, scheduler, amp_scaler(bool(cfg.solver.amp), device))


def amp_scaler(amp: bool, device: torch.device) -> torch.amp.GradScaler:
    """solver.amp's loss scaler: on CUDA with amp (float16 needs loss scaling); else disabled
    (bfloat16, the CPU's autocast type, has float32's range). tools/benchmark.py's steps use it too."""
    return torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")


def restore_train_state(state: TrainState, ckpt: dict, path: Path = Path("last.pth")) -> None:
    """Put a training checkpoint (`ckpt`, read from `path`) into `state`: weights, optimizer,
    schedule, scaler, iteration, class names and this rank's random states. What does not fit
    is one CheckpointError naming `path`."""
    restore_training_state(ckpt, path, model=state.model, optimizer=state.optimizer, scheduler=state.scheduler,
                           scaler=state.scaler)
    state.iteration = int(ckpt["iteration"])
    not_exact = restore_rng_states(ckpt, path)  # each rank its own
    if not_exact and du.is_main_process():
        logger.warning("%s", not_exact)
    other_threads = threads_note(ckpt, path)
    if other_threads and next(state.model.parameters()).device.type == "cpu" and du.is_main_process():
        logger.warning("%s", other_threads)
    state.checkpoint_iteration = state.start_iteration = state.iteration
    state.class_names = tuple(ckpt.get("class_names") or ())
    state.data_order = _data_order(ckpt, path)
    state.resumed_data = ckpt.get("train_data") if isinstance(ckpt.get("train_data"), dict) else None


def _data_order(ckpt: dict, path: Path) -> int:
    """The checkpoint's data order: a run goes on in the order it began with (no key: a file
    written before the order of other seeds than 0 changed, 2026-12-07: order 1)."""
    from detection.data.loader import epoch_seed

    order = ckpt.get("data_order", 1)
    try:
        epoch_seed(0, 0, order)
    except ValueError:
        raise CheckpointError(f"{path}: its data_order is {order!r}; this version knows 1 and 2 (a file of a "
                              "newer version?)") from None
    return order
