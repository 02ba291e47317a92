"""Attention through a small set of m points: Set Transformer's ISAB and Luna's pack/unpack."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import example_qkv, standard
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options
from reflex.mechanisms._numerics import unbroadcast

__all__ = ["isab_attention", "luna_attention"]


def _pack(prep: _kernels.Prepared, name: str, points: Any, scale: float, implementation: str) -> tuple[Any, Any]:
    """Pack: the m points attend the keys; ``(A K, A V)`` with ``A = softmax(scale·P Kᵀ)``, per kv head."""
    xp = prep.xp
    if namespace(points) is not xp or device_of(points) != prep.device:
        raise TypeError(f"{name} must come from the same array library and device as q ({prep.device})")
    shape = tuple(int(n) for n in points.shape)
    target = (*prep.batch, prep.kv_heads)
    if len(shape) < 2 or shape[-1] != prep.dim or shape[-2] < 1:
        raise ValueError(f"{name} must have shape (..., m, D) with D = {prep.dim} and m >= 1; got {shape}")
    lead = shape[:-2]
    if len(lead) > len(target) or not all(a in (1, b) for a, b in zip(lead[::-1], target[::-1])):
        raise ValueError(f"{name} of shape {shape} does not broadcast to (..., G, m, D) with (..., G) = {target}")
    points = xp.broadcast_to(xp.astype(points, prep.q.dtype), (*target, shape[-2], prep.dim))
    # one softmax, two value sets: K and V side by side
    both = xp.concat([prep.k, prep.v], axis=-1)
    packed = _kernels.softmax_attention(_kernels.prepare(points, prep.k, both, compute_dtype=prep.q.dtype), scale=scale,
                                        implementation=implementation)
    return packed[..., :prep.dim], packed[..., prep.dim:]


def _unpack(prep: _kernels.Prepared, packed_k: Any, packed_v: Any, scale: float, implementation: str,
            return_lse: bool) -> Any:
    """Unpack: every query attends the m packed keys/values."""
    return _kernels.softmax_attention(_kernels.prepare(prep.q, packed_k, packed_v, compute_dtype=prep.q.dtype),
                                      scale=scale, implementation=implementation, return_lse=return_lse)


@typed_options()
def isab_attention(q: Any, k: Any, v: Any, /, *, inducing: Any, scale: float | None = None, return_lse: bool = False,
                   compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Induced set attention (Set Transformer ISAB): m inducing points attend the keys, the queries attend them.

    .. math::

        A = \\mathrm{softmax}(\\mathrm{scale}\\cdot I K^\\top),\\quad
        \\hat K = A K,\\; \\hat V = A V,\\qquad
        O = \\mathrm{softmax}(\\mathrm{scale}\\cdot Q \\hat K^\\top)\\, \\hat V

    (Lee et al. 2019, "Set Transformer", §3.2 eq. 9–10: ``H = MAB(I, X)``, ``ISAB(X) = MAB(X, H)``).
    This is the attention core without projections, layer norms and feed-forward: the induced set
    H carries both the keys and the values of the tokens (``H = A[K | V]``), so the second attention
    uses ``AK`` as keys and ``AV`` as values.

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``(..., H, L, E)``;
    ``inducing (m, D)`` (learned, shared by the batch) or broadcasting to ``(..., G, m, D)``.

    Args:
        inducing: the m inducing points, explicit.
        scale: default 1/√D, for both attentions. return_lse: also the lse of the second attention.
        implementation: engine kernel ``"auto" | "dense" | "tiled"`` for both softmaxes.
    """
    prep = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    s = _kernels.resolve_scale(scale, prep.dim)
    packed_k, packed_v = _pack(prep, "inducing", inducing, s, implementation)
    return _unpack(prep, packed_k, packed_v, s, implementation, return_lse)


@typed_options()
def luna_attention(q: Any, k: Any, v: Any, /, *, p: Any, scale: float | None = None, return_packed: bool = False,
                   compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Luna: pack the sequence into the m-row P by attention, then unpack by attending the packed rows.

    .. math::

        P' = \\mathrm{Attn}(P, X):\\quad A = \\mathrm{softmax}(\\mathrm{scale}\\cdot P K^\\top),\\;
        P'_K = A K,\\; P'_V = A V;\\qquad
        O = \\mathrm{Attn}(X, P') = \\mathrm{softmax}(\\mathrm{scale}\\cdot Q P_K'^\\top)\\, P'_V

    (Ma et al. 2021, "Luna: Linear Unified Nested Attention", §3.1 eq. 4–6: pack then unpack; the
    packed context ``P'`` is Luna's second output, fed to the next layer as its P). Without
    projections P' carries keys and values (``P' = A[K | V]``), as in :func:`isab_attention`; the
    difference is that Luna's P is a per-sequence input and P' is returned.

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``(..., H, L, E)``;
    ``p (..., G, m, D)`` (or broadcasting to it, e.g. ``(m, D)``).

    Args:
        p: the m packing queries (explicit; Luna's P, initialised as a learned sequence).
        scale: default 1/√D, for both attentions.
        return_packed: also return ``P'_K (..., G, m, D)`` and ``P'_V (..., G, m, E)``.
        implementation: engine kernel ``"auto" | "dense" | "tiled"`` for both softmaxes.

    Only the bidirectional form is implemented (Luna's causal variant uses a different pack).
    """
    prep = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    s = _kernels.resolve_scale(scale, prep.dim)
    packed_k, packed_v = _pack(prep, "p", p, s, implementation)
    out = _unpack(prep, packed_k, packed_v, s, implementation, False)
    return (out, packed_k, packed_v) if return_packed else out


def _pack_unpack_vjp(inputs: dict, name: str, d_out: Any, d_lse: Any, *, scale: float | None, compute_dtype: Any,
                     implementation: str, d_packed_k: Any = None, d_packed_v: Any = None) -> dict:
    """The shared VJP of pack-then-unpack (ISAB, Luna): ``dq``, ``dk``, ``dv`` and ``d points``.

    The engine's backward (dense, or tiled: FlashAttention-2 Alg. 2) of the unpack on ``(Q, K̂, V̂)``
    gives ``dQ``, ``dK̂``, ``dV̂`` (plus the cotangents of a returned ``P'``); that of the pack on
    ``(P, K, [K | V])`` with ``d[K̂ | V̂]`` gives ``dP``, ``dK`` (through the scores) and ``d[K | V]``,
    whose halves add to ``dK`` and give ``dV``. ``dP`` is summed over the axes P was broadcast along.
    """
    from reflex.mechanisms import _grad

    prep = _kernels.prepare(inputs["q"], inputs["k"], inputs["v"], compute_dtype=compute_dtype)
    xp = prep.xp
    s = _kernels.resolve_scale(scale, prep.dim)
    points = inputs[name]
    packed_k, packed_v = _pack(prep, name, points, s, implementation)
    unpack = _grad.softmax_attention_vjp(_kernels.prepare(prep.q, packed_k, packed_v, compute_dtype=prep.q.dtype),
                                         d_out, d_lse, scale=s, implementation=implementation)
    d_k_hat, d_v_hat = unpack.dk, unpack.dv
    if d_packed_k is not None:
        d_k_hat = d_k_hat + xp.astype(d_packed_k, prep.q.dtype)
    if d_packed_v is not None:
        d_v_hat = d_v_hat + xp.astype(d_packed_v, prep.q.dtype)
    target = (*prep.batch, prep.kv_heads, int(points.shape[-2]), prep.dim)
    wide = xp.broadcast_to(xp.astype(points, prep.q.dtype), target)
    both = xp.concat([prep.k, prep.v], axis=-1)
    pack = _grad.softmax_attention_vjp(_kernels.prepare(wide, prep.k, both, compute_dtype=prep.q.dtype),
                                       xp.concat([d_k_hat, d_v_hat], axis=-1), scale=s, implementation=implementation)
    return {"q": unpack.dq, "k": pack.dk + pack.dv[..., :prep.dim], "v": pack.dv[..., prep.dim:],
            name: unbroadcast(xp, pack.dq, tuple(points.shape))}


def _isab_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, scale: float | None = None, compute_dtype: Any = None,
              implementation: str = "auto") -> dict:
    """VJP of :func:`isab_attention`: ``dq``, ``dk``, ``dv``, ``d inducing`` (see :func:`_pack_unpack_vjp`)."""
    return _pack_unpack_vjp(inputs, "inducing", d_out, d_lse, scale=scale, compute_dtype=compute_dtype,
                            implementation=implementation)


def _luna_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, scale: float | None = None, return_packed: bool = False,
              d_packed_k: Any = None, d_packed_v: Any = None, compute_dtype: Any = None,
              implementation: str = "auto") -> dict:
    """VJP of :func:`luna_attention`: ``dq``, ``dk``, ``dv``, ``dp`` (see :func:`_pack_unpack_vjp`).

    ``d_packed_k`` ``(..., G, m, D)`` and ``d_packed_v`` ``(..., G, m, E)`` (optional) are the cotangents
    of the returned ``P'`` (``return_packed=True``), which the next Luna layer reads as its P.
    """
    return _pack_unpack_vjp(inputs, "p", d_out, d_lse, scale=scale, compute_dtype=compute_dtype,
                            implementation=implementation, d_packed_k=d_packed_k, d_packed_v=d_packed_v)


def _cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    m = max(1, d["L"] // 2)
    inducing = random.normal((m, d["D"]), seed=(seed, 5))
    per_head = random.normal((d["G"], m, d["D"]), seed=(seed, 6))
    return [
        Case("shared", {**gqa, "inducing": inducing}, {}, seed=seed),
        Case("per_head_tiled", {**gqa, "inducing": per_head}, {"implementation": "tiled"}, seed=seed),
    ]


def _luna_cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    m = max(1, d["L"] // 2)
    return [
        Case("per_sequence", {**gqa, "p": random.normal((2, d["G"], m, d["D"]), seed=(seed, 5))}, {}, seed=seed),
        Case("shared", {**gqa, "p": random.normal((m, d["D"]), seed=(seed, 6))}, {}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    points = random.normal((min(32, seq), dim), seed=(seed, 5))
    return Case("example", {**example_qkv(seq, heads, dim, seed), "inducing": points}, {}, seed=seed)


def _luna_example(seq: int, heads: int, dim: int, seed: int) -> Case:
    packing = random.normal((1, heads, min(32, seq), dim), seed=(seed, 5))
    return Case("example", {**example_qkv(seq, heads, dim, seed), "p": packing}, {}, seed=seed)


register(Mechanism(
    key="isab",
    function=isab_attention,
    family="E. compressed memory",
    paper="Lee et al. 2019, 'Set Transformer', §3.2 (ISAB)",
    params={
        "inducing": "(m, D) or (..., G, m, D) inducing points, explicit",
        "scale": "score scale of both attentions, default 1/sqrt(D)",
        "return_lse": "also the lse of the second attention",
    },
    cases=_cases,
    returns_lse=True,
    row_separable=True,
    example=_example,
    vjp=_isab_vjp,
))

register(Mechanism(
    key="luna",
    function=luna_attention,
    family="E. compressed memory",
    paper="Ma et al. 2021, 'Luna: Linear Unified Nested Attention', §3.1",
    params={
        "p": "(..., G, m, D) packing queries (Luna's P), explicit",
        "scale": "score scale of both attentions, default 1/sqrt(D)",
        "return_packed": "also return the packed keys and values P'",
    },
    cases=_luna_cases,
    row_separable=True,
    example=_luna_example,
    vjp=_luna_vjp,
))
