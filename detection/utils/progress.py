"""Progress as plain lines where no bar is drawn (a batch job's log, a notebook): tqdm draws its
bar on a terminal only, and an evaluation or a folder of images ran for hours without a word."""
from __future__ import annotations

import datetime
import logging
import time
from typing import Callable, Optional

PERIOD_S = 60.0  # at most a line a minute: a run shorter than that prints none


class ProgressLines:
    """`step(n)` after each unit of work: a line `<what>: 150/3000 images, 0.600 s / image, eta
    0:28:30` through `say` at most every `period_s` seconds (not when `enabled` is False: the bar
    is drawn, or another process reports)."""

    def __init__(self, what: str, total: Optional[int], *, unit: str = "images", enabled: bool = True,
                 say: Callable[[str], None] = logging.getLogger("detection.progress").info,
                 period_s: Optional[float] = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.what, self.total, self.unit, self.enabled, self.say = what, total, unit, enabled, say
        self.period_s, self.clock = PERIOD_S if period_s is None else period_s, clock
        self.done = 0
        self.start = self.last = clock()

    def step(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if not self.enabled or now - self.last < self.period_s:
            return
        self.last = now
        per = (now - self.start) / max(self.done, 1)
        of = f"/{self.total}" if self.total else ""
        eta = (f", eta {datetime.timedelta(seconds=round(per * (self.total - self.done)))}"
               if self.total and self.total > self.done else "")
        self.say(f"{self.what}: {self.done}{of} {self.unit}, {per:.3f} s / {self.unit[:-1]}{eta}")
