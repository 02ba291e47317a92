"""Differentiable callable terms of the positional mechanisms: each term's ``vjp`` equals central
differences of ``⟨d_value, term(rows, cols)⟩`` in every parameter, on every backend, on whole grids
and on tiles (the engine calls terms tile by tile)."""

from __future__ import annotations

import numpy
import pytest

from reflex import random
from reflex.backends import namespace
from reflex.mechanisms._numerics import unbroadcast
from reflex.mechanisms._relative import RelativeLogits, assemble_rows, row_block_name
from reflex.mechanisms.alibi import _AlibiTerm
from reflex.mechanisms.t5 import _TableTerm
from tests.helpers import FD_STEP

# (i0, l, j0, s): a whole 5 × 7 grid, an inner tile, a tile past the diagonal
TILES = [(0, 5, 0, 7), (1, 3, 2, 4), (3, 2, 0, 3)]


def _grids(backend, i0, l, j0, s):
    xp = backend.xp
    rows = xp.reshape(xp.arange(i0, i0 + l, dtype=xp.int64, device=backend.device), (l, 1))
    cols = xp.reshape(xp.arange(j0, j0 + s, dtype=xp.int64, device=backend.device), (1, s))
    return rows, cols


def _fd(make_term, params: dict, name: str, rows, cols, d_value, backend) -> numpy.ndarray:
    """Central differences of ⟨d_value, term⟩ in params[name] (host float64), one entry at a time."""
    x = params[name]
    grad = numpy.zeros(x.shape)
    for index in numpy.ndindex(*x.shape):
        h = FD_STEP * max(1.0, abs(float(x[index])))
        values = []
        for sign in (1.0, -1.0):
            y = x.copy()
            y[index] += sign * h
            term = make_term({**params, name: y})
            values.append(float(numpy.sum(backend.to_numpy(term(rows, cols)) * d_value)))
        grad[index] = (values[0] - values[1]) / (2 * h)
    return grad


def _close(got, want):
    scale = max(float(numpy.max(numpy.abs(want))), 1e-300)
    assert float(numpy.max(numpy.abs(got - want))) <= 1e-7 * scale + 1e-10, (got, want)


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("slopes_shape", [(4,), (2, 4), (1, 4)])
def test_alibi_term_vjp(backend, tile, symmetric, slopes_shape):
    host = {"slopes": random.uniform(slopes_shape, seed=(1, 0), low=0.1, high=1.0)}

    def make(params):
        return _AlibiTerm(backend.asarray(params["slopes"]), 2, symmetric)

    rows, cols = _grids(backend, *tile)
    value = make(host)(rows, cols)
    d_value = random.normal(tuple(value.shape), seed=(1, 1))
    got = make(host).vjp(rows, cols, backend.asarray(d_value))
    assert set(got) == {"slopes"} and tuple(got["slopes"].shape) == slopes_shape
    _close(backend.to_numpy(got["slopes"]), _fd(make, host, "slopes", rows, cols, d_value, backend))


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_table_term_vjp(backend, tile, bidirectional):
    host = {"table": random.normal((8, 3), seed=(2, 0))}

    def make(params):
        return _TableTerm(backend.asarray(params["table"]), -1, bidirectional, 8, 5)

    rows, cols = _grids(backend, *tile)
    d_value = random.normal((3, tile[1], tile[3]), seed=(2, 1))
    got = make(host).vjp(rows, cols, backend.asarray(d_value))
    assert set(got) == {"table"}
    _close(backend.to_numpy(got["table"]), _fd(make, host, "table", rows, cols, d_value, backend))
    # a (batch, H, l, s) cotangent is summed over the batch
    twice = make(host).vjp(rows, cols, backend.asarray(numpy.stack([d_value, d_value])))
    _close(backend.to_numpy(twice["table"]), 2 * backend.to_numpy(got["table"]))


def _clipped_embedding(backend, clip):
    """Shaw-style embeddings e(d) = table[c(d) + k] and their VJP (a one-hot scatter-add)."""

    def make(params):
        xp = backend.xp
        table = backend.asarray(params["table"])

        def index(d_min, d_max):
            d = xp.arange(d_min, d_max + 1, dtype=xp.int64, device=backend.device)
            return xp.clip(d, min=-clip, max=clip) + clip

        def embed(d_min, d_max):
            return xp.take(table, index(d_min, d_max), axis=-2)

        def embed_vjp(d_min, d_max, d_table):
            ids = xp.reshape(xp.arange(2 * clip + 1, dtype=xp.int64, device=backend.device), (1, -1))
            one_hot = xp.astype(xp.reshape(index(d_min, d_max), (-1, 1)) == ids, d_table.dtype)
            return {"table": unbroadcast(xp, xp.matrix_transpose(one_hot) @ d_table, tuple(table.shape))}

        return RelativeLogits(xp, backend.asarray(params["queries"]), embed, embed_vjp, offset=1)

    return make


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("table_shape", [(5, 4), (3, 5, 4)])
def test_relative_logits_term_vjp(backend, tile, table_shape):
    host = {"queries": random.normal((2, 3, 6, 4), seed=(3, 0)), "table": random.normal(table_shape, seed=(3, 1))}
    make = _clipped_embedding(backend, clip=2)
    i0, l, j0, s = tile
    rows, cols = _grids(backend, *tile)
    d_value = random.normal((2, 3, l, s), seed=(3, 2))
    got = make(host).vjp(rows, cols, backend.asarray(d_value))
    assert set(got) == {row_block_name(i0, i0 + l), "table"}
    _close(backend.to_numpy(got["table"]), _fd(make, host, "table", rows, cols, d_value, backend))
    d_queries = backend.to_numpy(assemble_rows(backend.xp, got, backend.asarray(host["queries"])))
    want = _fd(make, host, "queries", rows, cols, d_value, backend)
    _close(d_queries, want)
    assert not numpy.any(d_queries[..., :i0, :]) and not numpy.any(d_queries[..., i0 + l:, :])


def test_unbroadcast_reduces_broadcast_axes():
    xp = namespace(numpy.zeros(1))
    x = numpy.arange(24.0).reshape(2, 3, 4)
    assert numpy.array_equal(unbroadcast(xp, x, (3, 1)), x.sum(axis=(0, 2))[:, None])
    assert numpy.array_equal(unbroadcast(xp, x, (1, 3, 4)), x.sum(axis=0, keepdims=True))
    assert numpy.array_equal(unbroadcast(xp, x, (2, 3, 4)), x)
