"""Text for messages that name things a user must find (files, keys, tensors)."""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def first_few(items: Sequence[str], limit: int) -> str:
    """The first `limit` items joined by commas, then how many more: "a, b, ... (3 more)", so a
    message names enough to act on without listing thousands of files."""
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(str(item) for item in items[:limit]) + more


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """"1 image", "2 images", "0 images": a count with its noun ("box" takes plural="boxes")."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


class DetectionWarning(UserWarning):
    """A warning of this toolkit about what a user gave or asked for (an image's range or size,
    weights' normalisation, a precision this CPU cannot run fast): Python shows it at the user's
    line; the tools print it as one `warning:` line, as their other messages (detection.cli)."""


# stacklevel_outside(PROJECT, ...): outside the whole `detection` package (a warning raised below a
# tool's or the Predictor's call chain: the user's line is the first frame outside all of it)
PROJECT = "<the detection package>"
_PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def stacklevel_outside(*files: str) -> int:
    """warnings.warn's stacklevel for the first frame outside the folders of `files` (this
    project's module that warns, torch's nn.Module call machinery; PROJECT: all of `detection`):
    the user's line, where Python shows the warning. Called by the function that calls warnings.warn."""
    inside = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in files)
    inside = tuple(_PROJECT if f == PROJECT else i for f, i in zip(files, inside))
    frame, level = sys._getframe(1), 1  # the caller of this function is level 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame, level = frame.f_back, level + 1
    return level
