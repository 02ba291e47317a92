"""flex_attention: equal to torch's FlexAttention (eager, float64, CPU) on a zoo of mods; gradients via reflex.vjp."""

from __future__ import annotations

import math
import warnings

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import assert_vjp_matches_finite_differences, max_abs

B, H, G, L, S, D, E = 2, 4, 2, 7, 9, 5, 3


def _inputs(seed=0, length=L, key_length=S, kv_heads=G):
    return (random.normal((B, H, length, D), seed=(seed, 0)),
            random.normal((B, kv_heads, key_length, D), seed=(seed, 1)),
            random.normal((B, kv_heads, key_length, E), seed=(seed, 2)))


class Lib:
    """What a mod author uses: the library's functions (``ops``), its arrays (``buf``) and a table lookup."""

    def __init__(self, name, ops, device=None):
        self.name, self.ops, self.device = name, ops, device

    def buf(self, host):
        if self.name == "torch":
            import torch
            return torch.from_numpy(numpy.ascontiguousarray(host))
        if self.name == "numpy":
            return numpy.asarray(host)
        return self.ops.asarray(host, device=self.device)

    def flt(self, x):
        """Index arithmetic as float64 (the standard does not promote int with float; NumPy and torch do)."""
        return self.ops.astype(x, self.ops.float64) if self.name == "strict" else x

    def look(self, table, *index):
        """``table[index]`` (integer-array indexing; the standard's ``take`` where that is all there is)."""
        if self.name != "strict":
            return table[index]
        xp = self.ops
        flat = 0
        for axis, i in enumerate(index):
            flat = flat + i * math.prod(table.shape[axis + 1:])
        shape = tuple(xp.broadcast_arrays(*index)[0].shape) if len(index) > 1 else tuple(index[0].shape)
        flat = xp.broadcast_to(flat, shape)
        return xp.reshape(xp.take(xp.reshape(table, (-1,)), xp.reshape(flat, (-1,))), shape)


def _zoo(lib):
    """name → (score_mod, mask_mod), written once for any library (torch, NumPy, array-api-strict)."""
    xp = lib.ops
    slopes = lib.buf(2.0 ** -numpy.arange(1, H + 1))
    per_batch = lib.buf(numpy.array([0.3, -0.7]))
    per_head = lib.buf(numpy.linspace(-1.0, 1.0, H))
    relative = lib.buf(0.25 * numpy.arange(-(L - 1), S, dtype=numpy.float64))  # indexed by kv − q + L − 1
    table = lib.buf(random.normal((H, L + S - 1), seed=(9, 9)))
    doc_q = lib.buf(numpy.array([0, 0, 0, 1, 1, 2, 2]))
    doc_k = lib.buf(numpy.array([0, 0, 1, 1, 1, 2, 2, 2, 3]))
    return {
        "causal": (None, lambda b, h, q, kv: q >= kv),
        "sliding_window": (None, lambda b, h, q, kv: (q >= kv) & (q - kv <= 3)),
        "prefix_lm": (None, lambda b, h, q, kv: (kv <= 2) | (q >= kv)),
        "document": (None, lambda b, h, q, kv: lib.look(doc_q, q) == lib.look(doc_k, kv)),
        "document_causal": (None, lambda b, h, q, kv: (lib.look(doc_q, q) == lib.look(doc_k, kv)) & (q >= kv)),
        "block_diagonal": (None, lambda b, h, q, kv: q // 3 == kv // 3),
        "dilated_window": (None, lambda b, h, q, kv: (xp.abs(q - kv) <= 4) & ((q - kv) % 2 == 0)),
        "per_batch_mask": (None, lambda b, h, q, kv: (kv <= q + b) | (h == 0)),
        "alibi": (lambda s, b, h, q, kv: s + lib.look(slopes, h) * lib.flt(kv - q), None),
        "alibi_causal": (lambda s, b, h, q, kv: s + lib.look(slopes, h) * lib.flt(kv - q),
                         lambda b, h, q, kv: q >= kv),
        "relative_bias": (lambda s, b, h, q, kv: s + lib.look(relative, kv - q + (L - 1)), None),
        "softcap": (lambda s, b, h, q, kv: 2.0 * xp.tanh(s / 2.0), None),
        "softcap_window": (lambda s, b, h, q, kv: 2.0 * xp.tanh(s / 2.0), lambda b, h, q, kv: xp.abs(q - kv) <= 2),
        "squared": (lambda s, b, h, q, kv: s * s, None),
        "bias_buffers": (lambda s, b, h, q, kv: s + lib.look(per_batch, b) + lib.look(per_head, h), None),
        "table_lookup": (lambda s, b, h, q, kv: s + lib.look(table, h, q - kv + (S - 1)), None),
        "fully_masked_rows": (lambda s, b, h, q, kv: s - 1.0, lambda b, h, q, kv: (q >= kv) & (q != 3)),
    }


ZOO = list(_zoo(Lib("numpy", numpy)))


def _torch_flex(name, q, k, v):
    """torch's eager flex_attention on host float64 inputs, with the zoo's torch mods."""
    torch = pytest.importorskip("torch")
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    score_mod, mask_mod = _zoo(Lib("torch", torch))[name]
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    block_mask = None if mask_mod is None else flex.create_block_mask(mask_mod, B, H, q.shape[-2], k.shape[-2],
                                                                      device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, lse = flex.flex_attention(tq, tk, tv, score_mod=score_mod, block_mask=block_mask, enable_gqa=True,
                                       return_lse=True)
    return out.numpy(), lse.numpy()


@pytest.mark.parametrize("name", ZOO)
def test_zoo_equals_torch_flex_attention(name):
    q, k, v = _inputs()
    want_out, want_lse = _torch_flex(name, q, k, v)
    import torch

    score_mod, mask_mod = _zoo(Lib("torch", torch))[name]
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    for implementation in ("dense", "tiled"):
        out, lse = reflex.flex_attention(tq, tk, tv, score_mod=score_mod, mask_mod=mask_mod, enable_gqa=True,
                                         return_lse=True, implementation=implementation)
        assert isinstance(out, torch.Tensor)
        assert max_abs(out.numpy(), want_out) <= 1e-13 and max_abs(lse.numpy(), want_lse) <= 1e-13
    if name == "fully_masked_rows":
        assert numpy.all(want_lse[:, :, 3] == -numpy.inf) and numpy.all(out.numpy()[:, :, 3] == 0)


@pytest.mark.parametrize("name", ZOO)
def test_numpy_mods_equal_torch_flex_attention(name, small_tiles):
    """A NumPy user writes the mods with NumPy operators: same results as torch's."""
    q, k, v = _inputs()
    want_out, want_lse = _torch_flex(name, q, k, v)
    score_mod, mask_mod = _zoo(Lib("numpy", numpy))[name]
    for implementation in ("dense", "tiled"):  # tiled in 3 x 4 tiles: the mods are called per tile
        out, lse = reflex.flex_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, enable_gqa=True,
                                         return_lse=True, implementation=implementation)
        assert max_abs(out, want_out) <= 1e-13 and max_abs(lse, want_lse) <= 1e-13


@pytest.mark.parametrize("name", ["causal", "document", "dilated_window", "alibi_causal", "softcap_window",
                                  "bias_buffers", "table_lookup", "fully_masked_rows"])
def test_backend_matrix_dense_equals_tiled(name, backend, small_tiles):
    """Mods written with the backend's own operators; dense ≡ tiled, and both equal NumPy's."""
    q, k, v = _inputs(1)
    host_mods = _zoo(Lib("numpy", numpy))[name]
    want = reflex.flex_attention(q, k, v, score_mod=host_mods[0], mask_mod=host_mods[1], enable_gqa=True,
                                 implementation="dense")
    if backend.name == "torch":
        import torch
        lib = Lib("torch", torch)
    elif backend.name.startswith("strict"):
        lib = Lib("strict", backend.xp, backend.device)
    else:
        lib = Lib("numpy", numpy)
    score_mod, mask_mod = _zoo(lib)[name]
    xq, xk, xv = (backend.asarray(x) for x in (q, k, v))
    results = [backend.to_numpy(reflex.flex_attention(xq, xk, xv, score_mod=score_mod, mask_mod=mask_mod,
                                                      enable_gqa=True, implementation=implementation))
               for implementation in ("dense", "tiled")]
    assert max_abs(results[0], results[1]) <= 1e-15
    assert max_abs(results[0], want) <= 1e-15


def test_mods_receive_documented_index_shapes(small_tiles):
    q, k, v = _inputs()
    seen = []

    def mask_mod(b, h, q_idx, kv_idx):
        seen.append((tuple(b.shape), tuple(h.shape), tuple(q_idx.shape), tuple(kv_idx.shape)))
        return q_idx >= kv_idx

    def score_mod(s, b, h, q_idx, kv_idx):
        seen.append((tuple(s.shape),))
        return s

    reflex.flex_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, enable_gqa=True, implementation="dense")
    assert seen == [((B, 1, 1, 1), (1, H, 1, 1), (1, 1, L, 1), (1, 1, 1, S)), ((B, H, L, S),)]
    seen.clear()
    reflex.flex_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, enable_gqa=True, implementation="tiled")
    masks = [x for x in seen if len(x) == 4]
    assert masks[0] == ((B, 1, 1, 1), (1, H, 1, 1), (1, 1, 3, 1), (1, 1, 1, 4))
    # tiles above the causal diagonal are all False: skipped on NumPy (no score_mod call for them)
    assert len([x for x in seen if len(x) == 1]) < len(masks)


def test_no_mods_is_full_attention(xp, backend):
    q, k, v = (backend.asarray(x) for x in _inputs(2))
    out, lse = reflex.flex_attention(q, k, v, enable_gqa=True, return_lse=True)
    want, want_lse = reflex.full_attention(q, k, v, return_lse=True)
    assert max_abs(backend.to_numpy(out), backend.to_numpy(want)) <= 1e-15
    assert max_abs(backend.to_numpy(lse), backend.to_numpy(want_lse)) <= 1e-15


@pytest.mark.parametrize("length,key_length", [(1, 1), (1, 9), (9, 1), (0, 4), (4, 0)])
def test_edges(length, key_length):
    q, k, v = _inputs(3, length=length, key_length=key_length)
    for implementation in ("dense", "tiled"):
        out, lse = reflex.flex_attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s * s,
                                         mask_mod=lambda b, h, qi, ki: qi >= ki, enable_gqa=True, return_lse=True,
                                         implementation=implementation)
        assert out.shape == (B, H, length, E) and lse.shape == (B, H, length)
        if key_length == 0:  # nothing to attend: rows 0, lse −∞
            assert numpy.all(out == 0) and numpy.all(lse == -numpy.inf)
        else:  # query 0 always sees key 0
            assert numpy.all(numpy.isfinite(lse[:, :, :1])) and numpy.all(numpy.isfinite(out))


def test_errors():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="enable_gqa"):
        reflex.flex_attention(q, k, v)
    with pytest.raises(ValueError, match="4 axes"):
        reflex.flex_attention(q[0], k[0], v[0], enable_gqa=True)
    with pytest.raises(TypeError, match="mask_mod"):
        reflex.flex_attention(q, k, v, enable_gqa=True, mask_mod="causal")
    with pytest.raises(TypeError, match="booleans"):
        reflex.flex_attention(q, k, v, enable_gqa=True, mask_mod=lambda b, h, qi, ki: qi - ki)
    with pytest.raises(ValueError, match="score_mod_grad"):
        reflex.flex_attention(q, k, v, enable_gqa=True, score_mod_grad=lambda s, b, h, qi, ki: s)
    with pytest.raises(TypeError, match="enable_gqa"):
        reflex.flex_attention(q, k, v, enable_gqa="yes")


# --- gradients -----------------------------------------------------------------------------------

class Alibi:
    """An additive score_mod with a captured, differentiable buffer (the documented protocol)."""

    def __init__(self, slopes):
        self.params = {"slopes": slopes}

    def __call__(self, s, b, h, q, kv):
        return s + self.params["slopes"][h] * (kv - q)

    def vjp(self, s, b, h, q, kv, d_value):
        return {"slopes": numpy.sum(d_value * (kv - q), axis=(0, 2, 3))}


def _torch_formula(q, k, v, score_mod, mask_mod, buffers=()):
    """Gradients by torch autograd of the explicit dense formula (torch's flex_attention has no CPU backward)."""
    torch = pytest.importorskip("torch")
    t = [torch.from_numpy(x.copy()).requires_grad_(True) for x in (q, k, v, *buffers)]
    tq, tk, tv = t[:3]
    group = tq.shape[1] // tk.shape[1]
    kk, vv = tk.repeat_interleave(group, dim=1), tv.repeat_interleave(group, dim=1)
    b = torch.arange(B).reshape(B, 1, 1, 1)
    h = torch.arange(H).reshape(1, H, 1, 1)
    qi = torch.arange(tq.shape[2]).reshape(1, 1, -1, 1)
    ki = torch.arange(tk.shape[2]).reshape(1, 1, 1, -1)
    s = tq @ kk.transpose(-1, -2) / math.sqrt(D)
    if score_mod is not None:
        s = score_mod(s, b, h, qi, ki, *t[3:])
    if mask_mod is not None:
        s = torch.where(mask_mod(b, h, qi, ki), s, -math.inf)
    out = torch.softmax(s, dim=-1) @ vv
    lse = torch.logsumexp(s, dim=-1)
    d_out = random.normal(tuple(out.shape), seed=(7, 0))
    d_lse = random.normal(tuple(lse.shape), seed=(7, 1))
    ((out * torch.from_numpy(d_out)).sum() + (lse * torch.from_numpy(d_lse)).sum()).backward()
    return d_out, d_lse, [x.grad.numpy() for x in t]


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
@pytest.mark.parametrize("case", ["mask", "squared", "softcap", "alibi_buffer"])
def test_vjp_equals_torch_autograd(case, implementation, small_tiles):
    q, k, v = _inputs(4)
    mask_mod = lambda b, h, qi, ki: (qi >= ki) | (ki < 2)  # noqa: E731
    slopes = 2.0 ** -numpy.arange(1, H + 1)
    params, buffers, torch_mod = {"mask_mod": mask_mod}, {}, None
    if case == "squared":
        params.update(score_mod=lambda s, *_: s * s, score_mod_grad=lambda s, *_: 2.0 * s)
        torch_mod = lambda s, *_: s * s  # noqa: E731
    elif case == "softcap":
        params.update(score_mod=lambda s, *_: 2.0 * numpy.tanh(s / 2.0),
                      score_mod_grad=lambda s, *_: 1.0 - numpy.tanh(s / 2.0) ** 2)
        import torch
        torch_mod = lambda s, *_: 2.0 * torch.tanh(s / 2.0)  # noqa: E731
    elif case == "alibi_buffer":
        params.update(score_mod=Alibi(slopes), score_mod_grad=lambda s, *_: numpy.ones_like(s))
        buffers = {"slopes": slopes}
        torch_mod = lambda s, b, h, qi, ki, sl: s + sl[h] * (ki - qi)  # noqa: E731
    d_out, d_lse, want = _torch_formula(q, k, v, torch_mod, mask_mod, tuple(buffers.values()))
    got = reflex.vjp("flex", {"q": q, "k": k, "v": v, **buffers}, d_out, d_lse=d_lse, enable_gqa=True,
                     implementation=implementation, **params)
    for name, w in zip(["q", "k", "v", *buffers], want):
        assert max_abs(got[name], w) <= 1e-12 * max(1.0, float(numpy.max(numpy.abs(w)))), name


def test_vjp_matches_finite_differences():
    q, k, v = _inputs(5, length=4, key_length=5)
    d_out = random.normal((B, H, 4, E), seed=(5, 9))
    assert_vjp_matches_finite_differences("flex", {"q": q, "k": k, "v": v}, d_out,
                                          params=dict(enable_gqa=True, score_mod=lambda s, *_: s * s,
                                                      score_mod_grad=lambda s, *_: 2.0 * s,
                                                      mask_mod=lambda b, h, qi, ki: qi + 1 >= ki))


def test_vjp_on_the_backend_matrix(backend):
    q, k, v = _inputs(6)
    d_out = random.normal((B, H, L, E), seed=(6, 9))
    params = dict(enable_gqa=True, mask_mod=lambda b, h, qi, ki: qi >= ki)
    want = reflex.vjp("flex", {"q": q, "k": k, "v": v}, d_out, **params)
    got = reflex.vjp("flex", {n: backend.asarray(x) for n, x in (("q", q), ("k", k), ("v", v))},
                     backend.asarray(d_out), **params)
    for name in "qkv":
        assert max_abs(backend.to_numpy(got[name]), want[name]) <= 1e-15


def test_vjp_refuses_a_score_mod_without_its_derivative():
    q, k, v = _inputs()
    d_out = numpy.ones((B, H, L, E))
    with pytest.raises(NotImplementedError, match="score_mod_grad"):
        reflex.vjp("flex", {"q": q, "k": k, "v": v}, d_out, enable_gqa=True, score_mod=lambda s, *_: s * s)
    with pytest.raises(NotImplementedError, match="'offsets'"):
        reflex.vjp("flex", {"q": q, "k": k, "v": v, "offsets": numpy.ones(H)}, d_out, enable_gqa=True,
                   score_mod=lambda s, *_: s, score_mod_grad=lambda s, *_: numpy.ones_like(s))


def test_native_spellings_equal_flex():
    """The 'native reflex' column of docs/flex_and_flash.md: each equals the flex mods it stands for."""
    q, k, v = _inputs(8, length=9, key_length=9)
    slopes = 2.0 ** -numpy.arange(1, H + 1)
    bb, hb = numpy.array([0.3, -0.7]), numpy.linspace(-1.0, 1.0, H)
    pairs = [
        (dict(mask_mod=lambda b, h, qi, ki: qi >= ki), reflex.full_attention(q, k, v, causal=True)),
        (dict(mask_mod=lambda b, h, qi, ki: (qi >= ki) & (qi - ki <= 3)),
         reflex.sliding_window_attention(q, k, v, window=(3, 0))),
        (dict(mask_mod=lambda b, h, qi, ki: qi // 3 == ki // 3), reflex.block_local_attention(q, k, v, block_size=3)),
        (dict(mask_mod=lambda b, h, qi, ki: (numpy.abs(qi - ki) <= 4) & ((qi - ki) % 2 == 0)),
         reflex.dilated_attention(q, k, v, window=(2, 2), dilation=2)),
        (dict(score_mod=lambda s, b, h, qi, ki: s + slopes[h] * (ki - qi)),
         reflex.alibi_attention(q, k, v, slopes=slopes, symmetric=False, alignment="top_left")),
        (dict(score_mod=lambda s, b, h, qi, ki: 2.0 * numpy.tanh(s / 2.0)),
         reflex.full_attention(q, k, v, softcap=2.0)),
        (dict(score_mod=lambda s, b, h, qi, ki: s + bb[b] + hb[h]),
         reflex.full_attention(q, k, v, bias=bb[:, None, None, None] + hb[None, :, None, None])),
    ]
    for mods, native in pairs:
        assert max_abs(reflex.flex_attention(q, k, v, enable_gqa=True, **mods), native) <= 1e-13, mods


def test_engine_options_compose_after_score_mod():
    """bias and softcap (the engine options of every q, k, v mechanism) apply after score_mod."""
    q, k, v = _inputs(9)
    bias = random.normal((B, H, L, S), seed=(9, 3))
    got = reflex.flex_attention(q, k, v, enable_gqa=True, score_mod=lambda s, *_: s * s,
                                mask_mod=lambda b, h, qi, ki: qi >= ki, softcap=3.0, bias=bias)
    want = reflex.flex_attention(q, k, v, enable_gqa=True, mask_mod=lambda b, h, qi, ki: qi >= ki,
                                 score_mod=lambda s, b, h, qi, ki: 3.0 * numpy.tanh(s * s / 3.0) + bias)
    assert max_abs(got, want) <= 1e-14


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_row_and_key_windows_see_absolute_indices(implementation, small_tiles):
    """Under the engine's row/key window (how reflex.distributed shards), the mods get absolute
    positions: query shards equal the rows of the whole result, key blocks merge to it by lse."""
    from reflex.mechanisms._engine.window import window
    from reflex.mechanisms._merge import merge_partials

    q, k, v = _inputs(10)
    mods = dict(score_mod=lambda s, b, h, qi, ki: s * s + 0.125 * (ki - qi),
                mask_mod=lambda b, h, qi, ki: qi + 2 >= ki, enable_gqa=True, implementation=implementation,
                return_lse=True)
    out, lse = reflex.flex_attention(q, k, v, **mods)
    with window(rows=(2, 5), keys=(0, S)):
        rows_out, rows_lse = reflex.flex_attention(q, k, v, **mods)
    assert max_abs(rows_out, out[:, :, 2:5]) <= 1e-15 and max_abs(rows_lse, lse[:, :, 2:5]) <= 1e-15
    parts = []
    for keys in ((0, 4), (4, S)):
        with window(rows=(0, L), keys=keys):
            parts.append(reflex.flex_attention(q, k, v, **mods))
    merged_out, merged_lse = merge_partials(numpy, [p[0] for p in parts], [p[1] for p in parts])
    assert max_abs(merged_out, out) <= 1e-14 and max_abs(merged_lse, lse) <= 1e-14


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_dropout_composes_with_the_mods(implementation, small_tiles):
    """The engine's dropout (explicit keep mask) on flex: O = (P∘M)·V/(1 − p), P from the modded scores."""
    q, k, v = _inputs(11, kv_heads=H)
    keep = random.uniform((B, H, L, S), seed=(11, 5)) < 0.7
    got = reflex.flex_attention(q, k, v, score_mod=lambda s, *_: s * s, mask_mod=lambda b, h, qi, ki: qi >= ki,
                                dropout_mask=keep, dropout_p=0.3, implementation=implementation)
    s = (q @ numpy.swapaxes(k, -1, -2) / math.sqrt(D)) ** 2
    s = numpy.where(numpy.tri(L, S, dtype=bool), s, -numpy.inf)
    weights = numpy.exp(s - s.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    assert max_abs(got, (weights * keep / 0.7) @ v) <= 1e-14
