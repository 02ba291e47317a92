"""multi_head_attention: straightforward reference, torch MHA in float64, GQA, other inner mechanisms, errors."""

from __future__ import annotations

import math

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs


def reference(x, w_q, w_k, w_v, w_o, *, heads, kv_heads, causal=False, x_kv=None, b_q=None, b_k=None, b_v=None, b_o=None):
    """x W_q, split heads, SDPA per head (kv head h // (H/G)), concat, W_o: loops over heads on the host."""
    x_kv = x if x_kv is None else x_kv
    q, k, v = x @ w_q, x_kv @ w_k, x_kv @ w_v
    q, k, v = [a if b is None else a + b for a, b in ((q, b_q), (k, b_k), (v, b_v))]
    d, e = q.shape[-1] // heads, v.shape[-1] // kv_heads
    outs = []
    for h in range(heads):
        g = h // (heads // kv_heads)
        qh, kh, vh = q[..., h * d:(h + 1) * d], k[..., g * d:(g + 1) * d], v[..., g * e:(g + 1) * e]
        s = qh @ numpy.swapaxes(kh, -1, -2) / math.sqrt(d)
        if causal:
            s = numpy.where(numpy.tri(s.shape[-2], s.shape[-1], dtype=bool), s, -numpy.inf)
        w = numpy.exp(s - s.max(-1, keepdims=True))
        outs.append((w / w.sum(-1, keepdims=True)) @ vh)
    out = numpy.concatenate(outs, axis=-1) @ w_o
    return out if b_o is None else out + b_o


def weights(seed, n, heads, kv_heads, d, e, out=None, m=None):
    m = n if m is None else m
    out = n if out is None else out
    return (random.normal((n, heads * d), seed=(seed, 1)), random.normal((m, kv_heads * d), seed=(seed, 2)),
            random.normal((m, kv_heads * e), seed=(seed, 3)), random.normal((heads * e, out), seed=(seed, 4)))


@pytest.mark.parametrize("heads,kv_heads,d,e", [(4, 4, 3, 5), (4, 2, 6, 2), (6, 1, 2, 2), (1, 1, 8, 8)])
def test_matches_reference_on_every_backend(backend, heads, kv_heads, d, e):
    x = random.normal((2, 5, 7), seed=0)
    ws = weights(1, 7, heads, kv_heads, d, e, out=3)
    got = reflex.multi_head_attention(*(backend.asarray(a) for a in (x, *ws)), num_heads=heads, num_kv_heads=kv_heads)
    got = backend.to_numpy(got)
    assert got.shape == (2, 5, 3) and got.dtype == numpy.float64
    assert max_abs(got, reference(x, *ws, heads=heads, kv_heads=kv_heads)) < 1e-13


def test_cross_attention_biases_and_causal(backend):
    x, x_kv = random.normal((3, 4, 6), seed=0), random.normal((3, 9, 5), seed=1)
    ws = weights(2, 6, 4, 2, 3, 2, m=5)
    bs = {"b_q": random.normal((12,), seed=3), "b_k": random.normal((6,), seed=4),
          "b_v": random.normal((4,), seed=5), "b_o": random.normal((6,), seed=6)}
    got = reflex.multi_head_attention(*(backend.asarray(a) for a in (x, *ws)), num_heads=4, num_kv_heads=2,
                                      x_kv=backend.asarray(x_kv), mechanism_params={"causal": "top_left"},
                                      **{k: backend.asarray(b) for k, b in bs.items()})
    ref = reference(x, *ws, heads=4, kv_heads=2, causal=True, x_kv=x_kv, **bs)
    assert max_abs(backend.to_numpy(got), ref) < 1e-13


def test_length_one_and_unbatched():
    x = random.normal((1, 4), seed=0)
    ws = weights(1, 4, 2, 2, 2, 2)
    got = reflex.multi_head_attention(x, *ws, num_heads=2)
    assert got.shape == (1, 4)
    assert max_abs(got, reference(x, *ws, heads=2, kv_heads=2)) < 1e-13


def test_inner_mechanism_with_array_params():
    """Any registered mechanism: here full with an explicit bias array, looked up through the registry."""
    x = random.normal((2, 5, 8), seed=0)
    ws = weights(1, 8, 4, 4, 2, 3)
    bias = random.normal((2, 4, 5, 5), seed=7)
    got = reflex.multi_head_attention(x, *ws, num_heads=4, mechanism="full", mechanism_params={"bias": bias})
    q = numpy.moveaxis((x @ ws[0]).reshape(2, 5, 4, 2), -2, -3)
    k = numpy.moveaxis((x @ ws[1]).reshape(2, 5, 4, 2), -2, -3)
    v = numpy.moveaxis((x @ ws[2]).reshape(2, 5, 4, 3), -2, -3)
    heads = reflex.full_attention(q, k, v, bias=bias)
    ref = numpy.moveaxis(heads, -3, -2).reshape(2, 5, 12) @ ws[3]
    assert max_abs(got, ref) < 1e-13


def test_matches_torch_multi_head_attention_forward():
    torch = pytest.importorskip("torch")
    n, heads, length, batch = 12, 3, 6, 2
    x, y = random.normal((batch, length, n), seed=0), random.normal((batch, 8, n), seed=1)
    in_w = random.normal((3 * n, n), seed=2)  # torch layout: rows are output features
    in_b = random.normal((3 * n,), seed=3)
    out_w, out_b = random.normal((n, n), seed=4), random.normal((n,), seed=5)
    t = lambda a: torch.from_numpy(numpy.ascontiguousarray(a))  # noqa: E731
    for causal, kv in ((False, y), (True, x)):
        mask = None if not causal else t(~numpy.tri(length, dtype=bool))  # torch: True = masked out
        ref, _ = torch.nn.functional.multi_head_attention_forward(
            t(x).transpose(0, 1), t(kv).transpose(0, 1), t(kv).transpose(0, 1), n, heads, t(in_w), t(in_b), None, None,
            False, 0.0, t(out_w), t(out_b), training=False, need_weights=False, attn_mask=mask)
        ref = ref.transpose(0, 1).numpy()
        got = reflex.multi_head_attention(
            x, in_w[:n].T, in_w[n:2 * n].T, in_w[2 * n:].T, out_w.T, num_heads=heads, x_kv=kv,
            b_q=in_b[:n], b_k=in_b[n:2 * n], b_v=in_b[2 * n:], b_o=out_b, mechanism_params={"causal": causal})
        assert max_abs(got, ref) < 1e-13


def test_matches_torch_module_batch_first():
    torch = pytest.importorskip("torch")
    n, heads = 8, 2
    module = torch.nn.MultiheadAttention(n, heads, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        module.in_proj_weight.copy_(torch.from_numpy(random.normal((3 * n, n), seed=1)))
        module.in_proj_bias.copy_(torch.from_numpy(random.normal((3 * n,), seed=2)))
        module.out_proj.weight.copy_(torch.from_numpy(random.normal((n, n), seed=3)))
        module.out_proj.bias.copy_(torch.from_numpy(random.normal((n,), seed=4)))
    module.eval()
    x = random.normal((3, 5, n), seed=0)
    with torch.no_grad():
        ref, _ = module(torch.from_numpy(x), torch.from_numpy(x), torch.from_numpy(x), need_weights=False)
    w, b = module.in_proj_weight.detach().numpy(), module.in_proj_bias.detach().numpy()
    got = reflex.multi_head_attention(x, w[:n].T, w[n:2 * n].T, w[2 * n:].T, module.out_proj.weight.detach().numpy().T,
                                      num_heads=heads, b_q=b[:n], b_k=b[n:2 * n], b_v=b[2 * n:],
                                      b_o=module.out_proj.bias.detach().numpy())
    assert max_abs(got, ref.numpy()) < 1e-13


def test_errors():
    x = random.normal((2, 5, 8), seed=0)
    ws = weights(1, 8, 4, 2, 2, 3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        reflex.multi_head_attention(x, *ws, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="w_v has 6 columns"):
        reflex.multi_head_attention(x, *ws, num_heads=4, num_kv_heads=4)
    with pytest.raises(ValueError, match="w_q must have shape"):
        reflex.multi_head_attention(x[..., :7], *ws, num_heads=4, num_kv_heads=2)
    with pytest.raises(KeyError, match="unknown mechanism"):
        reflex.multi_head_attention(x, *ws, num_heads=4, num_kv_heads=2, mechanism="nope")
    with pytest.raises(ValueError, match="b_o must have shape"):
        reflex.multi_head_attention(x, *ws, num_heads=4, num_kv_heads=2, b_o=numpy.zeros(3))
    bad_k = random.normal((8, 6), seed=9)
    with pytest.raises(ValueError, match="w_k must have"):
        reflex.multi_head_attention(x, ws[0], bad_k, ws[2], ws[3], num_heads=4, num_kv_heads=2)
