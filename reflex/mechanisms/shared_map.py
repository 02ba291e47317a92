"""LazyFormer's shared attention map: reuse a given attention map, out = A_prev · V."""

from __future__ import annotations

import math
from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms._cases import dims
from reflex.mechanisms._kernels import resolve_dtype
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._numerics import inert_matmul
from reflex.mechanisms._options import typed_options

__all__ = ["shared_map_attention"]


@typed_options()
def shared_map_attention(weights: Any, v: Any, /, *, compute_dtype: Any = None) -> Any:
    """Shared attention map: multiply a previously computed attention map by this layer's values.

    .. math::

        O_h = A^{\\mathrm{prev}}_h\\, V_{g(h)}

    Shapes: ``weights`` A ``(..., H, L, S)`` (any map: usually a softmax map computed by an earlier
    layer, rows summing to 1, but nothing is renormalised or checked), ``v (..., G, S, E)`` with
    H % G == 0 (head h uses value head ``h // (H/G)``) → ``out (..., H, L, E)``. No queries or keys.
    Arithmetic in ``compute_dtype`` (float64 by default).

    Reference: Ying et al. 2021, "LazyFormer: Self Attention with Lazy Update", §3 (the attention
    map of the first layer of each block is reused by the following layers).
    """
    xp = namespace(weights, v)
    if weights.ndim < 3 or v.ndim != weights.ndim:
        raise ValueError(f"weights must be (..., H, L, S) and v (..., G, S, E) with the same axes; got "
                         f"{tuple(weights.shape)}, {tuple(v.shape)}")
    heads, length, key_length = (int(n) for n in weights.shape[-3:])
    kv_heads = int(v.shape[-3])
    if tuple(v.shape[:-3]) != tuple(weights.shape[:-3]) or int(v.shape[-2]) != key_length:
        raise ValueError(f"v must have shape (..., G, S, E) with (...) = {tuple(weights.shape[:-3])} and S = {key_length}; "
                         f"got {tuple(v.shape)}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"v has {kv_heads} heads; weights have {heads}, which is not a multiple")
    if device_of(v) != device_of(weights):
        raise ValueError(f"v is on device {device_of(v)}; weights are on {device_of(weights)}")
    dtype = resolve_dtype(xp, compute_dtype)
    a = xp.reshape(xp.astype(weights, dtype), (*weights.shape[:-3], kv_heads, heads // kv_heads, length, key_length))
    out = inert_matmul(xp, a, xp.expand_dims(xp.astype(v, dtype), axis=-3))
    return xp.reshape(out, (*weights.shape[:-3], heads, length, int(v.shape[-1])))


def _shared_map_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, compute_dtype: Any = None) -> dict:
    """VJP of :func:`shared_map_attention`: ``dA_h = dO_h V_{g(h)}ᵀ`` and ``dV_g = Σ_{h → g} A_hᵀ dO_h``."""
    weights, v = inputs["weights"], inputs["v"]
    xp = namespace(weights, v)
    dtype = resolve_dtype(xp, compute_dtype)
    heads, length, key_length = (int(n) for n in weights.shape[-3:])
    kv_heads, lead = int(v.shape[-3]), tuple(weights.shape[:-3])
    grouped = (*lead, kv_heads, heads // kv_heads)
    a = xp.reshape(xp.astype(weights, dtype), (*grouped, length, key_length))
    d_o = xp.reshape(xp.astype(d_out, dtype), (*grouped, length, int(v.shape[-1])))
    d_a = d_o @ xp.matrix_transpose(xp.expand_dims(xp.astype(v, dtype), axis=-3))
    return {"weights": xp.reshape(d_a, tuple(weights.shape)), "v": xp.sum(xp.matrix_transpose(a) @ d_o, axis=-3)}


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    logits = random.normal((2, d["H"], d["L"], d["S"]), seed=(seed, 0))
    weights = random.uniform((2, d["H"], d["L"], d["S"]), seed=(seed, 1))
    v = random.normal((2, d["G"], d["S"], d["E"]), seed=(seed, 2))
    exp = math.e ** (logits - logits.max(-1, keepdims=True))  # host arrays: a softmax map as input data
    softmax = exp / exp.sum(-1, keepdims=True)
    return [
        Case("softmax_map_gqa", {"weights": softmax, "v": v}, {}, positional=("weights", "v"), seed=seed),
        Case("any_map", {"weights": weights, "v": random.normal((2, d["H"], d["S"], d["E"]), seed=(seed, 2))}, {},
             positional=("weights", "v"), seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    weights = random.uniform((1, heads, seq, seq), seed=(seed, 0))
    return Case("example", {"weights": weights / weights.sum(-1, keepdims=True), "v": random.normal((1, heads, seq, dim), seed=(seed, 1))},
                {}, positional=("weights", "v"), seed=seed)


register(Mechanism(
    key="shared_map",
    function=shared_map_attention,
    family="G. prior",
    paper="Ying et al. 2021, LazyFormer: Self Attention with Lazy Update, §3",
    params={"weights": "A (..., H, L, S): the attention map to reuse", "v": "(..., G, S, E) values"},
    cases=_cases,
    example=_example,
    vjp=_shared_map_vjp,
))
