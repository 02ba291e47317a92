"""linear-time mechanisms: reflex linear, performer, nystrom vs reflex full (tiled), float64, side by side.

Each (mechanism, L) runs in a fresh subprocess so that its peak memory (the rise of the process's
maximum resident set over the inputs already allocated) is its own. Times are the best of
``--repeats`` calls (after one warm-up call at L ≤ 16384). ``--backward`` times forward + VJP
(:func:`reflex.vjp` with a random ``d_out``) instead of the forward alone. Full attention is quadratic: above
``--full-max`` it is not run but extrapolated as ``t(L) = t(L₀)·(L/L₀)²`` from the largest measured
L₀, and the row says so.
"""

from __future__ import annotations

import sys

from benchmarks._timing import in_subprocess, table, timed_rss

MECHANISMS = ("linear", "performer", "nystrom", "full-tiled")


def add_arguments(parser) -> None:
    parser.add_argument("--lengths", default="4096,65536", help="comma-separated L = S (default 4096,65536)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--features", type=int, default=256, help="performer random features m (default 256)")
    parser.add_argument("--landmarks", type=int, default=64, help="nystrom landmarks m (default 64)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--full-max", type=int, default=16384,
                        help="largest L at which full attention is run; above it, extrapolated (default 16384)")
    parser.add_argument("--causal", action="store_true", help="causal linear and performer (prefix sums), causal full")
    parser.add_argument("--backward", action="store_true", help="time forward + backward (reflex.vjp) per call")


def measure(mechanism: str, length: int, heads: int, dim: int, features: int, landmarks: int, repeats: int,
            causal: bool, backward: bool = False) -> dict:
    """Runs inside the subprocess: time and peak-RSS rise of one mechanism at one length."""

    import reflex
    from reflex import random

    q, k, v = (random.normal((1, heads, length, dim), seed=(0, i)) for i in range(3))
    calls = {
        "linear": lambda: reflex.linear_attention(q, k, v, causal=causal),
        "performer": lambda: reflex.performer_attention(q, k, v, num_features=features, seed=1, causal=causal),
        "nystrom": lambda: reflex.nystrom_attention(q, k, v, num_landmarks=landmarks),
        "full-tiled": lambda: reflex.full_attention(q, k, v, causal=causal, implementation="tiled"),
    }
    if backward:
        d_out = random.normal((1, heads, length, dim), seed=(0, 3))
        inputs = {"q": q, "k": k, "v": v}
        options = {
            "linear": ("linear", {"causal": causal}),
            "performer": ("performer", {"num_features": features, "seed": 1, "causal": causal}),
            "nystrom": ("nystrom", {"num_landmarks": landmarks}),
            "full-tiled": ("full", {"causal": causal, "implementation": "tiled"}),
        }
        forward, (key, params) = calls[mechanism], options[mechanism]
        calls[mechanism] = lambda: (forward(), reflex.vjp(key, inputs, d_out, **params))
    return timed_rss(calls[mechanism], repeats=repeats, warmup=1 if length <= 16384 else 0)


def run(args) -> int:
    lengths = sorted(int(n) for n in args.lengths.split(","))
    measured_full = [n for n in lengths if n <= args.full_max]
    if any(n > args.full_max for n in lengths) and args.full_max not in measured_full:
        measured_full.append(args.full_max)  # the anchor of the extrapolation
    results: dict[tuple[str, int], dict] = {}
    for length in sorted(set(lengths) | set(measured_full)):
        for mechanism in MECHANISMS:
            if mechanism == "full-tiled" and length > args.full_max:
                continue
            if mechanism != "full-tiled" and length not in lengths:
                continue
            r = in_subprocess("linear", f"{mechanism} L={length}", mechanism, length, args.heads, args.dim,
                              args.features, args.landmarks, args.repeats, args.causal, args.backward)
            if r is not None:
                results[mechanism, length] = r
            print(f"  measured {mechanism} L={length}: {r['seconds']:.3f} s" if r else "", file=sys.stderr)
    rows = []
    anchor = max((n for n in measured_full if ("full-tiled", n) in results), default=None)
    for length in sorted(set(lengths) | set(measured_full)):
        full = results.get(("full-tiled", length))
        full_seconds, note = (full["seconds"], "measured") if full else (None, "")
        if full is None and anchor is not None:
            full_seconds = results["full-tiled", anchor]["seconds"] * (length / anchor) ** 2
            note = f"extrapolated (L/{anchor})^2"
        for mechanism in MECHANISMS:
            if mechanism == "full-tiled":
                if full_seconds is not None:
                    peak = f"{full['peak_bytes'] / 2**20:.0f}" if full else "-"
                    rows.append([length, mechanism, f"{full_seconds:.3f}", "1.00", peak, note])
                continue
            r = results.get((mechanism, length))
            if r is None:
                continue
            speedup = f"{full_seconds / r['seconds']:.1f}x" if full_seconds else "n/a"
            rows.append([length, mechanism, f"{r['seconds']:.3f}", speedup, f"{r['peak_bytes'] / 2**20:.0f}", "measured"])
    print(f"linear-time mechanisms{' forward + backward' if args.backward else ''}, NumPy float64, B=1, "
          f"H={args.heads}, D=E={args.dim}, causal={args.causal}; "
          f"performer m={args.features} (positive features), nystrom m={args.landmarks} (iterative pinv); "
          f"'full / this' = full-tiled time over this mechanism's time")
    print(table(rows, ["L=S", "mechanism", "seconds", "full / this", "peak MiB", "how"]))
    return 0
