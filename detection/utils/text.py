"""Text for messages that name things a user must find (files, keys, tensors)."""
from __future__ import annotations

from collections.abc import Sequence


def first_few(items: Sequence[str], limit: int) -> str:
    """The first `limit` items joined by commas, then how many more: "a, b, ... (3 more)", so a
    message names enough to act on without listing thousands of files."""
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(str(item) for item in items[:limit]) + more


class DetectionWarning(UserWarning):
    """A warning of this toolkit about what a user gave or asked for (an image's range or size,
    weights' normalisation, a precision this CPU cannot run fast): Python shows it at the user's
    line; the tools print it as one `warning:` line, as their other messages (detection.cli)."""
