"""nystrom_attention with pinv="iterative" against Hugging Face NystromformerSelfAttention (float64).

The HF module projects hidden states to q, k, v with its own random Linear layers; we take those
q, k, v, disable its depthwise-convolution skip (``module.conv_kernel_size = None``) and compare the attention.
"""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.nystromformer.modeling_nystromformer import NystromformerSelfAttention  # noqa: E402


def _hf(batch, heads, head_dim, length, landmarks, seed):
    config = transformers.NystromformerConfig(
        hidden_size=heads * head_dim, num_attention_heads=heads, num_landmarks=landmarks,
        segment_means_seq_len=length, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)  # HF initialises its Linear weights from torch's generator
    module = NystromformerSelfAttention(config).double().eval()
    module.conv_kernel_size = None  # the config validator rejects None; forward skips the conv when None
    hidden = torch.from_numpy(random.normal((batch, length, heads * head_dim), seed=seed))
    with torch.no_grad():
        out = module(hidden)[0].numpy()

        def split(layer):
            return layer(hidden).view(batch, length, heads, head_dim).transpose(1, 2).numpy()

        q, k, v = split(module.query), split(module.key), split(module.value)
    return q, k, v, out.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("batch,heads,length,landmarks", [(1, 1, 16, 4), (2, 3, 32, 8), (2, 2, 64, 16)])
def test_iterative_matches_hf_with_batch_init(batch, heads, length, landmarks):
    q, k, v, expected = _hf(batch, heads, 8, length, landmarks, seed=length + landmarks)
    got = reflex.nystrom_attention(q, k, v, num_landmarks=landmarks, pinv="iterative", pinv_init="batch")
    assert max_abs(got, expected) < 1e-12 * max(1.0, numpy.max(numpy.abs(expected)))


def test_single_matrix_needs_no_batch_init():
    """With one (batch, head) matrix the per-matrix Z0 is HF's global one: the default matches too."""
    q, k, v, expected = _hf(1, 1, 8, 24, 6, seed=3)
    assert max_abs(reflex.nystrom_attention(q, k, v, num_landmarks=6), expected) < 1e-12


def test_per_matrix_init_differs_from_hf_on_a_batch():
    """Documented difference: HF's Z0 uses one max over the batch; "matrix" does not."""
    q, k, v, expected = _hf(2, 2, 8, 32, 8, seed=5)
    got = reflex.nystrom_attention(q, k, v, num_landmarks=8, pinv_init="matrix")
    assert max_abs(got, expected) > 1e-10
