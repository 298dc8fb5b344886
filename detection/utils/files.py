"""Files written whole or not at all: a temporary file in the same folder, flushed and
fsynced, then renamed over the target. A kill, a full disk (ENOSPC) or any error part-way
leaves the previous file as it was and no temporary file behind.

Used for checkpoints (detection.engine.checkpoint), the evaluation results and metrics
files (detection.evaluation); a low module so that both layers can use it.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Union


@contextlib.contextmanager
def atomic_write(path: Union[str, os.PathLike], mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """`with atomic_write(path) as f: f.write(...)`: `path` gets the new content only when the
    block and the flush/fsync/rename all succeed; otherwise the exception propagates, the old
    `path` (if any) is untouched and the temporary file is removed."""
    if "w" not in mode:
        raise ValueError(f"atomic_write: mode must write a new file ('w' or 'wb'), got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (best effort: some file systems refuse a folder fsync)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
