"""Collaborative multi-head attention: shared query/key projections, per-head mixing vectors."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims
from reflex.mechanisms._patterns import mask_and_causal
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["collaborative_attention"]


@typed_options(engine_options="layout")  # no generic sinks: its output heads are mixtures, not q's heads
def collaborative_attention(q: Any, k: Any, v: Any, /, *, mixing: Any, mask: Any = None, causal: bool | str = False,
                            scale: float | None = None, return_lse: bool = False, compute_dtype: Any = None,
                            implementation: str = "auto") -> Any:
    """Collaborative heads: every head scores the shared queries and keys through its own mixing vector.

    .. math::

        O_h = \\mathrm{softmax}\\big(\\mathrm{scale}\\cdot \\tilde Q\\, \\mathrm{diag}(m_h)\\, \\tilde K^\\top
              + \\log\\mathrm{mask}\\big)\\, V_{g(h)}

    Shapes: shared ``q`` Q̃ ``(..., L, D̃)`` and ``k`` K̃ ``(..., S, D̃)`` (one projection for all
    heads, no head axis), ``v (..., G, S, E)``, ``mixing`` ``(H, D̃)`` (row h is m_h), with H % G == 0
    (head h uses value head ``h // (H/G)``) → ``out (..., H, L, E)``. Head h is the engine's softmax
    attention of ``Q̃ ⊙ m_h`` against K̃. ``scale`` defaults to 1/√D̃; to reproduce a standard
    multi-head layer re-expressed collaboratively (one-hot block mixing vectors, D̃ = H·d) pass
    ``scale=1/√d``. ``mask``/``causal`` as in :func:`reflex.full_attention`.

    Reference: Cordonnier, Loukas & Jaggi 2020, "Multi-Head Attention: Collaborate Instead of
    Concatenate", §3.1 (eq. 6).
    """
    xp = namespace(q, k, v, mixing)
    if q.ndim < 2 or k.ndim != q.ndim or v.ndim != q.ndim + 1:
        raise ValueError(f"q must be (..., L, D~), k (..., S, D~) and v (..., G, S, E); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if mixing.ndim != 2 or int(mixing.shape[1]) != int(q.shape[-1]):
        raise ValueError(f"mixing must have shape (H, {int(q.shape[-1])}) (one vector per head over D~); got {tuple(mixing.shape)}")
    if device_of(mixing) != device_of(q):
        raise ValueError(f"mixing is on device {device_of(mixing)}; q is on {device_of(q)}")
    dtype = _kernels.resolve_dtype(xp, compute_dtype)
    for name, a in (("q", q), ("k", k), ("mixing", mixing)):
        if not xp.isdtype(a.dtype, "real floating"):
            raise TypeError(f"{name} must have a real floating dtype; got {a.dtype}")
    # the product Q~ ⊙ m_h runs in the compute dtype, like every other score arithmetic
    heads_q = xp.expand_dims(xp.astype(q, dtype), axis=-3) * xp.astype(mixing, dtype)[:, None, :]  # (..., H, L, D~)
    kv_heads = int(v.shape[-3])
    shared_k = xp.broadcast_to(xp.expand_dims(k, axis=-3), (*k.shape[:-2], kv_heads, *k.shape[-2:]))
    p = _kernels.prepare(heads_q, shared_k, v, compute_dtype=compute_dtype)
    masks, tile_active = mask_and_causal(p, mask, causal)
    return _kernels.softmax_attention(p, scale=_kernels.resolve_scale(scale, p.dim), mask=masks,
                                      tile_active=tile_active, implementation=implementation, return_lse=return_lse)


def _collaborative_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, mask: Any = None, causal: bool | str = False,
                       scale: float | None = None, compute_dtype: Any = None, implementation: str = "auto") -> dict:
    """VJP of :func:`collaborative_attention`: ``dq``, ``dk``, ``dv`` and ``d mixing``.

    The engine's backward (dense, or tiled: FlashAttention-2 Alg. 2) on ``(Q̃ ⊙ m_h, K̃, V)`` gives
    ``dQ_h`` per head, ``dK`` per kv head and ``dV``; then ``dQ̃ = Σ_h dQ_h ⊙ m_h``,
    ``d m_h = Σ_{batch, L} dQ_h ⊙ Q̃`` and ``dK̃ = Σ_g dK_g`` (the shared keys serve every kv head).
    """
    from reflex.mechanisms import _grad

    q, k, v, mixing = inputs["q"], inputs["k"], inputs["v"], inputs["mixing"]
    xp = namespace(q, k, v, mixing)
    dtype = _kernels.resolve_dtype(xp, compute_dtype)
    q64, m64 = xp.astype(q, dtype), xp.astype(mixing, dtype)
    heads_q = xp.expand_dims(q64, axis=-3) * m64[:, None, :]
    kv_heads = int(v.shape[-3])
    shared_k = xp.broadcast_to(xp.expand_dims(k, axis=-3), (*k.shape[:-2], kv_heads, *k.shape[-2:]))
    p = _kernels.prepare(heads_q, shared_k, v, compute_dtype=compute_dtype)
    masks, tile_active = mask_and_causal(p, mask, causal)
    g = _grad.softmax_attention_vjp(p, d_out, d_lse, scale=_kernels.resolve_scale(scale, p.dim), mask=masks,
                                    tile_active=tile_active, implementation=implementation)
    d_mixing = g.dq * xp.expand_dims(q64, axis=-3)  # (..., H, L, D~)
    d_mixing = xp.sum(d_mixing, axis=-2)
    d_mixing = xp.sum(d_mixing, axis=tuple(range(d_mixing.ndim - 2))) if d_mixing.ndim > 2 else d_mixing
    return {"q": xp.sum(g.dq * m64[:, None, :], axis=-3), "k": xp.sum(g.dk, axis=-3), "v": g.dv, "mixing": d_mixing}


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    shared = 2 * d["D"]
    base = {
        "q": random.normal((2, d["L"], shared), seed=(seed, 0)),
        "k": random.normal((2, d["S"], shared), seed=(seed, 1)),
        "v": random.normal((2, d["G"], d["S"], d["E"]), seed=(seed, 2)),
        "mixing": random.normal((d["H"], shared), seed=(seed, 3)),
    }
    return [
        Case("gqa", base, {}, seed=seed),
        Case("causal", {**base, "v": random.normal((2, d["H"], d["S"], d["E"]), seed=(seed, 2))},
             {"causal": "bottom_right"}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    inputs = {"q": random.normal((1, seq, heads * dim), seed=(seed, 0)), "k": random.normal((1, seq, heads * dim), seed=(seed, 1)),
              "v": random.normal((1, heads, seq, dim), seed=(seed, 2)), "mixing": random.normal((heads, heads * dim), seed=(seed, 3))}
    return Case("example", inputs, {}, seed=seed)


register(Mechanism(
    key="collaborative",
    function=collaborative_attention,
    family="J. multi-head",
    paper="Cordonnier, Loukas & Jaggi 2020, Multi-Head Attention: Collaborate Instead of Concatenate, §3.1",
    params={"mixing": "(H, D~): per-head mixing vectors m_h", "mask": "as full", "causal": "as full",
            "scale": "default 1/sqrt(D~)"},
    cases=_cases,
    returns_lse=True,
    example=_example,
    vjp=_collaborative_vjp,
))
