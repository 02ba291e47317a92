"""DeepSeek sparse attention: a lightning indexer scores keys, each query attends its top-k."""

from __future__ import annotations

import math
from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import standard
from reflex.mechanisms._patterns import causal_offset, index_counts, parse_causal, top_indices
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["indexer_topk_attention", "indexer_scores", "indexer_topk_indices"]

IMPLEMENTATIONS = ("auto", "gather", "dense")


def _checked(xp: Any, dtype: Any, dev: Any, name: str, x: Any, shape: tuple[int, ...], legend: str) -> Any:
    if tuple(int(n) for n in x.shape) != shape:
        raise ValueError(f"{name} must have shape {legend} = {shape}; got {tuple(x.shape)}")
    return _kernels.check_array(xp, dev, dtype, name, x)


def _scores(xp: Any, iq: Any, ik: Any, iw: Any, rows: slice) -> Any:
    """I(t, s) = Σ_j w_tj·ReLU(q_tj·k_s) for query rows ``rows``: ``(..., l, S)``."""
    dots = iq[..., rows, :] @ xp.expand_dims(xp.matrix_transpose(ik), axis=-3)  # (..., J, l, S)
    return xp.sum(xp.expand_dims(iw[..., rows], axis=-1) * xp.maximum(dots, 0.0), axis=-3)


@typed_options()
def indexer_scores(index_q: Any, index_k: Any, index_w: Any, /, *, compute_dtype: Any = None) -> Any:
    """The lightning indexer's scores ``I (..., L, S)``: ``I(t, s) = Σ_j w_tj·ReLU(qᴵ_tj·kᴵ_s)``.

    ``index_q (..., J, L, Dᴵ)``, ``index_k (..., S, Dᴵ)``, ``index_w (..., J, L)`` (J indexer heads).
    """
    xp = namespace(index_q, index_k, index_w)
    dtype = _kernels.resolve_dtype(xp, compute_dtype)
    iq, ik, iw = _indexer_inputs(xp, dtype, device_of(index_q), index_q, index_k, index_w)
    return _scores(xp, iq, ik, iw, slice(0, int(iq.shape[-2])))


def _indexer_inputs(xp: Any, dtype: Any, dev: Any, index_q: Any, index_k: Any, index_w: Any) -> tuple[Any, Any, Any]:
    if index_q.ndim < 3:
        raise ValueError(f"index_q must have shape (..., J, L, Dᴵ); got {tuple(index_q.shape)}")
    *batch, J, L, DI = (int(n) for n in index_q.shape)
    iq = _checked(xp, dtype, dev, "index_q", index_q, tuple(index_q.shape), "(..., J, L, Dᴵ)")
    if index_k.ndim != len(batch) + 2:
        raise ValueError(f"index_k must have shape (..., S, Dᴵ) with batch {tuple(batch)}; got {tuple(index_k.shape)}")
    ik = _checked(xp, dtype, dev, "index_k", index_k, (*batch, int(index_k.shape[-2]), DI), "(..., S, Dᴵ)")
    iw = _checked(xp, dtype, dev, "index_w", index_w, (*batch, J, L), "(..., J, L)")
    return iq, ik, iw


def _indices(p: _kernels.Prepared, iq: Any, ik: Any, iw: Any, top_k: int, alignment: str | None,
             block_q: int = 1024) -> Any:
    xp = p.xp
    if int(ik.shape[-2]) != p.key_length or int(iq.shape[-2]) != p.length or tuple(iq.shape[:-3]) != p.batch:
        raise ValueError(f"index_q (..., J, L, Dᴵ) and index_k (..., S, Dᴵ) must match q's batch {p.batch}, "
                         f"L = {p.length} and S = {p.key_length}; got {tuple(iq.shape)} and {tuple(ik.shape)}")
    blocks = []
    for i0 in range(0, p.length, block_q):
        i1 = min(i0 + block_q, p.length)
        s = _scores(xp, iq, ik, iw, slice(i0, i1))
        if alignment is not None:
            offset = causal_offset(alignment, p.length, p.key_length)
            r = xp.reshape(xp.arange(i0, i1, dtype=xp.int64, device=p.device), (i1 - i0, 1))
            c = xp.reshape(xp.arange(p.key_length, dtype=xp.int64, device=p.device), (1, p.key_length))
            s = xp.where(c <= r + offset, s, -math.inf)
        blocks.append(top_indices(xp, s, top_k))
    idx = blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=-2)
    return xp.expand_dims(idx, axis=-3)  # (..., 1, L, K): shared by every head


def _top_k(top_k: Any) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1; got {top_k!r}")
    return top_k


@typed_options()
def indexer_topk_indices(q: Any, k: Any, index_q: Any, index_k: Any, index_w: Any, /, *, top_k: int,
                         causal: bool | str = False, compute_dtype: Any = None) -> Any:
    """Selected keys ``(..., 1, L, min(top_k, S))`` int64 (shared by all heads), best first, −1 = padding."""
    p = _kernels.prepare(q, k, k, compute_dtype=compute_dtype)
    iq, ik, iw = _indexer_inputs(p.xp, p.q.dtype, p.device, index_q, index_k, index_w)
    return _indices(p, iq, ik, iw, _top_k(top_k), parse_causal(causal))


@typed_options()
def indexer_topk_attention(q: Any, k: Any, v: Any, index_q: Any, index_k: Any, index_w: Any, /, *, top_k: int,
                           causal: bool | str = False, scale: float | None = None, return_lse: bool = False,
                           compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """DeepSeek sparse attention (DSA): lightning-indexer scores, top-k keys per query, attention over them.

    .. math::

        I_{t,s} = \\sum_{j=1}^{J} w_{t,j}\\, \\mathrm{ReLU}(q^{I}_{t,j} \\cdot k^{I}_{s}), \\qquad
        T_t = \\operatorname{top\\text{-}k}_{s \\le t + δ}\\, I_{t,s}, \\qquad
        o_t = \\mathrm{softmax}_{s \\in T_t}(\\mathrm{scale}\\; q_t \\cdot k_s)\\, V

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)``; indexer inputs
    ``index_q (..., J, L, Dᴵ)``, ``index_k (..., S, Dᴵ)`` (one indexer key per token, shared by the J
    indexer heads), ``index_w (..., J, L)`` (per-token head weights) → ``out (..., H, L, E)``. The
    selected set is shared by every attention head (as in DSA over MLA's shared latent keys).

    Args:
        top_k: keys per query (the catalogue's k); ``top_k ≥ S`` selects every allowed key.
        causal: ``False``, ``True``/``"top_left"`` (s ≤ t) or ``"bottom_right"`` (s ≤ t + S − L);
            later keys are never selected (DSA is causal).
        scale: attention score scale, default 1/√D (the indexer score is unscaled, as in the paper).
        return_lse, compute_dtype: as in :func:`reflex.full_attention`.
        implementation: ``"gather"``, ``"dense"`` (full attention masked to the selection), ``"auto"``.

    Conventions: ties in I go to the lower key index; a query with fewer allowed keys than top_k
    attends all of them. The indexer runs in float64 here (the paper uses FP8): an oracle for the
    selection rule, not for FP8 rounding.

    References: DeepSeek-AI 2025, "DeepSeek-V3.2-Exp: Boosting Long-Context Efficiency with DeepSeek
    Sparse Attention", §2.1 (lightning indexer, eq. 1; fine-grained token selection, eq. 2).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}; got {implementation!r}")
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    iq, ik, iw = _indexer_inputs(p.xp, p.q.dtype, p.device, index_q, index_k, index_w)
    scale = _kernels.resolve_scale(scale, p.dim)
    if p.length == 0 or p.key_length == 0:
        out, lse = _kernels.empty_result(p)
        return (out, lse) if return_lse else out
    indices = _indices(p, iq, ik, iw, _top_k(top_k), parse_causal(causal))
    if implementation == "dense":
        out, lse = _kernels.dense(p, scale=scale, mask=index_counts(p.xp, indices, p.key_length) > 0)
    else:
        out, lse = _kernels.gather(p, indices, scale=scale)
    return (out, lse) if return_lse else out


def _pattern(q: Any, k: Any, v: Any, index_q: Any, index_k: Any, index_w: Any, /, *, top_k: int,
             causal: bool | str = False, compute_dtype: Any = None, **_: Any) -> Any:
    idx = indexer_topk_indices(q, k, index_q, index_k, index_w, top_k=top_k, causal=causal, compute_dtype=compute_dtype)
    return index_counts(namespace(idx), idx, int(k.shape[-2])) > 0


def _reference(*arrays: Any, **params: Any) -> Any:
    return indexer_topk_attention(*arrays, **{**params, "implementation": "dense"})


def _cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    J, DI = 3, 4
    indexer = {
        "index_q": random.normal((2, J, d["L"], DI), seed=(seed, 5)),
        "index_k": random.normal((2, d["S"], DI), seed=(seed, 6)),
        "index_w": random.normal((2, J, d["L"]), seed=(seed, 7)),
    }
    positional = ("q", "k", "v", "index_q", "index_k", "index_w")
    return [
        Case("gqa", {**gqa, **indexer}, {"top_k": 3}, positional=positional, seed=seed),
        Case("causal", {**gqa, **indexer}, {"top_k": 2, "causal": "bottom_right"}, positional=positional, seed=seed),
        Case("all_keys", {**gqa, **indexer}, {"top_k": d["S"], "causal": True}, positional=positional, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    inputs = {name: random.normal((1, heads, seq, dim), seed=(seed, i)) for i, name in enumerate("qkv")}
    inputs.update(index_q=random.normal((1, 2, seq, 4), seed=(seed, 5)), index_k=random.normal((1, seq, 4), seed=(seed, 6)),
                  index_w=random.normal((1, 2, seq), seed=(seed, 7)))
    return Case("example", inputs, {"top_k": max(1, seq // 4), "causal": True},
                positional=("q", "k", "v", "index_q", "index_k", "index_w"), seed=seed)


register(Mechanism(
    key="indexer_topk",
    function=indexer_topk_attention,
    family="C. content-sparse",
    paper="DeepSeek-AI 2025, DeepSeek-V3.2-Exp §2.1 (lightning indexer, top-k selection)",
    params={
        "index_q": "(..., J, L, Di) indexer queries",
        "index_k": "(..., S, Di) indexer keys (shared by the J indexer heads)",
        "index_w": "(..., J, L) indexer head weights",
        "top_k": "keys per query (the catalogue's k)",
        "causal": "False | True | 'top_left' | 'bottom_right'",
        "scale": "attention score scale, default 1/sqrt(D)",
    },
    cases=_cases,
    reference=_reference,
    returns_lse=True,
    example=_example,
    pattern=_pattern,
    vjp=_kernels.engine_vjp(indexer_topk_attention, constants=("index_q", "index_k", "index_w")),
))
