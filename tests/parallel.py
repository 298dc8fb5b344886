"""Run the test suite as N pytest processes at once, one per core (`make test`: 2).

    python tests/parallel.py --processes 2 -- tests -q -rs

Most tests run one intra-op thread (tests/conftest.py), so one pytest process leaves the second
core of a 2-core machine idle most of the time. Each process runs a part of the suite
(`--shard I/N`, tests/conftest.py: whole files, balanced by their measured seconds) with
OMP_NUM_THREADS=1 and C4DET_TEST_CORES=1 (the heavy tests' threads and the tools they start take
one core, not both: two processes' OpenMP threads spinning on each other's core are many times
slower). The first part prints as it runs, the others when it has ended; the exit status is
the first non-zero one (pytest's: 1 a test failed, 5 no test collected, ...), else 0; a part
that got no test while another passed counts as passed (a subset, e.g. one file, has fewer
files than parts).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

NO_TESTS = 5  # pytest's exit status when it collected no test


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2, help="pytest processes at once (default 2)")
    parser.add_argument("pytest_args", nargs="*", help="given to every pytest process (after --)")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"--processes must be at least 1, got {args.processes}")
    n = args.processes
    env = dict(os.environ, OMP_NUM_THREADS="1", C4DET_TEST_CORES="1")
    start = time.monotonic()
    # the first part prints as it goes (progress in a CI log), the others into files shown after it
    logs = [None] + [tempfile.TemporaryFile("w+", encoding="utf-8") for _ in range(n - 1)]
    print(f"======== part 1 of {n} (as it runs; the other part{'s' if n > 2 else ''} after it) ========", flush=True)
    children = [subprocess.Popen([sys.executable, "-m", "pytest", *args.pytest_args, f"--shard={i}/{n}"],
                                 stdout=log, stderr=subprocess.STDOUT if log else None, env=env)
                for i, log in enumerate(logs, 1)]
    try:
        codes = [child.wait() for child in children]
    except KeyboardInterrupt:  # Ctrl-C: stop every part, then show what each had printed
        for child in children:
            child.send_signal(signal.SIGINT)
        codes = [child.wait() for child in children]
    seconds = time.monotonic() - start
    print(f"======== part 1 of {n}: exit status {codes[0]} ========", flush=True)
    for i, log in enumerate(logs[1:], 2):
        log.seek(0)
        print(f"\n======== part {i} of {n} (exit status {codes[i - 1]}) ========", flush=True)
        sys.stdout.write(log.read())
    if any(code == 0 for code in codes):  # a part left without tests (a subset run, e.g. one file) is no failure
        codes = [0 if code == NO_TESTS else code for code in codes]
    failed = [(i, code) for i, code in enumerate(codes, 1) if code != 0]
    print(f"\n{n} parts in {seconds:.0f} s: "
          + ("all passed" if not failed else ", ".join(f"part {i} exit status {code}" for i, code in failed)),
          flush=True)
    return failed[0][1] if failed else 0


if __name__ == "__main__":
    sys.exit(main())
