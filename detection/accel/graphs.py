"""`accel.cuda_graphs` (off by default): res5 on a RoI count padded to a fixed bucket, so its
kernels can be captured once per bucket as a CUDA graph and replayed (one launch instead of one
per kernel; res5 is most of the inference time on a GPU).

The padding is device-neutral and tested on the CPU: in eval mode res5 computes each RoI on its
own (frozen, folded or running-statistics norms; GroupNorm normalises within a sample), so the
padded rows change nothing in the real ones and are cut off before anything reads them. The
capture runs on CUDA only (tests/test_cuda.py); elsewhere the padded batch runs eagerly.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

GRANULARITY = 64  # RoI counts are padded up to a multiple of this: at 1000 RoIs 2.4% more work
MAX_GRAPHS = 16  # graphs kept at most (each holds its bucket's input and output); beyond, eager


def bucket(count: int, granularity: int = GRANULARITY) -> int:
    """The padded RoI count: `count` rounded up to a multiple of `granularity` (at least one)."""
    return max(1, math.ceil(count / granularity)) * granularity


class PaddedRes5(nn.Module):
    """res5 on (R, C, S, S) RoI maps padded to bucket(R) rows of `fill`; returns the R real rows.
    On CUDA (graphs=True) each bucket's res5 is captured as a CUDA graph at its first call and
    replayed after, inputs copied into the graph's own buffer."""

    def __init__(self, res5: nn.Module, *, graphs: bool, granularity: int = GRANULARITY,
                 fill: float = 0.0) -> None:
        super().__init__()
        self.res5, self.use_graphs, self.granularity, self.fill = res5, graphs, granularity, fill
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        self.pool = None

    def forward(self, x: Tensor) -> Tensor:
        count, rows = x.shape[0], bucket(x.shape[0], self.granularity)
        # inference mode too: a buffer captured under it is an inference tensor, which cannot be
        # written outside it (evaluation runs under inference_mode, some callers under no_grad)
        key = ((rows, *x.shape[1:]), x.dtype, torch.is_autocast_enabled("cuda"), torch.is_inference_mode_enabled())
        if not self.replays(x) or (key not in self.graphs and len(self.graphs) >= MAX_GRAPHS):
            return self.res5(self._padded(x, rows))[:count]
        if key not in self.graphs:
            self.graphs[key] = self.capture(self._padded(x, rows))
        graph, static_in, static_out = self.graphs[key]
        static_in[:count].copy_(x)  # straight into the graph's input: one pass over the RoI maps
        static_in[count:].fill_(self.fill)
        graph.replay()
        return static_out[:count].clone()  # the next replay overwrites static_out

    def replays(self, x: Tensor) -> bool:
        """Whether `x` goes through the graphs (graphs=True and x on CUDA) or runs eagerly."""
        return self.use_graphs and x.is_cuda

    def _padded(self, x: Tensor, rows: int) -> Tensor:
        padded = x.new_full((rows, *x.shape[1:]), self.fill)
        padded[:x.shape[0]] = x
        return padded

    def capture(self, example: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        """(graph, its input buffer, its output) for example's shape. Warm-up on a side stream
        (cuDNN picks its algorithms), then the capture; the graphs share one memory pool (they are
        replayed one at a time). Under autocast (test.amp) its cache of cast weights is off for the
        capture: a cached cast would be freed when the autocast region ends while the graph still
        reads it (PyTorch's CUDA-graph notes)."""
        if torch.is_autocast_enabled("cuda"):
            with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False):
                return self._capture_now(example)
        return self._capture_now(example)

    def _capture_now(self, example: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        static_in = example.clone()
        stream = torch.cuda.Stream(device=example.device)
        stream.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.res5(static_in)
        torch.cuda.current_stream(example.device).wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the capture happens at the first batch of an evaluation, while the
        # DataLoader's pin-memory thread allocates pinned buffers (cudaHostAlloc); in the default
        # "global" mode any thread's such call invalidates the capture and fails that thread too
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            static_out = self.res5(static_in)
        return graph, static_in, static_out
