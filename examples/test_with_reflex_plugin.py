"""Test your own attention kernel against reflex with its pytest plugin.

Installing reflex (``pip install reflex-attention`` or ``pip install -e .``) registers the plugin,
so this file needs no conftest: run ``pytest examples/test_with_reflex_plugin.py``. The kernel
under test here is a float32 NumPy softmax attention (``my_attention``); put yours in its place.

What the plugin gives (``reflex/pytest_plugin.py``):

- ``reflex_cases(key, sizes=...)``: the registry's named cases of a mechanism, for
  ``pytest.mark.parametrize`` (host float64 NumPy inputs: GQA, L ≠ S, masks, biases, ...);
- the ``oracle`` fixture: ``oracle(key, inputs, **params)`` is reflex's float64 output,
  ``oracle.assert_close(...)`` the per-dtype tolerance, ``oracle.assert_flash_rule(...)`` the
  FlashAttention rule (error ≤ 2 × a naive same-precision evaluation's error + a floor);
- the session fixture ``reflex_fixture_set``: a golden fixture set generated once per session in a
  temporary folder (ini options ``reflex_fixture_mechanisms``/``reflex_fixture_sizes``), or loaded
  from ``pytest --reflex-fixtures PATH``.

reflex's conventions (``docs/conventions.md``): layout (B, H, L, D) — not flash-attn's (B, L, H, D);
query head h reads kv head h // (H/G); masks are True = attend; "top_left" causal is j ≤ i,
"bottom_right" is j ≤ i + S − L; a fully masked row outputs 0.
"""

from __future__ import annotations

import numpy as np
import pytest

from reflex.pytest_plugin import reflex_cases

# The registered cases of `full` this kernel implements (reflex also has attention sinks and the
# layout="blhd" variant: `reflex info full` lists every case).
KERNEL_VARIANTS = ("mha", "gqa", "causal_top_left", "causal_bottom_right", "mask", "bias", "softcap")


def my_attention(q, k, v, *, mask=None, bias=None, causal=False, scale=None, softcap=None):
    """The kernel under test: softmax attention in float32, q (B, H, L, D), k (B, G, S, D), v (B, G, S, E)."""
    q, k, v = (np.asarray(a, dtype=np.float32) for a in (q, k, v))
    group = q.shape[-3] // k.shape[-3]
    k, v = np.repeat(k, group, axis=-3), np.repeat(v, group, axis=-3)  # head h reads kv head h // group
    scale = np.float32(1.0 / np.sqrt(q.shape[-1]) if scale is None else scale)
    scores = (q @ np.swapaxes(k, -1, -2)) * scale
    if softcap is not None:
        scores = np.float32(softcap) * np.tanh(scores / np.float32(softcap))
    if bias is not None:
        scores = scores + np.asarray(bias, dtype=np.float32)
    length, key_length = scores.shape[-2:]
    allowed = np.ones((length, key_length), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if causal:
        offset = key_length - length if causal == "bottom_right" else 0
        allowed = allowed & (np.arange(key_length)[None, :] <= np.arange(length)[:, None] + offset)
    scores = np.where(allowed, scores, -np.inf)
    row_max = np.max(scores, axis=-1, keepdims=True)
    weights = np.exp(scores - np.where(np.isfinite(row_max), row_max, 0))
    total = np.sum(weights, axis=-1, keepdims=True)
    return (weights / np.where(total > 0, total, 1)) @ v  # a fully masked row outputs 0


@pytest.mark.parametrize("case", reflex_cases("full", sizes=("tiny", "small"), variants=KERNEL_VARIANTS))
def test_my_attention_on_every_registered_case(case, oracle):
    """Every named case of `full` (MHA, GQA, both causal alignments, mask, bias, softcap), float32 tolerance."""
    out = my_attention(*case.args(), **case.kwargs())
    oracle.assert_close(out, "full", case, dtype="float32")


@pytest.mark.parametrize("case", reflex_cases("full", sizes="small", variants=("gqa", "causal_bottom_right")))
def test_my_attention_meets_the_flash_rule(case, oracle):
    """The FlashAttention rule: my float32 error at most 2 × a naive float32 evaluation's (+ a floor)."""
    inputs = {name: a.astype(np.float32) for name, a in case.inputs.items()}  # what my kernel receives
    out = my_attention(inputs["q"], inputs["k"], inputs["v"], **case.params)
    measured = oracle.assert_flash_rule(out, "full", inputs, dtype="float32", **case.params)
    assert measured.error <= measured.bound


def test_my_attention_on_a_fixture_set(reflex_fixture_set):
    """The session's golden fixture set (generated once, in a temporary folder)."""
    assert len(reflex_fixture_set) > 0
    for case in reflex_fixture_set:
        if case.variant not in KERNEL_VARIANTS:
            continue
        out = my_attention(*(case.inputs[name] for name in case.positional), **case.params,
                           **{name: a for name, a in case.inputs.items() if name not in case.positional})
        tol = case.tolerance("float32")  # the tolerance recorded in the manifest
        np.testing.assert_allclose(out, case.output, atol=tol.atol, rtol=tol.rtol, err_msg=case.id)


def test_a_fully_masked_row_outputs_zero(oracle):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 2, 3, 4)), rng.standard_normal((1, 2, 5, 4)), rng.standard_normal((1, 2, 5, 4))
    mask = np.ones((3, 5), dtype=bool)
    mask[1] = False
    expected = oracle("full", {"q": q, "k": k, "v": v}, mask=mask)
    assert np.all(expected[..., 1, :] == 0)
    oracle.assert_close(my_attention(q, k, v, mask=mask), "full", [q, k, v], mask=mask, dtype="float32")
