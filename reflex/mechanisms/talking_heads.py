"""Talking-heads attention: learnt mixing across heads before and after the softmax."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims
from reflex.mechanisms._patterns import mask_and_causal
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._numerics import inert_matmul
from reflex.mechanisms._options import typed_options

__all__ = ["talking_heads_attention", "mix_heads"]


@typed_options()
def mix_heads(x: Any, mixing: Any, /) -> Any:
    """``y[..., m, i, j] = Σ_h x[..., h, i, j]·mixing[h, m]``: ``x (..., H, L, S)``, ``mixing (H, M)`` → ``(..., M, L, S)``."""
    xp = namespace(x, mixing)
    nb = x.ndim - 3
    moved = xp.permute_dims(x, (*range(nb), nb + 1, nb + 2, nb))  # (..., L, S, H)
    mixed = moved @ mixing
    return xp.permute_dims(mixed, (*range(nb), nb + 2, nb, nb + 1))


def _check_mixing(p: _kernels.Prepared, name: str, m: Any, rows: int) -> Any:
    xp = p.xp
    if namespace(m) is not xp or device_of(m) != p.device:
        raise TypeError(f"{name} must be an array of q's library on q's device")
    if m.ndim != 2 or int(m.shape[0]) != rows:
        raise ValueError(f"{name} must have shape ({rows}, ·); got {tuple(m.shape)}")
    return xp.astype(m, p.q.dtype)


@typed_options()
def talking_heads_attention(q: Any, k: Any, v: Any, /, *, p_logits: Any, p_weights: Any, mask: Any = None,
                            causal: bool | str = False, scale: float | None = None, compute_dtype: Any = None) -> Any:
    """Talking-heads attention: mix the H logit maps into M heads, softmax, mix the M weight maps into H_v heads.

    .. math::

        J_h = \\mathrm{scale}\\cdot Q_h K_{g(h)}^\\top,\\quad
        J'_m = \\sum_h J_h\\, (P_\\ell)_{hm},\\quad
        W_m = \\mathrm{softmax}(J'_m + \\log\\mathrm{mask}),\\quad
        W'_u = \\sum_m W_m\\, (P_w)_{mu},\\quad O_u = W'_u V_u

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)`` (H % G == 0, kv head ``h // (H/G)``),
    ``v (..., H_v, S, E)``, ``p_logits`` P_ℓ ``(H, M)``, ``p_weights`` P_w ``(M, H_v)`` →
    ``out (..., H_v, L, E)``. (The paper's h_k, h, h_v are H, M, H_v here.) The ``mask``
    (broadcastable to ``(..., M, L, S)``) and ``causal`` apply to the mixed logits, after P_ℓ and
    before the softmax, so masked logits never enter a mix; the softmax is the engine's (scale 0,
    the mixed logits as a bias), and a fully masked row gives weights 0. Identity mixing matrices
    give :func:`reflex.full_attention`.

    Reference: Shazeer, Lan, Cheng, Ding & Hou 2020, "Talking-Heads Attention", §4 (Algorithm /
    pseudo-code of TalkingHeadsAttention).
    """
    xp = namespace(q, k, v)
    p = _kernels.prepare(q, k, k, compute_dtype=compute_dtype)
    p_logits = _check_mixing(p, "p_logits", p_logits, p.heads)
    mid = int(p_logits.shape[1])
    p_weights = _check_mixing(p, "p_weights", p_weights, mid)
    value_heads = int(p_weights.shape[1])
    expected = (*p.batch, value_heads, p.key_length)
    if tuple(v.shape[:-1]) != expected or device_of(v) != p.device:
        raise ValueError(f"v must have shape (..., H_v, S, E) with (..., H_v, S) = {expected}; got {tuple(v.shape)}")
    logits = mix_heads(_kernels.scores(p, scale=_kernels.resolve_scale(scale, p.dim)), p_logits)
    # The mixed logits are the whole score: a score-free prepared problem with M heads carries them.
    blank = _kernels.prepare(xp.zeros((*p.batch, mid, p.length, 1), dtype=p.q.dtype, device=p.device),
                             xp.zeros((*p.batch, 1, p.key_length, 1), dtype=p.q.dtype, device=p.device),
                             xp.zeros((*p.batch, 1, p.key_length, 1), dtype=p.q.dtype, device=p.device),
                             compute_dtype=p.q.dtype)
    masks, _ = mask_and_causal(blank, mask, causal)
    weights = _kernels.weights(blank, scale=0.0, mask=masks, bias=logits)
    return inert_matmul(xp, mix_heads(weights, p_weights), xp.astype(v, p.q.dtype))


def _mixing_gradient(xp: Any, x: Any, d_y: Any) -> Any:
    """``d mixing[h, m] = Σ x[..., h, i, j]·d_y[..., m, i, j]`` for ``y = mix_heads(x, mixing)``."""
    h, m = int(x.shape[-3]), int(d_y.shape[-3])
    x_rows = xp.reshape(xp.matrix_transpose(xp.reshape(x, (-1, h, int(x.shape[-2]) * int(x.shape[-1])))), (-1, h))
    d_rows = xp.reshape(xp.matrix_transpose(xp.reshape(d_y, (-1, m, int(d_y.shape[-2]) * int(d_y.shape[-1])))), (-1, m))
    return xp.matrix_transpose(x_rows) @ d_rows


def _talking_heads_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, mask: Any = None, causal: bool | str = False,
                       scale: float | None = None, compute_dtype: Any = None) -> dict:
    """VJP of :func:`talking_heads_attention`: ``dq``, ``dk``, ``dv``, ``d p_logits``, ``d p_weights``.

    .. math::

        dW' = dO\,V^\top,\; dV = W'^\top dO,\; dW_m = \sum_u dW'_u (P_w)_{mu},\;
        d(P_w)_{mu} = \langle W_m, dW'_u\rangle,\; dJ'_m = W_m \circ (dW_m - \mathrm{rowsum}(W_m \circ dW_m)),

        dJ_h = \sum_m dJ'_m (P_\ell)_{hm},\; d(P_\ell)_{hm} = \langle J_h, dJ'_m\rangle,\;
        dQ_h = \mathrm{scale}\, dJ_h K_{g(h)},\; dK_g = \mathrm{scale} \sum_{h \to g} dJ_h^\top Q_h

    (⟨·,·⟩ summed over batch, L and S). Masked logits and fully masked rows carry no gradient.
    """
    from reflex.mechanisms import _grad

    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    xp = namespace(q, k, v)
    p = _kernels.prepare(q, k, k, compute_dtype=compute_dtype)
    p_logits = _check_mixing(p, "p_logits", inputs["p_logits"], p.heads)
    mid = int(p_logits.shape[1])
    p_weights = _check_mixing(p, "p_weights", inputs["p_weights"], mid)
    scale = _kernels.resolve_scale(scale, p.dim)
    logits_raw = _kernels.scores(p, scale=scale)
    blank = _kernels.prepare(xp.zeros((*p.batch, mid, p.length, 1), dtype=p.q.dtype, device=p.device),
                             xp.zeros((*p.batch, 1, p.key_length, 1), dtype=p.q.dtype, device=p.device),
                             xp.zeros((*p.batch, 1, p.key_length, 1), dtype=p.q.dtype, device=p.device),
                             compute_dtype=p.q.dtype)
    masks, _ = mask_and_causal(blank, mask, causal)
    weights = _kernels.weights(blank, scale=0.0, mask=masks, bias=mix_heads(logits_raw, p_logits))
    mixed = mix_heads(weights, p_weights)
    v64 = xp.astype(v, p.q.dtype)
    d_o = xp.astype(d_out, p.q.dtype)
    d_mixed = d_o @ xp.matrix_transpose(v64)
    d_v = xp.matrix_transpose(mixed) @ d_o
    d_weights = mix_heads(d_mixed, xp.matrix_transpose(p_weights))
    d_logits = _grad.softmax_vjp(xp, weights, d_weights)
    d_raw = _grad.group_queries(p, mix_heads(d_logits, xp.matrix_transpose(p_logits)))
    qg, kg = _grad.group_queries(p, p.q), xp.expand_dims(p.k, axis=-3)
    return {
        "q": _grad.ungroup(p, scale * (d_raw @ kg)),
        "k": scale * xp.sum(xp.matrix_transpose(d_raw) @ qg, axis=-3),
        "v": d_v,
        "p_logits": _mixing_gradient(xp, logits_raw, d_logits),
        "p_weights": _mixing_gradient(xp, weights, d_mixed),
    }


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    heads, mid, value_heads = d["H"], d["H"] + 2, d["H"] - 1
    base = {
        "q": random.normal((2, heads, d["L"], d["D"]), seed=(seed, 0)),
        "k": random.normal((2, d["G"], d["S"], d["D"]), seed=(seed, 1)),
        "v": random.normal((2, value_heads, d["S"], d["E"]), seed=(seed, 2)),
        "p_logits": random.normal((heads, mid), seed=(seed, 3)),
        "p_weights": random.normal((mid, value_heads), seed=(seed, 4)),
    }
    square = {**base, "v": random.normal((2, heads, d["S"], d["E"]), seed=(seed, 2)),
              "p_logits": random.normal((heads, heads), seed=(seed, 3)),
              "p_weights": random.normal((heads, heads), seed=(seed, 4))}
    return [
        Case("rectangular", base, {}, seed=seed),
        Case("square_causal", square, {"causal": "bottom_right"}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    inputs = {name: random.normal((1, heads, seq, dim), seed=(seed, i)) for i, name in enumerate("qkv")}
    inputs["p_logits"] = random.normal((heads, heads), seed=(seed, 3))
    inputs["p_weights"] = random.normal((heads, heads), seed=(seed, 4))
    return Case("example", inputs, {}, seed=seed)


register(Mechanism(
    key="talking_heads",
    function=talking_heads_attention,
    family="J. multi-head",
    paper="Shazeer et al. 2020, Talking-Heads Attention, §4",
    params={"p_logits": "P_l (H, M): pre-softmax head mixing", "p_weights": "P_w (M, H_v): post-softmax head mixing",
            "mask": "(..., M, L, S)-broadcastable, on the mixed logits", "causal": "as full"},
    cases=_cases,
    row_separable=True,
    example=_example,
    vjp=_talking_heads_vjp,
))
