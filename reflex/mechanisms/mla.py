"""Multi-head latent attention (DeepSeek-V2/V3 MLA): keys and values decompressed from one shared latent."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._patterns import mask_and_causal
from reflex.mechanisms.rope import apply_rope
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["mla_attention", "mla_absorbed_inputs"]

FORMS = ("naive", "absorbed")
ROPE_CONVENTIONS = ("interleaved", "half", None)


class _Inputs:
    """Validated MLA inputs in the compute dtype: q_nope, rotated q_pe, c_kv, rotated k_pe, w_uk, w_uv (or None)."""

    def __init__(self, q: Any, c_kv: Any, k_pe: Any, w_uk: Any, w_uv: Any, *, rope: Any, positions: Any,
                 key_positions: Any, rope_base: float, compute_dtype: Any) -> None:
        xp = namespace(q, c_kv, k_pe)
        for name, x in (("q", q), ("c_kv", c_kv), ("k_pe", k_pe)):
            if x.ndim < 3:
                raise ValueError(f"{name} must have shape (..., heads, length, dim) with at least 3 axes; got shape {tuple(x.shape)}")
        for name, x in (("c_kv", c_kv), ("k_pe", k_pe)):
            if int(x.shape[-3]) != 1:
                raise ValueError(f"{name} must have one (shared) head, shape (..., 1, S, ·); got shape {tuple(x.shape)}")
            if tuple(x.shape[:-3]) != tuple(q.shape[:-3]):
                raise ValueError(f"{name} has batch shape {tuple(x.shape[:-3])}; q has {tuple(q.shape[:-3])}")
        if int(k_pe.shape[-2]) != int(c_kv.shape[-2]):
            raise ValueError(f"k_pe has {int(k_pe.shape[-2])} positions; c_kv has {int(c_kv.shape[-2])}: they must match")
        heads, rot, latent = int(q.shape[-3]), int(k_pe.shape[-1]), int(c_kv.shape[-1])
        nope = int(q.shape[-1]) - rot
        if nope < 0:
            raise ValueError(f"q's last axis ({int(q.shape[-1])}) must be d_nope + d_rope with d_rope = {rot} (k_pe's last axis)")
        if rope not in ROPE_CONVENTIONS:
            raise ValueError(f"rope must be 'interleaved', 'half' or None (inputs already rotated); got {rope!r}")
        if rope is not None and rot % 2:
            raise ValueError(f"k_pe's last axis d_rope = {rot} must be even for the rotary embedding")
        dev = device_of(q)
        dtype = _kernels.resolve_dtype(xp, compute_dtype)
        q, c_kv, k_pe = (_kernels.check_array(xp, dev, dtype, name, x)
                         for name, x in (("q", q), ("c_kv", c_kv), ("k_pe", k_pe)))
        self.w_uk = _kernels.check_array(xp, dev, dtype, "w_uk", w_uk)
        if tuple(self.w_uk.shape) != (heads, nope, latent):
            raise ValueError(f"w_uk must have shape (H, d_nope, d_c) = {(heads, nope, latent)}; got {tuple(self.w_uk.shape)}")
        self.w_uv = None
        if w_uv is not None:
            self.w_uv = _kernels.check_array(xp, dev, dtype, "w_uv", w_uv)
            if self.w_uv.ndim != 3 or tuple(self.w_uv.shape[::2]) != (heads, latent):
                raise ValueError(f"w_uv must have shape (H, E, d_c) = ({heads}, E, {latent}); got {tuple(self.w_uv.shape)}")
        self.xp, self.device, self.dtype = xp, dev, dtype
        self.heads, self.nope, self.rot, self.latent = heads, nope, rot, latent
        self.length, self.key_length = int(q.shape[-2]), int(c_kv.shape[-2])
        self.c_kv = c_kv
        q_pe = q[..., nope:]
        self.rope = None if rope is None else dict(base=rope_base, convention=rope, compute_dtype=dtype)
        if rope is not None:
            if positions is None:  # queries are the last L of the S positions (as a KV cache)
                positions = xp.arange(self.key_length - self.length, self.key_length, dtype=xp.int64, device=dev)
            if key_positions is None:
                key_positions = xp.arange(self.key_length, dtype=xp.int64, device=dev)
            q_pe = apply_rope(q_pe, positions=positions, **self.rope)
            k_pe = apply_rope(k_pe, positions=key_positions, **self.rope)
        self.positions, self.key_positions = positions, key_positions
        self.q_nope, self.q_pe, self.k_pe = q[..., :nope], q_pe, k_pe

    def unrotate(self, d_rotated: Any, positions: Any) -> Any:
        """The VJP of the rotation: R(p)ᵀ = R(−p) (a rotation is orthogonal); identity without RoPE."""
        return d_rotated if self.rope is None else apply_rope(d_rotated, positions=-positions, **self.rope)

    def naive(self) -> _kernels.Prepared:
        """The decompressed problem: q = [q_nope | R q_pe], k_h = [W_UK_h c | R k_pe], v_h = W_UV_h c."""
        xp = self.xp
        keys = xp.concat([self.c_kv @ xp.matrix_transpose(self.w_uk),  # (..., 1, S, d_c) @ (H, d_c, d_nope)
                          xp.broadcast_to(self.k_pe, (*self.k_pe.shape[:-3], self.heads, self.key_length, self.rot))],
                         axis=-1)
        return _kernels.prepare(xp.concat([self.q_nope, self.q_pe], axis=-1), keys,
                                self.c_kv @ xp.matrix_transpose(self.w_uv), compute_dtype=self.dtype)


@typed_options()
def mla_absorbed_inputs(q: Any, c_kv: Any, k_pe: Any, /, *, w_uk: Any, rope: str | None = "interleaved",
                        positions: Any = None, key_positions: Any = None, rope_base: float = 10000.0,
                        compute_dtype: Any = None) -> tuple[Any, Any]:
    """MLA in FlashMLA's layout: ``(q_abs (..., H, L, d_c + d_rope), kv (..., 1, S, d_c + d_rope))``.

    ``q_abs = [W_UKᵀ·q_nope | RoPE(q_pe)]`` per head and ``kv = [c_kv | RoPE(k_pe)]``, one key head
    shared by every query head; the values are ``kv[..., :d_c]``. Then
    ``full_attention(q_abs, kv, kv[..., :d_c], scale=τ)`` is the latent output ``P·c_kv``, and
    ``latent @ w_uvᵀ`` (per head) the output of :func:`mla_attention`. Arguments as :func:`mla_attention`.
    """
    x = _Inputs(q, c_kv, k_pe, w_uk, None, rope=rope, positions=positions,
                key_positions=key_positions, rope_base=rope_base, compute_dtype=compute_dtype)
    return _absorbed(x)


def _absorbed(x: _Inputs) -> tuple[Any, Any]:
    xp = x.xp
    q_latent = x.q_nope @ x.w_uk  # (..., H, L, d_nope) @ (H, d_nope, d_c): W_UKᵀ q_nope per head
    return xp.concat([q_latent, x.q_pe], axis=-1), xp.concat([x.c_kv, x.k_pe], axis=-1)


@typed_options()
def mla_attention(q: Any, c_kv: Any, k_pe: Any, /, *, w_uk: Any, w_uv: Any, scale: float, form: str = "naive",
                  rope: str | None = "interleaved", positions: Any = None, key_positions: Any = None,
                  rope_base: float = 10000.0, mask: Any = None, causal: bool | str = False, return_lse: bool = False,
                  compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Multi-head latent attention (DeepSeek MLA): per-head keys and values decompressed from a shared latent.

    .. math::

        k_{h,j} = [W^{UK}_h c_j \\,|\\, R_{p'_j} k^{pe}_j], \\quad v_{h,j} = W^{UV}_h c_j, \\quad
        q_{h,i} = [q^{nope}_{h,i} \\,|\\, R_{p_i} q^{pe}_{h,i}],

        O_{h,i} = \\sum_j \\mathrm{softmax}_j(\\tau\\, q_{h,i}\\cdot k_{h,j} + M_{ij})\\, v_{h,j}.

    ``form="naive"`` decompresses k and v per head (H·S·(d_nope + d_rope + E) numbers);
    ``form="absorbed"`` folds W_UK into the queries and W_UV into the output, so every head attends
    the same single key head ``[c_j | R k^pe_j]`` with values ``c_j`` (the decode-time form, FlashMLA):
    ``τ q^{nope}·(W^{UK} c) = τ (W^{UK\\top} q^{nope})·c`` and ``O = W^{UV} (P c)``. The two forms
    differ only in association order (≤ 1e-12 apart in float64); they return the same lse.

    Shapes: ``q (..., H, L, d_nope + d_rope)``, ``c_kv (..., 1, S, d_c)`` (the latent, after its
    RMSNorm), ``k_pe (..., 1, S, d_rope)`` (the shared rotary key, before RoPE), ``w_uk (H, d_nope, d_c)``,
    ``w_uv (H, E, d_c)`` → ``out (..., H, L, E)`` (before the output projection); lse ``(..., H, L)``.
    DeepSeek-V3: H = 128, d_nope = 128, d_rope = 64, d_c = 512, E = 128. Hugging Face
    ``DeepseekV3Attention``: ``kv_b_proj.weight.view(H, d_nope + E, d_c)`` split into w_uk and w_uv.

    Args:
        w_uk, w_uv: the per-head key and value up-projections (``k_nope = w_uk[h] @ c``).
        scale: τ, required. DeepSeek uses (d_nope + d_rope)^−½ = 192^−½, times mscale² under YaRN
            (mscale = 0.1·mscale_all_dim·ln(factor) + 1); not 1/√(d_c + d_rope) (576^−½, FlashMLA's
            default) nor 1/√d_nope — so reflex takes it explicitly.
        form: ``"naive"`` or ``"absorbed"``.
        rope: how q's last d_rope features and k_pe are rotated by :func:`reflex.apply_rope`:
            ``"interleaved"`` (pairs (2t, 2t+1); DeepSeek's checkpoints and HF ``rope_interleave=True``,
            the default — HF's output lays the rotated pairs out as halves, the same on q and k, so the
            scores are equal), ``"half"`` (HF ``rope_interleave=False``) or ``None`` (inputs already
            rotated: YaRN or other frequency schemes are applied by the caller).
        positions: query positions ``(..., L)``; default ``arange(S − L, S)``. key_positions: key
            positions ``(..., S)``; default ``arange(S)``. rope_base: θ base (DeepSeek: 10000).
        mask, causal, return_lse, compute_dtype, implementation: as :func:`reflex.full_attention`
            (mask per query head, ``(..., H, L, S)``-broadcastable). Hugging Face and DeepSeek attend
            causally with S = L (``causal=True``); decoding against a cache is ``"bottom_right"``.

    FlashMLA's layout (deepseek-ai/FlashMLA, ``tests/ref.py``) is the absorbed form: one kv head of
    d_qk = 576 = 512 latent + 64 rope, whose first 512 entries are also the value, so ``head_dim_v =
    512``; pass ``softmax_scale = 192**-0.5``. :func:`mla_absorbed_inputs` builds it::

        q_abs, kv = reflex.mla_absorbed_inputs(q, c_kv, k_pe, w_uk=w_uk)   # (B,H,L,576), (B,1,S,576)
        latent = reflex.full_attention(q_abs, kv, kv[..., :512], scale=192 ** -0.5, causal="bottom_right")
        out = latent @ numpy.swapaxes(w_uv, -1, -2)                           # (B,H,L,128)
        assert numpy.allclose(out, reflex.mla_attention(q, c_kv, k_pe, w_uk=w_uk, w_uv=w_uv,
                                                        scale=192 ** -0.5, causal="bottom_right"))

    Conventions: float64 arithmetic by default (DeepSeek's and HF's eager softmax run in float32, HF's
    RoPE tables in float32); the latent's RMSNorm and the q/kv down-projections are the caller's.
    Raises ``ValueError`` naming the argument for shapes that do not fit (c_kv/k_pe with more than
    one head, d_rope > q's last axis, odd d_rope with a rotation, w_uk/w_uv shapes) and for unknown
    ``form``/``rope``.

    References: DeepSeek-AI 2024, "DeepSeek-V2", arXiv:2405.04434, §2.1.2–2.1.3 (low-rank key-value
    joint compression, eq. 9–11; decoupled rotary position embedding, eq. 14–19) and App. C
    (absorbing W_UK and W_UV); DeepSeek-AI 2024, "DeepSeek-V3", arXiv:2412.19437, §2.1.1.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}; got {form!r}")
    scale = _kernels.resolve_scale(scale, 1)
    x = _Inputs(q, c_kv, k_pe, w_uk, w_uv, rope=rope, positions=positions, key_positions=key_positions,
                rope_base=rope_base, compute_dtype=compute_dtype)
    xp = x.xp
    if form == "naive":
        p = x.naive()
    else:
        q_abs, kv = _absorbed(x)
        p = _kernels.prepare(q_abs, kv, x.c_kv, compute_dtype=x.dtype)
    masks, tile_active = mask_and_causal(p, mask, causal)
    out, lse = _kernels.softmax_attention(p, scale=scale, mask=masks, tile_active=tile_active,
                                          implementation=implementation, return_lse=True)
    if form == "absorbed":
        out = out @ xp.matrix_transpose(x.w_uv)  # W_UV (P c) per head
    return (out, lse) if return_lse else out


def _mla_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, scale: float, form: str = "naive",
             rope: str | None = "interleaved", rope_base: float = 10000.0, causal: Any = False, compute_dtype: Any = None,
             implementation: str = "auto") -> dict:
    """VJP of :func:`mla_attention` (both forms have the same derivative; computed on the naive form).

    The engine's backward (dense, or FA2 Alg. 2 tiled) gives dQ, dK_h, dV_h of the decompressed
    problem; then ``dq = [dQ_nope | R(p)ᵀ dQ_pe]``, ``dc = Σ_h (dK_nope,h W_UK,h + dV_h W_UV,h)``,
    ``dW_UK,h = Σ_batch dK_nope,hᵀ c``, ``dW_UV,h = Σ_batch dV_hᵀ c``, ``dk_pe = R(p')ᵀ Σ_h dK_pe,h``,
    with ``R(p)ᵀ = R(−p)``. ``positions``, ``key_positions`` and ``mask`` are constants.
    """
    from reflex.mechanisms import _grad

    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}; got {form!r}")
    x = _Inputs(inputs["q"], inputs["c_kv"], inputs["k_pe"], inputs["w_uk"], inputs["w_uv"], rope=rope,
                positions=inputs.get("positions"), key_positions=inputs.get("key_positions"), rope_base=rope_base,
                compute_dtype=compute_dtype)
    xp = x.xp
    p = x.naive()
    masks, tile_active = mask_and_causal(p, inputs.get("mask"), causal)
    grads = _grad.softmax_attention_vjp(p, xp.astype(d_out, x.dtype),
                                        None if d_lse is None else xp.astype(d_lse, x.dtype),
                                        scale=_kernels.resolve_scale(scale, 1), mask=masks, tile_active=tile_active,
                                        implementation=implementation)
    d_k_nope, d_k_rot = grads.dk[..., :x.nope], grads.dk[..., x.nope:]
    batch_axes = tuple(range(d_k_nope.ndim - 3))

    def over_batch(g: Any) -> Any:
        return xp.sum(g, axis=batch_axes) if batch_axes else g

    c_t = xp.matrix_transpose(x.c_kv)  # (..., 1, d_c, S)
    d_c = xp.sum(d_k_nope @ x.w_uk + grads.dv @ x.w_uv, axis=-3, keepdims=True)
    return {
        "q": xp.concat([grads.dq[..., :x.nope], x.unrotate(grads.dq[..., x.nope:], x.positions)], axis=-1),
        "c_kv": d_c,
        "k_pe": x.unrotate(xp.sum(d_k_rot, axis=-3, keepdims=True), x.key_positions),
        "w_uk": over_batch(xp.matrix_transpose(c_t @ d_k_nope)),  # (H, d_nope, d_c)
        "w_uv": over_batch(xp.matrix_transpose(c_t @ grads.dv)),  # (H, E, d_c)
    }


def _mla_inputs(seed: int, *, batch: int, heads: int, length: int, key_length: int, nope: int, rot: int,
                latent: int, value_dim: int) -> dict[str, Any]:
    return {
        "q": random.normal((batch, heads, length, nope + rot), seed=(seed, 0)),
        "c_kv": random.normal((batch, 1, key_length, latent), seed=(seed, 1)),
        "k_pe": random.normal((batch, 1, key_length, rot), seed=(seed, 2)),
        "w_uk": random.normal((heads, nope, latent), seed=(seed, 3)) / latent ** 0.5,
        "w_uv": random.normal((heads, value_dim, latent), seed=(seed, 4)) / latent ** 0.5,
    }


def _cases(size: str, seed: int) -> list[Case]:
    n = {"tiny": 4, "small": 16, "medium": 64, "large": 256}[size]
    shapes = dict(batch=2, heads=4, length=n, key_length=n + n // 2 + 1, nope=8, rot=4, latent=12, value_dim=6)
    inputs = _mla_inputs(seed, **shapes)
    square = _mla_inputs(seed, **{**shapes, "key_length": n})
    positional = ("q", "c_kv", "k_pe")
    scale = (8 + 4) ** -0.5
    return [
        Case("naive", inputs, {"scale": scale}, positional=positional, seed=seed),
        Case("absorbed", inputs, {"scale": scale, "form": "absorbed"}, positional=positional, seed=seed),
        Case("causal", square, {"scale": scale, "causal": True}, positional=positional, seed=seed),
        Case("decode_half_rope", inputs, {"scale": scale, "form": "absorbed", "rope": "half", "causal": "bottom_right"},
             positional=positional, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    rot = max(2, dim // 2 - dim // 2 % 2)
    inputs = _mla_inputs(seed, batch=1, heads=heads, length=seq, key_length=seq, nope=dim, rot=rot, latent=4 * dim,
                         value_dim=dim)
    return Case("example", inputs, {"scale": (dim + rot) ** -0.5, "causal": True}, positional=("q", "c_kv", "k_pe"),
                seed=seed)


def _reference(q: Any, c_kv: Any, k_pe: Any, /, **params: Any) -> Any:
    """The other form (naive ↔ absorbed) on the dense kernel."""
    other = "absorbed" if params.get("form", "naive") == "naive" else "naive"
    return mla_attention(q, c_kv, k_pe, **{**params, "form": other, "implementation": "dense"})


register(Mechanism(
    key="mla",
    function=mla_attention,
    family="A. core",
    paper="DeepSeek-AI 2024, DeepSeek-V2 (arXiv:2405.04434) §2.1.2-2.1.3, App. C; DeepSeek-V3 (arXiv:2412.19437) §2.1.1",
    params={
        "w_uk": "(H, d_nope, d_c) key up-projection",
        "w_uv": "(H, E, d_c) value up-projection",
        "scale": "required: DeepSeek (d_nope + d_rope)^-0.5 (x mscale^2 under YaRN)",
        "form": "'naive' (decompress k, v) | 'absorbed' (one shared latent kv head, FlashMLA)",
        "rope": "'interleaved' (DeepSeek, default) | 'half' | None (already rotated)",
        "positions": "query positions (..., L); default arange(S - L, S)",
        "key_positions": "key positions (..., S); default arange(S)",
        "rope_base": "theta base, default 10000",
        "mask": "boolean (..., H, L, S)-broadcastable, True = attend",
        "causal": "False | True | 'top_left' | 'bottom_right'",
    },
    cases=_cases,
    reference=_reference,
    returns_lse=True,
    example=_example,
    vjp=_mla_vjp,
))
