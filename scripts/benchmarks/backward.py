"""backward: reflex tiled VJP vs torch SDPA autograd, float64, side by side.

Both sides compute the forward and the gradients of ``⟨dO, O⟩`` for q, k, v: ``reflex.vjp("full",
..., implementation="tiled")`` (which runs the tiled forward, then the FA2-style tiled backward) and
torch ``scaled_dot_product_attention`` + ``backward`` (the CPU math path, which materialises the
``(H, L, S)`` probabilities). ``reflex-bwd-only`` is the tiled backward kernel alone, given the
forward's ``(out, lse)``. Each (implementation, L) runs in a fresh subprocess so that its peak memory
(the rise of the process's maximum resident set over the inputs already allocated) is its own.
"""

from __future__ import annotations

from benchmarks._timing import score_matrix_table, timed_rss

IMPLEMENTATIONS = ("reflex-vjp-tiled", "reflex-bwd-only", "torch-sdpa-autograd")


def add_arguments(parser) -> None:
    parser.add_argument("--lengths", default="2048,8192", help="comma-separated L = S (default 2048,8192)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--causal", action="store_true", help="causal (top-left) attention")


def measure(implementation: str, length: int, heads: int, dim: int, repeats: int, causal: bool) -> dict:
    """Runs inside the subprocess: time and peak-RSS rise of one implementation."""
    from reflex import random

    q, k, v, d_out = (random.normal((1, heads, length, dim), seed=(0, i)) for i in range(4))
    if implementation.startswith("torch"):
        import torch
        import torch.nn.functional as F

        tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
        t_dout = torch.from_numpy(d_out)

        def call():
            for t in (tq, tk, tv):
                t.grad = None
            out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
            out.backward(t_dout)
            return tq.grad
    elif implementation == "reflex-vjp-tiled":
        import reflex

        def call():
            return reflex.vjp("full", {"q": q, "k": k, "v": v}, d_out, causal=causal, implementation="tiled")
    else:
        from reflex.mechanisms import _kernels
        from reflex.mechanisms._patterns import mask_and_causal

        p = _kernels.prepare(q, k, v)
        masks, tile_active = mask_and_causal(p, None, causal)
        options = dict(scale=dim ** -0.5, mask=masks, tile_active=tile_active)
        out, lse = _kernels.tiled(p, **options)

        def call():
            return _kernels.tiled_backward(p, out, lse, d_out, **options)

    return timed_rss(call, repeats=repeats)


def run(args) -> int:
    print(score_matrix_table("backward", "forward + backward", IMPLEMENTATIONS, "torch-sdpa-autograd", args))
    return 0
