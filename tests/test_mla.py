"""mla: naive = absorbed, both against the decompressed formula written out in NumPy; FlashMLA's layout."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs

NOPE, ROT, LATENT, VALUE = 6, 4, 10, 5


def inputs(seed, *, batch=(2,), heads=3, length=5, key_length=7, nope=NOPE, rot=ROT, latent=LATENT, value=VALUE):
    return {
        "q": random.normal((*batch, heads, length, nope + rot), seed=(seed, 0)),
        "c_kv": random.normal((*batch, 1, key_length, latent), seed=(seed, 1)),
        "k_pe": random.normal((*batch, 1, key_length, rot), seed=(seed, 2)),
        "w_uk": random.normal((heads, nope, latent), seed=(seed, 3)) / latent ** 0.5,
        "w_uv": random.normal((heads, value, latent), seed=(seed, 4)) / latent ** 0.5,
    }


def rotate_pairs(x, positions, base=10000.0, interleaved=True):
    """RoPE by hand: pair (2t, 2t+1) (or (t, t + r/2)) rotated by p·base^(−2t/r)."""
    out = numpy.array(x, copy=True)
    r = x.shape[-1]
    for t in range(r // 2):
        a, b = (2 * t, 2 * t + 1) if interleaved else (t, t + r // 2)
        angle = numpy.asarray(positions, dtype=numpy.float64) * (1.0 / base ** (2 * t / r))
        c, s = numpy.cos(angle), numpy.sin(angle)
        out[..., a] = x[..., a] * c - x[..., b] * s
        out[..., b] = x[..., a] * s + x[..., b] * c
    return out


def mla_by_hand(q, c_kv, k_pe, w_uk, w_uv, *, scale, interleaved=True, mask=None):
    """Decompress k = [W_UK c | RoPE(k_pe)], v = W_UV c per head; dense softmax (positions: S − L.. and 0..)."""
    length, key_length = q.shape[-2], c_kv.shape[-2]
    nope = w_uk.shape[1]
    q_pe = rotate_pairs(q[..., nope:], numpy.arange(key_length - length, key_length), interleaved=interleaved)
    k_rot = rotate_pairs(k_pe, numpy.arange(key_length), interleaved=interleaved)
    heads = q.shape[-3]
    k = numpy.concatenate([numpy.einsum("hnc,...sc->...hsn", w_uk, c_kv[..., 0, :, :]),
                           numpy.broadcast_to(k_rot, (*k_rot.shape[:-3], heads, key_length, k_rot.shape[-1]))], axis=-1)
    v = numpy.einsum("hec,...sc->...hse", w_uv, c_kv[..., 0, :, :])
    s = numpy.concatenate([q[..., :nope], q_pe], axis=-1) @ numpy.swapaxes(k, -1, -2) * scale
    if mask is not None:
        s = numpy.where(mask, s, -numpy.inf)
    m = s.max(-1, keepdims=True)
    e = numpy.exp(s - numpy.where(numpy.isfinite(m), m, 0.0))
    total = e.sum(-1, keepdims=True)
    return (e / numpy.where(total == 0, 1.0, total)) @ v


@pytest.mark.parametrize("form", ["naive", "absorbed"])
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
def test_forms_match_the_decompressed_formula(backend, form, causal):
    x = inputs(1)
    arrays = {name: backend.asarray(a) for name, a in x.items()}
    got = reflex.mla_attention(arrays["q"], arrays["c_kv"], arrays["k_pe"], w_uk=arrays["w_uk"], w_uv=arrays["w_uv"],
                               scale=0.3, form=form, causal=causal)
    mask = None if causal is False else numpy.tri(5, 7, 0 if causal == "top_left" else 2, dtype=bool)
    ref = mla_by_hand(x["q"], x["c_kv"], x["k_pe"], x["w_uk"], x["w_uv"], scale=0.3, mask=mask)
    assert max_abs(backend.to_numpy(got), ref) < 1e-13


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
@pytest.mark.parametrize("rope", ["interleaved", "half", None])
def test_naive_equals_absorbed_with_lse(small_tiles, implementation, rope):
    x = inputs(2, length=6, key_length=11)
    mask = random.uniform((2, 3, 6, 11), seed=5) < 0.6
    mask[:, 1, 2, :] = False  # a fully masked row: output 0, lse −inf, in both forms
    options = dict(w_uk=x["w_uk"], w_uv=x["w_uv"], scale=0.25, rope=rope, mask=mask, return_lse=True,
                   implementation=implementation)
    naive, lse_naive = reflex.mla_attention(x["q"], x["c_kv"], x["k_pe"], form="naive", **options)
    absorbed, lse_absorbed = reflex.mla_attention(x["q"], x["c_kv"], x["k_pe"], form="absorbed", **options)
    assert max_abs(naive, absorbed) <= 1e-12 and max_abs(lse_naive, lse_absorbed) <= 1e-12
    assert numpy.all(naive[:, 1, 2] == 0) and numpy.all(lse_naive[:, 1, 2] == -numpy.inf)
    if rope is not None:
        ref = mla_by_hand(x["q"], x["c_kv"], x["k_pe"], x["w_uk"], x["w_uv"], scale=0.25, mask=mask,
                          interleaved=rope == "interleaved")
        assert max_abs(naive, ref) < 1e-13


def test_flashmla_layout_576_with_the_first_512_as_values():
    """FlashMLA: one kv head of d_qk = 576 = 512 latent + 64 rope; V = its first 512 entries; scale 192^−½."""
    x = inputs(3, batch=(1,), heads=2, length=2, key_length=5, nope=128, rot=64, latent=512, value=128)
    q_abs, kv = reflex.mla_absorbed_inputs(x["q"], x["c_kv"], x["k_pe"], w_uk=x["w_uk"])
    assert q_abs.shape == (1, 2, 2, 576) and kv.shape == (1, 1, 5, 576)
    assert numpy.array_equal(kv[..., :512], x["c_kv"])
    latent = reflex.full_attention(q_abs, kv, kv[..., :512], scale=192 ** -0.5, causal="bottom_right")
    out = latent @ numpy.swapaxes(x["w_uv"], -1, -2)
    ref = reflex.mla_attention(x["q"], x["c_kv"], x["k_pe"], w_uk=x["w_uk"], w_uv=x["w_uv"], scale=192 ** -0.5,
                               causal="bottom_right")
    assert max_abs(out, ref) < 1e-13
    default_scale = reflex.full_attention(q_abs, kv, kv[..., :512], causal="bottom_right")  # 576^−½: not DeepSeek's
    assert max_abs(default_scale @ numpy.swapaxes(x["w_uv"], -1, -2), ref) > 1e-3


def test_positions_rotate_queries_and_keys():
    x = inputs(4, length=3, key_length=3)
    common = dict(w_uk=x["w_uk"], w_uv=x["w_uv"], scale=0.4)
    shifted = reflex.mla_attention(x["q"], x["c_kv"], x["k_pe"], positions=numpy.arange(3) + 100,
                                   key_positions=numpy.arange(3) + 100, **common)
    assert max_abs(shifted, reflex.mla_attention(x["q"], x["c_kv"], x["k_pe"], **common)) < 1e-12  # relative only
    moved = reflex.mla_attention(x["q"], x["c_kv"], x["k_pe"], positions=numpy.arange(3) + 5, **common)
    assert max_abs(moved, reflex.mla_attention(x["q"], x["c_kv"], x["k_pe"], **common)) > 1e-3


@pytest.mark.parametrize("length, key_length, nope", [(1, 1, NOPE), (1, 9, NOPE), (4, 1, NOPE), (3, 5, 0)])
def test_edges(length, key_length, nope):
    x = inputs(5, length=length, key_length=key_length, nope=nope)
    got = reflex.mla_attention(x["q"], x["c_kv"], x["k_pe"], w_uk=x["w_uk"], w_uv=x["w_uv"], scale=0.5, form="absorbed",
                               causal="bottom_right")
    mask = numpy.tri(length, key_length, key_length - length, dtype=bool)
    assert max_abs(got, mla_by_hand(x["q"], x["c_kv"], x["k_pe"], x["w_uk"], x["w_uv"], scale=0.5, mask=mask)) < 1e-13


def test_compute_dtype_float32():
    x = inputs(6)
    args = (x["q"], x["c_kv"], x["k_pe"])
    low = reflex.mla_attention(*args, w_uk=x["w_uk"], w_uv=x["w_uv"], scale=0.3, compute_dtype="float32")
    assert low.dtype == numpy.float32
    assert 0 < max_abs(low, reflex.mla_attention(*args, w_uk=x["w_uk"], w_uv=x["w_uv"], scale=0.3)) < 1e-5


def test_bad_inputs():
    x = inputs(7)
    q, c, kpe = x["q"], x["c_kv"], x["k_pe"]
    w = dict(w_uk=x["w_uk"], w_uv=x["w_uv"], scale=0.3)
    with pytest.raises(ValueError, match="c_kv must have one"):
        reflex.mla_attention(q, numpy.concatenate([c, c], axis=1), kpe, **w)
    with pytest.raises(ValueError, match="k_pe has 6 positions"):
        reflex.mla_attention(q, c, kpe[..., :6, :], **w)
    with pytest.raises(ValueError, match="must be d_nope"):
        reflex.mla_attention(q[..., :3], c, kpe, **w)
    with pytest.raises(ValueError, match="must be even"):
        reflex.mla_attention(q[..., :9], c, kpe[..., :3], **w)
    with pytest.raises(ValueError, match=r"w_uk must have shape \(H, d_nope, d_c\)"):
        reflex.mla_attention(q, c, kpe, **{**w, "w_uk": x["w_uk"][:, :5]})
    with pytest.raises(ValueError, match=r"w_uv must have shape \(H, E, d_c\)"):
        reflex.mla_attention(q, c, kpe, **{**w, "w_uv": x["w_uv"][:2]})
    with pytest.raises(ValueError, match="form must be"):
        reflex.mla_attention(q, c, kpe, form="compressed", **w)
    with pytest.raises(ValueError, match="rope must be"):
        reflex.mla_attention(q, c, kpe, rope="yarn", **w)
    with pytest.raises(TypeError):
        reflex.mla_attention(q, c, kpe, w_uk=x["w_uk"], w_uv=x["w_uv"])  # scale is required
    with pytest.raises((TypeError, ValueError), match="causal must be"):
        reflex.mla_attention(q, c, kpe, causal="upper", **w)


@pytest.mark.parametrize("form, rope, causal, implementation", [("naive", "interleaved", False, "dense"),
                                                                ("absorbed", "half", "bottom_right", "tiled"),
                                                                ("naive", None, True, "dense")])
def test_vjp_matches_finite_differences(small_tiles, form, rope, causal, implementation):
    from tests.helpers import assert_vjp_matches_finite_differences

    x = inputs(8, batch=(1,), heads=2, length=3, key_length=5, nope=3, rot=2, latent=4, value=3)
    d_out = random.normal((1, 2, 3, 3), seed=9)
    d_lse = random.normal((1, 2, 3), seed=10)
    params = {"scale": 0.6, "form": form, "rope": rope, "causal": causal, "implementation": implementation}
    given = {**x, "mask": random.uniform((1, 2, 3, 5), seed=11) < 0.8, "positions": numpy.array([4, 1, 6])}
    grads = assert_vjp_matches_finite_differences("mla", given,
                                                  d_out, d_lse=d_lse, params=params, max_entries=40)
    assert set(grads) == {"q", "c_kv", "k_pe", "w_uk", "w_uv"}


def test_vjp_on_every_backend(backend):
    x = inputs(12, heads=2, length=3, key_length=4, nope=3, rot=2, latent=4, value=3)
    d_out = random.normal((2, 2, 3, 3), seed=13)
    positions = numpy.array([7, 9, 2])
    host = reflex.vjp("mla", {**x, "positions": positions}, d_out, scale=0.5, causal="bottom_right")
    moved = {name: backend.asarray(a) for name, a in {**x, "positions": positions}.items()}
    got = reflex.vjp("mla", moved, backend.asarray(d_out), scale=0.5, causal="bottom_right")
    for name, g in host.items():
        assert max_abs(backend.to_numpy(got[name]), g) < 1e-13
