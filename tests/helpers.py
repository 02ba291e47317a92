"""Small shared test utilities: host inputs, and the dense oracle on an explicit boolean pattern."""

from __future__ import annotations

import inspect
from typing import Any

import numpy

from reflex import random


def qkv_host(seed: int, *, batch: tuple[int, ...] = (2,), heads: int = 4, kv_heads: int = 2, length: int = 7,
             key_length: int = 9, dim: int = 5, value_dim: int = 3) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
    """Host float64 q (..., H, L, D), k (..., G, S, D), v (..., G, S, E) from ``seed``."""
    return (
        random.normal((*batch, heads, length, dim), seed=(seed, 0)),
        random.normal((*batch, kv_heads, key_length, dim), seed=(seed, 1)),
        random.normal((*batch, kv_heads, key_length, value_dim), seed=(seed, 2)),
    )


def max_abs(a: Any, b: Any) -> float:
    """max |a − b| over host arrays, treating equal infinities as equal."""
    a, b = numpy.asarray(a, dtype=numpy.float64), numpy.asarray(b, dtype=numpy.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    same = a == b
    with numpy.errstate(invalid="ignore"):
        diff = numpy.where(same, 0.0, numpy.abs(a - b))
    return float(numpy.max(diff)) if diff.size else 0.0


def softmax_map(q: numpy.ndarray, k: numpy.ndarray, causal: bool = False) -> numpy.ndarray:
    """Host softmax probabilities ``(..., H, L, S)`` of scale 1/√D scores, kv heads repeated (causal: top-left)."""
    k = numpy.repeat(k, q.shape[-3] // k.shape[-3], axis=-3)
    s = q @ numpy.swapaxes(k, -1, -2) / numpy.sqrt(q.shape[-1])
    if causal:
        s = numpy.where(numpy.tri(s.shape[-2], s.shape[-1], dtype=bool), s, -numpy.inf)
    e = numpy.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# Central differences: step h = FD_STEP·max(1, |x|) (≈ ε^(1/3), which balances the O(h²) truncation
# against the O(ε/h) rounding of float64), compared with relative error ≤ FD_RTOL of the gradient's
# largest entry.
FD_STEP = 6e-6
FD_RTOL = 1e-6


def _scalar_loss(key: str, inputs: dict, d_out: Any, d_lse: Any, d_state: Any, params: dict) -> float:
    """⟨d_out, out⟩ + ⟨d_lse, lse⟩ + ⟨d_state, state⟩ of one forward call on host float64 arrays."""
    import reflex

    m = reflex.get(key)
    extra = dict(params)
    if d_lse is not None:
        extra["return_lse"] = True
    if d_state is not None:
        extra["return_state"] = True
    signature = inspect.signature(m.function)  # positional-only parameters: q, k, v, or x, w_gate, ...
    positional = [name for name, prm in signature.parameters.items()
                  if prm.kind is inspect.Parameter.POSITIONAL_ONLY and name in inputs]
    kwargs = {name: x for name, x in inputs.items() if name not in positional}
    result = m.function(*(inputs[name] for name in positional), **kwargs, **extra)
    parts = list(result) if isinstance(result, tuple) else [result]
    total = float(numpy.sum(numpy.asarray(parts[0]) * d_out))
    rest = parts[1:]
    if d_lse is not None:
        lse = numpy.asarray(rest.pop(0))
        total += float(numpy.sum(numpy.where(numpy.isfinite(lse), lse, 0.0) * d_lse))
    if d_state is not None:
        total += float(numpy.sum(numpy.asarray(rest.pop(0)) * d_state))
    return total


def finite_difference_gradients(key: str, inputs: dict, d_out: Any, *, d_lse: Any = None, d_state: Any = None,
                                params: dict | None = None, names: Any = None, max_entries: int = 200,
                                seed: int = 0) -> dict:
    """Central-difference gradients of the VJP's scalar for the floating host inputs ``names``.

    At most ``max_entries`` entries of each array are probed (a fixed, seeded subset); the others
    are NaN in the result. Inputs are never modified (each probe perturbs a copy).
    """
    params = dict(params or {})
    names = [n for n in (names or inputs) if numpy.issubdtype(numpy.asarray(inputs[n]).dtype, numpy.floating)]
    rng = numpy.random.default_rng(seed)
    grads = {}
    for name in names:
        x = numpy.asarray(inputs[name], dtype=numpy.float64)
        g = numpy.full(x.shape, numpy.nan)
        flat = numpy.arange(x.size)
        if x.size > max_entries:
            flat = numpy.sort(rng.choice(x.size, size=max_entries, replace=False))
        for index in flat:
            pos = numpy.unravel_index(index, x.shape)
            h = FD_STEP * max(1.0, abs(float(x[pos])))
            values = []
            for sign in (1.0, -1.0):
                y = numpy.array(x, copy=True)
                y[pos] += sign * h
                values.append(_scalar_loss(key, {**inputs, name: y}, d_out, d_lse, d_state, params))
            g[pos] = (values[0] - values[1]) / (2 * h)
        grads[name] = g
    return grads


def assert_vjp_matches_finite_differences(key: str, inputs: dict, d_out: Any, *, d_lse: Any = None,
                                          d_state: Any = None, params: dict | None = None,
                                          rtol: float = FD_RTOL, **fd_options: Any) -> dict:
    """``reflex.vjp`` on host inputs equals central differences: max error ≤ ``rtol``·max|gradient| + 1e-10
    (the floor covers the O(ε/h) rounding of the differences when a gradient is tiny)."""
    import reflex

    params = dict(params or {})
    extra = {} if d_state is None else {"d_state": d_state}
    analytic = reflex.vjp(key, inputs, d_out, d_lse=d_lse, **extra, **params)
    numeric = finite_difference_gradients(key, inputs, d_out, d_lse=d_lse, d_state=d_state, params=params, **fd_options)
    for name, fd in numeric.items():
        got = numpy.asarray(analytic[name], dtype=numpy.float64)
        probed = ~numpy.isnan(fd)
        scale = max(float(numpy.max(numpy.abs(got))), 1e-300) if got.size else 1.0
        err = float(numpy.max(numpy.abs(got[probed] - fd[probed]))) if probed.any() else 0.0
        assert err <= rtol * scale + 1e-10, (
            f"{key}: d_{name} differs from central differences by {err:.3e} (gradient scale {scale:.3e})")
    return analytic
