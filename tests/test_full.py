"""full_attention: the backend matrix, dense vs tiled, properties, edges, errors, torch SDPA."""

from __future__ import annotations

import importlib.util
import math

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from reflex import random
from reflex.mechanisms import _kernels
from tests.helpers import max_abs, qkv_host

HAS_TORCH = importlib.util.find_spec("torch") is not None


def naive(q, k, v, *, mask=None, bias=None, scale=None, softcap=None):
    """Textbook host reference: repeat kv heads, materialise scores, softmax, multiply."""
    r = q.shape[-3] // k.shape[-3]
    k, v = numpy.repeat(k, r, axis=-3), numpy.repeat(v, r, axis=-3)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * q @ numpy.swapaxes(k, -1, -2)
    if softcap is not None:
        s = softcap * numpy.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = numpy.where(mask, s, -numpy.inf)
    m = numpy.max(s, axis=-1, keepdims=True)
    m = numpy.where(numpy.isfinite(m), m, 0.0)
    w = numpy.exp(s - m)
    total = w.sum(-1, keepdims=True)
    out = numpy.where(total > 0, (w @ v) / numpy.where(total > 0, total, 1), 0.0)
    with numpy.errstate(divide="ignore"):
        lse = (m + numpy.log(total))[..., 0]
    return out, lse


@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_matches_naive_on_every_backend(backend, causal, implementation):
    q, k, v = qkv_host(1, length=7, key_length=11)
    mask = random.uniform((2, 1, 7, 11), seed=5) < 0.8
    bias = random.normal((4, 1, 11), seed=6)
    args = [backend.asarray(a) for a in (q, k, v)]
    out, lse = reflex.full_attention(*args, mask=backend.asarray(mask), bias=backend.asarray(bias), causal=causal,
                                     softcap=3.0, return_lse=True, implementation=implementation)
    full_mask = mask
    if causal:
        offset = 0 if causal == "top_left" else 11 - 7
        full_mask = mask & (numpy.arange(11)[None, :] <= numpy.arange(7)[:, None] + offset)
    ref_out, ref_lse = naive(q, k, v, mask=full_mask, bias=bias, softcap=3.0)
    assert max_abs(backend.to_numpy(out), ref_out) < 1e-14
    assert max_abs(backend.to_numpy(lse), ref_lse) < 1e-13
    assert backend.to_numpy(out).dtype == numpy.float64


def test_tiled_equals_dense_across_many_tiles():
    q, k, v = qkv_host(2, length=37, key_length=53, dim=8, value_dim=4)
    p = _kernels.prepare(q, k, v)
    mask = random.uniform((2, 4, 37, 53), seed=3) < 0.5
    for softcap in (None, 1.5):
        dense = _kernels.dense(p, scale=0.3, mask=mask, softcap=softcap)
        for bq, bk in [(1, 1), (5, 7), (16, 8), (37, 53), (100, 100)]:
            tiled = _kernels.tiled(p, scale=0.3, mask=mask, softcap=softcap, block_q=bq, block_k=bk)
            assert max_abs(tiled[0], dense[0]) <= 1e-13
            assert max_abs(tiled[1], dense[1]) <= 1e-13


def test_gather_equals_dense_with_pattern():
    q, k, v = qkv_host(3, length=6, key_length=10)
    p = _kernels.prepare(q, k, v)
    idx = random.choice((2, 4, 6), seed=4, population=10, count=4)
    idx[..., 0, 3] = -1  # padding
    allowed = numpy.zeros((2, 4, 6, 10), dtype=bool)
    numpy.put_along_axis(allowed, numpy.where(idx < 0, 0, idx), True, axis=-1)
    allowed[:, :, 0, :] = False
    for b in range(2):
        for h in range(4):
            allowed[b, h, 0, idx[b, h, 0, :3]] = True
    out, lse = _kernels.gather(p, idx, scale=0.5, block_q=4)
    ref = _kernels.dense(p, scale=0.5, mask=allowed)
    assert max_abs(out, ref[0]) < 1e-14 and max_abs(lse, ref[1]) < 1e-14


# --- properties (hypothesis) ----------------------------------------------------------------------

shapes = st.fixed_dictionaries({
    "heads_per_group": st.integers(1, 3), "kv_heads": st.integers(1, 2), "length": st.integers(1, 9),
    "key_length": st.integers(1, 9), "dim": st.integers(1, 6), "seed": st.integers(0, 10_000),
})


def _draw(s):
    return qkv_host(s["seed"], heads=s["heads_per_group"] * s["kv_heads"], kv_heads=s["kv_heads"],
                    length=s["length"], key_length=s["key_length"], dim=s["dim"], value_dim=2)


@given(shapes)
def test_key_permutation_invariance(s):
    q, k, v = _draw(s)
    perm = numpy.random.Generator(numpy.random.PCG64(s["seed"])).permutation(k.shape[-2])
    out = reflex.full_attention(q, k, v)
    assert max_abs(reflex.full_attention(q, k[..., perm, :], v[..., perm, :]), out) < 1e-14


@given(shapes, st.floats(-50, 50))
def test_score_shift_invariance(s, shift):
    q, k, v = _draw(s)
    out, lse = reflex.full_attention(q, k, v, return_lse=True)
    bias = numpy.full((q.shape[-2], k.shape[-2]), shift)
    out2, lse2 = reflex.full_attention(q, k, v, bias=bias, return_lse=True)
    assert max_abs(out2, out) < 1e-13
    assert max_abs(lse2, lse + shift) < 1e-12


@given(shapes, st.sampled_from(["top_left", "bottom_right"]), st.sampled_from(["dense", "tiled"]))
def test_causal_equals_explicit_mask(s, alignment, implementation):
    q, k, v = _draw(s)
    L, S = q.shape[-2], k.shape[-2]
    offset = 0 if alignment == "top_left" else S - L
    mask = numpy.arange(S)[None, :] <= numpy.arange(L)[:, None] + offset
    a = reflex.full_attention(q, k, v, causal=alignment, return_lse=True, implementation=implementation)
    b = reflex.full_attention(q, k, v, mask=mask, return_lse=True, implementation="dense")
    assert max_abs(a[0], b[0]) < 1e-14 and max_abs(a[1], b[1]) < 1e-13


@given(shapes)
def test_gqa_equals_repeated_kv_heads(s):
    q, k, v = _draw(s)
    r = q.shape[-3] // k.shape[-3]
    a = reflex.full_attention(q, k, v)
    b = reflex.full_attention(q, numpy.repeat(k, r, axis=-3), numpy.repeat(v, r, axis=-3))
    assert max_abs(a, b) == 0.0


@given(shapes)
def test_mask_and_bias_equal_bias_with_minus_inf(s):
    q, k, v = _draw(s)
    shape = (q.shape[-3], q.shape[-2], k.shape[-2])
    mask = random.uniform(shape, seed=s["seed"]) < 0.6
    bias = random.normal(shape, seed=s["seed"] + 1)
    a = reflex.full_attention(q, k, v, mask=mask, bias=bias, return_lse=True)
    b = reflex.full_attention(q, k, v, bias=numpy.where(mask, bias, -numpy.inf), return_lse=True)
    assert max_abs(a[0], b[0]) == 0.0 and max_abs(a[1], b[1]) == 0.0


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_fully_masked_rows_give_zero_and_minus_inf(backend, implementation):
    q, k, v = qkv_host(4, length=5, key_length=6)
    mask = numpy.ones((5, 6), dtype=bool)
    mask[2] = False
    out, lse = reflex.full_attention(*(backend.asarray(a) for a in (q, k, v)), mask=backend.asarray(mask),
                                     return_lse=True, implementation=implementation)
    out, lse = backend.to_numpy(out), backend.to_numpy(lse)
    assert numpy.all(out[..., 2, :] == 0.0) and numpy.all(lse[..., 2] == -numpy.inf)
    assert numpy.all(numpy.isfinite(numpy.delete(out, 2, axis=-2)))
    # bottom_right with L > S: the first L − S queries see no key at all
    out, lse = reflex.full_attention(q[..., :5, :], k[..., :3, :], v[..., :3, :], causal="bottom_right",
                                     return_lse=True, implementation=implementation)
    assert numpy.all(out[..., :2, :] == 0.0) and numpy.all(lse[..., :2] == -numpy.inf)


# --- edges -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("length,key_length", [(1, 1), (1, 7), (7, 1), (3, 0), (0, 4)])
@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_edge_lengths(length, key_length, implementation):
    q, k, v = qkv_host(5, length=length, key_length=key_length)
    out, lse = reflex.full_attention(q, k, v, return_lse=True, implementation=implementation)
    ref_out, ref_lse = naive(q, k, v) if key_length and length else (numpy.zeros(out.shape), numpy.full(lse.shape, -numpy.inf))
    assert out.shape == (2, 4, length, 3) and lse.shape == (2, 4, length)
    assert max_abs(out, ref_out) < 1e-14 and max_abs(lse, ref_lse) < 1e-13


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_key_vector_and_scalar_terms(backend, implementation):
    """Terms with fewer than 2 axes ((S,) key padding mask, (S,) bias, 0-d bias) broadcast in both kernels."""
    q, k, v = qkv_host(18, length=5, key_length=6)
    key_mask = numpy.array([True, False, True, True, False, True])
    key_bias = random.normal((6,), seed=7)
    out, lse = reflex.full_attention(*(backend.asarray(a) for a in (q, k, v)), mask=backend.asarray(key_mask),
                                     bias=backend.asarray(key_bias), return_lse=True, implementation=implementation)
    ref_out, ref_lse = naive(q, k, v, mask=key_mask, bias=key_bias)
    assert max_abs(backend.to_numpy(out), ref_out) < 1e-14 and max_abs(backend.to_numpy(lse), ref_lse) < 1e-13
    out = reflex.full_attention(q, k, v, bias=numpy.asarray(0.5), implementation=implementation)
    assert max_abs(out, naive(q, k, v)[0]) < 1e-14
    p = _kernels.prepare(q, k, v)
    tiled = _kernels.tiled(p, scale=0.4, mask=key_mask, bias=key_bias, block_q=2, block_k=4)
    dense = _kernels.dense(p, scale=0.4, mask=key_mask, bias=key_bias)
    assert max_abs(tiled[0], dense[0]) < 1e-14 and max_abs(tiled[1], dense[1]) < 1e-13


def test_gather_with_no_keys():
    q, k, v = qkv_host(19, key_length=0)
    out, lse = _kernels.gather(_kernels.prepare(q, k, v), numpy.full((7, 2), -1), scale=1.0)
    assert numpy.all(out == 0.0) and numpy.all(lse == -numpy.inf) and out.shape == (2, 4, 7, 3)


def test_no_batch_axes_and_many_batch_axes():
    q, k, v = qkv_host(6, batch=())
    assert reflex.full_attention(q, k, v).shape == (4, 7, 3)
    q, k, v = qkv_host(6, batch=(2, 3))
    a = reflex.full_attention(q, k, v, implementation="tiled")
    assert max_abs(a, naive(q, k, v)[0]) < 1e-14


def test_huge_logits_stay_finite():
    q, k, v = qkv_host(7)
    out, lse = reflex.full_attention(q * 1e6, k * 1e6, v, return_lse=True)
    assert numpy.all(numpy.isfinite(out)) and numpy.all(numpy.isfinite(lse))
    tiled = reflex.full_attention(q * 1e6, k * 1e6, v, implementation="tiled")
    assert max_abs(out, tiled) < 1e-13


def test_float32_inputs_compute_in_float64_and_compute_dtype():
    q, k, v = qkv_host(8)
    q32, k32, v32 = (a.astype(numpy.float32) for a in (q, k, v))
    out = reflex.full_attention(q32, k32, v32)
    assert out.dtype == numpy.float64
    assert max_abs(out, naive(*(a.astype(numpy.float64) for a in (q32, k32, v32)))[0]) < 1e-14
    low = reflex.full_attention(q, k, v, compute_dtype="float32")
    assert low.dtype == numpy.float32 and 0 < max_abs(low, reflex.full_attention(q, k, v)) < 1e-5


def test_longdouble_dense_path():
    q, k, v = qkv_host(9)
    out = reflex.full_attention(q, k, v, compute_dtype=numpy.longdouble, implementation="dense")
    assert out.dtype == numpy.longdouble
    assert max_abs(out, reflex.full_attention(q, k, v)) < 1e-14


def test_same_input_same_bits():
    q, k, v = qkv_host(10, length=40, key_length=50)
    a = reflex.full_attention(q, k, v, causal=True, implementation="tiled")
    b = reflex.full_attention(q, k, v, causal=True, implementation="tiled")
    assert a.tobytes() == b.tobytes()


def test_tiled_memory_is_not_quadratic():
    tracemalloc = pytest.importorskip("tracemalloc")
    q, k, v = qkv_host(11, batch=(), heads=1, kv_heads=1, length=2048, key_length=2048, dim=8, value_dim=8)
    p = _kernels.prepare(q, k, v)
    tracemalloc.start()
    _kernels.tiled(p, scale=0.3, block_q=256, block_k=256)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2048 * 2048 * 8 / 8, f"tiled peak {peak} bytes is an eighth of the L×S matrix or more"


# --- errors ----------------------------------------------------------------------------------------

def test_errors_name_the_argument():
    q, k, v = qkv_host(12)
    with pytest.raises(ValueError, match="k has 3 heads; q has 4, which is not a multiple"):
        reflex.full_attention(q, k[:, :1].repeat(3, axis=1), v[:, :1].repeat(3, axis=1))
    with pytest.raises(ValueError, match="k has head dim 4; q has 5"):
        reflex.full_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="v has .* k has"):
        reflex.full_attention(q, k, v[..., :3, :])
    with pytest.raises(ValueError, match="k has batch shape"):
        reflex.full_attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="mask of shape \\(3, 9\\) does not broadcast"):
        reflex.full_attention(q, k, v, mask=numpy.ones((3, 9), dtype=bool))
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        reflex.full_attention(q, k, v, mask=numpy.ones((7, 9)))
    with pytest.raises(ValueError, match="bias of shape"):
        reflex.full_attention(q, k, v, bias=numpy.ones((2, 2, 7, 9)))
    with pytest.raises(TypeError, match="q must have a real floating dtype; got int64"):
        reflex.full_attention(q.astype(numpy.int64), k, v)
    with pytest.raises(TypeError, match="v must have a real floating dtype; got complex128"):
        reflex.full_attention(q, k, v.astype(numpy.complex128))
    with pytest.raises(ValueError, match="causal must be"):
        reflex.full_attention(q, k, v, causal="bottom-right")
    with pytest.raises(ValueError, match="implementation must be one of"):
        reflex.full_attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="softcap must be"):
        reflex.full_attention(q, k, v, softcap=-1.0)
    with pytest.raises(TypeError, match="compute_dtype must be a real floating dtype; got int64"):
        reflex.full_attention(q, k, v, compute_dtype=numpy.int64)
    with pytest.raises(ValueError, match="at least 3 axes"):
        reflex.full_attention(q[0, 0], k[0, 0], v[0, 0])


def test_mixed_libraries_rejected():
    strict = pytest.importorskip("array_api_strict")
    q, k, v = qkv_host(13)
    with pytest.raises(TypeError, match="different array libraries"):
        reflex.full_attention(q, strict.asarray(k), v)


def test_mixed_devices_rejected():
    strict = pytest.importorskip("array_api_strict")
    q, k, v = (strict.asarray(a) for a in qkv_host(14))
    with pytest.raises(ValueError, match="k is on device"):
        reflex.full_attention(q, strict.asarray(k, device=strict.Device("device1")), v)


# --- torch SDPA, float64 ---------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("variant", ["plain", "causal_top_left", "bool_mask", "float_bias", "scale"])
def test_agrees_with_torch_sdpa(kv_heads, variant):
    import torch
    import torch.nn.functional as F

    q, k, v = qkv_host(15, kv_heads=kv_heads, length=7, key_length=7 if "causal" in variant else 9)
    L, S = q.shape[-2], k.shape[-2]
    kwargs, ours = {}, {}
    if variant == "causal_top_left":
        kwargs["is_causal"], ours["causal"] = True, "top_left"
    if variant == "bool_mask":
        mask = random.uniform((L, S), seed=1) < 0.7
        mask[:, 0] = True  # torch gives NaN on fully masked rows; reflex gives 0 (tested elsewhere)
        kwargs["attn_mask"], ours["mask"] = torch.from_numpy(mask), mask
    if variant == "float_bias":
        bias = random.normal((4, L, S), seed=2)
        kwargs["attn_mask"], ours["bias"] = torch.from_numpy(bias), bias
    if variant == "scale":
        kwargs["scale"] = ours["scale"] = 0.37
    t = [torch.from_numpy(a) for a in (q, k, v)]
    expected = F.scaled_dot_product_attention(*t, enable_gqa=kv_heads != 4, **kwargs).numpy()
    for implementation in ("dense", "tiled"):
        assert max_abs(reflex.full_attention(q, k, v, implementation=implementation, **ours), expected) < 2e-15


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_bottom_right_and_softcap_against_torch_reference():
    """bottom_right and softcap have no SDPA flag: torch float64 with the explicit mask / capped bias."""
    import torch

    q, k, v = qkv_host(16, kv_heads=2, length=5, key_length=9)
    t = [torch.from_numpy(a) for a in (q, k, v)]
    kr, vr = (x.repeat_interleave(2, dim=-3) for x in t[1:])
    s = (t[0] @ kr.transpose(-1, -2)) / math.sqrt(5)
    s = 20.0 * torch.tanh(s / 20.0)
    s = s.masked_fill(~torch.ones(5, 9, dtype=torch.bool).tril(9 - 5), float("-inf"))
    expected = (torch.softmax(s, dim=-1) @ vr).numpy()
    got = reflex.full_attention(q, k, v, causal="bottom_right", softcap=20.0)
    assert max_abs(got, expected) < 2e-15


def test_torch_tensor_in_torch_tensor_out():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(a).to(torch.float32) for a in qkv_host(17))
    out, lse = reflex.full_attention(q, k, v, return_lse=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64 and lse.shape == (2, 4, 7)


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_callable_bias_is_cast_to_the_compute_dtype(backend, implementation):
    """A callable term returning float64 under compute_dtype float32 is cast, not an error."""
    q, k, v = (backend.asarray(a) for a in qkv_host(18, length=4, key_length=5))
    xp = backend.xp
    p = _kernels.prepare(q, k, v, compute_dtype="float32")

    def distance_bias(rows, cols):
        return -xp.astype(xp.abs(cols - rows), xp.float64)

    run = _kernels.dense if implementation == "dense" else _kernels.tiled
    out, _ = run(p, scale=0.5, bias=distance_bias)
    assert out.dtype == xp.float32
    host = [a.astype(numpy.float32).astype(numpy.float64) for a in qkv_host(18, length=4, key_length=5)]
    bias = -numpy.abs(numpy.arange(5)[None, :] - numpy.arange(4)[:, None]).astype(numpy.float64)
    assert max_abs(backend.to_numpy(out), naive(*host, bias=bias, scale=0.5)[0]) < 1e-6


def test_option_arrays_are_checked_for_library_device_and_dtype():
    strict = pytest.importorskip("array_api_strict")
    q, k, v = (strict.asarray(a) for a in qkv_host(19, length=3, key_length=3))
    table = strict.asarray(numpy.zeros((32, 4)), device=strict.Device("device1"))
    with pytest.raises(ValueError, match="table is on device"):
        reflex.t5_bias_attention(q, k, v, table=table)
    with pytest.raises(TypeError, match="table comes from a different array library than q"):
        reflex.t5_bias_attention(q, k, v, table=numpy.zeros((32, 4)))
    with pytest.raises(TypeError, match="rel_k must be a real floating array"):
        reflex.relative_shaw_attention(q, k, v, rel_k=strict.zeros((3, 5), dtype=strict.int64))
