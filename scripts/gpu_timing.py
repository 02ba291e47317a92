#!/usr/bin/env python3
"""Time reflex on CuPy against torch SDPA on the same GPU (run by ``scripts/gpu_check.sh``).

    python scripts/gpu_timing.py [--lengths 8192,65536] [--heads 4] [--dim 64]

For each length L (= S) and mechanism — ``full``, ``sliding_window`` (±256) and ``lsh`` (4 hashes,
64 buckets, chunks of 64, the Reformer configuration) — reflex runs in float64 on CuPy and torch's
``scaled_dot_product_attention`` runs on the GPU: in float64 (the math backend, the like-for-like
oracle) and in bfloat16 (the flash backend a model would use), dense for ``full`` and ``lsh``, with
the band as a boolean mask for ``sliding_window``. One warm-up call per configuration (CuPy and
CUDA compile kernels on first use), then the median of ``--repeat`` timed calls, each ending in a
device synchronisation. A configuration that runs out of memory or fails prints why and the run
goes on. Figures are for notes, never assertions.

``--library numpy --torch-device cpu`` runs the same table on the CPU at small lengths (how the
script is tested on machines without a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

import numpy

import reflex
from reflex import random

MECHANISMS = ("full", "sliding_window", "lsh")
WINDOW = 256
LSH = dict(n_buckets=64, n_hashes=4, chunk_length=64, seed=0)


def _inputs(mechanism: str, length: int, heads: int, dim: int) -> tuple[list[numpy.ndarray], dict[str, Any]]:
    """Host float64 inputs (B = 1) and options for ``mechanism``."""
    shape = (1, heads, length, dim)
    if mechanism == "lsh":
        return [random.normal(shape, seed=(0, 0)), random.normal(shape, seed=(0, 2))], dict(LSH)
    arrays = [random.normal(shape, seed=(0, i)) for i in range(3)]
    return arrays, ({"window": (WINDOW, WINDOW)} if mechanism == "sliding_window" else {})


def _timed(call: Callable[[], Any], sync: Callable[[], None], repeat: int) -> str:
    """Median seconds of ``repeat`` calls after one warm-up, or the reason it could not run."""
    try:
        call()
        sync()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            call()
            sync()
            times.append(time.perf_counter() - start)
    except Exception as err:  # out of memory, unsupported dtype on this device, ...
        sync_quietly(sync)
        return f"{type(err).__name__}: {str(err).splitlines()[0][:60] if str(err) else ''}"
    return f"{statistics.median(times):.4f} s"


def sync_quietly(sync: Callable[[], None]) -> None:
    try:
        sync()
    except Exception:  # noqa: S110 - the device is already in an error state; the row says why
        pass


def _sdpa(torch: Any, mechanism: str, host: list[numpy.ndarray], dtype: Any, device: str) -> Callable[[], Any]:
    """torch SDPA on the same inputs: dense for full and lsh (its dense counterpart), banded mask for the window."""
    q = torch.from_numpy(host[0]).to(device=device, dtype=dtype)
    k = q if mechanism == "lsh" else torch.from_numpy(host[1]).to(device=device, dtype=dtype)
    v = torch.from_numpy(host[-1]).to(device=device, dtype=dtype)
    mask = None
    if mechanism == "sliding_window":
        positions = torch.arange(q.shape[-2], device=device)
        mask = (positions[:, None] - positions[None, :]).abs() <= WINDOW
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,65536", help="comma-separated L = S (default 8192,65536)")
    parser.add_argument("--heads", type=int, default=4, help="heads H (default 4)")
    parser.add_argument("--dim", type=int, default=64, help="head dim D (default 64)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls after the warm-up (default 3)")
    parser.add_argument("--library", choices=("cupy", "numpy"), default="cupy", help="reflex's array library")
    parser.add_argument("--torch-device", default="cuda", help="torch device for SDPA (default cuda)")
    parser.add_argument("--mechanisms", default=",".join(MECHANISMS), help="comma-separated subset")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    mechanisms = [m for m in args.mechanisms.split(",") if m]
    unknown = sorted(set(mechanisms) - set(MECHANISMS))
    if unknown:
        parser.error(f"--mechanisms: {unknown[0]!r} is not one of {', '.join(MECHANISMS)}")

    if args.library == "cupy":
        import cupy

        def move(a: numpy.ndarray) -> Any:
            return cupy.asarray(a)

        def sync() -> None:
            cupy.cuda.Device().synchronize()

        where = f"CuPy {cupy.__version__} on {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}"
    else:
        def move(a: numpy.ndarray) -> Any:
            return a

        def sync() -> None:
            pass

        where = f"NumPy {numpy.__version__} on the CPU"
    try:
        import torch
    except ImportError:
        torch = None

    def torch_sync() -> None:
        if torch is not None and args.torch_device.startswith("cuda"):
            torch.cuda.synchronize()

    print(f"reflex {reflex.__version__} float64 on {where}; torch SDPA on {args.torch_device}"
          f"{'' if torch is None else f' (torch {torch.__version__})'}; H = {args.heads}, D = {args.dim}, "
          f"window ±{WINDOW}, lsh {LSH}; median of {args.repeat} after a warm-up")
    header = f"{'mechanism':<16}{'L':>8}  {'reflex float64':>18}  {'SDPA float64':>18}  {'SDPA bfloat16':>18}"
    print(header)
    print("-" * len(header))
    for length in lengths:
        for mechanism in mechanisms:
            host, options = _inputs(mechanism, length, args.heads, args.dim)
            function = reflex.get(mechanism).function
            arrays = [move(a) for a in host]
            mine = _timed(lambda: function(*arrays, **options), sync, args.repeat)
            del arrays
            peers = []
            for dtype_name in ("float64", "bfloat16"):
                if torch is None:
                    peers.append("torch missing")
                    continue
                try:
                    call = _sdpa(torch, mechanism, host, getattr(torch, dtype_name), args.torch_device)
                except Exception as err:  # out of memory while moving the inputs
                    peers.append(f"{type(err).__name__}")
                    continue
                peers.append(_timed(call, torch_sync, args.repeat))
                del call
                if args.torch_device.startswith("cuda"):
                    torch.cuda.empty_cache()
            if args.library == "cupy":
                cupy.get_default_memory_pool().free_all_blocks()
            print(f"{mechanism:<16}{length:>8}  {mine:>18}  {peers[0]:>18}  {peers[1]:>18}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
