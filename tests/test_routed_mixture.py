"""routed_mixture: one-hot gates select a pathway exactly; router gates by hand; errors."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host

PATHWAYS = [{"mechanism": "full"}, {"mechanism": "sliding_window", "window": [1, 0]},
            {"mechanism": "alibi", "causal": True}]


def run_pathway(spec, q, k, v):
    params = {name: value for name, value in spec.items() if name != "mechanism"}
    return reflex.get(spec["mechanism"]).function(q, k, v, **params)


@pytest.mark.parametrize("selected", [0, 1, 2])
def test_one_hot_gate_is_the_selected_pathway(backend, selected):
    q, k, v = qkv_host(1, length=5, key_length=5)
    gates = numpy.zeros((3,))
    gates[selected] = 1.0
    out = reflex.routed_mixture_attention(*(backend.asarray(a) for a in (q, k, v)), pathways=PATHWAYS,
                                          gates=backend.asarray(gates))
    ref = run_pathway(PATHWAYS[selected], *(backend.asarray(a) for a in (q, k, v)))
    assert max_abs(backend.to_numpy(out), backend.to_numpy(ref)) == 0.0


def test_per_token_one_hot_gates(backend):
    q, k, v = qkv_host(2, length=6, key_length=6)
    choice = random.integers((2, 1, 6), seed=3, low=0, high=3)
    gates = (choice[..., None] == numpy.arange(3)) * 1.0  # (B, 1, L, P): per token, shared by heads
    out = backend.to_numpy(reflex.routed_mixture_attention(*(backend.asarray(a) for a in (q, k, v)), pathways=PATHWAYS,
                                                           gates=backend.asarray(gates)))
    for index, spec in enumerate(PATHWAYS):
        ref = run_pathway(spec, q, k, v)
        rows = numpy.broadcast_to(choice == index, out.shape[:-1])
        assert max_abs(out[rows], ref[rows]) < 1e-15


def test_router_gates(backend):
    q, k, v = qkv_host(4, length=4, key_length=7)
    x, w_r = random.normal((2, 4, 6), seed=5), random.normal((6, 3), seed=6)
    logits = x @ w_r
    gates = numpy.exp(logits - logits.max(-1, keepdims=True))
    gates /= gates.sum(-1, keepdims=True)
    pathways = [{"mechanism": "full"}, {"mechanism": "full", "causal": "bottom_right"}, {"mechanism": "rope", "rotary_dim": 4}]
    ref = sum(gates[:, None, :, n, None] * run_pathway(spec, q, k, v) for n, spec in enumerate(pathways))
    out = reflex.routed_mixture_attention(*(backend.asarray(a) for a in (q, k, v)), pathways=pathways,
                                          x=backend.asarray(x), w_r=backend.asarray(w_r))
    assert max_abs(backend.to_numpy(out), ref) < 1e-14
    assert max_abs(backend.to_numpy(reflex.routing_gates(backend.asarray(x), backend.asarray(w_r))), gates) < 1e-15


def test_errors():
    q, k, v = qkv_host(7)
    with pytest.raises(ValueError, match="either gates, or x and w_r"):
        reflex.routed_mixture_attention(q, k, v, pathways=PATHWAYS)
    with pytest.raises(ValueError, match="3 pathways"):
        reflex.routed_mixture_attention(q, k, v, pathways=PATHWAYS, x=numpy.zeros((2, 7, 4)), w_r=numpy.zeros((4, 2)))
    with pytest.raises(ValueError, match="do not broadcast"):
        reflex.routed_mixture_attention(q, k, v, pathways=PATHWAYS, gates=numpy.zeros((5, 3)))
    with pytest.raises(ValueError, match="each pathway must be a mapping"):
        reflex.routed_mixture_attention(q, k, v, pathways=["full"], gates=numpy.ones(1))
    with pytest.raises(KeyError, match="unknown mechanism"):
        reflex.routed_mixture_attention(q, k, v, pathways=[{"mechanism": "nope"}], gates=numpy.ones(1))


def test_a_pathway_returning_extras_contributes_its_output():
    """residual returns (out, raw scores): the mixture takes the output."""
    q, k, v = qkv_host(31, length=4, key_length=4)
    gates = numpy.broadcast_to(numpy.array([0.0, 1.0]), (2, 4, 4, 2))
    got = reflex.routed_mixture_attention(q, k, v, pathways=[{"mechanism": "full"}, {"mechanism": "residual"}],
                                          gates=gates)
    assert max_abs(got, reflex.residual_attention(q, k, v)[0]) == 0.0
