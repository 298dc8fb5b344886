"""Files written whole or not at all: a temporary file in the same folder, flushed and
fsynced, then renamed over the target. A kill, a full disk (ENOSPC) or any error part-way
leaves the previous file as it was and no temporary file behind.

Used for checkpoints (detection.engine.checkpoint), the evaluation results and metrics
files (detection.evaluation); a low module so that both layers can use it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import stat
import tempfile
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Optional, Union


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # a write that may succeed later: the tools exit 75 (try again)


def unwritten_errno(folder: Union[str, os.PathLike]) -> Optional[int]:
    """The error number for a write that failed without one (OpenCV's imwrite and VideoWriter say
    only False): ENOSPC when `folder`'s file system has under 1 MiB left (exit 75: try again once
    space is freed), else None."""
    try:
        return errno.ENOSPC if shutil.disk_usage(folder).free < 1 << 20 else None
    except OSError:
        return None


class WriteError(OSError, ValueError):
    """A file could not be written (a full disk, no permission): one line naming it and saying
    that the previous version is kept. An OSError (errno, strerror are the original's) and a
    ValueError, so that the tools report it as one `error:` line, as other bad-run errors."""

    def __init__(self, message: str, errno: int | None = None, strerror: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno, self.strerror = errno, strerror

    def __str__(self) -> str:
        return self.message

    @property
    def transient(self) -> bool:
        """A full disk or quota: the same command may succeed once space is freed (exit 75)."""
        return self.errno in DISK_FULL


class OutputFolderError(ValueError):
    """An output folder the run cannot use as asked: it holds another run's or another
    checkpoint's results, a live run locks it, or it is a file; the message says which option
    (--resume, --overwrite, --output-dir) settles it. `transient`: the same command may succeed
    later (a full disk under the folder: exit 75)."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class FolderInUseError(OutputFolderError):
    """A live run holds the output folder's lock: the same command may succeed once it ends (exit 75)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


@contextlib.contextmanager
def atomic_write(path: Union[str, os.PathLike], mode: str = "w", *, durable: bool = True,
                 **open_kwargs: Any) -> Iterator[IO]:
    """`with atomic_write(path) as f: f.write(...)`: `path` gets the new content only when the
    block and the flush/fsync/rename all succeed; otherwise the exception propagates, the old
    `path` (if any) is untouched and the temporary file is removed. A link at `path` is
    replaced, never written through. `durable=False` skips the fsyncs (thousands of drawings:
    whole or absent after a kill, though a power cut may lose the newest)."""
    if "w" not in mode:
        raise ValueError(f"atomic_write: mode must write a new file ('w' or 'wb'), got {mode!r}")
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_error(err, path, existed) from None
    try:
        # mkstemp creates 0600; the file gets the mode any other new file would (or the mode of
        # the one it replaces), so a checkpoint is as readable as the config beside it
        os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise _write_error(err, path, existed) from None
        raise
    if durable:
        _fsync_folder(path.parent)


def _mode_for(path: Path) -> int:
    """The replaced file's permission bits, else those of a new file: 0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (/proc), since
    os.umask(0) would briefly apply to files other threads create."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_error(err: OSError, path: Path, existed: bool) -> WriteError:
    kept = "the previous file is kept" if existed else "nothing was written"
    return WriteError(f"could not write {path} ({err.strerror or err}); {kept}", err.errno, err.strerror)


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


def dangling_link(path: Union[str, os.PathLike]) -> str:
    """" (a link to TARGET, which is not there)" for a link whose target is missing (storage not
    mounted, a moved run), "" otherwise: a "not found" message then says what was not found."""
    path = Path(path)
    try:
        if not path.is_symlink() or path.exists():
            return ""
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:  # links naming each other: the target is there, as a link back
            return f" (a link to {os.readlink(path)} in a loop of links that never reaches a file)"
        try:
            return f" (a link to {os.readlink(path)}, which is not there)"
        except OSError:
            return ""
    return ""


# The encoding of the text files a user hands over (COCO json, VOC split lists, results files):
# UTF-8, with or without the byte-order mark Windows editors write (Notepad, PowerShell 7's
# utf8BOM). A BOM is not text: a split list's first image id began with it ("\ufeff000005.xml
# not found", the character invisible) and json.loads refused the file.
USER_TEXT_ENCODING = "utf-8-sig"


def utf16_hint(path: Union[str, os.PathLike]) -> str:
    """' (it is UTF-16 text, ...)' when the file begins with a UTF-16 byte-order mark (Windows
    PowerShell 5's Out-File and `>` write UTF-16), else '': for a 'not UTF-8' error."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return ""
    return (" (it is UTF-16 text, as Windows PowerShell's Out-File and '>' write it: save it as UTF-8)"
            if head in (b"\xff\xfe", b"\xfe\xff") else "")


def strict_json(value: Any) -> Any:
    """`value` with every float that is not finite (NaN, inf) made None, in nested dicts, lists and
    tuples: strict JSON (jq and JavaScript's JSON.parse refuse NaN), as metrics.json writes it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def read_metrics_lines(path: Union[str, os.PathLike]) -> tuple[list[tuple[str, dict]], int]:
    """metrics.jsonl as training writes it (one JSON object per line, each with its "iteration"):
    -> ([(line, record), ...] in file order, the number of lines skipped). A line that is not
    such an object (cut short by a kill, or being written now) is skipped; the readers (the
    plots, a resume's truncation, the missing-evaluation check) all take the file this way."""
    kept, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("iteration"), (int, float)) \
                    and not isinstance(record["iteration"], bool):
                kept.append((line, record))
            else:
                skipped += 1
    return kept, skipped


def in_other_unicode_form(path: str, exists: Callable[[str], bool] = os.path.isfile) -> str | None:
    """`path` in the Unicode normal form (NFC or NFD) under which it `exists`, when it does not as
    given: a folder copied from macOS keeps é as e + accent (NFD) where annotation tools and split
    files write é (NFC)."""
    if path.isascii():
        return None
    folder, name = os.path.split(path)
    for form in ("NFC", "NFD"):  # the name alone first: a folder made on Linux keeps the form it was given
        for other in (os.path.join(folder, unicodedata.normalize(form, name)), unicodedata.normalize(form, path)):
            if other != path and exists(other):
                return other
    return None


SAMPLE_BYTES = 4096  # read at a file's start, middle and end when two files' sizes agree


def same_bytes(ours: set[str], theirs: set[str]) -> dict[str, str]:
    """Each file of `ours` whose bytes a file of `theirs` under another path has too (a copy under
    another name or in another folder, or a hard link) -> that file. Each step an index, so the
    cost grows with the files, not with pairs of them (a set of one size, uncompressed images, has
    every pair of a size): their sizes (one stat a file); where a size is in both sets, a digest
    of SAMPLE_BYTES at the start, middle and end; where that is in both, a digest of the whole
    file. Empty files and files that cannot be read are left out (their readers say so). A copy
    saved again (re-encoded) differs."""
    import hashlib

    def size(path: str) -> int | None:
        try:
            n = os.stat(path).st_size
        except OSError:
            return None
        return n or None  # an empty file: no image, and every two of them "the same"

    def digest(path: str, n: int, whole: bool) -> bytes | None:
        h = hashlib.blake2b(digest_size=16)
        try:
            with open(path, "rb") as f:
                if whole:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                else:
                    for start in sorted({0, max(0, n // 2 - SAMPLE_BYTES // 2), max(0, n - SAMPLE_BYTES)}):
                        f.seek(start)
                        h.update(f.read(SAMPLE_BYTES))
        except OSError:
            return None
        return h.digest()

    sizes = {path: size(path) for path in sorted(theirs | ours)}
    mine = [p for p in sorted(ours - theirs) if sizes[p] is not None]  # the files both have are no copies
    others = [p for p in sorted(theirs) if sizes[p] is not None]
    key: dict[str, Any] = dict(sizes)
    for step in ("size", "sample", "whole"):  # each an index: a file's key looked up, not compared with each
        if step != "size":
            key = {p: (sizes[p], digest(p, sizes[p], whole=step == "whole")) for p in (*mine, *others)}
        theirs_by_key: dict[Any, str] = {}
        for p in others:  # the first listed (sorted) stands for its bytes; an unreadable file for none
            if step == "size" or key[p][1] is not None:
                theirs_by_key.setdefault(key[p], p)
        mine = [p for p in mine if key[p] in theirs_by_key]
        kept = {key[p] for p in mine}
        others = [p for p in others if key[p] in kept]
    return {p: theirs_by_key[key[p]] for p in mine}


def utf8_name(path: Union[str, os.PathLike]) -> bool:
    """Whether a file name is UTF-8: one that is not (an old archive's Latin-1 "café") comes from
    the file system as a lone surrogate, which Python opens and other programs cannot take."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def opencv_name_problem(path: Union[str, os.PathLike]) -> str:
    """'' when OpenCV may be given `path` by name; else why not: a name that is not UTF-8 crashes
    the process inside cv2.imread, cv2.VideoCapture and cv2.VideoWriter (a segmentation fault,
    seen with OpenCV 5.1)."""
    return "" if utf8_name(path) else "its name is not UTF-8, which OpenCV cannot open by name: rename it in UTF-8"
