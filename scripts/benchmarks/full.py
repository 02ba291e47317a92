"""full attention: reflex dense vs reflex tiled vs torch SDPA, float64, side by side.

Each (implementation, L) runs in a fresh subprocess so that its peak memory (the rise of the
process's maximum resident set over the inputs already allocated) is its own. Times are the best
of ``--repeats`` calls after one warm-up.
"""

from __future__ import annotations


from benchmarks._timing import score_matrix_table, timed_rss

IMPLEMENTATIONS = ("reflex-dense", "reflex-tiled", "torch-sdpa")


def add_arguments(parser) -> None:
    parser.add_argument("--lengths", default="2048,8192", help="comma-separated L = S (default 2048,8192)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--causal", action="store_true", help="causal (top-left) attention")


def measure(implementation: str, length: int, heads: int, dim: int, repeats: int, causal: bool) -> dict:
    """Runs inside the subprocess: time and peak-RSS rise of one implementation."""

    from reflex import random

    q, k, v = (random.normal((1, heads, length, dim), seed=(0, i)) for i in range(3))
    if implementation.startswith("torch"):
        import torch
        import torch.nn.functional as F

        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))

        def call():
            with torch.no_grad():
                return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
    else:
        import reflex

        kind = implementation.split("-")[1]

        def call():
            return reflex.full_attention(q, k, v, causal=causal, implementation=kind)

    return timed_rss(call, repeats=repeats)


def run(args) -> int:
    print(score_matrix_table("full", "full attention", IMPLEMENTATIONS, "torch-sdpa", args))
    return 0
