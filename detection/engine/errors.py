"""The ways a training run stops short, as the tools tell them apart: an error (exit 1), Ctrl-C,
or a signal answered by saving last.pth (exit 128 + the signal's number)."""
from __future__ import annotations

import signal


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where and why.
    `transient`: the cause may pass (a full disk): the tools exit with EXIT_TRY_AGAIN, not 1."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message names the iteration and the last checkpoint.
    A KeyboardInterrupt still, so code that catches those keeps working. `signum` is the
    signal that stopped the run (SIGINT unless a SIGTERM did): tools exit with 128 + signum."""

    signum: int = signal.SIGINT


class TrainingStopped(TrainingInterrupted):
    """SIGTERM, SIGINT or SIGUSR1 during training (a scheduler's pre-emption or warning, Ctrl-C): the current
    iteration was finished and last.pth saved there; the message says so."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
