"""state-recurrent linear attention (gated_delta): reflex Numba scan and chunked form vs the ONNX reference.

reflex ``linear_recurrent_attention(update_rule="gated_delta")`` in float64 — ``form="auto"`` (the
Numba token-by-token scan on plain NumPy) and ``form="chunked"`` (chunk 64, WY/UT) — against
``onnx.reference.ReferenceEvaluator`` running one ``LinearAttention`` node (opset 27; a NumPy loop over
tokens in float32), on the same inputs: B = 1, H = G heads, D = E, per-head log decay, β ∈ (0, 1), unit
keys. Each (implementation, T) runs in a fresh subprocess, so its peak memory (the rise of the
process's maximum resident set, after a T = 2 call has loaded Numba) is its own; all three keep a state-sized working set, never T × T.
Times are the best of ``--repeats`` calls after one warm-up call (which also compiles Numba). Above
``--onnx-max`` the ONNX reference is not run.
"""

from __future__ import annotations

import sys

from benchmarks._timing import in_subprocess, table, timed_rss

IMPLEMENTATIONS = ("reflex-numba", "reflex-chunked", "onnx-reference")


def add_arguments(parser) -> None:
    parser.add_argument("--lengths", default="8192,65536", help="comma-separated T (default 8192,65536)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="D = E (default 64)")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--onnx-max", type=int, default=8192, help="largest T for the ONNX reference (default 8192)")


def measure(implementation: str, length: int, heads: int, dim: int, chunk_size: int, repeats: int) -> dict:
    """Runs inside the subprocess: time and peak-RSS rise of one implementation at one T."""
    import numpy

    from reflex.mechanisms.linear_recurrent import _draw

    h = _draw(0, batch=1, heads=heads, kv_heads=heads, length=length, dim=dim, value_dim=dim, rule="gated_delta",
              per_dim=False, state=False)
    if implementation.startswith("reflex"):
        import reflex

        form = "auto" if implementation == "reflex-numba" else "chunked"
        q, k, v = h.pop("q"), h.pop("k"), h.pop("v")

        def call(T=length):
            return reflex.linear_recurrent_attention(
                q[..., :T, :], k[..., :T, :], v[..., :T, :], update_rule="gated_delta", form=form,
                chunk_size=chunk_size, return_state=True, **{n: x[..., :T] for n, x in h.items()})

        call(2)  # load Numba and the kernels before the memory baseline
    else:
        from onnx import TensorProto, helper
        from onnx.reference import ReferenceEvaluator

        def pack(x):
            return numpy.ascontiguousarray(numpy.swapaxes(x, 1, 2).reshape(1, length, -1), dtype=numpy.float32)

        feeds = {"query": pack(h["q"]), "key": pack(h["k"]), "value": pack(h["v"]),
                 "decay": pack(h["decay"][..., None]), "beta": pack(h["beta"][..., None])}
        names = ["query", "key", "value", "", "decay", "beta"]
        node = helper.make_node("LinearAttention", names, ["output", "present_state"], q_num_heads=heads,
                                kv_num_heads=heads, update_rule="gated_delta")
        graph = helper.make_graph(
            [node], "linear_attention",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(feeds[n].shape)) for n in names if n],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, None),
             helper.make_tensor_value_info("present_state", TensorProto.FLOAT, None)])
        session = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 27)]))

        def call():
            return session.run(None, feeds)
    return timed_rss(call, repeats=repeats, warmup=1)


def run(args) -> int:
    lengths = sorted(int(n) for n in args.lengths.split(","))
    results: dict[tuple[str, int], dict] = {}
    for length in lengths:
        for implementation in IMPLEMENTATIONS:
            if implementation == "onnx-reference" and length > args.onnx_max:
                continue
            r = in_subprocess("recurrent", f"{implementation} T={length}", implementation, length, args.heads,
                              args.dim, args.chunk_size, args.repeats)
            if r is not None:
                results[implementation, length] = r
                print(f"  measured {implementation} T={length}: {r['seconds']:.3f} s", file=sys.stderr)
    rows = []
    for length in lengths:
        onnx = results.get(("onnx-reference", length))
        for implementation in IMPLEMENTATIONS:
            r = results.get((implementation, length))
            if r is None:
                continue
            ratio = f"{onnx['seconds'] / r['seconds']:.2f}x" if onnx else "n/a"
            rows.append([length, implementation, f"{r['seconds']:.3f}", ratio, f"{r['peak_bytes'] / 2**20:.1f}"])
    print(f"state-recurrent linear attention, update_rule=gated_delta (per-head decay), B=1, H=G={args.heads}, "
          f"D=E={args.dim}; reflex float64 (numba scan; chunked C={args.chunk_size}), ONNX reference float32; "
          f"'onnx / this' = ONNX reference time over this time; peak = rise of max RSS over the inputs")
    print(table(rows, ["T", "implementation", "seconds", "onnx / this", "peak MiB"]))
    return 0
