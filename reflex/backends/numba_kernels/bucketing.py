"""Reformer LSH bucketing and chunked attention: the Numba twins of ``reflex.mechanisms.lsh``.

Four kernels, each tested against the array-API path (indices identical, outputs ≤ 1e-13):

1. :func:`hash_vectors` — angular LSH (Kitaev 2020, §2): for each round ``r`` the projections
   ``a = x·R[:, :, r, :]`` are accumulated over ``d = 0, 1, …, D−1`` in that order (the same order as
   the array-API path, so the float64 values — hence the buckets — are bitwise identical), and the
   bucket is ``argmax([a_f, −a_f])`` per factor ``f`` (first index on ties), combined as
   ``b = a0 + f0·a1 + f0·f1·a2 + …``.
2. :func:`counting_sort` — the stable sort of positions by bucket within each round: a counting sort
   (histogram, exclusive prefix sum, placement in position order), O(L + n_buckets).
3. :func:`chunk_windows` — for each chunk of the rounds-concatenated sorted order, the positions of
   the keys it sees: itself, ``before`` previous and ``after`` later chunks, wrapping around.
4. :func:`chunked_attention` — per round, each query attends its chunk window: keys equal to its own
   position and (causal) later positions are skipped; a query with nothing else sees itself with
   the constant score ``self_value`` (once per copy in its window). Max-shifted softmax; output and
   lse are written at the query's position, per round.

float64 arithmetic, ``cache=True``, no ``fastmath``; ``prange`` over (batch·head·round) or
(batch·head·chunk) tasks, which write disjoint outputs; each chunk's scores and weighted values are
two BLAS products over its gathered window, with BLAS held to one thread per task.
"""

from __future__ import annotations

import math

import numba
import numpy
import threadpoolctl

__all__ = ["hash_vectors", "counting_sort", "chunk_windows", "chunked_attention"]


@numba.njit(parallel=True, cache=True)
def _hash_kernel(x, rotations, factors, out):  # pragma: no cover - compiled
    batch, heads, length, dim = x.shape
    n_hashes = rotations.shape[2]
    half = rotations.shape[3]
    for task in numba.prange(batch * heads * n_hashes):
        b = task // (heads * n_hashes)
        h = (task // n_hashes) % heads
        r = task % n_hashes
        proj = numpy.empty(half)
        for i in range(length):
            for j in range(half):
                proj[j] = x[b, h, i, 0] * rotations[h, 0, r, j]
            for d in range(1, dim):
                xd = x[b, h, i, d]
                for j in range(half):
                    proj[j] = proj[j] + xd * rotations[h, d, r, j]
            bucket = 0
            product = 1
            offset = 0
            for f in range(factors.shape[0]):
                size = factors[f]
                half_f = size // 2
                best = 0
                best_value = proj[offset] if half_f > 0 else 0.0
                for c in range(1, size):
                    value = proj[offset + c] if c < half_f else -proj[offset + c - half_f]
                    if value > best_value:
                        best_value = value
                        best = c
                bucket += product * best
                product *= size
                offset += half_f
            out[b, h, r, i] = bucket


def hash_vectors(x: numpy.ndarray, rotations: numpy.ndarray, factors: tuple[int, ...]) -> numpy.ndarray:
    """Buckets ``(N, H, n_hashes, L)`` int64 of ``x (N, H, L, D)`` under ``rotations (H, D, n_hashes, R/2)``.

    ``factors`` are the bucket factors (even ints; ``(1,)`` puts everything in bucket 0).
    """
    batch, heads, length, _ = x.shape
    out = numpy.zeros((batch, heads, rotations.shape[2], length), dtype=numpy.int64)
    if factors == (1,) or length == 0:
        return out
    _hash_kernel(numpy.ascontiguousarray(x, dtype=numpy.float64), numpy.ascontiguousarray(rotations, dtype=numpy.float64),
                 numpy.asarray(factors, dtype=numpy.int64), out)
    return out


@numba.njit(parallel=True, cache=True)
def _sort_kernel(buckets, n_buckets, out):  # pragma: no cover - compiled
    rows, length = buckets.shape
    for row in numba.prange(rows):
        start = numpy.zeros(n_buckets + 1, dtype=numpy.int64)
        for i in range(length):
            start[buckets[row, i] + 1] += 1
        for b in range(n_buckets):
            start[b + 1] += start[b]
        for i in range(length):
            b = buckets[row, i]
            out[row, start[b]] = i
            start[b] += 1


def counting_sort(buckets: numpy.ndarray, n_buckets: int) -> numpy.ndarray:
    """Positions stably sorted by bucket along the last axis of ``buckets (..., L)`` (values in ``[0, n_buckets)``)."""
    flat = numpy.ascontiguousarray(buckets, dtype=numpy.int64).reshape(-1, buckets.shape[-1])
    out = numpy.empty_like(flat)
    _sort_kernel(flat, int(n_buckets), out)
    return out.reshape(buckets.shape)


@numba.njit(parallel=True, cache=True)
def _windows_kernel(order, chunk, before, after, out):  # pragma: no cover - compiled
    rows, total = order.shape
    n_chunks = total // chunk
    span = before + after + 1
    for task in numba.prange(rows * n_chunks):
        row = task // n_chunks
        t = task % n_chunks
        for w in range(span):
            c = (t + w - before) % n_chunks
            for s in range(chunk):
                out[row, t, w * chunk + s] = order[row, c * chunk + s]


def chunk_windows(order: numpy.ndarray, chunk: int, before: int, after: int) -> numpy.ndarray:
    """Key positions seen by each chunk: ``order (..., T)`` (T = rounds·L, sorted positions laid end to
    end) → ``(..., T/chunk, (before + 1 + after)·chunk)``, window chunks in order ``t−before … t+after``."""
    flat = numpy.ascontiguousarray(order, dtype=numpy.int64).reshape(-1, order.shape[-1])
    n_chunks = flat.shape[1] // chunk
    out = numpy.empty((flat.shape[0], n_chunks, (before + after + 1) * chunk), dtype=numpy.int64)
    _windows_kernel(flat, chunk, before, after, out)
    return out.reshape(*order.shape[:-1], n_chunks, out.shape[-1])


@numba.njit(parallel=True, cache=True)
def _attention_kernel(q, k, v, order, chunk, before, after, scale, causal, self_value, out, lse):  # pragma: no cover
    batch, heads, length, dim = q.shape
    value_dim = v.shape[3]
    total = order.shape[2]
    n_chunks = total // chunk
    span = (before + after + 1) * chunk
    for task in numba.prange(batch * heads * n_chunks):
        b = task // (heads * n_chunks)
        h = (task // n_chunks) % heads
        t = task % n_chunks
        keys = numpy.empty(span, dtype=numpy.int64)
        kbuf = numpy.empty((span, dim))
        vbuf = numpy.empty((span, value_dim))
        for w in range(before + after + 1):
            c = (t + w - before) % n_chunks
            for s in range(chunk):
                j = order[b, h, c * chunk + s]
                keys[w * chunk + s] = j
                kbuf[w * chunk + s] = k[b, h, j]
                vbuf[w * chunk + s] = v[b, h, j]
        qbuf = numpy.empty((chunk, dim))
        for s in range(chunk):
            qbuf[s] = q[b, h, order[b, h, t * chunk + s]] * scale
        scores = numpy.dot(qbuf, kbuf.T)  # (chunk, span): (scale·q)·k, as the gather kernel
        totals = numpy.zeros(chunk)  # 0 marks a row that sees only itself
        for row in range(chunk):
            u = t * chunk + row
            r = u // length
            i = order[b, h, u]
            m = -math.inf
            copies = 0
            for s in range(span):
                j = keys[s]
                if j == i:
                    copies += 1
                    scores[row, s] = -math.inf
                elif causal and j > i:
                    scores[row, s] = -math.inf
                elif scores[row, s] > m:
                    m = scores[row, s]
            if m == -math.inf:  # nothing but itself: v_i, lse = self_value + log(copies)
                out[b, h, r, i] = v[b, h, i]
                lse[b, h, r, i] = self_value + math.log(copies)
                scores[row, :] = 0.0
                continue
            total_weight = 0.0
            for s in range(span):
                weight = math.exp(scores[row, s] - m)  # exp(−∞) = 0 for skipped keys
                scores[row, s] = weight
                total_weight += weight
            totals[row] = total_weight
            lse[b, h, r, i] = m + math.log(total_weight)
        mixed = numpy.dot(scores, vbuf)  # (chunk, E) unnormalised
        for row in range(chunk):
            if totals[row] > 0.0:
                u = t * chunk + row
                out[b, h, u // length, order[b, h, u]] = mixed[row] / totals[row]


def chunked_attention(q: numpy.ndarray, k: numpy.ndarray, v: numpy.ndarray, order: numpy.ndarray, *, chunk: int,
                      before: int, after: int, scale: float, causal: bool,
                      self_value: float) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Per-round chunked LSH attention in position order.

    ``q, k (N, H, L, D)``, ``v (N, H, L, E)``, ``order (N, H, rounds·L)`` (sorted positions of every
    round laid end to end) → ``out (N, H, rounds, L, E)``, ``lse (N, H, rounds, L)``.
    """
    batch, heads, length, _ = q.shape
    rounds = order.shape[-1] // length
    out = numpy.empty((batch, heads, rounds, length, v.shape[-1]))
    lse = numpy.empty((batch, heads, rounds, length))
    # The per-chunk BLAS products run inside prange tasks: one BLAS thread each, or they oversubscribe.
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        _attention_kernel(numpy.ascontiguousarray(q, dtype=numpy.float64), numpy.ascontiguousarray(k, dtype=numpy.float64),
                          numpy.ascontiguousarray(v, dtype=numpy.float64),
                          numpy.ascontiguousarray(order, dtype=numpy.int64), int(chunk), int(before), int(after),
                          float(scale), bool(causal), float(self_value), out, lse)
    return out, lse
