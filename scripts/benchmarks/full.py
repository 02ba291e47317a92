"""full attention: reflex dense vs reflex tiled vs torch SDPA, float64, side by side.

Each (implementation, L) runs in a fresh subprocess so that its peak memory (the rise of the
process's maximum resident set over the inputs already allocated) is its own. Times are the best
of ``--repeats`` calls after one warm-up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks._timing import table

IMPLEMENTATIONS = ("reflex-dense", "reflex-tiled", "torch-sdpa")


def add_arguments(parser) -> None:
    parser.add_argument("--lengths", default="2048,8192", help="comma-separated L = S (default 2048,8192)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--causal", action="store_true", help="causal (top-left) attention")


def measure(implementation: str, length: int, heads: int, dim: int, repeats: int, causal: bool) -> dict:
    """Runs inside the subprocess: time and peak-RSS rise of one implementation."""
    import resource

    from benchmarks._timing import best_time
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

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = best_time(call, repeats=repeats)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "peak_bytes": (after - before) * 1024}


def run(args) -> int:
    lengths = [int(n) for n in args.lengths.split(",")]
    here = Path(__file__).resolve().parent.parent
    rows = []
    for length in lengths:
        scores_bytes = args.heads * length * length * 8
        results = {}
        for implementation in IMPLEMENTATIONS:
            code = (f"import json, sys; sys.path.insert(0, {str(here)!r}); from benchmarks.full import measure; "
                    f"print(json.dumps(measure({implementation!r}, {length}, {args.heads}, {args.dim}, "
                    f"{args.repeats}, {args.causal})))")
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{implementation} L={length}: failed: {proc.stderr.strip().splitlines()[-1]}", file=sys.stderr)
                continue
            results[implementation] = json.loads(proc.stdout.strip().splitlines()[-1])
        base = results.get("torch-sdpa", {}).get("seconds")
        for implementation, r in results.items():
            ratio = f"{r['seconds'] / base:.2f}" if base else "n/a"
            rows.append([length, implementation, f"{r['seconds']:.3f}", ratio,
                         f"{r['peak_bytes'] / 2**20:.0f}", f"{r['peak_bytes'] / scores_bytes:.3f}"])
    print(f"full attention, float64, H={args.heads}, D={args.dim}, causal={args.causal}; "
          f"'x L×S' = peak RSS rise / the (H, L, S) float64 score matrix")
    print(table(rows, ["L=S", "implementation", "seconds", "vs torch", "peak MiB", "x L×S"]))
    return 0
