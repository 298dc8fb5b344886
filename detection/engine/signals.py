"""SIGTERM / SIGINT / SIGUSR1 while training: the loop finishes its iteration, saves last.pth and stops."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from detection.engine import distributed as du
from detection.engine.errors import TrainingInterrupted, TrainingStopped

logger = logging.getLogger(__name__)

# a second signal this soon after the stop was asked for is the same stop: Slurm signals every
# process of a job step (torchrun and its workers), and torchrun passes its own on to the workers,
# so each worker gets two; a second Ctrl-C later stops at once
REPEAT_WINDOW_S = 5.0


class EvaluationStopped(BaseException):
    """A signal during training's evaluation: the evaluation is given up (--resume makes it
    first), so that last.pth is saved at once, not after minutes of evaluation a scheduler's grace
    period may not wait for. A BaseException, as KeyboardInterrupt, so that no `except Exception`
    inside the evaluation takes it."""


class GracefulStop:
    """SIGTERM / SIGINT / SIGUSR1 while training: note the signal, let the current iteration finish,
    then save last.pth there and stop (loop_checkpoints.stop_gracefully). During an evaluation
    it is given up (EvaluationStopped): in a one-process run at once; with several processes at
    the next batch, where every rank asks whether any got a signal (check_evaluation), so they
    all stop at the same batch (a signal while rank 0 scores the gathered detections is taken
    after the scoring, at the next iteration's agreement). A second signal during the save
    is noted and does not interrupt it (the save is atomic anyway), as is one within
    REPEAT_WINDOW_S of the first (launchers pass one stop on to every process); a second one at
    any other moment stops at once, as Ctrl-C does. Handlers are installed only in the main thread and
    the previous ones put back on exit."""

    # SIGUSR1: Slurm's usual warning before a time limit (`#SBATCH --signal=USR1@120`, as
    # Lightning's templates send it): Python's default ended the run at once, no last.pth, no word
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, device: torch.device = torch.device("cpu")) -> None:
        self.device = device  # where the ranks' agreement is reduced (NCCL reduces CUDA tensors only)
        self.signum = 0
        self._first_at = 0.0  # when the stop was first asked for here (a signal, or the ranks' agreement)
        self.saving = False
        self.evaluating = False  # one process: the handler stops the evaluation itself
        self.evaluating_together = False  # several: the ranks agree at the next batch
        self._previous: dict = {}
        self._pid = os.getpid()

    def __enter__(self) -> "GracefulStop":
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked data-loader worker (Ctrl-C reaches the whole group): the run's
            return                    # process stops the loader; a worker that raised would kill it
        name = signal.Signals(signum).name
        now = time.monotonic()
        if not self.signum:
            self._first_at = now
        if not self.signum and self.evaluating:
            self.signum = signum
            logger.warning("%s received during the evaluation: stopping it and saving last.pth "
                           "(--resume makes the evaluation first)", name)
            raise EvaluationStopped
        if not self.signum and self.evaluating_together:
            self.signum = signum
            logger.warning("%s received during the evaluation: stopping it at its next batch (every process), or "
                           "after it if no batch is left, and saving last.pth", name)
        elif not self.signum:
            self.signum = signum
            logger.warning("%s received: stopping after this iteration, once last.pth is saved "
                           "(a second signal, %.0f s or more after this one, stops at once)", name, REPEAT_WINDOW_S)
        elif self.saving:
            logger.warning("%s received again while last.pth is being saved: finishing the save first", name)
        elif now - self._first_at < REPEAT_WINDOW_S:
            logger.warning("%s received %.1f s after the stop was asked for: taken as the same stop (a scheduler "
                           "signals every process, and torchrun passes its own on)", name, now - self._first_at)
        else:
            raise KeyboardInterrupt

    def agreed(self) -> bool:
        """Whether any rank got a signal (every rank calls this at the same places: once per
        iteration, and before each batch of training's evaluation, check_evaluation)."""
        if du.get_world_size() > 1:
            flag = torch.tensor([self.signum], dtype=torch.int64, device=self.device)  # NCCL: on the GPU
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and not self.signum:  # another rank's signal: this rank's own may follow
                self._first_at = time.monotonic()
            self.signum = int(flag.item())
        return bool(self.signum)

    def check_evaluation(self) -> None:
        """Before each batch of training's evaluation (every rank as often: inference_on_dataset):
        EvaluationStopped on every rank when any got a signal."""
        if self.agreed():
            raise EvaluationStopped

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        """Training's evaluation: a first signal stops it (EvaluationStopped: in one process at
        once, as does one that came before it, in the iteration or the save just before; with
        several at the next batch's check_evaluation, which also takes one that came before)."""
        self.evaluating = du.get_world_size() == 1
        self.evaluating_together = not self.evaluating
        try:
            if self.evaluating and self.signum:
                raise EvaluationStopped
            yield
        finally:
            self.evaluating = self.evaluating_together = False

    @contextmanager
    def saving_last(self) -> Iterator[None]:
        """The save after a signal: a second signal in it waits for the save to finish."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False

    def stopped(self, path: Path, iteration: int) -> TrainingStopped:
        """The error that ends the run once last.pth at `iteration` is saved."""
        name = signal.Signals(self.signum).name
        return TrainingStopped(f"stopped by {name} at iteration {iteration}; saved {path} (iteration "
                               f"{iteration}): --resume continues from there", self.signum)


@contextmanager
def sigterm_before_the_loop() -> Iterator[None]:
    """Until GracefulStop takes over (the loop): SIGTERM stops the run as Ctrl-C does there,
    with its message and exit 143, and the run's start is taken back (no half-made folder),
    instead of Python's default of ending the process without a word."""
    def stop(signum, frame):
        err = TrainingInterrupted(f"stopped by {signal.Signals(signum).name} before training started")
        err.signum = signum
        raise err

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
