"""The training loop: a plain loop, no hooks. `train` sets a run up (the process group, the
folder's lock, a resume or a new start: `_train`); one iteration is `_iterations` -> `run_step`
(forward_losses, optimizer_step), read top to bottom.

Resume is exact: the checkpoint holds model, optimizer, lr schedule, AMP scaler, iteration
and every random state, and the data loader restarts at the same position of its seeded
sample order, so k iterations + resume to 2k equals 2k straight.

The loop calls its parts explicitly, each in its own module: startup.py (the data sets, the
loader, the start summary), train_state.py (TrainState, built or restored), loop_checkpoints.py
(last.pth, model_final.pth), signals.py (GracefulStop), metrics.py (metrics.jsonl,
TensorBoard), evaluate.py (test.eval_period) and errors.py (how a run stops short).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from detection.config import Config, ConfigError, checked_config
from detection.engine import distributed as du
from detection.engine.checkpoint import get_rng_states, load_resume_checkpoint, periodic_checkpoints, set_rng_states
from detection.engine.loop_checkpoints import (best_metric_key, check_finite_weights, kept_after_divergence,
                                               restore_best, save_best, save_final, save_last, stop_gracefully,
                                               what_is_kept)
from detection.engine.errors import TrainingError, TrainingInterrupted, TrainingStopped
from detection.engine.evaluate import evaluate
from detection.engine.loading import load_initial_weights, read_detector_file
from detection.engine.inference_model import accel_levers, levers_without_fast_path
from detection.engine.metrics import MetricsLog, peak_memory, reduce_losses, use_tensorboard
from detection.engine.run_config import (check_resume_config, check_same_config_everywhere, data_order_change,
                                         record_resume_changes, schedule_jump)
from detection.engine.run_folder import (check_output_dir, evaluation_recorded, lock_for_every_process,
                                        prepare_output_dir, remove_partial_checkpoints, restarted_run,
                                        set_aside_later_checkpoints)
from detection.engine.run_log import LOG_FILE, RunLogFile, TimeWindow, lost_peer, progress_line
from detection.engine.signals import EvaluationStopped, GracefulStop, sigterm_before_the_loop
from detection.engine.startup import (build_test_datasets, build_train_data_loader, build_train_datasets,
                                      check_initial_weights, event_files, final_line, note_stop, other_data_note,
                                      parameters_line, schedule_warnings, shared_images_warnings,
                                      small_objects_warnings, summary_lines, training_data_id, undo_unstarted_run)
from detection.engine.train_state import TrainState, build_train_state, restore_train_state, seed_everything
from detection.modeling.precision import SLOW_BFLOAT16, amp_dtype, training_amp

# The names other modules and tools import from here, whichever part defines them.
__all__ = ["GracefulStop", "MetricsLog", "TrainState", "TrainingError", "TrainingInterrupted", "TrainingStopped",
           "amp_autocast", "build_train_data_loader", "build_train_datasets", "evaluate", "forward_losses",
           "optimizer_step", "run_step", "seed_everything", "summary_lines", "train", "use_tensorboard"]

logger = logging.getLogger(__name__)


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
    cfg = checked_config(cfg, "the Config given to train()")  # set in Python: checked as a file's values are
    device = du.select_device(cfg.device, cfg.tf32)
    distributed = du.init_distributed(device)
    check_same_config_everywhere(cfg, [f"resume={resume}", f"overwrite={overwrite}"])
    lock = lock_for_every_process(Path(cfg.output_dir))
    run_log = RunLogFile().install() if du.is_main_process() else None
    try:
        with sigterm_before_the_loop():
            return _train(cfg, device, distributed, resume=resume, overwrite=overwrite, explicit=explicit,
                          run_log=run_log)
    except BaseException as err:
        if run_log is not None:  # how the run ended, which the tool prints after log.txt is closed
            run_log.ended(err)
        raise
    finally:
        if run_log is not None:
            run_log.remove()
        if lock is not None:  # a run that failed its checks leaves no (empty) folder it created
            lock.release(remove_empty_dir=True)


def _train(cfg: Config, device: torch.device, distributed: bool, *, resume: bool, overwrite: bool,
           explicit: Optional[Sequence[str]] = None, run_log: Optional[RunLogFile] = None) -> nn.Module:
    """train() once the output folder is locked."""
    out_dir = Path(cfg.output_dir)
    old_run = check_output_dir(out_dir, resume=resume, overwrite=overwrite,
                               checkpoint_period=cfg.solver.checkpoint_period)
    tensorboard = use_tensorboard(cfg.log.tensorboard)  # before anything is written
    seed_everything(cfg.seed)  # same on every rank: identical initial weights
    last = out_dir / "last.pth"
    resuming = resume and last.is_file()
    restart = restarted_run(out_dir, resume=resume, old_run=old_run)
    if resume and not resuming:
        logger.warning("--resume: %s does not exist, starting from iteration 0%s", last,
                       ": the run in the folder stopped before its first checkpoint, its metrics.jsonl is replaced"
                       if restart else "")
    changes = check_resume_config(cfg, out_dir, explicit) if resuming else []  # before anything is built
    if not resuming:
        check_initial_weights(cfg)
    # a new run's data first: initial weights are matched to its classes by name (a resume needs
    # none of it to find out that the run is finished)
    datasets = None if resuming else build_train_datasets(cfg)
    state = _initial_state(cfg, device, out_dir, resuming, datasets[0].class_names if datasets else ())
    if resuming and cfg.solver.max_iter < state.iteration:
        raise ConfigError(f"solver.max_iter={cfg.solver.max_iter}: {last} is at iteration {state.iteration} and a "
                          f"run cannot go back; give solver.max_iter={state.iteration} to end it there (it writes "
                          "model_final.pth) or more to train on")
    if cfg.test.save_best is not None and not (cfg.datasets.test and cfg.test.eval_period > 0):
        best_metric_key(cfg, [])  # its ConfigError before anything is moved (the metric's name: once the sets are read)
    if (resuming or restart) and du.is_main_process():  # before a finished run's model_final.pth is looked for
        set_aside_later_checkpoints(out_dir, state.iteration)
    if resuming and du.is_main_process():
        for said in (schedule_jump(cfg, changes, state.iteration), data_order_change(changes, state.iteration)):
            if said:
                logger.warning("%s", said)
    if resuming and _is_finished(cfg, state, out_dir, changes):
        if du.is_main_process():  # a save killed at the end (model_final.pth's) left its temporary file
            remove_partial_checkpoints(out_dir)
        if changes and du.is_main_process():  # ended here by a deliberate change: recorded as any other
            prepare_output_dir(cfg, out_dir, remove=[], resumed_at=state.iteration)
            record_resume_changes(out_dir, state.iteration, changes)
        if run_log is not None:  # "resumed at", "nothing to train" (and a model_final.pth written) too
            run_log.open(out_dir / LOG_FILE)
        return state.model
    datasets = datasets or build_train_datasets(cfg, (last, state.class_names) if resuming else None)
    test_sets = build_test_datasets(cfg, datasets[0].class_names)  # before anything is written, too
    best_key = best_metric_key(cfg, test_sets)  # test.save_best, checked against what the evaluations give
    if best_key and resuming and du.is_main_process():
        restore_best(state, cfg, out_dir, best_key, [change[0] for change in changes])
    start = (state.iteration, event_files(out_dir),
             [p for p in (out_dir / "config.yaml", out_dir / LOG_FILE) if not p.exists()])  # what this run creates
    if du.is_main_process():
        for line in [*summary_lines(cfg, datasets, device, test_sets),
                     parameters_line(state.model, cfg.model.backbone.freeze_at)]:
            logger.info("%s", line)
        for line in [*schedule_warnings(cfg), *small_objects_warnings(cfg, datasets, test_sets),
                     *shared_images_warnings(datasets, test_sets)]:
            logger.warning("%s", line)
        world = du.get_world_size()
        if world > 1 and cfg.model.backbone.norm == "bn":  # a distributed trial: nothing said it
            logger.warning("model.backbone.norm: bn under %d processes: each BatchNorm normalises over its process's "
                           "%d images, not the global batch of %d, and keeps process 0's running statistics "
                           "(DistributedDataParallel copies them); there is no synchronised BatchNorm here "
                           "(Detectron2's SyncBN, torchvision's --sync-bn): gn and frozen_bn train alike on any "
                           "number of processes", world, cfg.solver.ims_per_batch // world, cfg.solver.ims_per_batch)
        if cfg.solver.amp and not training_amp(True, device):
            logger.warning("solver.amp: %s: training in float32 (solver.amp=false says the same without this "
                           "warning)", SLOW_BFLOAT16)
        prepare_output_dir(cfg, out_dir, remove=old_run if overwrite else [], restart=restart,
                           resumed_at=state.iteration if resuming else None)
        if run_log is not None:
            run_log.open(out_dir / LOG_FILE)
        record_resume_changes(out_dir, state.iteration, changes)
    try:
        _start_loop(cfg, state, datasets, device, distributed, tensorboard, test_sets, best_key)
    except BaseException:
        if du.is_main_process() and state.iteration == start[0]:  # not one iteration done: leave no trace
            undo_unstarted_run(out_dir, events_before=start[1], created=start[2])
        raise
    return state.model


def _initial_state(cfg: Config, device: torch.device, out_dir: Path, resuming: bool,
                   class_names: Sequence[str] = ()) -> TrainState:
    """The run's state at its first iteration: the run's own last.pth, or model.weights (a
    detector or backbone weights), replaces the model.backbone.weights file, which is then
    neither read nor required. `class_names`: the training data's, which a detector's
    class-specific layers are matched to by name."""
    initial = read_detector_file(cfg.model.weights) if cfg.model.weights and not resuming \
        and not cfg.model.weights.startswith("torchvision:") else None
    state = build_train_state(cfg, device, backbone_needed=not resuming and not cfg.model.weights)
    if resuming:
        last = out_dir / "last.pth"
        restore_train_state(state, load_resume_checkpoint(last), last)
        logger.info("resumed at iteration %d", state.iteration)
        state.periodic = periodic_checkpoints(out_dir, up_to=state.iteration) if du.is_main_process() else []
    elif cfg.model.weights:
        load_initial_weights(state.model, cfg.model.weights, cfg.model.backbone, initial, class_names=class_names)
    return state


@dataclass
class _Run:
    """What every iteration of one run reads and writes."""

    cfg: Config
    state: TrainState
    model: nn.Module  # state.model, or the DistributedDataParallel that wraps it
    data: Iterator  # the training batches, from state.iteration on
    device: torch.device
    test_sets: list  # datasets.test as read and checked at the start: each evaluation uses them
    best_key: Optional[str] = None  # test.save_best as the metrics name it

    @property
    def last(self) -> Path:
        return Path(self.cfg.output_dir) / "last.pth"


def _start_loop(cfg: Config, state: TrainState, datasets: list, device: torch.device, distributed: bool,
                tensorboard: bool, test_sets: list, best_key: Optional[str] = None) -> None:
    """The loader, the fast path and DDP, then the iterations."""
    if cfg.model.fast_path:  # same parameters and state_dict keys: checkpoints are unchanged
        from detection.accel import optimize_for_training

        optimize_for_training(state.model, channels_last=True, levers=accel_levers(cfg))  # training_plan's steps
    elif levers_without_fast_path(cfg) and du.is_main_process():
        logger.warning("%s", levers_without_fast_path(cfg))
    state.train_data = training_data_id(datasets)
    note = other_data_note(state.resumed_data, state.train_data, Path(cfg.output_dir) / "last.pth")
    if note and du.is_main_process():
        logger.warning("%s", note)
    data = iter(build_train_data_loader(cfg, datasets, state.iteration, data_order=state.data_order))
    state.class_names = tuple(datasets[0].class_names)
    state.model.class_names = list(state.class_names)  # what its labels mean, for whoever uses the model
    model = state.model
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(state.model, device_ids=ids)
    try:
        _loop(_Run(cfg, state, model, data, device, test_sets, best_key), tensorboard)
    finally:  # the workers end with the run, not with the last reference to the iterator: an interrupted
        # train() in a notebook kept them (and their batches) while the traceback's frames lived
        data.close()


def _is_finished(cfg: Config, state: TrainState, out_dir: Path, changes: Sequence = ()) -> bool:
    """A resumed run at solver.max_iter has nothing to train: say so (and write a missing
    model_final.pth: the process was killed between the last checkpoint and that file). One
    whose final evaluation did not finish is not: the loop makes it (_evaluation_missing).
    `changes` (keys the --resume changed) that shape training (shapes_training: not
    solver.max_iter, which ends a run there, nor test-time, logging or device keys) are refused
    for a finished run: nothing trains with them, yet config.yaml would say its weights were
    made with them."""
    if state.iteration < cfg.solver.max_iter or _evaluation_missing(cfg, state.iteration, out_dir):
        return False
    unused = [key for key, _, _ in changes if shapes_training(key)]
    if unused:
        raise ConfigError(f"{out_dir}: the run is finished (iteration {state.iteration}), so --resume with "
                          f"{', '.join(unused)} changed would train nothing with them, and config.yaml would no "
                          "longer say how its weights were made: to evaluate with other settings give them to "
                          "tools/eval.py; to train on with them, raise solver.max_iter too")
    logger.info("%s: the run is finished (iteration %d, solver.max_iter %d): nothing to train",
                out_dir, state.iteration, cfg.solver.max_iter)
    if du.is_main_process() and not (out_dir / "model_final.pth").is_file():
        _finish(state, cfg, out_dir)
    return True


# keys that do not change how a run's weights are made: a finished run resumed with them records them
_NOT_TRAINING = ("test.", "log", "device", "tf32", "accel.", "datasets.test", "solver.max_iter",
                 "model.roi_heads.detections_per_image", "input.min_size_test", "input.max_size_test")


def shapes_training(key: str) -> bool:
    """Whether a config key changes how a run's weights are made: not the test-time settings
    (test.*, the *_test keys, detections per image), logging, the device and its levers, the
    test sets, nor solver.max_iter (a finished run's resume with it ends the run there)."""
    return not (key.startswith(_NOT_TRAINING) or key.endswith("_test"))


def _evaluation_missing(cfg: Config, iteration: int, out_dir: Path) -> bool:
    """A resumed run's checkpoint iteration calls for an evaluation (test.eval_period, or the
    end) that metrics.jsonl lacks: the run stopped while it ran (it follows the save). Rank 0
    reads the file; every rank gets its answer (the evaluation is every rank's)."""
    period = cfg.test.eval_period if cfg.datasets.test else 0
    due = bool(period) and iteration > 0 and (iteration % period == 0 or iteration == cfg.solver.max_iter)
    missing = due and du.is_main_process() and not evaluation_recorded(out_dir / "metrics.jsonl", iteration)
    return bool(du.all_gather_object(missing)[0]) if due else False


def _first_line(err: BaseException, limit: int = 120) -> str:
    line = (str(err).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _finish(state: TrainState, cfg: Config, out_dir: Path) -> None:
    logger.info("%s", final_line(save_final(state, cfg, out_dir), state.iteration, bool(cfg.datasets.test)))
    if state.best is not None:
        logger.info("the best %s, %.2f, was at iteration %d: %s holds those weights", state.best["metric"],
                    state.best["value"], state.best["iteration"], out_dir / "model_best.pth")
    elif cfg.test.save_best is not None:
        logger.warning("test.save_best: %s was not defined at any evaluation of this run: no model_best.pth",
                       cfg.test.save_best)


def _loop(run: _Run, tensorboard: bool = False) -> None:
    """The iterations, under a progress bar that is closed before any error or Ctrl-C is
    reported, so the message gets a line of its own."""
    main, state = du.is_main_process(), run.state
    try:
        # disable=None: drawn on a terminal only (a batch job's .out file got ~200 bytes of bar an iteration)
        # the logging redirect (lines printed above the bar) only under a drawn bar: it saves the root
        # logger's handler list and puts it back whole, dropping or reviving another thread's handlers
        with tqdm(total=run.cfg.solver.max_iter, initial=state.iteration, disable=None if main else True,
                  dynamic_ncols=True, desc="train") as bar, \
                (contextlib.nullcontext() if bar.disable else logging_redirect_tqdm()), \
                GracefulStop(run.device) as stop, \
                MetricsLog(run.last.parent, tensorboard=tensorboard and main, start_iter=state.iteration,
                           kept=lambda: what_is_kept(state, run.last)) as log:
            _iterations(run, bar, stop, log)
            if main:  # under GracefulStop too: a signal now lets model_final.pth be written
                _finish(state, run.cfg, run.last.parent)
    except TrainingStopped:
        raise
    except KeyboardInterrupt:
        saved = "no checkpoint written yet" if state.checkpoint_iteration is None else \
            f"last checkpoint: {run.last} (iteration {state.checkpoint_iteration})"
        raise TrainingInterrupted(f"interrupted at iteration {state.iteration}; {saved}") from None
    except Exception as err:
        if du.get_world_size() > 1 and not isinstance(err, TrainingError) and lost_peer(err):
            # another process failed (its own error says why): one line here, not the backend's
            # 40-line traceback ending in "Connection closed by peer"
            raise TrainingError(f"another process stopped first ({type(err).__name__} at iteration {state.iteration}: "
                                f"{_first_line(err)}): its own error above, or its 'run ended in process N' line "
                                f"in log.txt, says why; {what_is_kept(state, run.last)}") from err
        if isinstance(err, RuntimeError) and str(err).startswith("DataLoader worker (pid"):
            # killed by the system: a 40-line traceback without the likely causes
            raise TrainingError(f"a data loader worker died at iteration {state.iteration} ({_first_line(err)}): "
                                "out of memory (the kernel's OOM killer: dmesg), or a container's shared memory "
                                "too small for the workers (Docker's 64 MB /dev/shm: docker run --shm-size=8g), "
                                f"or dataloader.num_workers=0 loads in this process; {what_is_kept(state, run.last)}"
                                ) from err
        if not isinstance(err, TrainingError):  # a TrainingError names the checkpoint itself
            note_stop(err, state.iteration, what_is_kept(state, run.last))
            if not main:  # this process alone failed (a TrainingError is every rank's, agreed): say why in log.txt
                RunLogFile.ended_in_other_process(run.last.parent / LOG_FILE, err, du.get_rank())
        raise
    du.synchronize()


def _iterations(run: _Run, bar: tqdm, stop: GracefulStop, log: MetricsLog) -> None:
    """Step after step up to solver.max_iter; after each, what its iteration number calls for."""
    state, max_iter = run.state, run.cfg.solver.max_iter
    if state.checkpoint_iteration == state.iteration and _evaluation_missing(run.cfg, state.iteration, run.last.parent):
        logger.warning("metrics.jsonl has no evaluation of iteration %d (the run stopped in it, or test.eval_period "
                       "changed on this resume): evaluating it now", state.iteration)
        _evaluate(run, log, stop)
    timer = time.perf_counter()
    window = TimeWindow()
    while state.iteration < max_iter:
        images, targets = next(run.data)
        data_time = time.perf_counter() - timer
        lr = state.optimizer.param_groups[0]["lr"]  # the step below runs at it, then the schedule moves on
        losses = run_step(run.cfg, state, run.model, images, targets, run.device)
        state.iteration += 1
        window.add(time.perf_counter() - timer, data_time)
        bar.set_postfix(loss=f"{sum(losses.values()):.3f}", lr=f"{lr:.2e}")
        bar.update(1)
        if du.is_main_process() and (state.iteration % run.cfg.log_period == 0 or state.iteration == max_iter):
            record = {"iteration": state.iteration, **losses, "total_loss": sum(losses.values()),
                      "lr": lr, **window.medians(), **peak_memory(run.device)}
            log.write(record)
            logger.info("%s", progress_line(record, max_iter))
        _after_step(run, log, stop)
        if state.iteration < max_iter and stop.agreed():
            stop_gracefully(state, run.cfg, run.last, stop)
        # the next iteration's clock starts here: a checkpoint's save or an evaluation is no
        # iteration's time nor data_time (as Detectron2's IterationTimer leaves its hooks out)
        timer = time.perf_counter()


def _after_step(run: _Run, log: MetricsLog, stop: GracefulStop) -> None:
    """The checkpoint (every solver.checkpoint_period iterations and at the end) and the
    evaluation (every test.eval_period, and at the end, as Detectron2's EvalHook) the iteration
    just finished calls for."""
    state = run.state
    periodic = state.iteration % run.cfg.solver.checkpoint_period == 0
    if periodic or state.iteration == run.cfg.solver.max_iter:
        save_last(state, run.cfg, run.last, periodic=periodic)
    period = run.cfg.test.eval_period if run.cfg.datasets.test else 0  # no test set: nothing to evaluate
    if period and (state.iteration % period == 0 or state.iteration == run.cfg.solver.max_iter):  # and at the end
        _evaluate(run, log, stop)


def _evaluate(run: _Run, log: MetricsLog, stop: GracefulStop) -> None:
    """The test sets' metrics at this iteration, into metrics.jsonl (test.eval_period). A signal
    during it stops it and the run, last.pth saved at this iteration: in one process at once,
    under torchrun at the next batch (every rank there), or after the scoring if it came then."""
    state = run.state
    du.broadcast_buffers(state.model)  # every rank evaluates the model rank 0 saves
    check_finite_weights(state, run.last)  # the same weights on every rank: each stops
    # evaluate() puts the random states back itself; a signal's EvaluationStopped may land in that
    # restore, so it is made again here, outside the evaluation (last.pth then saves them)
    states = get_rng_states()
    try:
        with stop.evaluation():
            metrics = evaluate(run.cfg, state.model, between_batches=stop.check_evaluation, datasets=run.test_sets)
    except EvaluationStopped:
        set_rng_states(states)
        state.model.train()
        stop_gracefully(state, run.cfg, run.last, stop)  # raises TrainingStopped
        raise
    if du.is_main_process():
        log.write({"iteration": state.iteration, **metrics})
    if run.best_key:
        save_best(state, run.cfg, run.last.parent, metrics, run.best_key)  # every rank: a failed write stops all
    state.model.train()


def amp_autocast(enabled: bool, device: torch.device) -> torch.autocast:
    """solver.amp's autocast (precision.amp_dtype: float16 on CUDA, bfloat16 on the CPU); when not
    enabled, autocast off (also inside a caller's)."""
    return torch.autocast(device.type, dtype=amp_dtype(device), enabled=enabled)


def run_step(cfg: Config, state: TrainState, model: nn.Module, images: list, targets: list,
             device: torch.device) -> dict[str, float]:
    """One SGD step; returns the losses averaged over processes (as Python floats)."""
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    loss_dict = forward_losses(model, images, targets, amp=training_amp(cfg.solver.amp, device), device=device)
    total = sum(loss_dict.values())
    reduced = reduce_losses(loss_dict)
    if not all(np.isfinite(v) for v in reduced.values()):
        values = ", ".join(f"{k}={v:.4g}" for k, v in reduced.items())
        if state.iteration == state.start_iteration:  # no step taken: not the learning rate
            raise TrainingError(f"iteration {state.iteration + 1}: loss is not finite ({values}) before any step of "
                                "this run: the weights it starts from (model.weights, or the checkpoint resumed), the "
                                "input normalisation (model.pixel_mean / pixel_std) or the data give it, not the "
                                f"learning rate; {what_is_kept(state, Path(cfg.output_dir) / 'last.pth')}")
        kept = kept_after_divergence(state, Path(cfg.output_dir) / "last.pth")
        raise TrainingError(f"iteration {state.iteration + 1}: loss is not finite ({values}); training "
                            f"stopped, {kept}.")
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
