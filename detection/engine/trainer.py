"""The training loop: a plain loop, no hooks. Read `train` top to bottom.

Resume is exact: the checkpoint holds model, optimizer, lr schedule, AMP scaler, iteration
and every random state, and the data loader restarts at the same position of its seeded
sample order, so k iterations + resume to 2k equals 2k straight.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import logging
import random
import resource
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from detection.config import Config, ConfigError, config_to_dict
from detection.data.dataset_info import DatasetInfo
from detection.engine import distributed as du
from detection.engine.checkpoint import (gather_rng_states, load_resume_checkpoint, periodic_checkpoint_path,
                                         periodic_checkpoints, prune_checkpoints, restore_rng_states,
                                         restore_training_state, save_checkpoint)
from detection.engine.loading import load_initial_weights, read_detector_file
from detection.engine.optim import build_lr_scheduler, build_optimizer
from detection.engine.run_config import check_resume_config, record_resume_changes
from detection.engine.run_folder import RunLock, check_output_dir, prepare_output_dir
from detection.engine.startup import (build_test_datasets, event_files, final_line, note_stop, summary_of_test_sets,
                                      undo_unstarted_run)
from detection.engine.run_log import LOG_FILE, RunLogFile, TimeWindow, progress_line
from detection.utils.files import OutputFolderError

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where and why."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message names the iteration and the last checkpoint.
    A KeyboardInterrupt still, so code that catches those keeps working. `signum` is the
    signal that stopped the run (SIGINT unless a SIGTERM did): tools exit with 128 + signum."""

    signum: int = signal.SIGINT


class TrainingStopped(TrainingInterrupted):
    """SIGTERM or SIGINT during training (a scheduler's pre-emption, Ctrl-C): the current
    iteration was finished and last.pth saved there; the message says so."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    iteration: int = 0
    class_names: tuple[str, ...] = ()  # stored in checkpoints for tools/visualize.py
    checkpoint_iteration: Optional[int] = None  # the iteration last.pth holds, if any
    periodic: list[int] = field(default_factory=list)  # the iterations of this run's model_{iter:07d}.pth


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False,
          explicit: Optional[Sequence[str]] = None) -> nn.Module:
    """Train the config's model on its training sets (outputs in cfg.output_dir); returns the
    trained model (unwrapped from DistributedDataParallel).

    An output folder that holds a run is refused unless `resume` continues it or `overwrite`
    replaces it. Nothing is written (and with `overwrite` nothing removed) before the model
    and the training sets are built and checked, so a run that fails on its data leaves the
    folder as it was. Ctrl-C raises TrainingInterrupted, naming the last checkpoint; SIGTERM or
    SIGINT (GracefulStop) finish the iteration, save last.pth and raise TrainingStopped. The
    folder is locked for the run (run_folder.RunLock): a second trainer there is refused.

    On a resume the run's config.yaml is the run's: where `cfg` differs, the keys must be in
    `explicit` (the tool's command-line keys: `solver.max_iter` to extend a run), else one
    ConfigError lists them (run_config). None (a caller passing its own Config) takes every
    difference as deliberate. Changes are kept in config_resumed_<iter>.yaml. Every message
    of the run goes to the output folder's log.txt too (run_log.RunLogFile, rank 0).
    """
    if resume and overwrite:
        raise ConfigError("--resume continues the run in the output folder and --overwrite replaces it: "
                          "give one of them")
    device = du.select_device(cfg.device, cfg.tf32)
    distributed = du.init_distributed(device)
    lock = _lock_output_dir(Path(cfg.output_dir))
    run_log = RunLogFile().install() if du.is_main_process() else None
    try:
        return _train(cfg, device, distributed, resume=resume, overwrite=overwrite, explicit=explicit,
                      run_log=run_log)
    finally:
        if run_log is not None:
            run_log.remove()
        if lock is not None:  # a run that failed its checks leaves no (empty) folder it created
            lock.release(remove_empty_dir=True)


def _lock_output_dir(out_dir: Path) -> Optional[RunLock]:
    """Rank 0 takes the output folder's lock (RunLock); every rank raises its refusal."""
    lock, problem = None, None
    if du.is_main_process():
        try:
            lock = RunLock(out_dir).acquire()
        except ValueError as err:
            problem = str(err)
    problems = [p for p in du.all_gather_object(problem) if p]
    if problems:
        if lock is not None:
            lock.release(remove_empty_dir=True)
        raise OutputFolderError(problems[0])
    return lock


def _train(cfg: Config, device: torch.device, distributed: bool, *, resume: bool, overwrite: bool,
           explicit: Optional[Sequence[str]] = None, run_log: Optional[RunLogFile] = None) -> nn.Module:
    """train() once the output folder is locked."""
    out_dir = Path(cfg.output_dir)
    old_run = check_output_dir(out_dir, resume=resume, overwrite=overwrite)
    tensorboard = use_tensorboard(cfg.log.tensorboard)  # before anything is written
    seed_everything(cfg.seed)  # same on every rank: identical initial weights
    last = out_dir / "last.pth"
    resuming = resume and last.is_file()
    if resume and not resuming:
        logger.warning("--resume: %s does not exist, starting from iteration 0", last)
    changes = check_resume_config(cfg, out_dir, explicit) if resuming else []  # before anything is built
    # The run's own last.pth, or model.weights (a detector or backbone weights), replaces the
    # model.backbone.weights file: it is then neither read nor required.
    initial = read_detector_file(cfg.model.weights) if cfg.model.weights and not resuming \
        and not cfg.model.weights.startswith("torchvision:") else None
    state = _build_state(cfg, device, backbone_needed=not resuming and not cfg.model.weights)
    if resuming:
        _restore(state, load_resume_checkpoint(last), device, last)
        state.periodic = periodic_checkpoints(out_dir, up_to=state.iteration) if du.is_main_process() else []
    elif cfg.model.weights:
        load_initial_weights(state.model, cfg.model.weights, cfg.model.backbone, initial)
    if resuming and _is_finished(cfg, state, out_dir):
        return state.model
    datasets = build_train_datasets(cfg)
    test_sets = build_test_datasets(cfg, datasets[0].class_names)  # before anything is written, too
    start = (state.iteration, event_files(out_dir),
             [p for p in (out_dir / "config.yaml", out_dir / LOG_FILE) if not p.exists()])  # what this run creates
    if du.is_main_process():
        for line in summary_lines(cfg, datasets, device, test_sets):
            logger.info("%s", line)
        prepare_output_dir(cfg, out_dir, remove=old_run if overwrite else [],
                            resumed_at=state.iteration if resuming else None)
        if run_log is not None:
            run_log.open(out_dir / LOG_FILE)
        record_resume_changes(out_dir, state.iteration, changes)
    try:
        _start_loop(cfg, state, datasets, device, distributed, out_dir, tensorboard)
    except BaseException:
        if du.is_main_process() and state.iteration == start[0]:  # not one iteration done: leave no trace
            undo_unstarted_run(out_dir, events_before=start[1], created=start[2])
        raise
    return state.model


def _start_loop(cfg: Config, state: TrainState, datasets: list[DatasetInfo], device: torch.device,
                distributed: bool, out_dir: Path, tensorboard: bool) -> None:
    """The loader, the fast path and DDP, then the iterations."""
    if cfg.model.fast_path:  # same parameters and state_dict keys: checkpoints are unchanged
        from detection.fast import optimize_for_training

        optimize_for_training(state.model, channels_last=True)
    data, state.class_names = _build_train_data(cfg, datasets, state.iteration)
    state.model.class_names = list(state.class_names)  # what its labels mean, for whoever uses the model
    model = state.model
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(state.model, device_ids=ids)
    _loop(cfg, state, model, data, device, out_dir, tensorboard)


def _is_finished(cfg: Config, state: TrainState, out_dir: Path) -> bool:
    """A resumed run at solver.max_iter has nothing to train: say so (and write a missing
    model_final.pth: the process was killed between the last checkpoint and that file)."""
    if state.iteration < cfg.solver.max_iter:
        return False
    logger.info("%s: the run is finished (iteration %d, solver.max_iter %d): nothing to train",
                out_dir, state.iteration, cfg.solver.max_iter)
    if du.is_main_process() and not (out_dir / "model_final.pth").is_file():
        _save_final(state, cfg, out_dir)
    return True


def _build_state(cfg: Config, device: torch.device, backbone_needed: bool = True) -> TrainState:
    from detection.model import build_model

    if not backbone_needed:
        cfg = copy.deepcopy(cfg)
        cfg.model.backbone.weights = None
    model = build_model(cfg).to(device)
    model.train()
    s = cfg.solver
    optimizer = build_optimizer(model, base_lr=s.base_lr, momentum=s.momentum, weight_decay=s.weight_decay)
    scheduler = build_lr_scheduler(optimizer, warmup_iters=s.warmup_iters, warmup_factor=s.warmup_factor,
                                   steps=s.steps, gamma=s.gamma, schedule=s.lr_schedule, max_iter=s.max_iter)
    # float16 needs loss scaling; bfloat16 (the CPU's autocast type) has float32's range.
    scaler = torch.amp.GradScaler("cuda", enabled=bool(cfg.solver.amp) and device.type == "cuda")
    return TrainState(model, optimizer, scheduler, scaler)


def amp_autocast(enabled: bool, device: torch.device) -> torch.autocast:
    """solver.amp's autocast: float16 on CUDA, bfloat16 on the CPU."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def _restore(state: TrainState, ckpt: dict, device: torch.device, path: Path = Path("last.pth")) -> None:
    restore_training_state(ckpt, path, model=state.model, optimizer=state.optimizer, scheduler=state.scheduler,
                           scaler=state.scaler)  # what does not fit is one CheckpointError
    state.iteration = int(ckpt["iteration"])
    not_exact = restore_rng_states(ckpt, path)  # each rank its own
    if not_exact and du.is_main_process():
        logger.warning("%s", not_exact)
    state.checkpoint_iteration = state.iteration
    state.class_names = tuple(ckpt.get("class_names") or ())
    logger.info("resumed at iteration %d", state.iteration)


def _checkpoint(state: TrainState, cfg: Config, path: Path, periodic: bool = False) -> None:
    """last.pth with every rank's random states (gathered: a collective). A failed write (a
    full disk) leaves the previous last.pth as it was and stops every rank with one error.
    A periodic one with solver.keep_checkpoints N is first written as model_{iter:07d}.pth
    too (the same training checkpoint); the oldest beyond N are deleted only once both files
    are written, so a failed save deletes none."""
    rng = gather_rng_states()
    problem = None
    if du.is_main_process():
        keep = cfg.solver.keep_checkpoints if periodic else 0
        target = path
        try:
            ckpt = {
                "model": state.model.state_dict(),
                "optimizer": state.optimizer.state_dict(),
                "scheduler": state.scheduler.state_dict(),
                "scaler": state.scaler.state_dict(),
                "iteration": state.iteration,
                "rng": rng[0],
                "rng_per_rank": rng,
                "config": config_to_dict(cfg),
                "class_names": list(state.class_names),
            }
            for target in ([periodic_checkpoint_path(path.parent, state.iteration)] if keep else []) + [path]:
                save_checkpoint(ckpt, target)
        except OSError as err:
            problem = (f"could not write {target} at iteration {state.iteration} "
                       f"({err.strerror or err}); training stopped, {_what_is_kept(state, path)}")
        else:
            if keep:
                state.periodic = prune_checkpoints(path.parent, state.periodic + [state.iteration], keep)
    problems = [p for p in du.all_gather_object(problem) if p]  # every rank stops, not rank 0 alone
    if problems:
        raise TrainingError(problems[0])
    state.checkpoint_iteration = state.iteration  # after the save: a Ctrl-C inside it keeps the old one


def _what_is_kept(state: TrainState, path: Path) -> str:
    """What a stopped run leaves to resume from, as it really is."""
    if state.checkpoint_iteration is None:
        return f"and no checkpoint was written yet ({path} does not exist): a new run starts from iteration 0"
    return f"the last good checkpoint {path} (iteration {state.checkpoint_iteration}) is kept: --resume continues it"


def build_train_datasets(cfg: Config) -> list[DatasetInfo]:
    """The training sets, checked against each other, the model's classes and the number of
    processes: before anything is written, so a run that fails here leaves no folder."""
    from detection.data.catalog import concat_datasets, get_datasets

    world = du.get_world_size()
    if cfg.solver.ims_per_batch % world:
        raise ConfigError(f"solver.ims_per_batch={cfg.solver.ims_per_batch} is not divisible by the "
                          f"{world} processes")
    datasets = get_datasets(cfg.datasets.train, cfg.datasets.root, skip_bad_images=cfg.dataloader.skip_bad_images,
                            exif_orientation=cfg.input.exif_orientation)
    names = concat_datasets(datasets).class_names  # the same classes in every set, or a DataError
    which = (f"the training sets {', '.join(d.name for d in datasets)} have" if len(datasets) > 1
             else f"the training set {datasets[0].name} has")
    if cfg.model.num_classes != len(names):
        raise ConfigError(f"model.num_classes is {cfg.model.num_classes} but {which} {len(names)} classes "
                          f"({', '.join(names)}): set model.num_classes={len(names)}")
    if cfg.model.class_names and list(cfg.model.class_names) != list(names):
        raise ConfigError(f"model.class_names is {list(cfg.model.class_names)} but {which} the classes "
                          f"{list(names)}")
    return datasets


def summary_lines(cfg: Config, datasets: list[DatasetInfo], device: torch.device,
                  test_sets: list[DatasetInfo]) -> list[str]:
    """What the run trains on, where, and how: printed at its start."""
    from detection.data.loader import training_records

    lines = []
    for d in datasets:
        kept = training_records(d.records, filter_empty=cfg.dataloader.filter_empty,
                                use_difficult=cfg.dataloader.use_difficult)
        counts = np.bincount(np.concatenate([r["labels"] for r in kept] + [np.zeros(0, np.int64)]),
                             minlength=d.num_classes + 1)
        dropped = f" ({len(d.records) - len(kept)} without boxes dropped: dataloader.filter_empty)" \
            if cfg.dataloader.filter_empty else ""
        lines.append(f"training set {d.name}: {len(kept)} images{dropped}, {d.num_classes} classes, objects "
                     "per class: " + ", ".join(f"{n} {c}" for n, c in zip(d.class_names, counts[1:])))
    lines += summary_of_test_sets(cfg, test_sets)
    amp = ("float16" if device.type == "cuda" else "bfloat16") if cfg.solver.amp else "off"
    lines.append(f"device: {device}, torch threads: {torch.get_num_threads()}, AMP: {amp}, "
                 f"fast path: {'on' if cfg.model.fast_path else 'off'}, processes: {du.get_world_size()}")
    lines.append(f"datasets.root: {Path(cfg.datasets.root).resolve()}")
    lines.append(f"output folder: {Path(cfg.output_dir).resolve()}")
    return lines


def build_train_data_loader(cfg: Config, datasets: list[DatasetInfo], start_iter: int = 0) -> Iterable:
    """The config's training loader over `datasets` (this process's share of each batch), from
    iteration start_iter on: what training iterates and tools/benchmark.py times."""
    from detection.data.loader import build_train_loader
    from detection.data.transforms import build_train_transform

    world = du.get_world_size()
    return build_train_loader(
        datasets, transform=build_train_transform(cfg), images_per_batch=cfg.solver.ims_per_batch // world,
        num_workers=cfg.dataloader.num_workers, aspect_ratio_grouping=cfg.dataloader.aspect_ratio_grouping,
        filter_empty=cfg.dataloader.filter_empty, seed=cfg.seed, use_difficult=cfg.dataloader.use_difficult,
        start_iter=start_iter)


def _build_train_data(cfg: Config, datasets: list[DatasetInfo], start_iter: int
                      ) -> tuple[Iterator, tuple[str, ...]]:
    """The training batches (from iteration start_iter on) and the class names."""
    return iter(build_train_data_loader(cfg, datasets, start_iter)), tuple(datasets[0].class_names)


def _loop(cfg: Config, state: TrainState, model: nn.Module, data: Iterator,
          device: torch.device, out_dir: Path, tensorboard: bool = False) -> None:
    """The iterations, under a progress bar that is closed before any error or Ctrl-C is
    reported, so the message gets a line of its own."""
    main = du.is_main_process()
    try:
        with tqdm(total=cfg.solver.max_iter, initial=state.iteration, disable=not main, dynamic_ncols=True,
                  desc="train") as bar, logging_redirect_tqdm(), GracefulStop(device) as stop, \
                MetricsLog(out_dir, tensorboard=tensorboard and main, start_iter=state.iteration) as log:
            _iterations(cfg, state, model, data, device, out_dir, bar, stop, log)
    except TrainingStopped:
        raise
    except KeyboardInterrupt:
        saved = "no checkpoint written yet" if state.checkpoint_iteration is None else \
            f"last checkpoint: {out_dir / 'last.pth'} (iteration {state.checkpoint_iteration})"
        raise TrainingInterrupted(f"interrupted at iteration {state.iteration}; {saved}") from None
    except Exception as err:
        if not isinstance(err, TrainingError):  # a TrainingError names the checkpoint itself
            note_stop(err, state.iteration, _what_is_kept(state, out_dir / "last.pth"))
        raise
    if main:
        _save_final(state, cfg, out_dir)
    du.synchronize()


def _iterations(cfg: Config, state: TrainState, model: nn.Module, data: Iterator, device: torch.device,
                out_dir: Path, bar: tqdm, stop: Optional["GracefulStop"] = None,
                log: Optional["MetricsLog"] = None) -> None:
    log = log or MetricsLog(out_dir)
    s = cfg.solver
    main = du.is_main_process()
    timer = time.perf_counter()
    window = TimeWindow()
    while state.iteration < s.max_iter:
        images, targets = next(data)
        data_time = time.perf_counter() - timer
        lr = state.optimizer.param_groups[0]["lr"]  # the step below runs at it, then the schedule moves on
        losses = _step(cfg, state, model, images, targets, device)
        state.iteration += 1
        window.add(time.perf_counter() - timer, data_time)
        timer = time.perf_counter()
        bar.set_postfix(loss=f"{sum(losses.values()):.3f}", lr=f"{lr:.2e}")
        bar.update(1)
        if main and (state.iteration % cfg.log_period == 0 or state.iteration == s.max_iter):
            record = {"iteration": state.iteration, **losses, "total_loss": sum(losses.values()),
                      "lr": lr, **window.medians(), **_peak_memory(device)}
            log.write(record)
            logger.info("%s", progress_line(record, s.max_iter))
        periodic = state.iteration % s.checkpoint_period == 0
        if periodic or state.iteration == s.max_iter:
            _checkpoint(state, cfg, out_dir / "last.pth", periodic=periodic)
        if cfg.test.eval_period and state.iteration % cfg.test.eval_period == 0:
            metrics = evaluate(cfg, state.model, device)
            if main:
                log.write({"iteration": state.iteration, **metrics})
            state.model.train()
        if stop is not None and state.iteration < s.max_iter and stop.agreed():
            _stop_gracefully(state, cfg, out_dir / "last.pth", stop)


class GracefulStop:
    """SIGTERM / SIGINT while training: note the signal, let the current iteration finish,
    then save last.pth there and stop (`_stop_gracefully`). A second signal during that save
    is noted and does not interrupt it (the save is atomic anyway); a second one at any other
    moment stops at once, as Ctrl-C always did. Handlers are installed only in the main thread
    and the previous ones put back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, device: torch.device = torch.device("cpu")) -> None:
        self.device = device  # where the ranks' agreement is reduced (NCCL reduces CUDA tensors only)
        self.signum = 0
        self.saving = False
        self._previous: dict = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self.signum:
            self.signum = signum
            logger.warning("%s received: stopping after this iteration, once last.pth is saved "
                           "(a second signal stops at once)", name)
        elif self.saving:
            logger.warning("%s received again while last.pth is being saved: finishing the save first", name)
        else:
            raise KeyboardInterrupt

    def agreed(self) -> bool:
        """Whether any rank got a signal (every rank calls this once per iteration)."""
        if du.get_world_size() > 1:
            flag = torch.tensor([self.signum], dtype=torch.int64, device=self.device)  # NCCL: on the GPU
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.signum = int(flag.item())
        return bool(self.signum)


def _stop_gracefully(state: TrainState, cfg: Config, path: Path, stop: GracefulStop) -> None:
    """Save last.pth at this iteration (unless it holds it already) and raise TrainingStopped."""
    stop.saving = True
    try:
        if state.checkpoint_iteration != state.iteration:
            _checkpoint(state, cfg, path)
    finally:
        stop.saving = False
    name = signal.Signals(stop.signum).name
    raise TrainingStopped(f"stopped by {name} at iteration {state.iteration}; saved {path} (iteration "
                          f"{state.iteration}): --resume continues from there", stop.signum)


def _save_final(state: TrainState, cfg: Config, out_dir: Path) -> None:
    path = out_dir / "model_final.pth"
    try:
        save_checkpoint({"model": state.model.state_dict(), "iteration": state.iteration,
                         "config": config_to_dict(cfg), "class_names": list(state.class_names)}, path)
    except OSError as err:
        raise TrainingError(f"could not write {path} ({err.strerror or err}); "
                            f"{_what_is_kept(state, out_dir / 'last.pth')}") from None
    logger.info("%s", final_line(path, state.iteration))


def _step(cfg: Config, state: TrainState, model: nn.Module, images: list, targets: list,
          device: torch.device) -> dict[str, float]:
    """One SGD step; returns the losses averaged over processes (as Python floats)."""
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    loss_dict = forward_losses(model, images, targets, amp=bool(cfg.solver.amp), device=device)
    total = sum(loss_dict.values())
    reduced = _reduce_losses(loss_dict)
    if not all(np.isfinite(v) for v in reduced.values()):
        values = ", ".join(f"{k}={v:.4g}" for k, v in reduced.items())
        kept = _what_is_kept(state, Path(cfg.output_dir) / "last.pth")
        raise TrainingError(f"iteration {state.iteration + 1}: loss is not finite ({values}); training "
                            f"stopped, {kept}. Try a lower solver.base_lr or solver.clip_grad_norm.")
    optimizer_step(state, total, cfg.solver.clip_grad_norm)
    return reduced


def forward_losses(model: nn.Module, images: list, targets: list, *, amp: bool, device: torch.device
                   ) -> dict[str, torch.Tensor]:
    """The training forward pass, under solver.amp's autocast: the four losses."""
    with amp_autocast(amp, device):
        return model(images, targets)


def optimizer_step(state: TrainState, total: torch.Tensor, clip_grad_norm: Optional[float] = None) -> None:
    """Backward through the (scaled) total loss, clip, then step the optimizer, the scaler and
    the lr schedule. tools/benchmark.py times this very function."""
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(total).backward()
    if clip_grad_norm:
        state.scaler.unscale_(state.optimizer)
        nn.utils.clip_grad_norm_(state.model.parameters(), clip_grad_norm)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()


def _reduce_losses(loss_dict: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean of each loss over processes, so every rank sees the same (finite or not) values."""
    keys = sorted(loss_dict)
    values = torch.stack([loss_dict[k].detach().float() for k in keys])
    if du.get_world_size() > 1:
        torch.distributed.all_reduce(values)
        values /= du.get_world_size()
    return dict(zip(keys, values.tolist()))


def _peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"max_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB


def use_tensorboard(setting: "bool | str") -> bool:
    """log.tensorboard: true, false, or auto (true when TensorBoard can be used). Tried here,
    before anything is written: true without a working tensorboard package is one error; auto
    without it is off (with a warning when the package is there but does not import)."""
    if setting is False:
        return False
    try:
        import torch.utils.tensorboard  # noqa: F401 - imports the tensorboard package
    except ImportError as err:
        if setting is True:
            raise ConfigError(f"log.tensorboard is true but TensorBoard cannot be used ({err}): "
                              "pip install -e '.[tensorboard]', or set log.tensorboard=false") from None
        if importlib.util.find_spec("tensorboard") is not None:
            logger.warning("log.tensorboard auto: the tensorboard package does not import (%s); no event files", err)
        return False
    return True


class MetricsLog:
    """metrics.jsonl, the run's record (a line every log_period iterations and one per
    evaluation), and with `tensorboard` the same numbers as TensorBoard scalars: event files in
    the output folder (torch.utils.tensorboard.SummaryWriter), tag = the key, step = the
    iteration. Rank 0 only. The writer is closed (flushed) when the loop ends, however it ends."""

    def __init__(self, out_dir: Path, *, tensorboard: bool = False, start_iter: int = 0) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides what earlier writers in this folder logged after the
            # iteration the run starts from, as run_folder.truncate_metrics drops those lines
            self.writer = SummaryWriter(str(out_dir), purge_step=start_iter + 1)

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self._tensorboard(self.writer.close)

    def write(self, record: dict) -> None:
        """Append one line to metrics.jsonl; a failed write (a full disk) stops training with one
        error. A line cut short is dropped when the run is resumed (run_folder.truncate_metrics)."""
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise TrainingError(f"could not append to {self.path} at iteration {record.get('iteration')} "
                                f"({err.strerror or err}); training stopped") from None
        if self.writer is not None:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard(self.writer.add_scalar, key, value, record["iteration"])

    def _tensorboard(self, call, *args) -> None:
        """The event files are a view of metrics.jsonl: one that cannot be written (its writer
        thread reports a full disk late) is a warning and no more event files, never a stop."""
        try:
            call(*args)
        except OSError as err:
            logger.warning("TensorBoard event files in %s could not be written (%s); metrics.jsonl goes on, "
                           "the event files stop here", self.path.parent, err.strerror or err)
            self.writer = None


def evaluate(cfg: Config, model: nn.Module, device: torch.device,
             output_dir: Optional[Path] = None) -> dict[str, float]:
    """Evaluate on every test set (each process its share of the images; rank 0 scores them,
    other ranks get {}); keys are prefixed by the data set's name when there are several.
    With output_dir, each test set's results go to output_dir/<test set>/ as tools/eval.py
    writes them."""
    from detection.data.catalog import get_datasets
    from detection.evaluation import evaluate_test_sets, flatten_metrics

    datasets = get_datasets(cfg.datasets.test, cfg.datasets.root, skip_bad_images=cfg.dataloader.skip_bad_images,
                            exif_orientation=cfg.input.exif_orientation)
    return flatten_metrics(evaluate_test_sets(datasets, model=model, device=device,
                                              num_workers=cfg.dataloader.num_workers, output_dir=output_dir,
                                              model_classes=getattr(model, "class_names", None)))
