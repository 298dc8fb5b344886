"""What the loop records: the losses averaged over processes, the peak memory, metrics.jsonl
and (log.tensorboard) the same numbers as TensorBoard scalars."""
from __future__ import annotations

import importlib.util
import json
import logging
import resource
from pathlib import Path
from typing import Callable, Optional

import torch

from detection.config import ConfigError
from detection.engine import distributed as du
from detection.engine.errors import TrainingError
from detection.utils.files import DISK_FULL
from detection.utils.files import strict_json

logger = logging.getLogger(__name__)


def reduce_losses(loss_dict: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean of each loss over processes, so every rank sees the same (finite or not) values."""
    keys = sorted(loss_dict)
    values = torch.stack([loss_dict[k].detach().float() for k in keys])
    if du.get_world_size() > 1:
        torch.distributed.all_reduce(values)
        values /= du.get_world_size()
    return dict(zip(keys, values.tolist()))


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory for a metrics.jsonl line: on a GPU the most CUDA allocations held since the
    previous line (the peak counter is reset after reading, as Detectron2's TorchMemoryStats
    hook does; its metrics printer's max_mem is the peak since the start), so each line shows
    its own window: the evaluation's peak in the line after it; on the CPU the process's
    resident set at its largest so far (it cannot be reset)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return {"max_mem_mb": peak}
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


def is_evaluation(record: dict) -> bool:
    """A metrics.jsonl line of an evaluation (test.eval_period): the test sets' metrics at its
    iteration, without the losses every training line holds."""
    return "total_loss" not in record


class MetricsLog:
    """metrics.jsonl, the run's record (a line every log_period iterations and one per
    evaluation), and with `tensorboard` the same numbers as TensorBoard scalars: event files in
    the output folder (torch.utils.tensorboard.SummaryWriter), tag = the key, step = the
    iteration. Rank 0 only. The writer is closed (flushed) when the loop ends, however it ends."""

    def __init__(self, out_dir: Path, *, tensorboard: bool = False, start_iter: int = 0,
                 kept: Optional[Callable[[], str]] = None) -> None:
        """`kept`: what the run leaves to resume from (loop_checkpoints.what_is_kept), said when a
        line cannot be written."""
        self.path = out_dir / "metrics.jsonl"
        self.kept = kept
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides what earlier writers in this folder logged after the
            # iteration the run starts from, as run_folder.truncate_metrics drops those lines
            def open_writer() -> None:
                self.writer = SummaryWriter(str(out_dir), purge_step=start_iter + 1)

            self._tensorboard(open_writer)  # a full disk already here: the same warning, not a traceback

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self._tensorboard(self.writer.close)

    def write(self, record: dict) -> None:
        """Append one line to metrics.jsonl; a failed write (a full disk) stops training with one
        error. A line cut short is dropped when the run is resumed (run_folder.truncate_metrics).
        Strict JSON: a value that is not a finite number (APl of a test set without large
        objects) is null, as in eval's metrics.json, and not sent to TensorBoard."""
        record = strict_json(record)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
        except OSError as err:
            raise TrainingError(f"could not append to {self.path} at iteration {record.get('iteration')} "
                                f"({err.strerror or err}); training stopped"
                                + (f", {self.kept()}" if self.kept else ""), transient=err.errno in DISK_FULL) from None
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
