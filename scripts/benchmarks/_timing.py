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


def timed_rss(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1) -> dict:
    """``{"seconds": best_time, "peak_bytes": rise of the process's max RSS during the calls}``.

    Meant to run in a fresh process (:func:`in_subprocess`), so the peak belongs to ``fn`` alone.
    """
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = best_time(fn, repeats=repeats, warmup=warmup)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "peak_bytes": (after - before) * 1024}


def in_subprocess(suite: str, label: str, *args: Any) -> dict | None:
    """``benchmarks.<suite>.measure(*args)`` in a fresh interpreter; its JSON result, or None (failure
    reported on stderr under ``label``)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent.parent
    code = (f"import json, sys; sys.path.insert(0, {str(here)!r}); from benchmarks.{suite} import measure; "
            f"print(json.dumps(measure(*{args!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{label}: failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def score_matrix_table(suite: str, title: str, implementations: tuple[str, ...], baseline: str, args: Any) -> str:
    """Time ``suite``'s ``measure`` for every implementation and length (each in a subprocess) and
    tabulate seconds, the ratio to ``baseline`` and the peak RSS rise against the (H, L, S) float64
    score matrix; ``args`` has ``lengths`` (comma-separated), ``heads``, ``dim``, ``repeats``, ``causal``."""
    rows = []
    for length in (int(n) for n in args.lengths.split(",")):
        scores_bytes = args.heads * length * length * 8
        results = {}
        for implementation in implementations:
            r = in_subprocess(suite, f"{implementation} L={length}", implementation, length, args.heads, args.dim,
                              args.repeats, args.causal)
            if r is not None:
                results[implementation] = r
        base = results.get(baseline, {}).get("seconds")
        for implementation, r in results.items():
            ratio = f"{r['seconds'] / base:.2f}" if base else "n/a"
            rows.append([length, implementation, f"{r['seconds']:.3f}", ratio,
                         f"{r['peak_bytes'] / 2**20:.0f}", f"{r['peak_bytes'] / scores_bytes:.3f}"])
    header = (f"{title}, float64, H={args.heads}, D={args.dim}, causal={args.causal}; "
              f"'x L×S' = peak RSS rise / the (H, L, S) float64 score matrix")
    return header + "\n" + table(rows, ["L=S", "implementation", "seconds", "vs torch", "peak MiB", "x L×S"])
