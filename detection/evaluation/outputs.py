"""Where evaluation writes, and whose results a results folder holds.

    <results folder>/source.json             which checkpoint (or results file) the results come from,
                                             and every test set evaluated into the folder from it
    <results folder>/report.html             the page of every test set in the folder (evaluation/report.py)
    <results folder>/<test set folder>/       one per test set, also when there is only one:
        metrics.json, pr_curves.png, coco_results.json (COCO-type) | comp4_det_test_*.txt (VOC-type),
        coco_categories.json                  (COCO-type) the names of coco_results.json's category ids
        report_section.json                   the set's part of report.html
        skipped_images.json                   the images left out as unreadable (dataloader.skip_bad_images),
                                              so that re-scoring the results leaves them out too
        results/VOC2012/Main/comp4_det_test_*.txt   instead, for a test set without annotations
                                                    (voc_2012_test): the evaluation server's layout

The layout does not depend on the number of test sets, so a script reading
`<folder>/shapes_val/metrics.json` keeps working when a second test set is added. Test-set
folder names are file-system safe (`results_subfolder`). source.json exists so that a run for
another checkpoint cannot overwrite a folder's results unnoticed (`check_results_folder`).
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

from detection.data import DataError
from detection.evaluation.coco import CATEGORIES_FILE, RESULTS_FILE
from detection.evaluation.voc_results import COMP4_TEMPLATE, SUBMISSION_FOLDER
from detection.utils.files import DISK_FULL, OutputFolderError, WriteError, atomic_write

SOURCE_FILE = "source.json"
SECTION_FILE = "report_section.json"  # a test set's part of report.html (evaluation/report.py)
SKIPPED_FILE = "skipped_images.json"  # the images a run's metrics leave out (unreadable, skipped)
# Everything evaluation writes into a test set's folder: what --overwrite removes, and how a
# folder written before source.json existed is recognised.
RESULT_PATTERNS = ("metrics.json", "pr_curves.png", SECTION_FILE, SKIPPED_FILE, RESULTS_FILE, CATEGORIES_FILE,
                   COMP4_TEMPLATE.format("*"),
                   str(Path(SUBMISSION_FOLDER.format("*")) / COMP4_TEMPLATE.format("*")))
_UNSAFE = re.compile(r"[^\w.-]+")  # letters of any script stay: 日本 and 中国 are two folders
PathLike = Union[str, Path]


def results_subfolder(name: str) -> str:
    """The data set name as a folder name: letters and digits (of any script), `_`, `.` and `-`
    kept, every other run of characters one "_" ("voc:MyVOC_val" -> "voc_MyVOC_val"); no
    leading dot (no "..")."""
    return _UNSAFE.sub("_", name).lstrip(".") or "test_set"


def results_subfolders(names: Sequence[str]) -> list[str]:
    """`results_subfolder` of each name; OutputFolderError when two test sets would share a folder."""
    folders = [results_subfolder(n) for n in names]
    for i, folder in enumerate(folders):
        if folder in folders[:i]:
            other = names[folders.index(folder)]
            raise OutputFolderError(f"datasets.test: the test sets {other!r} and {names[i]!r} would share the "
                                    f"results folder {folder!r}; give one of them another name (the entry's "
                                    "name: field)")
    return folders


def results_for_test_set(path: PathLike, folder: str, kind: str) -> str:
    """`--results PATH` for one test set: PATH itself (a coco_results.json or a folder of
    comp4 files), or, when PATH is a results folder as evaluation writes it, the test set's
    results in it (PATH/<folder>/coco_results.json or PATH/<folder>)."""
    resolved = Path(path)
    if resolved.is_dir() and (resolved / SOURCE_FILE).is_file() and not _holds_results(resolved / folder):
        held = sorted(p.name for p in resolved.iterdir() if _holds_results(p))  # a results folder, not this set's
        try:
            recorded = read_source(resolved)
        except OutputFolderError:
            recorded = None
        if recorded is not None and recorded.kind == "results" and not held:  # eval.py --results copies none
            raise DataError(f"{path}: the folder of an evaluation of saved results, which keeps no copy of them: give "
                            f"the results it scored, {recorded.path}")
        raise DataError(f"{path}: holds no results for the test set of folder {folder!r} (it holds: "
                        f"{', '.join(held) or 'none'}); give the datasets.test those results were made on")
    if resolved.is_dir() and (resolved / folder).is_dir():
        resolved = resolved / folder
    if kind == "coco" and resolved.is_dir() and (resolved / RESULTS_FILE).is_file():
        resolved = resolved / RESULTS_FILE
    elif kind == "coco" and resolved.is_dir():  # read as a file: "cannot read the results file (Is a directory)"
        comp4 = any(resolved.rglob(COMP4_TEMPLATE.format("*")))
        raise DataError(f"{path}: a folder without {RESULTS_FILE}" + (" (it holds VOC comp4 files)" if comp4 else "")
                        + f", and the test set of folder {folder!r} is COCO-type: give its {RESULTS_FILE}, or the "
                        "data set the results were made on (datasets.test, or visualize.py's --dataset)")
    return str(resolved)


def _holds_results(folder: Path) -> bool:
    """Whether a test set's folder holds the results evaluation writes (COCO json or comp4 files,
    also a submission's under results/VOC2012/Main)."""
    return folder.is_dir() and ((folder / RESULTS_FILE).is_file() or any(folder.rglob(COMP4_TEMPLATE.format("*"))))


def write_skipped_images(folder: PathLike, skipped: Sequence[dict]) -> None:
    """folder/skipped_images.json naming the records (image_id, file_name) a test set's metrics
    leave out; no file when none is (an earlier run's is removed)."""
    path = Path(folder) / SKIPPED_FILE
    if not skipped:
        path.unlink(missing_ok=True)
        return
    entries = [{"image_id": r["image_id"], "file_name": str(r.get("file_name", ""))} for r in skipped]
    with atomic_write(path) as f:
        f.write(json.dumps({"reason": "unreadable, skipped (dataloader.skip_bad_images)", "images": entries},
                           indent=1) + "\n")


def read_skipped_images(results: PathLike) -> set:
    """The image ids that the run which wrote `results` (a results file, or a folder of them)
    left out as unreadable: its skipped_images.json beside them; empty when there is none."""
    folder = Path(results) if Path(results).is_dir() else Path(results).parent
    path = folder / SKIPPED_FILE
    if not path.is_file():
        return set()
    try:
        return {entry["image_id"] for entry in json.loads(path.read_text(encoding="utf-8"))["images"]}
    except (ValueError, KeyError, TypeError) as err:
        raise OutputFolderError(f"{path}: not a list of skipped images as evaluation writes it ({err}); "
                                "remove it to score every image") from None


@dataclass(frozen=True)
class ResultsSource:
    """What a results folder's results were computed from: one file version, by path, size, mtime."""

    kind: str  # "weights" (a checkpoint) | "results" (a saved results file or folder)
    path: str  # absolute
    size: int | None = None
    mtime: float | None = None

    @classmethod
    def of(cls, kind: str, path: PathLike) -> ResultsSource:
        resolved = Path(path).expanduser().resolve()
        if not resolved.is_file():  # a folder of comp4 files, or missing: the path alone
            return cls(kind, str(resolved))
        stat = resolved.stat()
        return cls(kind, str(resolved), stat.st_size, stat.st_mtime)

    def describe(self) -> str:
        what = "the checkpoint" if self.kind == "weights" else "the results"
        if self.size is None or self.mtime is None:
            return f"{what} {self.path}"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.mtime))
        return f"{what} {self.path} ({self.size} bytes, modified {when})"


def read_source(folder: PathLike) -> ResultsSource | None:
    """The source recorded in `folder`, None when there is none; ValueError when unreadable."""
    path = Path(folder) / SOURCE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return ResultsSource(str(data["kind"]), str(data["path"]), data.get("size"), data.get("mtime"))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise OutputFolderError(f"{path}: unreadable ({type(err).__name__}: {err}); pass --overwrite to replace "
                                "the folder's results or --output-dir DIR to write elsewhere") from err


def recorded_test_sets(folder: PathLike) -> list[str]:
    """The test sets source.json lists (their folder names), in the order they were evaluated
    into `folder`; [] when there is no readable source.json."""
    try:
        names = json.loads((Path(folder) / SOURCE_FILE).read_text()).get("test_sets", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [str(n) for n in names if isinstance(n, str)]


def check_results_folder(folder: PathLike, source: ResultsSource, *, overwrite: bool = False) -> None:
    """ValueError (one line naming both sources and the ways out) when `folder` holds results
    of another source: another checkpoint, another version of the same file, or results
    written before source.json existed. Re-scoring the folder's own results is allowed."""
    if overwrite or _inside(source.path, folder) or not _result_files(Path(folder)):
        return  # (no results: nothing to lose, e.g. an evaluation stopped before it wrote any)
    recorded = read_source(folder)
    if recorded == source:
        return
    if recorded is None:
        holds = "results with no source.json saying which checkpoint made them"
    elif recorded.path == source.path and recorded.kind == source.kind:
        holds = f"the results of an earlier version of {recorded.describe()}"
    else:
        holds = f"the results of {recorded.describe()}"
    raise OutputFolderError(f"{folder} holds {holds}, not of {source.describe()}: pass --output-dir DIR to "
                            "write elsewhere, or --overwrite to replace them")


def earlier_results(folder: PathLike, source: ResultsSource, test_sets: Sequence[str]) -> list[str]:
    """One line per test set whose folder in `folder` holds results an earlier evaluation wrote,
    which this run replaces (the same checkpoint evaluated again, perhaps with other test
    settings): the set's folder and when its results were written. No line when the run
    re-scores the folder's own results."""
    if _inside(source.path, folder):
        return []
    lines = []
    for name in test_sets:
        files = _result_files(Path(folder) / name)
        if files:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(max(p.stat().st_mtime for p in files)))
            lines.append(f"replacing the results of an earlier evaluation in {Path(folder) / name} (written {when}; "
                         "--output-dir DIR keeps them)")
    return lines


def claim_results_folder(folder: PathLike, source: ResultsSource, test_sets: Sequence[str], *,
                         overwrite: bool = False) -> None:
    """Create `folder` and its `test_sets`' folders, and record `source` in its source.json.
    With overwrite, first remove the results evaluation wrote there before (so no file of the
    old checkpoint stays next to the new ones); the test sets evaluated now lose theirs in any
    case (an evaluation stopped half-way must not leave the old metrics or report section
    beside the new results). Re-scoring the folder's own results keeps them and source.json."""
    folder = Path(folder)
    check_results_folder(folder, source, overwrite=overwrite)
    if overwrite and not _inside(source.path, folder):
        emptied = set()
        for path in _result_files(folder):
            path.unlink()
            emptied |= {p for p in path.parents if p != folder and p.is_relative_to(folder)}
        emptied |= {sub for sub in (folder.iterdir() if folder.is_dir() else ()) if sub.is_dir()}
        # folders left empty, deepest first (a test set's results/VOC2012/Main, then the set's own)
        for sub in sorted(emptied, key=lambda p: -len(p.parts)):
            if sub.is_dir() and not any(sub.iterdir()):
                sub.rmdir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # read-only, a file in the way, a name too long: one line, not a traceback
        raise OutputFolderError(f"{folder}: cannot create the results folder ({err.strerror or err}); "
                                "--output-dir DIR gives another") from None
    for name in test_sets:
        if not _inside(source.path, folder):  # replaced as a whole: a run stopped half-way leaves no old file
            for path in _result_files(folder / name):
                path.unlink()
        try:
            (folder / name).mkdir(exist_ok=True)
        except OSError as err:
            raise OutputFolderError(f"{folder / name}: cannot create the test set's results folder "
                                    f"({err.strerror or err}); --output-dir DIR gives another") from None
    if _inside(source.path, folder) and (folder / SOURCE_FILE).is_file():
        return
    record = {**asdict(source), "test_sets": _all_test_sets(folder, source, test_sets)}
    with atomic_write(folder / SOURCE_FILE) as f:  # never a half-written source.json, even on a full disk
        f.write(json.dumps(record, indent=1) + "\n")


def claim_for_every_process(folder: PathLike, source: ResultsSource, test_sets: Sequence[str], *,
                            overwrite: bool = False, echo=print) -> None:
    """eval.py's claim of its results folder: the first process (the only one under torchrun
    that writes) says which earlier results it replaces (`echo`), claims the folder
    (claim_results_folder) and removes its report.html (written again at the end: never a stale
    page); its refusal is raised on every process, so none runs on alone."""
    from detection.utils import comm

    problem = None
    if comm.is_main_process():
        for line in earlier_results(folder, source, test_sets):
            echo(line)
        try:
            claim_results_folder(folder, source, test_sets, overwrite=overwrite)
            (Path(folder) / "report.html").unlink(missing_ok=True)
        except (OutputFolderError, WriteError) as err:  # WriteError: source.json, named (a full disk)
            problem = (str(err), getattr(err, "transient", False))  # (its message, whether a wait may settle it)
        except OSError as err:
            problem = (f"{Path(folder) / 'report.html'}: cannot be replaced ({err.strerror or err}); --output-dir DIR "
                       "writes the results elsewhere", err.errno in DISK_FULL)
    problem = next((p for p in comm.all_gather_object(problem) if p), None)
    if problem:
        raise OutputFolderError(problem[0], transient=problem[1])


def _all_test_sets(folder: Path, source: ResultsSource, test_sets: Sequence[str]) -> list[str]:
    """The test sets whose results the folder holds once this run has written its own: those an
    earlier evaluation of the same source recorded (while their folder is still there), then
    this run's. A second evaluation into the folder adds its set; it does not hide the first."""
    try:
        earlier = recorded_test_sets(folder) if read_source(folder) == source else []
    except ValueError:  # an unreadable source.json: nothing earlier to keep
        earlier = []
    kept = [n for n in earlier if n not in test_sets and (folder / results_subfolder(n)).is_dir()]
    return kept + list(test_sets)


def _result_files(folder: Path) -> list[Path]:
    """Files evaluation writes, in `folder` and in its immediate subfolders."""
    if not folder.is_dir():
        return []
    return sorted(p for pattern in RESULT_PATTERNS for where in (pattern, f"*/{pattern}")
                  for p in folder.glob(where) if p.is_file())


def _inside(path: PathLike, folder: PathLike) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())
