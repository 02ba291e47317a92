"""lsh_attention against Hugging Face ``LSHSelfAttention`` (tiny random config, eval mode, same rotations).

HF draws its rotations with ``torch.manual_seed(hash_seed); torch.randn((H, D, n_hashes, R/2))`` inside
``_hash_vectors``; the test draws the same tensor the same way and passes it to reflex explicitly.
The layer runs in float64, so agreement is to float64 round-off (docs/conventions.md, Reformer).
"""

from __future__ import annotations

import numpy
import pytest

import reflex
from tests.helpers import max_abs

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from transformers import ReformerConfig  # noqa: E402
from transformers.models.reformer.modeling_reformer import LSHSelfAttention  # noqa: E402

H, D, N, B = 2, 8, 24, 2
HASH_SEED = 7


def run_both(*, length, n_buckets, n_hashes, chunk, causal, before=1, after=0, dtype=torch.float64):
    config = ReformerConfig(attn_layers=["lsh"], hidden_size=N, num_attention_heads=H, attention_head_size=D,
                            num_buckets=n_buckets, num_hashes=n_hashes, lsh_attn_chunk_length=chunk,
                            lsh_num_chunks_before=before, lsh_num_chunks_after=after, hash_seed=HASH_SEED,
                            is_decoder=causal, lsh_attention_probs_dropout_prob=0.0)
    gen = torch.Generator().manual_seed(0)
    layer = LSHSelfAttention(config).to(dtype).eval()
    with torch.no_grad():
        layer.query_key.weight.copy_(torch.randn(layer.query_key.weight.shape, generator=gen, dtype=dtype) / N ** 0.5)
        layer.value.weight.copy_(torch.randn(layer.value.weight.shape, generator=gen, dtype=dtype) / N ** 0.5)
        x = torch.randn((B, length, N), generator=gen, dtype=dtype)
        result = layer(x)
        qk = (x @ layer.query_key.weight.T).reshape(B, length, H, D).transpose(1, 2).to(torch.float64).numpy()
        v = (x @ layer.value.weight.T).reshape(B, length, H, D).transpose(1, 2).to(torch.float64).numpy()
    factors = n_buckets if isinstance(n_buckets, list) else [n_buckets]
    torch.manual_seed(HASH_SEED)  # the layer's own draw, repeated
    rotations = torch.randn((H, D, n_hashes, sum(f // 2 for f in factors)), dtype=dtype).to(torch.float64).numpy()
    hf = result.hidden_states.reshape(B, length, H, D).transpose(1, 2).to(torch.float64).numpy()
    params = dict(n_buckets=n_buckets, n_hashes=n_hashes, chunk_length=chunk, causal=causal,
                  num_chunks_before=before, num_chunks_after=after)
    return qk, v, rotations, hf, result.buckets, params


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_buckets,n_hashes,chunk,before,after", [
    (4, 1, 4, 1, 0), (4, 3, 4, 1, 0), ([2, 4], 2, 8, 1, 0), (8, 2, 4, 1, 1), (4, 2, 4, 2, 0),
])
@pytest.mark.parametrize("implementation", ["numba", "array_api"])
def test_matches_lsh_self_attention(causal, n_buckets, n_hashes, chunk, before, after, implementation):
    qk, v, rotations, hf, hf_buckets, params = run_both(length=32, n_buckets=n_buckets, n_hashes=n_hashes,
                                                        chunk=chunk, causal=causal, before=before, after=after)
    ours = reflex.lsh_attention(qk, v, rotations=rotations, implementation=implementation, **params)
    # Buckets: HF adds the round offset r·n_buckets.
    total = int(numpy.prod(n_buckets))
    buckets = reflex.lsh_buckets(qk, n_buckets=n_buckets, n_hashes=n_hashes, rotations=rotations)
    numpy.testing.assert_array_equal(buckets + total * numpy.arange(n_hashes)[:, None], hf_buckets.numpy())
    # Rows that saw only themselves in every round: HF's weights e^{lse_r − LSE} with lse ≈ −1e5
    # carry the rounding of LSE (ulp(1e5) ≈ 1.5e-11) into o = v_i·Σ weights; reflex gives v_i.
    rounds = reflex.lsh_pattern(qk, rotations=rotations, per_round=True, **params)
    alone = numpy.all(numpy.sum(rounds * (1 - numpy.eye(32, dtype=numpy.int64)), axis=-1) == 0, axis=-2)
    assert max_abs(numpy.where(alone[..., None], 0, ours), numpy.where(alone[..., None], 0, hf)) <= 1e-13
    assert max_abs(ours[alone], v[alone]) <= 1e-15
    assert max_abs(hf[alone], v[alone]) <= n_hashes * 1.5e-11 * numpy.abs(v).max()


@pytest.mark.parametrize("causal", [False, True])
def test_short_sequences_skip_hashing_as_hf_does(causal):
    qk, v, rotations, hf, hf_buckets, params = run_both(length=8, n_buckets=4, n_hashes=2, chunk=8, causal=causal)
    assert hf_buckets is None
    ours = reflex.lsh_attention(qk, v, seed=0, **params)
    assert max_abs(ours, hf) <= 1e-13


def test_float32_layer_agrees_to_float32_round_off():
    qk, v, rotations, hf, hf_buckets, params = run_both(length=32, n_buckets=4, n_hashes=2, chunk=4, causal=False,
                                                        dtype=torch.float32)
    buckets = reflex.lsh_buckets(qk, n_buckets=4, n_hashes=2, rotations=rotations)
    if not numpy.array_equal(buckets + 4 * numpy.arange(2)[:, None], hf_buckets.numpy()):
        pytest.skip("a float32 projection flipped a bucket (near-tie); outputs are then not comparable")
    ours = reflex.lsh_attention(qk, v, rotations=rotations, **params)
    assert max_abs(ours, hf) <= 1e-5  # the float32 layer's own round-off
