"""bigbird and longformer against Hugging Face transformers (tiny random configs, no downloaded weights).

Conventions (docs/conventions.md): Longformer's ``attention_window`` w is the full width, so reflex's
``window=(w // 2, w // 2)``; q is divided by √D (reflex's default scale); HF computes its softmaxes in
float32 even for float64 models, so the as-shipped agreement is float32 round-off, and with
``torch.nn.functional.softmax`` held to the input dtype it is float64 round-off. BigBird takes the
random block plan ``(H, nb − 2, r)`` that HF would draw; we hand HF our plan by replacing its draw.
"""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _heads(x, heads):
    """(B, L, H·D) torch → (B, H, L, D) numpy."""
    b, length, width = x.shape
    return x.detach().reshape(b, length, heads, width // heads).permute(0, 2, 1, 3).numpy().copy()


@pytest.fixture
def float64_softmax(monkeypatch):
    """Hold torch.nn.functional.softmax to its input dtype (HF asks for float32)."""
    original = torch.nn.functional.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        return original(x, dim=dim)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax)


def _longformer(seed, window, heads=2, hidden=16, length=16, batch=2):
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    torch.manual_seed(seed)
    config = LongformerConfig(hidden_size=hidden, num_attention_heads=heads, attention_window=[window],
                              attention_probs_dropout_prob=0.0)
    layer = LongformerSelfAttention(config, layer_id=0).double().eval()
    x = torch.tensor(random.normal((batch, length, hidden), seed=(seed, 1)))
    return layer, x


def _run_longformer(layer, x, global_positions):
    batch, length, _ = x.shape
    mask = torch.zeros(batch, length, dtype=torch.float64)
    mask[:, list(global_positions)] = 10000.0  # HF's extended mask: 0 local, +10000 global, -10000 padding
    with torch.no_grad():
        out = layer(x, attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
                    is_global_attn=bool(global_positions))[0]
        projected = {name: _heads(getattr(layer, name)(x), layer.num_heads)
                     for name in ("query", "key", "value", "query_global", "key_global", "value_global")}
    return out.numpy(), projected


def _reflex_longformer(projected, window, global_positions, implementation="auto"):
    out = reflex.longformer_attention(
        projected["query"], projected["key"], projected["value"], window=(window // 2, window // 2),
        global_indices=list(global_positions), q_global=projected["query_global"], k_global=projected["key_global"],
        v_global=projected["value_global"], implementation=implementation)
    b, h, length, d = out.shape
    return numpy.transpose(out, (0, 2, 1, 3)).reshape(b, length, h * d)


@pytest.mark.parametrize("window,global_positions", [(4, [0]), (4, [1, 9]), (8, [0, 15]), (8, [])])
@pytest.mark.parametrize("implementation", ["numba", "dense", "tiled"])
def test_longformer_matches_hf_to_float64_roundoff(float64_softmax, window, global_positions, implementation):
    layer, x = _longformer(0, window)
    hf, projected = _run_longformer(layer, x, global_positions)
    assert max_abs(_reflex_longformer(projected, window, global_positions, implementation), hf) <= 1e-13


def test_longformer_matches_hf_as_shipped_float32_softmax():
    layer, x = _longformer(1, 4)
    hf, projected = _run_longformer(layer, x, [0, 5])
    assert max_abs(_reflex_longformer(projected, 4, [0, 5]), hf) <= 1e-5


def _bigbird(seed, heads=2, hidden=16, block_size=2, r=1):
    from transformers import BigBirdConfig
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention

    torch.manual_seed(seed)
    config = BigBirdConfig(hidden_size=hidden, num_attention_heads=heads, block_size=block_size, num_random_blocks=r,
                           attention_type="block_sparse", use_bias=True, attention_probs_dropout_prob=0.0)
    return BigBirdBlockSparseAttention(config, seed=0).double().eval()


def _run_bigbird(layer, x, plan):
    from transformers.models.big_bird.modeling_big_bird import BigBirdModel

    # Hand HF our plan instead of its own draw (eval mode would give all zeros).
    layer._bigbird_block_rand_mask_with_head = lambda **_: [numpy.asarray(p) for p in plan]
    batch, length, _ = x.shape
    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(
        torch.ones(batch, length, dtype=torch.float64), layer.block_size)
    with torch.no_grad():
        out = layer(x, band_mask=band, from_mask=from_mask, to_mask=to_mask, from_blocked_mask=blocked,
                    to_blocked_mask=blocked)[0]
        projected = [_heads(getattr(layer, name)(x), layer.num_attention_heads) for name in ("query", "key", "value")]
    return out.numpy(), projected


@pytest.mark.parametrize("blocks,r,block_size", [(8, 1, 2), (10, 2, 2), (7, 1, 3), (9, 3, 1)])
@pytest.mark.parametrize("plan_kind", ["seeded", "with_duplicates", "eval_zeros"])
def test_bigbird_matches_hf_given_the_plan(blocks, r, block_size, plan_kind):
    heads = 2
    layer = _bigbird(blocks, heads=heads, block_size=block_size, r=r)
    x = torch.tensor(random.normal((2, blocks * block_size, 16), seed=(blocks, 9)))
    if plan_kind == "seeded":
        from reflex.mechanisms.bigbird import draw_plan

        plan = draw_plan(None, None, heads, blocks, r, (3, blocks))
    elif plan_kind == "with_duplicates":
        plan = random.integers((heads, blocks - 2, r), seed=(4, blocks), low=0, high=blocks)
    else:
        plan = numpy.zeros((heads, blocks - 2, r), dtype=numpy.int64)
    hf, (q, k, v) = _run_bigbird(layer, x, plan)
    for implementation in ("dense", "tiled"):
        out = reflex.bigbird_attention(q, k, v, block_size=block_size, plan=plan, implementation=implementation)
        ours = numpy.transpose(out, (0, 2, 1, 3)).reshape(hf.shape)
        assert max_abs(ours, hf) <= 1e-13
