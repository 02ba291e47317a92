"""RoPE: rotary position embedding of queries and keys (Su et al. 2021), then softmax attention."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, qkv
from reflex.mechanisms._patterns import mask_and_causal
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["rope_attention", "apply_rope"]

CONVENTIONS = ("half", "interleaved")


def _check_positions(xp: Any, positions: Any, lead: tuple[int, ...], length: int, name: str) -> Any:
    if namespace(positions) is not xp:
        raise TypeError(f"{name} comes from a different array library than the rotated tensor")
    if not xp.isdtype(positions.dtype, "integral"):
        raise TypeError(f"{name} must be an integer array of token positions; got dtype {positions.dtype}")
    shape = tuple(int(n) for n in positions.shape)
    target = (*lead, length)
    if not shape or len(shape) > len(target) or any(a not in (1, b) for a, b in zip(shape[::-1], target[::-1])) \
            or shape[-1] != length:
        raise ValueError(f"{name} of shape {shape} does not broadcast to (..., L) = {target}")
    return positions


@typed_options()
def apply_rope(x: Any, /, *, positions: Any = None, base: float = 10000.0, convention: str = "half",
               rotary_dim: int | None = None, compute_dtype: Any = None) -> Any:
    """Rotate ``x (..., L, D)`` by the rotary position embedding of its token positions.

    .. math::

        \\begin{pmatrix} y_{a} \\\\ y_{b} \\end{pmatrix} =
        \\begin{pmatrix} \\cos p\\theta_t & -\\sin p\\theta_t \\\\ \\sin p\\theta_t & \\cos p\\theta_t \\end{pmatrix}
        \\begin{pmatrix} x_{a} \\\\ x_{b} \\end{pmatrix}, \\qquad
        \\theta_t = \\mathrm{base}^{-2t/r}, \\quad t = 0, \\dots, r/2 - 1,

    for the t-th pair (a, b) of the first r = ``rotary_dim`` features of the token at position p;
    features r..D−1 pass through unchanged (partial rotary, as GPT-NeoX ``rotary_pct``).

    Args:
        x: ``(..., L, D)``, e.g. q ``(..., H, L, D)``.
        positions: integer ``(..., L)``-broadcastable token positions (offsets, KV caches, packed
            sequences); default ``arange(L)``.
        base: θ base (10000 in the paper).
        convention: ``"half"`` pairs feature t with t + r/2 (GPT-NeoX, LLaMA ``rotate_half``, ONNX
            ``RotaryEmbedding`` with ``interleaved=0``); ``"interleaved"`` pairs 2t with 2t + 1
            (the paper, GPT-J, ONNX ``interleaved=1``).
        rotary_dim: even r ≤ D; default D.
        compute_dtype: arithmetic and output dtype (default float64).

    The frequencies are ``1 / base**(2t/r)`` evaluated in the compute dtype's Python-float
    precision (as Hugging Face's ``inv_freq``, but in float64 rather than float32); angles are
    ``p · θ_t`` in the compute dtype.

    Reference: Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding",
    §3.4.2 (eq. 34, θ_t = 10000^{−2(t−1)/d}).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}; got {convention!r}")
    xp = namespace(x)
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"x must have a real floating dtype; got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., L, D); got shape {tuple(x.shape)}")
    length, dim = int(x.shape[-2]), int(x.shape[-1])
    rotary = dim if rotary_dim is None else rotary_dim
    if rotary_dim is None and dim % 2:
        raise ValueError(f"the head dim D of x must be even to rotate every feature in pairs; got D = {dim} "
                         "(pass an even rotary_dim < D for partial rotary)")
    if isinstance(rotary, bool) or not isinstance(rotary, int) or rotary < 0 or rotary % 2 or rotary > dim:
        raise ValueError(f"rotary_dim must be an even int in [0, D = {dim}]; got {rotary_dim!r}")
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 0:
        raise ValueError(f"base must be a positive number; got {base!r}")
    dtype = _kernels.resolve_dtype(xp, compute_dtype)
    dev = device_of(x)
    x = xp.astype(x, dtype)
    if positions is None:
        positions = xp.arange(length, dtype=xp.int64, device=dev)
    else:
        positions = _check_positions(xp, positions, tuple(x.shape[:-2]), length, "positions")
    half = rotary // 2
    if half == 0:
        return x
    inv_freq = xp.asarray([1.0 / float(base) ** (2 * t / rotary) for t in range(half)], dtype=dtype, device=dev)
    angles = xp.astype(positions, dtype)[..., None] * inv_freq  # (..., L, r/2)
    cos, sin = xp.cos(angles), xp.sin(angles)
    rot, rest = x[..., :rotary], x[..., rotary:]
    if convention == "half":
        x1, x2 = rot[..., :half], rot[..., half:]
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    real = x1 * cos - x2 * sin
    imag = x1 * sin + x2 * cos
    if convention == "half":
        rotated = xp.concat([real, imag], axis=-1)
    else:
        rotated = xp.reshape(xp.stack([real, imag], axis=-1), (*real.shape[:-1], rotary))
    return xp.concat([rotated, rest], axis=-1) if rotary < dim else rotated


@typed_options()
def rope_attention(q: Any, k: Any, v: Any, /, *, positions: Any = None, key_positions: Any = None,
                   base: float = 10000.0, convention: str = "half", rotary_dim: int | None = None,
                   causal: bool | str = False, scale: float | None = None, return_lse: bool = False,
                   compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """RoPE attention: softmax attention of rotary-embedded queries and keys (values unrotated).

    .. math::

        O = \\mathrm{softmax}\\big(\\mathrm{scale}\\cdot R(p)Q\\,(R(p')K)^\\top\\big) V, \\qquad
        (R_{p} q)\\cdot(R_{p'} k) = q^\\top R_{p' - p}\\, k

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``(..., H, L, E)``.

    Args:
        positions: query positions, integer ``(..., L)``-broadcastable; default
            ``arange(L) + S − L`` (queries are the last L tokens, as with a KV cache).
        key_positions: key positions ``(..., S)``-broadcastable; default ``arange(S)``.
        base, convention, rotary_dim: as :func:`apply_rope`.
        causal, scale, return_lse, compute_dtype, implementation: as :func:`reflex.full_attention`
            (the mask is on indices, independent of ``positions``).

    Gradients (:func:`reflex.vjp`): the softmax attention's VJP (FlashAttention-2, Dao 2023,
    Alg. 2) at the rotated q̃, k̃, then ``dq = R(p)ᵀ dq̃``, ``dk = R(p')ᵀ dk̃`` (each 2 × 2 rotation
    transposed, i.e. rotated by −pθ_t); dv unchanged.

    Reference: Su et al. 2021, "RoFormer", §3.4 (eq. 16, 34).
    """
    p, _, _ = _rotated(q, k, v, positions, key_positions, base, convention, rotary_dim, compute_dtype)
    masks, tile_active = mask_and_causal(p, None, causal)
    return _kernels.softmax_attention(p, scale=_kernels.resolve_scale(scale, p.dim), mask=masks,
                                      tile_active=tile_active, implementation=implementation, return_lse=return_lse)


def _rotated(q: Any, k: Any, v: Any, positions: Any, key_positions: Any, base: float, convention: str,
             rotary_dim: int | None, compute_dtype: Any) -> tuple[_kernels.Prepared, Any, Any]:
    """Prepared (R(p)q, R(p')k, v) and the positions used (defaults filled in)."""
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp = p.xp
    if positions is None:
        positions = xp.arange(p.key_length - p.length, p.key_length, dtype=xp.int64, device=p.device)
    else:
        positions = _check_positions(xp, positions, (*p.batch, p.heads), p.length, "positions")
    if key_positions is None:
        key_positions = xp.arange(p.key_length, dtype=xp.int64, device=p.device)
    else:
        key_positions = _check_positions(xp, key_positions, (*p.batch, p.kv_heads), p.key_length, "key_positions")
    options = dict(base=base, convention=convention, rotary_dim=rotary_dim, compute_dtype=p.q.dtype)
    rq = apply_rope(p.q, positions=positions, **options)
    rk = apply_rope(p.k, positions=key_positions, **options)
    return _kernels.prepare(rq, rk, p.v, compute_dtype=p.q.dtype), positions, key_positions


def _vjp(inputs: Any, d_out: Any, *, d_lse: Any = None, base: float = 10000.0, convention: str = "half",
         rotary_dim: int | None = None, causal: bool | str = False, scale: float | None = None,
         compute_dtype: Any = None, implementation: str = "auto", return_lse: bool = False) -> dict[str, Any]:
    """Gradients of ``⟨d_out, O⟩ + ⟨d_lse, lse⟩``: the softmax attention's VJP on the rotated q̃ = R(p)q,
    k̃ = R(p')k, then the cotangents rotated back, ``dq = R(p)ᵀ dq̃ = R(−p) dq̃`` and
    ``dk = R(−p') dk̃`` (rotations are orthogonal; unrotated features pass through). Integer
    positions get no gradient."""
    from reflex.gradients import vjp as reflex_vjp

    p, positions, key_positions = _rotated(inputs["q"], inputs["k"], inputs["v"], inputs.get("positions"),
                                           inputs.get("key_positions"), base, convention, rotary_dim, compute_dtype)
    grads = reflex_vjp("full", {"q": p.q, "k": p.k, "v": p.v}, d_out, d_lse=d_lse, causal=causal, scale=scale,
                       compute_dtype=p.q.dtype, implementation=implementation)
    options = dict(base=base, convention=convention, rotary_dim=rotary_dim, compute_dtype=p.q.dtype)
    return {"q": apply_rope(grads["q"], positions=-positions, **options),
            "k": apply_rope(grads["k"], positions=-key_positions, **options), "v": grads["v"]}


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    shapes = dict(heads=d["H"], kv_heads=d["G"], length=d["L"], key_length=d["S"], dim=d["D"], value_dim=d["E"])
    gqa = qkv(seed, **shapes)
    positions = random.integers((2, 1, d["L"]), seed=(seed, 5), low=0, high=4 * d["S"])
    return [
        Case("half", gqa, {}, seed=seed),
        Case("interleaved_causal", gqa, {"convention": "interleaved", "causal": "bottom_right"}, seed=seed),
        Case("partial_rotary", gqa, {"rotary_dim": d["D"] // 2, "base": 500.0}, seed=seed),
        Case("explicit_positions", {**gqa, "positions": positions}, {}, seed=seed),
    ]


def _reference(q: Any, k: Any, v: Any, /, *, positions: Any = None, key_positions: Any = None, base: float = 10000.0,
               convention: str = "half", rotary_dim: int | None = None, **params: Any) -> Any:
    """``full_attention`` (dense) on q and k rotated by :func:`apply_rope`."""
    from reflex.mechanisms.full import full_attention

    xp = namespace(q)
    if positions is None:
        positions = xp.arange(k.shape[-2] - q.shape[-2], k.shape[-2], dtype=xp.int64, device=device_of(q))
    options = dict(base=base, convention=convention, rotary_dim=rotary_dim)
    return full_attention(apply_rope(q, positions=positions, **options), apply_rope(k, positions=key_positions, **options),
                          v, implementation="dense", **params)


register(Mechanism(
    key="rope",
    function=rope_attention,
    family="H. positional biases and encodings",
    paper="Su et al. 2021 (RoFormer), §3.4",
    params={
        "positions": "query positions (..., L); default arange(L) + S - L",
        "key_positions": "key positions (..., S); default arange(S)",
        "base": "theta base, default 10000",
        "convention": "'half' (GPT-NeoX/LLaMA rotate_half) | 'interleaved' (GPT-J, paper)",
        "rotary_dim": "even number of rotated features (partial rotary); default D",
        "causal": "False | True | 'top_left' | 'bottom_right'",
    },
    cases=_cases,
    reference=_reference,
    returns_lse=True,
    vjp=_vjp,
))
