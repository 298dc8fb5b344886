"""What a training run records besides metrics.jsonl: `log.txt` in its output folder (every
message of the run, as Detectron2 writes one), the progress line logged every log_period
iterations, and the window of iteration times whose median metrics.jsonl's `time` is."""
from __future__ import annotations

import datetime
import logging
import statistics
import threading
import warnings
from pathlib import Path
from typing import IO, Optional

LOG_FILE = "log.txt"
# the project's loggers: their info messages (the start summary, "resumed at ...", the
# progress lines) belong in log.txt even when no console shows them
PROJECT_LOGGERS = ("detection", "backbones")


class TimeWindow:
    """The iteration and data-loading times since the previous metrics line. metrics.jsonl's
    `time` and `data_time` are their medians, as Detectron2's metrics.json: one slow iteration
    (the first one's warm-up) does not stand for the window, and a window of log_period 1 is
    that iteration's time. Checkpoint saves and evaluations between iterations are in neither."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.data_times: list[float] = []

    def add(self, iteration_time: float, data_time: float) -> None:
        self.times.append(iteration_time)
        self.data_times.append(data_time)

    def medians(self) -> dict[str, float]:
        """{"time", "data_time"}: the medians over the window, which then starts again."""
        out = {"time": statistics.median(self.times), "data_time": statistics.median(self.data_times)}
        self.times, self.data_times = [], []
        return out


def progress_line(record: dict, max_iter: int) -> str:
    """One metrics.jsonl record as the line log.txt (and the console) shows, e.g.
    `iter 20/100: total_loss 1.234 (loss_cls 0.4, ...), lr 0.001, time 0.512 s/it, ..., eta 0:00:41`."""
    losses = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k.startswith("loss_"))
    eta = datetime.timedelta(seconds=round(record["time"] * (max_iter - record["iteration"])))
    memory = next((f", {k} {v:.0f}" for k, v in record.items() if k.startswith("max_")), "")
    return (f"iter {record['iteration']}/{max_iter}: total_loss {record['total_loss']:.4g} ({losses}), "
            f"lr {record['lr']:.4g}, time {record['time']:.3f} s/it, data_time {record['data_time']:.3f} s "
            f"(medians since the previous line){memory}, eta {eta}")


# the run logs installed (runs in threads of one process), and the project loggers' levels the
# first of them raised to info, put back when the last is removed
_INSTALLED: list = []
_RAISED_LEVELS: dict[str, int] = {}
_INSTALLED_LOCK = threading.Lock()


class RunLogFile(logging.Handler):
    """log.txt: every message the run logs, with its time, level and logger, appended across
    resumes (the history of a run's restarts stays, as in Detectron2's log.txt).

    Installed on the root logger when training starts; messages come before the output folder
    may be written (the run's checks first), so they are held until `open` and a run refused by
    its checks writes nothing. Python warnings (`warnings.warn`: test.amp's float32 fallback,
    PyTorch's) go to log.txt too, as WARNING lines, and are shown as before. A log.txt that
    cannot be written (a full disk) is one warning and no more lines, never a stop: metrics.jsonl
    and the checkpoints are the run's record.

    Only the installing thread's messages are the run's: two runs trained in threads of one
    process (a notebook) wrote each other's lines. Once removed it takes nothing, should a
    saved handler list put it back (tqdm's logging redirect of another thread's run did, and
    every later message of the process was held in memory)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                            "%Y-%m-%d %H:%M:%S"))
        self.held: list[str] = []
        self.stream: Optional[IO[str]] = None
        self.path: Optional[Path] = None
        self.failed = False
        self._shown = None  # warnings.showwarning before install
        self._thread = threading.get_ident()
        self._removed = False

    def install(self) -> "RunLogFile":
        """On the root logger, with the project's loggers at info at least (put back by remove,
        when no other run's is installed: a run in another thread still logs at info)."""
        self._thread = threading.get_ident()
        with _INSTALLED_LOCK:
            if not _INSTALLED:
                for name in PROJECT_LOGGERS:
                    log = logging.getLogger(name)
                    if log.getEffectiveLevel() > logging.INFO:
                        _RAISED_LEVELS[name] = log.level
                        log.setLevel(logging.INFO)
            _INSTALLED.append(self)
        logging.getLogger().addHandler(self)
        self._shown = warnings.showwarning
        warnings.showwarning = self._show_warning
        return self

    def _show_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        """A Python warning: into log.txt (its text, category and place), then shown as before."""
        if not self.failed and not self._removed and threading.get_ident() == self._thread:
            record = logging.LogRecord("py.warnings", logging.WARNING, str(filename), int(lineno or 0),
                                       "%s (%s, %s:%s)", (message, category.__name__, filename, lineno), None)
            self._add(self.format(record))
        self._shown(message, category, filename, lineno, file, line)

    def remove(self) -> None:
        self._removed = True
        if warnings.showwarning == self._show_warning:  # not replaced again since
            warnings.showwarning = self._shown
        logging.getLogger().removeHandler(self)
        with _INSTALLED_LOCK:
            if self in _INSTALLED:
                _INSTALLED.remove(self)
            if not _INSTALLED:
                for name, level in _RAISED_LEVELS.items():
                    logging.getLogger(name).setLevel(level)
                _RAISED_LEVELS.clear()
        self.close()

    def open(self, path: Path) -> None:
        """Start writing to `path` (appending), the held messages first."""
        self.path = Path(path)
        try:
            self.stream = open(self.path, "a", encoding="utf-8")
        except OSError as err:
            self._give_up(err)
            return
        held, self.held = self.held, []
        self._write("".join(line + "\n" for line in held))

    def emit(self, record: logging.LogRecord) -> None:
        ours = not self._removed and record.thread == self._thread
        if self._prints(record, ours):
            # Python prints warnings to stderr only when no handler exists (logging.lastResort):
            # this one must not silence them for a caller that set up no logging (a notebook's
            # train()), and shows that caller the run's own lines, as the command line does
            logging.lastResort.handle(record)
        if self.failed or not ours:
            return
        self._add(self.format(record))

    def _add(self, line: str) -> None:
        if self.stream is None:
            self.held.append(line)
        else:
            self._write(line + "\n")

    def ended(self, err: BaseException) -> None:
        """log.txt's last line for a run that did not finish: what the tool prints when it stops
        (a signal's stop and its checkpoint, an interrupt, a training error, with its notes),
        which comes after this file is closed. Only into log.txt: the tool prints it."""
        if self.stream is None or self.failed:
            return  # refused by its checks (nothing written), or the file failed
        self._write(self.format(ended_record(err)) + "\n")

    @classmethod
    def ended_in_other_process(cls, path: Path, err: BaseException, rank: int) -> None:
        """Another rank's end, appended to rank 0's log.txt as one line (`run ended in process N:
        ...`): a failure in one process (a bad image only it reads) otherwise reaches log.txt only
        as rank 0's lost connection. Nothing when log.txt was not started (the run's checks
        refused it) or cannot be written."""
        if not Path(path).is_file():
            return
        line = cls().format(ended_record(err, rank)) + "\n"
        try:
            with open(path, "a", encoding="utf-8") as f:  # one short append: whole, beside rank 0's lines
                f.write(line)
        except OSError:
            pass

    def _prints(self, record: logging.LogRecord, ours: bool) -> bool:
        """Whether this handler prints `record` to stderr: only when the root logger has run logs
        alone (the caller set up no logging), a run's own lines by its handler, and the other
        threads' warnings by the first run log (once, not by each run's)."""
        handlers = logging.getLogger().handlers
        if logging.lastResort is None or not all(isinstance(h, RunLogFile) for h in handlers):
            return False
        if ours:
            return True
        owned = any(not h._removed and h._thread == record.thread for h in handlers)
        return record.levelno >= logging.WARNING and not owned and handlers[:1] == [self]

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()  # a killed run keeps its log up to the kill
        except OSError as err:
            self._give_up(err)

    def _give_up(self, err: OSError) -> None:
        self.failed, self.held = True, []
        logging.getLogger(__name__).warning("%s could not be written (%s): no more lines there; metrics.jsonl "
                                            "and the checkpoints go on", self.path, err.strerror or err)

    def close(self) -> None:
        if self.stream is not None:
            try:
                self.stream.close()
            except OSError:
                pass
            self.stream = None
        super().close()


def ended_record(err: BaseException, rank: int = 0) -> logging.LogRecord:
    """log.txt's `run ended: ...` line for `err` (in process `rank`, when not rank 0's)."""
    stopped = isinstance(err, KeyboardInterrupt)
    ours = type(err).__module__.split(".")[0] in ("detection", "backbones")  # its message says it all
    text = "; ".join([(str(err) or "interrupted") if stopped or ours else f"{type(err).__name__}: {err}",
                      *getattr(err, "__notes__", [])])
    if not ours and not stopped and lost_peer(err):
        text += " (another process stopped first: its own 'run ended in process N' line or the console says why)"
    where = f" in process {rank}" if rank else ""
    return logging.LogRecord("detection.engine.trainer", logging.WARNING if stopped else logging.ERROR,
                             __file__, 0, f"run ended{where}: {text}", None, None)


def lost_peer(err: BaseException) -> bool:
    """A collective that failed because another process went away (gloo's and NCCL's words)."""
    text = str(err)
    return type(err).__name__ in ("DistBackendError", "DistNetworkError") or any(
        words in text for words in ("closed by peer", "reset by peer", "Connection closed", "NCCL error"))
