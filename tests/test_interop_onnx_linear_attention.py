"""linear_recurrent_attention agrees with ONNX ``LinearAttention`` (opset 27) run by ``onnx.reference``.

One node per model: query (B, T, H·D), key (B, T, G·D), value (B, T, G·E), optional past_state
(B, G, D, E), decay (B, T, G) or (B, T, G·D), beta (B, T, G); attributes q_num_heads, kv_num_heads,
update_rule. The reference computes in float32 (inputs are float32, as the schema types allow), so
reflex in float64 on the same float32 values agrees to float32 round-off. Measured over the 36 cases
below (max |reflex − onnx| / max |onnx| over output and present_state): float64 ≤ 2.4e-7 (4 ulps of
float32); ``compute_dtype=float32`` with the recurrent form (ONNX's order of operations) ≤ 1.5e-7,
with the chunked form ≤ 3.0e-7. The float32 recurrent run is tighter at the worst case, not in every
case: both it and the reference carry their own float32 rounding (einsum and BLAS sum in different
orders), so neither is bit-exact to the other.
"""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

if not any(schema.name == "LinearAttention" for schema in onnx.defs.get_all_schemas_with_history()):
    pytest.skip(f"onnx {onnx.__version__} has no LinearAttention (opset 27)", allow_module_level=True)

B, T, H, D, E = 2, 9, 4, 5, 3


def pack(x):
    """(B, H, T, D) → ONNX's (B, T, H·D)."""
    b, h, t, d = x.shape
    return numpy.ascontiguousarray(numpy.transpose(x, (0, 2, 1, 3)).reshape(b, t, h * d))


def onnx_linear_attention(q, k, v, *, rule, past_state=None, decay=None, beta=None):
    """Run one LinearAttention node on reflex-layout float32 arrays; returns (out (B,H,T,E), state)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    feeds = {"query": pack(q), "key": pack(k), "value": pack(v)}
    names = ["query", "key", "value", "", "", ""]
    if past_state is not None:
        feeds["past_state"], names[3] = past_state, "past_state"
    if decay is not None:
        feeds["decay"] = pack(decay) if decay.ndim == 4 else numpy.ascontiguousarray(numpy.transpose(decay, (0, 2, 1)))
        names[4] = "decay"
    if beta is not None:
        feeds["beta"], names[5] = numpy.ascontiguousarray(numpy.transpose(beta, (0, 2, 1))), "beta"
    while names[-1] == "":
        names.pop()
    node = helper.make_node("LinearAttention", names, ["output", "present_state"], q_num_heads=heads,
                            kv_num_heads=kv_heads, update_rule=rule)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(feeds[n].shape)) for n in names if n]
    graph = helper.make_graph(
        [node], "linear_attention", inputs,
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("present_state", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 27)])
    out, state = ReferenceEvaluator(model).run(None, feeds)
    return numpy.transpose(out.reshape(q.shape[0], q.shape[2], heads, -1), (0, 2, 1, 3)), state


def draw(seed, *, rule, per_dim, kv_heads, past):
    f32 = numpy.float32
    arrays = {
        "q": random.normal((B, H, T, D), seed=(seed, 0)).astype(f32),
        "k": random.normal((B, kv_heads, T, D), seed=(seed, 1)),
        "v": random.normal((B, kv_heads, T, E), seed=(seed, 2)).astype(f32),
    }
    if rule in ("delta", "gated_delta"):
        arrays["k"] = arrays["k"] / numpy.linalg.norm(arrays["k"], axis=-1, keepdims=True)
        arrays["beta"] = random.uniform((B, kv_heads, T), seed=(seed, 4)).astype(f32)
    arrays["k"] = arrays["k"].astype(f32)
    if rule in ("gated", "gated_delta"):
        shape = (B, kv_heads, T, D) if per_dim else (B, kv_heads, T)
        arrays["decay"] = numpy.log(random.uniform(shape, seed=(seed, 3), low=0.5, high=1.0)).astype(f32)
    if past:
        arrays["initial_state"] = random.normal((B, kv_heads, D, E), seed=(seed, 5)).astype(f32)
    return arrays


CASES = [(rule, per_dim, kv_heads, past)
         for rule in ("linear", "gated", "delta", "gated_delta")
         for per_dim in ((False, True) if rule in ("gated", "gated_delta") else (False,))
         for kv_heads in (4, 2, 1)
         for past in (False, True)]

EPS32 = float(numpy.finfo(numpy.float32).eps)
FLOAT64_BOUND = 8 * EPS32  # measured max 2.4e-7 = 4 ulps
FLOAT32_BOUND = 4 * EPS32  # measured max 1.5e-7 = 2.5 ulps (recurrent form, float32)


@pytest.mark.parametrize("rule,per_dim,kv_heads,past", CASES)
def test_matches_onnx_reference(rule, per_dim, kv_heads, past):
    arrays = draw(len(rule) * 7 + kv_heads + 2 * past + per_dim, rule=rule, per_dim=per_dim, kv_heads=kv_heads,
                  past=past)
    want_out, want_state = onnx_linear_attention(arrays["q"], arrays["k"], arrays["v"], rule=rule,
                                                 past_state=arrays.get("initial_state"), decay=arrays.get("decay"),
                                                 beta=arrays.get("beta"))
    assert want_out.dtype == numpy.float32
    rest = {n: x for n, x in arrays.items() if n not in ("q", "k", "v")}
    errors = {}
    for dtype, form in ((None, "auto"), ("float32", "recurrent")):
        out, state = reflex.linear_recurrent_attention(arrays["q"], arrays["k"], arrays["v"], update_rule=rule,
                                                       return_state=True, compute_dtype=dtype, form=form, **rest)
        errors[dtype] = max(numpy.max(numpy.abs(out - want_out)) / numpy.max(numpy.abs(want_out)),
                            numpy.max(numpy.abs(state - want_state)) / numpy.max(numpy.abs(want_state)))
    assert errors[None] <= FLOAT64_BOUND, errors
    assert errors["float32"] <= FLOAT32_BOUND, errors


def test_onnx_forbids_and_requires_like_reflex():
    """The rules ONNX raises for (decay with 'linear', missing beta with 'delta') raise in reflex too."""
    arrays = draw(0, rule="gated_delta", per_dim=False, kv_heads=2, past=False)
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    for rule, kwargs in (("linear", {"decay": arrays["decay"]}), ("delta", {})):
        with pytest.raises(ValueError):
            onnx_linear_attention(q, k, v, rule=rule, **kwargs)
        with pytest.raises(ValueError, match="decay|beta"):
            reflex.linear_recurrent_attention(q, k, v, update_rule=rule, **kwargs)
