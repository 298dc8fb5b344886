"""A training run's output folder: refused when it holds another run (unless resumed or
replaced), created only once the run's inputs are checked, and its metrics.jsonl kept free of
repeated iterations on resume."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

from detection.config import Config, save_config

logger = logging.getLogger(__name__)

# The files that make a folder "hold a run", and what --overwrite removes.
RUN_FILES = ("last.pth", "model_final.pth", "metrics.jsonl")
OVERWRITTEN = (*RUN_FILES, "config.yaml", "inference")


def check_output_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> list[str]:
    """The run files in out_dir; a ValueError when they are there and neither flag says what
    to do with them (a new run would replace the checkpoints and append to the old metrics)."""
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if not found or overwrite or (resume and "last.pth" in found):
        return found
    if resume:
        raise ValueError(f"{out_dir} holds a run ({', '.join(found)}) but no last.pth to resume from: "
                         "--overwrite replaces it, or choose another --output-dir")
    raise ValueError(f"{out_dir} already holds a run ({', '.join(found)}): --resume continues it, "
                     "--overwrite replaces it, or choose another --output-dir")


def prepare_output_dir(cfg: Config, out_dir: Path, *, remove: list[str], resumed_at: Optional[int]) -> None:
    """Create out_dir and write config.yaml; with --overwrite first remove the old run's
    files; on a resume drop the metrics lines the checkpoint does not cover."""
    if remove:
        removed = [name for name in OVERWRITTEN if (out_dir / name).exists()]
        for name in removed:
            path = out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        logger.warning("--overwrite: removed the previous run's %s from %s", ", ".join(removed), out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    if resumed_at is not None:
        truncate_metrics(out_dir / "metrics.jsonl", resumed_at)


def truncate_metrics(path: Path, iteration: int) -> None:
    """Keep the metrics lines up to `iteration` (the resumed checkpoint's): lines logged after
    it are logged again by the resumed run, and a line cut short by a kill is dropped."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["iteration"] <= iteration:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)
