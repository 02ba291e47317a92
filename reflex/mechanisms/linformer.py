"""Linformer: softmax attention over keys and values projected along the sequence to k rows."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, example_qkv, qkv
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options
from reflex.mechanisms._numerics import unbroadcast

__all__ = ["linformer_attention"]


def _project(p: _kernels.Prepared, name: str, proj: Any, x: Any) -> Any:
    """``proj (..., k, S) @ x (..., G, S, ·)`` → ``(..., G, k, ·)``, with the checks that name ``proj``."""
    xp = p.xp
    if namespace(proj) is not xp or device_of(proj) != p.device:
        raise TypeError(f"{name} must come from the same array library and device as q ({p.device})")
    shape = tuple(int(n) for n in proj.shape)
    if len(shape) < 2 or shape[-1] != p.key_length or shape[-2] < 1:
        raise ValueError(f"{name} must have shape (..., k, S) with S = {p.key_length} and k >= 1; got {shape}")
    if not xp.isdtype(proj.dtype, "real floating"):
        raise TypeError(f"{name} must be a real floating array; got dtype {proj.dtype}")
    lead = shape[:-2]
    target = (*p.batch, p.kv_heads)
    if len(lead) > len(target) or not all(a in (1, b) for a, b in zip(lead[::-1], target[::-1])):
        raise ValueError(f"{name} of shape {shape} does not broadcast to (..., G, k, S) with (..., G) = {target}")
    return xp.astype(proj, p.q.dtype) @ x


@typed_options()
def linformer_attention(q: Any, k: Any, v: Any, /, *, e_proj: Any, f_proj: Any = None, scale: float | None = None,
                        return_lse: bool = False, compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Linformer: softmax(Q (E K)ᵀ · scale) (F V) with explicit sequence projections E, F of shape (k, S).

    .. math::

        O = \\mathrm{softmax}\\big(\\mathrm{scale}\\cdot Q\\,(E K)^\\top\\big)\\,(F V),
        \\qquad E, F \\in \\mathbb{R}^{k \\times S}

    (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity", §4 eq. 7; E = F is the
    paper's key-value sharing, §4 "Parameter sharing").

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``(..., H, L, E)``;
    ``e_proj``, ``f_proj`` of shape ``(k, S)``, or any shape broadcasting to ``(..., G, k, S)``
    (per-head projections).

    Args:
        e_proj: E, projecting the keys (explicit: Linformer's E is learned; draw one with
            ``reflex.random.normal((k, S), seed=..., std=1/sqrt(k))`` as the paper's initialisation).
        f_proj: F, projecting the values; ``None`` shares E (key-value sharing).
        scale: default 1/√D. return_lse: also the lse over the k projected keys.
        implementation: engine kernel ``"auto" | "dense" | "tiled"``.

    The softmax over the k projected keys runs on the engine; with E = F = I (k = S) the result is
    ``full_attention`` exactly.
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    keys = _project(p, "e_proj", e_proj, p.k)
    values = _project(p, "f_proj", e_proj if f_proj is None else f_proj, p.v)
    if int(keys.shape[-2]) != int(values.shape[-2]):
        raise ValueError(f"e_proj projects to {keys.shape[-2]} rows, f_proj to {values.shape[-2]}: they must match")
    compressed = _kernels.prepare(p.q, keys, values, compute_dtype=p.q.dtype)
    return _kernels.softmax_attention(compressed, scale=_kernels.resolve_scale(scale, p.dim),
                                      implementation=implementation, return_lse=return_lse)


def _linformer_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, scale: float | None = None,
                   compute_dtype: Any = None, implementation: str = "auto") -> dict:
    """VJP of :func:`linformer_attention`: ``dq``, ``dk``, ``dv``, ``d e_proj`` and ``d f_proj`` (when given).

    The engine's backward (dense, or tiled: FlashAttention-2 Alg. 2) on ``(Q, EK, FV)`` gives
    ``dQ``, ``d(EK)``, ``d(FV)``; then ``dK = Eᵀ d(EK)``, ``dE = Σ d(EK) Kᵀ``, ``dV = Fᵀ d(FV)``,
    ``dF = Σ d(FV) Vᵀ`` (sums over the axes E, F were broadcast along; a shared E = F receives both).
    """
    from reflex.mechanisms import _grad

    p = _kernels.prepare(inputs["q"], inputs["k"], inputs["v"], compute_dtype=compute_dtype)
    xp = p.xp
    e_proj, f_proj = inputs["e_proj"], inputs.get("f_proj")
    keys = _project(p, "e_proj", e_proj, p.k)
    values = _project(p, "f_proj", e_proj if f_proj is None else f_proj, p.v)
    if int(keys.shape[-2]) != int(values.shape[-2]):
        raise ValueError(f"e_proj projects to {keys.shape[-2]} rows, f_proj to {values.shape[-2]}: they must match")
    compressed = _kernels.prepare(p.q, keys, values, compute_dtype=p.q.dtype)
    g = _grad.softmax_attention_vjp(compressed, d_out, d_lse, scale=_kernels.resolve_scale(scale, p.dim),
                                    implementation=implementation)
    e = xp.astype(e_proj, p.q.dtype)
    f = e if f_proj is None else xp.astype(f_proj, p.q.dtype)
    t = xp.matrix_transpose
    d_e = unbroadcast(xp, g.dk @ t(p.k), tuple(e.shape))
    d_f = unbroadcast(xp, g.dv @ t(p.v), tuple(f.shape))
    grads = {"q": g.dq, "k": t(e) @ g.dk, "v": t(f) @ g.dv}
    if f_proj is None:
        grads["e_proj"] = d_e + d_f
    else:
        grads["e_proj"], grads["f_proj"] = d_e, d_f
    return grads


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    shapes = dict(heads=d["H"], length=d["L"], key_length=d["S"], dim=d["D"], value_dim=d["E"])
    gqa = qkv(seed, kv_heads=d["G"], **shapes)
    rank = max(1, d["S"] // 2)
    e = random.normal((rank, d["S"]), seed=(seed, 5), std=rank ** -0.5)
    f = random.normal((d["G"], rank, d["S"]), seed=(seed, 6), std=rank ** -0.5)
    return [
        Case("shared", {**gqa, "e_proj": e}, {}, seed=seed),
        Case("per_head_f", {**gqa, "e_proj": e, "f_proj": f}, {}, seed=seed),
        Case("tiled", {**gqa, "e_proj": e, "f_proj": f}, {"implementation": "tiled"}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    rank = min(256, seq)
    e = random.normal((rank, seq), seed=(seed, 5), std=rank ** -0.5)
    return Case("example", {**example_qkv(seq, heads, dim, seed), "e_proj": e}, {}, seed=seed)


register(Mechanism(
    key="linformer",
    function=linformer_attention,
    family="E. compressed memory",
    paper="Wang et al. 2020, 'Linformer', §4 eq. 7",
    params={
        "e_proj": "E (k, S) or (..., G, k, S): keys projected along the sequence",
        "f_proj": "F, same shapes, for values; None shares E",
        "scale": "score scale, default 1/sqrt(D)",
        "return_lse": "also the lse over the k projected keys",
    },
    cases=_cases,
    returns_lse=True,
    example=_example,
    vjp=_linformer_vjp,
))
