"""Windowed softmax attention for band patterns, vectorised with NumPy: the fast CPU path for bands.

Query i attends the contiguous key range ``[lo_i, hi_i]`` (inclusive; empty when lo_i > hi_i) of
a *band key set* ``k, v``, skipping keys where ``key_ok`` is False, plus every key of an *extra*
set (global tokens) exactly once:

.. math::

    s_{ij} = \\mathrm{scale}\\; q_i \\cdot k_j, \\qquad
    o_i = \\sum_{j \\in W_i} \\frac{e^{s_{ij} - m_i}}{\\ell_i} v_j, \\qquad
    \\mathrm{lse}_i = m_i + \\log \\ell_i,

with the conventions of ``reflex.mechanisms._kernels``: max-shifted softmax, a row with no allowed
key outputs 0 and lse −∞, GQA head ``h`` reads kv head ``h // (H/G)``, float64 arithmetic.

Queries are cut into tiles of T rows; tile t reads one key window of W ≥ T + window keys starting
at ``j0_t`` (the union of its rows' ranges). A *chunk* of consecutive tiles of one (batch, head) is
one batch of matrix products: the key windows are overlapping strided views of ``k`` (no copy)
when the starts step by T, as they do inside a band; the scores ``(n, T, W)`` are masked (only the
two triangles at the window's ends), shifted and exponentiated (NumPy's SIMD ``exp``) in place, then
multiplied by the value windows extended with a column of ones, which also gives the row sums. Chunks
are independent and run on a thread per core (:func:`reflex.backends.parallel_map`, BLAS limited to
one thread). Memory is O(chunk · T · W) per thread — never an ``L × S`` array.

:mod:`reflex.backends.numba_kernels.window` is the Numba twin (same API, scalar ``exp``); both are
tested against the array-API tiled engine to ≤ 1e-13. Dilated bands (keys ``i + δ + d·t``) are
split by residue class ``(i + δ) mod d`` into d ordinary bands over the strided keys ``k[..., r::d, :]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy
from numpy.lib.stride_tricks import as_strided

from reflex.backends import parallel_map

__all__ = ["CHUNK_ELEMENTS", "band_attention", "choose_block", "range_attention"]

# Scores per chunk (n · T · W): 8 MiB of float64. Larger chunks mean fewer Python-level NumPy calls
# competing for the GIL across the threads; measured on 2 cores at L = 65,536, window ±256, T = 48,
# chunks of 2^18 scores took 1.13× and 2^16 2.1× the time of 2^20, and 2^22 1.25× (out of cache);
# retuned at T = 24: 2^16 1.7×, 2^17 1.3×, 2^18 1.1×, 2^19 1.03×, 2^21 1.0× (run serially, 2^16 and 2^20
# took the same time at T = 48).
CHUNK_ELEMENTS = 1 << 20


def choose_block(width: int) -> int:
    """Query tile size T for a band of ``width`` keys: T ≈ width/20, a multiple of 8 in [16, 48].
    Each row computes T − 1 scores outside its band (a tile's window is T + width − 1 keys wide),
    so T is small; the products of one chunk are batched, so small tiles cost no Python overhead.
    Measured at width 513 (2 cores, OpenBLAS SkylakeX kernels): T = 24 best, 20 and 28 ~1–4% and
    48 ~8% slower."""
    return int(min(48, max(16, 8 * round(width / 160))))


def _flat(x: numpy.ndarray) -> numpy.ndarray:
    """``(..., X, Y, Z)`` → contiguous float64 ``(B, X, Y, Z)``."""
    return numpy.ascontiguousarray(x.reshape((math.prod(x.shape[:-3]), *x.shape[-3:])), dtype=numpy.float64)


def _windows(x: numpy.ndarray, starts: numpy.ndarray, width: int) -> numpy.ndarray:
    """``x[starts[t] : starts[t] + width]`` for each t, as ``(n, width, F)``: a strided view when
    the starts are evenly spaced, else a gathered copy."""
    n = starts.shape[0]
    step = int(starts[1] - starts[0]) if n > 1 else 0
    if n == 1 or (step >= 0 and numpy.all(numpy.diff(starts) == step)):
        base = x[int(starts[0]):]
        return as_strided(base, shape=(n, width, x.shape[1]),
                          strides=(step * x.strides[0], x.strides[0], x.strides[1]), writeable=False)
    return x[starts[:, None] + numpy.arange(width)]


class _Band:
    """The per-chunk kernel over flattened ``(B, H, L, D)`` arrays; writes ``out`` and ``lse``."""

    def __init__(self, q, k, v, kx, vx, lo, hi, key_ok, scale, block, out, lse):
        self.q, self.k, self.v, self.kx, self.vx = q, k, v, kx, vx
        self.lo, self.hi, self.scale, self.block = lo, hi, scale, block
        self.key_ok = None if key_ok is None or bool(numpy.all(key_ok)) else key_ok
        self.out, self.lse = out, lse
        self.group = q.shape[1] // k.shape[1]
        self.key_length = k.shape[2]
        self.masks: dict[Any, tuple[int, numpy.ndarray, int, numpy.ndarray]] = {}

    def _mask(self, s: numpy.ndarray, a: numpy.ndarray, z: numpy.ndarray, starts: numpy.ndarray) -> None:
        """Sets ``s[t, r, c]`` to −∞ where window column c of tile row r is outside ``a[r] ≤ c ≤ z[r]``
        or not ``key_ok``. Inside a band every tile has the same ``a``, ``z``: one ``(1, T, W)`` mask,
        kept for the next chunks, whose False columns (two triangles at the ends of the window) are the
        only ones written."""
        width = s.shape[2]
        rel = numpy.arange(width)
        if self.key_ok is None and bool(numpy.all(a == a[:1])) and bool(numpy.all(z == z[:1])):
            key = (width, a[0].tobytes(), z[0].tobytes())
            cached = self.masks.get(key)
            if cached is None:
                outside = (rel < a[:1, :, None]) | (rel > z[:1, :, None])
                inside = numpy.flatnonzero(~outside.any(axis=(0, 1)))
                left, right = (int(inside[0]), int(inside[-1]) + 1) if inside.size else (width, width)
                cached = self.masks[key] = (left, numpy.ascontiguousarray(outside[..., :left]),
                                            right, numpy.ascontiguousarray(outside[..., right:]))
            left, outside_left, right, outside_right = cached
            if left:
                numpy.copyto(s[..., :left], -math.inf, where=outside_left)
            if right < width:
                numpy.copyto(s[..., right:], -math.inf, where=outside_right)
            return
        outside = (rel < a[..., None]) | (rel > z[..., None])
        if self.key_ok is not None:
            outside |= ~self.key_ok[starts[:, None] + rel][:, None, :]
        numpy.copyto(s, -math.inf, where=outside)

    def tasks(self) -> list[tuple[int, int, int, int]]:
        """``(b, h, t0, t1)``: chunks of tiles t0 ≤ t < t1 of T query rows, each of at most
        :data:`CHUNK_ELEMENTS` scores (or one tile)."""
        batch, heads, length, _ = self.q.shape
        T = self.block
        tiles = (length + T - 1) // T
        pad = tiles * T - length
        lo = numpy.concatenate([self.lo, numpy.full(pad, self.key_length, dtype=numpy.int64)]).reshape(tiles, T)
        hi = numpy.concatenate([self.hi, numpy.full(pad, -1, dtype=numpy.int64)]).reshape(tiles, T)
        live = lo <= hi
        first = numpy.where(live, lo, self.key_length).min(axis=1)
        last = numpy.where(live, hi, -1).max(axis=1)
        widths = numpy.maximum(last - first + 1, 0)
        self.first, self.widths = first, widths
        S = self.key_length
        starts = numpy.clip(first, 0, numpy.maximum(S - widths, 0))
        step = numpy.diff(starts)
        # Tiles t, t+1 share a strided window view when their widths agree and the starts advance.
        pair = (widths[1:] == widths[:-1]) & (step >= 0)
        chunks: list[tuple[int, int]] = []
        t = 0
        while t < tiles:
            u = t + 1
            if u < tiles and pair[t]:  # a run of evenly spaced windows: strided views
                while (u < tiles and pair[u - 1] and step[u - 1] == step[t]
                       and (u + 1 - t) * T * int(widths[t]) <= CHUNK_ELEMENTS):
                    u += 1
            else:  # tiles whose windows are gathered (copies), e.g. at the ends of a band
                widest = int(widths[t])
                while (u < tiles and not pair[u - 1] and not (u + 1 < tiles and pair[u])
                       and (u + 1 - t) * T * max(widest, int(widths[u])) <= CHUNK_ELEMENTS):
                    widest = max(widest, int(widths[u]))
                    u += 1
            chunks.append((t, u))
            t = u
        return [(b, h, t, u) for b in range(batch) for h in range(heads) for t, u in chunks]

    def __call__(self, task: tuple[int, int, int, int]) -> None:
        b, h, t0, t1 = task
        T, length = self.block, self.q.shape[2]
        full = min(t1, length // T) - t0  # whole tiles; a shorter last tile runs as its own batch of one
        if full > 0:
            self._tiles(b, h, t0, full, T)
        if t1 * T > length:
            self._tiles(b, h, t1 - 1, 1, length - (t1 - 1) * T)

    def _tiles(self, b: int, h: int, t0: int, n: int, T: int) -> None:
        """Tiles t0 ≤ t < t0 + n (of T rows each) of batch b, head h."""
        g = h // self.group
        r0 = t0 * self.block
        r1 = r0 + n * T
        S = self.key_length
        width = min(int(self.widths[t0:t0 + n].max()), S)
        extra = self.kx.shape[2]
        if width == 0 and extra == 0:
            return  # no key for any row: out stays 0, lse −∞
        qt = self.q[b, h, r0:r1].reshape(n, T, -1) * self.scale
        out = self.out[b, h, r0:r1].reshape(n, T, -1)
        if width > 0:
            starts = numpy.clip(self.first[t0:t0 + n], 0, S - width)  # every window inside [0, S)
            s = numpy.matmul(qt, _windows(self.k[b, g], starts, width).transpose(0, 2, 1))  # (n, T, W)
            lo = self.lo[r0:r1].reshape(n, T) - starts[:, None]
            hi = self.hi[r0:r1].reshape(n, T) - starts[:, None]
            self._mask(s, lo, hi, starts)
            m = s.max(axis=2)
        else:
            m = numpy.full((n, T), -math.inf)
        if extra:
            sx = qt @ self.kx[b, g].T  # (n, T, X)
            m = numpy.maximum(m, sx.max(axis=2))
        shift = numpy.where(m == -math.inf, 0.0, m)[..., None]
        value_dim = self.v.shape[3]
        if width > 0:
            s -= shift
            numpy.exp(s, out=s)
            # The chunk's value rows with a column of ones: one product gives Σ_j p_ij v_j and ℓ_i.
            first = int(starts.min())
            span = self.v[b, g, first:int(starts.max()) + width]
            ones = numpy.empty((span.shape[0], value_dim + 1))
            ones[:, :value_dim] = span
            ones[:, value_dim] = 1.0
            acc = numpy.matmul(s, _windows(ones, starts - first, width))
        else:
            acc = numpy.zeros((n, T, value_dim + 1))
        if extra:
            sx -= shift
            numpy.exp(sx, out=sx)
            acc[..., value_dim] += sx.sum(axis=2)
            acc[..., :value_dim] += sx @ self.vx[b, g]
        total = acc[..., value_dim]
        empty = total == 0.0
        with numpy.errstate(divide="ignore"):
            self.lse[b, h, r0:r1] = numpy.where(empty, -math.inf, m + numpy.log(total)).reshape(-1)
        numpy.divide(acc[..., :value_dim], numpy.where(empty, 1.0, total)[..., None], out=out)


def range_attention(q: numpy.ndarray, k: numpy.ndarray, v: numpy.ndarray, lo: numpy.ndarray, hi: numpy.ndarray, *,
                    scale: float, key_ok: numpy.ndarray | None = None, extra: numpy.ndarray | None = None,
                    block: int | None = None) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Query i attends keys ``lo[i] ≤ j ≤ hi[i]`` with ``key_ok[j]``, plus every key in ``extra``.

    ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)``; ``lo``, ``hi`` integer ``(L,)``
    (clipped to ``[0, S)``); ``key_ok`` boolean ``(S,)`` (default all True); ``extra`` distinct key
    positions attended by every query (they should be excluded from the band through ``key_ok``
    so that none counts twice). Returns ``(out (..., H, L, E), lse (..., H, L))`` in float64.
    """
    return _range_attention(q, k, v, lo, hi, scale=scale, key_ok=key_ok, extra=extra, block=block, run=_run)


def band_attention(q: numpy.ndarray, k: numpy.ndarray, v: numpy.ndarray, *, left: int, right: int, scale: float,
                   offset: int = 0, dilation: int = 1, key_ok: numpy.ndarray | None = None,
                   extra: numpy.ndarray | None = None, block: int | None = None) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Query i attends keys j = i + δ + d·t, −left ≤ t ≤ right (−1 = unbounded), plus ``extra``.

    ``offset`` δ aligns queries with keys; ``dilation`` d ≥ 1. See :func:`range_attention` for
    shapes, ``key_ok`` and ``extra``.
    """
    return _band_attention(q, k, v, left=left, right=right, scale=scale, offset=offset, dilation=dilation,
                           key_ok=key_ok, extra=extra, block=block, run=_run)


# --- shared by this module and its Numba twin ------------------------------------------------------
# ``run(q, k, v, kx, vx, lo, hi, key_ok, scale, block, out, lse)`` fills ``out (B, H, L, E)`` and
# ``lse (B, H, L)`` (preset to 0 and −∞) from flat float64 inputs, clipped ranges and a ``key_ok``
# of shape (S,).

Run = Callable[..., None]


def _run(q, k, v, kx, vx, lo, hi, key_ok, scale, block, out, lse) -> None:
    band = _Band(q, k, v, kx, vx, lo, hi, key_ok, scale, choose_block(_widest(lo, hi)) if block is None else block,
                 out, lse)
    parallel_map(band, band.tasks(), like=q)


def _widest(lo: numpy.ndarray, hi: numpy.ndarray) -> int:
    return int(numpy.max(hi - lo)) + 1 if lo.size else 1


def _range_attention(q: numpy.ndarray, k: numpy.ndarray, v: numpy.ndarray, lo: Any, hi: Any, *, scale: float,
                     key_ok: Any, extra: Any, block: int | None, run: Run) -> tuple[numpy.ndarray, numpy.ndarray]:
    extra = numpy.zeros(0, dtype=numpy.int64) if extra is None else numpy.asarray(extra, dtype=numpy.int64)
    return _range(q, k, v, k[..., extra, :], v[..., extra, :], lo, hi, key_ok, scale, block, run)


def _range(q: numpy.ndarray, k: numpy.ndarray, v: numpy.ndarray, kx: numpy.ndarray, vx: numpy.ndarray,
           lo: Any, hi: Any, key_ok: Any, scale: float, block: int | None,
           run: Run) -> tuple[numpy.ndarray, numpy.ndarray]:
    """:func:`range_attention` with the extra keys and values already gathered: ``kx (..., G, n, D)``.

    NaN/±inf in k, v (or kx, vx) reach only the rows that attend them: the engine's careful path
    (``reflex.mechanisms._engine.terms.guarded``) — non-finite entries zeroed, value rows extended
    with indicator columns, and the attending rows given the NaN/±inf they attended.
    """
    if not all(bool(numpy.all(numpy.isfinite(x))) for x in (k, v, kx, vx)):
        return _guarded_range(q, k, v, kx, vx, lo, hi, key_ok, scale, block, run)
    batch = q.shape[:-3]
    heads, length = q.shape[-3], q.shape[-2]
    key_length, value_dim = k.shape[-2], v.shape[-1]
    out = numpy.zeros((*batch, heads, length, value_dim))
    lse = numpy.full((*batch, heads, length), -math.inf)
    if length == 0 or key_length + kx.shape[-2] == 0:
        return out, lse
    q3, k3, v3, kx3, vx3 = _flat(q), _flat(k), _flat(v), _flat(kx), _flat(vx)
    lo = numpy.ascontiguousarray(numpy.clip(numpy.asarray(lo, dtype=numpy.int64), 0, key_length))
    hi = numpy.ascontiguousarray(numpy.clip(numpy.asarray(hi, dtype=numpy.int64), -1, key_length - 1))
    key_ok = numpy.ones(key_length, dtype=numpy.bool_) if key_ok is None else numpy.ascontiguousarray(key_ok, dtype=numpy.bool_)
    if key_ok.shape != (key_length,):
        raise ValueError(f"key_ok must have shape ({key_length},); got {key_ok.shape}")
    if block is not None and block < 1:
        raise ValueError(f"block must be a positive int; got {block}")
    out3 = out.reshape((math.prod(batch), heads, length, value_dim))
    lse3 = lse.reshape((math.prod(batch), heads, length))
    run(q3, k3, v3, kx3, vx3, lo, hi, key_ok, float(scale), block, out3, lse3)
    return out, lse


def _clean(k: numpy.ndarray, v: numpy.ndarray) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Non-finite entries zeroed; v extended by ``[isnan v | v = +∞ | v = −∞ | k row non-finite]``."""
    finite_k = numpy.isfinite(k)
    bad_key = ~finite_k.all(axis=-1, keepdims=True)
    return (numpy.where(finite_k, k, 0.0),
            numpy.concatenate([numpy.where(numpy.isfinite(v), v, 0.0), numpy.isnan(v), v == math.inf, v == -math.inf,
                               bad_key], axis=-1).astype(numpy.float64))


def _guarded_range(q, k, v, kx, vx, lo, hi, key_ok, scale, block, run) -> tuple[numpy.ndarray, numpy.ndarray]:
    e = v.shape[-1]
    k0, v0 = _clean(k, v)
    kx0, vx0 = _clean(kx, vx)
    out, lse = _range(q, k0, v0, kx0, vx0, lo, hi, key_ok, scale, block, run)
    nan_hit, pos, neg, key_hit = out[..., e:2 * e] > 0, out[..., 2 * e:3 * e] > 0, out[..., 3 * e:4 * e] > 0, out[..., 4 * e:] > 0
    o = numpy.where(pos, math.inf, out[..., :e])
    o = numpy.where(neg, -math.inf, o)
    o = numpy.where(nan_hit | (pos & neg) | key_hit, math.nan, o)
    return o, numpy.where(key_hit[..., 0], math.nan, lse)


def _band_attention(q: numpy.ndarray, k: numpy.ndarray, v: numpy.ndarray, *, left: int, right: int, scale: float,
                    offset: int, dilation: int, key_ok: Any, extra: Any, block: int | None,
                    run: Run) -> tuple[numpy.ndarray, numpy.ndarray]:
    length, key_length = q.shape[-2], k.shape[-2]
    big = key_length + length + 1  # "unbounded" in index units
    left = big if left < 0 else left
    right = big if right < 0 else right
    if dilation == 1:
        anchor = numpy.arange(length, dtype=numpy.int64) + offset
        return _range_attention(q, k, v, anchor - left, anchor + right, scale=scale, key_ok=key_ok, extra=extra,
                                block=block, run=run)
    out = numpy.zeros((*q.shape[:-2], length, v.shape[-1]))
    lse = numpy.full(q.shape[:-1], -math.inf)
    key_ok = numpy.ones(key_length, dtype=numpy.bool_) if key_ok is None else numpy.asarray(key_ok, dtype=numpy.bool_)
    extra = numpy.zeros(0, dtype=numpy.int64) if extra is None else numpy.asarray(extra, dtype=numpy.int64)
    kx, vx = k[..., extra, :], v[..., extra, :]
    for residue in range(dilation):
        rows = numpy.arange((residue - offset) % dilation, length, dilation, dtype=numpy.int64)
        if rows.size == 0:
            continue
        anchor = (rows + offset - residue) // dilation  # query's position among keys residue, residue + d, ...
        sub_out, sub_lse = _range(q[..., rows, :], k[..., residue::dilation, :], v[..., residue::dilation, :], kx, vx,
                                  anchor - left, anchor + right, key_ok[residue::dilation], scale, block, run)
        out[..., rows, :] = sub_out
        lse[..., rows] = sub_lse
    return out, lse
