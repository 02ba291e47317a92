"""Random attention: each query attends r keys drawn without replacement (BigBird's random part)."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, example_qkv, qkv
from reflex.mechanisms._patterns import check_positive_int, index_counts
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["random_attention"]

IMPLEMENTATIONS = ("auto", "gather", "dense", "tiled")


def random_indices(p: _kernels.Prepared, num_random: Any, indices: Any, seed: Any) -> Any:
    """The key lists ``(..., H, L, r)``: ``indices`` validated, or drawn from ``seed`` on the host."""
    xp = p.xp
    if (indices is None) == (seed is None):
        raise ValueError("pass exactly one of indices (explicit key lists) or seed (with num_random)")
    if indices is None:
        count = check_positive_int("num_random", num_random, minimum=0)
        if count > p.key_length:
            raise ValueError(f"num_random ({count}) exceeds the number of keys S = {p.key_length}")
        return random.choice((*p.batch, p.heads, p.length), seed=seed, population=p.key_length, count=count,
                             xp=xp, device=p.device)
    indices = _kernels.check_indices(p, indices)
    if num_random is not None and int(indices.shape[-1]) != num_random:
        raise ValueError(f"indices lists {int(indices.shape[-1])} keys per query; num_random says {num_random}")
    if p.length and int(indices.shape[-1]) and int(xp.min(indices)) < 0:
        raise ValueError("indices must lie in [0, S): random keys have no padding")
    if int(indices.shape[-1]) > 1:
        ordered = xp.sort(indices, axis=-1)
        if bool(xp.any(ordered[..., 1:] == ordered[..., :-1])):
            raise ValueError("indices must be distinct within each query's list (drawn without replacement)")
    return indices


@typed_options()
def random_attention(q: Any, k: Any, v: Any, /, *, num_random: int | None = None, indices: Any = None,
                     seed: Any = None, scale: float | None = None, return_lse: bool = False,
                     compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Random attention: each query attends its own r keys, drawn without replacement.

    .. math::

        O_i = \\mathrm{softmax}_{j \\in R_i}(\\mathrm{scale}\\; q_i \\cdot k_j)\\, v_j, \\qquad
        R_i \\subset [0, S),\\ |R_i| = r

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``out (..., H, L, E)``;
    GQA by head groups.

    Args:
        indices: explicit key lists, integers broadcastable to ``(..., H, L, r)``, distinct per query.
        seed: instead of ``indices``, draw them with ``reflex.random.choice`` (PCG64 on the host):
            shape ``(..., H, L)`` rows of ``num_random`` distinct keys, each row sorted.
        num_random: r; required with ``seed``, checked against ``indices`` when both are given.
        scale, return_lse, compute_dtype: as :func:`full_attention`.
        implementation: ``"gather"`` (default for ``"auto"``: O(L·r) work), ``"dense"`` or
            ``"tiled"`` (the lists expanded to a boolean mask).

    r = 0 gives outputs 0 and lse −∞. The output equals ``full_attention`` with the key lists as a
    boolean mask.

    Reference: Zaheer et al. 2020, "Big Bird", §2 (random attention, r keys per query).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}; got {implementation!r}")
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    keys = random_indices(p, num_random, indices, seed)
    scale = _kernels.resolve_scale(scale, p.dim)
    if implementation in ("auto", "gather"):
        out, lse = _kernels.gather(p, keys, scale=scale)
        return (out, lse) if return_lse else out
    mask = index_counts(p.xp, keys, p.key_length) > 0
    return _kernels.softmax_attention(p, scale=scale, mask=mask, implementation=implementation, return_lse=return_lse)


def _pattern(q: Any, k: Any, v: Any, /, *, num_random: int | None = None, indices: Any = None, seed: Any = None,
             **_: Any) -> Any:
    """The key lists as a boolean ``(..., H, L, S)`` mask."""
    p = _kernels.prepare(q, k, v)
    keys = random_indices(p, num_random, indices, seed)
    return p.xp.broadcast_to(index_counts(p.xp, keys, p.key_length) > 0, p.score_shape)


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    gqa = qkv(seed, heads=d["H"], kv_heads=d["G"], length=d["L"], key_length=d["S"], dim=d["D"], value_dim=d["E"])
    r = max(1, d["S"] // 3)
    per_query = random.choice((2, d["H"], d["L"]), seed=(seed, 3), population=d["S"], count=r)
    shared = random.choice((d["L"],), seed=(seed, 4), population=d["S"], count=d["S"])
    return [
        Case("per_head", {**gqa, "indices": per_query}, {"num_random": r}, seed=seed),
        Case("all_keys_shared", {**gqa, "indices": shared}, {}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    r = min(8, seq)
    indices = random.choice((1, heads, seq), seed=(seed, 3), population=seq, count=r)
    return Case("example", {**example_qkv(seq, heads, dim, seed), "indices": indices}, {"num_random": r}, seed=seed)


register(Mechanism(
    key="random",
    function=random_attention,
    family="B. position-sparse",
    paper="Zaheer et al. 2020 §2 (BigBird random attention)",
    params={
        "num_random": "r keys per query",
        "indices": "explicit key lists (..., H, L, r), distinct per query",
        "seed": "instead of indices: drawn on the host by reflex.random.choice",
        "implementation": "'auto' (gather) | 'gather' | 'dense' | 'tiled'",
    },
    cases=_cases,
    returns_lse=True,
    example=_example,
    pattern=_pattern,
    vjp=_kernels.engine_vjp(random_attention),
))
