"""A training run's output folder: refused when it holds another run (unless resumed or
replaced) or when a live trainer uses it (train.lock), created only once the run's inputs are
checked, and its metrics.jsonl kept free of repeated iterations on resume."""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Optional

from detection.config import Config, dump_config, load_config
from detection.engine.metrics import is_evaluation
from detection.utils.files import (DISK_FULL, FolderInUseError, OutputFolderError, atomic_write, dangling_link,
                                   read_metrics_lines)

logger = logging.getLogger(__name__)

# The files that make a folder "hold a run", and what --overwrite removes.
RUN_FILES = ("last.pth", "model_final.pth", "metrics.jsonl")
OVERWRITTEN = (*RUN_FILES, "model_best.pth", "config.yaml", "inference", "log.txt")
OVERWRITTEN_PATTERNS = ("model_[0-9]*.pth", "model_best_*.pth", "events.out.tfevents.*", "config_resumed_*.yaml",
                        "abandoned_after_*")
LOCK_FILE = "train.lock"
EVAL_LOCK_FILE = "eval.lock"  # tools/eval.py's, in its results folder


class RunLock:
    """One trainer per output folder: `out_dir/train.lock` holds the pid and host of the run
    using the folder, under an exclusive flock(2) held for the run's life.

    The flock, not the pid, decides: the kernel drops it when its process ends, however it
    ends (SIGKILL included), so a lock file left by a killed run is recognised as stale and
    taken over (with a warning naming the old pid), and a reused pid cannot fake a live run.
    The pid and host are there to name the other process in the refusal. Only rank 0 of a
    DDP run takes it: the ranks of one run are one trainer. A forked child (a data-loader
    worker) closes its copy of the lock at once (`_close_in_forked_child`): a flock is held while
    any copy is open, and a killed run's workers, which live up to 5 s more, kept it from the
    `--resume` started at once.

    `name` / `user`: another lock file and what holds it: tools/eval.py takes `eval.lock` in its
    results folder (two evaluations of a run's checkpoints, as a job array starts them, share
    <run>/inference: their files mixed, and source.json named one checkpoint for the other's).
    """

    def __init__(self, out_dir: Path, name: str = LOCK_FILE, user: str = "training run") -> None:
        self.path = Path(out_dir) / name
        self.user = user
        self._fd: Optional[int] = None
        self._created: list[Path] = []  # the folders acquire() made, deepest first

    def acquire(self) -> "RunLock":
        """Take the lock, or OutputFolderError naming the live process that holds it."""
        folder = self.path.parent
        try:  # a name past the file system's limit fails already in exists(): ENAMETOOLONG
            if folder.exists() and not folder.is_dir():
                raise OutputFolderError(f"output folder {folder} is a file, not a folder: choose another --output-dir")
            self._created = [p for p in [folder, *folder.parents] if not p.exists()]
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputFolderError(f"cannot create the output folder {folder}: {err.strerror or err}") from None
        locked = True
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:  # a read-only or full file system: nothing of the run could be written
                raise OutputFolderError(f"cannot write in the output folder {folder} (its lock file {self.path}: "
                                        f"{err.strerror or err}): choose another --output-dir",
                                        transient=err.errno in DISK_FULL) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in _NO_LOCKS:  # a cluster file system mounted without locks (Lustre without flock)
                    logger.warning("%s: this file system does not support file locks (%s): the folder is not "
                                   "protected from a second %s started into it", self.path,
                                   err.strerror or err, self.user)
                    locked = False
                    break
                holder = _read_holder(fd)
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise FolderInUseError(f"{folder} is in use by another {self.user} ({holder}, lock file "
                                        f"{self.path}): wait for it to end, or choose another --output-dir") from None
            # the file may have been removed (by its releasing owner) between our open and flock:
            # then the lock is on an orphan inode; start again on the path's current file
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _read_holder(fd)
        if stale and locked:
            logger.warning("%s: took over a stale lock of %s (that process is gone)", self.path, stale)
        elif stale:  # without locks nothing tells a live holder from a gone one
            logger.warning("%s names %s: if that run is still going, two runs now write into this folder", self.path,
                           stale)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError as err:  # a full disk
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise OutputFolderError(f"cannot write in the output folder {folder} (its lock file {self.path}: "
                                    f"{err.strerror or err}): free space there, or choose another --output-dir",
                                    transient=err.errno in DISK_FULL) from None
        self._fd = fd
        _HELD[fd] = self
        return self

    def release(self, *, remove_empty_dir: bool = False) -> None:
        """Remove the lock file and drop the lock; with remove_empty_dir, also the folders
        acquire() created (the output folder and any parents it made) where nothing else was
        written (a run that failed its checks leaves no half-made path)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiting opener then retries (acquire)
        except OSError:  # a folder gone read-only: the flock goes with the close; the file names a gone pid
            pass
        os.close(self._fd)
        _HELD.pop(self._fd, None)
        self._fd = None
        if remove_empty_dir:
            for folder in self._created:
                try:
                    folder.rmdir()  # only when empty
                except OSError:
                    break  # something was written there: it and its parents stay


_HELD: dict[int, RunLock] = {}  # the locks this process holds, by descriptor (held even if no one keeps the lock)


def _close_in_forked_child() -> None:
    """In a forked child: close the copies of the parent's locks; the child never releases them
    (its release would remove the parent's lock file)."""
    for fd, lock in list(_HELD.items()):
        try:
            os.close(fd)
        except OSError:
            pass
        lock._fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_forked_child)


def lock_for_every_process(out_dir: Path, name: str = LOCK_FILE, user: str = "training run") -> Optional[RunLock]:
    """The first process (rank 0) takes `out_dir`'s lock (RunLock; None on the other ranks);
    its refusal is raised on every process, so none runs on alone (training's, eval.py's)."""
    from detection.utils import comm

    lock, problem = None, None
    if comm.is_main_process():
        try:
            lock = RunLock(out_dir, name, user).acquire()
        except ValueError as err:  # (its message, in use, whether a wait may settle it: in use, a full disk)
            problem = (str(err), isinstance(err, FolderInUseError), getattr(err, "transient", False))
    problems = [p for p in comm.all_gather_object(problem) if p]
    if problems:
        if lock is not None:
            lock.release(remove_empty_dir=True)
        message, in_use, transient = problems[0]
        raise FolderInUseError(message) if in_use else OutputFolderError(message, transient=transient)
    return lock


# flock(2)'s errors where the file system has no locks (not another holder): ENOLCK (NFS or Lustre
# without lock support), EOPNOTSUPP / ENOTSUP, ENOSYS
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP), errno.ENOSYS)


def _read_holder(fd: int) -> str:
    """The 'pid N on HOST' a lock file holds ('' when empty)."""
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return text if text.startswith("pid ") else ("an unknown process" if text else "")


def check_output_dir(out_dir: Path, *, resume: bool, overwrite: bool, checkpoint_period: int = 0) -> list[str]:
    """The run files in out_dir; an OutputFolderError when they are there and neither flag says what
    to do with them (a new run would replace the checkpoints and append to the old metrics).
    `checkpoint_period`: the run's; a metrics.jsonl past it with no last.pth is not a run killed
    before its first checkpoint (last.pth deleted, or a link into storage that is not mounted)."""
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if not found or overwrite or (resume and "last.pth" in found):
        return found
    last = out_dir / "last.pth"
    if resume and dangling_link(last):  # exists() follows the link: a dangling one read as no checkpoint
        raise OutputFolderError(f"{last}{dangling_link(last)}: nothing to resume from until it is (storage not "
                                "mounted?); --overwrite starts the run again")
    if resume and found == ["metrics.jsonl"] and not any(out_dir.glob("model_[0-9]*.pth")):
        done = max((record["iteration"] for _, record in read_metrics_lines(out_dir / "metrics.jsonl")[0]), default=0)
        if checkpoint_period and done >= checkpoint_period:
            raise OutputFolderError(
                f"{out_dir}: its metrics.jsonl goes to iteration {done}, past its first checkpoint "
                f"(solver.checkpoint_period {checkpoint_period}), but last.pth is not there (deleted?): --resume "
                "would start again from iteration 0 and replace that history; put last.pth back, or --overwrite "
                "to start again deliberately")
        return found  # killed before its first checkpoint: --resume starts it again (restarted_run)
    if resume:
        raise OutputFolderError(f"{out_dir} holds a run ({', '.join(found)}) but no last.pth to resume from: "
                                "--overwrite replaces it, or choose another --output-dir")
    if "last.pth" not in found:  # stopped before its first checkpoint: nothing to continue
        raise OutputFolderError(f"{out_dir} already holds a run ({', '.join(found)}) with no last.pth to continue: "
                                "--overwrite replaces it, or choose another --output-dir")
    raise OutputFolderError(f"{out_dir} already holds a run ({', '.join(found)}): --resume continues it, "
                            "--overwrite replaces it, or choose another --output-dir")


def restarted_run(out_dir: Path, *, resume: bool, old_run: list[str]) -> bool:
    """Whether --resume starts a run again from iteration 0: it was killed (kill -9, an OOM kill,
    a lost machine) before its first checkpoint, so its folder has metrics.jsonl and no checkpoint
    (check_output_dir lets only that through without last.pth). An "always --resume" requeue
    script then goes on, as Detectron2's --resume starts afresh without a checkpoint; it was
    refused at every try. Its metrics.jsonl and event files are replaced; log.txt is appended to."""
    return resume and bool(old_run) and "last.pth" not in old_run


def prepare_output_dir(cfg: Config, out_dir: Path, *, remove: list[str], resumed_at: Optional[int],
                       restart: bool = False) -> None:
    """Create out_dir and write config.yaml; with --overwrite first remove the old run's
    files; on a resume drop the metrics lines the checkpoint does not cover; a restarted run
    (restarted_run) starts its metrics and event files again."""
    if restart:
        for path in [out_dir / "metrics.jsonl", *out_dir.glob("events.out.tfevents.*")]:
            path.unlink(missing_ok=True)
    if remove:
        removed = [name for name in OVERWRITTEN if (out_dir / name).exists()]
        # solver.keep_checkpoints' model_{iter}.pth and log.tensorboard's event files
        removed += sorted(p.name for pattern in OVERWRITTEN_PATTERNS for p in out_dir.glob(pattern))
        for name in removed:
            path = out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        logger.warning("--overwrite: removed the previous run's %s from %s", ", ".join(removed), out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_partial_checkpoints(out_dir)
    to_save = with_absolute_folders(cfg)
    if resumed_at is not None and (out_dir / "config.yaml").is_file():  # weights a resume does not read:
        saved = load_config(out_dir / "config.yaml")  # config.yaml keeps those the run started from
        to_save = dataclasses.replace(to_save, model=dataclasses.replace(
            to_save.model, weights=saved.model.weights,
            backbone=dataclasses.replace(to_save.model.backbone, weights=saved.model.backbone.weights)))
    with atomic_write(out_dir / "config.yaml") as f:  # a full disk: one error naming it, the old file kept
        f.write(dump_config(to_save))
    if resumed_at is not None:
        truncate_metrics(out_dir / "metrics.jsonl", resumed_at)


def set_aside_later_checkpoints(out_dir: Path, iteration: int) -> list[str]:
    """On a resume from `iteration`: the folder's checkpoints of a later iteration (model_{iter}.pth
    past it, a model_final.pth or model_best.pth saved past it: an earlier model_*.pth copied to
    last.pth, the README's way back, abandons that history) move into out_dir/abandoned_after_{iteration:07d}/,
    with a warning; their names. Left among the new run's, they were counted by
    solver.keep_checkpoints, taken by a --resume whose last.pth is damaged, and evaluated as this
    run's (a trial found the abandoned run's model_0000035.pth beside the new 32 and 36)."""
    from detection.engine.checkpoint import periodic_checkpoint_path, periodic_checkpoints

    later = [periodic_checkpoint_path(out_dir, it) for it in periodic_checkpoints(out_dir, up_to=2**31)
             if it > iteration]
    saved_at = {}  # model_final.pth's and model_best.pth's iterations, when past it
    for name in ("model_final.pth", "model_best.pth"):
        at = _saved_iteration(out_dir / name) if (out_dir / name).is_file() else None
        if at is not None and at > iteration:
            later.append(out_dir / name)
            saved_at[out_dir / name] = at
    if not later:
        return []
    folder = out_dir / f"abandoned_after_{iteration:07d}"
    for n in range(2, 1000):
        if not folder.exists():
            break
        folder = out_dir / f"abandoned_after_{iteration:07d}_{n}"
    folder.mkdir()
    for path in later:
        path.replace(folder / path.name)
    names = [p.name + (f" (iteration {saved_at[p]})" if p in saved_at else "") for p in later]
    logger.warning("resumed at iteration %d: %s, of this folder's run past it (a history this resume leaves), moved "
                   "into %s: not this run's", iteration, ", ".join(names), folder)
    return [p.name for p in later]


def _saved_iteration(path: Path) -> Optional[int]:
    """The iteration a checkpoint file was saved at (its tensors are not read: mmap), None if it
    cannot tell."""
    import torch

    try:
        value = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("iteration")
    except Exception:  # an unreadable or foreign file: left where it is
        return None
    return value if isinstance(value, int) else None


def with_absolute_folders(cfg: Config) -> Config:
    """`cfg` with output_dir and datasets.root made absolute, as config.yaml keeps them: the
    run's eval.py, visualize.py or --resume from another working directory then reads the run's
    data and folder, not whatever a relative `datasets` names there."""
    return dataclasses.replace(cfg, output_dir=os.path.abspath(cfg.output_dir),
                               datasets=dataclasses.replace(cfg.datasets, root=os.path.abspath(cfg.datasets.root)))


def remove_partial_checkpoints(out_dir: Path) -> list[Path]:
    """Remove the temporary files of checkpoint saves a killed run left (atomic_write's
    `.last.pth.XXXX.tmp`: kill -9 during a save; the checkpoint itself is whole, the previous
    one). Only while the folder is locked for this run, so no save is under way."""
    partial = sorted(p for pattern in (".last.pth.*.tmp", ".model_final.pth.*.tmp", ".model_best.pth.*.tmp",
                                                      ".model_[0-9]*.pth.*.tmp")
                     for p in out_dir.glob(pattern) if p.is_file())
    if partial:
        size = sum(p.stat().st_size for p in partial)
        for path in partial:
            path.unlink(missing_ok=True)
        logger.warning("removed %d partial checkpoint file%s (%.0f MB) that a killed save left in %s: %s",
                       len(partial), "" if len(partial) == 1 else "s", size / 2**20, out_dir,
                       ", ".join(p.name for p in partial))
    return partial


def truncate_metrics(path: Path, iteration: int) -> None:
    """Keep the metrics lines up to `iteration` (the resumed checkpoint's): lines logged after
    it are logged again by the resumed run, and a line cut short by a kill is dropped."""
    if not path.is_file():
        return
    lines, skipped = read_metrics_lines(path)
    raw = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    cut_short = 1 if raw and (not lines or lines[-1][0] != raw[-1]) else 0  # the last line, a kill's
    if skipped > cut_short:  # a logs trial: lines edited or damaged elsewhere in the file went without a word
        logger.warning("%s: %d line%s that %s not a JSON object with an \"iteration\" dropped on this resume%s",
                       path, skipped - cut_short, "" if skipped - cut_short == 1 else "s",
                       "is" if skipped - cut_short == 1 else "are",
                       " (and the last line, cut short by the kill)" if cut_short else "")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line, record in lines if record["iteration"] <= iteration))
    tmp.replace(path)


def evaluation_recorded(path: Path, iteration: int) -> bool:
    """metrics.jsonl at `path` holds the evaluation of `iteration` (metrics.is_evaluation)."""
    if not path.is_file():
        return False
    return any(record["iteration"] == iteration and is_evaluation(record) for _, record in read_metrics_lines(path)[0])
