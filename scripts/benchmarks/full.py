"""full attention: reflex dense vs reflex tiled vs torch SDPA, float64, side by side.

Each (implementation, L) runs in a fresh subprocess so that its peak memory (the rise of the
process's maximum resident set over the inputs already allocated) is its own. Times are the best
of ``--repeats`` calls after one warm-up.
"""

from __future__ import annotations


from benchmarks._timing import in_subprocess, table, timed_rss

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
    lengths = [int(n) for n in args.lengths.split(",")]
    rows = []
    for length in lengths:
        scores_bytes = args.heads * length * length * 8
        results = {}
        for implementation in IMPLEMENTATIONS:
            r = in_subprocess("full", f"{implementation} L={length}", implementation, length, args.heads, args.dim,
                              args.repeats, args.causal)
            if r is not None:
                results[implementation] = r
        base = results.get("torch-sdpa", {}).get("seconds")
        for implementation, r in results.items():
            ratio = f"{r['seconds'] / base:.2f}" if base else "n/a"
            rows.append([length, implementation, f"{r['seconds']:.3f}", ratio,
                         f"{r['peak_bytes'] / 2**20:.0f}", f"{r['peak_bytes'] / scores_bytes:.3f}"])
    print(f"full attention, float64, H={args.heads}, D={args.dim}, causal={args.causal}; "
          f"'x L×S' = peak RSS rise / the (H, L, S) float64 score matrix")
    print(table(rows, ["L=S", "implementation", "seconds", "vs torch", "peak MiB", "x L×S"]))
    return 0
