"""Padding masks (``attention_mask``) against Hugging Face in float64: Nyströmformer, Longformer, BigBird, Reformer LSH.

Each HF module is built from a tiny random config (no download, weights from torch's seeded
generator), fed hidden states with padded tail positions, and reflex is given the module's own
projections and the boolean mask (True = real token). HF's softmaxes that run in float32 are held to
the input dtype by the ``float64_softmax`` fixture where noted. Measured agreement (max |Δ| over
each test's parameters): Nyströmformer 9.4e-16; Longformer 3.4e-16 with float64 softmax (4.3e-8 as
shipped, float32 softmax); BigBird 2.3e-16; Reformer LSH 1.4e-15 (rows that see only themselves in
every round carry HF's ~1e-11 LSE rounding and are compared with v instead, as in
test_interop_hf_reformer).
"""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _heads(x, heads):
    """(B, L, H·D) torch → (B, H, L, D) numpy."""
    b, length, width = x.shape
    return x.detach().reshape(b, length, heads, width // heads).permute(0, 2, 1, 3).numpy().copy()


def _tokens(out):
    """(B, H, L, E) → (B, L, H·E)."""
    b, h, length, e = out.shape
    return numpy.transpose(out, (0, 2, 1, 3)).reshape(b, length, h * e)


@pytest.fixture
def float64_softmax(monkeypatch):
    """Hold torch.nn.functional.softmax to its input dtype (HF asks for float32)."""
    original = torch.nn.functional.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        return original(x, dim=dim)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax)


def _padding(batch, length, real_lengths):
    mask = numpy.zeros((batch, length), dtype=bool)
    for b, n in enumerate(real_lengths):
        mask[b, :n] = True
    return mask


# --- Nyströmformer: the mask enters the third kernel only ------------------------------------------

@pytest.mark.parametrize("real_lengths", [(32, 20), (30, 32), (9, 17)])
def test_nystrom_padding_matches_hf(real_lengths):
    from transformers.models.nystromformer.modeling_nystromformer import NystromformerSelfAttention

    batch, heads, head_dim, length, landmarks = 2, 3, 8, 32, 8
    config = transformers.NystromformerConfig(hidden_size=heads * head_dim, num_attention_heads=heads,
                                              num_landmarks=landmarks, segment_means_seq_len=length,
                                              attention_probs_dropout_prob=0.0)
    torch.manual_seed(sum(real_lengths))
    module = NystromformerSelfAttention(config).double().eval()
    module.conv_kernel_size = None  # the depthwise-convolution skip is a separate term
    hidden = torch.from_numpy(random.normal((batch, length, heads * head_dim), seed=1))
    padding = _padding(batch, length, real_lengths)
    additive = torch.from_numpy(numpy.where(padding, 0.0, numpy.finfo(numpy.float64).min))[:, None, None, :]
    with torch.no_grad():
        expected = module(hidden, additive)[0].numpy()
        q, k, v = (_heads(layer(hidden), heads) for layer in (module.query, module.key, module.value))
    got = reflex.nystrom_attention(q, k, v, num_landmarks=landmarks, pinv_init="batch", attention_mask=padding)
    assert max_abs(_tokens(got), expected) < 1e-14
    unmasked = reflex.nystrom_attention(q, k, v, num_landmarks=landmarks, pinv_init="batch")
    assert max_abs(_tokens(unmasked), expected) > 1e-6 or all(n == length for n in real_lengths)


# --- Longformer: padded keys removed, per-item global tokens, padded queries 0 ----------------------

def _longformer(seed, window, heads=2, hidden=16):
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    torch.manual_seed(seed)
    config = LongformerConfig(hidden_size=hidden, num_attention_heads=heads, attention_window=[window],
                              attention_probs_dropout_prob=0.0)
    return LongformerSelfAttention(config, layer_id=0).double().eval()


def _run_longformer(layer, x, padding, global_flags):
    extended = numpy.where(padding, 0.0, -10000.0) + numpy.where(global_flags, 10000.0, 0.0)  # HF's extended mask
    mask = torch.from_numpy(extended)
    with torch.no_grad():
        out = layer(x, attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
                    is_global_attn=bool(global_flags.any()))[0]
        projected = {name: _heads(getattr(layer, name)(x), layer.num_heads)
                     for name in ("query", "key", "value", "query_global", "key_global", "value_global")}
    return out.numpy(), projected


def _reflex_longformer(projected, window, padding, global_flags, implementation="auto"):
    return _tokens(reflex.longformer_attention(
        projected["query"], projected["key"], projected["value"], window=(window // 2, window // 2),
        q_global=projected["query_global"], k_global=projected["key_global"], v_global=projected["value_global"],
        attention_mask=padding, global_mask=global_flags, implementation=implementation))


@pytest.mark.parametrize("window, real_lengths, globals_", [
    (4, (16, 11), [[0], [0, 3]]), (8, (9, 16), [[0, 8], []]), (4, (13, 7), [[], []]), (8, (16, 16), [[2], [5, 6]])])
@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_longformer_padding_matches_hf(float64_softmax, window, real_lengths, globals_, implementation):
    batch, length = 2, 16
    layer = _longformer(window + sum(real_lengths), window)
    x = torch.from_numpy(random.normal((batch, length, 16), seed=(window, 1)))
    padding = _padding(batch, length, real_lengths)
    global_flags = numpy.zeros((batch, length), dtype=bool)
    for b, positions in enumerate(globals_):
        global_flags[b, positions] = True
    expected, projected = _run_longformer(layer, x, padding, global_flags)
    got = _reflex_longformer(projected, window, padding, global_flags, implementation)
    assert max_abs(got, expected) <= 1e-13
    assert numpy.all(got[~padding] == 0)


def test_longformer_padding_as_shipped_float32_softmax():
    layer = _longformer(5, 4)
    x = torch.from_numpy(random.normal((2, 16, 16), seed=6))
    padding = _padding(2, 16, (12, 16))
    global_flags = numpy.zeros((2, 16), dtype=bool)
    global_flags[0, 1] = global_flags[1, [0, 9]] = True
    expected, projected = _run_longformer(layer, x, padding, global_flags)
    assert max_abs(_reflex_longformer(projected, 4, padding, global_flags), expected) <= 1e-5


# --- BigBird: −10000 on padded keys, padded queries output 0 ----------------------------------------

@pytest.mark.parametrize("blocks, r, block_size, real_lengths", [(8, 1, 2, (16, 11)), (10, 2, 2, (13, 20)),
                                                                 (7, 1, 3, (21, 5))])
@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_bigbird_padding_matches_hf(blocks, r, block_size, real_lengths, implementation):
    from transformers import BigBirdConfig
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention, BigBirdModel
    from reflex.mechanisms.bigbird import draw_plan

    heads, hidden, batch, length = 2, 16, 2, blocks * block_size
    torch.manual_seed(blocks)
    config = BigBirdConfig(hidden_size=hidden, num_attention_heads=heads, block_size=block_size, num_random_blocks=r,
                           attention_type="block_sparse", use_bias=True, attention_probs_dropout_prob=0.0)
    layer = BigBirdBlockSparseAttention(config, seed=0).double().eval()
    plan = draw_plan(None, None, heads, blocks, r, (3, blocks))
    layer._bigbird_block_rand_mask_with_head = lambda **_: [numpy.asarray(p) for p in plan]  # our plan, not HF's draw
    x = torch.from_numpy(random.normal((batch, length, hidden), seed=(blocks, 9)))
    padding = _padding(batch, length, real_lengths)
    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(
        torch.from_numpy(padding.astype(numpy.float64)), block_size)
    with torch.no_grad():
        expected = layer(x, band_mask=band, from_mask=from_mask, to_mask=to_mask, from_blocked_mask=blocked,
                         to_blocked_mask=blocked)[0].numpy()
        q, k, v = (_heads(getattr(layer, name)(x), heads) for name in ("query", "key", "value"))
    got, lse = reflex.bigbird_attention(q, k, v, block_size=block_size, plan=plan, attention_mask=padding,
                                        implementation=implementation, return_lse=True)
    assert max_abs(_tokens(got), expected) <= 1e-13
    assert numpy.all(_tokens(got)[~padding] == 0) and numpy.all(numpy.swapaxes(lse, 1, 2)[~padding] == -numpy.inf)


# --- Reformer LSH: padded positions in an extra bucket, never attended as keys -----------------------

def _reformer(*, length, n_buckets, n_hashes, chunk, causal, padding, heads=2, head_dim=8, hidden=24, seed=7):
    from transformers import ReformerConfig
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention

    batch = padding.shape[0]
    config = ReformerConfig(attn_layers=["lsh"], hidden_size=hidden, num_attention_heads=heads,
                            attention_head_size=head_dim, num_buckets=n_buckets, num_hashes=n_hashes,
                            lsh_attn_chunk_length=chunk, hash_seed=seed, is_decoder=causal,
                            lsh_attention_probs_dropout_prob=0.0)
    gen = torch.Generator().manual_seed(0)
    layer = LSHSelfAttention(config).double().eval()
    with torch.no_grad():
        layer.query_key.weight.copy_(torch.randn(layer.query_key.weight.shape, generator=gen, dtype=torch.float64) / hidden ** 0.5)
        layer.value.weight.copy_(torch.randn(layer.value.weight.shape, generator=gen, dtype=torch.float64) / hidden ** 0.5)
        x = torch.randn((batch, length, hidden), generator=gen, dtype=torch.float64)
        result = layer(x, attention_mask=torch.from_numpy(padding.astype(numpy.int64)))
        qk, v = (_heads(w(x), heads) for w in (layer.query_key, layer.value))
    factors = n_buckets if isinstance(n_buckets, list) else [n_buckets]
    torch.manual_seed(seed)  # the layer's own rotation draw, repeated
    rotations = torch.randn((heads, head_dim, n_hashes, sum(f // 2 for f in factors)), dtype=torch.float64).numpy()
    expected = _heads(result.hidden_states, heads)
    return qk, v, rotations, expected, result.buckets


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_buckets, n_hashes, chunk", [(4, 1, 4), (4, 3, 4), ([2, 4], 2, 8), (8, 2, 32)])
@pytest.mark.parametrize("real_lengths", [(32, 21), (13, 30)])
def test_lsh_padding_matches_hf(causal, n_buckets, n_hashes, chunk, real_lengths):
    length = 32
    padding = _padding(2, length, real_lengths)
    qk, v, rotations, expected, hf_buckets = _reformer(length=length, n_buckets=n_buckets, n_hashes=n_hashes,
                                                       chunk=chunk, causal=causal, padding=padding)
    params = dict(n_buckets=n_buckets, n_hashes=n_hashes, chunk_length=chunk, causal=causal, attention_mask=padding)
    got = reflex.lsh_attention(qk, v, rotations=rotations, **params)
    if hf_buckets is not None:  # hashed: padded tokens sit in the extra bucket n_buckets (HF offsets rounds by it + 1)
        total = int(numpy.prod(n_buckets)) + 1
        buckets = reflex.lsh_buckets(qk, n_buckets=n_buckets, n_hashes=n_hashes, rotations=rotations)
        buckets = numpy.where(padding[:, None, None, :], buckets, total - 1)
        numpy.testing.assert_array_equal(buckets + total * numpy.arange(n_hashes)[:, None], hf_buckets.numpy())
    # Rows that saw only themselves in every round carry HF's LSE rounding (≈ 1e-11, see test_interop_hf_reformer).
    rounds = reflex.lsh_pattern(qk, rotations=rotations, per_round=True, **params)
    alone = numpy.all(numpy.sum(rounds * (1 - numpy.eye(length, dtype=numpy.int64)), axis=-1) == 0, axis=-2)
    assert max_abs(numpy.where(alone[..., None], 0, got), numpy.where(alone[..., None], 0, expected)) <= 1e-13
    assert max_abs(got[alone], v[alone]) <= 1e-15
    unmasked = reflex.lsh_attention(qk, v, rotations=rotations, **{**params, "attention_mask": None})
    assert max_abs(unmasked, expected) > 1e-6
