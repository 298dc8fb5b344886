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
--limit gives one (on CUDA; with --device cpu only --limit's), for its commands together; steps
whose limits add up to more than a device call's 600 s are run, with a note that a call may stop
them (all four: two calls). On CUDA the demo step starts from an empty output/gpu_demo (a warm
machine keeps the last call's, which a rerun would otherwise resume).
Exit status 1 when a command failed.

A command runs in a process group of its own (so that its limit stops its children too): a
SIGTERM, SIGHUP or Ctrl-C to the session stops the running command's group before the session
ends, and a command a killed session left running (SIGKILL, as at the device tool's time
limit) is stopped by the next session on the machine before its first command: each command
carries a random token in its environment, recorded in a file beside LEFTOVER while it runs,
and only processes carrying a dead session's token are stopped (a live session holds a lock;
a second session beside it leaves the first's commands alone), so no forgotten step shares the
GPU with the next one's timings.

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
# LEFTOVER.<token>: the running command's record (its token is in its processes' environment, as
# TOKEN_VARIABLE), removed when it ends; LEFTOVER.lock: held by the live session
LEFTOVER = Path(tempfile.gettempdir()) / f"c4det-gpu-session-{os.getuid()}"
TOKEN_VARIABLE = "C4DET_GPU_SESSION_COMMAND"
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
    """Stop the commands killed sessions left running: every process whose environment holds a
    recorded command's token (TOKEN_VARIABLE; each command's record is a file LEFTOVER.<token>,
    removed when the command ends). Called only with the session lock held (_session_lock), so
    no live session's command is among them; a token is random, so no other program's process is."""
    killed = []
    for record in LEFTOVER.parent.glob(f"{LEFTOVER.name}.*"):
        token = record.name[len(LEFTOVER.name) + 1:]
        if token == "lock":  # the live session's lock (this one's): not a record
            continue
        record.unlink(missing_ok=True)
        killed += _kill_carrying(f"{TOKEN_VARIABLE}={token}".encode())
    if killed:
        print(f"==> stopped a command an earlier session left running (processes {', '.join(killed)})", flush=True)


def _kill_carrying(marker: bytes) -> list[str]:
    """SIGKILL to each process whose environment (/proc/PID/environ) holds `marker` -> their ids."""
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            carried = marker in (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile, or another user's
            continue
        if carried:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(entry.name)
            except (ProcessLookupError, PermissionError):
                pass
    return killed


def _session_lock():
    """An exclusive lock (flock) on LEFTOVER.lock for the session's life, released when its process
    ends however it ends; None when another live session holds it."""
    import fcntl

    handle = open(f"{LEFTOVER}.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


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
    import uuid

    start = time.perf_counter()
    print(f"\n==> {' '.join(argv)}  (output: {log}{f', limit {limit:.0f} s' if limit else ''})", flush=True)
    stopped = threading.Event()
    token = uuid.uuid4().hex  # in the command's environment, so its processes can be found if this session is killed
    record = Path(f"{LEFTOVER}.{token}")
    record.write_text(" ".join(argv))
    with open(log, "w") as file, subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT, text=True, errors="replace",
                                                  start_new_session=True,
                                                  env={**os.environ, TOKEN_VARIABLE: token}) as proc:
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
            record.unlink(missing_ok=True)
            raise
        finally:
            if timer:
                timer.cancel()
        proc.wait()
    record.unlink(missing_ok=True)
    return proc.returncode, time.perf_counter() - start, stopped.is_set()


def run_steps(steps: list[str], out: Path, limits: dict[str, float] | None = None, **options: str) -> int:
    """Every command of every step, whatever the ones before did, each stopped after its step's
    limit in seconds (`limits`, by step name) if it has one; -> 1 when one failed or was stopped;
    128 + the signal when a SIGTERM or SIGHUP stopped the session (and the running command's group)."""
    try:  # a path through a file was a NotADirectoryError traceback
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        from detection.utils.files import OutputFolderError

        raise OutputFolderError(f"--out {out}: cannot create the folder ({err.strerror or err})") from None
    lock = _session_lock()
    if lock is None:
        print("==> note: another gpu_session is running on this machine: its commands are left alone (and share "
              "the GPU with this one's)", flush=True)
    else:
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
        if lock is not None:
            lock.close()


def _run_steps(steps: list[str], out: Path, limits: dict[str, float] | None, **options: str) -> int:
    import shutil

    failed = False
    for step in steps:
        if step == "demo" and options.get("device", "cuda") == "cuda":  # a warm machine keeps the last call's
            shutil.rmtree(ROOT / DEMO_DIR, ignore_errors=True)              # run, which demo.py would resume
        limit = (limits or {}).get(step)
        deadline = time.monotonic() + limit if limit else None  # the step's limit: its commands together
        for name, argv in commands(step, out, **options):
            left = deadline - time.monotonic() if deadline is not None else None
            if left is not None and left <= 0:
                failed = True
                with open(out / "steps.txt", "a") as record:
                    record.write(f"{step}\t{name}\t-\t0.0\tnot run: its step's limit was reached\n")
                print(f"==> {step}: {name} not run: the step's limit of {limit:.0f} s was reached", flush=True)
                continue
            status, seconds, stopped = run_command(argv, out / name, left)
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
    limits = session_limits(args.steps, dict(args.limit), args.device)
    return run_tool(lambda: run_steps(args.steps, args.out, limits, levers_compile=args.levers_compile,
                                      device=args.device))


def session_limits(steps: list[str], given: dict[str, float], device: str = "cuda") -> dict[str, float]:
    """Each step's limit (--limit, else on CUDA DEFAULT_LIMITS: the device calls' plan; the CPU's
    dry runs take as long as they take); a note when they add up to more than one device call
    runs (the call may stop the session before its last step)."""
    limits = {**(DEFAULT_LIMITS if device == "cuda" else {}), **given}
    total = sum(limits.get(step, 0.0) for step in steps)
    if device == "cuda" and total > CALL_SECONDS - 10:
        print(f"note: the limits of {', '.join(steps)} add up to {total:.0f} s, more than one device call's "
              f"{CALL_SECONDS} s: the call may stop the session before its last step (run them in two calls, e.g. "
              "'suite bench', then 'levers demo')", flush=True)
    return limits


if __name__ == "__main__":
    raise SystemExit(main())
