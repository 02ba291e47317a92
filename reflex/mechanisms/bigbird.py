"""BigBird block-sparse attention: sliding blocks + global first/last blocks + random blocks (Zaheer et al. 2020)."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import numpy_namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import example_qkv, qkv
from reflex.mechanisms._inputs import check_padding_mask
from reflex.mechanisms._patterns import check_positive_int
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["bigbird_attention"]


def _excluded(block: int, blocks: int) -> set[int]:
    """Blocks a middle query block already sees: the two global blocks and its three neighbours."""
    return {b for b in (0, blocks - 1, block - 1, block, block + 1) if 0 <= b < blocks}


def draw_plan(xp: Any, device: Any, heads: int, blocks: int, count: int, seed: Any) -> Any:
    """A random block plan ``(H, nb − 2, r)`` from ``seed``: for query block b = 1 … nb − 2, r distinct
    blocks outside its window and the global blocks, sorted (stream ``(seed, b)``, one row per head).

    ``xp=None`` gives a host NumPy array (for case builders)."""
    if xp is None:
        xp, device = numpy_namespace(), "cpu"
    rows = []
    for block in range(1, blocks - 1):
        candidates = [b for b in range(blocks) if b not in _excluded(block, blocks)]
        if count > len(candidates):
            raise ValueError(f"num_random_blocks ({count}) exceeds the {len(candidates)} blocks that query block {block} "
                             f"does not already see (nb = {blocks}); pass an explicit plan")
        drawn = random.choice((heads,), seed=(*(seed if isinstance(seed, tuple) else (seed,)), block),
                              population=len(candidates), count=count, xp=xp, device=device)
        table = xp.asarray(candidates if candidates else [0], dtype=xp.int64, device=device)
        rows.append(xp.reshape(xp.take(table, xp.reshape(drawn, (-1,)), axis=0), (heads, 1, count)))
    if not rows:
        return xp.zeros((heads, 0, count), dtype=xp.int64, device=device)
    return xp.concat(rows, axis=1)


def block_multiplicity(xp: Any, device: Any, plan: Any, blocks: int) -> Any:
    """How often each key block is listed for each query block: int64 ``(H, nb, nb)``.

    Rows 0 and nb − 1 (global): every block once. Row b in 1 … nb − 2: blocks {0, b−1, b, b+1, nb−1}
    once each, plus one per occurrence in ``plan[:, b − 1]`` (duplicates count, as in HF).
    """
    heads = int(plan.shape[0])
    index = xp.arange(blocks, dtype=xp.int64, device=device)
    rows, cols = xp.reshape(index, (blocks, 1)), xp.reshape(index, (1, blocks))
    is_global_row = (rows == 0) | (rows == blocks - 1)
    structural = (cols == 0) | (cols == blocks - 1) | ((cols - rows <= 1) & (rows - cols <= 1))
    counts = xp.zeros((heads, max(blocks - 2, 0), blocks), dtype=xp.int64, device=device)
    for slot in range(int(plan.shape[-1])):
        counts = counts + xp.astype(plan[..., slot:slot + 1] == cols, xp.int64)
    if blocks >= 2:
        pad = xp.zeros((heads, 1, blocks), dtype=xp.int64, device=device)
        counts = xp.concat([pad, counts, pad], axis=1)
    else:
        counts = xp.zeros((heads, blocks, blocks), dtype=xp.int64, device=device)
    return xp.where(is_global_row, 1, xp.astype(structural, xp.int64) + counts)


def _setup(p: _kernels.Prepared, block_size: Any, num_random_blocks: Any, plan: Any, seed: Any) -> tuple[int, int, Any]:
    xp = p.xp
    block_size = check_positive_int("block_size", block_size)
    if p.length != p.key_length:
        raise ValueError(f"bigbird is self-attention: L ({p.length}) must equal S ({p.key_length})")
    if p.length % block_size:
        raise ValueError(f"sequence length {p.length} is not a multiple of block_size {block_size}")
    blocks = p.length // block_size
    if (plan is None) == (seed is None):
        raise ValueError("pass exactly one of plan (explicit random blocks) or seed (with num_random_blocks)")
    if plan is None:
        plan = draw_plan(xp, p.device, p.heads, blocks, check_positive_int("num_random_blocks", num_random_blocks,
                                                                            minimum=0), seed)
    if not hasattr(plan, "shape") or not xp.isdtype(plan.dtype, "integral"):
        raise TypeError("plan must be an integer array (H, nb - 2, r)")
    expected = (p.heads, max(blocks - 2, 0))
    if len(plan.shape) != 3 or tuple(plan.shape[:2]) != expected:
        raise ValueError(f"plan must have shape (H, nb - 2, r) = ({expected[0]}, {expected[1]}, r); got {tuple(plan.shape)}")
    if num_random_blocks is not None and int(plan.shape[-1]) != num_random_blocks:
        raise ValueError(f"plan lists {int(plan.shape[-1])} random blocks per row; num_random_blocks says {num_random_blocks}")
    if plan.shape[1] and plan.shape[2] and (int(xp.min(plan)) < 0 or int(xp.max(plan)) >= blocks):
        raise ValueError(f"plan entries must be block indices in [0, {blocks})")
    return block_size, blocks, block_multiplicity(xp, p.device, xp.astype(plan, xp.int64), blocks)


def _lookup(xp: Any, table: Any, block_size: int, blocks: int) -> Any:
    """A term ``(rows, cols) -> table[:, i // bs, j // bs]`` of shape ``(H, l, s)``."""
    heads = int(table.shape[0])
    flat = xp.reshape(table, (heads, blocks * blocks))

    def term(rows: Any, cols: Any) -> Any:
        index = (rows // block_size) * blocks + cols // block_size
        return xp.reshape(xp.take(flat, xp.reshape(index, (-1,)), axis=1), (heads, *index.shape))

    return term


@typed_options()
def bigbird_attention(q: Any, k: Any, v: Any, /, *, block_size: int, num_random_blocks: int | None = None,
                      plan: Any = None, seed: Any = None, attention_mask: Any = None, scale: float | None = None,
                      return_lse: bool = False, compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """BigBird block-sparse attention: 3 sliding blocks, global first/last blocks, r random blocks.

    .. math::

        O_i = \\frac{\\sum_j m_{b(i) b(j)}\\, e^{s_{ij}} v_j}{\\sum_j m_{b(i) b(j)}\\, e^{s_{ij}}}, \\qquad
        s_{ij} = \\mathrm{scale}\\; q_i \\cdot k_j, \\quad b(i) = \\lfloor i / \\mathrm{bs} \\rfloor

    where ``m[h, a, c]`` counts how often key block c is listed for query block a (Hugging Face
    ``BigBirdBlockSparseAttention``, ITC layout): blocks 0 and nb − 1 list every block once; block a
    in 1 … nb − 2 lists {0, a − 1, a, a + 1, nb − 1} (each once) and ``plan[h, a − 1, :]``. A block
    listed twice counts twice, which equals adding log m to its logits; this is how HF's eval-mode
    plan (all zeros: block 0 again) behaves.

    Shapes: ``q (..., H, L, D)``, ``k (..., G, L, D)``, ``v (..., G, L, E)`` → ``out (..., H, L, E)``;
    self-attention (S = L), L a multiple of ``block_size``; GQA by head groups (the plan is per
    query head, shared across the batch, as in HF).

    Args:
        block_size: bs ≥ 1; nb = L / bs blocks.
        plan: integer ``(H, nb − 2, r)``: row a − 1 lists the random key blocks of query block a.
        seed: instead of ``plan``: for each query block, r distinct blocks outside its window and
            the global blocks, drawn by ``reflex.random`` (the rule of HF's training-mode plan, not
            its random stream).
        num_random_blocks: r; required with ``seed``, checked against ``plan``.
        attention_mask: boolean ``(..., L)`` padding mask, True = real token. As Hugging Face
            (``attn_mask_penalty``): −10000 is added to the scores of padded keys (weight exactly 0
            in float64 whenever the row has a real key within ~9000 of the best score), and padded
            queries output 0 (here: a fully masked row, lse −∞).
        scale: default 1/√D (HF's ``rsqrt_d``). return_lse, compute_dtype, implementation
            (``"dense"``, ``"tiled"``, ``"auto"``) as :func:`full_attention`.

    The output equals ``full_attention(q, k, v, mask=m > 0, bias=log m)`` with the registry
    pattern m (integer multiplicities). HF falls back to full attention for short sequences
    (L ≤ (5 + 2r)·bs) inside ``BigBirdModel``; this function never does. HF needs nb ≥ 4 (its
    second and second-to-last blocks differ); for nb < 4 the lists above are read as sets (every
    block once), i.e. full attention.

    Reference: Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences", §2 and App. D
    (block-sparse ITC implementation).
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    block_size, blocks, table = _setup(p, block_size, num_random_blocks, plan, seed)
    padding = check_padding_mask(p, attention_mask)
    xp = p.xp
    count = _lookup(xp, table, block_size, blocks)
    log_count = _lookup(xp, xp.log(xp.astype(xp.where(table > 0, table, 1), p.q.dtype)), block_size, blocks)
    masks, biases = [lambda rows, cols: count(rows, cols) > 0], [log_count]
    if padding is not None:
        masks.append(xp.reshape(padding, (*p.batch, 1, p.length, 1)))  # padded queries: no key, output 0
        biases.append(xp.reshape(xp.astype(~padding, p.q.dtype) * -10000.0, (*p.batch, 1, 1, p.key_length)))
    return _kernels.softmax_attention(p, scale=_kernels.resolve_scale(scale, p.dim), mask=masks, bias=biases,
                                      implementation=implementation, return_lse=return_lse)


def _pattern(q: Any, k: Any, v: Any, /, *, block_size: int, num_random_blocks: int | None = None, plan: Any = None,
             seed: Any = None, **_: Any) -> Any:
    """Integer multiplicities ``(..., H, L, S)`` of each key for each query (0 = not attended)."""
    p = _kernels.prepare(q, k, v)
    block_size, blocks, table = _setup(p, block_size, num_random_blocks, plan, seed)
    xp = p.xp
    rows = xp.reshape(xp.arange(p.length, dtype=xp.int64, device=p.device), (p.length, 1))
    cols = xp.reshape(xp.arange(p.key_length, dtype=xp.int64, device=p.device), (1, p.key_length))
    return xp.broadcast_to(_lookup(xp, table, block_size, blocks)(rows, cols), p.score_shape)


def _cases(size: str, seed: int) -> list[Case]:
    block_size = {"tiny": 2, "small": 4, "medium": 8, "large": 16}[size]
    blocks, heads = 8, 4
    shapes = dict(heads=heads, length=blocks * block_size, key_length=blocks * block_size, dim=8, value_dim=6)
    gqa = qkv(seed, kv_heads=2, **shapes)
    plan = draw_plan(None, None, heads, blocks, 2, (seed, 3))
    zeros = random.integers((heads, blocks - 2, 1), seed=(seed, 4), low=0, high=1)  # HF eval-mode plan
    padded = random.uniform((2, blocks * block_size), seed=(seed, 9)) < 2.0  # item 1: padded from 2.5 blocks on
    padded[1, (5 * block_size) // 2:] = False
    return [
        Case("plan", {**gqa, "plan": plan}, {"block_size": block_size, "num_random_blocks": 2}, seed=seed),
        Case("eval_mode_zero_plan", {**gqa, "plan": zeros}, {"block_size": block_size}, seed=seed),
        Case("padded", {**gqa, "plan": plan, "attention_mask": padded}, {"block_size": block_size}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    block_size = max(1, seq // 16)
    length = block_size * (seq // block_size)
    plan = draw_plan(None, None, heads, length // block_size, 1 if length // block_size >= 6 else 0, (seed, 3))
    return Case("example", {**example_qkv(length, heads, dim, seed), "plan": plan}, {"block_size": block_size}, seed=seed)


register(Mechanism(
    key="bigbird",
    function=bigbird_attention,
    family="B. position-sparse",
    paper="Zaheer et al. 2020 §2, App. D; matches Hugging Face BigBirdBlockSparseAttention given the plan",
    params={
        "block_size": "bs: L must be a multiple",
        "plan": "integer (H, nb - 2, r): random key blocks of query blocks 1 .. nb - 2",
        "seed": "instead of plan: r blocks outside window and globals, via reflex.random",
        "num_random_blocks": "r",
    },
    cases=_cases,
    returns_lse=True,
    example=_example,
    pattern=_pattern,
    vjp=_kernels.engine_vjp(bigbird_attention),
))
