"""Nyströmformer: softmax attention through m landmark (segment-mean) queries and keys."""

from __future__ import annotations

import math
from typing import Any

from reflex import random
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import example_qkv, standard
from reflex.mechanisms._inputs import check_padding_mask
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import Real, typed_options

__all__ = ["nystrom_attention"]

PINV = ("iterative", "exact", "regularized")
PINV_INIT = ("matrix", "batch")


def segment_means(xp: Any, x: Any, count: int) -> Any:
    """Means of ``count`` consecutive segments of ``x (..., n, D)`` along ``n`` → ``(..., count, D)``.

    Segment r covers rows ``[⌊r·n/count⌋, ⌊(r+1)·n/count⌋)``: equal segments of n/count rows when
    ``count`` divides n (a reshape and mean, as Hugging Face does), else lengths differing by one.
    """
    n = int(x.shape[-2])
    if n % count == 0:
        return xp.mean(xp.reshape(x, (*x.shape[:-2], count, n // count, int(x.shape[-1]))), axis=-2)
    device = x.device
    segment = xp.reshape(xp.arange(count, dtype=xp.int64, device=device), (count, 1))
    position = xp.reshape(xp.arange(n, dtype=xp.int64, device=device), (1, n))
    start, end = (segment * n) // count, ((segment + 1) * n) // count
    inside = (position >= start) & (position < end)
    weights = xp.where(inside, 1.0 / xp.astype(end - start, x.dtype), 0.0)  # (count, n), rows sum to 1
    return xp.astype(weights, x.dtype) @ x


def newton_schulz_pinv(xp: Any, a: Any, *, iterations: int, init: str) -> Any:
    """Iterative Moore–Penrose inverse of softmax matrices ``a (..., m, m)`` (Xiong 2021, §3.2 eq. 16).

    ``Z₀ = aᵀ / max_j Σ_i a_ij`` (‖a‖∞ = 1 for a softmax matrix, so this is ``aᵀ/(‖a‖₁‖a‖∞)``), the
    max per matrix (``init="matrix"``) or one max over the whole batch (``"batch"``: the paper code
    and Hugging Face), then ``Z ← ¼ Z (13I − aZ(15I − aZ(7I − aZ)))`` ``iterations`` times, in
    Hugging Face's operation order.
    """
    m = int(a.shape[-1])
    column_sums = xp.sum(a, axis=-2)
    if init == "matrix":
        top = xp.max(column_sums, axis=-1, keepdims=True)[..., None]
    else:
        top = xp.max(column_sums)
    z = xp.matrix_transpose(a) / top
    eye = xp.eye(m, dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = (0.25 * z) @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def _check_options(p: _kernels.Prepared, num_landmarks: Any, pinv: Any, pinv_init: Any, iterations: Any, eps: Any) -> None:
    if isinstance(num_landmarks, bool) or not isinstance(num_landmarks, int) or not 1 <= num_landmarks <= min(p.length, p.key_length):
        raise ValueError(f"num_landmarks must be an int in [1, min(L, S)] = [1, {min(p.length, p.key_length)}]; got {num_landmarks!r}")
    if pinv not in PINV:
        raise ValueError(f"pinv must be one of {', '.join(PINV)}; got {pinv!r}")
    if pinv_init not in PINV_INIT:
        raise ValueError(f"pinv_init must be one of {', '.join(PINV_INIT)}; got {pinv_init!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0; got {iterations!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a number > 0; got {eps!r}")


@typed_options(scale=Real(positive=True, optional=True))  # the features use sqrt(scale)
def nystrom_attention(q: Any, k: Any, v: Any, /, *, num_landmarks: int, pinv: str = "iterative", iterations: int = 6,
                      pinv_init: str = "matrix", eps: float = 1e-6, attention_mask: Any = None,
                      scale: float | None = None, compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Nyströmformer: F·A⁺·(B·V) with landmark queries/keys that are segment means.

    .. math::

        \\tilde Q = \\mathrm{means}_m(\\sqrt s\\,Q),\\;\\tilde K = \\mathrm{means}_m(\\sqrt s\\,K),\\qquad
        O = \\underbrace{\\mathrm{softmax}(\\sqrt s Q \\tilde K^\\top)}_{F}\\;
            \\underbrace{\\mathrm{softmax}(\\tilde Q \\tilde K^\\top)}_{A}{}^{+}\\;
            \\underbrace{\\mathrm{softmax}(\\tilde Q\\, \\sqrt s K^\\top)}_{B}\\; V

    (Xiong et al. 2021, "Nyströmformer", §3.2 eq. 14–16; regularised inverse as in Chen et al.
    2020, "Scalable and accurate low-rank attention" (CSALR)).

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``(..., H, L, E)``.
    Query landmarks are per query head, key landmarks per kv head (GQA without copies).

    Args:
        num_landmarks: m, with ``1 ≤ m ≤ min(L, S)``. Landmarks are means of m consecutive segments
            (equal when m divides the length; otherwise lengths differ by one, see
            :func:`segment_means`).
        pinv: ``"iterative"`` (Newton–Schulz, :func:`newton_schulz_pinv`, ``iterations`` steps —
            6 in the paper and Hugging Face), ``"exact"`` (``linalg.pinv``, Moore–Penrose with the
            standard's default cut-off) or ``"regularized"`` (``(A + eps·I)⁻¹``, by ``linalg.solve``).
        pinv_init: ``"matrix"`` (Z₀ scaled per (batch, head) matrix: items independent) or
            ``"batch"`` (one scalar over the whole batch, as Hugging Face's default "original" init:
            an item's output then depends on the rest of the batch).
        attention_mask: boolean ``(..., S)`` key padding mask, True = real token (Hugging Face's
            ``attention_mask == 1``). As Hugging Face, it enters only the third kernel B (padded keys
            get weight 0 there); landmarks still average every position, padded ones included, and
            padded queries get outputs. HF adds ``finfo.min`` rather than −∞: the same weights, except
            for an item with no real key (HF: uniform B; here B = 0).
        scale: default 1/√D; q and k are each multiplied by √scale (Hugging Face divides by D^¼).
        implementation: kernel of the two engine softmaxes over S or L (``"auto"|"dense"|"tiled"``).

    Softmaxes run on the engine: ``B·V`` and ``F·(A⁺BV)`` are softmax attention
    (:func:`reflex.mechanisms._kernels.softmax_attention`), ``A`` is
    :func:`reflex.mechanisms._kernels.weights`. The product is taken as ``F(A⁺(BV))``:
    memory O((L + S)·m). Matching Hugging Face ``NystromformerSelfAttention`` (its depthwise
    convolution skip disabled) needs ``pinv="iterative"`` and, with several (batch, head) matrices,
    ``pinv_init="batch"``; Hugging Face computes plain softmax when m equals the sequence length,
    while here m = S with ``pinv="exact"`` equals ``full_attention`` up to A's conditioning.
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp = p.xp
    _check_options(p, num_landmarks, pinv, pinv_init, iterations, eps)
    padding = check_padding_mask(p, attention_mask)
    m = num_landmarks
    root = math.sqrt(_kernels.resolve_scale(scale, p.dim))
    q_scaled, k_scaled = p.q * root, p.k * root
    q_land, k_land = segment_means(xp, q_scaled, m), segment_means(xp, k_scaled, m)  # (..., H|G, m, D)
    dtype = p.q.dtype
    # B·V: the landmark queries attend every (real) key (engine softmax over S).
    bv = _kernels.softmax_attention(_kernels.prepare(q_land, k_scaled, p.v, compute_dtype=dtype), scale=1.0,
                                    mask=None if padding is None else padding[..., None, None, :],
                                    implementation=implementation)
    a = _kernels.weights(_kernels.prepare(q_land, k_land, k_land, compute_dtype=dtype), scale=1.0)  # (..., H, m, m)
    if pinv == "iterative":
        w = newton_schulz_pinv(xp, a, iterations=iterations, init=pinv_init) @ bv
    elif pinv == "exact":
        w = xp.linalg.pinv(a) @ bv
    else:
        w = xp.linalg.solve(a + float(eps) * xp.eye(m, dtype=dtype, device=p.device), bv)
    # F·W: every query attends the key landmarks with values W (engine softmax over m).
    k_land_heads = xp.reshape(xp.broadcast_to(xp.expand_dims(k_land, axis=-3), (*p.batch, p.kv_heads, p.group, m, p.dim)),
                              (*p.batch, p.heads, m, p.dim))
    return _kernels.softmax_attention(_kernels.prepare(q_scaled, k_land_heads, w, compute_dtype=dtype), scale=1.0,
                                      implementation=implementation)


def segment_means_vjp(xp: Any, d_means: Any, n: int) -> Any:
    """Adjoint of :func:`segment_means`: ``d_means (..., m, D)`` → ``(..., n, D)``, each row receiving its
    segment's gradient divided by the segment's length."""
    count, dim = int(d_means.shape[-2]), int(d_means.shape[-1])
    if n % count == 0:
        spread = xp.broadcast_to(d_means[..., :, None, :], (*d_means.shape[:-2], count, n // count, dim))
        return xp.reshape(spread, (*d_means.shape[:-2], n, dim)) / (n // count)
    device = d_means.device
    segment = xp.reshape(xp.arange(count, dtype=xp.int64, device=device), (count, 1))
    position = xp.reshape(xp.arange(n, dtype=xp.int64, device=device), (1, n))
    start, end = (segment * n) // count, ((segment + 1) * n) // count
    weights = xp.where((position >= start) & (position < end), 1.0 / xp.astype(end - start, d_means.dtype), 0.0)
    return xp.matrix_transpose(xp.astype(weights, d_means.dtype)) @ d_means


def _newton_schulz_vjp(xp: Any, a: Any, d_z: Any, *, iterations: int, init: str) -> Any:
    """``dA`` of :func:`newton_schulz_pinv` by unrolling its iterations in reverse.

    One step ``Z' = ¼ Z T₁``, ``T₁ = 13I − P T₂``, ``T₂ = 15I − P T₃``, ``T₃ = 7I − P``, ``P = A Z``:
    ``dZ = ¼ dZ' T₁ᵀ + Aᵀ dP``, ``dT₁ = ¼ Zᵀ dZ'``, ``dT₂ = −Pᵀ dT₁``, ``dT₃ = −Pᵀ dT₂``,
    ``dP = −dT₁ T₂ᵀ − dT₂ T₃ᵀ − dT₃``, ``dA += dP Zᵀ``. Start ``Z₀ = Aᵀ/c`` with ``c`` the largest
    column sum: ``dA += dZ₀ᵀ/c`` and ``dc = −⟨dZ₀, Z₀⟩/c`` goes to every entry of the column (of the
    matrix, or of the batch for ``init="batch"``) holding the max — the forward's branch; at a tie, the
    first such column (``argmax``).
    """
    m = int(a.shape[-1])
    column_sums = xp.sum(a, axis=-2)
    top = xp.max(column_sums, axis=-1, keepdims=True)[..., None] if init == "matrix" else xp.max(column_sums)
    eye = xp.eye(m, dtype=a.dtype, device=a.device)
    z, history = xp.matrix_transpose(a) / top, []
    for _ in range(iterations):
        history.append(z)
        az = a @ z
        z = (0.25 * z) @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    d_a = xp.zeros(a.shape, dtype=a.dtype, device=a.device)
    for z in reversed(history):
        az = a @ z
        t3 = 7 * eye - az
        t2 = 15 * eye - az @ t3
        t1 = 13 * eye - az @ t2
        d_t1 = 0.25 * (xp.matrix_transpose(z) @ d_z)
        d_t2 = -(xp.matrix_transpose(az) @ d_t1)
        d_t3 = -(xp.matrix_transpose(az) @ d_t2)
        d_az = -(d_t1 @ xp.matrix_transpose(t2)) - d_t2 @ xp.matrix_transpose(t3) - d_t3
        d_a = d_a + d_az @ xp.matrix_transpose(z)
        d_z = 0.25 * (d_z @ xp.matrix_transpose(t1)) + xp.matrix_transpose(a) @ d_az
    z0 = xp.matrix_transpose(a) / top
    d_a = d_a + xp.matrix_transpose(d_z) / top
    d_top = -xp.sum(d_z * z0, axis=(-2, -1), keepdims=True) / top  # (..., 1, 1)
    if init == "matrix":
        column = xp.argmax(column_sums, axis=-1, keepdims=True)  # (..., 1)
        hit = xp.reshape(xp.arange(m, dtype=column.dtype, device=a.device), (1, m)) == column  # (..., m)
    else:
        flat = xp.reshape(column_sums, (-1,))
        hit = xp.reshape(xp.arange(int(flat.shape[0]), device=a.device) == xp.argmax(flat), column_sums.shape)
        d_top = xp.sum(d_top)
    return d_a + xp.where(hit[..., None, :], d_top, 0.0)


def _pinv_vjp(xp: Any, a: Any, a_pinv: Any, d_pinv: Any) -> Any:
    """``dA`` of the Moore–Penrose inverse ``Z = A⁺`` (constant rank; Golub & Pereyra 1973, Thm 4.3):
    ``dA = −Zᵀ dZ Zᵀ + Z Zᵀ dZ (I − A Z)ᵀ + (I − Z A)ᵀ dZ Zᵀ Z``."""
    z_t = xp.matrix_transpose(a_pinv)
    eye = xp.eye(int(a.shape[-1]), dtype=a.dtype, device=a.device)
    return (-(z_t @ d_pinv @ z_t) + a_pinv @ z_t @ d_pinv @ xp.matrix_transpose(eye - a @ a_pinv)
            + xp.matrix_transpose(eye - a_pinv @ a) @ d_pinv @ z_t @ a_pinv)


def _nystrom_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, num_landmarks: int, pinv: str = "iterative",
                 iterations: int = 6, pinv_init: str = "matrix", eps: float = 1e-6, scale: float | None = None,
                 compute_dtype: Any = None, implementation: str = "auto") -> dict:
    """VJP of :func:`nystrom_attention`: ``{"q": dq, "k": dk, "v": dv}``.

    With ``x = √s q``, ``y = √s k``, landmarks ``q̃ = M x``, ``k̃ = M y`` (segment means), ``F``, ``A``,
    ``B`` the three softmax maps, ``W = A⁺(BV)`` and ``O = F W``:
    ``dF = dO Wᵀ``, ``dW = Fᵀ dO``; ``d(BV) = A⁺ᵀ dW``, ``dA⁺ = dW (BV)ᵀ``; ``dA`` through the inverse:
    unrolled Newton–Schulz (see :func:`_newton_schulz_vjp`), the Moore–Penrose derivative
    (:func:`_pinv_vjp`) or, regularised, ``d(BV) = (A + εI)⁻ᵀ dW``, ``dA = −d(BV) Wᵀ``;
    ``dB = d(BV) Vᵀ``, ``dV = Bᵀ d(BV)``; each softmax map ``P = softmax(Z)`` gives
    ``dZ = P ∘ (dP − rowsum(P ∘ dP))``, then ``dx = dZ_F k̃ + Mᵀ(dZ_A k̃ + dZ_B y)``,
    ``dy = dZ_Bᵀ q̃ + Mᵀ(dZ_Fᵀ x + dZ_Aᵀ q̃)`` (key-side terms summed over the query heads of a kv
    head), ``dq = √s dx``, ``dk = √s dy``. ``F`` (L × m) and ``B`` (m × S) are materialised: memory
    O((L + S)·m), linear in L, for every ``implementation``.
    """
    from reflex.mechanisms import _grad

    p = _kernels.prepare(inputs["q"], inputs["k"], inputs["v"], compute_dtype=compute_dtype)
    xp = p.xp
    _check_options(p, num_landmarks, pinv, pinv_init, iterations, eps)
    m, t = num_landmarks, xp.matrix_transpose
    root = math.sqrt(_kernels.resolve_scale(scale, p.dim))
    x = _grad.group_queries(p, p.q * root)  # (..., G, H/G, L, D)
    y = xp.expand_dims(p.k * root, axis=-3)  # (..., G, 1, S, D)
    v = xp.expand_dims(p.v, axis=-3)
    q_land, k_land = segment_means(xp, x, m), segment_means(xp, y, m)
    f = _grad.softmax(xp, x @ t(k_land))  # (..., G, H/G, L, m)
    a = _grad.softmax(xp, q_land @ t(k_land))  # (..., G, H/G, m, m)
    padding = check_padding_mask(p, inputs.get("attention_mask"))
    b = _grad.softmax(xp, q_land @ t(y), mask=None if padding is None else padding[..., None, None, None, :])  # (..., G, H/G, m, S)
    bv = b @ v
    if pinv == "regularized":
        shifted = a + float(eps) * xp.eye(m, dtype=a.dtype, device=p.device)
        w = xp.linalg.solve(shifted, bv)
    else:
        a_pinv = newton_schulz_pinv(xp, a, iterations=iterations, init=pinv_init) if pinv == "iterative" \
            else xp.linalg.pinv(a)
        w = a_pinv @ bv
    d_o = _grad.group_queries(p, xp.astype(d_out, p.q.dtype))
    d_f, d_w = d_o @ t(w), t(f) @ d_o
    if pinv == "regularized":
        d_bv = xp.linalg.solve(t(shifted), d_w)
        d_a = -(d_bv @ t(w))
    else:
        d_bv, d_pinv = t(a_pinv) @ d_w, d_w @ t(bv)
        d_a = _newton_schulz_vjp(xp, a, d_pinv, iterations=iterations, init=pinv_init) if pinv == "iterative" \
            else _pinv_vjp(xp, a, a_pinv, d_pinv)
    d_b = d_bv @ t(v)
    d_v = xp.sum(t(b) @ d_bv, axis=-3)
    d_zf, d_za, d_zb = _grad.softmax_vjp(xp, f, d_f), _grad.softmax_vjp(xp, a, d_a), _grad.softmax_vjp(xp, b, d_b)
    d_q_land = d_za @ k_land + d_zb @ y
    d_k_land = xp.sum(t(d_zf) @ x + t(d_za) @ q_land, axis=-3, keepdims=True)
    d_x = d_zf @ k_land + segment_means_vjp(xp, d_q_land, p.length)
    d_y = xp.sum(t(d_zb) @ q_land, axis=-3, keepdims=True) + segment_means_vjp(xp, d_k_land, p.key_length)
    return {"q": _grad.ungroup(p, root * d_x), "k": root * d_y[..., 0, :, :], "v": d_v}


def _cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    m = max(1, d["L"] // 2)
    return [
        Case("iterative", gqa, {"num_landmarks": m}, seed=seed),
        Case("iterative_batch_init", gqa, {"num_landmarks": m, "pinv_init": "batch"}, seed=seed),
        Case("exact", gqa, {"num_landmarks": m, "pinv": "exact"}, seed=seed),
        Case("regularized", gqa, {"num_landmarks": m, "pinv": "regularized", "eps": 1e-3}, seed=seed),
        Case("padded", {**gqa, "attention_mask": _padding_mask(d["S"], seed)}, {"num_landmarks": m, "pinv_init": "batch"},
             seed=seed),
    ]


def _padding_mask(length: int, seed: int) -> Any:
    """Host ``(2, length)`` padding mask: item 0 all real, item 1 with its last third padded."""
    mask = random.uniform((2, length), seed=(seed, 9)) < 2.0  # all True
    mask[1, length - max(1, length // 3):] = False
    return mask


def _reference(q: Any, k: Any, v: Any, /, *, num_landmarks: int, pinv: str = "iterative", iterations: int = 6,
               pinv_init: str = "matrix", eps: float = 1e-6, attention_mask: Any = None, scale: float | None = None,
               **_: Any) -> Any:
    """Hugging Face's order: the three softmax matrices materialised, ``(F·A⁺)·(B·V)``."""
    p = _kernels.prepare(q, k, v)
    xp = p.xp
    root = math.sqrt(_kernels.resolve_scale(scale, p.dim))
    q_scaled, k_scaled = p.q * root, p.k * root
    q_land, k_land = segment_means(xp, q_scaled, num_landmarks), segment_means(xp, k_scaled, num_landmarks)
    k_land_heads = xp.reshape(xp.broadcast_to(xp.expand_dims(k_land, axis=-3), (*p.batch, p.kv_heads, p.group, num_landmarks, p.dim)),
                              (*p.batch, p.heads, num_landmarks, p.dim))
    f = _kernels.weights(_kernels.prepare(q_scaled, k_land_heads, k_land_heads), scale=1.0)
    a = _kernels.weights(_kernels.prepare(q_land, k_land, k_land), scale=1.0)
    b = _kernels.weights(_kernels.prepare(q_land, k_scaled, p.v), scale=1.0,
                         mask=None if attention_mask is None else attention_mask[..., None, None, :])
    if pinv == "iterative":
        a_pinv = newton_schulz_pinv(xp, a, iterations=iterations, init=pinv_init)
    elif pinv == "exact":
        a_pinv = xp.linalg.pinv(a)
    else:
        a_pinv = xp.linalg.inv(a + float(eps) * xp.eye(num_landmarks, dtype=a.dtype, device=p.device))
    v_heads = xp.reshape(xp.broadcast_to(xp.expand_dims(p.v, axis=-3), (*p.batch, p.kv_heads, p.group, p.key_length, p.value_dim)),
                         (*p.batch, p.heads, p.key_length, p.value_dim))
    return (f @ a_pinv) @ (b @ v_heads)


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    return Case("example", example_qkv(seq, heads, dim, seed), {"num_landmarks": min(64, seq)}, seed=seed)


register(Mechanism(
    key="nystrom",
    function=nystrom_attention,
    family="F. low-rank",
    paper="Xiong et al. 2021, 'Nystromformer', §3.2 eq. 14-16; Chen et al. 2020 (CSALR, regularized inverse)",
    params={
        "num_landmarks": "m segment-mean landmarks, 1 <= m <= min(L, S)",
        "pinv": "'iterative' (Newton-Schulz) | 'exact' (Moore-Penrose) | 'regularized' ((A + eps I)^-1)",
        "iterations": "Newton-Schulz steps (default 6)",
        "pinv_init": "'matrix' (Z0 per matrix) | 'batch' (one scalar over the batch, as Hugging Face)",
        "eps": "ridge of the regularized inverse (default 1e-6)",
        "scale": "score scale, default 1/sqrt(D)",
    },
    cases=_cases,
    reference=_reference,
    row_separable=False,
    example=_example,
    vjp=_nystrom_vjp,
))
