"""Routed mixture of attention pathways: per-token gates softmax(x W_r) weight registered mechanisms."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from reflex import random
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import example_qkv, standard
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options
from reflex.mechanisms._numerics import unbroadcast

__all__ = ["routed_mixture_attention", "routing_gates"]


@typed_options()
def routing_gates(x: Any, w_r: Any, /, *, compute_dtype: Any = None) -> Any:
    """Gates ``softmax(x W_r)`` over pathways: ``x (..., L, N)``, ``w_r (N, P)`` → ``(..., L, P)``.

    Max-shifted softmax over the last axis, in the compute dtype (float64 by default).
    """
    xp = namespace(x, w_r)
    if x.ndim < 2 or w_r.ndim != 2 or int(w_r.shape[0]) != int(x.shape[-1]):
        raise ValueError(f"x must be (..., L, N) and w_r (N, P) with the same N; got x {tuple(x.shape)}, w_r {tuple(w_r.shape)}")
    dtype = _kernels.resolve_dtype(xp, compute_dtype)
    logits = xp.astype(x, dtype) @ xp.astype(w_r, dtype)
    weights = xp.exp(logits - xp.max(logits, axis=-1, keepdims=True))
    return weights / xp.sum(weights, axis=-1, keepdims=True)


def _pathway(spec: Any) -> tuple[Any, dict[str, Any]]:
    from reflex.registry import get

    if not isinstance(spec, Mapping) or "mechanism" not in spec:
        raise ValueError(f"each pathway must be a mapping {{'mechanism': key, **params}}; got {spec!r}")
    params = {name: value for name, value in spec.items() if name != "mechanism"}
    return get(spec["mechanism"]).function, params


@typed_options()
def routed_mixture_attention(q: Any, k: Any, v: Any, /, *, pathways: Sequence[Mapping[str, Any]], x: Any = None,
                             w_r: Any = None, gates: Any = None, compute_dtype: Any = None) -> Any:
    """Routed mixture: out = Σ_p g_p · Attn_p(q, k, v), gates g = softmax(x W_r) per token (or given).

    .. math::

        O_{i} = \\sum_{p=1}^{P} g_{ip}\\, \\mathrm{Attn}_p(Q, K, V)_i, \\qquad
        g_{i} = \\mathrm{softmax}(x_i W_r)

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)``; ``x (..., L, N)`` and
    ``w_r (N, P)``, or ``gates`` broadcastable to ``(..., H, L, P)``; every pathway must return
    ``(..., H, L, E)`` → ``(..., H, L, E)``.

    Args:
        pathways: P mappings ``{"mechanism": key, **params}`` naming registered mechanisms that
            take ``(q, k, v)`` (e.g. ``{"mechanism": "sliding_window", "window": [2, 0]}``).
        x, w_r: router inputs and weights; gates are the same for every head of a token.
        gates: explicit gates instead of ``x``/``w_r`` (e.g. one-hot to select a pathway).
        compute_dtype: passed to every pathway and used for the gates and the sum.

    Every pathway is evaluated (a zero gate still costs its pathway), so with a one-hot gate the
    output is exactly the selected pathway's (adding 0·finite changes nothing).

    Reference: catalogue seed "attention with routing" (a mixture of attention pathways gated per
    token, as mixture-of-experts routing, Shazeer et al. 2017 §2.1, applied to attention types).
    """
    if not isinstance(pathways, (list, tuple)) or not pathways:
        raise ValueError(f"pathways must be a non-empty list of {{'mechanism': key, ...}}; got {pathways!r}")
    functions = [_pathway(spec) for spec in pathways]
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp = p.xp
    count = len(functions)
    if gates is None:
        if x is None or w_r is None:
            raise ValueError("pass either gates, or x and w_r")
        if int(w_r.shape[-1]) != count:
            raise ValueError(f"w_r has {int(w_r.shape[-1])} columns; there are {count} pathways")
        gates = xp.expand_dims(routing_gates(x, w_r, compute_dtype=p.q.dtype), axis=-3)  # (..., 1, L, P)
    else:
        if x is not None or w_r is not None:
            raise ValueError("pass either gates, or x and w_r, not both")
        if namespace(gates) is not xp:
            raise TypeError("gates come from a different array library than q")
        gates = xp.astype(gates, p.q.dtype)
    target = (*p.batch, p.heads, p.length, count)
    shape = tuple(int(n) for n in gates.shape)
    if len(shape) > len(target) or any(a not in (1, b) for a, b in zip(shape[::-1], target[::-1])) or shape[-1] != count:
        raise ValueError(f"gates of shape {shape} do not broadcast to (..., H, L, P) = {target}")
    out = None
    for index, (function, params) in enumerate(functions):
        result = function(p.q, p.k, p.v, **params, compute_dtype=p.q.dtype)
        result = result[0] if isinstance(result, tuple) else result  # (out, extras...) → out
        term = gates[..., index:index + 1] * result
        out = term if out is None else out + term
    return out

def _vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, pathways: Sequence[Mapping[str, Any]],
         compute_dtype: Any = None) -> dict:
    """VJP of :func:`routed_mixture_attention`: ``O = Σ_p g_p ∘ A_p(q, k, v)``.

    ``dq, dk, dv = Σ_p VJP_p(g_p ∘ dO)`` (each pathway through its own ``reflex.vjp``; a pathway
    without one raises ``NotImplementedError`` naming it); ``dg_p = Σ_e dO ∘ A_p`` summed over the
    axes the gates broadcast along; router gates ``g = softmax(Z)``, ``Z = x W_r``:
    ``dZ = g ∘ (dg − Σ_p g_p dg_p)``, ``dx = dZ W_rᵀ``, ``dW_r = Σ xᵀ dZ``.
    """
    from reflex.gradients import vjp as reflex_vjp

    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    functions = [_pathway(spec) for spec in pathways]
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp, dtype = p.xp, p.q.dtype
    router = inputs.get("gates") is None
    if router:
        gates = xp.expand_dims(routing_gates(inputs["x"], inputs["w_r"], compute_dtype=dtype), axis=-3)
    else:
        gates = xp.astype(inputs["gates"], dtype)
    d_out = xp.astype(d_out, dtype)
    grads = {n: xp.zeros(inputs[n].shape, dtype=dtype, device=p.device) for n in ("q", "k", "v")}
    d_gates = []
    for index, (spec, (function, params)) in enumerate(zip(pathways, functions)):
        gate = gates[..., index:index + 1]
        result = function(p.q, p.k, p.v, **params, compute_dtype=dtype)
        result = result[0] if isinstance(result, tuple) else result
        g = reflex_vjp(spec["mechanism"], {"q": p.q, "k": p.k, "v": p.v}, gate * d_out, **params, compute_dtype=dtype)
        grads = {n: grads[n] + g[n] for n in ("q", "k", "v")}
        d_gates.append(xp.sum(d_out * result, axis=-1, keepdims=True))
    d_gate = xp.concat(d_gates, axis=-1)  # (..., H, L, P)
    if router:
        d_gate = xp.sum(d_gate, axis=-3)  # the gates are shared by the heads of a token
        weights = gates[..., 0, :, :]
        d_logits = weights * (d_gate - xp.sum(weights * d_gate, axis=-1, keepdims=True))
        x, w_r = xp.astype(inputs["x"], dtype), xp.astype(inputs["w_r"], dtype)
        d_logits = unbroadcast(xp, d_logits, (*x.shape[:-1], int(w_r.shape[-1])))
        grads["x"] = d_logits @ xp.matrix_transpose(w_r)
        grads["w_r"] = xp.matrix_transpose(xp.reshape(x, (-1, int(x.shape[-1])))) @ xp.reshape(d_logits, (-1, int(w_r.shape[-1])))
    else:
        grads["gates"] = unbroadcast(xp, d_gate, tuple(int(n) for n in inputs["gates"].shape))
    return grads


def _cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    pathways = [{"mechanism": "full"}, {"mechanism": "full", "causal": "bottom_right"}, {"mechanism": "alibi"}]
    router = {"x": random.normal((2, d["L"], 5), seed=(seed, 5)), "w_r": random.normal((5, 3), seed=(seed, 6))}
    one_hot = (random.integers((2, 1, d["L"]), seed=(seed, 7), low=0, high=3)[..., None] == (0, 1, 2)) * 1.0
    return [
        Case("router", {**gqa, **router}, {"pathways": pathways}, seed=seed),
        Case("one_hot", {**gqa, "gates": one_hot}, {"pathways": pathways}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    """Three causal pathways (full, block-local with look-back, ALiBi) gated by a router on x (1, L, D)."""
    pathways = [{"mechanism": "full", "causal": True},
                {"mechanism": "block_local", "block_size": min(64, seq), "look_back": 1, "causal": True},
                {"mechanism": "alibi", "causal": True}]
    inputs = {**example_qkv(seq, heads, dim, seed),
              "x": random.normal((1, seq, dim), seed=(seed, 3)),
              "w_r": random.normal((dim, len(pathways)), seed=(seed, 4), std=dim ** -0.5)}
    return Case("example", inputs, {"pathways": pathways}, seed=seed)


register(Mechanism(
    key="routed_mixture",
    function=routed_mixture_attention,
    family="I. memory, recurrence, hierarchy, routing",
    paper="catalogue seed 'attention with routing'; Shazeer et al. 2017 §2.1 (softmax gating)",
    params={
        "pathways": "list of {'mechanism': key, **params} registered mechanisms",
        "x": "(..., L, N) router inputs",
        "w_r": "(N, P) router weights: gates = softmax(x w_r)",
        "gates": "explicit (..., H, L, P)-broadcastable gates instead of x, w_r",
    },
    cases=_cases,
    example=_example,
    vjp=_vjp,
))
