"""The state-recurrent scan of catalogue section K, token by token: the Numba twin of
``reflex.mechanisms._recurrent.recurrent``.

Per key/value head, a state ``S (D, E)`` and one step per token, in this order:

.. math::

    o_t = \\tau S^\\top q_t + \\tau (q_t\\cdot(u\\circ k_t)) v_t \\ \\text{(read before the write only)};\\quad
    x = S^\\top a_t;\\quad S \\leftarrow e^{g_t}\\circ S;\\quad S \\leftarrow S + b_t x^\\top;\\quad
    u_t = \\beta_t(v_t - S^\\top k_t)\\ \\text{or}\\ v_t;\\quad S \\leftarrow S + k_t u_t^\\top;\\quad
    o_t = \\tau S^\\top q_t \\ \\text{(read after the write, the default)}

with ``g_t`` one log multiplier per head or per key dimension (row of S). Every one of the R = H/G
query heads of a kv head reads its state. Work is split over (batch, kv head) pairs (``prange``);
memory is the state, O(D·E) per task. float64, ``cache=True``, no ``fastmath``.
"""

from __future__ import annotations

import math

import numba
import numpy

__all__ = ["recurrent_scan"]


@numba.njit(cache=True)
def _read(q, s, scale, out):  # pragma: no cover - compiled
    """out[e] = scale · Σ_d q[d] s[d, e], accumulated row by row of S (contiguous, vectorisable over e)."""
    value_dim = out.shape[0]
    for e in range(value_dim):
        out[e] = 0.0
    for d in range(q.shape[0]):
        qd = q[d]
        for e in range(value_dim):
            out[e] += qd * s[d, e]
    for e in range(value_dim):
        out[e] = scale * out[e]


@numba.njit(parallel=True, cache=True)
def _scan_kernel(q, k, v, decay, beta, a, b, bonus, state, scale, flags, out):  # pragma: no cover - compiled
    n_batch, kv_heads, group, length, dim = q.shape
    value_dim = v.shape[3]
    decay_dim = decay.shape[3]
    use_decay, use_beta, use_ab, read_before, use_bonus = flags[0], flags[1], flags[2], flags[3], flags[4]
    for task in numba.prange(n_batch * kv_heads):
        n = task // kv_heads
        g = task % kv_heads
        s = state[n, g]
        x = numpy.zeros(value_dim)
        u = numpy.zeros(value_dim)
        for t in range(length):
            if read_before:
                for r in range(group):
                    _read(q[n, g, r, t], s, scale, out[n, g, r, t])
                    if use_bonus:
                        bonus_weight = 0.0
                        for d in range(dim):
                            bonus_weight += q[n, g, r, t, d] * (bonus[n, g, d] * k[n, g, t, d])
                        for e in range(value_dim):
                            out[n, g, r, t, e] += scale * bonus_weight * v[n, g, t, e]
            if use_ab:
                _read(a[n, g, t], s, 1.0, x)  # x = aᵀ S_{t−1}
            if use_decay:
                for d in range(dim):
                    factor = math.exp(decay[n, g, t, d if decay_dim > 1 else 0])
                    for e in range(value_dim):
                        s[d, e] = factor * s[d, e]
            if use_ab:
                for d in range(dim):
                    bd = b[n, g, t, d]
                    for e in range(value_dim):
                        s[d, e] = s[d, e] + bd * x[e]
            if use_beta:
                _read(k[n, g, t], s, 1.0, u)  # Sᵀ k_t with the decayed S
                for e in range(value_dim):
                    u[e] = beta[n, g, t] * (v[n, g, t, e] - u[e])
            else:
                for e in range(value_dim):
                    u[e] = v[n, g, t, e]
            for d in range(dim):
                kd = k[n, g, t, d]
                for e in range(value_dim):
                    s[d, e] = s[d, e] + kd * u[e]
            if not read_before:
                for r in range(group):
                    _read(q[n, g, r, t], s, scale, out[n, g, r, t])


def recurrent_scan(q, k, v, *, decay=None, beta=None, a=None, b=None, bonus=None, read_before=False, state,
                   scale):
    """``(out (..., G, R, T, E), state (..., G, 1, D, E))`` for the grouped-layout float64 arrays of
    :class:`reflex.mechanisms._recurrent.Terms` (``k (..., G, 1, T, D)`` and so on). Inputs are not
    modified."""
    lead = q.shape[:-4]
    kv_heads, group, length, dim = q.shape[-4:]
    value_dim = v.shape[-1]
    n = int(numpy.prod(lead, dtype=numpy.int64)) if lead else 1

    def flat(x, last):
        return numpy.ascontiguousarray(numpy.reshape(x, (n, kv_heads, length, last)), dtype=numpy.float64)

    dummy = numpy.zeros((n, kv_heads, length, 1))
    args = (
        numpy.ascontiguousarray(numpy.reshape(q, (n, kv_heads, group, length, dim)), dtype=numpy.float64),
        flat(k, dim), flat(v, value_dim),
        flat(decay, decay.shape[-1]) if decay is not None else dummy,
        flat(beta, 1)[..., 0] if beta is not None else dummy[..., 0],
        flat(a, dim) if a is not None else dummy, flat(b, dim) if b is not None else dummy,
        numpy.ascontiguousarray(numpy.reshape(numpy.broadcast_to(bonus, (*lead, kv_heads, 1, 1, dim)),
                                              (n, kv_heads, dim)), dtype=numpy.float64)
        if bonus is not None else numpy.zeros((n, kv_heads, 1)),
    )
    s = numpy.array(numpy.reshape(state, (n, kv_heads, dim, value_dim)), dtype=numpy.float64, copy=True)
    flags = numpy.array([decay is not None, beta is not None, a is not None, bool(read_before), bonus is not None],
                        dtype=numpy.bool_)
    out = numpy.zeros((n, kv_heads, group, length, value_dim))
    _scan_kernel(*args, s, float(scale), flags, out)
    return (numpy.reshape(out, (*lead, kv_heads, group, length, value_dim)),
            numpy.reshape(s, (*lead, kv_heads, 1, dim, value_dim)))
