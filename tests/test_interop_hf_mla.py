"""mla_attention against Hugging Face ``DeepseekV3Attention`` in float64 (tiny random config, no download).

The HF module projects hidden states itself; we take its q (after ``q_proj`` or the q LoRA path), its
normalised latent ``kv_a_layernorm(kv_nope)`` and its rotary key ``k_rot`` as reflex's inputs, split
``kv_b_proj.weight`` into w_uk and w_uv, and apply ``o_proj`` to reflex's output. HF's RoPE tables
(``DeepseekV3RotaryEmbedding``) are float32 even in a float64 model, so the exact comparisons feed the
module float64 cos/sin tables (the module takes them as ``position_embeddings``); the module's own
tables are checked separately at their float32 round-off. Measured: ≤ 2.3e-16 (float64 tables, both
forms, both RoPE layouts, with and without the q LoRA); ≈ 2e-9 with HF's float32 tables.
"""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (  # noqa: E402
    DeepseekV3Attention, DeepseekV3RotaryEmbedding, apply_rotary_pos_emb, apply_rotary_pos_emb_interleave)

BATCH, LENGTH, HEADS, NOPE, ROT, LATENT, VALUE, HIDDEN = 2, 7, 4, 8, 4, 12, 6, 32


def _module(*, interleave=True, q_lora=None, rope_parameters=None, attn="sdpa", seed=0):
    config = transformers.DeepseekV3Config(
        hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=HEADS, q_lora_rank=q_lora,
        kv_lora_rank=LATENT, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROT, v_head_dim=VALUE,
        rope_interleave=interleave, attention_bias=False, attention_dropout=0.0, max_position_embeddings=64,
        **({} if rope_parameters is None else {"rope_parameters": rope_parameters}),
    )
    config._attn_implementation = attn  # sdpa computes in the input dtype; eager's softmax is float32
    torch.manual_seed(seed)  # HF initialises its Linear weights from torch's generator
    return DeepseekV3Attention(config, layer_idx=0).double().eval()


def _float64_tables(positions):
    inv_freq = torch.tensor([1.0 / 10000.0 ** (2 * t / ROT) for t in range(ROT // 2)], dtype=torch.float64)
    freqs = positions[..., None].double() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _reflex_inputs(module, hidden):
    """q, c_kv, k_pe (before RoPE), w_uk, w_uv as the module computes them."""
    with torch.no_grad():
        if module.q_lora_rank is None:
            q = module.q_proj(hidden)
        else:
            q = module.q_b_proj(module.q_a_layernorm(module.q_a_proj(hidden)))
        q = q.view(BATCH, LENGTH, HEADS, NOPE + ROT).transpose(1, 2)
        kv_nope, k_rot = torch.split(module.kv_a_proj_with_mqa(hidden), [LATENT, ROT], dim=-1)
        c_kv = module.kv_a_layernorm(kv_nope)[:, None]
        weight = module.kv_b_proj.weight.view(HEADS, NOPE + VALUE, LATENT)
        return (q.numpy(), c_kv.numpy(), k_rot[:, None].numpy(), weight[:, :NOPE].numpy().copy(),
                weight[:, NOPE:].numpy().copy())


def _project(module, out):
    with torch.no_grad():
        return module.o_proj(torch.from_numpy(out).transpose(1, 2).reshape(BATCH, LENGTH, HEADS * VALUE)).numpy()


@pytest.mark.parametrize("form", ["naive", "absorbed"])
@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("q_lora", [None, 10])
def test_matches_hf_deepseek_v3_attention(form, interleave, q_lora):
    module = _module(interleave=interleave, q_lora=q_lora, seed=3)
    hidden = torch.from_numpy(random.normal((BATCH, LENGTH, HIDDEN), seed=1))
    positions = torch.arange(LENGTH)[None].expand(BATCH, LENGTH)
    with torch.no_grad():
        expected = module(hidden, _float64_tables(positions), None)[0].numpy()  # causal (sdpa is_causal)
    q, c_kv, k_pe, w_uk, w_uv = _reflex_inputs(module, hidden)
    assert module.scaling == (NOPE + ROT) ** -0.5
    out = reflex.mla_attention(q, c_kv, k_pe, w_uk=w_uk, w_uv=w_uv, scale=module.scaling, form=form,
                               rope="interleaved" if interleave else "half", causal=True)
    error = float(numpy.max(numpy.abs(_project(module, out) - expected)))
    assert error < 1e-15 * max(1.0, float(numpy.max(numpy.abs(expected)))) * 4


def test_hf_float32_rope_tables_agree_to_their_round_off():
    module = _module(seed=4)
    hidden = torch.from_numpy(random.normal((BATCH, LENGTH, HIDDEN), seed=2))
    positions = torch.arange(LENGTH)[None].expand(BATCH, LENGTH)
    with torch.no_grad():
        expected = module(hidden, DeepseekV3RotaryEmbedding(module.config)(hidden, positions), None)[0].numpy()
    q, c_kv, k_pe, w_uk, w_uv = _reflex_inputs(module, hidden)
    out = _project(module, reflex.mla_attention(q, c_kv, k_pe, w_uk=w_uk, w_uv=w_uv, scale=module.scaling, causal=True))
    error = float(numpy.max(numpy.abs(out - expected)))
    assert 1e-13 < error < 1e-6  # float32 cos/sin: differs, but only at their round-off


@pytest.mark.parametrize("interleave", [True, False])
def test_yarn_scale_with_caller_rotated_inputs(interleave):
    """YaRN: HF scales by (d_nope + d_rope)^−½·mscale²; its frequencies are the caller's (rope=None)."""
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
            "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0}
    module = _module(interleave=interleave, rope_parameters=yarn, seed=5)
    mscale = 0.1 * numpy.log(4.0) + 1.0
    assert module.scaling == pytest.approx((NOPE + ROT) ** -0.5 * mscale ** 2, rel=1e-15)
    hidden = torch.from_numpy(random.normal((BATCH, LENGTH, HIDDEN), seed=6))
    positions = torch.arange(LENGTH)[None].expand(BATCH, LENGTH)
    cos, sin = (t.double() for t in DeepseekV3RotaryEmbedding(module.config)(hidden.float(), positions))
    with torch.no_grad():
        expected = module(hidden, (cos, sin), None)[0].numpy()
    q, c_kv, k_pe, w_uk, w_uv = _reflex_inputs(module, hidden)
    rotate = apply_rotary_pos_emb_interleave if interleave else apply_rotary_pos_emb
    q_rot, k_rot = rotate(torch.from_numpy(q[..., NOPE:]), torch.from_numpy(k_pe), cos, sin)
    q = numpy.concatenate([q[..., :NOPE], q_rot.numpy()], axis=-1)
    for form in ("naive", "absorbed"):
        out = reflex.mla_attention(q, c_kv, k_rot.numpy(), w_uk=w_uk, w_uv=w_uv, scale=module.scaling, form=form,
                                   rope=None, causal=True)
        assert float(numpy.max(numpy.abs(_project(module, out) - expected))) < 1e-14


def test_eager_float32_softmax_agrees_to_float32_round_off():
    module = _module(attn="eager", seed=7)
    hidden = torch.from_numpy(random.normal((BATCH, LENGTH, HIDDEN), seed=8))
    positions = torch.arange(LENGTH)[None].expand(BATCH, LENGTH)
    causal = torch.full((LENGTH, LENGTH), torch.finfo(torch.float64).min, dtype=torch.float64).triu(1)
    with torch.no_grad():
        expected = module(hidden, _float64_tables(positions), causal[None, None])[0].numpy()
    q, c_kv, k_pe, w_uk, w_uv = _reflex_inputs(module, hidden)
    out = _project(module, reflex.mla_attention(q, c_kv, k_pe, w_uk=w_uk, w_uv=w_uv, scale=module.scaling, causal=True))
    assert float(numpy.max(numpy.abs(out - expected))) < 1e-6
