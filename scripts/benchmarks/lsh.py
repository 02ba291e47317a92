"""Reformer LSH attention: reflex (Numba, float64), reflex array-API path (NumPy), HF LSHSelfAttention (float32).

Default configuration (issue 5): L = 65,536, H = 4, D = 64, n_hashes = 4, 64 buckets, chunk 64, one
batch element. Each (implementation, L) runs in a fresh subprocess so that its peak memory (the rise
of the process's maximum resident set over the inputs already allocated) is its own; times are the
best of ``--repeats`` calls after one warm-up (the warm-up also compiles / loads the Numba cache).
The Hugging Face figure is the whole layer forward, which also applies its two (N × N) input
projections (N = H·D); reflex is given the projected qk and v.
"""

from __future__ import annotations


from benchmarks._timing import in_subprocess, table, timed_rss

IMPLEMENTATIONS = ("reflex-numba", "reflex-array-api", "hf-float32")


def add_arguments(parser) -> None:
    parser.add_argument("--lengths", default="65536", help="comma-separated L (default 65536)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--hashes", type=int, default=4)
    parser.add_argument("--buckets", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma-separated implementations to leave out")


def measure(implementation: str, length: int, heads: int, dim: int, hashes: int, buckets: int, chunk: int,
            repeats: int) -> dict:
    """Runs inside the subprocess: time and peak-RSS rise of one implementation."""

    from reflex import random

    qk = random.normal((1, heads, length, dim), seed=(0, 0))
    v = random.normal((1, heads, length, dim), seed=(0, 1))
    rotations = random.normal((heads, dim, hashes, buckets // 2), seed=(0, 2))
    if implementation.startswith("hf"):
        import torch
        from transformers import ReformerConfig
        from transformers.models.reformer.modeling_reformer import LSHSelfAttention

        torch.set_num_threads(torch.get_num_threads())
        config = ReformerConfig(attn_layers=["lsh"], hidden_size=heads * dim, num_attention_heads=heads,
                                attention_head_size=dim, num_buckets=buckets, num_hashes=hashes,
                                lsh_attn_chunk_length=chunk, hash_seed=0, lsh_attention_probs_dropout_prob=0.0,
                                max_position_embeddings=length)
        layer = LSHSelfAttention(config).eval()
        x = torch.from_numpy(random.normal((1, length, heads * dim), seed=(0, 3))).float()

        def call():
            with torch.no_grad():
                return layer(x).hidden_states
    else:
        import reflex

        kind = "numba" if implementation == "reflex-numba" else "array_api"

        def call():
            return reflex.lsh_attention(qk, v, n_buckets=buckets, n_hashes=hashes, chunk_length=chunk,
                                        rotations=rotations, implementation=kind)

    return timed_rss(call, repeats=repeats)


def run(args) -> int:
    lengths = [int(n) for n in args.lengths.split(",")]
    skip = {s for s in args.skip.split(",") if s}
    rows = []
    for length in lengths:
        results = {}
        for implementation in IMPLEMENTATIONS:
            if implementation in skip:
                continue
            r = in_subprocess("lsh", f"{implementation} L={length}", implementation, length, args.heads, args.dim,
                              args.hashes, args.buckets, args.chunk, args.repeats)
            if r is not None:
                results[implementation] = r
        base = results.get("hf-float32", {}).get("seconds")
        for implementation, r in results.items():
            ratio = f"{r['seconds'] / base:.2f}" if base else "n/a"
            rows.append([length, implementation, f"{r['seconds']:.3f}", ratio, f"{r['peak_bytes'] / 2**20:.0f}",
                         f"{r['peak_bytes'] / length / 1024:.2f}"])
    print(f"LSH attention, H={args.heads}, D={args.dim}, n_hashes={args.hashes}, buckets={args.buckets}, "
          f"chunk={args.chunk}; 'KiB/token' = peak RSS rise / L (flat in L = linear memory)")
    print(table(rows, ["L", "implementation", "seconds", "vs HF f32", "peak MiB", "KiB/token"]))
    return 0
