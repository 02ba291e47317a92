"""Input builders shared by the mechanisms' case builders (host NumPy, explicit seeds)."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator

from reflex import random
from reflex.registry import size_scale

__all__ = ["qkv", "dims", "standard", "example_qkv", "case_shape", "SHAPE_LETTERS"]

# Shape overrides for case builders (``reflex fixtures generate --lengths/--head-dims/...``): letter → value.
SHAPE_LETTERS = ("B", "H", "G", "L", "D")
_SHAPE: ContextVar[dict[str, int]] = ContextVar("reflex_case_shape", default={})


@contextmanager
def case_shape(**shape: int) -> Iterator[None]:
    """Within the block, :func:`dims` and :func:`qkv` build cases at these shapes.

    Letters: ``B`` batch, ``H`` query heads, ``G`` kv heads, ``L`` query length and key length
    (L = S), ``D`` head dim of queries, keys and values (D = E). Omitted letters keep the size's
    standard value, except that ``H`` without ``G`` sets G = 2 for even H and 1 for odd H. A case
    builder that does not use these helpers ignores the overrides (the fixture generator checks
    the shapes it gets). Raises ``ValueError`` for an unknown letter or a value that is not a
    positive int, or when G does not divide H.
    """
    for letter, value in shape.items():
        if letter not in SHAPE_LETTERS:
            raise ValueError(f"case_shape: unknown letter {letter!r}; expected one of {', '.join(SHAPE_LETTERS)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"case_shape: {letter} must be a positive int; got {value!r}")
    heads = shape.get("H", 4)
    if "G" in shape and heads % shape["G"]:
        raise ValueError(f"case_shape: kv heads G = {shape['G']} must divide query heads H = {heads}")
    token = _SHAPE.set(dict(shape))
    try:
        yield
    finally:
        _SHAPE.reset(token)


def dims(size: str) -> dict[str, int]:
    """Standard sizes for ``size``: L, S (≠ L), D, E (≠ D), H, G with H % G == 0, batch B.

    Inside :func:`case_shape` the overridden letters replace these (there L = S and D = E).
    """
    n = size_scale(size)
    d = {"L": n, "S": n + n // 2 + 1, "D": 8 if n < 64 else 16, "E": 6 if n < 64 else 12, "H": 4, "G": 2, "B": 2}
    shape = _SHAPE.get()
    if "L" in shape:
        d["L"] = d["S"] = shape["L"]
    if "D" in shape:
        d["D"] = d["E"] = shape["D"]
    if "H" in shape:
        d["H"] = shape["H"]
        d["G"] = shape.get("G", 2 if shape["H"] % 2 == 0 else 1)
    elif "G" in shape:
        d["G"] = shape["G"]
    if "B" in shape:
        d["B"] = shape["B"]
    return d


def qkv(seed: int, *, batch: tuple[int, ...] | None = None, heads: int, kv_heads: int, length: int,
        key_length: int, dim: int, value_dim: int) -> dict[str, Any]:
    """q, k, v with N(0, 1) entries, each from its own stream of ``seed``; batch ``(2,)`` or ``case_shape``'s B."""
    if batch is None:
        batch = (_SHAPE.get().get("B", 2),)
    return {
        "q": random.normal((*batch, heads, length, dim), seed=(seed, 0)),
        "k": random.normal((*batch, kv_heads, key_length, dim), seed=(seed, 1)),
        "v": random.normal((*batch, kv_heads, key_length, value_dim), seed=(seed, 2)),
    }


def standard(size: str, seed: int, **shapes: int) -> tuple[dict[str, int], dict[str, Any]]:
    """``(dims(size), q/k/v)`` with GQA (H query heads, G kv heads), L ≠ S, D ≠ E.

    Keyword overrides (``heads``, ``kv_heads``, ``length``, ``key_length``, ``dim``, ``value_dim``,
    ``batch``) replace the standard shape for this case.
    """
    d = dims(size)
    base = dict(heads=d["H"], kv_heads=d["G"], length=d["L"], key_length=d["S"], dim=d["D"], value_dim=d["E"])
    return d, qkv(seed, **{**base, **shapes})


def example_qkv(seq: int, heads: int, dim: int, seed: int) -> dict[str, Any]:
    """q, k, v of shape ``(1, heads, seq, dim)`` for ``reflex run`` examples (L = S, D = E, no GQA)."""
    return qkv(seed, batch=(1,), heads=heads, kv_heads=heads, length=seq, key_length=seq, dim=dim, value_dim=dim)
