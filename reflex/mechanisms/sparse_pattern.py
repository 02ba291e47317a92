"""Attention over any explicit sparsity pattern: a boolean mask, a CSR key list, or a block mask."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import example_qkv, standard
from reflex.mechanisms._patterns import explicit_mask, index_counts
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import IntOrPair, typed_options

__all__ = ["sparse_pattern_attention"]

IMPLEMENTATIONS = ("auto", "dense", "tiled", "gather")


def _check_block_size(block_size: Any) -> tuple[int, int]:
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        block_size = (block_size, block_size)
    if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
            or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block_size)):
        raise ValueError(f"block_size must be a positive int or (query block, key block); got {block_size!r}")
    return int(block_size[0]), int(block_size[1])


def csr_indices(p: _kernels.Prepared, indptr: Any, indices: Any) -> Any:
    """A CSR pattern as padded key lists ``(L, K)`` (−1 = padding), K = the longest row; validated.

    ``indptr (L + 1,)`` and ``indices (nnz,)`` are integer arrays: row i's keys are
    ``indices[indptr[i]:indptr[i + 1]]``, each in ``[0, S)`` and distinct within the row.
    """
    xp = p.xp
    for name, a in (("indptr", indptr), ("indices", indices)):
        if not hasattr(a, "shape") or len(a.shape) != 1 or not xp.isdtype(a.dtype, "integral"):
            raise ValueError(f"csr {name} must be a 1-D integer array; got {getattr(a, 'shape', type(a).__name__)}")
    if int(indptr.shape[0]) != p.length + 1:
        raise ValueError(f"csr indptr must have L + 1 = {p.length + 1} entries; got {int(indptr.shape[0])}")
    indptr, indices = xp.astype(indptr, xp.int64), xp.astype(indices, xp.int64)
    nnz = int(indices.shape[0])
    starts, ends = indptr[:-1], indptr[1:]
    if int(indptr[0]) != 0 or int(indptr[-1]) != nnz or (p.length and not bool(xp.all(ends >= starts))):
        raise ValueError(f"csr indptr must start at 0, be non-decreasing and end at nnz = {nnz}")
    if nnz and (int(xp.min(indices)) < 0 or int(xp.max(indices)) >= p.key_length):
        raise ValueError(f"csr indices must lie in [0, {p.key_length}); got values in "
                         f"[{int(xp.min(indices))}, {int(xp.max(indices))}]")
    count = int(xp.max(ends - starts)) if p.length else 0
    slots = xp.reshape(starts, (p.length, 1)) + xp.reshape(xp.arange(count, dtype=xp.int64, device=p.device), (1, count))
    valid = slots < xp.reshape(ends, (p.length, 1))
    flat = xp.reshape(xp.where(valid, slots, 0), (-1,))
    keys = xp.reshape(xp.take(indices, flat, axis=0), (p.length, count)) if nnz else xp.zeros((p.length, count), dtype=xp.int64, device=p.device)
    keys = xp.where(valid, keys, -1)
    if count > 1:
        ordered = xp.sort(keys, axis=-1)
        if bool(xp.any((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0))):
            raise ValueError("csr indices must be distinct within each row (a key listed twice would count twice)")
    return keys


def block_term(p: _kernels.Prepared, block_mask: Any, block_size: tuple[int, int]) -> Any:
    """A mask term ``(rows, cols) -> block_mask[..., i // bq, j // bk]`` after validating the shape."""
    xp = p.xp
    bq, bk = block_size
    nbq, nbk = -(-p.length // bq), -(-p.key_length // bk)
    if not hasattr(block_mask, "shape") or not xp.isdtype(block_mask.dtype, "bool"):
        raise ValueError("block_mask must be a boolean array (..., ceil(L/bq), ceil(S/bk)), True = attend")
    if tuple(block_mask.shape[-2:]) != (nbq, nbk):
        raise ValueError(f"block_mask must end in (ceil(L/{bq}), ceil(S/{bk})) = {(nbq, nbk)}; got {tuple(block_mask.shape)}")
    _kernels.check_term(p, "block_mask", block_mask[..., :1, :1], boolean=True)  # leading axes vs (..., H)
    lead = tuple(block_mask.shape[:-2])
    flat_mask = xp.reshape(block_mask, (*lead, nbq * nbk))

    def allowed(rows: Any, cols: Any) -> Any:
        flat = (rows // bq) * nbk + cols // bk
        picked = xp.take(flat_mask, xp.reshape(flat, (-1,)), axis=len(lead))
        return xp.reshape(picked, (*lead, *flat.shape))

    return allowed


def _resolve(p: _kernels.Prepared, mask: Any, indptr: Any, indices: Any, block_mask: Any,
             block_size: Any) -> tuple[str, Any]:
    if (indptr is None) != (indices is None):
        raise ValueError("a csr pattern needs both indptr and indices")
    given = [name for name, value in (("mask", mask), ("indptr/indices", indptr), ("block_mask", block_mask))
             if value is not None]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of mask, indptr/indices (csr), block_mask; got {given or 'none'}")
    if mask is not None:
        return "mask", _kernels.check_term(p, "mask", mask, boolean=True)
    if indptr is not None:
        return "csr", csr_indices(p, indptr, indices)
    if block_size is None:
        raise ValueError("block_mask needs block_size (an int or (query block, key block))")
    return "block", block_term(p, block_mask, _check_block_size(block_size))


@typed_options(block_size=IntOrPair(minimum=1, optional=True))
def sparse_pattern_attention(q: Any, k: Any, v: Any, /, *, mask: Any = None, indptr: Any = None, indices: Any = None,
                             block_mask: Any = None,
                             block_size: Any = None, scale: float | None = None, return_lse: bool = False,
                             compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Softmax attention restricted to an explicit pattern: boolean mask, CSR key lists or block mask.

    .. math::

        O_i = \\mathrm{softmax}_{j \\in P_i}(\\mathrm{scale}\\; q_i \\cdot k_j)\\, v_j

    The primitive the position-sparse mechanisms compile to (Lin et al. 2021, "A Survey of
    Transformers", §4.1.1; Child et al. 2019 §4). Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``,
    ``v (..., G, S, E)`` → ``out (..., H, L, E)``; GQA: query head h reads kv head ``h // (H/G)``.

    Exactly one pattern form:
        mask: boolean broadcastable to ``(..., H, L, S)``, True = attend.
        indptr, indices: a CSR pattern, integer arrays ``indptr (L + 1,)`` and ``indices (nnz,)``:
            query i attends keys ``indices[indptr[i]:indptr[i+1]]`` (distinct, in ``[0, S)``), shared by
            every batch item and head — the scipy.sparse CSR layout.
        block_mask: boolean ``(..., ceil(L/bq), ceil(S/bk))`` (leading axes broadcast over ``(..., H)``)
            with ``block_size`` ``bq`` or ``(bq, bk)``: key j allowed for query i iff
            ``block_mask[..., i // bq, j // bk]``; the last blocks may be partial.
    Other args:
        scale: default 1/√D. return_lse: also return the logsumexp. compute_dtype: default float64.
        implementation: ``"dense"``, ``"tiled"`` (skips tiles the pattern leaves empty), ``"gather"``
            (each query's key list; the default for CSR), or ``"auto"``.

    A row with no allowed key outputs 0 and lse −∞. The output equals ``full_attention`` with the
    pattern expanded to a boolean ``(..., H, L, S)`` mask.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}; got {implementation!r}")
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    scale = _kernels.resolve_scale(scale, p.dim)
    form, term = _resolve(p, mask, indptr, indices, block_mask, block_size)
    if form == "csr" and implementation in ("auto", "gather"):
        out, lse = _kernels.gather(p, term, scale=scale)
        return (out, lse) if return_lse else out
    if form == "csr":
        term = index_counts(p.xp, term, p.key_length) > 0
    elif implementation == "gather":
        raise ValueError("implementation='gather' needs a csr pattern; a mask or block_mask runs dense or tiled")
    return _kernels.softmax_attention(p, scale=scale, mask=term, implementation=implementation, return_lse=return_lse)


def _pattern(q: Any, k: Any, v: Any, /, *, mask: Any = None, indptr: Any = None, indices: Any = None,
             block_mask: Any = None, block_size: Any = None, **_: Any) -> Any:
    """The pattern as a boolean ``(..., H, L, S)`` mask."""
    p = _kernels.prepare(q, k, v)
    xp = p.xp
    form, term = _resolve(p, mask, indptr, indices, block_mask, block_size)
    if form == "mask":
        return xp.broadcast_to(term, p.score_shape)
    if form == "csr":
        return xp.broadcast_to(index_counts(xp, term, p.key_length) > 0, p.score_shape)
    return explicit_mask(xp, p.device, p.score_shape, term)


def _cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    mask = random.uniform((2, d["H"], d["L"], d["S"]), seed=(seed, 3)) < 0.4
    mask[..., 0, :] = False  # a fully masked row: output 0, lse -inf
    bq, bk = 3, 2
    blocks = random.uniform((d["H"], -(-d["L"] // bq), -(-d["S"] // bk)), seed=(seed, 4)) < 0.5
    counts = random.integers((d["L"],), seed=(seed, 5), low=0, high=d["S"] + 1)
    counts[0] = 0
    keys = [random.choice((), seed=(seed, 6, i), population=d["S"], count=int(c)).reshape(-1) for i, c in enumerate(counts)]
    indptr = random.integers((d["L"] + 1,), seed=(seed, 7), low=0, high=1)  # int64 zeros (high is exclusive)
    indptr[1:] = counts.cumsum()
    indices = random.integers((int(counts.sum()),), seed=(seed, 8), low=0, high=1)
    for i, row in enumerate(keys):
        indices[indptr[i]:indptr[i + 1]] = row
    return [
        Case("mask", {**gqa, "mask": mask}, {}, seed=seed),
        Case("csr", {**gqa, "indptr": indptr, "indices": indices}, {}, seed=seed),
        Case("block", {**gqa, "block_mask": blocks}, {"block_size": [bq, bk]}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    block = max(1, seq // 8)
    nb = -(-seq // block)
    blocks = random.uniform((nb, nb), seed=(seed, 4)) < 0.3
    return Case("example", {**example_qkv(seq, heads, dim, seed), "block_mask": blocks}, {"block_size": block}, seed=seed)


register(Mechanism(
    key="sparse_pattern",
    function=sparse_pattern_attention,
    family="B. position-sparse",
    paper="Lin et al. 2021 (survey) §4.1.1; Child et al. 2019 §4 (factorised sparse patterns)",
    params={
        "mask": "boolean (..., H, L, S)-broadcastable, True = attend",
        "indptr": "CSR row pointers (L+1,): row i attends indices[indptr[i]:indptr[i+1]]",
        "indices": "CSR key positions (nnz,), distinct within a row",
        "block_mask": "boolean (..., ceil(L/bq), ceil(S/bk)) with block_size bq or (bq, bk)",
        "implementation": "'auto' | 'dense' | 'tiled' | 'gather' (csr)",
    },
    cases=_cases,
    returns_lse=True,
    example=_example,
    pattern=_pattern,
    vjp=_kernels.engine_vjp(sparse_pattern_attention),
))
