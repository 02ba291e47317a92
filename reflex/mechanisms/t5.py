"""T5 relative position bias (Raffel et al. 2020): bucketed relative positions → a learned per-head bias."""

from __future__ import annotations

import math
from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, example_qkv, qkv
from reflex.mechanisms._patterns import mask_and_causal
from reflex.mechanisms._numerics import unbroadcast
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["t5_bias_attention", "t5_relative_position_bucket", "t5_bias"]


def _check_buckets(bidirectional: bool, num_buckets: int, max_distance: int) -> tuple[int, int]:
    """``(buckets per direction, max_exact)``, validated so that the log formula is defined."""
    for name, value in (("num_buckets", num_buckets), ("max_distance", max_distance)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int; got {value!r}")
    per_direction = num_buckets // 2 if bidirectional else num_buckets
    max_exact = per_direction // 2
    if max_exact < 1:
        raise ValueError(f"num_buckets must be >= {4 if bidirectional else 2} (bidirectional={bidirectional}); got {num_buckets}")
    if max_distance <= max_exact:
        raise ValueError(f"max_distance must exceed the {max_exact} exact buckets; got {max_distance}")
    return per_direction, max_exact


@typed_options()
def t5_relative_position_bucket(relative_position: Any, /, *, bidirectional: bool = True, num_buckets: int = 32,
                                max_distance: int = 128) -> Any:
    """T5 bucket ids (int64) of integer relative positions ``j − i``, bit for bit as Hugging Face T5.

    .. math::

        n = |r| \\;(\\text{bidirectional, plus } N/2 \\text{ when } r > 0), \\quad n = \\max(-r, 0)
        \\;(\\text{unidirectional});\\qquad
        \\mathrm{bucket} = \\begin{cases} n & n < e \\\\
        \\min\\!\\Big(e + \\Big\\lfloor \\frac{\\log(n / e)}{\\log(M / e)} (N' - e) \\Big\\rfloor,\\; N' - 1\\Big) & n \\ge e
        \\end{cases}

    with N' = N/2 (bidirectional) or N buckets per direction, e = N'/2 exact buckets, M =
    ``max_distance``. Unidirectional (decoder) buckets send future positions (r > 0) to bucket 0.

    Float32 convention (Hugging Face ``T5Attention._relative_position_bucket``, Mesh TensorFlow):
    the logarithmic branch runs in float32 even in float64 models — ``float32(n) / float32(e)``,
    its log, ``/ float32(log(M / e))``, ``· float32(N' − e)``, each rounded to float32, then
    truncated toward zero. The float32 log is taken as the correctly rounded one,
    ``float32(log_float64(a))``. A float64 formula, or NumPy's own float32 ``log`` (1 ulp off on a
    few percent of inputs), picks different buckets in some configurations (e.g. unidirectional
    N = 9, M = 128 at n = 8, 16, 64). torch's CPU float32 ``log`` (MKL VML) is itself not
    correctly rounded and its result depends on the instruction set MKL dispatches to, so exotic
    configurations can still differ from a given torch build (e.g. bidirectional N = 40,
    M = 95758 at |r| = 6121 on AVX-512); every standard configuration agrees.

    Raises ``ValueError`` when fewer than one exact bucket per direction exists or
    ``max_distance`` ≤ e (Hugging Face divides by zero there). Positions beyond 2²⁴ are rounded to
    float32 first, as in Hugging Face.

    Reference: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
    Text-to-Text Transformer", JMLR, §2.1 (relative position embeddings).
    """
    per_direction, max_exact = _check_buckets(bidirectional, num_buckets, max_distance)
    xp = namespace(relative_position)
    if not xp.isdtype(relative_position.dtype, "integral"):
        raise TypeError(f"relative_position must be an integer array; got dtype {relative_position.dtype}")
    dev = device_of(relative_position)
    rel = xp.astype(relative_position, xp.int64)
    buckets = xp.zeros(rel.shape, dtype=xp.int64, device=dev)
    if bidirectional:
        buckets = buckets + xp.astype(rel > 0, xp.int64) * per_direction
        n = xp.abs(rel)
    else:
        n = -xp.minimum(rel, xp.zeros_like(rel))
    small = n < max_exact
    f32 = xp.float32
    ratio = xp.astype(xp.where(small, max_exact, n), f32) / xp.asarray(float(max_exact), dtype=f32, device=dev)
    log_ratio = xp.astype(xp.log(xp.astype(ratio, xp.float64)), f32)  # correctly rounded float32 log
    scaled = (log_ratio / xp.asarray(math.log(max_distance / max_exact), dtype=f32, device=dev)
              ) * xp.asarray(float(per_direction - max_exact), dtype=f32, device=dev)
    large = xp.clip(max_exact + xp.astype(scaled, xp.int64), max=per_direction - 1)  # scaled ≥ 0: truncation
    return buckets + xp.where(small, n, large)


class _TableTerm:
    """Index-grid bias ``table[bucket(j − i − offset), h]`` → ``(H, l, s)``, with its VJP (a
    differentiable callable term of the engine): ``d table[n, h] = Σ_{ij: bucket = n} d b_hij``,
    a deterministic scatter-add done as a one-hot product."""

    def __init__(self, table: Any, offset: int, bidirectional: bool, num_buckets: int, max_distance: int) -> None:
        self.table, self.offset = table, offset
        self.options = dict(bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
        self.xp = namespace(table)
        self.params = {"table": table}

    def _buckets(self, rows: Any, cols: Any) -> Any:
        return t5_relative_position_bucket(cols - rows - self.offset, **self.options)

    def __call__(self, rows: Any, cols: Any) -> Any:
        xp = self.xp
        buckets = self._buckets(rows, cols)
        values = xp.take(self.table, xp.reshape(buckets, (-1,)), axis=0)  # (l·s, H)
        values = xp.reshape(values, (*buckets.shape, int(self.table.shape[-1])))
        return xp.permute_dims(values, (2, 0, 1))

    def vjp(self, rows: Any, cols: Any, d_value: Any) -> dict[str, Any]:
        xp = self.xp
        heads, num_buckets = int(self.table.shape[-1]), int(self.table.shape[0])
        buckets = xp.reshape(self._buckets(rows, cols), (-1, 1))  # (l·s, 1)
        d_value = unbroadcast(xp, d_value, (heads, *d_value.shape[-2:]))  # (H, l, s)
        ids = xp.reshape(xp.arange(num_buckets, dtype=buckets.dtype, device=device_of(buckets)), (1, num_buckets))
        one_hot = xp.astype(buckets == ids, d_value.dtype)  # (l·s, N)
        per_position = xp.reshape(xp.permute_dims(d_value, (1, 2, 0)), (-1, heads))  # (l·s, H)
        return {"table": xp.matrix_transpose(one_hot) @ per_position}


def _table_term(table: Any, offset: int, bidirectional: bool, num_buckets: int, max_distance: int) -> _TableTerm:
    """Index-grid bias ``table[bucket(j − i − offset), h]`` → ``(H, l, s)``."""
    return _TableTerm(table, offset, bidirectional, num_buckets, max_distance)


def _check_table(table: Any, num_buckets: int | None) -> int:
    if table.ndim != 2:
        raise ValueError(f"table must have shape (num_buckets, H) (Hugging Face relative_attention_bias.weight); got {tuple(table.shape)}")
    if num_buckets is not None and int(table.shape[0]) != num_buckets:
        raise ValueError(f"table has {int(table.shape[0])} rows; num_buckets is {num_buckets}")
    return int(table.shape[0])


@typed_options()
def t5_bias(table: Any, /, length: int, key_length: int, *, bidirectional: bool = True, num_buckets: int | None = None,
            max_distance: int = 128, query_offset: int = 0) -> Any:
    """The T5 position bias ``(H, L, S)``: ``table[bucket(j − (i + query_offset)), h]``.

    ``table (num_buckets, H)`` is Hugging Face's ``relative_attention_bias.weight``; the result
    equals ``T5Attention.compute_bias(L, S, past_seen_tokens=query_offset)[0]``. ``num_buckets``
    defaults to the table's rows. Buckets: :func:`t5_relative_position_bucket`.
    """
    xp = namespace(table)
    num_buckets = _check_table(table, num_buckets)
    dev = device_of(table)
    rows = xp.reshape(xp.arange(length, dtype=xp.int64, device=dev), (length, 1))
    cols = xp.reshape(xp.arange(key_length, dtype=xp.int64, device=dev), (1, key_length))
    return _table_term(table, query_offset, bidirectional, num_buckets, max_distance)(rows, cols)


@typed_options()
def t5_bias_attention(q: Any, k: Any, v: Any, /, *, table: Any, bidirectional: bool = True, max_distance: int = 128,
                      query_offset: int = 0, causal: bool | str = False, scale: float | None = None,
                      return_lse: bool = False, compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """T5 bias: softmax attention plus a learned scalar per head and relative-position bucket.

    .. math::

        O = \\mathrm{softmax}\\big(\\mathrm{scale}\\cdot QK^\\top + B\\big) V, \\qquad
        B_{hij} = T\\big[\\mathrm{bucket}(j - i - \\mathrm{query\\_offset}),\\, h\\big]

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)``, ``table (N, H)`` →
    ``(..., H, L, E)``.

    Args:
        table: ``(num_buckets, H)`` bias table (Hugging Face ``relative_attention_bias.weight``).
        bidirectional: encoder buckets (True) or decoder buckets (False: future → bucket 0).
        max_distance: positions at or beyond it share the last bucket (default 128).
        query_offset: query i sits at position i + query_offset (Hugging Face
            ``past_seen_tokens``; S − L for a decoder step with a cache).
        causal, return_lse, compute_dtype, implementation: as :func:`reflex.full_attention`.
        scale: default 1/√D as everywhere in reflex; T5 itself uses ``scale=1.0`` (its 1/√D is
            folded into the initialisation).

    Buckets are bit-identical to Hugging Face T5 (see :func:`t5_relative_position_bucket`). The
    bias is an index-grid term: the tiled kernel computes buckets per tile, never ``L × S``.

    Gradients (:func:`reflex.vjp`): q, k, v through the engine's backward (FlashAttention-2,
    Dao 2023, Alg. 2); the table through the bias term, ``dT[n, h] = Σ_{b; i,j: bucket(j−i−offset)=n}
    dZ_{bhij}`` (a deterministic one-hot product per tile, never a scatter with atomics).

    Reference: Raffel et al. 2020, JMLR, §2.1; Shaw et al. 2018 (relative positions).
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp = p.xp
    num_buckets = _check_table(table, None)
    if int(table.shape[1]) != p.heads:
        raise ValueError(f"table has {int(table.shape[1])} heads (columns); q has {p.heads}")
    _check_buckets(bidirectional, num_buckets, max_distance)
    masks, tile_active = mask_and_causal(p, None, causal)
    bias = _table_term(_kernels.check_array(xp, p.device, p.q.dtype, "table", table), query_offset, bidirectional, num_buckets, max_distance)
    return _kernels.softmax_attention(p, scale=_kernels.resolve_scale(scale, p.dim), mask=masks, bias=bias,
                                      tile_active=tile_active, implementation=implementation, return_lse=return_lse)


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    shapes = dict(heads=d["H"], kv_heads=d["G"], length=d["L"], key_length=d["S"], dim=d["D"], value_dim=d["E"])
    gqa = qkv(seed, **shapes)
    table = random.normal((32, d["H"]), seed=(seed, 5))
    small = random.normal((9, d["H"]), seed=(seed, 6))
    offset = d["S"] - d["L"]
    return [
        Case("encoder", {**gqa, "table": table}, {"max_distance": 12}, seed=seed),
        Case("decoder_cache", {**gqa, "table": table},
             {"bidirectional": False, "query_offset": offset, "causal": "bottom_right", "scale": 1.0}, seed=seed),
        Case("float32_log_config", {**gqa, "table": small}, {"bidirectional": False, "max_distance": 128}, seed=seed),
    ]


def _reference(q: Any, k: Any, v: Any, /, *, table: Any, bidirectional: bool = True, max_distance: int = 128,
               query_offset: int = 0, causal: bool | str = False, **params: Any) -> Any:
    """``full_attention`` (dense) with the materialised :func:`t5_bias`."""
    from reflex.mechanisms.full import full_attention

    bias = t5_bias(table, q.shape[-2], k.shape[-2], bidirectional=bidirectional, max_distance=max_distance,
                   query_offset=query_offset)
    return full_attention(q, k, v, bias=bias, causal=causal, implementation="dense", **params)


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    """Encoder buckets: a (32, H) table, max_distance 128 (the T5 defaults)."""
    inputs = {**example_qkv(seq, heads, dim, seed), "table": random.normal((32, heads), seed=(seed, 3))}
    return Case("example", inputs, {}, seed=seed)


register(Mechanism(
    key="t5_bias",
    function=t5_bias_attention,
    family="H. positional biases and encodings",
    paper="Raffel et al. 2020 (T5), JMLR, §2.1",
    params={
        "table": "(num_buckets, H) learned bias per bucket and head",
        "bidirectional": "encoder (True) or decoder (False) buckets",
        "max_distance": "positions >= it share the last bucket (default 128)",
        "query_offset": "query i sits at position i + query_offset (past_seen_tokens)",
        "causal": "False | True | 'top_left' | 'bottom_right'",
    },
    cases=_cases,
    reference=_reference,
    returns_lse=True,
    example=_example,
    vjp=_kernels.engine_vjp(t5_bias_attention),
))
