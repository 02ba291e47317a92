"""Sliding-window attention: reflex float64 band kernels vs torch FlexAttention (compiled, CPU, float32) vs masked dense.

At L = S = ``--length`` (default 65,536), window ±``--window`` (256), D = 64, H = 4: reflex
``sliding_window`` with ``implementation="auto"`` (the vectorised NumPy band kernel,
``reflex.backends.band``, float64) and ``"numba"`` (its Numba twin), and torch ``flex_attention``
compiled with ``torch.compile`` on CPU in float32 with the same band as a block mask. At L =
``--dense-length`` (8,192): the same, plus reflex ``full`` with the band as a boolean mask, both tiled
(the engine skips key tiles whose mask tile is all False) and dense (every score computed). Reports
best-of-N wall time, ratios (within one run: the machine may be shared), useful GFLOP/s
(2·(D + E) flops per attended (query, key) pair, per head) and peak traced memory (NumPy
allocations through tracemalloc; torch's allocator is not traced).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from typing import Any, Callable

import numpy

import reflex
from reflex import random

from ._timing import best_time, table, traced_peak


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--length", type=int, default=65536, help="L = S for the long comparison (default 65536)")
    parser.add_argument("--dense-length", type=int, default=8192, help="L = S for the masked-dense comparison (8192)")
    parser.add_argument("--window", type=int, default=256, help="one-sided window w: keys i-w..i+w (default 256)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true", help="skip torch FlexAttention")
    parser.add_argument("--no-dense", action="store_true", help="skip the masked full-attention paths")
    parser.add_argument("--no-materialized", action="store_true",
                        help="skip full attention with implementation='dense' (H x L x S scores: ~2 GiB at L=8192)")


def _pairs(length: int, window: int) -> int:
    """Attended (query, key) pairs of the band |i − j| ≤ w on an L × L grid."""
    i = numpy.arange(length)
    return int(numpy.sum(numpy.minimum(length - 1, i + window) - numpy.maximum(0, i - window) + 1))


def _inputs(length: int, heads: int, dim: int) -> tuple[numpy.ndarray, ...]:
    return tuple(random.normal((1, heads, length, dim), seed=(0, n)) for n in range(3))


def _flex(length: int, window: int, q: numpy.ndarray, k: numpy.ndarray, v: numpy.ndarray) -> Callable[[], Any] | str:
    """A zero-argument call of compiled FlexAttention in float32, or why it is unavailable."""
    if importlib.util.find_spec("torch") is None:
        return "torch not installed"
    try:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def band(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return (q_idx - kv_idx <= window) & (kv_idx - q_idx <= window)

        block_mask = create_block_mask(band, None, None, length, length, device="cpu", _compile=True)
        compiled = torch.compile(flex_attention)
        tq, tk, tv = (torch.from_numpy(a.astype(numpy.float32)) for a in (q, k, v))
        compiled(tq, tk, tv, block_mask=block_mask)  # compile outside the timing
        return lambda: compiled(tq, tk, tv, block_mask=block_mask)
    except Exception as err:  # noqa: BLE001 - report why the peer could not run
        return f"torch.compile failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"


def run(args: argparse.Namespace) -> int:
    window, heads, dim = args.window, args.heads, args.dim
    rows: list[list[str]] = []
    notes: list[str] = []
    results: dict[str, float] = {}

    def measure(name: str, length: int, dtype: str, fn: Callable[[], Any], trace: bool = True) -> float:
        seconds = best_time(fn, repeats=args.repeats, warmup=1)
        flops = 2 * heads * _pairs(length, window) * (dim + dim)
        peak = f"{traced_peak(fn) / 2**20:.0f} MiB" if trace else "n/a"
        rows.append([name, str(length), dtype, f"{seconds:.3f}", f"{flops / seconds / 1e9:.1f}", peak])
        results[f"{name}@{length}"] = seconds
        return seconds

    for length in (args.length, args.dense_length):
        q, k, v = _inputs(length, heads, dim)
        ours = measure("reflex sliding_window (auto: numpy)", length, "float64",
                       lambda: reflex.sliding_window_attention(q, k, v, window=(window, window)))
        jit = measure("reflex sliding_window (numba)", length, "float64",
                      lambda: reflex.sliding_window_attention(q, k, v, window=(window, window), implementation="numba"))
        notes.append(f"L={length}: reflex numba / reflex numpy (auto) = {jit / ours:.2f}")
        if not args.no_torch:
            flex = _flex(length, window, q, k, v)
            if isinstance(flex, str):
                notes.append(f"FlexAttention at L={length}: {flex}")
            else:
                theirs = measure("torch flex_attention (compiled)", length, "float32", flex, trace=False)
                notes.append(f"L={length}: reflex float64 / FlexAttention float32 = {ours / theirs:.2f} (auto: numpy), "
                             f"{jit / theirs:.2f} (numba)")
        if length == args.dense_length and not args.no_dense:
            i = numpy.arange(length)
            mask = numpy.abs(i[:, None] - i[None, :]) <= window
            tiled = measure("reflex full + band mask (tiled)", length, "float64",
                            lambda: reflex.full_attention(q, k, v, mask=mask, implementation="tiled"))
            notes.append(f"L={length}: full+mask tiled (skips all-False mask tiles) / reflex sliding_window = "
                         f"{tiled / ours:.1f}x (auto: numpy), {tiled / jit:.1f}x (numba)")
            if not args.no_materialized:
                dense = measure("reflex full + band mask (dense)", length, "float64",
                                lambda: reflex.full_attention(q, k, v, mask=mask, implementation="dense"))
                notes.append(f"L={length}: full+mask dense (L x S scores) / reflex sliding_window = {dense / ours:.1f}x (auto: numpy), "
                             f"{dense / jit:.1f}x (numba)")

    print(f"sliding window ±{window}, H={heads}, D=E={dim}, batch 1; best of {args.repeats}; "
          f"{os.cpu_count()} CPUs; GFLOP/s counts attended pairs only")
    print(table(rows, ["path", "L=S", "dtype", "seconds", "GFLOP/s", "peak (traced)"]))
    for note in notes:
        print(note)
    return 0
