#!/usr/bin/env python
"""The lent GPU machine's session (`make gpu-session`; without make:
`python3 tools/gpu_session.py --out DIR`), after `source .gpu/setup.sh` (README, "Installing
on a GPU machine"). Steps, in this order unless named:

    suite    the GPU suite (tests/test_cuda.py, marker cuda), with its slowest tests; each failure's
             report in DIR/test-gpu-failures.txt as it happens
    bench    tools/benchmark.py --device cuda --compare-torchvision at Detectron2's test settings
             (800x1088, 6000 -> 1000 proposals, random sane weights) in torchvision's ResNet
             layout (stride in the 3x3 conv, RGB), so torchvision's C4 is built from our weights
    levers   tools/benchmark.py --device cuda --levers at the same settings (docs/accel.md), then
             the op profiles of the fast path, the levers and a training step (--kernels 25)
    demo     tools/demo.py on the GPU, then shapes_val in float32 and with test.amp

Each command's output goes to the terminal and to a file in DIR as it runs, and each command
runs even when one before it failed (a device slice is 15 minutes: what finished is kept).
DIR/steps.txt gets one line per command: step, file, exit status, seconds (for planning the
next slice), and "stopped at its limit" for a command stopped by --limit STEP=SECONDS (its
process group is terminated, the output so far kept, and the next command runs: a hang in one
step no longer costs the slice's other steps). Every step has a limit, DEFAULT_LIMITS unless
--limit gives one; steps whose limits add up to more than a device call's 600 s are run, with a
note that a call may stop them (all four: two calls). The demo step starts from an empty
output/gpu_demo (a warm machine keeps the last call's, which a rerun would otherwise resume).
Exit status 1 when a command failed.

A command runs in a process group of its own (so that its limit stops its children too): a
SIGTERM, SIGHUP or Ctrl-C to the session stops the running command's group before the session
ends, and a command a killed session left running (SIGKILL, as at the device tool's time
limit) is stopped by the next session on the machine before its first command (it is recorded
in LEFTOVER, a file in the temporary folder), so no forgotten step shares the GPU with the
next one's timings.

    python3 tools/gpu_session.py --out $OUT suite bench      # one device call (410 s at most)
    python3 tools/gpu_session.py --out $OUT levers demo      # a second one (390 s at most)
    python3 tools/gpu_session.py --out $OUT --limit suite=240 --limit bench=170 suite bench
    python3 tools/gpu_session.py --out /tmp/x demo --device cpu   # the demo step on the CPU
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from detection.accel.levers import COMPILE_MODES
from detection.cli import parse_command_line, run_tool

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("suite", "bench", "levers", "demo")
LEFTOVER = Path(tempfile.gettempdir()) / "c4det-gpu-session.pgid"  # the running command's process group
# each step's limit in seconds unless --limit gives one (the first slices' plan: suite and bench in
# one device call, levers and demo in a second); a call runs 600 s at most (CALL_SECONDS)
DEFAULT_LIMITS = {"suite": 270.0, "bench": 140.0, "levers": 240.0, "demo": 150.0}
CALL_SECONDS = 600
BENCH = ["tools/benchmark.py", "--config", "configs/detectron2/faster_rcnn_R_50_C4_1x.yaml",
         "model.backbone.stride_in_1x1=false", "model.input_format=RGB", "--device", "cuda",
         "--image-size", "800", "1088", "--runs", "5"]


DEMO_DIR = "output/gpu_demo"


def commands(step: str, out: Path, *, levers_compile: str = "off", device: str = "cuda",
             demo_dir: str = DEMO_DIR) -> list[tuple[str, list[str]]]:
    """(output file name, argv without the interpreter) for each command of `step`."""
    if step == "suite":
        # -v names each test as it starts (the one a stop at the limit cut short); --failures-to
        # (tests/conftest.py) writes each failure's report as it happens, not at the end
        return [("test-gpu.txt", ["-m", "pytest", "tests", "-v", "-m", "cuda", "--durations=15",
                                  "--failures-to", str(out / "test-gpu-failures.txt")])]
    if step == "bench":
        return [("benchmark.txt", [*BENCH, "--compare-torchvision", "--no-data", "--json", str(out / "benchmark.json")])]
    if step == "levers":
        return [("levers.txt", [*BENCH, "--levers", "--levers-compile", levers_compile, "--train-images", "2",
                                "--kernels", "25", "--json", str(out / "levers.json")])]
    if step == "demo":
        evals = [(f"eval-shapes_val-amp-{amp}.txt",
                  ["tools/eval.py", "--weights", f"{demo_dir}/model_final.pth", "--output-dir",
                   f"{demo_dir}/shapes_val_amp_{amp}", "--overwrite", f"device={device}",
                   "datasets.test=[shapes_val]", f"test.amp={amp}"]) for amp in ("false", "true")]
        return [("demo.txt", ["tools/demo.py", "--output-dir", demo_dir, f"device={device}"]), *evals]
    raise ValueError(f"step {step!r} is not one of {', '.join(STEPS)}")


def _stop(proc: subprocess.Popen, stopped: threading.Event) -> None:
    """The command's whole process group (pytest's and torchrun's children too): SIGTERM, then
    SIGKILL 10 s later if it is still there."""
    stopped.set()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def stop_leftover() -> None:
    """Stop the command an earlier session left running (killed itself, it could not stop it):
    its process group, recorded in LEFTOVER with its leader's start time. A leader of that id
    started at another time is another program's (the id was free again and reused): left alone.
    While any process of the old group lives, Linux gives its id to no new process."""
    try:
        group, started = LEFTOVER.read_text().split()
        group = int(group)
    except (OSError, ValueError):
        return
    LEFTOVER.unlink(missing_ok=True)
    leader = _start_time(group)
    if started == "0" or (leader is not None and leader != started):  # cannot tell, or another's
        return
    try:
        os.killpg(group, signal.SIGKILL)
        print(f"==> stopped a command an earlier session left running (process group {group})", flush=True)
    except (ProcessLookupError, PermissionError):
        pass


def _start_time(pid: int) -> str | None:
    """The process's start time (/proc/PID/stat's 22nd field, clock ticks since boot); None when
    there is no such process (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the name: state is the 3rd, starttime the 22nd


class _StopSession(BaseException):
    """A signal to the session: the running command's group is stopped, then the session ends."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop_session(signum: int, frame) -> None:
    raise _StopSession(signum)


def run_command(argv: list[str], log: Path, limit: float | None = None) -> tuple[int, float, bool]:
    """argv under this interpreter from the repository root, its output (stdout and stderr)
    copied line by line to the terminal and to `log`, stopped after `limit` seconds if given;
    -> (exit status, seconds, whether the limit stopped it)."""
    start = time.perf_counter()
    print(f"\n==> {' '.join(argv)}  (output: {log}{f', limit {limit:.0f} s' if limit else ''})", flush=True)
    stopped = threading.Event()
    with open(log, "w") as file, subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT, text=True, errors="replace",
                                                  start_new_session=True) as proc:
        # its process group (a session leader's id) for a next session, should this one be killed
        LEFTOVER.write_text(f"{proc.pid} {_start_time(proc.pid) or 0}")
        timer = threading.Timer(limit, _stop, (proc, stopped)) if limit else None
        if timer:
            timer.daemon = True
            timer.start()
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                file.write(line)
                file.flush()
        except BaseException:  # a signal to the session (or Ctrl-C): the command's group goes with it
            _stop(proc, threading.Event())
            LEFTOVER.unlink(missing_ok=True)
            raise
        finally:
            if timer:
                timer.cancel()
        proc.wait()
    LEFTOVER.unlink(missing_ok=True)
    return proc.returncode, time.perf_counter() - start, stopped.is_set()


def run_steps(steps: list[str], out: Path, limits: dict[str, float] | None = None, **options: str) -> int:
    """Every command of every step, whatever the ones before did, each stopped after its step's
    limit in seconds (`limits`, by step name) if it has one; -> 1 when one failed or was stopped;
    128 + the signal when a SIGTERM or SIGHUP stopped the session (and the running command's group)."""
    out.mkdir(parents=True, exist_ok=True)
    stop_leftover()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, _stop_session) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _run_steps(steps, out, limits, **options)
    except _StopSession as stop:
        print(f"==> stopped by {stop}: the running command's process group with it", flush=True)
        return 128 + stop.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_steps(steps: list[str], out: Path, limits: dict[str, float] | None, **options: str) -> int:
    import shutil

    failed = False
    for step in steps:
        if step == "demo":  # a fresh run: a warm machine keeps the last call's, which demo.py would resume
            shutil.rmtree(ROOT / DEMO_DIR, ignore_errors=True)
        for name, argv in commands(step, out, **options):
            status, seconds, stopped = run_command(argv, out / name, (limits or {}).get(step))
            failed |= status != 0 or stopped
            note = "\tstopped at its limit" if stopped else ""
            with open(out / "steps.txt", "a") as record:
                record.write(f"{step}\t{name}\t{status}\t{seconds:.1f}{note}\n")
            print(f"==> {step}: {name} exit status {status} in {seconds:.1f} s"
                  f"{' (stopped at its limit)' if stopped else ''}", flush=True)
    return 1 if failed else 0


def _limit(text: str) -> tuple[str, float]:
    """STEP=SECONDS -> (step, seconds)."""
    step, _, seconds = text.partition("=")
    try:
        value = float(seconds)
    except ValueError:
        value = -1.0
    if step not in STEPS or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not STEP=SECONDS with STEP one of {', '.join(STEPS)} and "
                                         "SECONDS > 0")
    return step, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("steps", nargs="*", metavar="STEP",
                        help=f"which steps ({', '.join(STEPS)}; default: all, in that order)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the outputs ($OUT on the device)")
    parser.add_argument("--levers-compile", default="off", choices=("off", *COMPILE_MODES),
                        help="the levers' torch.compile rows: a mode or off (default: off; compiling R50 "
                             "several times may not fit a 15-minute slice)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="the demo step's device (cpu: its dry run here)")
    parser.add_argument("--limit", type=_limit, action="append", default=[], metavar="STEP=SECONDS",
                        help="stop each command of STEP after SECONDS (its output kept, the next command runs); "
                             "repeatable")
    args = parse_command_line(parser, argv)
    args.out = args.out.resolve()  # the commands run from the repository root
    unknown = [step for step in args.steps if step not in STEPS]
    if unknown:
        parser.error(f"no step {', '.join(unknown)}: the steps are {', '.join(STEPS)}")
    args.steps = args.steps or list(STEPS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limits = session_limits(args.steps, dict(args.limit))
    return run_tool(lambda: run_steps(args.steps, args.out, limits, levers_compile=args.levers_compile,
                                      device=args.device))


def session_limits(steps: list[str], given: dict[str, float]) -> dict[str, float]:
    """Each step's limit (--limit, else DEFAULT_LIMITS); a note when they add up to more than
    one device call runs (the call may stop the session before its last step)."""
    limits = {**DEFAULT_LIMITS, **given}
    total = sum(limits[step] for step in steps)
    if total > CALL_SECONDS - 10:
        print(f"note: the limits of {', '.join(steps)} add up to {total:.0f} s, more than one device call's "
              f"{CALL_SECONDS} s: the call may stop the session before its last step (run them in two calls, e.g. "
              "'suite bench', then 'levers demo')", flush=True)
    return limits


if __name__ == "__main__":
    raise SystemExit(main())
