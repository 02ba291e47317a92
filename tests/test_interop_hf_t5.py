"""t5_bias against Hugging Face T5 (transformers): buckets bit for bit, compute_bias, a whole layer.

Configurations include ones where a float64 logarithm (or NumPy's float32 log) picks a different
bucket than Hugging Face's float32 computation; ``test_configs_exercise_float32_rounding`` proves
that they do. Positions cover every integer in [−100000, 100000].
"""

from __future__ import annotations

import math
import warnings

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


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance", CONFIGS)
def test_buckets_bit_identical(bidirectional, num_buckets, max_distance):
    ref = hf_bucket(torch.from_numpy(POSITIONS), bidirectional=bidirectional, num_buckets=num_buckets,
                    max_distance=max_distance).numpy()
    got = reflex.t5_relative_position_bucket(POSITIONS, bidirectional=bidirectional, num_buckets=num_buckets,
                                             max_distance=max_distance)
    mismatch = numpy.nonzero(got != ref)[0]
    assert mismatch.size == 0, f"positions {POSITIONS[mismatch][:10]}: ours {got[mismatch][:10]}, HF {ref[mismatch][:10]}"


def _formula(bidirectional, num_buckets, max_distance, log):
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
        scaled = log(numpy.maximum(n, exact), exact) / math.log(max_distance / exact) * (num_buckets - exact)
    large = numpy.minimum(exact + scaled.astype(numpy.int64), num_buckets - 1)
    return offset + numpy.where(n < exact, n, large)


def test_configs_exercise_float32_rounding():
    float64 = lambda n, e: numpy.log(n / e)  # noqa: E731
    numpy32 = lambda n, e: numpy.log(n.astype(numpy.float32) / numpy.float32(e))  # noqa: E731
    differ64 = differ32 = 0
    for config in CONFIGS:
        ref = hf_bucket(torch.from_numpy(POSITIONS), bidirectional=config[0], num_buckets=config[1],
                        max_distance=config[2]).numpy()
        differ64 += bool((_formula(*config, float64) != ref).any())
        differ32 += bool((_formula(*config, numpy32) != ref).any())
    assert differ64 >= 6 and differ32 >= 5


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
