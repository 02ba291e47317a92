"""Full (dense) softmax attention: the reference every restricted mechanism is checked against."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, qkv
from reflex.mechanisms._engine.extra import sequence_offset
from reflex.mechanisms._patterns import chunk_pattern, mask_and_causal
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import Int, typed_options

__all__ = ["full_attention"]


@typed_options(attention_chunk=Int(minimum=1, optional=True))
def full_attention(q: Any, k: Any, v: Any, /, *, mask: Any = None, bias: Any = None, causal: bool | str = False,
                   scale: float | None = None, softcap: float | None = None, dropout_mask: Any = None,
                   dropout_p: float = 0.0, attention_chunk: int | None = None, qv: Any = None,
                   return_lse: bool = False, compute_dtype: Any = None,
                   implementation: str = "auto") -> Any:
    """Scaled dot-product softmax attention with masks, biases, causal alignment, softcap and GQA.

    .. math::

        O = \\mathrm{softmax}\\big(\\mathrm{cap}(\\mathrm{scale}\\cdot QK^\\top) + \\mathrm{bias}
            + \\log \\mathrm{mask}\\big)\\, V, \\qquad \\mathrm{cap}(x) = c\\tanh(x / c)

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``out (..., H, L, E)``,
    with any number of leading batch axes ``...`` (including none), equal on q, k, v.

    Args:
        mask: boolean, True = attend, broadcastable to ``(..., H, L, S)``.
        bias: additive scores, broadcastable to ``(..., H, L, S)`` (−∞ entries act as a mask).
        causal: ``False``; ``True`` or ``"top_left"`` (key j ≤ i, torch SDPA ``is_causal``);
            ``"bottom_right"`` (j ≤ i + S − L, flash-attn; the last query sees every key).
        scale: multiplies q·k; default 1/√D.
        softcap: c > 0 applies ``c·tanh(s/c)`` to the scaled scores before bias and mask
            (Gemma 2; as flash-attn and ONNX Attention).
        dropout_mask: boolean keep mask broadcastable to ``(..., H, L, S)``, True = keep; used when
            ``dropout_p > 0`` (required then: reflex draws no random numbers, build one with
            :mod:`reflex.random`). ``O = (P∘M)·V/(1 − p)`` with P the undropped probabilities.
        dropout_p: the dropout rate p in [0, 1); 0 (default) is no dropout and ignores the mask.
            The lse is the undropped one (flash-attn's reference ``attention_ref``).
        attention_chunk: c ≥ 1, Llama-4 chunked attention (flash-attn 3 ``attention_chunk``): query i
            sits at ``t = i + S − L`` (bottom-right, whatever ``causal`` says) and sees only keys
            ``c·⌊t/c⌋ ≤ j < c·⌊t/c⌋ + c``; intersected with ``mask`` and ``causal``.
        qv: ``(..., H, L, E)``, flash-attn 3's extra query against the values (MLA decode): the
            scores gain ``scale·qv·vᵀ`` (GQA as for k), and ``scale`` defaults to ``1/√(D + E)``.
            Differentiable (``reflex.vjp`` returns ``qv`` and the extra ``v`` gradient). Not combined
            with ``softcap`` (flash-attn caps the sum; reflex's engine caps q·kᵀ only): ValueError.
        return_lse: also return ``lse (..., H, L)``, the natural-log logsumexp of the final scores.
        compute_dtype: arithmetic dtype (default float64, whatever the inputs); the output has it.
        implementation: ``"dense"`` (materialise scores), ``"tiled"`` (online softmax over tiles,
            O(L·tile) memory, causal tiles skipped) or ``"auto"`` (tiled when L·S > 2²⁴).

    GQA/MQA: with G < H key/value heads, query head h uses kv head ``h // (H/G)``.
    A fully masked row gives output 0 and lse −∞ (never NaN). Output is in the caller's array
    library and on its device.

    References: Vaswani et al. 2017, "Attention Is All You Need", §3.2.1 (eq. 1); Shazeer 2019
    (multi-query); Ainslie et al. 2023 (GQA); Gemma Team 2024, "Gemma 2", §2 (logit soft-capping).
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    masks, tile_active = mask_and_causal(p, mask, causal, per_sequence=True)
    if attention_chunk is not None:
        chunk = chunk_pattern(attention_chunk, sequence_offset(p, "bottom_right", p.key_length - p.length))
        causal_tiles = tile_active
        masks = [*masks, chunk.allowed]
        tile_active = chunk.tile_active if causal_tiles is None else (
            lambda i0, i1, j0, j1: causal_tiles(i0, i1, j0, j1) and chunk.tile_active(i0, i1, j0, j1))
    softcap = _kernels.resolve_softcap(softcap)
    scale = _kernels.resolve_scale(scale, p.dim if qv is None else p.dim + p.value_dim)
    biases = [_kernels.check_term(p, "bias", bias, boolean=False)]
    if qv is not None:
        if softcap is not None:
            raise ValueError("qv cannot be combined with softcap: flash-attn caps q·kᵀ + qv·vᵀ, reflex's engine caps "
                             "q·kᵀ only")
        biases.append(QVTerm(p, qv, scale))
    return _kernels.softmax_attention(
        p, scale=scale, mask=masks, bias=biases if qv is not None else biases[0], softcap=softcap,
        tile_active=tile_active, implementation=implementation, return_lse=return_lse,
        dropout=_kernels.check_dropout(p, dropout_mask, dropout_p),
    )


class QVTerm:
    """flash-attn 3's ``qv`` as a differentiable bias term: ``term(rows, cols) = scale·qv[rows]·v[cols]ᵀ``.

    ``qv (..., H, L, E)`` against ``v (..., G, S, E)`` with query head h reading kv head
    ``h // (H/G)``. On the dense/tiled kernels' contiguous grids ``rows (l, 1)``, ``cols (1, s)``.
    ``vjp``: ``d_qv[rows] = scale·dZ·v[cols]``, ``d_v[cols] = scale·Σ_group dZᵀ·qv[rows]``.
    """

    def __init__(self, p: Any, qv: Any, scale: float) -> None:
        xp = p.xp
        expected = (*p.batch, p.heads, p.length, p.value_dim)
        if not hasattr(qv, "shape") or tuple(qv.shape) != expected:
            raise ValueError(f"qv must have shape (..., H, L, E) = {expected}; got "
                             f"{tuple(qv.shape) if hasattr(qv, 'shape') else type(qv).__name__}")
        self.p, self.xp, self.scale = p, xp, scale
        self.qv = xp.astype(qv, p.q.dtype)
        self.params = {"qv": self.qv, "v": p.v}

    def _grouped_qv(self, i0: int, i1: int) -> Any:
        p = self.p
        x = self.qv[..., i0:i1, :]
        return self.xp.reshape(x, (*x.shape[:-3], p.kv_heads, p.group, *x.shape[-2:]))

    @staticmethod
    def _span(grid: Any, axis: int) -> tuple[int, int]:
        first = int(grid[0, 0])
        return first, first + int(grid.shape[axis])

    def __call__(self, rows: Any, cols: Any) -> Any:
        xp, p = self.xp, self.p
        if cols.ndim != 2:
            raise NotImplementedError("qv is a term of the dense and tiled kernels (contiguous key tiles)")
        i0, i1 = self._span(rows, 0)
        j0, j1 = self._span(cols, 1)
        v = xp.expand_dims(p.v[..., j0:j1, :], axis=-3)
        value = self.scale * (self._grouped_qv(i0, i1) @ xp.matrix_transpose(v))
        return xp.reshape(value, (*value.shape[:-4], p.heads, i1 - i0, j1 - j0))

    def vjp(self, rows: Any, cols: Any, d_value: Any) -> dict[str, Any]:
        xp, p = self.xp, self.p
        i0, i1 = self._span(rows, 0)
        j0, j1 = self._span(cols, 1)
        dz = xp.broadcast_to(xp.reshape(d_value, (1,) * (len(p.score_shape) - d_value.ndim) + tuple(d_value.shape)),
                             (*p.batch, p.heads, i1 - i0, j1 - j0))
        dz = xp.reshape(dz, (*p.batch, p.kv_heads, p.group, i1 - i0, j1 - j0))
        v = xp.expand_dims(p.v[..., j0:j1, :], axis=-3)
        d_qv = xp.zeros(self.qv.shape, dtype=self.qv.dtype, device=p.device)
        d_qv[..., i0:i1, :] = xp.reshape(self.scale * (dz @ v), (*p.batch, p.heads, i1 - i0, p.value_dim))
        lead = (*p.batch, p.kv_heads)
        dz2 = xp.reshape(dz, (*lead, p.group * (i1 - i0), j1 - j0))
        qv2 = xp.reshape(self._grouped_qv(i0, i1), (*lead, p.group * (i1 - i0), p.value_dim))
        d_v = xp.zeros(p.v.shape, dtype=p.v.dtype, device=p.device)
        d_v[..., j0:j1, :] = self.scale * (xp.matrix_transpose(dz2) @ qv2)
        return {"qv": d_qv, "v": d_v}


def _flash_layout(x: Any) -> Any:
    """A host ``(..., H, L, D)`` array in flash-attn's ``(..., L, H, D)`` layout."""
    from reflex.backends import numpy_namespace

    return numpy_namespace().permute_dims(x, (*range(x.ndim - 3), x.ndim - 2, x.ndim - 3, x.ndim - 1))


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    shapes = dict(heads=d["H"], length=d["L"], key_length=d["S"], dim=d["D"], value_dim=d["E"])
    mha = qkv(seed, kv_heads=d["H"], **shapes)
    gqa = qkv(seed, kv_heads=d["G"], **shapes)
    score_shape = (2, d["H"], d["L"], d["S"])
    mask = random.uniform(score_shape, seed=(seed, 3)) < 0.7
    mask[..., 0, :] = False  # one fully masked row per head: output 0, lse -inf
    bias = random.normal(score_shape, seed=(seed, 4))
    return [
        Case("mha", mha, {}, seed=seed),
        Case("gqa", gqa, {}, seed=seed),
        Case("causal_top_left", gqa, {"causal": "top_left"}, seed=seed),
        Case("causal_bottom_right", gqa, {"causal": "bottom_right"}, seed=seed),
        Case("mask", {**gqa, "mask": mask}, {}, seed=seed),
        Case("bias", {**gqa, "bias": bias}, {}, seed=seed),
        Case("softcap", gqa, {"softcap": 2.0, "scale": 1.0}, seed=seed),
        Case("sinks", {**gqa, "mask": mask, "sinks": random.normal((d["H"],), seed=(seed, 5))}, {}, seed=seed),
        Case("dropout", {**gqa, "dropout_mask": random.uniform(score_shape, seed=(seed, 6)) >= 0.25},
             {"dropout_p": 0.25, "causal": "bottom_right"}, seed=seed),
        Case("layout_blhd", {name: _flash_layout(x) for name, x in gqa.items()}, {"layout": "blhd", "causal": "bottom_right"},
             seed=seed),
    ]


def _reference(q: Any, k: Any, v: Any, /, **params: Any) -> Any:
    """The dense path of :func:`full_attention`."""
    return full_attention(q, k, v, **params, implementation="dense")


register(Mechanism(
    key="full",
    function=full_attention,
    family="A. core",
    paper="Vaswani et al. 2017 §3.2.1; Shazeer 2019 (MQA); Ainslie et al. 2023 (GQA); Gemma 2 2024 (softcap)",
    params={
        "mask": "boolean (..., H, L, S)-broadcastable, True = attend",
        "bias": "additive scores, (..., H, L, S)-broadcastable",
        "causal": "False | True | 'top_left' (j <= i) | 'bottom_right' (j <= i + S - L)",
        "scale": "score scale, default 1/sqrt(D)",
        "softcap": "c: scores -> c*tanh(scores/c) before bias and mask",
        "dropout_mask": "boolean keep mask (..., H, L, S)-broadcastable, True = keep (with dropout_p > 0)",
        "dropout_p": "dropout rate p in [0, 1): O = (P*M) V / (1 - p), lse undropped; 0 = no dropout",
        "attention_chunk": "c: query i (at t = i + S - L) sees keys c*floor(t/c) <= j < c*floor(t/c) + c (Llama 4)",
        "qv": "(..., H, L, E): scores gain scale*qv.v^T (FA3, MLA decode); scale defaults to 1/sqrt(D + E)",
    },
    cases=_cases,
    reference=_reference,
    returns_lse=True,
    vjp=_kernels.engine_vjp(full_attention),
))
