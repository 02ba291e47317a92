"""Differentiable index-grid terms shared by the relative-position mechanisms (Shaw, Transformer-XL).

A *differentiable callable term* (the engine's protocol, :mod:`reflex.mechanisms._engine`) is a
callable ``term(rows, cols) -> value`` that also has ``vjp(rows, cols, d_value) -> dict[str, array]``:
the gradients of ``⟨d_value, term(rows, cols)⟩`` with respect to its parameters. The engine's
backward calls it once per tile with ``d_value = dZ`` reduced to the value's shape and sums the
returned arrays over tiles, name by name.
"""

from __future__ import annotations

from typing import Any, Callable

from reflex.backends import device as device_of
from reflex.mechanisms._numerics import unbroadcast

__all__ = ["RelativeLogits", "row_block_name", "assemble_rows"]

_ROWS = "queries@"


def row_block_name(i0: int, i1: int) -> str:
    """Name of a term's gradient for the query rows ``i0:i1`` (one per query block, summed over key tiles)."""
    return f"{_ROWS}{i0}:{i1}"


def assemble_rows(xp: Any, grads: dict[str, Any], like: Any) -> Any:
    """The per-row-block gradients in ``grads`` placed into zeros shaped like ``like (..., L, D)``.
    Row blocks are disjoint (query blocks); a block no tile reached stays 0."""
    out = xp.zeros(like.shape, dtype=like.dtype, device=device_of(like))
    for name, g in grads.items():
        if name.startswith(_ROWS):
            i0, i1 = (int(n) for n in name[len(_ROWS):].split(":"))
            out[..., i0:i1, :] = out[..., i0:i1, :] + g
    return out


def _unskew(xp: Any, x: Any) -> Any:
    """``B (..., l, l + s − 1)`` with ``B[i, j − i + l − 1] = x[i, j]`` and 0 elsewhere, for ``x (..., l, s)``.

    The relative-shift trick run backwards (Dai et al. 2019, App. B): flip the rows, pad each row
    with l zeros, read the flat buffer with row stride l + s − 1, flip back."""
    *lead, l, s = (int(n) for n in x.shape)
    flipped = xp.flip(x, axis=-2)
    padded = xp.concat([flipped, xp.zeros((*lead, l, l), dtype=x.dtype, device=device_of(x))], axis=-1)
    flat = xp.reshape(padded, (*lead, l * (s + l)))[..., :l * (s + l - 1)]
    return xp.flip(xp.reshape(flat, (*lead, l, s + l - 1)), axis=-2)


class RelativeLogits:
    """Index-grid bias ``b_ij = queries_i · e(d)``, ``d = j − i − offset``, with its VJP.

    ``queries (..., H, L, D)`` are already scaled as the scores are. ``embed(d_min, d_max)`` returns
    the embeddings of the distances ``d_min..d_max`` as ``(..., H or 1, n, D)``;
    ``embed_vjp(d_min, d_max, d_table)`` returns the gradients of ``⟨d_table, embed(d_min, d_max)⟩``
    with respect to the embedding's parameters (a dict). ``rows``/``cols`` are the contiguous
    ``(l, 1)``/``(1, s)`` grids of the dense and tiled kernels.

    Per tile (Dai et al. 2019, App. B: logits against the l + s − 1 distinct distances, then a
    relative shift): ``T = e(d_min..d_max)``, ``Λ = queries·Tᵀ``, ``b_ij = Λ_{i, j − i + l − 1}``.
    Backward: ``dΛ`` = ``d_value`` shifted back (:func:`_unskew`), ``d queries = dΛ·T`` (under
    :func:`row_block_name`), ``dT = dΛᵀ·queries`` passed to ``embed_vjp``.
    """

    def __init__(self, xp: Any, queries: Any, embed: Callable[[int, int], Any],
                 embed_vjp: Callable[[int, int, Any], dict[str, Any]], offset: int = 0) -> None:
        self.xp, self.queries, self.embed, self.embed_vjp, self.offset = xp, queries, embed, embed_vjp, offset

    def _tile(self, rows: Any, cols: Any) -> tuple[int, int, int, int, int]:
        i0, l = int(rows[0, 0]), int(rows.shape[0])
        j0, s = int(cols[0, 0]), int(cols.shape[1])
        return i0, l, j0, s, j0 - (i0 + l - 1) - self.offset

    def __call__(self, rows: Any, cols: Any) -> Any:
        xp = self.xp
        i0, l, j0, s, d_min = self._tile(rows, cols)
        table = self.embed(d_min, d_min + l + s - 2)
        logits = self.queries[..., i0:i0 + l, :] @ xp.matrix_transpose(table)  # (..., H, l, l + s − 1)
        index = cols - rows - self.offset - d_min
        return xp.take_along_axis(logits, xp.broadcast_to(index, (*logits.shape[:-1], s)), axis=-1)

    def vjp(self, rows: Any, cols: Any, d_value: Any) -> dict[str, Any]:
        xp = self.xp
        i0, l, j0, s, d_min = self._tile(rows, cols)
        d_max = d_min + l + s - 2
        table = self.embed(d_min, d_max)
        queries = self.queries[..., i0:i0 + l, :]
        d_logits = _unskew(xp, xp.astype(d_value, queries.dtype))  # (..., H, l, l + s − 1)
        d_queries = unbroadcast(xp, d_logits @ table, tuple(queries.shape))
        d_table = unbroadcast(xp, xp.matrix_transpose(d_logits) @ queries, tuple(table.shape))
        return {row_block_name(i0, i0 + l): d_queries, **self.embed_vjp(d_min, d_max, d_table)}
