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
step no longer costs the slice's other steps). Exit status 1 when a command failed.

    python3 tools/gpu_session.py --out $OUT                  # all four
    python3 tools/gpu_session.py --out $OUT bench levers     # two of them
    python3 tools/gpu_session.py --out $OUT --limit suite=240 --limit bench=170 suite bench
    python3 tools/gpu_session.py --out /tmp/x demo --device cpu   # the demo step on the CPU
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from detection.accel.levers import COMPILE_MODES
from detection.cli import parse_command_line, run_tool

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("suite", "bench", "levers", "demo")
BENCH = ["tools/benchmark.py", "--config", "configs/detectron2/faster_rcnn_R_50_C4_1x.yaml",
         "model.backbone.stride_in_1x1=false", "model.input_format=RGB", "--device", "cuda",
         "--image-size", "800", "1088", "--runs", "5"]


def commands(step: str, out: Path, *, levers_compile: str = "off", device: str = "cuda",
             demo_dir: str = "output/gpu_demo") -> list[tuple[str, list[str]]]:
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
        timer = threading.Timer(limit, _stop, (proc, stopped)) if limit else None
        if timer:
            timer.daemon = True
            timer.start()
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                file.write(line)
                file.flush()
        finally:
            if timer:
                timer.cancel()
        proc.wait()
    return proc.returncode, time.perf_counter() - start, stopped.is_set()


def run_steps(steps: list[str], out: Path, limits: dict[str, float] | None = None, **options: str) -> int:
    """Every command of every step, whatever the ones before did, each stopped after its step's
    limit in seconds (`limits`, by step name) if it has one; -> 1 when one failed or was stopped."""
    out.mkdir(parents=True, exist_ok=True)
    failed = False
    for step in steps:
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
    return run_tool(lambda: run_steps(args.steps, args.out, dict(args.limit), levers_compile=args.levers_compile,
                                      device=args.device))


if __name__ == "__main__":
    raise SystemExit(main())
