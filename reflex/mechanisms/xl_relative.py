"""Transformer-XL relative attention (Dai et al. 2019): content and sinusoidal position terms with u, v biases."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, example_qkv, qkv
from reflex.mechanisms._patterns import causal_offset, causal_pattern, parse_causal
from reflex.mechanisms._relative import RelativeLogits, assemble_rows
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options
from reflex.mechanisms._numerics import unbroadcast

__all__ = ["xl_relative_attention", "relative_sinusoid"]


@typed_options()
def relative_sinusoid(distances: Any, dim: int, /, *, base: float = 10000.0) -> Any:
    """Transformer-XL's sinusoidal embedding R_Δ ``(..., dim)`` of (integer or float) distances ``(...)``.

    .. math::

        R_\\Delta = \\big[\\sin(\\Delta\\,\\omega_0), \\dots, \\sin(\\Delta\\,\\omega_{d/2-1}),\\;
        \\cos(\\Delta\\,\\omega_0), \\dots, \\cos(\\Delta\\,\\omega_{d/2-1})\\big], \\qquad
        \\omega_t = 1 / \\mathrm{base}^{2t/d}

    The paper (§3.3) uses the sinusoid of Vaswani et al. 2017 §3.5; the authors' code lays it out as
    [sin | cos] halves (``PositionalEmbedding``: ``cat([sin, cos])``), which this follows. Computed in
    float64 (or the distances' floating dtype).
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
        raise ValueError(f"dim must be an even int >= 2; got {dim!r}")
    xp = namespace(distances)
    dtype = distances.dtype if xp.isdtype(distances.dtype, "real floating") else xp.float64
    omega = xp.asarray([1.0 / base ** (2 * t / dim) for t in range(dim // 2)], dtype=dtype, device=device_of(distances))
    angles = xp.astype(distances, dtype)[..., None] * omega
    return xp.concat([xp.sin(angles), xp.cos(angles)], axis=-1)


def _check(p: _kernels.Prepared, name: str, x: Any, shape: tuple[int, ...], what: str) -> Any:
    if tuple(int(n) for n in x.shape) != shape:
        raise ValueError(f"{name} must have shape {what} = {shape}; got {tuple(x.shape)}")
    return _kernels.check_array(p.xp, p.device, p.q.dtype, name, x)


@typed_options()
def xl_relative_attention(q: Any, k: Any, v: Any, /, *, w_r: Any, content_bias: Any, position_bias: Any,
                          causal: bool | str = "bottom_right", scale: float | None = None, return_lse: bool = False,
                          compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Transformer-XL relative attention over [memory; current]: content + position terms, biases u and v.

    .. math::

        s_{ij} = \\mathrm{scale}\\Big[\\underbrace{q_i\\cdot k_j}_{(a)} + \\underbrace{q_i\\cdot r_{i+\\delta-j}}_{(b)}
        + \\underbrace{u\\cdot k_j}_{(c)} + \\underbrace{v\\cdot r_{i+\\delta-j}}_{(d)}\\Big], \\qquad
        r_\\Delta = W_R\\, R_\\Delta

    with R the sinusoid of :func:`relative_sinusoid` and δ = S − L: k and v hold the M = S − L
    memory positions followed by the L current ones, so query i sits at position M + i.

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)``, ``w_r (H, D, N)``
    (N even: the sinusoid width), ``content_bias`` u ``(H, D)``, ``position_bias`` v ``(H, D)`` →
    ``(..., H, L, E)``.

    Args:
        w_r: per-head projection W_R of the sinusoid (the paper's W_{k,R}).
        content_bias: u, the global content bias (term c).
        position_bias: v, the global position bias (term d). (Named so because ``v`` is the values.)
        causal: ``"bottom_right"`` (default: query i sees memory and current keys j ≤ M + i, as the
            paper's decoder) or ``False``/``"top_left"``/``True`` as :func:`reflex.full_attention`.
        scale: default 1/√D, applied to all four terms (the authors' ``(AC + BD) * scale``).
        return_lse, compute_dtype, implementation: as :func:`reflex.full_attention`.

    Both terms are engine biases: (c) is a ``(..., H, 1, S)`` array, (b)+(d) = (q_i + v)·r_{i+δ−j}
    is an index-grid term computed per tile from the tile's distinct distances (the relative shift
    of the paper's App. B without the padding trick), so the tiled kernel never builds ``L × S``.

    Gradients (:func:`reflex.vjp`): the engine's backward (FlashAttention-2, Dao 2023, Alg. 2) gives
    dq, dk, dv from (a) and the score cotangent dZ; then (c): ``du_h = scale·Σ_{j} dZ^{(c)}_{hj} k_j``
    and ``dk_j += scale·Σ_{h∈g} dZ^{(c)}_{hj} u_h`` with ``dZ^{(c)}_{hj} = Σ_i dZ_{hij}``;
    (b)+(d): per tile, ``dΛ`` (dZ shifted back onto distances), ``d(q_i + v) = scale·Σ_Δ dΛ_{iΔ} r_Δ``
    gives dq and ``dv = Σ_i``, and ``dW_R = Σ_Δ (dΛᵀ(q + v)·scale)_Δ R_Δᵀ``.

    Reference: Dai et al. 2019, "Transformer-XL: Attentive Language Models Beyond a Fixed-Length
    Context", ACL, §3.3 (the four terms) and App. B (efficient computation).
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp, dtype = p.xp, p.q.dtype
    if w_r.ndim != 3 or int(w_r.shape[-1]) % 2:
        raise ValueError(f"w_r must have shape (H, D, N) with N even; got {tuple(w_r.shape)}")
    width = int(w_r.shape[-1])
    w_r = _check(p, "w_r", w_r, (p.heads, p.dim, width), "(H, D, N)")
    u = _check(p, "content_bias", content_bias, (p.heads, p.dim), "(H, D)")
    v_pos = _check(p, "position_bias", position_bias, (p.heads, p.dim), "(H, D)")
    scale = _kernels.resolve_scale(scale, p.dim)
    offset = causal_offset("bottom_right", p.length, p.key_length)  # query i at position M + i
    # (c) u·k_j per query head h (kv head h // (H/G)): (..., G, H/G, S) → (..., H, 1, S)
    u_groups = xp.reshape(u * scale, (p.kv_heads, p.group, 1, p.dim))
    content = xp.matrix_transpose(xp.expand_dims(p.k, axis=-3) @ xp.matrix_transpose(u_groups))[..., 0, :]
    content = xp.reshape(content, (*p.batch, p.heads, 1, p.key_length))
    w_r_t = xp.matrix_transpose(w_r)  # (H, N, D)

    def sinusoid(d_min: int, d_max: int) -> Any:
        # distance d = j − i − δ, so the sinusoid's argument i + δ − j is −d
        return relative_sinusoid(-xp.arange(d_min, d_max + 1, dtype=dtype, device=p.device), width)  # (n, N)

    def embed(d_min: int, d_max: int) -> Any:
        return sinusoid(d_min, d_max) @ w_r_t  # (H, n, D)

    def embed_vjp(d_min: int, d_max: int, d_table: Any) -> dict[str, Any]:
        return {"w_r": xp.matrix_transpose(xp.matrix_transpose(sinusoid(d_min, d_max)) @ d_table)}  # (H, D, N)

    position = RelativeLogits(xp, (p.q + v_pos[:, None, :]) * scale, embed, embed_vjp, offset)
    alignment = parse_causal(causal)
    masks, tile_active = [], None
    if alignment is not None:
        pattern = causal_pattern(alignment, p.length, p.key_length)
        masks, tile_active = [pattern.allowed], pattern.tile_active
    return _kernels.softmax_attention(p, scale=scale, mask=masks, bias=[content, position], tile_active=tile_active,
                                      implementation=implementation, return_lse=return_lse)


def _vjp(inputs: Any, d_out: Any, *, d_lse: Any = None, return_lse: bool = False, **params: Any) -> dict[str, Any]:
    """Gradients of ``⟨d_out, O⟩ + ⟨d_lse, lse⟩`` (see the forward's docstring for the chain rule)."""
    from reflex.mechanisms._engine.record import recording

    params.setdefault("implementation", "auto")
    if params["implementation"] not in ("dense", "tiled"):
        params["implementation"] = "dense" if int(inputs["q"].shape[-2]) * int(inputs["k"].shape[-2]) <= 1 << 20 \
            else "tiled"
    arrays = {n: inputs[n] for n in ("w_r", "content_bias", "position_bias")}
    with recording() as calls:
        out, lse = xl_relative_attention(inputs["q"], inputs["k"], inputs["v"], **arrays, **params, return_lse=True)
    (call,) = [c for c in calls if c.out is out]
    p, (content, position) = call.p, call.options["bias"]
    xp = p.xp
    scale = call.options["scale"]
    grads = call.backward(d_out, d_lse)
    d_content, d_position = grads.bias
    # (c) content[..., h, 0, j] = scale·u_h·k_{g(h), j}
    d_content = xp.reshape(d_content[..., 0, :], (*p.batch, p.kv_heads, p.group, p.key_length))  # (..., G, H/G, S)
    u = xp.reshape(xp.astype(inputs["content_bias"], p.q.dtype), (p.kv_heads, p.group, p.dim))
    d_k = grads.dk + scale * (xp.matrix_transpose(d_content) @ u)  # (..., G, S, D)
    d_u = unbroadcast(xp, scale * (d_content @ p.k), (p.kv_heads, p.group, p.dim))  # (..., G, H/G, S) @ (..., G, S, D)
    # (b) + (d): queries (q + v)·scale of the position term
    d_queries = assemble_rows(xp, d_position, position.queries)
    w_r = inputs["w_r"]
    d_w_r = d_position.get("w_r", xp.zeros(w_r.shape, dtype=p.q.dtype, device=p.device))
    return {"q": grads.dq + scale * d_queries, "k": d_k, "v": grads.dv, "w_r": d_w_r,
            "content_bias": xp.reshape(d_u, (p.heads, p.dim)),
            "position_bias": unbroadcast(xp, scale * d_queries, (p.heads, 1, p.dim))[:, 0, :]}


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    shapes = dict(heads=d["H"], kv_heads=d["G"], length=d["L"], key_length=d["S"], dim=d["D"], value_dim=d["E"])
    gqa = qkv(seed, **shapes)
    weights = {
        "w_r": random.normal((d["H"], d["D"], 2 * d["D"]), seed=(seed, 5), std=0.3),
        "content_bias": random.normal((d["H"], d["D"]), seed=(seed, 6)),
        "position_bias": random.normal((d["H"], d["D"]), seed=(seed, 7)),
    }
    return [
        Case("memory_causal", {**gqa, **weights}, {}, seed=seed),
        Case("bidirectional", {**gqa, **weights}, {"causal": False}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    """No memory (S = L, causal over the segment); W_R (H, D, 2D) with std 1/√D keeps r_Δ of unit scale."""
    inputs = {**example_qkv(seq, heads, dim, seed),
              "w_r": random.normal((heads, dim, 2 * dim), seed=(seed, 3), std=dim ** -0.5),
              "content_bias": random.normal((heads, dim), seed=(seed, 4)),
              "position_bias": random.normal((heads, dim), seed=(seed, 5))}
    return Case("example", inputs, {}, seed=seed)


register(Mechanism(
    key="xl_relative",
    function=xl_relative_attention,
    family="H. positional biases and encodings",
    paper="Dai et al. 2019 (Transformer-XL), ACL, §3.3 and App. B",
    params={
        "w_r": "(H, D, N) projection of the N-wide sinusoid R",
        "content_bias": "u (H, D), global content bias",
        "position_bias": "v (H, D), global position bias",
        "causal": "'bottom_right' (default: memory + causal current) | False | 'top_left'",
    },
    cases=_cases,
    returns_lse=True,
    example=_example,
    vjp=_vjp,
))
