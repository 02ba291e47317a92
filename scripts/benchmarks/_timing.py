"""Timing and memory helpers shared by the benchmark suites."""

from __future__ import annotations

import gc
import time
import tracemalloc
from typing import Any, Callable


def best_time(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1) -> float:
    """The best wall time of ``repeats`` calls after ``warmup`` calls (seconds)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def traced_peak(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated through Python/NumPy allocators during one call (tracemalloc).

    NumPy reports its data buffers to tracemalloc; torch and CuPy do not (use their own counters).
    """
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain aligned text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(f"{str(c):>{w}}" for c, w in zip(header, widths))]
    lines += ["  ".join(f"{str(c):>{w}}" for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
