"""Capturing work in a CUDA graph the way the engine's model runner does."""

from __future__ import annotations

from typing import Callable

import torch


def capture(fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """Runs `fn` once on a side stream (lazy initialisation and allocations stay out of the
    capture), then captures it; replay the returned graph to run it again."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
