"""`accel.cuda_graphs` (off by default): res5 on a RoI count padded to a fixed bucket, so its
kernels can be captured once per bucket as a CUDA graph and replayed (one launch instead of one
per kernel; res5 is most of the inference time on a GPU). The input is res5's (R, C, S, S) RoI
maps, or with `accel.cuda_hoist` the Res5Runner's pooled inputs ({name: (R, ...)}, its `head`).

The padding is device-neutral and tested on the CPU: in eval mode res5 computes each RoI on its
own (frozen, folded or running-statistics norms; GroupNorm normalises within a sample), so the
padded rows change nothing in the real ones and are cut off before anything reads them. The
capture runs on CUDA only (tests/test_cuda.py); elsewhere the padded batch runs eagerly.
"""
from __future__ import annotations

import math
import threading
from typing import Callable, Union

import torch
from torch import Tensor, nn

GRANULARITY = 64  # RoI counts are padded up to a multiple of this: at 1000 RoIs 2.4% more work
MAX_GRAPHS = 16  # graphs kept at most (each holds its bucket's input and output); beyond, eager
# A graph's input and output buffers are shared by every call: threads serving one model (a
# Predictor's) fill, replay and read them one at a time (module-level: a lock cannot be deep-copied)
_REPLAYS = threading.Lock()

Rows = Union[Tensor, dict[str, Tensor]]  # RoI rows: one tensor, or several with the same first dimension


def bucket(count: int, granularity: int = GRANULARITY) -> int:
    """The padded RoI count: `count` rounded up to a multiple of `granularity` (at least one)."""
    return max(1, math.ceil(count / granularity)) * granularity


SHARED_POOLS: dict[torch.device, tuple] = {}  # the graphs' memory pool per device (shared_pool)


def shared_pool(device: torch.device) -> tuple:
    """One CUDA-graph memory pool per device for every PaddedRes5's graphs (every bucket, every
    model). Safe to share here although the graphs replay in any order: a graph reads only its
    own input buffer (allocated outside the pool, written before each replay) and the
    temporaries it makes during its replay; its output stays allocated while the graph lives and
    is copied out at once. So the pool holds one res5's activations, not one per model (the
    levers benchmark keeps several graphed models of 8,000 RoIs alive side by side)."""
    device = torch.device(device)
    if device not in SHARED_POOLS:
        SHARED_POOLS[device] = torch.cuda.graph_pool_handle()
    return SHARED_POOLS[device]


def _tensors(x: Rows) -> list[Tensor]:
    return list(x.values()) if isinstance(x, dict) else [x]


def _each(x: Rows, fn: Callable[[Tensor], Tensor]) -> Rows:
    return {name: fn(t) for name, t in x.items()} if isinstance(x, dict) else fn(x)


class PaddedRes5(nn.Module):
    """res5 on RoI rows (a (R, C, S, S) tensor, or a dict of tensors of R rows each: the
    Res5Runner's pooled inputs) padded to bucket(R) rows of `fill`; returns the R real rows. On
    CUDA (graphs=True) each bucket's res5 is captured as a CUDA graph at its first call and
    replayed after, inputs copied into the graph's own buffers. `res5` is a module or a callable
    (Res5Runner.head)."""

    def __init__(self, res5: nn.Module | Callable[[Rows], Tensor], *, graphs: bool,
                 granularity: int = GRANULARITY, fill: float = 0.0) -> None:
        super().__init__()
        self.res5, self.use_graphs, self.granularity, self.fill = res5, graphs, granularity, fill
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Rows, Tensor]] = {}

    def forward(self, x: Rows) -> Tensor:
        count = _tensors(x)[0].shape[0]
        rows = bucket(count, self.granularity)
        # inference mode too: a buffer captured under it is an inference tensor, which cannot be
        # written outside it (evaluation runs under inference_mode, some callers under no_grad);
        # and the TF32 flags: a replay runs the kernels captured, TF32 or not, whatever the flags
        # say at the replay (the benchmark's check turns TF32 off between timed calls with it on)
        key = (rows, tuple((t.shape[1:], t.dtype) for t in _tensors(x)), torch.is_autocast_enabled("cuda"),
               torch.is_inference_mode_enabled(), torch.backends.cudnn.allow_tf32,
               torch.backends.cuda.matmul.allow_tf32)
        if not self.replays(x) or (key not in self.graphs and len(self.graphs) >= MAX_GRAPHS):
            return self.res5(self._padded(x, rows))[:count]
        with _REPLAYS:
            if key not in self.graphs:
                self.graphs[key] = self.capture(self._padded(x, rows))
            graph, static_in, static_out = self.graphs[key]
            for buffer, t in zip(_tensors(static_in), _tensors(x)):
                buffer[:count].copy_(t)  # straight into the graph's input: one pass over the RoI rows
                buffer[count:].fill_(self.fill)
            graph.replay()
            return static_out[:count].clone()  # the next replay overwrites static_out

    def replays(self, x: Rows) -> bool:
        """Whether `x` goes through the graphs (graphs=True and x on CUDA) or runs eagerly."""
        return self.use_graphs and all(t.is_cuda for t in _tensors(x))

    def _padded(self, x: Rows, rows: int) -> Rows:
        """x padded to `rows` rows of `fill`, in x's memory format (the runner's pooled maps are
        NHWC: an NCHW buffer would cost a strided copy in and a layout change in res5)."""
        def pad(t: Tensor) -> Tensor:
            nhwc = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
            padded = torch.empty((rows, *t.shape[1:]), dtype=t.dtype, device=t.device,
                                 memory_format=torch.channels_last if nhwc else torch.contiguous_format)
            padded[t.shape[0]:] = self.fill
            padded[:t.shape[0]] = t
            return padded
        return _each(x, pad)

    def capture(self, example: Rows) -> tuple[torch.cuda.CUDAGraph, Rows, Tensor]:
        """(graph, its input buffer, its output) for example's shape. Warm-up on a side stream
        (cuDNN picks its algorithms), then the capture into the device's shared memory pool
        (shared_pool). Under autocast (test.amp) its cache of cast weights is off for the
        capture: a cached cast would be freed when the autocast region ends while the graph still
        reads it (PyTorch's CUDA-graph notes)."""
        if torch.is_autocast_enabled("cuda"):
            with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False):
                return self._capture_now(example)
        return self._capture_now(example)

    def _capture_now(self, example: Rows) -> tuple[torch.cuda.CUDAGraph, Rows, Tensor]:
        static_in = _each(example, Tensor.clone)
        device = _tensors(example)[0].device
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.res5(static_in)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the capture happens at the first batch of an evaluation, while the
        # DataLoader's pin-memory thread allocates pinned buffers (cudaHostAlloc); in the default
        # "global" mode any thread's such call invalidates the capture and fails that thread too
        with torch.cuda.graph(graph, pool=shared_pool(device), capture_error_mode="thread_local"):
            static_out = self.res5(static_in)
        return graph, static_in, static_out
