"""Reduced-precision inference (config `test.amp`): bfloat16 autocast on the CPU, float16 on CUDA.

Under autocast the convolutions and matrix products run in the low-precision type; the RPN's
and the box head's outputs come back in float32 (`RPN` head and `BoxPredictor` cast them), so
decoding, clipping, NMS and box voting run in float32, as in training with `solver.amp`.

bfloat16 is fast only on CPUs with bfloat16 instructions (AVX512-BF16 or AMX; Linux lists
`avx512_bf16` / `amx_bf16` among the CPU flags). Elsewhere PyTorch emulates it, slower than
float32 (a training step of the demo's model 12x slower on a 2-vCPU AMD EPYC with AVX2 only),
so `inference_amp` and `training_amp` then fall back to float32, with one warning
(`inference_amp`; the trainer says so in its log).
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from pathlib import Path

import torch

from detection.utils.text import PROJECT, DetectionWarning, stacklevel_outside

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_flags() -> tuple[str, ...]:
    """The CPU's bfloat16 instruction sets (from /proc/cpuinfo; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return tuple(flag for flag in BF16_FLAGS if flag in flags)


# why a CPU runs float32 where autocast was asked for
SLOW_BFLOAT16 = ("this CPU has no bfloat16 instructions (avx512_bf16 or amx_bf16), where PyTorch emulates "
                 "bfloat16, several times slower than float32")
# inference_amp's warning is given once per process: "test.amp" is added here when it is (the warnings
# module's own "once" is reset by any warnings.catch_warnings, so it came again at each evaluation)
WARNED: set[str] = set()


def bfloat16_is_slow(device: torch.device | str) -> bool:
    """Whether autocast would run emulated bfloat16: a CPU without bfloat16 instructions."""
    return torch.device(device).type == "cpu" and not cpu_bf16_flags()


def inference_amp(requested: bool, device: torch.device | str) -> bool:
    """Whether to run inference under autocast: on CUDA when requested; on the CPU only with
    bfloat16 instructions (else float32, with a warning saying why, once per process)."""
    if not requested:
        return False
    if not bfloat16_is_slow(device):
        return True
    if "test.amp" not in WARNED:
        WARNED.add("test.amp")
        warnings.warn(f"test.amp: {SLOW_BFLOAT16}: running inference in float32", DetectionWarning,
                      stacklevel=stacklevel_outside(PROJECT))  # the Predictor's or evaluate()'s caller
    return False


def training_amp(requested: bool, device: torch.device | str) -> bool:
    """Whether to train under solver.amp's autocast: on CUDA when requested; on the CPU only with
    bfloat16 instructions (else float32: the trainer's start summary says why)."""
    return bool(requested) and not bfloat16_is_slow(device)


def amp_dtype(device: torch.device | str) -> torch.dtype:
    """The project's mixed precision on `device` (test.amp, solver.amp): float16 on CUDA (with a
    GradScaler in training), bfloat16 on the CPU."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


def autocast(enabled: bool, device: torch.device | str) -> contextlib.AbstractContextManager:
    """amp_dtype's autocast on `device`; a no-op context when not enabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=amp_dtype(device))


def float32(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for the small output layers that read `x` (the RPN's 1x1 convs, the box
    predictor): their rounding to bfloat16 reorders close scores, and they cost little."""
    return torch.autocast(x.device.type, enabled=False)
