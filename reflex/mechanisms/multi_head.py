"""The multi-head attention layer: input projections, any registered inner mechanism, concat, W_O."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Mapping

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms._kernels import resolve_dtype
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["multi_head_attention"]


def _check_matrix(xp: Any, name: str, w: Any, rows: int, cols_multiple: int | None, dtype: Any, dev: Any) -> Any:
    if w.ndim != 2 or int(w.shape[0]) != rows:
        raise ValueError(f"{name} must have shape ({rows}, ·); got {tuple(w.shape)}")
    if cols_multiple is not None and int(w.shape[1]) % cols_multiple != 0:
        raise ValueError(f"{name} has {int(w.shape[1])} columns; expected a multiple of {cols_multiple} (heads × head dim)")
    if not xp.isdtype(w.dtype, "real floating"):
        raise TypeError(f"{name} must have a real floating dtype")
    if device_of(w) != dev:
        raise ValueError(f"{name} is on device {device_of(w)}; x is on {dev}")
    return xp.astype(w, dtype)


def _check_bias(xp: Any, name: str, b: Any, size: int, dtype: Any, dev: Any) -> Any:
    if b is None:
        return None
    if tuple(b.shape) != (size,):
        raise ValueError(f"{name} must have shape ({size},); got {tuple(b.shape)}")
    if device_of(b) != dev:
        raise ValueError(f"{name} is on device {device_of(b)}; x is on {dev}")
    return xp.astype(b, dtype)


def _split_heads(xp: Any, y: Any, heads: int) -> Any:
    """``(..., L, heads·d)`` → ``(..., heads, L, d)``."""
    *lead, length, width = y.shape
    y = xp.reshape(y, (*lead, length, heads, width // heads))
    return xp.permute_dims(y, (*range(len(lead)), len(lead) + 1, len(lead), len(lead) + 2))


@typed_options()
def multi_head_attention(x: Any, w_q: Any, w_k: Any, w_v: Any, w_o: Any, /, *, num_heads: int,
                         num_kv_heads: int | None = None, mechanism: str = "full",
                         mechanism_params: Mapping[str, Any] | None = None, x_kv: Any = None,
                         b_q: Any = None, b_k: Any = None, b_v: Any = None, b_o: Any = None,
                         compute_dtype: Any = None) -> Any:
    """Multi-head attention layer: project x, run a registered mechanism per head, concat, project out.

    .. math::

        Q = X W_Q + b_Q,\\quad K = X_{kv} W_K + b_K,\\quad V = X_{kv} W_V + b_V,

        O = \\mathrm{Concat}_h\\big(\\mathrm{Attn}(Q_h, K_{g(h)}, V_{g(h)})\\big)\\, W_O + b_O

    Takes ``x`` and weights, not q, k, v. Shapes: ``x (..., L, N)``, ``x_kv (..., S, M)`` (default
    ``x``: self-attention), ``w_q (N, H·D)``, ``w_k (M, G·D)``, ``w_v (M, G·E)``, ``w_o (H·E, P)``
    → ``out (..., L, P)``. The head dims D and E are read from the weights, so they are independent
    of N/H (Bhojanapalli et al. 2020). Weights multiply on the right (``x @ w``); torch's
    ``in_proj_weight`` rows are the transposes.

    Heads: column block ``h`` of ``Q`` (``[h·D, (h+1)·D)``) is query head h; with
    ``num_kv_heads`` G < H the key/value heads are shared by groups of H/G query heads, head h using
    kv head ``h // (H/G)`` (GQA, Ainslie et al. 2023; G = 1 is MQA). The concat orders heads
    ``0 … H−1`` along the last axis before ``W_O``.

    Args:
        num_heads: H. num_kv_heads: G (default H).
        mechanism: registry key of the inner mechanism; it is called as
            ``reflex.get(mechanism).function(Q, K, V, **mechanism_params, compute_dtype=...)`` on
            ``(..., H, L, D)``, ``(..., G, S, D)``, ``(..., G, S, E)`` and must return
            ``(..., H, L, E)`` (the first element when it returns a tuple).
        mechanism_params: keyword options of the inner mechanism (e.g. ``{"causal": True}``, a mask).
        b_q, b_k, b_v, b_o: optional biases of shapes ``(H·D,)``, ``(G·D,)``, ``(G·E,)``, ``(P,)``.
        compute_dtype: arithmetic dtype (default float64) for the projections and the inner call.

    Gradients (:func:`reflex.vjp`): with ``dY = d_out``: ``dW_O = Σ Concᵀ dY``, ``db_O = Σ dY``;
    ``dConc = dY W_Oᵀ`` split into heads is the inner mechanism's output cotangent; its VJP
    (:func:`reflex.vjp` of ``mechanism``) gives dQ, dK, dV, merged back to ``(..., L, heads·d)``;
    then ``dW_Q = Σ Xᵀ dQ``, ``db_Q = Σ dQ``, ``dX = dQ W_Qᵀ (+ dK W_Kᵀ + dV W_Vᵀ`` without ``x_kv``,
    else those go to ``dX_kv``), sums over batch and positions. Array options inside
    ``mechanism_params`` (a mask, a bias) get no gradient.

    References: Vaswani et al. 2017, §3.2.2 (multi-head attention); Bhojanapalli et al. 2020,
    "Low-Rank Bottleneck in Multi-head Attention Models", §4 (head size independent of H);
    Ainslie et al. 2023 (GQA).
    """
    return _forward(x, w_q, w_k, w_v, w_o, num_heads=num_heads, num_kv_heads=num_kv_heads, mechanism=mechanism,
                    mechanism_params=mechanism_params, x_kv=x_kv, b_q=b_q, b_k=b_k, b_v=b_v, b_o=b_o,
                    compute_dtype=compute_dtype).out


@dataclass(frozen=True)
class _Layer:
    """The forward's intermediates (compute dtype), kept for the VJP."""

    xp: Any
    x: Any
    kv: Any
    w_q: Any
    w_k: Any
    w_v: Any
    w_o: Any
    q: Any
    k: Any
    v: Any
    concat: Any
    out: Any


def _forward(x: Any, w_q: Any, w_k: Any, w_v: Any, w_o: Any, /, *, num_heads: int, num_kv_heads: int | None,
             mechanism: str, mechanism_params: Mapping[str, Any] | None, x_kv: Any, b_q: Any, b_k: Any, b_v: Any,
             b_o: Any, compute_dtype: Any) -> _Layer:
    from reflex import registry

    kv_input = x if x_kv is None else x_kv
    xp = namespace(x, w_q, w_k, w_v, w_o, kv_input)
    dev = device_of(x)
    dtype = resolve_dtype(xp, compute_dtype)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int; got {num_heads!r}")
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1 or num_heads % kv_heads:
        raise ValueError(f"num_kv_heads must be a positive divisor of num_heads={num_heads}; got {num_kv_heads!r}")
    if x.ndim < 2 or kv_input.ndim != x.ndim:
        raise ValueError(f"x must be (..., L, N) and x_kv (..., S, M) with the same batch axes; got {tuple(x.shape)}, {tuple(kv_input.shape)}")
    if tuple(kv_input.shape[:-2]) != tuple(x.shape[:-2]):
        raise ValueError(f"x_kv has batch shape {tuple(kv_input.shape[:-2])}; x has {tuple(x.shape[:-2])}")
    if device_of(kv_input) != dev:
        raise ValueError(f"x_kv is on device {device_of(kv_input)}; x is on {dev}")
    width, kv_width = int(x.shape[-1]), int(kv_input.shape[-1])
    w_q = _check_matrix(xp, "w_q", w_q, width, num_heads, dtype, dev)
    w_k = _check_matrix(xp, "w_k", w_k, kv_width, kv_heads, dtype, dev)
    w_v = _check_matrix(xp, "w_v", w_v, kv_width, kv_heads, dtype, dev)
    head_dim, value_dim = int(w_q.shape[1]) // num_heads, int(w_v.shape[1]) // kv_heads
    if int(w_k.shape[1]) != kv_heads * head_dim:
        raise ValueError(f"w_k must have {kv_heads}·{head_dim} = {kv_heads * head_dim} columns (G·D); got {int(w_k.shape[1])}")
    w_o = _check_matrix(xp, "w_o", w_o, num_heads * value_dim, None, dtype, dev)
    x_c, kv_c = xp.astype(x, dtype), xp.astype(kv_input, dtype)

    def project(inp: Any, w: Any, b: Any, name: str) -> Any:
        y = inp @ w
        b = _check_bias(xp, name, b, int(w.shape[1]), dtype, dev)
        return y if b is None else y + b

    q = _split_heads(xp, project(x_c, w_q, b_q, "b_q"), num_heads)
    k = _split_heads(xp, project(kv_c, w_k, b_k, "b_k"), kv_heads)
    v = _split_heads(xp, project(kv_c, w_v, b_v, "b_v"), kv_heads)
    inner = registry.get(mechanism).function
    heads = inner(q, k, v, **dict(mechanism_params or {}), compute_dtype=dtype)
    heads = heads[0] if isinstance(heads, tuple) else heads
    expected = (*x.shape[:-2], num_heads, int(x.shape[-2]), value_dim)
    if tuple(heads.shape) != expected:
        raise ValueError(f"mechanism {mechanism!r} returned shape {tuple(heads.shape)}; expected (..., H, L, E) = {expected}")
    nb = heads.ndim - 3
    concat = xp.permute_dims(heads, (*range(nb), nb + 1, nb, nb + 2))
    concat = xp.reshape(concat, (*concat.shape[:-2], num_heads * value_dim))
    out = concat @ w_o
    b_o = _check_bias(xp, "b_o", b_o, int(w_o.shape[1]), dtype, dev)
    return _Layer(xp, x_c, kv_c, w_q, w_k, w_v, w_o, q, k, v, concat, out if b_o is None else out + b_o)


def _merge_heads(xp: Any, y: Any) -> Any:
    """``(..., heads, L, d)`` → ``(..., L, heads·d)`` (the inverse of :func:`_split_heads`)."""
    nb = y.ndim - 3
    y = xp.permute_dims(y, (*range(nb), nb + 1, nb, nb + 2))
    return xp.reshape(y, (*y.shape[:-2], y.shape[-2] * y.shape[-1]))


def _weight_grad(xp: Any, a: Any, d: Any) -> Any:
    """``Σ_batch aᵀ d`` for ``a (..., L, m)``, ``d (..., L, n)`` → ``(m, n)``."""
    g = xp.matrix_transpose(a) @ d
    return xp.sum(xp.reshape(g, (-1, *g.shape[-2:])), axis=0)


def _bias_grad(xp: Any, d: Any) -> Any:
    """``Σ`` of ``d (..., n)`` over every axis but the last."""
    return xp.sum(xp.reshape(d, (-1, d.shape[-1])), axis=0)


def _vjp(inputs: Mapping[str, Any], d_out: Any, *, d_lse: Any = None, num_heads: int, num_kv_heads: int | None = None,
         mechanism: str = "full", mechanism_params: Mapping[str, Any] | None = None,
         compute_dtype: Any = None) -> dict[str, Any]:
    """Gradients of ``⟨d_out, out⟩`` for x, x_kv, the weights and the biases (see the layer's docstring)."""
    from reflex import registry
    from reflex.gradients import vjp as reflex_vjp

    if d_lse is not None:
        raise ValueError("multi_head returns no lse; d_lse must be None")
    arrays = {n: inputs.get(n) for n in ("x_kv", "b_q", "b_k", "b_v", "b_o")}
    f = _forward(*(inputs[n] for n in _POSITIONAL), num_heads=num_heads, num_kv_heads=num_kv_heads,
                 mechanism=mechanism, mechanism_params=mechanism_params, compute_dtype=compute_dtype, **arrays)
    xp = f.xp
    d_out = xp.astype(d_out, f.out.dtype)
    d_heads = _split_heads(xp, d_out @ xp.matrix_transpose(f.w_o), num_heads)  # (..., H, L, E)
    names = [n for n, prm in inspect.signature(registry.get(mechanism).function).parameters.items()
             if prm.kind is inspect.Parameter.POSITIONAL_ONLY][:3]
    inner = reflex_vjp(mechanism, dict(zip(names, (f.q, f.k, f.v))), d_heads, **dict(mechanism_params or {}),
                       compute_dtype=f.out.dtype)
    d_q, d_k, d_v = (_merge_heads(xp, inner[n]) for n in names)
    grads = {"w_o": _weight_grad(xp, f.concat, d_out), "b_o": _bias_grad(xp, d_out),
             "w_q": _weight_grad(xp, f.x, d_q), "b_q": _bias_grad(xp, d_q),
             "w_k": _weight_grad(xp, f.kv, d_k), "b_k": _bias_grad(xp, d_k),
             "w_v": _weight_grad(xp, f.kv, d_v), "b_v": _bias_grad(xp, d_v)}
    d_x = d_q @ xp.matrix_transpose(f.w_q)
    d_kv = d_k @ xp.matrix_transpose(f.w_k) + d_v @ xp.matrix_transpose(f.w_v)
    if inputs.get("x_kv") is None:
        grads["x"] = d_x + d_kv
    else:
        grads["x"], grads["x_kv"] = d_x, d_kv
    return {n: g for n, g in grads.items() if inputs.get(n) is not None}




def _weights(seed: int, width: int, heads: int, kv_heads: int, head_dim: int, value_dim: int, out_width: int,
             kv_width: int | None = None) -> dict[str, Any]:
    kv_width = width if kv_width is None else kv_width
    return {
        "w_q": random.normal((width, heads * head_dim), seed=(seed, 10), std=width ** -0.5),
        "w_k": random.normal((kv_width, kv_heads * head_dim), seed=(seed, 11), std=kv_width ** -0.5),
        "w_v": random.normal((kv_width, kv_heads * value_dim), seed=(seed, 12), std=kv_width ** -0.5),
        "w_o": random.normal((heads * value_dim, out_width), seed=(seed, 13), std=(heads * value_dim) ** -0.5),
    }


_POSITIONAL = ("x", "w_q", "w_k", "w_v", "w_o")


def _cases(size: str, seed: int) -> list[Case]:
    from reflex.mechanisms._cases import dims

    d = dims(size)
    n, heads = 4 * d["D"], d["H"]
    x = random.normal((2, d["L"], n), seed=(seed, 0))
    x_kv = random.normal((2, d["S"], n + 2), seed=(seed, 1))
    mha = _weights(seed, n, heads, heads, d["D"], d["E"], n)
    gqa = _weights(seed, n, heads, d["G"], d["D"], d["E"], n)
    cross = _weights(seed, n, heads, d["G"], d["D"], d["E"], n, kv_width=n + 2)
    biases = {
        "b_q": random.normal((heads * d["D"],), seed=(seed, 20)), "b_k": random.normal((heads * d["D"],), seed=(seed, 21)),
        "b_v": random.normal((heads * d["E"],), seed=(seed, 22)), "b_o": random.normal((n,), seed=(seed, 23)),
    }
    return [
        Case("mha", {"x": x, **mha}, {"num_heads": heads}, positional=_POSITIONAL, seed=seed),
        Case("mha_bias_causal", {"x": x, **mha, **biases}, {"num_heads": heads, "mechanism_params": {"causal": True}},
             positional=_POSITIONAL, seed=seed),
        Case("gqa", {"x": x, **gqa}, {"num_heads": heads, "num_kv_heads": d["G"]}, positional=_POSITIONAL, seed=seed),
        Case("cross_gqa", {"x": x, "x_kv": x_kv, **cross}, {"num_heads": heads, "num_kv_heads": d["G"]},
             positional=_POSITIONAL, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    width = heads * dim
    x = random.normal((1, seq, width), seed=(seed, 0))
    return Case("example", {"x": x, **_weights(seed, width, heads, heads, dim, dim, width)}, {"num_heads": heads},
                positional=_POSITIONAL, seed=seed)


register(Mechanism(
    key="multi_head",
    function=multi_head_attention,
    family="A. core",
    paper="Vaswani et al. 2017 §3.2.2; Bhojanapalli et al. 2020 §4 (head size); Ainslie et al. 2023 (GQA)",
    params={
        "num_heads": "H query heads",
        "num_kv_heads": "G key/value heads (GQA), default H",
        "mechanism": "registry key of the inner per-head mechanism (default 'full')",
        "mechanism_params": "keyword options of the inner mechanism",
        "x_kv": "(..., S, M) key/value input for cross-attention (default x)",
        "b_q, b_k, b_v, b_o": "optional projection biases",
    },
    cases=_cases,
    example=_example,
    vjp=_vjp,
))
