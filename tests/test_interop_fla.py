"""Section K against flash-linear-attention's ``naive`` references (optional: needs ``fla-core``, ``einops``
and ``triton`` — ``import fla.ops`` imports triton even for the pure-torch naive files; the CPU wheel
of triton imports without a GPU).

fla's naive functions cast every input to float32 (``.float()``, ``.to(torch.float32)``), so they are
compared twice: as shipped, at float32 round-off (relative ≤ 1e-5 here, measured ~1e-7), and as a
float64 port — the same source with those casts rewritten to float64 — to ≤ 1e-12, which checks the
semantics (update order, decay in log space, scale, read before/after the write) exactly.

Mapping (fla layout (B, T, H, K) unless noted; reflex (B, H, T, K)): naive_recurrent_gla ≡
linear_recurrent gated with per-dim decay, scale K^-½; naive_recurrent_simple_gla ≡ gated per head;
delta_rule_recurrence ((B, H, T, K)) ≡ delta; naive_recurrent_gated_delta_rule ≡ gated_delta per head;
naive_recurrent_kda ≡ gated_delta per dim; naive_recurrent_rwkv6 ((B, H, T, K)) ≡ rwkv6 (pass
scale=K^-½: fla's default; reflex's is RWKV's 1); dplr_recurrence ((B, H, T, K), α reads, β writes)
≡ rwkv7 with a = α, b = β, scale K^-½.
"""

from __future__ import annotations

import importlib
import importlib.util
import re

import numpy
import pytest

import reflex
from reflex.mechanisms import rwkv6, rwkv7
from reflex.mechanisms.linear_recurrent import _draw
from tests.helpers import max_abs

torch = pytest.importorskip("torch")
pytest.importorskip("einops")
pytest.importorskip("fla.ops.gla.naive", reason="fla-core (with triton) is not installed")

MODULES = {
    "gla": "fla.ops.gla.naive", "simple_gla": "fla.ops.simple_gla.naive", "delta": "fla.ops.delta_rule.naive",
    "gated_delta": "fla.ops.gated_delta_rule.naive", "kda": "fla.ops.kda.naive",
    "rwkv6": "fla.ops.rwkv6.recurrent_naive", "dplr": "fla.ops.generalized_delta_rule.dplr.naive",
}


def load(name, float64):
    """fla's naive module as shipped, or its float64 port (float32 casts rewritten)."""
    if not float64:
        return importlib.import_module(MODULES[name])
    source = open(importlib.util.find_spec(MODULES[name]).origin).read()
    source = source.replace(".float()", ".double()")
    source = re.sub(r"torch\.float32\b", "torch.float64", source)
    source = re.sub(r"torch\.float\b", "torch.float64", source)
    namespace = {"__name__": f"float64_port_{name}"}
    exec(compile(source, f"<float64 port of {MODULES[name]}>", "exec"), namespace)
    return type("Port", (), {k: staticmethod(v) if callable(v) else v for k, v in namespace.items()
                             if not k.startswith("__")})



def fla(x):
    """reflex (B, H, T, ...) → fla (B, T, H, ...) as a torch tensor."""
    return torch.tensor(numpy.ascontiguousarray(numpy.swapaxes(x, 1, 2)))


def back(x):
    return numpy.swapaxes(x.detach().numpy().astype(numpy.float64), 1, 2)


def host(rule, per_dim, seed=0, T=11):
    return _draw(seed, batch=2, heads=3, kv_heads=3, length=T, dim=5, value_dim=4, rule=rule, per_dim=per_dim,
                 state=True)


def compare(got, want, float64):
    if float64:
        assert max_abs(got, want) <= 1e-12
    else:
        assert max_abs(got, want) <= 1e-5 * max(1.0, float(numpy.max(numpy.abs(want))))


@pytest.mark.parametrize("float64", [True, False])
@pytest.mark.parametrize("name", ["gla", "simple_gla", "gated_delta", "kda", "delta"])
def test_gated_and_delta_rules(name, float64):
    rule = {"gla": "gated", "simple_gla": "gated", "gated_delta": "gated_delta", "kda": "gated_delta",
            "delta": "delta"}[name]
    per_dim = name in ("gla", "kda")
    h = host(rule, per_dim)
    q, k, v, s0 = h["q"], h["k"], h["v"], h["initial_state"]
    module = load(name, float64)
    s0_t = torch.tensor(s0)
    if name == "gla":
        o, s = module.naive_recurrent_gla(fla(q), fla(k), fla(v), fla(h["decay"]), initial_state=s0_t,
                                          output_final_state=True)
    elif name == "simple_gla":
        o, s = module.naive_recurrent_simple_gla(fla(q), fla(k), fla(v), fla(h["decay"]), initial_state=s0_t,
                                                 output_final_state=True)
    elif name == "gated_delta":
        o, s = module.naive_recurrent_gated_delta_rule(fla(q), fla(k), fla(v), fla(h["beta"]), fla(h["decay"]),
                                                       initial_state=s0_t, output_final_state=True)
    elif name == "kda":
        o, s = module.naive_recurrent_kda(fla(q), fla(k), fla(v), fla(h["decay"]), fla(h["beta"]),
                                          initial_state=s0_t, output_final_state=True)
    else:  # delta_rule_recurrence is head-first
        o, s = module.delta_rule_recurrence(torch.tensor(q), torch.tensor(k), torch.tensor(v), torch.tensor(h["beta"]),
                                            initial_state=s0_t, output_final_state=True)
        o = torch.swapaxes(o, 1, 2)
    rest = {n: x for n, x in h.items() if n not in ("q", "k", "v")}
    out, state = reflex.linear_recurrent_attention(q, k, v, update_rule=rule, return_state=True, **rest)
    compare(back(o), out, float64)
    compare(s.detach().numpy(), state, float64)


@pytest.mark.parametrize("float64", [True, False])
def test_rwkv6(float64):
    h = rwkv6._draw(1, batch=2, heads=3, length=11, dim=5, value_dim=4, state=True)
    module = load("rwkv6", float64)
    t = {n: torch.tensor(x) for n, x in h.items()}
    o, s = module.naive_recurrent_rwkv6(t["q"], t["k"], t["v"], t["decay"], t["bonus"],
                                        initial_state=t["initial_state"], output_final_state=True)
    rest = {n: x for n, x in h.items() if n not in ("q", "k", "v")}
    out, state = reflex.rwkv6_attention(h["q"], h["k"], h["v"], scale=5 ** -0.5, return_state=True, **rest)
    compare(o.detach().numpy(), out, float64)
    compare(s.detach().numpy(), state, float64)


@pytest.mark.parametrize("float64", [True, False])
def test_rwkv7_dplr(float64):
    h = rwkv7._draw(2, batch=2, heads=3, length=11, dim=5, value_dim=4, state=True)
    module = load("dplr", float64)
    # As shipped, dplr_recurrence casts q, k, v, β, g to float32 but not α: give it float32 inputs.
    t = {n: torch.tensor(x if float64 else x.astype(numpy.float32)) for n, x in h.items()}
    o, s = module.dplr_recurrence(t["q"], t["k"], t["v"], t["a"], t["b"], t["decay"],
                                  initial_state=t["initial_state"], output_final_state=True)
    rest = {n: x for n, x in h.items() if n not in ("q", "k", "v")}
    out, state = reflex.rwkv7_attention(h["q"], h["k"], h["v"], scale=5 ** -0.5, return_state=True, **rest)
    compare(o.detach().numpy(), out, float64)
    compare(s.detach().numpy(), state, float64)
