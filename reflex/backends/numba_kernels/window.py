"""Windowed softmax attention for band patterns: the Numba twin of the tiled kernel on a band.

Query i attends the contiguous key range ``[lo_i, hi_i]`` (inclusive; empty when lo_i > hi_i) of
a *band key set* ``kb, vb``, skipping keys where ``key_ok`` is False, plus every key of an *extra*
set ``kx, vx`` (global tokens) exactly once:

.. math::

    s_{ij} = \\mathrm{scale}\\; q_i \\cdot k_j, \\qquad
    o_i = \\sum_{j \\in W_i} \\frac{e^{s_{ij} - m_i}}{\\ell_i} v_j, \\qquad
    \\mathrm{lse}_i = m_i + \\log \\ell_i,

with the same conventions as ``reflex.mechanisms._kernels``: max-shifted softmax, a row with no
allowed key outputs 0 and lse −∞, GQA head ``h`` reads kv head ``h // (H/G)``. Arithmetic is float64,
``cache=True``, no ``fastmath``.

Work is split into (batch, head, query tile) tasks run in parallel (``prange``). For a tile of T
queries the union of their ranges is one contiguous key slice of width ≈ T + window, so the scores
and the weighted values are two BLAS products ``(T, D)·(D, W)`` and ``(T, W)·(W, E)``; memory is
O(T·W) per task — never an ``L × S`` array. Dilated bands (keys ``i + δ + d·t``) are split by
residue class ``(i + δ) mod d`` into d ordinary bands over the strided keys ``k[..., r::d, :]``.

:mod:`reflex.backends.band` has the same API, vectorised with NumPy; ``implementation="auto"`` uses
it because this kernel's scalar ``math.exp`` (~4.3 ns per score, no SIMD ``exp`` without SVML)
makes it ~1.2× slower at L = 65,536, window ±256. This one stays as ``implementation="numba"``.
"""

from __future__ import annotations

import math

import numba
import numpy
import threadpoolctl

from reflex.backends import band

__all__ = ["band_attention", "range_attention", "DEFAULT_BLOCK"]

DEFAULT_BLOCK = None  # chosen from the window width by :func:`choose_block`


def choose_block(width: int) -> int:
    """Query tile size T for a band of ``width`` keys: T ≈ width/4 in [16, 128], so a tile's key
    slice (T + width) is mostly useful and its BLAS products are large enough to be efficient."""
    return int(min(128, max(16, width // 4)))


@numba.njit(parallel=True, cache=True)
def _range_kernel(q, kb, vb, lo, hi, key_ok, kx, vx, scale, block, out, lse):  # pragma: no cover - compiled
    batch, heads, length, _ = q.shape
    kv_heads = kb.shape[1]
    value_dim = vb.shape[3]
    extra = kx.shape[2]
    group = heads // kv_heads
    tiles = (length + block - 1) // block
    for task in numba.prange(batch * heads * tiles):
        b = task // (heads * tiles)
        h = (task // tiles) % heads
        g = h // group
        i0 = (task % tiles) * block
        i1 = min(i0 + block, length)
        rows = i1 - i0
        # The tile's key slice: the union of its rows' ranges.
        j0 = kb.shape[2]
        j1 = 0
        for i in range(i0, i1):
            if lo[i] <= hi[i]:
                j0 = min(j0, lo[i])
                j1 = max(j1, hi[i] + 1)
        width = max(j1 - j0, 0)
        qt = q[b, h, i0:i1] * scale
        acc = numpy.zeros((rows, value_dim))
        totals = numpy.empty(rows)
        if width > 0:
            s = numpy.dot(qt, kb[b, g, j0:j1].T)  # (T, W) scores of the band slice
        else:
            s = numpy.zeros((rows, 0))
        if extra > 0:
            sx = numpy.dot(qt, kx[b, g].T)  # (T, n) scores of the extra keys
        else:
            sx = numpy.zeros((rows, 0))
        for r in range(rows):
            i = i0 + r
            a = lo[i] - j0
            z = hi[i] + 1 - j0
            m = -math.inf
            for c in range(width):
                if c < a or c >= z or not key_ok[j0 + c]:
                    s[r, c] = -math.inf
                elif s[r, c] > m:
                    m = s[r, c]
            for c in range(extra):
                if sx[r, c] > m:
                    m = sx[r, c]
            shift = 0.0 if m == -math.inf else m
            total = 0.0
            for c in range(width):  # exp only inside the row's range; masked entries weigh 0
                if c < a or c >= z or s[r, c] == -math.inf:
                    s[r, c] = 0.0
                else:
                    w = math.exp(s[r, c] - shift)
                    s[r, c] = w
                    total += w
            for c in range(extra):
                w = math.exp(sx[r, c] - shift)
                sx[r, c] = w
                total += w
            totals[r] = total
            lse[b, h, i] = -math.inf if total == 0.0 else m + math.log(total)
        if width > 0:
            acc = numpy.dot(s, vb[b, g, j0:j1])
        if extra > 0:
            acc = acc + numpy.dot(sx, vx[b, g])
        for r in range(rows):
            i = i0 + r
            denom = 1.0 if totals[r] == 0.0 else totals[r]
            for e in range(value_dim):
                out[b, h, i, e] = acc[r, e] / denom


def _run(q, k, v, kx, vx, lo, hi, key_ok, scale, block, out, lse) -> None:
    """The driver's ``run`` (see :mod:`reflex.backends.band`): the compiled kernel, one BLAS thread
    per prange task (BLAS threads inside prange threads would oversubscribe the cores)."""
    width = int(numpy.max(hi - lo)) + 1 if lo.size else 1
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        _range_kernel(q, k, v, lo, hi, key_ok, kx, vx, float(scale), choose_block(width) if block is None else int(block),
                      out, lse)


def range_attention(q: numpy.ndarray, k: numpy.ndarray, v: numpy.ndarray, lo: numpy.ndarray, hi: numpy.ndarray, *,
                    scale: float, key_ok: numpy.ndarray | None = None, extra: numpy.ndarray | None = None,
                    block: int | None = DEFAULT_BLOCK) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Query i attends keys ``lo[i] ≤ j ≤ hi[i]`` with ``key_ok[j]``, plus every key in ``extra``.

    Same contract as :func:`reflex.backends.band.range_attention` (shapes, clipping, ``key_ok``,
    ``extra``), computed by the Numba kernel.
    """
    return band._range_attention(q, k, v, lo, hi, scale=scale, key_ok=key_ok, extra=extra, block=block, run=_run)


def band_attention(q: numpy.ndarray, k: numpy.ndarray, v: numpy.ndarray, *, left: int, right: int, scale: float,
                   offset: int = 0, dilation: int = 1, key_ok: numpy.ndarray | None = None,
                   extra: numpy.ndarray | None = None, block: int | None = DEFAULT_BLOCK) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Query i attends keys j = i + δ + d·t, −left ≤ t ≤ right (−1 = unbounded), plus ``extra``.

    Same contract as :func:`reflex.backends.band.band_attention`, computed by the Numba kernel.
    """
    return band._band_attention(q, k, v, left=left, right=right, scale=scale, offset=offset, dilation=dilation,
                                key_ok=key_ok, extra=extra, block=block, run=_run)
