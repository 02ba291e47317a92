"""t5_bias against Hugging Face T5 (transformers): buckets bit for bit, compute_bias, a whole layer.

Configurations include ones where a float64 logarithm (or NumPy's float32 log) picks a different
bucket than Hugging Face's float32 computation; ``test_configs_exercise_float32_rounding`` proves
that they do. Positions cover every integer in [−100000, 100000].
"""

from __future__ import annotations

import functools
import math
import warnings

import mpmath
import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs

torch = pytest.importorskip("torch")
modeling_t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
hf_bucket = modeling_t5.T5Attention._relative_position_bucket

POSITIONS = numpy.arange(-100000, 100001, dtype=numpy.int64)
CONFIGS = [
    # standard: t5-small/base/large encoder and decoder, LongT5, bigger tables
    (True, 32, 128), (False, 32, 128), (True, 64, 256), (False, 64, 128), (True, 128, 1024), (True, 32, 4096),
    # float64 log picks another bucket (log ratio lands on an integer)
    (False, 9, 128), (True, 18, 128), (False, 36, 32), (False, 48, 81), (False, 108, 128), (True, 258, 2048),
    # NumPy's float32 log picks another bucket
    (False, 17, 27), (True, 34, 27), (False, 12, 3801), (False, 5, 686), (False, 11, 1715),
    # small and odd
    (True, 4, 2), (False, 2, 2), (True, 7, 3), (False, 3, 100000),
]


def _log_inputs(bidirectional, num_buckets):
    """The float32 ratios n / e whose log the bucket formula takes, for every n ≥ e in POSITIONS."""
    per_direction = num_buckets // 2 if bidirectional else num_buckets
    exact = per_direction // 2
    n = numpy.unique(numpy.abs(POSITIONS))
    n = n[n >= exact]
    return numpy.unique(n.astype(numpy.float32) / numpy.float32(exact))


def _exact_log32(x):
    """The correctly rounded float32 log of float32 ``x``, proved with mpmath where it is in doubt.

    ``float32(log_float64(x))`` is the correctly rounded float32 log unless the exact log lies
    within the float64 log's error of a float32 rounding midpoint; those few values (a window of
    10⁶ float64 ulps, far wider than any libm's error) are decided in mpmath at 40 digits.
    """
    log64 = numpy.log(x.astype(numpy.float64))
    result = log64.astype(numpy.float32)
    up = numpy.nextafter(result, numpy.float32(numpy.inf))
    down = numpy.nextafter(result, numpy.float32(-numpy.inf))
    mid_up = (result.astype(numpy.float64) + up.astype(numpy.float64)) / 2  # exact in float64
    mid_down = (result.astype(numpy.float64) + down.astype(numpy.float64)) / 2
    window = 1e6 * numpy.spacing(numpy.abs(log64))
    doubtful = numpy.nonzero((numpy.abs(log64 - mid_up) < window) | (numpy.abs(log64 - mid_down) < window))[0]
    with mpmath.workdps(40):
        for i in doubtful:
            exact = mpmath.log(mpmath.mpf(float(x[i])))
            candidates = (result[i], up[i], down[i])
            result[i] = min(candidates, key=lambda c: abs(mpmath.mpf(float(c)) - exact))
    return result


@functools.lru_cache(maxsize=None)
def _exact_table(bidirectional, num_buckets):
    ratios = _log_inputs(bidirectional, num_buckets)
    return ratios, _exact_log32(ratios)


def _exact_log(bidirectional, num_buckets, nudge=0):
    """``log32(n, e)``: the correctly rounded float32 log of float32(n)/float32(e), moved ``nudge`` ulps."""
    ratios, logs = _exact_table(bidirectional, num_buckets)
    for _ in range(abs(nudge)):
        logs = numpy.nextafter(logs, numpy.float32(numpy.inf if nudge > 0 else -numpy.inf))

    def log32(n, e):
        r = n.astype(numpy.float32) / numpy.float32(e)
        return logs[numpy.clip(numpy.searchsorted(ratios, r), 0, ratios.size - 1)]  # n = e gives the first ratio, 1

    return log32


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance", CONFIGS)
def test_buckets_use_the_correctly_rounded_float32_log(bidirectional, num_buckets, max_distance):
    """reflex's semantics against an exact source: the bucket formula with the correctly rounded log."""
    expected = _formula32(bidirectional, num_buckets, max_distance, _exact_log(bidirectional, num_buckets))
    got = reflex.t5_relative_position_bucket(POSITIONS, bidirectional=bidirectional, num_buckets=num_buckets,
                                             max_distance=max_distance)
    mismatch = numpy.nonzero(got != expected)[0]
    assert mismatch.size == 0, f"positions {POSITIONS[mismatch][:10]}: ours {got[mismatch][:10]}, exact {expected[mismatch][:10]}"


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance", CONFIGS)
def test_buckets_bit_identical(bidirectional, num_buckets, max_distance):
    """Equal to Hugging Face wherever this machine's torch float32 log is correctly rounded.

    torch's CPU float32 ``log`` is not correctly rounded, and which inputs it misrounds depends on
    the instruction set it dispatches to (on one AMD EPYC, log(1.5) is 1 ulp high). Positions whose
    log input torch misrounds here are counted and reported (a warning), not failed.
    """
    ratios, exact_logs = _exact_table(bidirectional, num_buckets)
    misrounded = ratios[torch.log(torch.from_numpy(ratios)).numpy() != exact_logs]
    per_direction = num_buckets // 2 if bidirectional else num_buckets
    exact = per_direction // 2
    n = numpy.abs(POSITIONS) if bidirectional else -numpy.minimum(POSITIONS, 0)
    ratio_of_position = numpy.maximum(n, exact).astype(numpy.float32) / numpy.float32(exact)
    trusted = ~((n >= exact) & numpy.isin(ratio_of_position, misrounded))
    ref = hf_bucket(torch.from_numpy(POSITIONS), bidirectional=bidirectional, num_buckets=num_buckets,
                    max_distance=max_distance).numpy()
    got = reflex.t5_relative_position_bucket(POSITIONS, bidirectional=bidirectional, num_buckets=num_buckets,
                                             max_distance=max_distance)
    mismatch = numpy.nonzero((got != ref) & trusted)[0]
    assert mismatch.size == 0, f"positions {POSITIONS[mismatch][:10]}: ours {got[mismatch][:10]}, HF {ref[mismatch][:10]}"
    differ = int(numpy.count_nonzero((got != ref) & ~trusted))
    if differ:
        warnings.warn(f"T5 buckets ({bidirectional}, {num_buckets}, {max_distance}): {differ} of {POSITIONS.size} positions "
                      f"not compared with Hugging Face and differing from it: this machine's torch float32 log "
                      f"misrounds {misrounded.size} of the configuration's {ratios.size} log inputs", stacklevel=1)


def _formula(bidirectional, num_buckets, max_distance, log, dtype=numpy.float64):
    """Hugging Face's bucket formula on the host with the log ``log(n, e)``, its arithmetic in
    ``dtype`` (float32 as Hugging Face, each step rounded; float64 to show what a float64 formula picks)."""
    rel = POSITIONS
    offset = numpy.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        offset = (rel > 0) * num_buckets
        n = numpy.abs(rel)
    else:
        n = -numpy.minimum(rel, 0)
    exact = num_buckets // 2
    with numpy.errstate(divide="ignore"):
        log_ratio = log(numpy.maximum(n, exact), exact)
        scaled = (log_ratio / dtype(math.log(max_distance / exact))).astype(dtype) * dtype(num_buckets - exact)
    large = numpy.minimum(exact + scaled.astype(dtype).astype(numpy.int64), num_buckets - 1)
    return offset + numpy.where(n < exact, n, large)


def _formula32(bidirectional, num_buckets, max_distance, log32):
    return _formula(bidirectional, num_buckets, max_distance, log32, dtype=numpy.float32)


def test_configs_exercise_float32_rounding():
    """A float64 log, or a float32 log one ulp off, picks other buckets than the exact float32
    formula in several configurations (so the tests above can tell the conventions apart)."""
    float64 = lambda n, e: numpy.log(n / e)  # noqa: E731
    differ64 = differ_ulp = 0
    for config in CONFIGS:
        exact = _formula32(*config, _exact_log(*config[:2]))
        differ64 += bool((_formula(*config, float64) != exact).any())
        differ_ulp += any(bool((_formula32(*config, _exact_log(*config[:2], nudge)) != exact).any()) for nudge in (-1, 1))
    assert differ64 >= 6 and differ_ulp >= 5


@pytest.mark.parametrize("past", [0, 5])
@pytest.mark.parametrize("is_decoder", [False, True])
def test_compute_bias_and_layer_output(backend, past, is_decoder):
    config = modeling_t5.T5Config(d_model=16, d_kv=4, num_heads=4, relative_attention_num_buckets=32,
                                  relative_attention_max_distance=20, is_decoder=is_decoder, dropout_rate=0.0)
    config._attn_implementation = "eager"
    layer = modeling_t5.T5Attention(config, has_relative_attention_bias=True).double().eval()
    table = layer.relative_attention_bias.weight.detach().numpy()
    with torch.no_grad():
        ref_bias = layer.compute_bias(7, 7 + past, past_seen_tokens=past)[0].numpy()
    bias = reflex.t5_bias(backend.asarray(table), 7, 7 + past, bidirectional=not is_decoder, max_distance=20,
                          query_offset=past)
    assert numpy.array_equal(backend.to_numpy(bias), ref_bias)
    if past:
        return
    # the whole layer (no past): x -> q, k, v -> T5 attention (scale 1) -> o
    x = random.normal((2, 7, 16), seed=1)
    mask = numpy.tril(numpy.ones((7, 7), dtype=bool)) if is_decoder else numpy.ones((7, 7), dtype=bool)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        additive = torch.from_numpy(numpy.where(mask, 0.0, -numpy.inf)[None, None])
        ref = layer(torch.from_numpy(x), mask=additive)[0].numpy()
    heads = lambda w: numpy.swapaxes((x @ w.detach().numpy().T).reshape(2, 7, 4, 4), 1, 2)  # noqa: E731
    q, k, v = heads(layer.q.weight), heads(layer.k.weight), heads(layer.v.weight)
    out = reflex.t5_bias_attention(*(backend.asarray(a) for a in (q, k, v)), table=backend.asarray(table),
                                   bidirectional=not is_decoder, max_distance=20, causal=is_decoder, scale=1.0)
    out = numpy.swapaxes(backend.to_numpy(out), 1, 2).reshape(2, 7, 16) @ layer.o.weight.detach().numpy().T
    assert max_abs(out, ref) < 1e-14
