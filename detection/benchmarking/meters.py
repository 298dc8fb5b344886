"""Clocks and counters the benchmark's sections share: wall and CPU time of a call, time and
FLOPs per named part, the peak GPU memory of a block, and the interleaved order of timed runs.
On CUDA every reading is synchronised, so a time covers the kernels launched, not only
their launch."""
from __future__ import annotations

import os
import statistics
import sys
import time
import traceback
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TimeMeter:
    """meter(stage) adds the stage's wall time (a stage may be entered several times)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        sync()
        start = time.perf_counter()
        yield
        sync()
        self.values[name] += time.perf_counter() - start


class FlopMeter:
    """meter(stage) adds the FLOPs torch.utils.flop_counter sees inside the stage."""

    def __init__(self) -> None:
        self.values: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        with FlopCounterMode(display=False) as counter:
            yield
        self.values[name] += counter.get_total_flops()


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of fn()."""
    return timed_cpu(fn)[0]


def timed_cpu(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall, CPU) seconds of fn(); CPU time (all threads) is less sensitive to other load."""
    sync()
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - start, time.process_time() - cpu


def median_time(fn: Callable[[], Any], runs: int = 5) -> float:
    """Median wall seconds of fn() over `runs`, after one untimed call."""
    fn()
    return statistics.median(timed(fn) for _ in range(runs))


def interleaved(names: Iterable[str], warmup: int, runs: int) -> Iterator[tuple[int, str, bool]]:
    """(run, name, kept) for `warmup + runs` rounds over the models: back to back, the order
    reversed every other round, since the machine is shared and its load drifts; `kept` is
    False in the warm-up rounds."""
    order = list(names)
    for run in range(warmup + runs):
        for name in (order if run % 2 == 0 else order[::-1]):
            yield run, name, run >= warmup


def log_run(section: str, run: int, name: str, seconds: float) -> None:
    """One progress line on stderr, with the load average the run saw."""
    print(f"  {section} run {run}: {name} {seconds:.3f} s (load {os.getloadavg()[0]:.1f})", file=sys.stderr)


@contextmanager
def failure_noted(entry: dict, name: str) -> Iterator[None]:
    """For the levers' tables: an exception in the block (a lever that fails on this GPU) is
    written to stderr with its traceback and kept as entry["error"] ("Type: first line"), and the
    table goes on without that model instead of losing every row to one failure."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - any failure of one model, reported, not hidden
        traceback.print_exc(file=sys.stderr)
        first = (str(error).strip().splitlines() or [""])[0][:300]
        entry["error"] = f"{type(error).__name__}: {first}"
        print(f"  {name} FAILED: {entry['error']}; measuring the others", file=sys.stderr)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@contextmanager
def gpu_peak(entry: dict, cuda: bool) -> Iterator[None]:
    """On CUDA: entry["step_peak_mb"] = the largest GPU memory, above what was allocated before,
    that the block held (over all the blocks measured into this entry). Nothing on the CPU."""
    if not cuda:
        yield
        return
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    yield
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    entry["step_peak_mb"] = max(entry.get("step_peak_mb", 0.0), peak)
