"""Reformer LSH attention: angular hashing, sorted chunks, rounds combined by their logsumexp."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._inputs import check_padding_mask
from reflex.mechanisms._patterns import check_positive_int, index_counts, parse_causal
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options
from reflex.mechanisms.lsh_hashing import (_bucketing, _factors, _hash, _numba, _rotations, _unit_keys, lsh_buckets,
                                           lsh_keys, lsh_sort, unit_keys_vjp)

__all__ = ["lsh_attention", "lsh_pattern"]

SELF_SCORE = -1e5     # the score of a query's own position (HF ``self_mask_value_float32``)

# --- chunk windows -------------------------------------------------------------------------------

def _windows(xp: Any, order_flat: Any, chunk: int, before: int, after: int) -> Any:
    """``(..., n_chunks, (before+1+after)·chunk)`` key positions of each chunk's window (wrapping)."""
    total = int(order_flat.shape[-1])
    n_chunks = total // chunk
    dev = device_of(order_flat)
    t = xp.reshape(xp.arange(n_chunks, dtype=xp.int64, device=dev), (n_chunks, 1, 1))
    w = xp.reshape(xp.arange(-before, after + 1, dtype=xp.int64, device=dev), (1, before + after + 1, 1))
    s = xp.reshape(xp.arange(chunk, dtype=xp.int64, device=dev), (1, 1, chunk))
    slots = xp.reshape(((t + w) % n_chunks) * chunk + s, (-1,))
    windows = xp.take(order_flat, slots, axis=-1)
    return xp.reshape(windows, (*order_flat.shape[:-1], n_chunks, (before + after + 1) * chunk))


def _round_indices(xp: Any, windows: Any, order: Any, chunk: int) -> list[Any]:
    """Per round, each position's window ``(..., H, L, K)`` (the window of the chunk holding it)."""
    n_hashes, length = int(order.shape[-2]), int(order.shape[-1])
    undo = xp.argsort(order, axis=-1)  # slot of each position within its round
    span = int(windows.shape[-1])
    out = []
    for r in range(n_hashes):
        chunk_of = (xp.astype(undo[..., r, :], xp.int64) + r * length) // chunk
        idx = xp.broadcast_to(xp.expand_dims(chunk_of, axis=-1), (*chunk_of.shape, span))
        out.append(xp.take_along_axis(windows, idx, axis=-2))
    return out


def _allowed(causal: bool, real: Any = None) -> Any:
    """Keys a query may attend besides itself: not itself, (causal) not later, (padding) real.

    ``real``: boolean ``(..., L)`` padding mask or None; ``cols`` is a ``(1, s)`` grid (dense) or the
    gathered key positions ``(..., H, l, K)`` (gather)."""
    def allowed(rows: Any, cols: Any) -> Any:
        keep = cols != rows
        keep = keep & (cols <= rows) if causal else keep
        if real is None:
            return keep
        xp = namespace(real)
        batch, length = tuple(real.shape[:-1]), int(real.shape[-1])
        if cols.ndim == 2:
            return keep & xp.reshape(real, (*batch, 1, 1, length))
        heads = int(cols.shape[-3])
        table = xp.broadcast_to(xp.reshape(real, (*batch, 1, length)), (*batch, heads, length))
        flat = xp.reshape(cols, (*batch, heads, -1))
        return keep & xp.reshape(xp.take_along_axis(table, xp.where(flat < 0, 0, flat), axis=-1), tuple(cols.shape))
    return allowed


def _pad_buckets(xp: Any, buckets: Any, real: Any, factors: tuple[int, ...]) -> Any:
    """Padded positions into an extra last bucket (HF): they sort after every real token of each round."""
    if real is None:
        return buckets
    extra = xp.asarray(math.prod(factors), dtype=buckets.dtype, device=device_of(buckets))
    return xp.where(xp.reshape(real, (*real.shape[:-1], 1, 1, int(real.shape[-1]))), buckets, extra)


# --- attention -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Plan:
    factors: tuple[int, ...]
    n_hashes: int
    chunk: int
    before: int
    after: int
    causal: bool
    scale: float


def _plan(p: _kernels.Prepared, n_buckets: Any, n_hashes: Any, chunk_length: Any, num_chunks_before: Any,
          num_chunks_after: Any, causal: Any, scale: Any) -> _Plan:
    plan = _Plan(_factors(n_buckets), check_positive_int("n_hashes", n_hashes),
                 check_positive_int("chunk_length", chunk_length),
                 check_positive_int("num_chunks_before", num_chunks_before, minimum=0),
                 check_positive_int("num_chunks_after", num_chunks_after, minimum=0),
                 parse_causal(causal) is not None, _kernels.resolve_scale(scale, p.dim))
    if p.heads != p.kv_heads:
        raise ValueError(f"v has {p.kv_heads} heads; qk has {p.heads}: shared-QK attention needs equal heads")
    if p.length > plan.chunk and (plan.n_hashes * p.length) % plan.chunk:
        raise ValueError(f"n_hashes·L = {plan.n_hashes}·{p.length} must be a multiple of chunk_length ({plan.chunk})")
    return plan


def _self_only(xp: Any, out: Any, lse: Any, v: Any, copies: Any) -> tuple[Any, Any]:
    """Rows with nothing but themselves: output v_i, lse = SELF_SCORE + log(copies of i in the window)."""
    empty = lse == -math.inf
    out = xp.where(xp.expand_dims(empty, axis=-1), v, out)
    lse = xp.where(empty, SELF_SCORE + xp.log(xp.astype(xp.where(empty, copies, 1), lse.dtype)), lse)
    return out, lse


def _rounds(p: _kernels.Prepared, plan: _Plan, rot: Any, use_numba: bool, real: Any = None) -> tuple[Any, Any]:
    """Per-round ``out (..., H, n_hashes, L, E)`` and ``lse (..., H, n_hashes, L)`` of the hashed path."""
    xp = p.xp
    keys = _unit_keys(xp, p.q)
    length = p.length
    if use_numba:
        kernels = _bucketing()
        n = math.prod(p.batch)
        q4 = xp.reshape(p.q, (n, p.heads, length, p.dim))
        buckets = kernels.hash_vectors(q4, rot, plan.factors)
        order = kernels.counting_sort(buckets, math.prod(plan.factors))
        out, lse = kernels.chunked_attention(
            q4, xp.reshape(keys, (n, p.heads, length, p.dim)), xp.reshape(p.v, (n, p.heads, length, p.value_dim)),
            xp.reshape(order, (n, p.heads, plan.n_hashes * length)), chunk=plan.chunk, before=plan.before,
            after=plan.after, scale=plan.scale, causal=plan.causal, self_value=SELF_SCORE)
        return (xp.reshape(out, (*p.batch, p.heads, plan.n_hashes, length, p.value_dim)),
                xp.reshape(lse, (*p.batch, p.heads, plan.n_hashes, length)))
    order = lsh_sort(_pad_buckets(xp, _hash(xp, p.q, rot, plan.factors), real, plan.factors))
    windows = _windows(xp, xp.reshape(order, (*order.shape[:-2], -1)), plan.chunk, plan.before, plan.after)
    pk = dataclasses.replace(p, k=keys)
    rows = xp.reshape(xp.arange(length, dtype=xp.int64, device=p.device), (length, 1))
    outs, lses = [], []
    for idx in _round_indices(xp, windows, order, plan.chunk):
        out, lse = _kernels.gather(pk, idx, scale=plan.scale, mask=_allowed(plan.causal, real))
        copies = xp.sum(xp.astype(idx == rows, xp.int64), axis=-1)
        out, lse = _self_only(xp, out, lse, p.v, copies)
        outs.append(out)
        lses.append(lse)
    return xp.stack(outs, axis=-3), xp.stack(lses, axis=-2)


def _combine(xp: Any, out: Any, lse: Any) -> tuple[Any, Any]:
    """Rounds weighted by softmax over their lse: ``o = Σ_r e^{lse_r − LSE} o_r``, ``LSE = logsumexp_r lse_r``.

    The weights are formed as ``e^{lse_r − m} / Σ e^{lse_r' − m}`` (m = max_r lse_r) rather than
    Hugging Face's ``e^{lse_r − LSE}``: equal in exact arithmetic, but where every round sees only the
    query itself, lse ≈ −1e5 and rounding LSE costs ~1e-11 absolute, which HF's form carries into
    the output (o_i = v_i·(1 ± 1e-11)); this form gives v_i to round-off.
    """
    top = xp.max(lse, axis=-2, keepdims=True)
    shifted = xp.exp(lse - top)
    norm = xp.sum(shifted, axis=-2, keepdims=True)
    total = top + xp.log(norm)
    weights = shifted / norm
    return xp.sum(out * xp.expand_dims(weights, axis=-1), axis=-3), total[..., 0, :]


@typed_options()
def lsh_attention(qk: Any, v: Any, /, *, n_buckets: int | tuple[int, ...], chunk_length: int, n_hashes: int = 1,
                  rotations: Any = None, seed: Any = None, causal: bool | str = False, num_chunks_before: int = 1,
                  num_chunks_after: int = 0, attention_mask: Any = None, scale: float | None = None,
                  return_lse: bool = False, compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Reformer LSH self-attention (shared QK): hash, sort, attend within chunks, combine rounds.

    .. math::

        \\hat k_j = x_j / \\sqrt{\\overline{x_j^2} + 10^{-6}}, \\qquad
        s_{ij} = \\mathrm{scale}\\; x_i \\cdot \\hat k_j, \\qquad
        o_i^{(r)} = \\sum_{j \\in W_r(i)} \\frac{e^{s_{ij}}}{\\sum_{j' \\in W_r(i)} e^{s_{ij'}}} v_j,

        o_i = \\sum_r e^{\\mathrm{lse}^{(r)}_i - \\mathrm{LSE}_i}\\, o_i^{(r)}, \\qquad
        \\mathrm{LSE}_i = \\log \\sum_r e^{\\mathrm{lse}^{(r)}_i}

    Shapes: ``qk (..., H, L, D)`` (the shared query/key vectors), ``v (..., H, L, E)`` →
    ``out (..., H, L, E)`` (and ``lse (..., H, L)``). Self-attention only (S = L; no GQA: keys are
    the queries).

    Semantics (Hugging Face ``LSHSelfAttention``, quirks included; ``docs/conventions.md``):

    - Buckets per round: :func:`lsh_buckets` (argmax of ``[xR; −xR]``, first index on ties).
    - Sort: within each round by (bucket, position) (:func:`lsh_sort`); the sorted orders of all
      rounds are laid end to end and cut into chunks of ``chunk_length``.
    - Window ``W_r(i)``: the chunk holding query i's round-r copy, ``num_chunks_before`` previous and
      ``num_chunks_after`` later chunks *of that concatenated order, wrapping around* (the first
      chunk of round r sees the last chunk of round r−1; chunk 0 the last chunk of the last round).
      The window is not restricted to the query's bucket or round; a key present twice counts twice.
    - Masks: the query's own position is never attended when anything else is (HF scores it −1e5);
      ``causal`` removes keys at later positions (HF: −1e9). A round where the query sees only
      itself gives ``o = v_i`` and ``lse = −1e5 + log(copies of i in the window)``, which then has
      weight 0 against any round with another key (exactly, in float64).
    - Rounds are combined by softmax over their per-query lse (above); ``return_lse`` returns LSE.
    - When ``L ≤ chunk_length`` there is no hashing: full attention over all positions with the same
      self and causal rules (the rotations are then unused, ``n_hashes`` has no effect).

    The keys and counts each query attended: :func:`lsh_pattern`; the output equals
    ``full_attention(qk, lsh_keys(qk), v, scale=scale, mask=c > 0, bias=log c)`` with
    ``c = lsh_pattern(...)``. HF agreement is exact in float64 while real scores stay above
    −1e5 + 745 (otherwise HF's −1e5 self score would win where reflex never attends self).

    Args:
        n_buckets: even int, 1, or a tuple of even factors. chunk_length: chunk size.
        n_hashes: hash rounds. ``n_hashes·L`` must be a multiple of ``chunk_length`` when L > chunk.
        rotations: ``(H, D, n_hashes, n_buckets/2)`` (Σ factors / 2 when factorised); or ``seed``.
        causal: ``False`` or ``True``/``"top_left"``/``"bottom_right"`` (the same when S = L).
        num_chunks_before, num_chunks_after: the window (HF defaults 1 and 0).
        attention_mask: boolean ``(..., L)`` padding mask, True = real token. As Hugging Face:
            padded positions hash to an extra last bucket (so they sort after the real tokens of
            each round) and are never attended as keys (HF scores them −1e9; the self rule still
            applies, so a query with no other allowed key attends itself); padded queries keep
            their outputs. Runs on the array-API path (the Numba kernels take no mask).
        scale: multiplies ``x·k̂``; default 1/√D (HF divides k̂ by √D).
        return_lse, compute_dtype: as in :func:`reflex.full_attention`.
        implementation: ``"numba"`` (plain NumPy float64: hash, counting sort and chunked attention
            kernels), ``"array_api"`` (hashing and :func:`_kernels.gather`), ``"auto"``.

    References: Kitaev, Kaiser, Levskaya 2020, "Reformer: The Efficient Transformer", §2
    (LSH attention, shared-QK, causal and self masking, multi-round hashing) and §2.1 (chunking).
    """
    p = _kernels.prepare(qk, qk, v, compute_dtype=compute_dtype)
    plan = _plan(p, n_buckets, n_hashes, chunk_length, num_chunks_before, num_chunks_after, causal, scale)
    real = check_padding_mask(p, attention_mask)
    if real is not None and implementation == "numba":
        raise ValueError("attention_mask runs on the array-API path: the Numba kernels take no mask "
                         "(use implementation='auto' or 'array_api')")
    xp = p.xp
    if p.length == 0:
        out, lse = _kernels.empty_result(p)
    elif p.length <= plan.chunk:
        _numba(implementation, dtype_ok=True)
        pk = dataclasses.replace(p, k=_unit_keys(xp, p.q))
        out, lse = _kernels.dense(pk, scale=plan.scale, mask=_allowed(plan.causal, real))
        out, lse = _self_only(xp, out, lse, p.v, xp.ones(lse.shape, dtype=xp.int64, device=p.device))
    else:
        rot = _rotations(xp, p.device, p.q.dtype, p.heads, p.dim, plan.factors, plan.n_hashes, rotations, seed)
        use_numba = _numba(implementation, qk, v, rotations, dtype_ok=p.q.dtype == xp.float64 and real is None)
        out, lse = _combine(xp, *_rounds(p, plan, rot, use_numba, real))
    return (out, lse) if return_lse else out


@typed_options()
def lsh_pattern(qk: Any, /, *, n_buckets: int | tuple[int, ...], chunk_length: int, n_hashes: int = 1,
                rotations: Any = None, seed: Any = None, causal: bool | str = False, num_chunks_before: int = 1,
                num_chunks_after: int = 0, attention_mask: Any = None, per_round: bool = False,
                compute_dtype: Any = None) -> Any:
    """The keys each query attends in :func:`lsh_attention`, with multiplicities: int64 ``(..., H, L, L)``.

    ``c[i, j]`` counts the copies of key j in query i's windows over all rounds, excluding i itself
    and (causal) later positions; a row with no such key attends itself: ``c[i, i]`` = the copies of i
    in its windows (its lse is then ``−1e5 + log c[i, i]``, see :func:`lsh_attention`).
    ``per_round=True`` gives ``(..., H, n_hashes, L, L)`` per round with the same rule per round
    (``(..., H, 1, L, L)`` when L ≤ chunk_length: no hashing). Memory O(L²): for tests and small L.
    """
    p = _kernels.prepare(qk, qk, qk, compute_dtype=compute_dtype)
    plan = _plan(p, n_buckets, n_hashes, chunk_length, num_chunks_before, num_chunks_after, causal, None)
    real = check_padding_mask(p, attention_mask)
    xp, length = p.xp, p.length
    rows = xp.reshape(xp.arange(length, dtype=xp.int64, device=p.device), (length, 1))
    cols = xp.reshape(xp.arange(length, dtype=xp.int64, device=p.device), (1, length))
    allowed = xp.astype(_allowed(plan.causal, real)(rows, cols), xp.int64)
    eye = xp.astype(rows == cols, xp.int64)
    if length <= plan.chunk:
        raw = [xp.broadcast_to(allowed + eye, (*p.batch, p.heads, length, length))]
    else:
        rot = _rotations(xp, p.device, p.q.dtype, p.heads, p.dim, plan.factors, plan.n_hashes, rotations, seed)
        order = lsh_sort(_pad_buckets(xp, _hash(xp, p.q, rot, plan.factors), real, plan.factors))
        windows = _windows(xp, xp.reshape(order, (*order.shape[:-2], -1)), plan.chunk, plan.before, plan.after)
        raw = [index_counts(xp, idx, length) for idx in _round_indices(xp, windows, order, plan.chunk)]

    def attended(counts: list[Any]) -> Any:
        """Allowed keys' counts; the copies of i itself only where nothing else is allowed."""
        others = sum(c * allowed for c in counts[1:]) + counts[0] * allowed
        copies = sum(c * eye for c in counts[1:]) + counts[0] * eye
        return others + copies * xp.astype(xp.sum(others, axis=-1, keepdims=True) == 0, xp.int64)

    if per_round:
        return xp.stack([attended([c]) for c in raw], axis=-3)
    return attended(raw)


# --- registry ------------------------------------------------------------------------------------

def _reference(qk: Any, v: Any, /, *, rotations: Any = None, seed: Any = None, scale: float | None = None,
               compute_dtype: Any = None, **params: Any) -> Any:
    """Dense path: full attention over the shared keys, masked to the attended keys, bias log(count)."""
    from reflex.mechanisms.full import full_attention

    params.pop("implementation", None)
    counts = lsh_pattern(qk, rotations=rotations, seed=seed, compute_dtype=compute_dtype, **params)
    xp = namespace(counts)
    bias = xp.log(xp.astype(xp.where(counts > 0, counts, 1), xp.float64))
    d = int(qk.shape[-1])
    return full_attention(qk, lsh_keys(qk, compute_dtype=compute_dtype), v, mask=counts > 0, bias=bias,
                          scale=1 / math.sqrt(d) if scale is None else scale, compute_dtype=compute_dtype)

def _vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, **params: Any) -> dict:
    """VJP of :func:`lsh_attention` (array-API path; hashing, sorting and chunk windows are constants).

    Rounds are merged by their lse: with ``w_r = e^{lse_r − LSE}``, ``dO_r = w_r·dO`` and
    ``dlse_r = w_r·(dL + dO·(O_r − O))``. A round's engine call (gather over its windows, or one dense
    call without hashing) gives ``dq``, ``dk̂``, ``dv``; a row that saw only itself has ``O_r = v_i``
    and a constant lse, so it passes ``dO_r`` to ``dv_i`` alone. The shared input gets
    ``d qk = Σ dq + unit_keys_vjp(Σ dk̂)``; ``rotations`` get 0 (padding, too, is a constant mask).
    """
    # attention_mask: padded keys are a constant mask of the recorded calls
    array_api = lambda length, key_length, requested: "array_api"  # noqa: E731 (the Numba kernels have no backward)
    (out, lse), calls = _kernels.run_recorded(lsh_attention, inputs, params, return_lse=True, implementation=array_api)
    qk, v = inputs["qk"], inputs["v"]
    xp = namespace(qk, v)
    if not calls:  # L = 0
        dtype = _kernels.resolve_dtype(xp, params.get("compute_dtype"))
        return {n: xp.zeros(inputs[n].shape, dtype=dtype, device=device_of(qk)) for n in ("qk", "v")}
    p = calls[0].p
    dtype = p.q.dtype
    d_out = xp.astype(d_out, dtype)
    d_total = xp.zeros(lse.shape, dtype=dtype, device=p.device) if d_lse is None else xp.astype(d_lse, dtype)
    rows = xp.reshape(xp.arange(p.length, dtype=xp.int64, device=p.device), (p.length, 1))
    rounds = []
    for call in calls:
        if call.indices is None:
            copies = xp.ones(call.lse.shape, dtype=xp.int64, device=p.device)
        else:
            copies = xp.sum(xp.astype(call.indices == rows, xp.int64), axis=-1)
        rounds.append(_self_only(xp, call.out, call.lse, p.v, copies))
    # w_r = e^{lse_r − m} / Σ e^{lse_r' − m} as in _combine (e^{lse_r − LSE} loses ~1e-11 at lse ≈ −1e5)
    top = rounds[0][1]
    for _, round_lse in rounds[1:]:
        top = xp.maximum(top, round_lse)
    shifted = [xp.exp(round_lse - top) for _, round_lse in rounds]
    norm = shifted[0]
    for s in shifted[1:]:
        norm = norm + s
    d_q = d_keys = d_v = None
    for call, (round_out, _), s in zip(calls, rounds, shifted):
        empty = call.lse == -math.inf
        weight = s / norm
        d_round = weight[..., None] * d_out
        d_round_lse = weight * (d_total + xp.sum(d_out * (round_out - out), axis=-1))
        keep = xp.logical_not(empty)
        g = call.backward(xp.where(keep[..., None], d_round, 0.0), xp.where(keep, d_round_lse, 0.0))
        dv = g.dv + xp.where(empty[..., None], d_round, 0.0)  # a self-only row outputs v_i
        d_q, d_keys, d_v = (g.dq, g.dk, dv) if d_q is None else (d_q + g.dq, d_keys + g.dk, d_v + dv)
    grads = {"qk": d_q + unit_keys_vjp(xp, p.q, d_keys), "v": d_v}
    if inputs.get("rotations") is not None:  # they only choose buckets: a constant selection
        grads["rotations"] = xp.zeros(inputs["rotations"].shape, dtype=dtype, device=p.device)
    return grads



def _cases(size: str, seed: int) -> list[Case]:
    base = {"tiny": 16, "small": 32, "medium": 128, "large": 512}[size]
    heads, dim = 2, 8
    qk = random.normal((2, heads, base, dim), seed=(seed, 0))
    v = random.normal((2, heads, base, 6), seed=(seed, 2))

    def rot(n_hashes: int, half: int, stream: int) -> Any:
        return random.normal((heads, dim, n_hashes, half), seed=(seed, stream))

    common = {"qk": qk, "v": v}
    padded = random.uniform((2, base), seed=(seed, 9)) < 2.0  # item 1's last quarter is padding
    padded[1, base - base // 4:] = False
    return [
        Case("hashed", {**common, "rotations": rot(2, 2, 3)}, {"n_buckets": 4, "n_hashes": 2, "chunk_length": 4},
             positional=("qk", "v"), seed=seed),
        Case("causal", {**common, "rotations": rot(2, 2, 3)},
             {"n_buckets": 4, "n_hashes": 2, "chunk_length": 4, "causal": True}, positional=("qk", "v"), seed=seed),
        Case("factorised", {**common, "rotations": rot(3, 3, 4)},
             {"n_buckets": [2, 4], "n_hashes": 3, "chunk_length": 8}, positional=("qk", "v"), seed=seed),
        Case("window_after", {**common, "rotations": rot(1, 2, 5)},
             {"n_buckets": 4, "n_hashes": 1, "chunk_length": 4, "num_chunks_after": 1}, positional=("qk", "v"),
             seed=seed),
        Case("no_hashing", common, {"n_buckets": 4, "chunk_length": base, "seed": seed}, positional=("qk", "v"),
             seed=seed),
        Case("padded", {**common, "rotations": rot(2, 2, 3), "attention_mask": padded},
             {"n_buckets": 4, "n_hashes": 2, "chunk_length": 4, "causal": True}, positional=("qk", "v"), seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    inputs = {"qk": random.normal((1, heads, seq, dim), seed=(seed, 0)), "v": random.normal((1, heads, seq, dim), seed=(seed, 2))}
    chunk = 4 if seq % 4 == 0 else seq
    return Case("example", inputs, {"n_buckets": 4, "n_hashes": 2, "chunk_length": chunk, "seed": seed},
                positional=("qk", "v"), seed=seed)


def _registry_pattern(qk: Any, v: Any, /, **params: Any) -> Any:
    params.pop("implementation", None)
    params.pop("scale", None)
    return lsh_pattern(qk, **params)


register(Mechanism(
    key="lsh",
    function=lsh_attention,
    family="C. content-sparse",
    paper="Kitaev, Kaiser, Levskaya 2020, Reformer §2; matches Hugging Face LSHSelfAttention",
    params={
        "n_buckets": "even int, 1, or tuple of even factors",
        "n_hashes": "hash rounds, combined by their logsumexp",
        "chunk_length": "chunk size of the sorted order",
        "rotations": "(H, D, n_hashes, n_buckets/2) Gaussian rotations, or seed",
        "seed": "int seed for the rotations (reflex.random)",
        "causal": "mask later positions",
        "num_chunks_before": "previous chunks attended (default 1)",
        "num_chunks_after": "later chunks attended (default 0)",
        "scale": "score scale, default 1/sqrt(D)",
    },
    cases=_cases,
    reference=_reference,
    returns_lse=True,
    row_separable=False,
    example=_example,
    pattern=_registry_pattern,
    vjp=_vjp,
))
